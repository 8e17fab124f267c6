"""Plan where every byte goes: the header and the data section of an output file.

Pure functions: the plan says, for each stored tensor, where its bytes come from
(a byte range of a source file, or a strided window to gather) and where they go.
The writer carries the plan out; verification reads the result back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

from . import ties
from .sharing import SharingPlan
from .torchfile import Checkpoint
from .windows import FileWindow

FORMAT_METADATA = {"format": "pt"}  # transformers refuses safetensors files without it


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
    source: FileWindow | TensorSource  # a FileWindow is copied by the kernel


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
    document: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    for t in tensors:
        document[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.begin, t.end]}
    text = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def plan_file(checkpoint: Checkpoint, sharing: SharingPlan, *, metadata: dict[str, str] | None = None) -> FilePlan:
    """Lay the stored tensors of ``sharing`` out in one file, with the tie record.

    Tensors are ordered by element size (largest first, which keeps every tensor
    aligned after the 8-aligned header) and otherwise in checkpoint order, so that
    the source is read front to back. Same input, same bytes.
    """
    stored = sorted(sharing.stored, key=lambda s: -s.ref.dtype.itemsize)  # stable: keeps source order
    tensors: list[PlannedTensor] = []
    position = 0
    for s in stored:
        record = checkpoint.storages[s.ref.storage]
        source = FileWindow(record.path, record.offset, s.ref)
        tensors.append(PlannedTensor(s.name, s.ref.dtype.code, s.ref.shape, position, position + s.ref.nbytes, source))
        position += s.ref.nbytes
    entries = {**(metadata or {}), **FORMAT_METADATA, **ties.encode(sharing.ties)}
    return FilePlan(tensors, entries, encode_header(tensors, entries))
