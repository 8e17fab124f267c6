"""Verification refuses an output whose ties share bytes the source kept apart (and only that)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from converter.errors import VerificationError
from converter.readers.torchfile import read_checkpoint
from converter.ties import TieRecord, View
from converter.verify import _check_no_false_sharing


@pytest.fixture
def source(tmp_path: Path) -> Path:
    base = torch.arange(12, dtype=torch.float32)
    state = {
        "a": base,
        "a_alias": base,  # the same tensor
        "a_tail": base[4:],  # a view of it
        "b": base.clone(),  # the same values, its own storage
        "b_tail": base.clone()[4:],  # a window on another storage
    }
    for i in range(50):  # tensors no tie involves
        state[f"layers.{i}.w"] = torch.ones(2)
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    return path


def _tail(base: str) -> View:
    return View(base, 4, (8,), (1,), "F32")


def test_ties_the_source_has_pass(source: Path) -> None:
    ckpt = read_checkpoint(source)
    record = TieRecord(aliases={"a_alias": "a"}, views={"a_tail": _tail("a")})
    _check_no_false_sharing(ckpt, record, set(), source)
    _check_no_false_sharing(ckpt, TieRecord(), set(), source)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (TieRecord(aliases={"b": "a"}), "'b' is tied to 'a' in the output but not in the source"),
        (TieRecord(views={"b_tail": _tail("a")}), "'b_tail' shares bytes with 'a' in the output"),
        # a view of an aliased base: the alias is named first, as the record lists it
        (
            TieRecord(aliases={"a_alias": "a"}, views={"b_tail": _tail("a")}),
            "'b_tail' shares bytes with 'a_alias' in the output",
        ),
    ],
)
def test_ties_the_source_lacks_are_refused_unless_declared(source: Path, record: TieRecord, message: str) -> None:
    ckpt = read_checkpoint(source)
    with pytest.raises(VerificationError, match=message):
        _check_no_false_sharing(ckpt, record, set(), source)
    declared = {*record.aliases, *record.views} - {"a_alias"}
    _check_no_false_sharing(ckpt, record, declared, source)  # a config's tie or identical bytes: on purpose
