"""The batch progress display names the items in flight, not the last one submitted."""

from __future__ import annotations

import concurrent.futures
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from models import save_model_folder
from rich.console import Console

import converter.batch
from converter.batch import BatchItem, ItemResult, convert_tree, discover
from converter.progress import BatchProgress


def _plain() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=200, highlight=False, soft_wrap=True), out


def _item(key: str) -> BatchItem:
    return BatchItem("file", Path(key), Path(key + ".safetensors"), key, 10)


def _result(key: str) -> ItemResult:
    return ItemResult(key, "file", "converted", key, key + ".safetensors", 10, seconds=0.5)


def test_plain_lines_name_the_items_in_flight() -> None:
    console, out = _plain()
    items = [_item(k) for k in ("a", "b", "c")]
    with BatchProgress(items, console) as progress:
        assert progress.status() == "0/3 items"
        progress.start(items[0])
        progress.start(items[1])
        assert progress.in_flight == ["a", "b"] and progress.status() == "0/3 items  current: a, b"
        progress.finish(_result("a"))
        assert progress.status() == "1/3 items  current: b"
        progress.start(items[2])
        assert progress.status() == "1/3 items  current: b, c"
        progress.finish(_result("c"))
        progress.finish(_result("b"))
        assert progress.in_flight == [] and progress.status() == "3/3 items"
    assert out.getvalue().splitlines() == [
        "started    a",
        "started    b (also running: a)",
        "converted  a (0.5 s)",
        "started    c (also running: b)",
        "converted  c (0.5 s)",
        "converted  b (0.5 s)",
    ]


def test_many_items_in_flight_are_counted_and_names_are_escaped() -> None:
    console, _ = _plain()
    items = [_item(f"run{i}") for i in range(6)] + [_item("x[red]y\x1b")]
    with BatchProgress(items, console) as progress:
        for item in items:
            progress.start(item)
        assert progress.status() == "0/7 items  current: run0, run1, run2, run3 and 3 more"
        for i in range(6):
            progress.finish(_result(f"run{i}"))
        assert progress.status() == "6/7 items  current: x\\[red]y\\x1b"


def _tree(root: Path) -> None:
    for i in range(3):
        save_model_folder("gpt2", root / f"run{i}")
    for i in range(2):
        torch.save({"w": torch.randn(16)}, root / f"loose{i}.pt")


def _watch(results: Iterator[ItemResult], progress: BatchProgress, seen: list[int]) -> Iterator[ItemResult]:
    for result in results:
        seen.append(len(progress.in_flight))
        assert result.item in progress.in_flight, "an item is finished before it was shown as started"
        progress.finish(result)
        yield result


def test_a_pool_shows_at_most_its_workers_in_flight(tmp_path: Path) -> None:
    """Before, every item was 'started' when submitted: all five showed as current at once."""
    _tree(tmp_path / "src")
    console, out = _plain()
    items = discover(tmp_path / "src", tmp_path / "out")
    seen: list[int] = []
    with BatchProgress(items, console) as progress:
        results = convert_tree(tmp_path / "src", tmp_path / "out", workers=2, on_start=progress.start)
        assert all(r.status == "converted" for r in _watch(results, progress, seen))
    assert len(seen) == 5 and max(seen) <= 2
    assert out.getvalue().count("started ") == 5


def test_an_executor_passed_in_shows_the_calls_it_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An executor keeps its own queue: an item shows as started once the executor runs it, not when queued."""
    _tree(tmp_path / "src")
    begun: set[str] = set()
    run_item = converter.batch.run_item

    def traced(item: BatchItem, *args: Any) -> ItemResult:
        begun.add(item.key)
        time.sleep(0.05)  # long enough for the queue to be seen waiting
        return run_item(item, *args)

    monkeypatch.setattr(converter.batch, "run_item", traced)
    shown_early: list[str] = []

    def on_start(item: BatchItem) -> None:
        if item.key not in begun:
            shown_early.append(item.key)
        progress.start(item)

    console, out = _plain()
    items = discover(tmp_path / "src", tmp_path / "out")
    with concurrent.futures.ThreadPoolExecutor(2) as executor, BatchProgress(items, console) as progress:
        results = convert_tree(tmp_path / "src", tmp_path / "out", executor=executor, on_start=on_start)
        assert all(r.status == "converted" for r in _watch(results, progress, []))
    assert shown_early == [] and begun == {i.key for i in items}
    assert out.getvalue().count("started ") == 5
