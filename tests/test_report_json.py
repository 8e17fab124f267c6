"""``inspect --json`` writes a long tensor list fast, and the same text ``json.dumps(indent=2)`` writes."""

from __future__ import annotations

import json
import random
from pathlib import Path

from converter.report_json import _rows, dumps

_STRINGS = ["w", "layers.3.w", 'q"uote', "back\\slash", "tab\tnew\nline", "é", "日本", "\ud800", "\x00", "", "😀"]


def _row(rng: random.Random) -> dict[str, object]:
    return {
        "name": rng.choice(_STRINGS) + str(rng.randint(0, 99)),
        "dtype": rng.choice(["F32", "BF16"]),
        "shape": rng.choice([[], [0], [32, 32], [1, 2, 3], [2**40]]),
        "nbytes": rng.choice([0, 4, 2048, 2**63]),
        "stored_as": rng.choice(["stored", "alias of " + rng.choice(_STRINGS)]),
    }


def test_a_long_tensor_list_is_written_as_json_dumps_writes_it() -> None:
    rng = random.Random(3)
    rows = [_row(rng) for _ in range(2500)]
    report = {
        "path": "model.safetensors",
        "format": "safetensors",
        "tensors": rows,
        "groups": [],
        "metadata": {"format": "pt", "note": 'é "x"'},
        "wrapper": None,
        "where": Path("a/b"),  # default=str
        "bytes_saved": 0,
    }
    assert _rows(rows) is not None  # the rows were written here, not by json.dumps
    assert dumps(report) == json.dumps(report, indent=2, default=str)


def test_rows_json_dumps_would_write_otherwise_go_through_json_dumps() -> None:
    rng = random.Random(4)
    odd_rows = [
        {"shape": [1]},  # other keys
        {**_row(rng), "shape": [True, 2]},  # a bool is written "true"
        {**_row(rng), "nbytes": 2.0},
        {**_row(rng), "name": None},
        {**_row(rng), "shape": (1, 2)},  # a tuple is written as a list by json, but it is no list
    ]
    for odd in odd_rows:
        rows = [_row(rng) for _ in range(1200)]
        rows.insert(rng.randrange(len(rows)), odd)
        report = {"tensors": rows, "bytes_saved": 1}
        assert dumps(report) == json.dumps(report, indent=2, default=str)
    quoting = {"tensors": [_row(rng) for _ in range(1200)], "note": "tiesafe: the rows go here"}
    assert dumps(quoting) == json.dumps(quoting, indent=2, default=str)  # a report quoting the marker
