"""The two containers ``torch.save`` writes: a zip archive (since torch 1.6) and the legacy stream.

Both are read by hand because torch's own reader must materialise every tensor, and
no other library reads the format without torch. Each reader returns the unpickled
structure (built by :mod:`.unpickler`) and where each storage's bytes lie in the file.
"""

from __future__ import annotations

import io
import struct
from array import array
from collections.abc import Iterator, Sequence
from itertools import islice, repeat
from operator import itemgetter, le, lt
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from ..descriptors import StorageRecord
from ..dtypes import BYTE, DType
from ..errors import CorruptFileError, UnsupportedError, quoted
from .flat_state_dict import read_flat_state_dict
from .unpickler import (
    MAX_ELEMENTS,
    MAX_PICKLE_BYTES,
    StorageNode,
    UnpickleContext,
    distinct_numbers,
    is_storage_number,
    storage_fields,
    unpickle,
)
from .zipdir import STORED, Member, data_starts, iter_directory, iter_member, read_member

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


# --------------------------------------------------------------------------- zip format


# Member's fields after its name, as machine integers: header offset, method, two sizes, flags, CRC.
_TYPECODES = "qHqqHL"


class NumberedRows:
    """Numbered storage members (``<prefix>/data/0``, ...) gathered as columns, a chunk at a
    time: no member tuple outlives its chunk, so 100,000 of them never stand at once."""

    _CHUNK = 4096

    def __init__(self, data_prefix: str) -> None:
        self._cut = len(data_prefix)
        self.numbers = array("q")
        self.columns = [array(code) for code in _TYPECODES]
        self._chunk: list[Member] = []

    def add(self, member: Member) -> None:
        self._chunk.append(member)
        if len(self._chunk) >= self._CHUNK:
            self.flush()

    def flush(self) -> None:
        chunk, cut = self._chunk, self._cut
        try:
            self.numbers.extend([int(member.filename[cut:]) for member in chunk])
            for field, column in enumerate(self.columns, start=1):
                column.extend(map(itemgetter(field), chunk))
        except OverflowError:
            raise CorruptFileError("damaged zip archive (a storage member claims an impossible size)") from None
        chunk.clear()


class StorageTable:
    """Storage key -> its member (``<prefix>/data/<key>``).

    torch numbers its storages ``0``, ``1``, ...: a member so named is held as a row of
    columns indexed by its number (32 bytes, where a member tuple and its name take about
    300: 100,000 of them in a mixture-of-experts archive), and made a :class:`Member`
    again when asked for. A member under any other key is held as it is, by name.
    """

    # A number this far past the count of numbered members is kept by name: no gap of empty rows for it.
    _MAX_GAP = 1 << 16

    def __init__(self, data_prefix: str, rows: NumberedRows, others: dict[str, Member]) -> None:
        """Hold ``rows`` by number and ``others`` (storages under other keys) by name.

        Raises :class:`~converter.errors.CorruptFileError` for a number held twice.
        """
        self.prefix = data_prefix
        self.others = others
        rows.flush()
        numbers, columns = rows.numbers, rows.columns
        if not distinct_numbers(numbers):
            raise CorruptFileError("zip archive holds duplicate member names")
        limit = len(numbers) + self._MAX_GAP
        if numbers and max(numbers) >= limit:  # far-out numbers: held by name instead
            for i, number in enumerate(numbers):
                if number >= limit:
                    others[f"{data_prefix}{number}"] = Member(f"{data_prefix}{number}", *(c[i] for c in columns))
            kept = [i for i, number in enumerate(numbers) if number < limit]
            numbers = array("q", map(numbers.__getitem__, kept))
            columns = [array(c.typecode, map(c.__getitem__, kept)) for c in columns]
        count = max(numbers, default=-1) + 1
        if count == len(numbers) and all(map(lt, numbers, islice(numbers, 1, None))):  # 0, 1, 2, ... as torch writes
            self._columns = columns
        elif count == len(numbers):  # every number from 0 up, once, in another order: reordered in C
            order = sorted(range(count), key=numbers.__getitem__)
            self._columns = [array(c.typecode, map(c.__getitem__, order)) for c in columns]
        else:
            self._columns = [array(c.typecode, repeat(0, count)) for c in columns]
            self._columns[0] = array("q", repeat(-1, count))  # -1: no member of that number
            for i, number in enumerate(numbers):
                for column, values in zip(self._columns, columns, strict=True):
                    column[number] = values[i]
        self._offsets, self._methods, self._compressed, self._sizes = self._columns[:4]

    def _row(self, key: str) -> int | None:
        """The row of storage ``key`` if it is a number held here."""
        if is_storage_number(key):
            number = int(key)
            if number < len(self._offsets) and self._offsets[number] >= 0:
                return number
        return None

    def get(self, key: str) -> Member | None:
        number = self._row(key)
        if number is None:
            return self.others.get(self.prefix + key)
        return Member(self.prefix + key, *(column[number] for column in self._columns))

    def stored(self, numbers: Sequence[int], nbytes: list[int]) -> tuple[array[int], array[int]] | None:
        """Each numbered storage's member as (local header offsets, sizes), if its member holds
        its ``nbytes`` uncompressed (as :func:`storage_member` checks it, here column by column
        in C); None for any doubt.

        Example:
            >>> table.stored([0, 1], [8, 4])  # doctest: +SKIP
            (array('q', [0, 1152]), array('q', [8, 4]))
        """
        if not numbers:
            return array("q"), array("q")
        count = len(self._offsets)
        if min(numbers) < 0 or max(numbers) >= count:
            try:  # numbers beyond the rows (held by name): one by one
                found = [storage_member(self, str(key), n) for key, n in zip(numbers, nbytes, strict=True)]
            except CorruptFileError:
                return None
            return array("q", [m.header_offset for m in found]), array("q", [m.file_size for m in found])
        offsets = array("q", map(self._offsets.__getitem__, numbers))
        sizes = array("q", map(self._sizes.__getitem__, numbers))
        if min(offsets) < 0 or any(map(STORED.__ne__, map(self._methods.__getitem__, numbers))):
            return None
        if array("q", map(self._compressed.__getitem__, numbers)) != sizes:
            return None
        if not all(map(le, nbytes, sizes)):
            return None
        return offsets, sizes


class TorchZip(NamedTuple):
    """What a torch zip archive holds besides its storages' bytes."""

    pickle: bytes  # data.pkl
    storages: StorageTable


def open_torch_zip(raw: BinaryIO, file_size: int) -> TorchZip:
    """Check that ``raw`` is a torch checkpoint archive and read its ``data.pkl`` and member table."""
    pickle_info, table = _open_archive(raw, file_size)
    return TorchZip(read_member(raw, pickle_info, file_size), table)


def open_torch_zip_in_blocks(raw: BinaryIO, file_size: int) -> tuple[Iterator[bytes], StorageTable]:
    """:func:`open_torch_zip`, with ``data.pkl`` as blocks read as they are consumed
    (:func:`.zipdir.iter_member`, its CRC checked at its end): 13 MB at 100,000 tensors, never whole.

    Example:
        >>> blocks, table = open_torch_zip_in_blocks(raw, size)  # doctest: +SKIP
    """
    pickle_info, table = _open_archive(raw, file_size)
    return iter_member(raw, pickle_info, file_size), table


def _open_archive(raw: BinaryIO, file_size: int) -> tuple[Member, StorageTable]:
    """Check that ``raw`` is a torch checkpoint archive: its ``data.pkl`` member and storage table."""
    prefix: str | None = None
    data_prefix = ""
    numbered: NumberedRows | None = None  # "<prefix>/data/<number>": inside the archive folder by their form
    by_name: dict[str, Member] = {}  # every other member
    for member in iter_directory(raw, file_size):
        name = member.filename
        if numbered is None:
            prefix = name.split("/", 1)[0]
            data_prefix = prefix + "/data/"
            numbered = NumberedRows(data_prefix)
        if name.startswith(data_prefix) and is_storage_number(name[len(data_prefix) :]):
            numbered.add(member)
            continue
        if name in by_name:
            raise CorruptFileError("zip archive holds duplicate member names")
        by_name[name] = member
    if prefix is None or numbered is None:
        raise CorruptFileError("empty zip archive")
    names = list(by_name)
    pickle_name = f"{prefix}/data.pkl"
    # All names in one string, each between two newlines: a check over every name is one
    # substring search in C. A name holding a newline itself is checked one by one.
    listing = "\n" + "\n".join(names) + "\n"
    one_per_line = listing.count("\n") == len(names) + 1
    # TorchScript archives hold a data.pkl too, whose globals are the model's classes.
    if ("/constants.pkl\n" in listing or "/code/" in listing) and any(
        n.endswith("/constants.pkl") or "/code/" in n for n in names
    ):
        raise CorruptFileError("this is a TorchScript archive (torch.jit.save), not a checkpoint")
    if pickle_name not in by_name:
        if any(n.endswith(".npy") for n in names):
            raise CorruptFileError("this is a NumPy .npz archive, not a torch checkpoint")
        raise CorruptFileError("zip archive without data.pkl: not a torch checkpoint")
    if (
        not one_per_line
        or listing.count(f"\n{prefix}/") != len(names)
        or any(part in listing for part in ("/../", "\n../", "/..\n", "\n..\n", "\n/"))
    ):
        for name in names:
            if not name.startswith(prefix + "/") or ".." in name.split("/") or name.startswith("/"):
                raise CorruptFileError(f"zip member {quoted(name)} lies outside the archive folder {quoted(prefix)}")
    byteorder = by_name.get(f"{prefix}/byteorder")
    if byteorder is not None and byteorder.file_size > 16:
        raise CorruptFileError(f"the byteorder record claims {byteorder.file_size} bytes")
    if byteorder is not None and read_member(raw, byteorder, file_size).strip() not in (b"little", b""):
        raise UnsupportedError("big-endian checkpoints are not supported; re-save on a little-endian machine")
    pickle_info = by_name[pickle_name]
    if pickle_info.file_size > MAX_PICKLE_BYTES:
        raise CorruptFileError(f"data.pkl claims {pickle_info.file_size} bytes: too large for a weights file")
    # The numbered members become columns before data.pkl is read: at no time both.
    others = {name: member for name, member in by_name.items() if name.startswith(data_prefix)}
    table = StorageTable(data_prefix, numbered, others)
    return pickle_info, table


def storage_member(table: StorageTable, key: str, nbytes: int) -> Member:
    """The member holding storage ``key``, checked to hold ``nbytes`` uncompressed."""
    member = table.get(key)
    if member is None:
        raise CorruptFileError(f"storage {quoted(key)} has no record in the archive")
    if member.compress_type != STORED or member.compress_size != member.file_size:
        raise CorruptFileError(f"storage {quoted(key)} is compressed; torch writes storages uncompressed")
    if nbytes > member.file_size:
        raise CorruptFileError(
            f"storage {quoted(key)} should hold {nbytes} bytes but its record has {member.file_size}"
        )
    return member


def read_zip(
    path: Path, raw: BinaryIO, file_size: int, context: UnpickleContext
) -> tuple[Any, dict[str, StorageRecord]]:
    pickle_bytes, table = open_torch_zip(raw, file_size)

    members: dict[str, tuple[Member, int]] = {}  # storage key -> its record, bytes it holds
    nodes: dict[str, StorageNode] = {}

    def on_storage(data: tuple[object, ...]) -> StorageNode:
        storage_type, key, location, numel = storage_fields(data)
        if key in nodes:
            return nodes[key]
        dtype = storage_type.dtype or BYTE
        members[key] = (storage_member(table, key, numel * dtype.itemsize), numel * dtype.itemsize)
        locations[key] = location
        nodes[key] = StorageNode(key, dtype, 0, storage_type.unsupported)
        return nodes[key]

    locations: dict[str, str] = {}
    result = read_flat_state_dict(pickle_bytes, context, on_storage)  # the common shape, at MoE scale
    if result is None:
        result = unpickle(io.BytesIO(pickle_bytes), context, on_storage)
    starts = data_starts(raw, [member for member, _ in members.values()], file_size)
    records = {
        key: StorageRecord(key, path, starts[member.filename], nbytes, locations[key])
        for key, (member, nbytes) in members.items()
    }
    return result, records


# --------------------------------------------------------------------------- legacy format


def read_legacy(
    path: Path, raw: BinaryIO, file_size: int, context: UnpickleContext
) -> tuple[Any, dict[str, StorageRecord]]:
    if unpickle(raw, context) != LEGACY_MAGIC:
        raise CorruptFileError("not a torch checkpoint (no zip archive and no legacy magic number)")
    if unpickle(raw, context) != LEGACY_PROTOCOL:
        raise CorruptFileError("unknown legacy torch protocol version")
    sys_info = unpickle(raw, context)
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        raise UnsupportedError("big-endian checkpoints are not supported; re-save on a little-endian machine")

    roots: dict[str, tuple[DType, int, str, str | None]] = {}  # key -> dtype, numel, location, unsupported
    nodes: dict[tuple[str, str], StorageNode] = {}

    def on_storage(data: tuple[object, ...]) -> StorageNode:
        storage_type, key, location, numel = storage_fields(data)
        view = data[4] if len(data) > 4 else None
        dtype = storage_type.dtype or BYTE
        roots.setdefault(key, (dtype, numel, location, storage_type.unsupported))
        view_key, element_offset = key, 0
        if view is not None:
            if (
                not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str) and type(view[1]) is int)
                or not 0 <= view[1] <= MAX_ELEMENTS
            ):
                raise CorruptFileError(f"storage {quoted(key)} has a malformed view record")
            view_key, element_offset = view[0], view[1]
        if (key, view_key) not in nodes:
            nodes[(key, view_key)] = StorageNode(key, dtype, element_offset, storage_type.unsupported)
        return nodes[(key, view_key)]

    result = unpickle(raw, context, on_storage)
    keys = unpickle(raw, context)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CorruptFileError("the legacy storage key list is malformed")
    records: dict[str, StorageRecord] = {}
    position = raw.tell()
    for key in keys:
        if key not in roots:
            raise CorruptFileError(f"storage {quoted(key)} is listed but never used")
        if key in records:
            raise CorruptFileError(f"storage {quoted(key)} is listed twice")
        dtype, numel, location, _ = roots[key]
        raw.seek(position)
        header = raw.read(8)
        if len(header) != 8:
            raise CorruptFileError(f"storage {quoted(key)} is cut off (file ends at byte {file_size})")
        (stored_numel,) = struct.unpack("<q", header)
        if stored_numel != numel:
            raise CorruptFileError(f"storage {quoted(key)} holds {stored_numel} elements but is described with {numel}")
        start, nbytes = position + 8, numel * dtype.itemsize
        if start + nbytes > file_size:
            raise CorruptFileError(
                f"storage {quoted(key)} is cut off (needs {nbytes} bytes at {start}, file has {file_size})"
            )
        records[key] = StorageRecord(key, path, start, nbytes, location)
        position = start + nbytes
    missing = set(roots) - set(records)
    if missing:
        raise CorruptFileError(f"storage {quoted(sorted(missing)[0])} is used but has no data")
    return result, records


# --------------------------------------------------------------------------- top level


def sniff_foreign(head: bytes) -> str | None:
    """Name the format of a file that is clearly not a torch checkpoint."""
    if not head:
        return "the file is empty"
    if head.startswith(b"GGUF"):
        return "this is a GGUF file, not a torch checkpoint"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "this is an HDF5 (.h5) file, not a torch checkpoint"
    if head.startswith(b"\x93NUMPY"):
        return "this is a NumPy .npy file, not a torch checkpoint"
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if n < (1 << 27):
            return "this is a safetensors file already (use 'tiesafe inspect' on it)"
    if len(head) > 262 and head[257:262] == b"ustar":
        return (
            "this is a tar archive (a NeMo .nemo file, or torch < 0.4's checkpoint format), which tiesafe does "
            "not read: extract the checkpoint inside (a .nemo holds model_weights.ckpt) and convert that"
        )
    if head.startswith(b"\x1f\x8b"):
        return (
            "this is a gzip-compressed file (an older .nemo is a .tar.gz): decompress it and convert the "
            "checkpoint inside"
        )
    if head[:1] != b"\x80" and not head.startswith(b"PK"):
        if all(32 <= b < 127 or b in (9, 10, 13) for b in head[:512]):
            return "this is a text file, not a torch checkpoint"
        return "not a torch checkpoint (neither a zip archive nor a pickle)"
    return None
