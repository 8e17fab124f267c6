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


def test_many_small_candidates_are_told_apart_by_their_ends_then_in_full(tmp_path: Path) -> None:
    """Experts of one shape: every one is a candidate. Short ones are settled by the sampled ends
    (their whole bytes); longer ones that agree at both ends are compared in full."""
    tensors: dict[str, torch.Tensor] = {}
    for i in range(40):
        tensors[f"small.{i}"] = torch.full((8, 8), float(i % 7))  # 256 bytes: the sample is the tensor
    middle = torch.zeros(4096)  # 16 KiB: the ends are 1 KiB each
    changed = middle.clone()
    changed[2048] = 1.0  # differs only in the middle
    tensors |= {"mid.a": middle.clone(), "mid.changed": changed, "mid.b": middle.clone()}
    groups = _groups(tmp_path, tensors)
    expected = [[f"small.{i}" for i in range(r, 40, 7)] for r in range(7)]
    assert groups == [*expected, ["mid.a", "mid.b"]]
