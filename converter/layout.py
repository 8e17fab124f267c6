"""Plan where every byte goes: the header and the data section of an output file.

Pure functions: the plan says, for each stored tensor, where its bytes come from
(a byte range of a source file, or a strided window to gather) and where they go.
The writer carries the plan out; verification reads the result back.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

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


class TensorSource(Protocol):
    """Bytes that are not in a file (a live tensor): they write themselves."""

    def write_into(self, fd: int, offset: int) -> None: ...


@dataclass(frozen=True)
class PlannedTensor:
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


def encode_header(tensors: list[PlannedTensor], metadata: dict[str, str]) -> bytes:
    """The safetensors header: ``__metadata__`` first, tensors in data order.

    Padded with spaces to a multiple of 8 bytes, as the safetensors library does,
    so that every tensor's data stays aligned to its element size.
    """
    # The same bytes json.dumps gives for the document as one dict, written entry by
    # entry: no dict and two lists per tensor (tens of thousands in a mixture-of-experts file).
    parts = [f'"__metadata__":{_JSON(metadata)}'] if metadata else []
    for t in tensors:
        shape = ",".join(map(str, t.shape))
        parts.append(
            f'{_JSON(t.name)}:{{"dtype":{_JSON(t.dtype)},"shape":[{shape}],"data_offsets":[{t.begin},{t.end}]}}'
        )
    text = ("{" + ",".join(parts) + "}").encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


@dataclass(frozen=True)
class StoredItem:
    """A tensor to store under its own name, and where its bytes come from."""

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
    items = []
    for s in sharing.stored:
        source = source_window(checkpoint.storages[s.ref.storage], s.ref)
        items.append(StoredItem(s.name, s.ref.dtype, s.ref.shape, source))
    return items


def _source_order(items: list[StoredItem]) -> Callable[[StoredItem], tuple[int, int, int]]:
    """Sort key: larger elements first, then by file (in order of appearance) and byte offset."""
    files: dict[Path, int] = {}
    for item in items:
        if isinstance(item.source, FileWindow):
            files.setdefault(item.source.path, len(files))
    index = {id(item): i for i, item in enumerate(items)}

    def key(item: StoredItem) -> tuple[int, int, int]:
        source = item.source
        if isinstance(source, FileWindow):
            return -item.dtype.itemsize, files[source.path], source.storage_offset + source.ref.span[0]
        return -item.dtype.itemsize, -1, index[id(item)]  # bytes not in a file (export): given order

    return key


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
    ordered = sorted(items, key=_source_order(items))
    tensors: list[PlannedTensor] = []
    position = 0
    for item in ordered:
        tensors.append(
            PlannedTensor(item.name, item.dtype.code, item.shape, position, position + item.nbytes, item.source)
        )
        position += item.nbytes
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
