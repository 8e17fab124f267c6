"""The two containers ``torch.save`` writes: a zip archive (since torch 1.6) and the legacy stream.

Both are read by hand because torch's own reader must materialise every tensor, and
no other library reads the format without torch. Each reader returns the unpickled
structure (built by :mod:`.unpickler`) and where each storage's bytes lie in the file.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from ..descriptors import StorageRecord
from ..dtypes import BYTE, DType
from ..errors import CorruptFileError, UnsupportedError, quoted
from .flat_state_dict import read_flat_state_dict
from .unpickler import MAX_ELEMENTS, MAX_PICKLE_BYTES, StorageNode, UnpickleContext, storage_fields, unpickle
from .zipdir import STORED, Member, data_starts, read_directory, read_member

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


# --------------------------------------------------------------------------- zip format


class StorageTable:
    """Storage key -> its member (``<prefix>/data/<key>``), looked up in the directory's own
    table of names: no second table and no key string per storage (100,000 of them in a
    mixture-of-experts archive)."""

    def __init__(self, by_name: dict[str, Member], data_prefix: str) -> None:
        self._by_name = by_name
        self._prefix = data_prefix

    def get(self, key: str) -> Member | None:
        return self._by_name.get(self._prefix + key)

    def many(self, keys: list[str]) -> list[Member | None]:
        """``get`` of every key, in C."""
        prefix = self._prefix
        return list(map(self._by_name.get, [prefix + key for key in keys]))


class TorchZip(NamedTuple):
    """What a torch zip archive holds besides its storages' bytes."""

    pickle: bytes  # data.pkl
    storages: StorageTable


def open_torch_zip(raw: BinaryIO, file_size: int) -> TorchZip:
    """Check that ``raw`` is a torch checkpoint archive and read its ``data.pkl`` and member table."""
    infos = read_directory(raw, file_size)
    if not infos:
        raise CorruptFileError("empty zip archive")
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        raise CorruptFileError("zip archive holds duplicate member names")
    prefix = names[0].split("/", 1)[0]
    pickle_name = f"{prefix}/data.pkl"
    by_name = {i.filename: i for i in infos}
    # All names in one string, each between two newlines: a check over every name is one
    # substring search in C (a mixture-of-experts archive has 100,000 of them). A name
    # holding a newline itself is checked one by one.
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
    pickle_bytes = read_member(raw, pickle_info, file_size)
    return TorchZip(pickle_bytes, StorageTable(by_name, f"{prefix}/data/"))


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
