"""The mutation fuzzer, bounded for CI, and its harness: a hang, a crash and a sentinel are findings.

``scripts/fuzz.py`` runs 10,000 inputs by default; CI runs ``TIESAFE_FUZZ_INPUTS``
(default 300) with a fixed seed, so a failure here reproduces with the same command.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import converter

ROOT = Path(__file__).resolve().parents[1]
INPUTS = int(os.environ.get("TIESAFE_FUZZ_INPUTS", "300"))


sys.path.insert(0, str(ROOT / "scripts"))  # importable by name: spawned workers unpickle their target from it
import fuzz  # noqa: E402


def test_a_bounded_fuzz_run_finds_nothing(tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "scripts" / "fuzz.py"), "-n", str(INPUTS), "--seed", "ci", "--json"]
    result = subprocess.run(
        [*command, "--out", str(tmp_path / "findings")], capture_output=True, text=True, timeout=900, cwd=tmp_path
    )
    summary = json.loads(result.stdout)
    assert summary["findings"] == [], json.dumps(summary["findings"], indent=2)[:4000]
    assert result.returncode == 0
    assert summary["inputs"] == INPUTS
    outcomes = summary["outcomes"]
    assert set(outcomes) <= {"ok"} | {f"refused:{name}" for name in _error_classes()}
    assert outcomes.get("ok", 0) > 0 and sum(v for k, v in outcomes.items() if k != "ok") > 0


def _error_classes() -> set[str]:
    from converter import errors

    return {name for name, value in vars(errors).items() if isinstance(value, type) and issubclass(value, Exception)}


def test_mutations_are_deterministic_and_change_the_input(tmp_path: Path) -> None:
    sentinels = tmp_path / "sentinels"
    sentinels.mkdir()
    (tmp_path / "seeds").mkdir()
    seeds = fuzz.build_seeds(tmp_path / "seeds", sentinels, corpus=False)
    assert {s.kind for s in seeds} == {"checkpoint", "safetensors"}
    pool = [s.data for s in seeds]
    first = [fuzz.mutate(random.Random(f"x:{i}"), seeds[i % len(seeds)], pool) for i in range(50)]
    again = [fuzz.mutate(random.Random(f"x:{i}"), seeds[i % len(seeds)], pool) for i in range(50)]
    assert first == again
    assert sum(m != seeds[i % len(seeds)].data for i, m in enumerate(first)) >= 45


def test_run_one_lets_foreign_exceptions_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The oracle: our errors are 'refused', anything else escapes (and the worker reports a crash)."""
    path = tmp_path / "x.bin"
    path.write_bytes(b"not a checkpoint")
    assert fuzz.run_one("checkpoint", path, None, differential=False) == "refused:CorruptFileError"

    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(converter, "inspect", broken)
    with pytest.raises(KeyError):
        fuzz.run_one("checkpoint", path, None, differential=False)


def test_a_worker_that_does_not_answer_in_time_is_killed_and_replaced(tmp_path: Path) -> None:
    worker = fuzz._Worker(multiprocessing.get_context("spawn"), tmp_path / "w", 3072, 1024, False)
    try:
        assert worker.run("checkpoint", b"PK\x03\x04", None, timeout=60).startswith("refused:")
        os.kill(worker.process.pid, signal.SIGSTOP)  # a worker that cannot answer, whatever the machine's speed
        assert worker.run("checkpoint", b"PK\x03\x04", None, timeout=0.5).startswith("hang:")
        assert worker.run("checkpoint", b"", None, timeout=60) == "refused:CorruptFileError"
    finally:
        worker.stop()
