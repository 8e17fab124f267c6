"""Plan where every byte goes: the header and the data section of an output file.

Pure functions: the plan says, for each stored tensor, where its bytes come from
(a byte range of a source file, or a strided window to gather) and where they go.
The writer carries the plan out; verification reads the result back.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from . import conventions, ties
from .descriptors import Checkpoint
from .dtypes import DType
from .geometry import numel
from .sharing import SharingPlan
from .windows import FileWindow, PieceWindow, source_window

FORMAT_METADATA = {"format": "pt"}
_JSON = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False
).encode  # transformers refuses safetensors files without it
# What _JSON does with a string (ensure_ascii=False), called without the encoder's dispatch.
_JSON_STRING: Callable[[str], str] = json.encoder.encode_basestring


class TensorSource(Protocol):
    """Bytes that are not in a file (a live tensor): they write themselves."""

    def write_into(self, fd: int, offset: int) -> None: ...


class PlannedTensor(NamedTuple):
    """A tensor's place in an output file. A named tuple: one per stored tensor, tens of
    thousands in a mixture-of-experts file, built several times faster than a dataclass."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offset in the data section
    end: int
    source: FileWindow | PieceWindow | TensorSource  # file ranges are copied by the kernel


@dataclass
class FilePlan:
    """One safetensors file to write: its encoded header and its tensors in order."""

    tensors: list[PlannedTensor]
    metadata: dict[str, str]
    header: bytes  # the 8-byte length prefix and the padded JSON

    @property
    def data_size(self) -> int:
        return self.tensors[-1].end if self.tensors else 0

    @property
    def file_size(self) -> int:
        return len(self.header) + self.data_size


def encode_header(
    tensors: Iterable[tuple[str, str, tuple[int, ...], int, int, object]], metadata: dict[str, str]
) -> bytes:
    """The safetensors header: ``__metadata__`` first, tensors in data order.

    Padded with spaces to a multiple of 8 bytes, as the safetensors library does,
    so that every tensor's data stays aligned to its element size.
    """
    data = b"".join(header_pieces(tensors, metadata))
    padding = -len(data) % 8
    return b"".join(((len(data) + padding).to_bytes(8, "little"), data, b" " * padding))


_ENTRIES_PER_PIECE = 4096  # about 450 KB of JSON a piece, in a mixture-of-experts file


def header_pieces(
    tensors: Iterable[tuple[str, str, tuple[int, ...], int, int, object]], metadata: dict[str, str]
) -> Iterator[bytes]:
    """The header's JSON text (no length prefix, no padding), UTF-8, a few thousand entries a piece:
    what :func:`encode_header` joins, and what a writer of 100,000 entries streams into its
    file without holding the whole (11 MB, made three times over on the way).

    Example:
        >>> b"".join(header_pieces([("a", "F32", (2,), 0, 8, None)], {"format": "pt"}))
        b'{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    """
    # The same bytes json.dumps gives for the document as one dict, written entry by
    # entry: no dict and two lists per tensor, and each distinct dtype and shape encoded once.
    parts = [f'"__metadata__":{_JSON(metadata)}'] if metadata else []
    append, name_json = parts.append, _JSON_STRING
    middles: dict[tuple[str, tuple[int, ...]], str] = {}
    opening = "{"  # before the first piece; a comma before each later one
    for name, dtype, shape, begin, end, _ in tensors:
        middle = middles.get((dtype, shape))
        if middle is None:
            middle = middles[dtype, shape] = f'{{"dtype":{_JSON(dtype)},"shape":[{",".join(map(str, shape))}],'
        append(f'{name_json(name)}:{middle}"data_offsets":[{begin},{end}]}}')
        if len(parts) >= _ENTRIES_PER_PIECE:
            yield (opening + ",".join(parts)).encode("utf-8")
            opening = ","
            parts.clear()
    if parts:
        yield (opening + ",".join(parts) + "}").encode("utf-8")
    else:
        yield b"{}" if opening == "{" else b"}"


class StoredItem(NamedTuple):
    """A tensor to store under its own name, and where its bytes come from (a named tuple, as
    :class:`PlannedTensor`)."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    source: FileWindow | PieceWindow | TensorSource

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * self.dtype.itemsize


@dataclass
class SetPlan:
    """The files of an output: one file, or shards and the content of their index."""

    files: dict[str, FilePlan]  # file name -> plan, in shard order
    index: dict[str, Any] | None  # model.safetensors.index.json, None for a single file

    @property
    def data_size(self) -> int:
        return sum(p.data_size for p in self.files.values())

    def index_json(self) -> bytes:
        """``model.safetensors.index.json`` as transformers writes it (sorted keys, indent 2)."""
        return (json.dumps(self.index, indent=2, sort_keys=True) + "\n").encode("utf-8")


def stored_items(checkpoint: Checkpoint, sharing: SharingPlan) -> list[StoredItem]:
    """The stored tensors of ``sharing`` with their bytes located in the checkpoint's files."""
    storages = checkpoint.storages
    return [
        StoredItem(name, ref.dtype, ref.shape, source_window(storages[ref.storage], ref))
        for name, ref, _ in sharing.stored
    ]


def _source_order(items: list[StoredItem]) -> list[int]:
    """Indices of ``items`` by element size (largest first), then file (in order of appearance) and byte offset.

    Bytes not in a file (a live tensor) keep the given order, before those in files.
    """
    files: dict[Path, int] = {}
    last_path, last_index = None, -1
    keys: list[tuple[int, int, int, int]] = []
    for i, (_, dtype, _, source) in enumerate(items):
        if isinstance(source, FileWindow):
            path = source.path
            if path is not last_path:
                last_index = files.setdefault(path, len(files))
                last_path = path
            ref = source.ref
            keys.append((-dtype.itemsize, last_index, source.storage_offset + ref.offset * ref.dtype.itemsize, i))
        else:
            keys.append((-dtype.itemsize, -1, i, i))
    keys.sort()  # the index last: a stable order for equal places
    return [key[3] for key in keys]


def plan_file(items: list[StoredItem], record: ties.TieRecord, *, metadata: dict[str, str] | None = None) -> FilePlan:
    """Lay ``items`` out in one file whose header carries ``record``.

    Tensors are ordered by element size (largest first, which keeps every tensor
    aligned after the 8-aligned header) and otherwise in the order their bytes lie
    in the source files (files in the order given), so that the source is read front
    to back and neighbouring small tensors are copied in one batch (a legacy-format
    file lays its storages out in another order than its names). Same input, same bytes.

    Example:
        >>> plan = plan_file(stored_items(ckpt, sharing), sharing.ties)  # doctest: +SKIP
        >>> plan.header[8:9]
        b'{'
    """
    tensors: list[PlannedTensor] = []
    append = tensors.append
    position = 0
    for i in _source_order(items):
        name, dtype, shape, source = items[i]
        end = position + numel(shape) * dtype.itemsize
        append(PlannedTensor(name, dtype.code, shape, position, end, source))
        position = end
    entries = {**(metadata or {}), **FORMAT_METADATA, **ties.encode(record)}
    return FilePlan(tensors, entries, encode_header(tensors, entries))


def plan_shards(
    items: list[StoredItem],
    record: ties.TieRecord,
    *,
    max_shard_size: int,
    metadata: dict[str, str] | None = None,
    stem: str = "model",
    filename_pattern: str | None = None,
) -> SetPlan:
    """Split ``items`` into shards of at most ``max_shard_size`` bytes, in source order.

    The split is huggingface_hub's (greedy in source order; a tensor larger than the
    limit gets a shard of its own), so shards match what ``save_pretrained`` writes.
    Each shard carries the ties whose target it stores, so every shard validates on
    its own and the shards' records together are ``record``.

    Example:
        >>> plan = plan_shards(items, sharing.ties, max_shard_size=5 * 10**9)  # doctest: +SKIP
        >>> list(plan.files)
        ['model.safetensors']
    """
    from huggingface_hub import split_state_dict_into_shards_factory

    by_name = {item.name: item for item in items}
    split = split_state_dict_into_shards_factory(
        by_name,
        get_storage_size=lambda item: item.nbytes,
        filename_pattern=filename_pattern or conventions.shard_pattern(stem),
        max_shard_size=max_shard_size,
    )
    files = {
        filename: plan_file([by_name[n] for n in names], ties.restrict(record, set(names)), metadata=metadata)
        for filename, names in split.filename_to_tensors.items()
    }
    if len(files) == 1:
        return SetPlan(files, None)
    total = sum(item.nbytes for item in items)
    return SetPlan(files, {"metadata": {"total_size": total}, "weight_map": dict(split.tensor_to_filename)})
