"""Read a torch.distributed.checkpoint ``.metadata`` file without importing torch.distributed.

``.metadata`` is a pickle of DCP's dataclasses (``Metadata``, ``TensorStorageMetadata``,
``ChunkStorageMetadata``, ``MetadataIndex``, the file system's ``_StorageInfo``, ...).
``torch.load`` would import and build them; here :class:`_MetadataUnpickler` maps each
of those names to an inert record of ours that only stores the fields the pickle
sets, maps ``torch.Size``/dtypes/layouts to plain values, and refuses every other
global. The records are then checked and turned into the typed values below. Like
every pickle tiesafe reads, the stream is first walked by :mod:`.pickle_guard`.

Example:
    >>> meta = read_dcp_metadata(Path("step-100/.metadata"))  # doctest: +SKIP
    >>> meta.tensors["model.embed_tokens.weight"].chunks[0].sizes
    (64, 32)
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..dtypes import BY_TORCH_NAME, UNSUPPORTED_TORCH_DTYPES, DType
from ..errors import CorruptFileError, TiesafeError, UnsafeCheckpointError, UnsupportedError, quoted, read_error
from ..geometry import MAX_DIMS
from .pickle_guard import scan
from .unpickler import MAX_ELEMENTS

MAX_METADATA_BYTES = 1024 * 1024 * 1024  # a 70B run with its optimizer state has a few hundred MB at most

_METADATA = "torch.distributed.checkpoint.metadata"
_FILESYSTEM = "torch.distributed.checkpoint.filesystem"


# --------------------------------------------------------------------------- what callers get


@dataclass(frozen=True)
class Chunk:
    """One saved piece of a tensor: a box of ``sizes`` at ``offsets`` in the full tensor."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class TensorEntry:
    """A tensor of the checkpoint: its full size, dtype and the chunks it was saved in."""

    fqn: str
    dtype: DType | None  # None: a dtype safetensors cannot hold (``unsupported`` names it)
    size: tuple[int, ...]
    chunks: tuple[Chunk, ...]
    unsupported: str | None = None


@dataclass(frozen=True)
class StorageLocation:
    """Where one chunk's bytes lie: a range of a ``.distcp`` file of the checkpoint folder."""

    relative_path: str
    offset: int
    length: int


@dataclass
class DcpMetadata:
    """``.metadata`` as plain values."""

    tensors: dict[str, TensorEntry]
    others: list[str]  # non-tensor entries (bytes: step counters, param groups, extra state)
    locations: dict[tuple[str, tuple[int, ...]], StorageLocation]  # (fqn, chunk offsets) -> bytes
    paths: dict[str, tuple[str | int, ...]]  # flattened fqn -> its path in the saved (nested) state dict
    version: str | None


# --------------------------------------------------------------------------- the unpickler


class _Record:
    """A DCP dataclass as the pickle builds it: ``NEWOBJ`` then ``BUILD`` with its fields."""

    kind = "record"
    fields: dict[str, Any] = {}  # noqa: RUF012 -- NEWOBJ skips __init__; BUILD assigns a new dict, never mutates this

    def __setstate__(self, state: object) -> None:
        if self.fields:
            raise UnsafeCheckpointError(f"refused: the pickle sets the state of a {self.kind} twice")
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):  # (dict or None, slots)
            merged = {**(state[0] or {}), **state[1]} if isinstance(state[0], (dict, type(None))) else None
            if merged is None:
                raise CorruptFileError(f"the {self.kind} record has a malformed state")
            state = merged
        if self.kind == "TensorProperties" and isinstance(state, tuple):
            # TensorProperties pickles as (dtype, layout, requires_grad, memory format, pin_memory).
            state = {"dtype": state[0] if state else None}
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise CorruptFileError(f"the {self.kind} record has a malformed state")
        self.fields = dict(state)


def _record_class(name: str) -> type[_Record]:
    return type(name, (_Record,), {"kind": name})


_RECORDS = {
    (_METADATA, name): _record_class(name)
    for name in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
    )
}
_RECORDS[(_FILESYSTEM, "_StorageInfo")] = _record_class("_StorageInfo")


@dataclass(frozen=True)
class _DType:
    name: str


def _size(*args: object) -> tuple[int, ...]:
    values = args[0] if args else ()
    if (
        not isinstance(values, (tuple, list))
        or len(values) > MAX_DIMS
        or not all(type(v) is int and 0 <= v <= MAX_ELEMENTS for v in values)
    ):
        raise CorruptFileError(f"a torch.Size is not a tuple of at most {MAX_DIMS} sizes: {quoted(values)}")
    return tuple(values)


def _text(*args: object) -> str:
    # Layouts (_get_layout("torch.strided")), memory-format codes and checkpoint paths: kept as text, never used.
    if not all(isinstance(a, (str, int)) for a in args):
        raise UnsafeCheckpointError("refused: the pickle builds a path or layout from unexpected arguments")
    return "/".join(str(a) for a in args)


def _allowed() -> dict[tuple[str, str], object]:
    allowed: dict[tuple[str, str], object] = dict(_RECORDS)
    allowed[("torch", "Size")] = _size
    allowed[("torch.serialization", "_get_layout")] = _text
    allowed[(_METADATA, "_MEM_FORMAT_ENCODING")] = _text
    allowed[("pathlib", "PosixPath")] = _text
    allowed[("pathlib", "WindowsPath")] = _text
    allowed[("pathlib", "PurePosixPath")] = _text
    for name in (*BY_TORCH_NAME, *UNSUPPORTED_TORCH_DTYPES):
        allowed[("torch", name)] = _DType(name)
    for layout in ("strided", "sparse_coo", "sparse_csr", "contiguous_format", "channels_last", "preserve_format"):
        allowed[("torch", layout)] = layout
    allowed[("collections", "OrderedDict")] = dict
    return allowed


_ALLOWED = _allowed()


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise UnsafeCheckpointError(
                f"refused: the DCP metadata asks for {quoted(f'{module}.{name}', 120)}, which DCP metadata does "
                "not hold (tiesafe never runs code from a checkpoint)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError("refused: the DCP metadata holds a persistent reference")


def _unpickle(stream: BinaryIO) -> Any:
    data = scan(stream, max_bytes=MAX_METADATA_BYTES)
    try:
        return _MetadataUnpickler(io.BytesIO(data)).load()
    except TiesafeError:
        raise
    except RecursionError:
        raise CorruptFileError("the DCP metadata nests too deeply") from None
    except Exception as exc:  # a malformed pickle: one line
        raise CorruptFileError(f"the DCP metadata is malformed ({type(exc).__name__}: {exc})"[:300]) from None


# --------------------------------------------------------------------------- records -> plain values


def _fields(obj: object, kind: str, what: str) -> dict[str, Any]:
    if not isinstance(obj, _Record) or obj.kind != kind:
        raise CorruptFileError(f"{what} is not a {kind} record")
    return obj.fields


def _int(value: object, what: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_ELEMENTS * 8:
        raise CorruptFileError(f"{what} is not a valid size or offset: {quoted(value)}")
    return value


def _dims(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or len(value) > MAX_DIMS or not all(type(v) is int and v >= 0 for v in value):
        raise CorruptFileError(f"{what} is not a tuple of sizes: {quoted(value)}")
    return value


def _tensor_entry(fqn: str, record: object) -> TensorEntry:
    fields = _fields(record, "TensorStorageMetadata", f"entry {quoted(fqn)}")
    props = _fields(fields.get("properties"), "TensorProperties", f"the properties of {quoted(fqn)}")
    marker = props.get("dtype")
    if not isinstance(marker, _DType):
        raise CorruptFileError(f"tensor {quoted(fqn)} has no dtype")
    dtype = BY_TORCH_NAME.get(marker.name)
    size = _dims(fields.get("size"), f"the size of {quoted(fqn)}")
    chunks_value = fields.get("chunks")
    if not isinstance(chunks_value, list):
        raise CorruptFileError(f"tensor {quoted(fqn)} has no chunk list")
    chunks = []
    for chunk in chunks_value:
        chunk_fields = _fields(chunk, "ChunkStorageMetadata", f"a chunk of {quoted(fqn)}")
        offsets = _dims(chunk_fields.get("offsets"), f"a chunk offset of {quoted(fqn)}")
        sizes = _dims(chunk_fields.get("sizes"), f"a chunk size of {quoted(fqn)}")
        if len(offsets) != len(size) or len(sizes) != len(size):
            raise CorruptFileError(f"a chunk of {quoted(fqn)} has {len(sizes)} dimensions, the tensor {len(size)}")
        if any(o + s > n for o, s, n in zip(offsets, sizes, size, strict=True)):
            raise CorruptFileError(
                f"a chunk of {quoted(fqn)} at {list(offsets)} of size {list(sizes)} "
                f"lies outside the tensor {list(size)}"
            )
        chunks.append(Chunk(offsets, sizes))
    return TensorEntry(fqn, dtype, size, tuple(chunks), None if dtype else marker.name)


def _path(value: object, fqn: str) -> tuple[str | int, ...]:
    if not isinstance(value, tuple) or not value or not all(isinstance(p, (str, int)) for p in value):
        raise CorruptFileError(f"the planner's path of {quoted(fqn)} is malformed: {quoted(value)}")
    return value


def _metadata(root: object) -> DcpMetadata:
    fields = _fields(root, "Metadata", "the metadata file's content")
    entries = fields.get("state_dict_metadata")
    if not isinstance(entries, dict):
        raise CorruptFileError("the metadata has no state_dict_metadata")
    tensors: dict[str, TensorEntry] = {}
    others: list[str] = []
    for fqn, entry in entries.items():
        if not isinstance(fqn, str):
            raise CorruptFileError(f"a state dict key is not a string: {quoted(fqn)}")
        if isinstance(entry, _Record) and entry.kind == "BytesStorageMetadata":
            others.append(fqn)
        else:
            tensors[fqn] = _tensor_entry(fqn, entry)
    storage = fields.get("storage_data")
    if not isinstance(storage, dict):
        raise UnsupportedError(
            "the metadata names no storage files (storage_data); only checkpoints written by "
            "FileSystemWriter (dcp.save to a folder) are read"
        )
    locations: dict[tuple[str, tuple[int, ...]], StorageLocation] = {}
    for index, info in storage.items():
        index_fields = _fields(index, "MetadataIndex", "a storage index")
        info_fields = _fields(info, "_StorageInfo", "a storage location")
        fqn, offset = index_fields.get("fqn"), index_fields.get("offset")
        if not isinstance(fqn, str):
            raise CorruptFileError("a storage index has no fully qualified name")
        offsets = () if offset is None else _dims(offset, f"the storage offset of {quoted(fqn)}")
        if info_fields.get("transform_descriptors"):
            raise UnsupportedError(
                f"the bytes of {quoted(fqn)} are transformed ({quoted(info_fields['transform_descriptors'])}, "
                "e.g. compressed); tiesafe copies plain bytes only"
            )
        relative = info_fields.get("relative_path")
        if not isinstance(relative, str) or Path(relative).name != relative or relative in ("", ".", ".."):
            raise CorruptFileError(f"the storage of {quoted(fqn)} names a file outside the folder: {quoted(relative)}")
        locations[(fqn, offsets)] = StorageLocation(
            relative, _int(info_fields.get("offset"), "a storage offset"), _int(info_fields.get("length"), "a length")
        )
    planner = fields.get("planner_data")
    paths: dict[str, tuple[str | int, ...]] = {}
    if isinstance(planner, dict):
        for fqn, path in planner.items():
            if isinstance(fqn, str):
                paths[fqn] = _path(path, fqn)
    version = fields.get("version")
    return DcpMetadata(tensors, others, locations, paths, version if isinstance(version, str) else None)


def read_dcp_metadata(path: Path) -> DcpMetadata:
    """Parse a DCP ``.metadata`` file into plain values; nothing from it runs.

    Example:
        >>> sorted(read_dcp_metadata(Path("ckpt/.metadata")).tensors)[:1]  # doctest: +SKIP
        ['model.embed_tokens.weight']
    """
    try:
        with open(path, "rb") as stream:
            return _metadata(_unpickle(stream))
    except TiesafeError as exc:
        raise type(exc)(exc.problem, path=path) from None
    except OSError as exc:
        raise read_error(exc, path, "DCP metadata file") from None
