"""scripts/bench.py --quick runs end to end, so the benchmark itself keeps working.

Speed and memory are the benchmark's business, never asserted here: this test
checks that every tool ran on the tiny inputs, that the figures come from the OS
and that the reports are complete.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_runs_every_tool(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--cache", str(tmp_path / "cache")]
    result = subprocess.run([*command, "--json", str(report)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| input | tool | wall s |" in result.stdout and "converter.load_file (ties='share')" in result.stdout

    doc = json.loads(report.read_text())
    ran = [r for r in doc["rows"] if r["status"] != "pending"]
    for row in doc["rows"]:
        if row["status"] == "pending":  # the folder conversion, until it is on this branch
            assert row["kind"] == "tiesafe" and row["input"] == "llama-tiny"
            continue
        assert row["status"] == "ok", row
        (run,) = row["runs"]
        assert run["returncode"] == 0 and run["wall"] > 0 and run["peak_rss"] > 0 and run["written"] > 0, row
    assert {r["kind"] for r in ran} == {"tiesafe", "reference", "floor"}
    assert len({r["tool"] for r in ran if r["kind"] == "reference"}) == 3
    assert {r["input"] for r in ran if r["kind"] == "tiesafe"} == {"gpt2-tiny", "llama-tiny"}

    load = doc["load"]
    # converter.load_file gives the tied name back; safetensors' loader sees the stored names only.
    assert load["share"]["names"] == load["clone"]["names"] == load["safetensors"]["names"] + 1
    assert all(load[mode]["seconds"] > 0 for mode in ("safetensors", "share", "clone"))
    assert doc["startup"], "start-up probes missing"
    for label, probe in doc["startup"].items():
        assert probe["returncode"] == 0 and probe["imports_torch"] is False, label
