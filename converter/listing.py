"""Long listings made short: tensor names collapsed by pattern, name lists cut to a few.

A mixture-of-experts checkpoint names tens of thousands of tensors that differ only in
their layer and expert numbers. ``inspect`` shows one row per pattern
(``model.layers.{0..60}.mlp.experts.{0..255}.gate_proj.weight  BF16 [32, 32]  × 15,616``)
and report lines name a few and count the rest; ``--all`` and ``--json`` keep every name.
Pure functions, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from operator import methodcaller
from typing import cast

_NUMBER = re.compile(r"([0-9]+)")  # ASCII digits: int() must give them back as written
_LEADING_ZERO = re.compile(r"(?<![0-9])0[0-9]")
SHOWN = 5  # names a report line lists before "and N more"
_CHUNK = 8192  # names split at once: the pieces of 100,000 names at once would be 50 MB


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


def _split_all(names: list[str]) -> tuple[list[Hashable], list[int], list[int]]:
    """Every name split at once: a key per name for its text around the numbers, all numbers, and how many each has.

    :func:`_texts` gives back a key's texts. One regular expression runs over all names
    joined (two C calls for 100,000 names, where a call per name costs ten times more);
    names that would make the joined text ambiguous (a newline or a NUL in a name) or
    that write numbers with leading zeros are split one by one.
    """
    joined = "\n".join(names)
    if joined.count("\n") == len(names) - 1 and "\x00" not in joined:
        parts = _NUMBER.split(joined)  # text, number, text, ...: one pass over every name
        digits = parts[1::2]
        value = {d: int(d) for d in set(digits)}  # a few hundred distinct numbers
        if not any(len(d) > 1 and d[0] == "0" for d in value):  # else: leading zeros stay text, name by name
            templates: list[Hashable] = list("\x00".join(parts[0::2]).split("\n"))
            widths = list(map(methodcaller("count", "\x00"), templates))
            return templates, list(map(value.__getitem__, digits)), widths
    keys: list[Hashable] = []
    numbers: list[int] = []
    widths = []
    for name in names:
        texts, found = _split(name)
        # The key the joined split gives the same name (another chunk may have split it so),
        # but for a name holding a NUL, which no joined split takes.
        keys.append(texts if "\x00" in name else "\x00".join(texts))
        numbers += found
        widths.append(len(found))
    return keys, numbers, widths


def _texts(key: Hashable) -> tuple[str, ...]:
    return tuple(key.split("\x00")) if isinstance(key, str) else cast(tuple[str, ...], key)


def group_rows(rows: Iterable[tuple[str, str, Sequence[int], int, str]]) -> list[Row]:
    """Collapse ``(name, dtype, shape, nbytes, stored as)`` rows that differ only in numbers.

    Names with the same text around their numbers, dtype, shape and way of storage
    (numbers in "alias of ..." collapse too) become one row, in order of first appearance.

    Example:
        >>> [r.name for r in group_rows([("l.0.w", "F32", [2], 8, "stored"), ("l.1.w", "F32", [2], 8, "stored")])]
        ['l.{0,1}.w']
    """
    # key -> (row, name key, how it is stored split, the numbers of every name, one after the other)
    groups: dict[tuple[object, ...], tuple[Row, Hashable, tuple[tuple[str, ...], list[int]], list[int]]] = {}
    split_how: dict[str, tuple[tuple[str, ...], list[int]]] = {}  # most are "stored"
    rows = iter(rows)
    while chunk := list(islice(rows, _CHUNK)):
        keys, numbers, widths = _split_all([row[0] for row in chunk])
        position = 0
        for (name, dtype, shape, nbytes, stored_as), key, width in zip(chunk, keys, widths, strict=True):
            how = split_how.get(stored_as)
            if how is None:
                how = split_how[stored_as] = _split(stored_as)
            found = numbers[position : position + width]
            position += width
            group_key = (key, dtype, tuple(shape), how[0])
            group = groups.get(group_key)
            if group is None:
                groups[group_key] = (Row(name, dtype, list(shape), nbytes, stored_as), key, how, found + how[1])
                continue
            row, _, _, seen = group
            row.count += 1
            row.nbytes += nbytes
            seen += found
            seen += how[1]
    result = []
    for row, key, (how_texts, _), seen in groups.values():
        if row.count > 1:
            texts = _texts(key)
            width = len(seen) // row.count  # the numbers of one name: its own, then its "stored as"
            slots = [seen[i::width] for i in range(width)]
            row.name = _fill(texts, slots[: len(texts) - 1])
            row.stored_as = _fill(how_texts, slots[len(texts) - 1 :])
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
