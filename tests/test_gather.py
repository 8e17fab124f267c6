"""Strided tensors gathered without torch: row slices for few rows, numpy for many; both equal torch's copy."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from converter import windows
from converter.descriptors import TensorRef
from converter.dtypes import BY_TORCH_NAME

_DTYPES = [torch.uint8, torch.float16, torch.float32, torch.float64, torch.bfloat16, torch.int64]


@st.composite
def strided_windows(draw: st.DrawFn) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...], int]:
    """A storage and a window on it: any shape, any non-negative strides (0 = expanded), any offset."""
    dtype = draw(st.sampled_from(_DTYPES))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=4)))
    stride = tuple(draw(st.lists(st.integers(0, 7), min_size=len(shape), max_size=len(shape))))
    offset = draw(st.integers(0, 5))
    reach = offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True)) + 1
    storage = torch.randint(0, 255, (reach * dtype.itemsize,), dtype=torch.uint8).view(dtype)
    return storage, shape, stride, offset


@settings(max_examples=int(os.environ.get("TIESAFE_EXAMPLES", "60")), deadline=None)
@given(window=strided_windows(), rows_limit=st.sampled_from([0, 1 << 30]))
def test_gather_equals_torch(
    window: tuple[torch.Tensor, tuple[int, ...], tuple[int, ...], int], rows_limit: int
) -> None:
    storage, shape, stride, offset = window
    dense = torch.empty(shape, dtype=storage.dtype).copy_(storage.as_strided(shape, stride, offset))
    expected = dense.reshape(-1).view(torch.uint8).numpy().tobytes()
    ref = TensorRef("0", BY_TORCH_NAME[str(storage.dtype).removeprefix("torch.")], offset, shape, stride)
    with tempfile.NamedTemporaryFile() as file:
        file.write(b"pad!" + storage.view(torch.uint8).numpy().tobytes())
        file.flush()
        fd = os.open(file.name, os.O_RDONLY)
        try:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(windows, "_PYTHON_GATHER_ROWS", rows_limit)  # 0: numpy always; huge: rows always
                assert bytes(windows.gather(fd, 4, ref)) == expected
        finally:
            os.close(fd)
