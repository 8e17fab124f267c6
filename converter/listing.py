"""Long listings made short: tensor names collapsed by pattern, name lists cut to a few.

A mixture-of-experts checkpoint names tens of thousands of tensors that differ only in
their layer and expert numbers. ``inspect`` shows one row per pattern
(``model.layers.{0..60}.mlp.experts.{0..255}.gate_proj.weight  BF16 [32, 32]  × 15,616``)
and report lines name a few and count the rest; ``--all`` and ``--json`` keep every name.
Pure functions, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_NUMBER = re.compile(r"([0-9]+)")  # ASCII digits: int() must give them back as written
_LEADING_ZERO = re.compile(r"(?<![0-9])0[0-9]")
SHOWN = 5  # names a report line lists before "and N more"


@dataclass
class Row:
    """One line of a listing: a name, or a pattern of names that share everything else."""

    name: str  # the name, or the pattern: "layers.{0..3}.w"
    dtype: str
    shape: list[int]
    nbytes: int  # all names of the row together
    stored_as: str
    count: int = 1


def _split(text: str) -> tuple[tuple[str, ...], list[int]]:
    """``"layers.3.experts.17.w"`` -> ``(("layers.", ".experts.", ".w"), [3, 17])``.

    Numbers written with leading zeros (``model-00001``) stay text: their width is part of the name.
    """
    parts = _NUMBER.split(text)
    digits = parts[1::2]
    if _LEADING_ZERO.search(text):  # rare: merge those numbers into the text around them
        texts, numbers = [parts[0]], []
        for d, after in zip(digits, parts[2::2], strict=True):
            if d[0] == "0" and len(d) > 1:
                texts[-1] += d + after
            else:
                numbers.append(int(d))
                texts.append(after)
        return tuple(texts), numbers
    return tuple(parts[0::2]), [int(d) for d in digits]


def _span(values: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0..2,5"``: runs of consecutive numbers as ranges."""
    ordered = sorted(set(values))
    parts: list[str] = []
    start = previous = ordered[0]
    for value in [*ordered[1:], None]:
        if value is not None and value == previous + 1:
            previous = value
            continue
        if start == previous:
            parts.append(str(start))
        else:
            parts.append(f"{start}..{previous}" if previous > start + 1 else f"{start},{previous}")
        if value is not None:
            start = previous = value
    return ",".join(parts)


def _fill(texts: tuple[str, ...], numbers: list[list[int]]) -> str:
    """The texts with each number slot shown as its one value, or ``{0..60}`` for several."""
    out = [texts[0]]
    for values, text in zip(numbers, texts[1:], strict=True):
        out.append(str(values[0]) if len(set(values)) == 1 else "{" + _span(values) + "}")
        out.append(text)
    return "".join(out)


def group_rows(rows: Iterable[tuple[str, str, Sequence[int], int, str]]) -> list[Row]:
    """Collapse ``(name, dtype, shape, nbytes, stored as)`` rows that differ only in numbers.

    Names with the same text around their numbers, dtype, shape and way of storage
    (numbers in "alias of ..." collapse too) become one row, in order of first appearance.

    Example:
        >>> [r.name for r in group_rows([("l.0.w", "F32", [2], 8, "stored"), ("l.1.w", "F32", [2], 8, "stored")])]
        ['l.{0,1}.w']
    """
    groups: dict[tuple[object, ...], tuple[Row, tuple[str, ...], tuple[str, ...], list[list[int]]]] = {}
    split_how: dict[str, tuple[tuple[str, ...], list[int]]] = {}  # most are "stored"
    for name, dtype, shape, nbytes, stored_as in rows:
        texts, numbers = _split(name)
        if stored_as not in split_how:
            split_how[stored_as] = _split(stored_as)
        how, how_numbers = split_how[stored_as]
        key = (texts, dtype, tuple(shape), how)
        group = groups.get(key)
        if group is None:
            groups[key] = (
                Row(name, dtype, list(shape), nbytes, stored_as),
                texts,
                how,
                [[n] for n in numbers + how_numbers],
            )
            continue
        row, _, _, seen = group
        row.count += 1
        row.nbytes += nbytes
        for values, value in zip(seen, numbers + how_numbers, strict=True):
            values.append(value)
    result = []
    for row, texts, how, seen in groups.values():
        if row.count > 1:
            row.name = _fill(texts, seen[: len(texts) - 1])
            row.stored_as = _fill(how, seen[len(texts) - 1 :])
        result.append(row)
    return result


def cut(names: Sequence[str], shown: int = SHOWN) -> tuple[list[str], int]:
    """The first ``shown`` names and how many more there are (``--json`` keeps them all).

    Example:
        >>> cut(["a", "b", "c", "d"], shown=2)
        (['a', 'b'], 2)
    """
    if len(names) <= shown + 1:  # "and 1 more" is no shorter than the name
        return list(names), 0
    return list(names[:shown]), len(names) - shown
