"""Batch conversion of trees: discovery, failures, resume after a kill, parallel == serial."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from models import save_model_folder

import converter
from converter.batch import (
    DEFAULT_OPTIONS,
    MANIFEST,
    BatchReport,
    convert_tree,
    discover,
    process_peak_rss,
    run_item,
)
from converter.writer import TEMP_SUFFIX


def _build_tree(root: Path) -> None:
    save_model_folder("gpt2", root / "runs" / "gpt2" / "checkpoint-100")
    save_model_folder("bert", root / "runs" / "gpt2" / "checkpoint-100" / "nested-bert")
    save_model_folder("llama", root / "zoo" / "llama")
    (root / "loose").mkdir()
    w = torch.randn(8, 8)
    torch.save({"a": w, "b": w}, root / "loose" / "weights.pt")
    (root / "loose" / "broken.bin").write_bytes(b"PK\x03\x04 broken")
    (root / "docs").mkdir()
    (root / "docs" / "notes.txt").write_text("not a model")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    _build_tree(tmp_path / "src")
    return tmp_path / "src"


def _outputs(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def test_discovery_finds_folders_and_loose_files(tree: Path, tmp_path: Path) -> None:
    items = {i.key: i.kind for i in discover(tree, tmp_path / "out")}
    assert items == {
        "runs/gpt2/checkpoint-100": "folder",
        "runs/gpt2/checkpoint-100/nested-bert": "folder",
        "zoo/llama": "folder",
        "loose/weights.pt": "file",
        "loose/broken.bin": "file",
    }


def test_batch_converts_keeps_going_and_reports_failures(tree: Path, tmp_path: Path) -> None:
    results = {r.item: r for r in convert_tree(tree, tmp_path / "out", workers=1)}
    assert results["loose/broken.bin"].status == "failed"
    assert str(tree / "loose" / "broken.bin") in (results["loose/broken.bin"].error or "")
    converted = sorted(k for k, r in results.items() if r.status == "converted")
    assert converted == [
        "loose/weights.pt",
        "runs/gpt2/checkpoint-100",
        "runs/gpt2/checkpoint-100/nested-bert",
        "zoo/llama",
    ]
    out = tmp_path / "out"
    assert (out / "runs/gpt2/checkpoint-100/model.safetensors").exists()
    assert (out / "runs/gpt2/checkpoint-100/config.json").exists()
    assert (out / "loose/weights.safetensors").exists() and not (out / "loose/broken.safetensors").exists()
    assert results["loose/weights.pt"].bytes_saved == 256
    loaded = converter.load_file(out / "loose/weights.safetensors")
    assert loaded["b"] is loaded["a"]


def test_rerun_skips_unchanged_and_redoes_changed(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    list(convert_tree(tree, out, workers=1))
    again = {r.item: r.status for r in convert_tree(tree, out, workers=1)}
    assert again["zoo/llama"] == "unchanged" and again["loose/weights.pt"] == "unchanged"
    assert again["loose/broken.bin"] == "failed"  # failures are retried
    torch.save({"a": torch.zeros(2)}, tree / "loose" / "weights.pt")
    changed = {r.item: r.status for r in convert_tree(tree, out, workers=1)}
    assert changed["loose/weights.pt"] == "converted" and changed["zoo/llama"] == "unchanged"
    forced = {r.item: r.status for r in convert_tree(tree, out, workers=1, force=True)}
    assert forced["zoo/llama"] == "converted"
    manifest = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    entry = next(e for e in manifest if e["item"] == "zoo/llama")
    assert len(entry["outputs"]["model.safetensors"]["sha256"]) == 64


def test_parallel_and_serial_outputs_are_byte_identical(tree: Path, tmp_path: Path) -> None:
    list(convert_tree(tree, tmp_path / "serial", workers=1))
    list(convert_tree(tree, tmp_path / "parallel", workers=2))
    assert _outputs(tmp_path / "serial") == _outputs(tmp_path / "parallel")


def test_dry_run_writes_nothing(tree: Path, tmp_path: Path) -> None:
    results = {r.item: r for r in convert_tree(tree, tmp_path / "out", dry_run=True, workers=1)}
    assert not (tmp_path / "out").exists()
    assert results["zoo/llama"].status == "planned" and results["zoo/llama"].bytes_saved > 0
    assert results["loose/broken.bin"].status == "failed"


def test_in_place_writes_beside_the_sources(tree: Path) -> None:
    list(convert_tree(tree, in_place=True, workers=1))
    assert (tree / "zoo/llama/model.safetensors").exists() and (tree / "zoo/llama/pytorch_model.bin").exists()
    assert (tree / "loose/weights.safetensors").exists() and (tree / MANIFEST).exists()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "converter", *args], capture_output=True, text=True)


def test_cli_batch_exit_code_summary_and_json(tree: Path, tmp_path: Path) -> None:
    result = _cli("batch", str(tree), "--out", str(tmp_path / "out"), "--workers", "1")
    assert result.returncode == 2
    assert "4 converted" in result.stdout and "1 failed" in result.stdout
    assert "failed" in result.stdout and "broken.bin" in result.stdout
    as_json = _cli("batch", str(tree), "--out", str(tmp_path / "out"), "--json", "--quiet")
    report = json.loads(as_json.stdout)
    assert report["counts"] == {"failed": 1, "unchanged": 4}
    assert _cli("batch", str(tree)).returncode == 2  # neither --out nor --in-place


def test_killed_batch_resumes_to_the_same_output(tmp_path: Path) -> None:
    source = tmp_path / "src"
    for i in range(6):
        save_model_folder("gpt2", source / f"run{i}")
    list(convert_tree(source, tmp_path / "reference", workers=1))
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "converter", "batch", str(source), "--out", str(out), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    manifest = out / MANIFEST
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (manifest.exists() and manifest.read_text().count("\n") >= 2):
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished = manifest.read_text().count("\n")
    assert 2 <= finished < 6, "the kill should land mid-run"
    # Every final name holds a complete file: each parses and loads.
    for path in out.rglob("model.safetensors"):
        converter.load_file(path)
    results = {r.item: r.status for r in convert_tree(source, out, workers=1)}
    assert sum(s == "unchanged" for s in results.values()) == finished
    assert not list(out.rglob("*.tiesafe-tmp"))
    assert _outputs(out) == _outputs(tmp_path / "reference")


def test_an_item_cleans_only_its_own_stale_temporaries(tree: Path, tmp_path: Path) -> None:
    """Loose files of one folder share their output folder: a dead run's leftovers of this item go,
    another item's file being written there right now stays."""
    item = next(i for i in discover(tree, tmp_path / "out") if i.key == "loose/weights.pt")
    item.output.parent.mkdir(parents=True)
    stale = item.output.parent / f".{item.output.name}.x1y2z3{TEMP_SUFFIX}"
    neighbour = item.output.parent / f".broken.safetensors.a4b5c6{TEMP_SUFFIX}"
    stale.write_bytes(b"left by a killed worker")
    neighbour.write_bytes(b"another worker is writing this")
    assert run_item(item, dict(DEFAULT_OPTIONS)).status == "converted"
    assert not stale.exists() and neighbour.exists()


def test_loose_files_with_one_stem_get_distinct_outputs(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    torch.save({"w": torch.ones(2)}, tmp_path / "src" / "x.pt")
    torch.save({"w": torch.zeros(2)}, tmp_path / "src" / "x.bin")
    outputs = sorted(i.output.name for i in discover(tmp_path / "src", tmp_path / "out"))
    assert outputs == ["x.bin.safetensors", "x.pt.safetensors"]


def test_a_peft_adapter_folder_is_one_item_with_its_config(tmp_path: Path) -> None:
    adapter = tmp_path / "src" / "run" / "lora"
    adapter.mkdir(parents=True)
    torch.save({"base_model.model.q_proj.lora_A.weight": torch.randn(4, 8)}, adapter / "adapter_model.bin")
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    assert [(i.key, i.kind) for i in discover(tmp_path / "src", tmp_path / "out")] == [("run/lora", "folder")]
    (result,) = convert_tree(tmp_path / "src", tmp_path / "out", workers=1)
    assert result.status == "converted"
    assert sorted(p.name for p in (tmp_path / "out" / "run" / "lora").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


def test_each_item_reports_its_workers_pid_and_peak_memory(tree: Path, tmp_path: Path) -> None:
    inline = list(convert_tree(tree, tmp_path / "serial", workers=1))
    assert {r.worker_pid for r in inline} == {os.getpid()}
    assert all(r.peak_rss is not None and 0 < r.peak_rss <= (process_peak_rss() or 0) for r in inline)
    pooled = list(convert_tree(tree, tmp_path / "parallel", workers=2))
    assert os.getpid() not in {r.worker_pid for r in pooled} and 1 <= len({r.worker_pid for r in pooled}) <= 2
    report = BatchReport(str(tree), str(tmp_path / "parallel"), pooled, 1.0, process_peak_rss())
    by_worker = report.to_dict()["peak_rss_by_worker"]
    assert set(by_worker) == {str(r.worker_pid) for r in pooled}
    assert by_worker == {
        str(pid): max(r.peak_rss or 0 for r in pooled if r.worker_pid == pid) for pid in report.peak_rss_by_worker
    }


def test_peak_memory_is_the_workers_own_not_its_parents(tmp_path: Path) -> None:
    """Linux carries ru_maxrss over exec: a worker started by a 300 MiB process would report 300 MiB.
    The figure must be the worker's own (VmHWM)."""
    probe = "from converter.batch import process_peak_rss; print(process_peak_rss())"
    parent = (
        "import subprocess, sys\n"
        "ballast = bytearray(300 << 20)\n"
        "ballast[::4096] = b'x' * len(ballast[::4096])\n"
        f"print(subprocess.run([sys.executable, '-c', {probe!r}], capture_output=True, text=True, check=True).stdout)\n"
    )
    child_peak = int(subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True).stdout)
    assert 0 < child_peak < 200 << 20
