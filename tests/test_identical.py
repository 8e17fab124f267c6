"""Identical bytes are found by comparing candidates, never by shape alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from converter import identical
from converter.identical import identical_groups
from converter.layout import stored_items
from converter.readers.torchfile import read_checkpoint
from converter.sharing import plan_sharing


def _groups(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> list[list[str]]:
    path = tmp_path / "x.bin"
    torch.save(tensors, path)
    ckpt = read_checkpoint(path)
    return identical_groups(stored_items(ckpt, plan_sharing(ckpt.tensors)))


@pytest.mark.parametrize("compare_at_most", [8, 1])  # compared pairwise, and hashed
def test_equal_bytes_are_grouped_and_late_differences_are_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compare_at_most: int
) -> None:
    monkeypatch.setattr(identical, "_COMPARE_AT_MOST", compare_at_most)
    base = torch.zeros(600_000)  # 2.4 MB: past the 64 KiB prefix and the first 2 MiB compare block
    late = base.clone()
    late[-1] = 1.0  # same first 64 KiB and first block: only a full comparison tells
    tensors = {
        "a": base.clone(),
        "late": late,
        "b": base.clone(),
        "other_shape": torch.zeros(599_999),
        "c": base.clone(),
        "late_twin": late.clone(),
        "int_view": base.clone().view(torch.int32),  # same bytes, another dtype: not a candidate
    }
    assert _groups(tmp_path, tensors) == [["a", "b", "c"], ["late", "late_twin"]]


def test_nothing_alike_reads_nothing_past_the_descriptors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_compare(*args: object) -> bool:
        raise AssertionError("tensors of different shapes were compared")

    monkeypatch.setattr(identical.WindowComparer, "equal", must_not_compare)
    assert _groups(tmp_path, {"a": torch.ones(4), "b": torch.ones(5), "c": torch.ones(2, 2).double()}) == []
