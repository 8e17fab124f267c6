"""Long listings stay readable: inspect groups names by pattern, report lines name a few, a closed pipe is quiet."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from corpus.cli import ROOT, run_cli

from converter import listing
from converter.listing import cut, group_rows


def test_names_split_all_at_once_group_as_names_split_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Names are split with one regular expression over all of them; one by one gives the same rows."""
    rng = random.Random(7)
    common = ["layers", ".", "experts", "w", "0", "1", "3", "12", "x9y", "é", "-"]
    rare = ["07", "\n", "\x00", "", "\x00\x00", "5\x00"]  # each sends a listing one by one, or must
    at_once_seen = 0
    for _ in range(400):
        rows = []
        odd = rng.random() < 0.3
        for _ in range(rng.randint(1, 30)):
            name = "".join(
                rng.choice(rare if odd and rng.random() < 0.05 else common) for _ in range(rng.randint(1, 6))
            )
            how = rng.choice(["stored", "stored", f"alias of {name}.{rng.randint(0, 3)}", "view of base"])
            rows.append((name, rng.choice(["F32", "BF16"]), rng.choice([[2], [2, 3]]), rng.randint(1, 9), how))
        at_once_seen += isinstance(listing._split_all([r[0] for r in rows])[0][0], str)
        with monkeypatch.context() as patch:
            patch.setattr(listing, "_CHUNK", rng.choice([2, 5, 8192]))  # a pattern split in chunks split both ways
            at_once = [vars(r) for r in group_rows(rows)]
        with monkeypatch.context() as patch:
            patch.setattr(listing, "_LEADING_ZERO", re.compile(""))  # "every name may have one": one by one
            one_by_one = [vars(r) for r in group_rows(rows)]
        assert at_once == one_by_one, rows
    assert 100 < at_once_seen < 400  # both ways ran


@pytest.fixture
def experts(tmp_path: Path) -> Path:
    state = {
        f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight": torch.randn(2, 4).to(torch.bfloat16)
        for layer in range(2)
        for expert in range(12)
        for proj in ("gate_proj", "up_proj")
    }
    state["lm_head.weight"] = torch.randn(3, 4)
    for i in range(8):  # aliases of one expert: tie lines and a shared group with nine names
        state[f"alias.{i}"] = state["model.layers.0.mlp.experts.0.gate_proj.weight"]
    path = tmp_path / "moe.bin"
    torch.save(state, path)
    return path


def test_rows_differing_only_in_numbers_are_grouped() -> None:
    rows = [(f"l.{i}.e.{j}.w", "BF16", [2], 4, "stored") for i in range(3) for j in (0, 1, 2, 7)]
    rows += [("m-00001", "F32", [1], 4, "stored"), ("m-00002", "F32", [1], 4, "stored")]
    rows += [("q.3", "F32", [1], 4, "alias of k.3"), ("q.4", "F32", [1], 4, "alias of k.4")]
    grouped = [(r.name, r.nbytes, r.stored_as, r.count) for r in group_rows(rows)]
    assert grouped == [
        ("l.{0..2}.e.{0..2,7}.w", 48, "stored", 12),
        ("m-00001", 4, "stored", 1),  # zero-padded numbers are part of the name
        ("m-00002", 4, "stored", 1),
        ("q.{3,4}", 8, "alias of k.{3,4}", 2),
    ]
    assert cut([str(i) for i in range(9)]) == (["0", "1", "2", "3", "4"], 4)
    assert cut(["a", "b", "c", "d", "e", "f"]) == (["a", "b", "c", "d", "e", "f"], 0)  # "and 1 more" saves nothing


def test_inspect_groups_long_listings_and_all_lists_every_name(experts: Path) -> None:
    result = run_cli("inspect", experts)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert not any(c in result.stdout for c in "│┃━─")  # plain columns: stdout is a pipe
    row = next(line for line in lines if "gate_proj" in line).split()
    assert row[:4] == ["model.layers.{0,1}.mlp.experts.{0..11}.gate_proj.weight", "BF16", "[2,", "4]"]
    assert row[-2:] == ["×", "24"] and "stored" in row
    assert "57 names" in lines[-1] and "grouped" in lines[-1] and "--all" in lines[-1]
    every = run_cli("inspect", experts, "--all")
    assert every.returncode == 0 and "model.layers.1.mlp.experts.11.up_proj.weight" in every.stdout
    assert "×" not in every.stdout and "grouped" not in every.stdout


def test_report_lines_name_a_few_and_json_keeps_all(experts: Path, tmp_path: Path) -> None:
    result = run_cli("convert", experts, tmp_path / "out.safetensors")
    assert result.returncode == 0, result.stderr
    tied = [line for line in result.stdout.splitlines() if line.startswith("  tied:")]
    assert len(tied) == 8  # at most ten tie lines; eight here
    shared = run_cli("inspect", experts).stdout
    alias_line = next(line for line in shared.splitlines() if line.startswith("  alias:"))
    assert alias_line.endswith("and 4 more")  # nine names: five shown
    data = json.loads(run_cli("inspect", experts, "--json").stdout)
    assert len(data["tensors"]) == 57 and len(data["groups"][0]["names"]) == 9


def test_output_piped_into_head_ends_quietly(tmp_path: Path) -> None:
    # More lines than a pipe holds (64 KiB): the writer is still writing when head exits, so it
    # meets the closed pipe whatever the scheduling (a short listing may finish first: exit 0).
    many = tmp_path / "many.bin"
    torch.save({f"model.layers.{i}.mlp.experts.{i}.gate_proj.weight": torch.zeros(1) for i in range(3000)}, many)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = f"{sys.executable} -m converter inspect --all {many} | head -1"
    shell = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {command}"], capture_output=True, text=True, env=env, timeout=120
    )
    assert shell.stdout.count("\n") == 1 and shell.stderr == ""  # no "internal error: BrokenPipeError"
    assert shell.returncode == 141  # as a command that SIGPIPE ended
