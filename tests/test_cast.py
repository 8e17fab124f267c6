"""--dtype: converter.cast gives exactly torch's tensor.to(dtype), bit for bit, without torch."""

from __future__ import annotations

import pytest
import torch

from converter.cast import cast_bytes, cast_target
from converter.dtypes import BY_CODE
from converter.errors import UnsupportedError

FLOATS = {
    "F32": (torch.float32, torch.int32),
    "F16": (torch.float16, torch.int16),
    "BF16": (torch.bfloat16, torch.int16),
}


def _bits(dtype: torch.dtype, raw: torch.dtype, n: int) -> torch.Tensor:
    """Random bit patterns (NaN payloads, infinities, subnormals, -0.0 among them) plus the edge cases."""
    width = torch.iinfo(raw).bits
    random = torch.randint(-(2 ** (width - 1)), 2 ** (width - 1) - 1, (n,), generator=torch.Generator().manual_seed(0))
    edges = torch.tensor([0.0, -0.0, 1.0, 65504.0, 65520.0, 1e-8, 3.0e38, float("inf"), -float("inf"), float("nan")])
    return torch.cat([random.to(raw).view(dtype), edges.to(dtype)])


@pytest.mark.parametrize("source", list(FLOATS))
@pytest.mark.parametrize("target", list(FLOATS))
def test_cast_equals_tensor_to(source: str, target: str) -> None:
    """Bit for bit; NaNs too from fp32 (the cast --dtype makes of master weights).

    From fp16/bf16, torch's own NaN bits depend on where the element falls: its vector
    kernel keeps the payload, its scalar tail loop writes 0x7FFFFFFF. There only NaN-ness is
    compared; every other value is compared bit for bit.
    """
    dtype, raw = FLOATS[source]
    values = _bits(dtype, raw, 200_003)
    out_dtype, out_raw = FLOATS[target]
    expected = values.to(out_dtype)
    ours = torch.frombuffer(
        bytearray(cast_bytes(values.view(raw).numpy().tobytes(), BY_CODE[source], BY_CODE[target])), dtype=out_raw
    )
    if source == "F32":
        assert torch.equal(ours, expected.view(out_raw))
        return
    nan = expected.isnan()
    assert torch.equal(ours[~nan], expected.view(out_raw)[~nan])
    assert ours.view(out_dtype)[nan].isnan().all()


def test_cast_targets() -> None:
    assert cast_target("bf16").code == "BF16" and cast_target("float16").code == "F16"
    with pytest.raises(UnsupportedError, match="not one of"):
        cast_target("int8")
