"""A safetensors header read as columns, a block at a time, for a listing of many tensors.

``inspect`` of a file of 100,000 tensors needs each one's name, dtype, shape and size, in
data order. :func:`.stfile.read_safetensors` holds the whole header's JSON objects at
once (about 0.6 KiB a tensor), then an entry per tensor, because its readers (the
loader, ``verify``) look tensors up by name. Here the header is parsed a member at a
time (:func:`.flat_convert` reads its own output back the same way) and a few thousand
members at a time go through the same column checks as ``read_safetensors``' fast path
(:func:`.stfile.spec_columns`, :func:`.stfile.checked_values`, :func:`.stfile.tiled`);
what is kept is the columns.

Only a header that path would accept outright is read here: any problem, a name given
twice, a lone surrogate, or a tie recorded in the metadata (aliases, views, copies,
hidden names) answers ``None``, and the caller reads the file with ``read_safetensors``,
which gives its verdict or its entries.
"""

from __future__ import annotations

import json
import os
import struct
from array import array
from collections.abc import Iterator, Mapping, Sequence
from itertools import chain
from pathlib import Path
from typing import Any, NamedTuple

from .dtypes import BY_CODE, DType
from .errors import TiesafeError
from .jsonstream import header_text, members, scanner
from .readers.name_column import NameColumn, distinct_hashes
from .stfile import MAX_HEADER_BYTES, checked_values, encodes, spec_columns, tiled
from .ties import StoredInfo, decode

_AT_ONCE = 4096  # members checked together


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object's members, refused if a key is given twice (json.loads keeps the last without a word)."""
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("a key given twice")
    return result


_SCAN = scanner(json.JSONDecoder(object_pairs_hook=_no_repeats))


class HeaderColumns(NamedTuple):
    """A safetensors file's tensors as columns, in header order; ``order``: the rows in data order."""

    names: NameColumn
    dtypes: list[DType]
    shapes: list[tuple[int, ...]]
    nbytes: list[int]
    order: Sequence[int]
    metadata: dict[str, str]


class _Stored(Mapping[str, StoredInfo]):
    """The columns as :func:`.ties.decode` looks tensors up (a few names: the metadata's)."""

    def __init__(self, names: NameColumn, dtypes: list[DType], shapes: list[tuple[int, ...]]) -> None:
        self._names, self._dtypes, self._shapes = names, dtypes, shapes

    def __getitem__(self, name: str) -> StoredInfo:
        try:
            row = self._names.index(name)
        except ValueError:
            raise KeyError(name) from None
        return StoredInfo(self._dtypes[row].code, self._shapes[row])

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def read_header_columns(path: str | Path) -> HeaderColumns | None:
    """The tensors of the safetensors file ``path`` as columns, or ``None`` for anything but a
    valid header that records no tie (then :func:`.stfile.read_safetensors` reads it).

    Example:
        >>> columns = read_header_columns("model.safetensors")  # doctest: +SKIP
        >>> columns.names[0], columns.dtypes[0].code, columns.shapes[0]
        ('model.embed_tokens.weight', 'BF16', (32000, 2048))
    """
    names, hashes = NameColumn(), array("q")
    dtypes: list[DType] = []
    shapes: list[tuple[int, ...]] = []
    nbytes: list[int] = []
    begins, ends = array("q"), array("q")
    shared: dict[tuple[int, ...], tuple[int, ...]] = {}  # one tuple per distinct shape
    sizes: dict[int, int] = {}  # one int per distinct size

    def add(chunk: list[tuple[str, object]]) -> bool:
        columns = spec_columns([spec for _, spec in chunk])
        checked = None if columns is None else checked_values(*columns)
        if columns is None or checked is None:
            return False
        keys = [name for name, _ in chunk]
        names.extend(keys)
        hashes.extend(map(hash, keys))
        dtypes.extend(map(BY_CODE.__getitem__, columns[0]))
        tuples = list(map(tuple, columns[1]))
        shapes.extend(map(shared.setdefault, tuples, tuples))
        nbytes.extend(map(sizes.setdefault, checked[2], checked[2]))
        begins.extend(checked[0])
        ends.extend(checked[1])
        return True

    path = Path(path)
    metadata: object = None
    seen_metadata = False
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                return None
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                return None
            chunk: list[tuple[str, object]] = []
            for key, value in members(header_text(f, length), _SCAN):
                if key == "__metadata__":
                    if seen_metadata:
                        return None  # given twice
                    metadata, seen_metadata = value, True
                    continue
                chunk.append((key, value))
                if len(chunk) == _AT_ONCE:
                    if not add(chunk):
                        return None
                    chunk.clear()
            if chunk and not add(chunk):
                return None
    except (OSError, ValueError, StopIteration, RecursionError, TypeError, OverflowError, KeyError):
        return None
    metadata = {} if metadata is None else metadata
    if type(metadata) is not dict or set(map(type, chain(metadata, metadata.values()))) - {str}:
        return None  # as read_safetensors' fast path tells it
    if not encodes("".join(chain(metadata, metadata.values()))):
        return None  # a lone surrogate
    if names.has_lone_surrogates() or not distinct_hashes(names, hashes):
        return None
    in_data_order = tiled(begins, ends, nbytes, size - 8 - length)
    if in_data_order is None:
        return None
    try:
        if decode(metadata, _Stored(names, dtypes, shapes)):
            return None  # ties: read_safetensors builds and checks them against its entries
    except TiesafeError:
        return None
    order: Sequence[int] = range(len(names))
    if not in_data_order:  # stable: equal starts (empty tensors) keep header order, as the reference sorts
        order = array("q", sorted(range(len(names)), key=begins.__getitem__))
    return HeaderColumns(names, dtypes, shapes, nbytes, order, metadata)
