"""Helpers shared by tests: convert a state dict and check the round trip."""

from __future__ import annotations

from pathlib import Path

import torch

import converter
from converter.dtypes import BY_CODE

# Every dtype a safetensors file can hold, as torch names it (converter/dtypes.py is the table).
SAFETENSORS_DTYPES = [getattr(torch, d.torch_name) for d in BY_CODE.values()]


def save_and_convert(state: dict, folder: Path, name: str = "ckpt.pt", legacy: bool = False, **options):
    """torch.save ``state``, convert it, and return (source path, report)."""
    source = folder / name
    torch.save(state, source, _use_new_zipfile_serialization=not legacy)
    return source, converter.convert_file(source, **options)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality: NaN payloads and -0.0 count, unlike torch.equal."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    raw = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(raw), b.contiguous().view(raw))


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
