"""Verification reads tensors in fixed-size blocks: a difference in any block is found."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import converter
from converter import windows
from converter.errors import VerificationError
from converter.stfile import read_safetensors


@pytest.mark.parametrize("where", ["first block", "middle block", "partial last block"])
def test_a_flipped_byte_anywhere_in_a_multi_block_tensor_is_found(tmp_path: Path, where: str) -> None:
    block = windows._BLOCK
    big = torch.arange(0, (2 * block + block // 2 + 3) // 4, dtype=torch.int32)  # 2.5 blocks and a bit
    source = tmp_path / "pytorch_model.bin"
    torch.save({"big": big, "alias": big, "small": torch.ones(3)}, source)
    output = tmp_path / "model.safetensors"
    converter.convert_file(source, output)
    assert converter.verify_file(source, output).names == 3

    entry = read_safetensors(output).entries["big"]
    offset = {"first block": 5, "middle block": block + 17, "partial last block": entry.nbytes - 1}[where]
    data = bytearray(output.read_bytes())
    data[entry.start + offset] ^= 0x40
    output.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="'big' differs from the source"):
        converter.verify_file(source, output)


def test_output_windows_know_the_geometry_a_tensor_ref_computes(tmp_path: Path) -> None:
    """Verification fills in each stored tensor's numel, nbytes, span and contiguity from the header."""
    from converter.descriptors import TensorRef
    from converter.verify import output_windows

    state = {
        "scalar": torch.tensor(3.0),
        "empty": torch.zeros(0),
        "empty3": torch.zeros(3, 0, 2, dtype=torch.uint8),
        "square": torch.ones(4, 4, dtype=torch.bfloat16),
        "ones": torch.ones(2, 1, 3, dtype=torch.int64),
    }
    source = tmp_path / "pytorch_model.bin"
    torch.save(state, source)
    output = tmp_path / "model.safetensors"
    converter.convert_file(source, output)
    found, _ = output_windows([read_safetensors(output)])
    assert set(found) == set(state)
    for name, window in found.items():
        ref = window.ref
        fresh = TensorRef(ref.storage, ref.dtype, ref.offset, ref.shape, ref.stride)  # computes on first use
        assert (ref.numel, ref.nbytes, ref.span, ref.is_contiguous) == (
            fresh.numel,
            fresh.nbytes,
            fresh.span,
            fresh.is_contiguous,
        ), name
        assert ref.nbytes == state[name].numel() * state[name].element_size()
