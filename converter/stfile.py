"""Read and validate a safetensors header (untrusted input), without torch.

``inspect``, ``verify`` and the loader need the exact byte offsets of every tensor
and must refuse hostile headers with one clear line; the safetensors library does
not expose offsets, so this short parser follows the format's specification:
8-byte little-endian header length, a JSON object, then the data section in which
tensors tile ``[0, data_size)`` without gaps or overlaps.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from .dtypes import BY_CODE, DType
from .errors import CorruptFileError, TiesafeError, quoted, read_error
from .geometry import MAX_DIMS, MAX_INT64, numel
from .ties import StoredInfo, decode

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
_USIZE = 1 << 64  # shapes and offsets are u64 in the safetensors library: larger is no safetensors file


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: dtype, shape, and its bytes in the file."""

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


def _entry(name: str, spec: object, data_start: int) -> tuple[Entry, int, int]:
    if not isinstance(spec, dict):
        raise CorruptFileError(f"header entry {quoted(name)} is not an object")
    code = spec.get("dtype")
    dtype = BY_CODE.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise CorruptFileError(f"tensor {quoted(name)} has unknown dtype {quoted(spec.get('dtype'), 40)}")
    shape, offsets = spec.get("shape"), spec.get("data_offsets")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(type(n) is int and 0 <= n <= MAX_INT64 for n in shape)  # u64 in the format, int64 in torch
    ):
        raise CorruptFileError(f"tensor {quoted(name)} has an invalid shape")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and 0 <= o < _USIZE for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CorruptFileError(f"tensor {quoted(name)} has invalid data_offsets")
    begin, end = offsets
    if not _fits_usize(shape, dtype.itemsize):
        raise CorruptFileError(f"tensor {quoted(name)}: its byte size overflows 64 bits")
    needed = numel(shape) * dtype.itemsize
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
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise CorruptFileError(f"{what} {quoted(text)} is not valid Unicode (a lone surrogate)") from None


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # json.loads keeps the last of two equal keys and other readers may keep the first:
    # a file that two loaders read differently is refused.
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise CorruptFileError(f"the header names {quoted(key)} more than once")
        result[key] = value
    return result


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
        data_start = 8 + length
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
        # The tie record is part of the header: a file whose record is invalid is refused here, by name.
        decode(metadata, {e.name: StoredInfo(e.dtype.code, e.shape) for e in entries.values()})
    except TiesafeError as exc:
        raise type(exc)(exc.problem, path=path) from None
    except OSError as exc:
        raise read_error(exc, path, "safetensors file") from None
    ordered = dict(sorted(entries.items(), key=lambda item: item[1].start))
    return SafetensorsFile(path, ordered, metadata, data_start, size)
