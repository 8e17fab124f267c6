"""Tensors as windows on files: one byte range, or strided elements to gather.

The writer copies a window's bytes from a source checkpoint; verification
compares a window of the output with one of the source. A contiguous window is
one byte range and never needs torch. A transposed or strided one is gathered,
one tensor at a time, with ``as_strided(...).contiguous()`` -- the only place on
the conversion path that needs torch, imported lazily so that checkpoints
without such tensors convert without paying for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from .torchfile import TensorRef

# Element sizes to an integer dtype of the same width: moving bytes never needs
# the real dtype (float8, bool, ... all travel as raw integers).
_RAW_DTYPE_NAMES = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


@dataclass(frozen=True)
class FileWindow:
    """A tensor in a file: its storage starts at byte ``storage_offset`` of ``path``."""

    path: Path
    storage_offset: int
    ref: TensorRef

    @property
    def contiguous_range(self) -> tuple[int, int] | None:
        """``(file offset, length)`` when the bytes are one range, else None."""
        if not self.ref.is_contiguous:
            return None
        return self.storage_offset + self.ref.span[0], self.ref.nbytes


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


def read_into(fd: int, buffer: memoryview, offset: int) -> None:
    """Fill ``buffer`` from ``fd`` at ``offset`` with ``os.preadv`` (no allocation; short reads retried).

    Raises EOFError when the file ends first.
    """
    filled, size = 0, len(buffer)
    while filled < size:
        got = os.preadv(fd, [buffer[filled:]], offset + filled)
        if not got:
            raise EOFError(f"unexpected end of file at byte {offset + filled}")
        filled += got


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
