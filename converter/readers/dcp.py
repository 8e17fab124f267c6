"""Read a torch.distributed.checkpoint folder (FSDP, torchtitan) as one checkpoint, structure only.

A DCP folder holds ``.metadata`` (read by :mod:`.dcp_metadata`) and ``__R_N.distcp`` files
written by each rank. Every tensor was saved in chunks, boxes of the full tensor; each
chunk's bytes are a range of a ``.distcp`` file: a ``torch.save`` archive at that offset
(what ``FileSystemWriter`` writes by default; read with our zip reader, no code runs), or
a tensor of the safetensors blob that ``SerializationFormat.SAFETENSORS`` writes after a
file's non-tensor entries. Each full tensor becomes a
storage made of :class:`~converter.descriptors.Piece` s, one per chunk: a row shard is one
run, a column shard runs of its rows that the writer interleaves with the other chunks'.

The model's state dict is picked out of the checkpoint's top-level keys as for training
checkpoints (``model``, ``app.model``, ... or flat top-level names as torchtitan saves
them); the optimizer state is left out.
"""

from __future__ import annotations

import io
import json
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO, cast

from ..descriptors import Checkpoint, Piece, StorageRecord, TensorRef, file_stamp
from ..errors import CorruptFileError, TiesafeError, UnsupportedError, quoted, read_error
from ..geometry import contiguous_strides, numel
from ..stfile import MAX_HEADER_BYTES, Entry
from ..stfile import _entry as stfile_entry
from .containers import read_zip
from .dcp_metadata import Chunk, DcpMetadata, StorageLocation, TensorEntry, read_dcp_metadata
from .state_dict import AMBIGUOUS_SHARE, NON_WEIGHT_KEYS
from .unpickler import TensorNode, UnpickleContext

METADATA = ".metadata"
SHARDING_KEY = "DCP_SHARDING_INFO"  # torch.distributed.checkpoint._hf_utils.CUSTOM_METADATA_KEY
DISTCP_SUFFIX = ".distcp"


def is_dcp_folder(folder: Path) -> bool:
    """Whether ``folder`` is a torch.distributed.checkpoint folder (``.metadata`` and ``.distcp`` files).

    Example:
        >>> is_dcp_folder(Path("step-100"))  # doctest: +SKIP
        True
    """
    return (folder / METADATA).is_file() and any(p.suffix == DISTCP_SUFFIX for p in folder.iterdir())


class _Slice(io.RawIOBase):
    """A byte range of an open file, seen as a file of its own (one chunk's ``torch.save`` archive)."""

    def __init__(self, raw: Any, start: int, length: int) -> None:
        self._raw, self._start, self._length, self._position = raw, start, length, 0
        self.base_offset = start  # read_zip's direct reads (pread on fileno()) add it

    def fileno(self) -> int:
        return int(self._raw.fileno())

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._length}[whence]
        self._position = max(0, base + offset)
        return self._position

    def tell(self) -> int:
        return self._position

    def readinto(self, buffer: Any) -> int:
        size = max(0, min(len(buffer), self._length - self._position))
        if size == 0:
            return 0
        data = os.pread(self._raw.fileno(), size, self._start + self._position)
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)


def _pick(meta: DcpMetadata, key: str | None) -> tuple[dict[str, str], list[str], str | None]:
    """Flattened fqn -> name in the output, what was left out, and where the weights were found.

    As for training checkpoints (:mod:`.state_dict`): the weights are the state dict (the
    tensors sharing one parent path: ``model``, ``app/model``, or the top level as
    torchtitan saves them) with the most bytes, optimizer and scheduler state never; a
    second one of weight size (``ema``) asks for ``--key``.
    """
    paths = {fqn: meta.paths.get(fqn, (fqn,)) for fqn in [*meta.tensors, *meta.others]}
    if key is not None:
        prefix: tuple[str | int, ...] = tuple(part for part in key.replace("/", ".").split(".") if part)
        chosen = {f: p for f, p in paths.items() if p[: len(prefix)] == prefix and len(p) > len(prefix)}
        if not any(f in meta.tensors for f in chosen):
            raise TiesafeError(f"no tensors under {quoted(key)} in the checkpoint (looked up by --key)")
    else:
        prefix = _largest_state_dict(meta, paths)
        chosen = {f: p for f, p in paths.items() if p[:-1] == prefix}
    depth = len(prefix)
    names = {f: ".".join(str(part) for part in p[depth:]) for f, p in chosen.items()}
    left = sorted({".".join(str(x) for x in p[: depth + 1]) for f, p in paths.items() if f not in chosen})
    return names, left, "/".join(str(p) for p in prefix) or None


def _largest_state_dict(meta: DcpMetadata, paths: dict[str, tuple[str | int, ...]]) -> tuple[str | int, ...]:
    sizes: dict[tuple[str | int, ...], int] = {}
    for fqn, entry in meta.tensors.items():
        parent = paths[fqn][:-1]
        if any(isinstance(part, str) and part in NON_WEIGHT_KEYS for part in parent):
            continue
        sizes[parent] = sizes.get(parent, 0) + numel(entry.size) * (entry.dtype.itemsize if entry.dtype else 1)
    if not sizes:
        tops = sorted({str(p[0]) for p in paths.values()})
        raise TiesafeError(
            f"no model weights among the checkpoint's entries ({', '.join(tops[:8])}); pick them with --key"
        )
    ranked = sorted(sizes.items(), key=lambda item: -item[1])
    best, best_bytes = ranked[0]
    rivals = [p for p, n in ranked[1:] if n >= AMBIGUOUS_SHARE * best_bytes]
    if rivals:
        listed = ", ".join(quoted("/".join(str(x) for x in p) or "(top level)") for p in [best, *rivals][:6])
        raise TiesafeError(f"the checkpoint holds several state dicts: {listed}; choose one with --key")
    return best


def chunk_piece(entry: TensorEntry, chunk: Chunk, path: Path, offset: int, itemsize: int) -> Piece:
    """The runs that place a chunk's row-major bytes in the full tensor's row-major bytes.

    Dimensions after the last one the chunk cuts are whole, so each run is that
    dimension's slice; the dimensions before it repeat the run (the grid).

    Example:
        >>> entry = TensorEntry("w", None, (3, 8), ())
        >>> chunk_piece(entry, Chunk((0, 4), (3, 4)), Path("f"), 0, 4).grid
        ((3, 32),)
    """
    strides = contiguous_strides(entry.size)
    cut = [d for d, (s, n) in enumerate(zip(chunk.sizes, entry.size, strict=True)) if s != n]
    last = cut[-1] if cut else 0
    run = chunk.sizes[last] * strides[last] * itemsize if entry.size else itemsize
    at = sum(o * t for o, t in zip(chunk.offsets, strides, strict=True)) * itemsize
    grid = tuple((chunk.sizes[d], strides[d] * itemsize) for d in range(last) if chunk.sizes[d] != 1)
    return Piece(path, offset, run, at, grid)


class _ChunkFiles:
    """Opens each ``.distcp`` file once and locates chunk bytes in it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: dict[str, Any] = {}
        self.sizes: dict[str, int] = {}
        self.stamps: dict[Path, tuple[int, ...]] = {}
        self.blobs: dict[tuple[str, int], tuple[dict[str, Entry], dict[str, Any]] | None] = {}

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def _open(self, name: str) -> Any:
        if name not in self.files:
            path = self.folder / name
            try:
                raw = open(path, "rb")  # noqa: SIM115 -- kept open for every chunk of the file, closed by close()
            except FileNotFoundError:
                raise CorruptFileError(f"the metadata names {name}, which is missing", path=self.folder) from None
            except OSError as exc:
                raise read_error(exc, path, "DCP storage file") from None
            st = os.fstat(raw.fileno())
            self.files[name], self.sizes[name], self.stamps[path] = raw, st.st_size, file_stamp(st)
        return self.files[name]

    def locate(self, entry: TensorEntry, chunk: Chunk, where: StorageLocation) -> tuple[Path, int]:
        """The file and offset of the chunk's row-major bytes."""
        assert entry.dtype is not None
        raw = self._open(where.relative_path)
        path = self.folder / where.relative_path
        if where.offset + where.length > self.sizes[where.relative_path]:
            raise CorruptFileError(
                f"the chunk of {quoted(entry.fqn)} at {list(chunk.offsets)} ends at byte "
                f"{where.offset + where.length}, "
                f"past the end of the file ({self.sizes[where.relative_path]} bytes)",
                path=path,
            )
        if os.pread(raw.fileno(), 4, where.offset) != b"PK\x03\x04":
            blob = self._blob(where.relative_path, where.offset)
            if blob is None:
                raise UnsupportedError(
                    f"the chunk of {quoted(entry.fqn)} at {list(chunk.offsets)} is neither a torch.save archive "
                    "nor in a safetensors blob (the two formats FileSystemWriter writes)",
                    path=path,
                )
            return self._in_blob(entry, chunk, blob, path)
        try:
            # A chunk is one tensor: only tensor machinery may be named (strict), no inert objects.
            chunk_file = cast(BinaryIO, _Slice(raw, where.offset, where.length))
            obj, records = read_zip(path, chunk_file, where.length, UnpickleContext(strict=True))
        except TiesafeError as exc:
            problem = f"the chunk of {quoted(entry.fqn)} at {list(chunk.offsets)}: {exc.problem}"
            raise type(exc)(problem, path=path) from None
        if not isinstance(obj, TensorNode) or obj.ref is None:
            raise CorruptFileError(
                f"the chunk of {quoted(entry.fqn)} at {list(chunk.offsets)} is not a tensor", path=path
            )
        ref = obj.ref
        if ref.dtype != entry.dtype or ref.shape != chunk.sizes:
            raise CorruptFileError(
                f"the chunk of {quoted(entry.fqn)} at {list(chunk.offsets)} holds {ref.dtype.code}{list(ref.shape)}, "
                f"the metadata says {entry.dtype.code}{list(chunk.sizes)}",
                path=path,
            )
        record = records[ref.storage]
        if not ref.is_contiguous or ref.span[1] > record.nbytes:
            raise UnsupportedError(
                f"the chunk of {quoted(entry.fqn)} at {list(chunk.offsets)} is saved strided; "
                "tiesafe reads contiguous chunks",
                path=path,
            )
        return path, where.offset + record.offset + ref.span[0]

    def _blob(self, name: str, offset: int) -> tuple[dict[str, Entry], dict[str, Any]] | None:
        """The safetensors blob at ``offset`` of a file (``SerializationFormat.SAFETENSORS``), else None.

        Such a writer puts every tensor of the file in one safetensors blob after the
        non-tensor entries, and records the blob's start as each chunk's offset; the
        blob's own header locates the chunks, with their offsets in ``DCP_SHARDING_INFO``.
        """
        key = (name, offset)
        if key not in self.blobs:
            raw = self._open(name)
            head = os.pread(raw.fileno(), 9, offset)
            found = None
            if len(head) == 9 and head[8:9] == b"{":
                (length,) = struct.unpack("<Q", head[:8])
                if offset + 8 + length <= self.sizes[name] and length <= MAX_HEADER_BYTES:
                    found = _blob_header(
                        self.folder / name, os.pread(raw.fileno(), length, offset + 8), offset + 8 + length
                    )
            self.blobs[key] = found
        return self.blobs[key]

    def _in_blob(
        self, entry: TensorEntry, chunk: Chunk, blob: tuple[dict[str, Entry], dict[str, Any]], path: Path
    ) -> tuple[Path, int]:
        entries, info = blob
        stored = entries.get(entry.fqn)
        record = info.get(entry.fqn)
        saved = record.get("saved_offsets") if isinstance(record, dict) else None
        if stored is None or not isinstance(saved, list) or tuple(saved) != chunk.offsets:
            raise CorruptFileError(
                f"holds no chunk of {quoted(entry.fqn)} at {list(chunk.offsets)}, which the metadata places there",
                path=path,
            )
        if stored.dtype != entry.dtype or stored.shape != chunk.sizes:
            raise CorruptFileError(
                f"the chunk of {quoted(entry.fqn)} is {stored.dtype.code}{list(stored.shape)}, "
                f"the metadata says {entry.dtype.code if entry.dtype else '?'}{list(chunk.sizes)}",
                path=path,
            )
        if stored.start + stored.nbytes > self.sizes[path.name]:
            raise CorruptFileError(f"the chunk of {quoted(entry.fqn)} runs past the end of the file", path=path)
        return path, stored.start


def _blob_header(path: Path, raw: bytes, data_start: int) -> tuple[dict[str, Entry], dict[str, Any]] | None:
    """Entries (absolute offsets) and DCP sharding info of an embedded safetensors header; None if it is not one."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    if not isinstance(header, dict):
        return None
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or SHARDING_KEY not in metadata:
        return None
    try:
        info = json.loads(metadata[SHARDING_KEY])
        entries = {name: stfile_entry(name, spec, data_start)[0] for name, spec in header.items()}
    except (ValueError, TypeError, RecursionError):
        raise CorruptFileError("the safetensors header of its chunks is malformed", path=path) from None
    except TiesafeError as exc:
        raise type(exc)(exc.problem, path=path) from None
    return entries, info if isinstance(info, dict) else {}


def _storage(entry: TensorEntry, meta: DcpMetadata, files: _ChunkFiles, folder: Path) -> StorageRecord:
    assert entry.dtype is not None
    itemsize = entry.dtype.itemsize
    if sum(numel(c.sizes) for c in entry.chunks) != numel(entry.size):
        raise CorruptFileError(
            f"the chunks of {quoted(entry.fqn)} hold {sum(numel(c.sizes) for c in entry.chunks)} elements, "
            f"the tensor {list(entry.size)} has {numel(entry.size)} (a rank's chunks are missing or repeated)",
            path=folder / METADATA,
        )
    pieces = []
    for chunk in entry.chunks:
        where = meta.locations.get((entry.fqn, chunk.offsets))
        if where is None:
            raise CorruptFileError(
                f"the chunk of {quoted(entry.fqn)} at {list(chunk.offsets)} has no storage location",
                path=folder / METADATA,
            )
        path, offset = files.locate(entry, chunk, where)
        if numel(chunk.sizes):
            pieces.append(chunk_piece(entry, chunk, path, offset, itemsize))
    pieces.sort(key=lambda p: p.at)
    return StorageRecord(entry.fqn, folder, 0, numel(entry.size) * itemsize, "cpu", tuple(pieces))


def read_dcp(folder: str | Path, *, key: str | None = None) -> Checkpoint:
    """The model state dict of a DCP checkpoint folder as a :class:`Checkpoint` of pieces; no tensor data read.

    ``key`` picks the state dict (``model``, ``app/model``); by default it is found
    under a usual wrapper key or, as torchtitan saves it, at the top level.

    Example:
        >>> ckpt = read_dcp("outputs/checkpoint/step-1000")  # doctest: +SKIP
        >>> ckpt.format, ckpt.wrapper
        ('dcp', 'model')
    """
    folder = Path(folder)
    meta_path = folder / METADATA
    try:
        stamp = file_stamp(os.stat(meta_path))
    except OSError as exc:
        raise read_error(exc, meta_path, "DCP metadata file") from None
    meta = read_dcp_metadata(meta_path)
    try:
        names, left, wrapper = _pick(meta, key)
    except TiesafeError as exc:
        raise type(exc)(exc.problem, path=folder) from None
    tensors: dict[str, TensorRef] = {}
    storages: dict[str, StorageRecord] = {}
    skipped = [f"{n} (not a tensor)" for f, n in names.items() if f not in meta.tensors]
    files = _ChunkFiles(folder)
    try:
        for fqn, name in names.items():
            entry = meta.tensors.get(fqn)
            if entry is None:
                continue
            if entry.dtype is None:
                raise UnsupportedError(f"tensor {quoted(name)} is {entry.unsupported}, which safetensors cannot store")
            if name in tensors:
                raise CorruptFileError(f"two entries are named {quoted(name)}", path=meta_path)
            storages[fqn] = _storage(entry, meta, files, folder)
            tensors[name] = TensorRef(fqn, entry.dtype, 0, entry.size, contiguous_strides(entry.size))
    except TiesafeError as exc:
        raise type(exc)(exc.problem, path=exc.path or folder) from None
    finally:
        files.close()
    return Checkpoint(folder, "dcp", tensors, storages, [*skipped, *left], wrapper, {meta_path: stamp, **files.stamps})
