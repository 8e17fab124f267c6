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
