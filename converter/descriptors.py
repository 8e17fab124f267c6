"""The common language of the pipeline: a checkpoint as names -> tensor windows on byte ranges.

Every reader (torch pickles today; training runs next) yields a :class:`Checkpoint`;
the analysis (``sharing``), the layout, the writer's windows, verification and the
exporter consume it. No tensor data lives here: a :class:`TensorRef` is geometry over a
storage, and a :class:`StorageRecord` says where that storage's bytes lie in a file.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .dtypes import DType
from .errors import TiesafeError
from .geometry import numel, window_geometry


@dataclass(frozen=True)
class Piece:
    """Bytes of a storage that lie in one file: runs of ``length`` bytes from ``offset`` of ``path``.

    The first run lands at byte ``at`` of the storage. ``grid`` repeats it: each
    ``(count, step)``, outermost first, places ``count`` blocks ``step`` storage bytes
    apart, while the runs follow each other in the file. A ZeRO partition is one
    run; a DCP chunk of columns ``[:, 4:8]`` of a 3 x 8 fp32 tensor is
    ``Piece(path, offset, 16, 16, ((3, 32),))``.

    Example:
        >>> Piece(Path("__0_0.distcp"), 0, 16, 16, ((3, 32),)).nbytes
        48
    """

    path: Path
    offset: int
    length: int
    at: int
    grid: tuple[tuple[int, int], ...] = ()

    @property
    def nbytes(self) -> int:
        return self.length * numel(tuple(count for count, _ in self.grid))

    def runs(self) -> Iterator[tuple[int, int, int]]:
        """``(storage byte, file offset, length)`` of each run, in storage order."""
        if not self.grid:
            yield self.at, self.offset, self.length
            return
        position = self.offset
        for index in itertools.product(*(range(count) for count, _ in self.grid)):
            yield self.at + sum(i * step for i, (_, step) in zip(index, self.grid, strict=True)), position, self.length
            position += self.length


@dataclass(frozen=True, slots=True)
class StorageRecord:
    """Where one storage's bytes lie: one range of a file, or pieces of several files.

    A pickle's storage is the ``nbytes`` at ``offset`` of ``path``. A training run's
    (a ZeRO parameter gathered from every rank's partition, a DCP tensor from its
    chunks) is ``pieces`` that tile its ``nbytes`` exactly; ``path`` then names the
    checkpoint (for messages) and ``offset`` is unused. With ``cast_from`` the bytes
    in the files hold that dtype and each element is converted to the tensor's dtype
    as it is read (``--dtype``; offsets still count elements).
    """

    key: str
    path: Path  # the file holding the bytes (a sharded set has several)
    offset: int  # byte offset of the first byte in the file
    nbytes: int  # in the files' dtype
    location: str  # device it was saved from ("cpu", "cuda:0", ...): recorded, never needed
    pieces: tuple[Piece, ...] = ()
    cast_from: DType | None = None

    def __reduce__(self) -> tuple[type[StorageRecord], tuple[object, ...]]:
        # Explicit (Dask ships records to workers): frozen slotted dataclasses do not unpickle on 3.10.
        fields = (self.key, self.path, self.offset, self.nbytes, self.location, self.pieces, self.cast_from)
        return StorageRecord, fields


@dataclass(frozen=True, slots=True)
class TensorRef:
    """A tensor as a window on a storage: no data, only geometry.

    Its element count, byte size, byte span and contiguity are computed once, when it
    is made: analysis, layout, writer and verification ask them of every tensor, several
    times, and a mixture-of-experts file has 100,000 tensors (slots, not a ``__dict__``:
    a quarter of the memory a tensor's description takes).

    Example:
        >>> TensorRef("0", BY_CODE["BF16"], 4, (2, 3), (3, 1)).span
        (8, 20)
    """

    storage: str
    dtype: DType
    offset: int  # in elements of ``dtype``
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    numel: int = field(init=False, repr=False, compare=False)
    nbytes: int = field(init=False, repr=False, compare=False)
    span: tuple[int, int] = field(init=False, repr=False, compare=False)  # byte range [start, end) it touches
    is_contiguous: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        size = self.dtype.itemsize
        count, reach, contiguous = window_geometry(self.shape, self.stride)
        start = self.offset * size
        setter = object.__setattr__  # frozen: the one way to fill the derived fields
        setter(self, "numel", count)
        setter(self, "nbytes", count * size)
        setter(self, "span", (start, start + reach * size))
        setter(self, "is_contiguous", contiguous)

    def __reduce__(self) -> tuple[type[TensorRef], tuple[str, DType, int, tuple[int, ...], tuple[int, ...]]]:
        # Explicit: frozen dataclasses with slots do not unpickle on Python 3.10.
        return TensorRef, (self.storage, self.dtype, self.offset, self.shape, self.stride)


@dataclass
class Checkpoint:
    """A parsed checkpoint: tensor names in file order, storages, what was skipped."""

    path: Path
    format: str  # "zip" or "legacy"
    tensors: dict[str, TensorRef]
    storages: dict[str, StorageRecord]
    skipped: list[str] = field(default_factory=list)  # "name: what it is" for entries not converted
    wrapper: str | None = None  # key path the weights were found under, if any
    stamps: dict[Path, tuple[int, ...]] = field(default_factory=dict)  # each file as it was read
    prefixes_removed: list[str] = field(default_factory=list)  # prefixes removed from the names, for the report
    globals: dict[str, str] = field(default_factory=dict)  # globals the file names -> group (inspect)
    notes: list[str] = field(default_factory=list)  # what the reader wants the user told (report warnings)

    def check_unchanged(self) -> None:
        """Raise if a file this checkpoint was read from has changed since (size, mtime, inode).

        Called before an output is renamed into place: bytes copied from a file being
        rewritten (a download still running, a training job saving) are not the
        checkpoint that was read and verified.

        Example:
            >>> read_checkpoint("pytorch_model.bin").check_unchanged()  # doctest: +SKIP
        """
        for path, stamp in self.stamps.items():
            check_unchanged(path, stamp)


def check_unchanged(path: Path, stamp: tuple[int, ...]) -> None:
    """Raise if ``path`` is no longer the file whose :func:`file_stamp` was ``stamp``."""
    try:
        now = file_stamp(os.stat(path))
    except OSError:
        now = ()
    if now != stamp:
        raise TiesafeError(
            "the file changed while it was being converted (size, modification time or inode differ); "
            "nothing was written: convert it again once it is complete",
            path=path,
        )


def file_stamp(st: os.stat_result) -> tuple[int, ...]:
    """What identifies a file's contents cheaply: size, modification time, inode, device."""
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
