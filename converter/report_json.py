"""A report as ``json.dumps(report, indent=2)`` writes it, fast when it lists many tensors.

With ``indent`` the standard library encodes in pure Python (its C encoder has no
indentation): about 8 microseconds a value, a second for the 100,000-row tensor
list of a mixture-of-experts ``inspect --json``. That list is regular (flat objects
of strings, integers and lists of integers), so its rows are formatted here with the
library's own C string encoder, one format call per row; anything else in the report
still goes through ``json.dumps``. The text is the same, byte for byte (tested).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from itertools import chain
from json.encoder import encode_basestring_ascii  # C, as json.dumps uses it
from typing import Any

_KEYS = ("name", "dtype", "shape", "nbytes", "stored_as")  # InspectReport.to_dict's rows
_ROW = (
    '    {{\n      "name": {},\n      "dtype": {},\n      "shape": {},\n'
    '      "nbytes": {},\n      "stored_as": {}\n    }}'
)
_FAST_FROM = 1000  # rows: below this json.dumps is fast enough


def dumps(data: dict[str, Any]) -> str:
    """``json.dumps(data, indent=2, default=str)``, with a long ``data["tensors"]`` written fast.

    Example:
        >>> print(dumps({"tensors": [], "ok": True}))
        {
          "tensors": [],
          "ok": true
        }
    """
    rows = data.get("tensors")
    text = _rows(rows) if isinstance(rows, list) and len(rows) >= _FAST_FROM else None
    if text is None:
        return json.dumps(data, indent=2, default=str)
    marker = "tiesafe: the rows go here"  # the rows' place; a report quoting it is written by json.dumps
    skeleton = json.dumps({**data, "tensors": marker}, indent=2, default=str)
    quoted = json.dumps(marker)
    if skeleton.count(quoted) != 1:
        return json.dumps(data, indent=2, default=str)
    return skeleton.replace(quoted, "[\n" + text + "\n  ]")


def _rows(rows: Sequence[Any]) -> str | None:
    """The rows of a top-level ``"tensors"`` list as ``indent=2`` writes them; None if one is not a plain row."""
    if set(map(type, rows)) != {dict} or set(map(tuple, rows)) != {_KEYS}:
        return None
    names = [row["name"] for row in rows]
    dtypes = [row["dtype"] for row in rows]
    shapes = [row["shape"] for row in rows]
    sizes = [row["nbytes"] for row in rows]
    hows = [row["stored_as"] for row in rows]
    if set(map(type, chain(names, dtypes, hows))) != {str} or set(map(type, sizes)) != {int}:
        return None
    if set(map(type, shapes)) != {list} or set(map(type, chain.from_iterable(shapes))) - {int}:
        return None  # a bool is no int here: json writes it "true"
    shown: dict[tuple[int, ...], str] = {}  # a shape's text, once per distinct shape
    keys = list(map(tuple, shapes))
    for shape in set(keys):
        shown[shape] = "[\n" + ",\n".join(f"        {d}" for d in shape) + "\n      ]" if shape else "[]"
    return ",\n".join(
        map(
            _ROW.format,
            map(encode_basestring_ascii, names),
            map(encode_basestring_ascii, dtypes),
            map(shown.__getitem__, keys),
            sizes,
            map(encode_basestring_ascii, hows),
        )
    )
