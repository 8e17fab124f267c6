"""Gather the bytes of a non-contiguous tensor from a file, one tensor at a time.

The only place on the conversion path that needs torch: a transposed or strided
tensor's elements are not one byte range, and ``as_strided(...).contiguous()`` is
the well-tested way to rearrange them. torch is imported here, lazily, so that
checkpoints without such tensors convert without paying its import.
"""

from __future__ import annotations

import os
from typing import Any, cast

from .torchfile import TensorRef

# Element sizes to an integer dtype of the same width: moving bytes never needs
# the real dtype (float8, bool, ... all travel as raw integers).
_RAW_DTYPE_NAMES = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


def read_exact(fd: int, offset: int, nbytes: int) -> bytes:
    """``os.pread`` until ``nbytes`` bytes are read (short reads happen on big ranges)."""
    parts = []
    while nbytes > 0:
        chunk = os.pread(fd, min(nbytes, 1 << 30), offset)
        if not chunk:
            raise OSError(f"unexpected end of file at byte {offset}")
        parts.append(chunk)
        offset += len(chunk)
        nbytes -= len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def gather(fd: int, storage_offset: int, ref: TensorRef) -> memoryview:
    """The row-major bytes of the tensor ``ref`` whose storage starts at ``storage_offset``."""
    import torch  # lazily: only strided tensors need it

    start, stop = ref.span
    if ref.numel == 0:
        return memoryview(b"")
    raw = bytearray(read_exact(fd, storage_offset + start, stop - start))
    itemsize = ref.dtype.itemsize
    flat = torch.frombuffer(raw, dtype=getattr(torch, _RAW_DTYPE_NAMES[itemsize]))
    dense = flat.as_strided(ref.shape, ref.stride, ref.offset - start // itemsize).contiguous()
    raw_bytes: Any = dense.view(torch.uint8).reshape(-1).numpy()
    return memoryview(cast(bytes, raw_bytes))
