"""The safetensors header's fast path gives what the entry-by-entry reference gives, or defers to it.

``read_safetensors`` validates a header column by column (a few C calls per check over
every entry) and finds duplicate keys by counting colons instead of hooking every
JSON object; whenever it is unsure it leaves the header to the reference path, which
checks entry by entry and names the first problem. Here both run on the same headers
(valid ones of every kind and random damage to them): the fast path may defer, but
when it answers, its answer is the reference's, and it never accepts what the
reference refuses.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from converter.errors import CorruptFileError, TiesafeError
from converter.stfile import _checked_header, _fast_header, read_safetensors


def _spec(dtype: str, shape: list[int], begin: int, itemsize: int) -> tuple[dict[str, object], int]:
    size = itemsize
    for dim in shape:
        size *= dim
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + size]}, begin + size


def _valid_header(rng: random.Random) -> dict[str, Any]:
    """Tensors of several dtypes and shapes (scalars, empty ones), odd names, metadata with colons."""
    kinds = [("F32", 4), ("BF16", 2), ("U8", 1), ("I64", 8), ("BOOL", 1)]
    shapes = [[4, 4], [], [0], [3, 0, 2], [2, 3, 1], [1], [5]]
    names = ["a.0.w", "b:c", "ümlaut.w", "x\\y", 'q"uote', "layers.10.experts.3.w", "tab\tname", "e\u00e9"]
    header: dict[str, Any] = {}
    if rng.random() < 0.7:
        header["__metadata__"] = {"format": "pt", "note": "a: b", "k:v": "x"}
    begin = 0
    for i in range(rng.randint(1, 6)):
        dtype, itemsize = rng.choice(kinds)
        spec, begin = _spec(dtype, list(rng.choice(shapes)), begin, itemsize)
        header[f"{rng.choice(names)}.{i}"] = spec
    items = [(k, v) for k, v in header.items() if k != "__metadata__"]
    rng.shuffle(items)  # header order is not data order
    return {**({"__metadata__": header["__metadata__"]} if "__metadata__" in header else {}), **dict(items)}


def _data_size(header: dict[str, Any]) -> int:
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return max(ends, default=0)


_NUMBER_EDITS = ["-1", "0", "1", "2", "3", "true", "1.0", "18446744073709551616", "9223372036854775808", '"7"']


def _damaged(raw: str, rng: random.Random) -> str:
    """One random edit of the JSON text: a number, a key repeated, an escape, an extra key, ..."""
    edit = rng.randrange(8)
    if edit == 0:  # a number replaced
        spots = [i for i, ch in enumerate(raw) if ch.isdigit() and not raw[i - 1].isdigit()]
        if spots:
            i = rng.choice(spots)
            j = i
            while j < len(raw) and raw[j].isdigit():
                j += 1
            return raw[:i] + rng.choice(_NUMBER_EDITS) + raw[j:]
    if edit == 1:  # an entry or a field given twice (json.loads keeps the last)
        document = json.loads(raw)
        key = rng.choice(list(document))
        inner = document[key]
        if isinstance(inner, dict) and inner and rng.random() < 0.5:
            field = rng.choice(list(inner))
            repeated = json.dumps(inner)[:-1] + ", " + json.dumps(field) + ": " + json.dumps(inner[field]) + "}"
            return raw.replace(json.dumps(inner), repeated, 1)
        return raw[:-1] + ", " + json.dumps(key) + ": " + json.dumps(inner) + "}"
    if edit == 2:  # a colon written as an escape, somewhere in a string
        return raw.replace(":", "\\u003a", 1) if '":' not in raw[:2] else raw
    if edit == 3:  # an extra field in an entry
        return raw.replace('"dtype"', '"extra": {"a": 1, "a": 2}, "dtype"', 1)
    if edit == 4:  # a lone surrogate in a name
        return raw.replace('"a.', '"\\ud800a.', 1)
    if edit == 5:  # a dtype replaced
        return raw.replace('"F32"', rng.choice(['"F128"', '["F32"]', "null", '"F3:2"']), 1)
    if edit == 6:  # a character dropped
        i = rng.randrange(len(raw))
        return raw[:i] + raw[i + 1 :]
    # a key and its value repeated with a different value holding colons
    document = json.loads(raw)
    key = rng.choice(list(document))
    return raw[:-1] + ", " + json.dumps(key) + ': "x:y:z"}'


def _moved(header: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """The data offsets moved, sizes kept: a gap before the first tensor, overlaps, empty tensors inside others."""
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    spans = [e["data_offsets"] for e in entries.values()]
    edit = rng.randrange(5)
    if edit == 0:  # every tensor shifted: a gap before the first
        k = rng.randint(1, 3)
        for span in spans:
            span[0] += k
            span[1] += k
    elif edit == 1:  # one tensor moved back a byte: it overlaps the one before
        span = rng.choice(spans)
        if span[0] > 0:
            span[0] -= 1
            span[1] -= 1
    else:  # an empty tensor inside another one (refused), at a boundary (accepted) or past the end (refused)
        begin, end = rng.choice(spans)
        at = rng.choice([begin + (end - begin) // 2, end, begin, _data_size(header) + 1])
        header[f"empty.{rng.randint(0, 9)}"] = {"dtype": "U8", "shape": [0], "data_offsets": [at, at]}
    return header


def _headers(rng: random.Random, count: int) -> Iterator[tuple[dict[str, Any], str]]:
    """Valid headers of every kind, some with tensors moved, and their JSON text, damaged or not."""
    for _ in range(count):
        header = _valid_header(rng)
        if rng.random() < 0.3:
            header = _moved(header, rng)
        text = json.dumps(header, ensure_ascii=rng.random() < 0.5)
        for _ in range(rng.randint(0, 2)):
            try:
                text = _damaged(text, rng)
            except (ValueError, IndexError):
                break
        yield header, text


def _reference(raw: bytes, data_start: int, size: int) -> object:
    try:
        return _checked_header(raw, data_start, size)
    except TiesafeError as exc:
        return exc


def test_fast_path_answers_as_the_reference_or_defers() -> None:
    rng = random.Random(16)
    answered = deferred = refused = 0
    for header, text in _headers(rng, 3000):
        raw = text.encode("utf-8", "surrogatepass")
        data_start = 8 + len(raw)
        size = data_start + _data_size(header) + rng.choice([0, 0, 0, 1, -1])
        expected = _reference(raw, data_start, size)
        try:
            fast = _fast_header(raw, data_start, size)
        except (ValueError, RecursionError, TypeError, OverflowError):
            fast = None  # read_safetensors defers these to the reference path too
        if fast is None:
            deferred += 1
            refused += isinstance(expected, TiesafeError)
            continue
        answered += 1
        assert not isinstance(expected, TiesafeError), (text, expected)  # never accepts what the reference refuses
        assert isinstance(expected, tuple)
        assert fast == expected, text
        assert list(fast[0]) == list(expected[0]), text  # the same data order
    # Both outcomes are exercised: valid headers answered fast, damaged ones deferred.
    assert answered > 500 and refused > 500, (answered, deferred, refused)


@pytest.mark.parametrize(
    "text",
    [
        # the dropped duplicate's value holds colons: counting must still see the repeat
        '{"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "w": {"dtype": "U8", "shape": [1], '
        '"data_offsets": [0, 1]}, "__metadata__": {"a": "b"}}',
        '{"__metadata__": {"a": "x:y", "a": "z"}, "w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}',
        '{"w": {"dtype": "U8", "dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}',
        # a colon spelled as an escape beside a repeated key: deferred, then refused by name
        '{"a\\u003ab": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "__metadata__": {"k": "v", "k": "v"}}',
    ],
)
def test_a_repeated_key_is_refused_by_name(tmp_path: Path, text: str) -> None:
    raw = text.encode() + b" " * (-len(text) % 8)
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x00")
    with pytest.raises(CorruptFileError, match="more than once"):
        read_safetensors(path)


def test_a_large_header_is_read_by_the_fast_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    begin = 0
    for i in range(2000):
        header[f"layers.{i // 8}.experts.{i % 8}.w"], begin = _spec("BF16", [4, 2], begin, 2)
    raw = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(begin))

    def refuse(*args: object) -> None:
        raise AssertionError("the reference path ran on a valid header")

    monkeypatch.setattr("converter.stfile._checked_header", refuse)
    st = read_safetensors(path)
    assert len(st.entries) == 2000
    assert [e.start for e in st.entries.values()] == list(range(8 + len(raw), 8 + len(raw) + begin, 16))


def test_columns_answer_as_the_reference_or_defer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from converter import stcolumns

    # inspect's columns (read a block and a few members at a time) on the same headers: when
    # they answer, read_safetensors accepts the file and gives the same tensors in data order.
    monkeypatch.setattr(stcolumns, "_AT_ONCE", 2)  # members checked together: across chunks too
    rng = random.Random(17)
    answered = deferred = 0
    path = tmp_path / "model.safetensors"
    for trial, (header, text) in enumerate(_headers(rng, 2000)):
        raw = text.encode("utf-8", "surrogatepass")
        path.write_bytes(
            struct.pack("<Q", len(raw)) + raw + bytes(max(0, _data_size(header) + rng.choice([0, 0, 1, -1])))
        )
        columns = stcolumns.read_header_columns(path)
        if columns is None:
            deferred += 1
            continue
        answered += 1
        st = read_safetensors(path)  # raises if the columns accepted what the reference refuses
        assert not st.record, trial
        listed = [(columns.names[r], columns.dtypes[r], columns.shapes[r], columns.nbytes[r]) for r in columns.order]
        assert listed == [(e.name, e.dtype, e.shape, e.nbytes) for e in st.entries.values()], text
        assert columns.metadata == st.metadata
    assert answered > 250 and deferred > 500, (answered, deferred)


def test_columns_leave_ties_and_problems_to_the_reference(tmp_path: Path) -> None:
    from converter.stcolumns import read_header_columns

    path = tmp_path / "model.safetensors"
    spec = {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}
    one = json.dumps(spec)
    for text, accepted in [
        (json.dumps({"w": spec}), True),
        (json.dumps({"__metadata__": {"format": "pt"}, "w": spec}), True),
        (json.dumps({"__metadata__": {"format": "pt", "lm_head": "w"}, "w": spec}), False),  # the Hub's alias
        ('{"w": ' + one + ', "w": ' + one + "}", False),  # a name twice
        ('{"__metadata__": {}, "__metadata__": {}, "w": ' + one + "}", False),
        ('{"__metadata__": null, "__metadata__": null, "w": ' + one + "}", False),
        ('{"__metadata__": null, "w": ' + one + "}", True),  # read as no metadata, as read_safetensors reads it
        (json.dumps({"w\ud800": spec}), False),  # a lone surrogate, escaped
        (json.dumps({"w": {**spec, "extra": 1}}), False),
        (json.dumps({"w": spec}) + "x", False),
    ]:
        raw = text.encode("utf-8", "surrogatepass")
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\x00")
        assert (read_header_columns(path) is not None) == accepted, text
