"""Read and validate a safetensors header (untrusted input), without torch.

``inspect``, ``verify`` and the loader need the exact byte offsets of every tensor
and must refuse hostile headers with one clear line; the safetensors library does
not expose offsets, so this short parser follows the format's specification:
8-byte little-endian header length, a JSON object, then the data section in which
tensors tile ``[0, data_size)`` without gaps or overlaps.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import chain, repeat
from operator import add, eq, itemgetter, le, mul, sub
from pathlib import Path
from typing import Any, NamedTuple, cast

from .dtypes import BY_CODE, DType
from .errors import CorruptFileError, TiesafeError, quoted, read_error
from .gcpause import paused_gc
from .geometry import MAX_DIMS, MAX_INT64
from .ties import StoredInfo, TieRecord, decode

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
_INT = {int}
_USIZE = 1 << 64  # shapes and offsets are u64 in the safetensors library: larger is no safetensors file
_CODES = set(BY_CODE)  # no code holds a colon: _fast_header counts the colons of a header
_ITEMSIZE = {code: dtype.itemsize for code, dtype in BY_CODE.items()}


class Entry(NamedTuple):
    """One tensor of a safetensors file: dtype, shape, and its bytes in the file.

    A named tuple, not a dataclass: a header may describe 100,000 tensors, and
    :func:`read_safetensors` builds them with one C call each.
    """

    name: str
    dtype: DType
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


@dataclass
class SafetensorsFile:
    """A validated safetensors header: entries in data order and the metadata."""

    path: Path
    entries: dict[str, Entry]
    metadata: dict[str, str]
    data_start: int
    size: int
    record: TieRecord = field(default_factory=TieRecord)  # the ties, validated against ``entries``


class StoredInfos(Mapping[str, StoredInfo]):
    """``entries`` as :func:`~converter.ties.decode` sees them, each described only when asked.

    Most stored tensors are no tie's target: describing each of 100,000 would cost more
    than the rest of reading the header.
    """

    def __init__(self, entries: Mapping[str, Entry]) -> None:
        self._entries = entries

    def __getitem__(self, name: str) -> StoredInfo:
        entry = self._entries[name]
        return StoredInfo(entry.dtype.code, entry.shape)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


_new_entry = partial(tuple.__new__, Entry)
_NAME, _START = itemgetter(0), itemgetter(3)
_GET = cast("Callable[[dict[str, Any], str], Any]", dict.get)  # one key of each entry, mapped in C


def _entry(name: str, spec: object, data_start: int) -> tuple[Entry, int, int]:
    if not isinstance(spec, dict):
        raise CorruptFileError(f"header entry {quoted(name)} is not an object")
    code = spec.get("dtype")
    dtype = BY_CODE.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise CorruptFileError(f"tensor {quoted(name)} has unknown dtype {quoted(spec.get('dtype'), 40)}")
    shape, offsets = spec.get("shape"), spec.get("data_offsets")
    # Each check in C (set of types, min, max): a header may describe 100,000 tensors.
    if (
        type(shape) is not list
        or len(shape) > MAX_DIMS
        or (shape and (set(map(type, shape)) != _INT or min(shape) < 0 or max(shape) > MAX_INT64))
    ):  # u64 in the format, int64 in torch; bool is not an int here
        raise CorruptFileError(f"tensor {quoted(name)} has an invalid shape")
    if (
        type(offsets) is not list
        or len(offsets) != 2
        or type(offsets[0]) is not int
        or type(offsets[1]) is not int
        or not 0 <= offsets[0] <= offsets[1] < _USIZE
    ):
        raise CorruptFileError(f"tensor {quoted(name)} has invalid data_offsets")
    begin, end = offsets
    count = math.prod(shape)
    if count * dtype.itemsize * 8 >= _USIZE or (0 in shape and not _fits_usize(shape, dtype.itemsize)):
        # Without a 0, the running product only grows: the total fitting is the whole check.
        raise CorruptFileError(f"tensor {quoted(name)}: its byte size overflows 64 bits")
    needed = count * dtype.itemsize
    if needed != end - begin:
        raise CorruptFileError(
            f"tensor {quoted(name)}: {dtype.code}{quoted(shape)} needs {needed} bytes, data_offsets give {end - begin}"
        )
    return Entry(name, dtype, tuple(shape), data_start + begin, end - begin), begin, end


def _fits_usize(shape: list[int], itemsize: int) -> bool:
    # As the safetensors library computes it (checked u64 products, left to right), so
    # that every file this parser accepts, the library opens too: [2**32, 2**32, 0] is refused.
    n = 1
    for dim in shape:
        n *= dim
        if n >= _USIZE:
            return False
    return n * itemsize * 8 < _USIZE


def _utf8(text: str, what: str) -> None:
    # JSON may spell lone surrogates ("\ud800"); they are no UTF-8, and the library refuses them.
    if not encodes(text):
        raise CorruptFileError(f"{what} {quoted(text)} is not valid Unicode (a lone surrogate)")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # json.loads keeps the last of two equal keys and other readers may keep the first:
    # a file that two loaders read differently is refused.
    result = dict(pairs)  # one C call per object: tens of thousands of entries in a large header
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise CorruptFileError(f"the header names {quoted(key)} more than once")
            seen.add(key)
    return result


def _checked_header(raw: bytes, data_start: int, size: int) -> tuple[dict[str, Entry], dict[str, str]]:
    """Every check, entry by entry, duplicate keys found while parsing: the reference path.

    Any header the fast path is unsure of comes here, so every error message is this
    path's: the first problem in header order.
    """
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise CorruptFileError(f"header is not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(header, dict):
        raise CorruptFileError("header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CorruptFileError("__metadata__ must map strings to strings")
    for key, value in metadata.items():
        _utf8(key, "metadata key")
        _utf8(value, "metadata value")
    spans: list[tuple[int, int, str]] = []
    entries: dict[str, Entry] = {}
    for name, spec in header.items():
        _utf8(name, "tensor name")
        entry, begin, end = _entry(name, spec, data_start)
        entries[name] = entry
        spans.append((begin, end, name))
    spans.sort()
    position = 0
    for begin, end, name in spans:
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else "leaves a gap before it"
            raise CorruptFileError(f"tensor {quoted(name)} {what} (data offsets out of order)")
        position = end
    if data_start + position != size:
        raise CorruptFileError(f"data section holds {size - data_start} bytes, the header describes {position}")
    return dict(sorted(entries.items(), key=lambda item: item[1].start)), metadata


def _fast_header(raw: bytes, data_start: int, size: int) -> tuple[dict[str, Entry], dict[str, str]] | None:
    """The same checks as :func:`_checked_header`, column by column in C; None when unsure.

    Returns a result only for a header the reference path accepts, and then the same
    result; any doubt (a problem, an unusual shape of header) returns None and the
    reference path decides, with its message. Per entry this costs about a microsecond,
    where the reference path costs about ten: a header may describe 100,000 tensors.
    """
    # Two equal keys in one object: json.loads keeps the last without a word. The colons
    # of a JSON text are its key separators and the colons inside its strings, so with no
    # colon spelled as an escape (\u003a) the text holds exactly (keys parsed) + (colons in
    # the parsed strings) colons unless a key was dropped: counted below, no hook per object.
    escapes = b"\\" in raw and b"\\u" in raw  # memchr first: most headers spell no escape at all
    if escapes and (b"\\u003a" in raw or b"\\u003A" in raw):
        return None
    header = json.loads(raw.decode("utf-8"))
    if type(header) is not dict or not header:
        return None
    keys = len(header)
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if type(metadata) is not dict or set(map(type, chain(metadata, metadata.values()))) - {str}:
        return None
    names, specs = list(header), list[dict[str, Any]](header.values())
    n = len(names)
    strings = "".join(chain(names, metadata, metadata.values()))
    if escapes and (b"\\ud" in raw or b"\\uD" in raw) and not encodes(strings):  # a lone surrogate
        return None
    columns = spec_columns(specs)
    if columns is None:
        return None
    codes, shapes, offsets = columns
    if raw.count(b":") != keys + 3 * n + len(metadata) + strings.count(":"):
        return None  # a key given twice (or a colon the count cannot place): the reference path says which
    del specs
    header.clear()  # the entries' objects go now: the columns are all that is needed (peak memory)
    checked = checked_values(codes, shapes, offsets)
    del offsets
    if checked is None:
        return None
    begins, ends, needed = checked
    in_data_order = tiled(begins, ends, needed, size - data_start)
    if in_data_order is None:
        return None
    starts = list(map(add, begins, repeat(data_start)))
    dtypes = list(map(BY_CODE.__getitem__, codes))
    # Entries straight from tuples (tuple.__new__ in C, no __init__ per entry), in data order.
    tuples = list(map(tuple, shapes))
    shared: dict[tuple[int, ...], tuple[int, ...]] = {}  # one tuple per distinct shape: experts repeat a few
    tuples = list(map(shared.setdefault, tuples, tuples))
    built = map(_new_entry, zip(names, dtypes, tuples, starts, needed, strict=True))
    if in_data_order:
        return dict(zip(names, built, strict=True)), metadata
    ordered = sorted(built, key=_START)  # stable: equal starts (empty tensors) keep header order
    return dict(zip(map(_NAME, ordered), ordered, strict=True)), metadata


def tiled(begins: Sequence[int], ends: Sequence[int], needed: Sequence[int], data_size: int) -> bool | None:
    """Whether the spans ``[begins[i], ends[i])`` tile ``[0, data_size)`` without gaps or overlaps
    (None if not), and if so whether they come in data order already (True) or must be sorted."""
    if not begins:
        return True if data_size == 0 else None
    # With no empty tensor: the k-th smallest start is the (k-1)-th smallest end and the first
    # start is 0 exactly when every byte below the last end is in one tensor. An empty tensor
    # may only sit where one tensor ends: sorted as the reference sorts them.
    if 0 in needed:
        spans = sorted(zip(begins, ends, strict=True))
        firsts, lasts = list(map(itemgetter(0), spans)), list(map(itemgetter(1), spans))
    else:
        firsts, lasts = sorted(begins), sorted(ends)
    if firsts[0] != 0 or firsts[1:] != lasts[:-1] or lasts[-1] != data_size:
        return None
    return all(map(eq, begins, firsts))  # as writers write them: no sort, names taken as they are


def spec_columns(specs: list[Any]) -> tuple[list[str], list[list[int]], list[list[int]]] | None:
    """The dtype codes, shapes and data offsets of header entries (``name -> spec`` values), if each
    spec is an object of exactly those three keys, a known dtype and two lists; else None.
    Checked column by column in C (a header may describe 100,000 tensors); the values are
    :func:`checked_values`'."""
    if not specs:
        return [], [], []
    if set(map(type, specs)) != {dict} or set(map(len, specs)) != {3}:
        return None
    # Typed as what they are once checked below (untrusted JSON until then).
    codes: list[str] = list(map(_GET, specs, repeat("dtype")))
    shapes: list[list[int]] = list(map(_GET, specs, repeat("shape")))
    offsets: list[list[int]] = list(map(_GET, specs, repeat("data_offsets")))
    # Three keys each, all three found: no other key, no nested object, no string but the dtype.
    if not set(codes) <= _CODES or set(map(type, shapes)) != {list} or set(map(type, offsets)) != {list}:
        return None
    return codes, shapes, offsets


def checked_values(
    codes: list[str], shapes: list[list[int]], offsets: list[list[int]]
) -> tuple[list[int], list[int], list[int]] | None:
    """Each entry's data offsets (begins, ends) and byte size, if its shape and offsets hold
    what the reference path accepts (ints in range, the size its dtype and shape need); else None."""
    if not codes:
        return [], [], []
    flat = chain.from_iterable
    if max(map(len, shapes)) > MAX_DIMS or (any(shapes) and set(map(type, flat(shapes))) != _INT):
        return None
    if any(shapes) and (min(flat(shapes)) < 0 or max(flat(shapes)) > MAX_INT64):
        return None
    bounds = list(flat(offsets))
    if len(bounds) != 2 * len(codes) or set(map(type, bounds)) != _INT:
        return None
    begins, ends = bounds[0::2], bounds[1::2]
    if min(begins) < 0 or max(ends) >= _USIZE or not all(map(le, begins, ends)):
        return None
    itemsizes = list(map(_ITEMSIZE.__getitem__, codes))
    counts = list(map(math.prod, shapes))
    needed = list(map(mul, counts, itemsizes))
    sizes: dict[int, int] = {}  # experts repeat a few sizes: one int object each
    needed = list(map(sizes.setdefault, needed, needed))
    if max(needed) * 8 >= _USIZE or needed != list(map(sub, ends, begins)):
        return None
    if 0 in counts and not all(_fits_usize(s, i) for s, c, i in zip(shapes, counts, itemsizes, strict=True) if c == 0):
        return None
    return begins, ends, needed


def encodes(text: str) -> bool:
    """Whether ``text`` is UTF-8 proper (JSON may spell lone surrogates, which it cannot encode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_safetensors(path: str | Path) -> SafetensorsFile:
    """Parse and validate the header of a safetensors file.

    Example:
        >>> st = read_safetensors("model.safetensors")  # doctest: +SKIP
        >>> st.entries["transformer.wte.weight"].dtype.code
        'F32'
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CorruptFileError("too short for a safetensors file")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise CorruptFileError(f"header length {length} runs past the end of the file ({size} bytes)")
            raw = f.read(length)
        data_start = 8 + length
        with paused_gc():  # hundreds of thousands of dicts, lists and ints, no cycles
            try:
                parsed = _fast_header(raw, data_start, size)
            except (ValueError, RecursionError, TypeError, OverflowError):
                parsed = None  # not valid JSON, an unhashable dtype, ...: the reference path names it
            entries, metadata = parsed or _checked_header(raw, data_start, size)
            # The tie record is part of the header: a file whose record is invalid is refused here, by name.
            record = decode(metadata, StoredInfos(entries))
    except TiesafeError as exc:
        raise type(exc)(exc.problem, path=path) from None
    except OSError as exc:
        raise read_error(exc, path, "safetensors file") from None
    return SafetensorsFile(path, entries, metadata, data_start, size, record)
