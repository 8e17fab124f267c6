"""A checkpoint that is one flat state dict of unshared tensors, read as columns.

What ``save_pretrained`` shards and ``torch.save(model.state_dict())`` write for a model
without tied weights: a zip archive whose pickle is :mod:`.flat_state_dict`'s template, each
tensor a whole storage of its own. A mixture-of-experts shard is this shape with tens of
thousands of tensors, and there a descriptor object per tensor (storage record, tensor
reference, window, plan entry) costs more than copying its bytes. Read here, a tensor is
a row: its name, dtype, shape and where its bytes lie in the file.

:func:`read_flat_file` only accepts. Anything else — another container, another pickle
shape, shared storage, views, a name the general path would refuse or rename, any
error — answers ``None``, and the general path (:func:`.torchfile.read_checkpoint`) reads
the file with every check it has and gives its own verdict. The tests hold the two paths
to the same output, byte for byte.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from operator import lt
from pathlib import Path
from typing import BinaryIO

from ..descriptors import check_unchanged, file_stamp
from ..dtypes import DType
from ..errors import TiesafeError
from ..names import strip_prefixes, strips_nothing
from .containers import open_torch_zip_in_blocks
from .flat_state_dict import read_flat_columns
from .name_column import NameColumn
from .unpickler import UnpickleContext
from .zipdir import stream_data_starts

# Top-level names of files the general path refuses as training state (an optimizer's or
# RNG state_dict) when every value is a tensor: left to it, whatever their values.
_TRAINING_STATE_NAMES = frozenset({"state", "param_groups", "cpu", "python", "numpy", "param_shapes", "module"})


class NotFlat(Exception):
    """Raised while a file taken for flat is copied, when its local headers say otherwise
    (damaged, out of order, compressed): the caller discards what it wrote and reads the
    file by the general path, which gives its own verdict."""


@dataclass
class FlatFile:
    """A flat checkpoint's tensors as rows: ``names[i]`` is ``dtypes[i]`` of ``shapes[i]``,
    its ``nbytes[i]`` bytes at ``starts[i]`` of ``path``, names in the file's order.

    ``starts`` come from the storages' local headers, interleaved with the data through
    the file: read up front by :func:`read_flat_file`, or as the copy reaches each one
    (:meth:`stream_starts`), which reads the file once in order instead of twice.
    """

    path: Path
    names: Sequence[str]  # a NameColumn: 100,000 names in one buffer
    dtypes: list[DType]
    shapes: list[tuple[int, ...]]
    nbytes: list[int]
    keys: array[int]  # each tensor's storage number in the archive; empty unless asked for (keep_keys)
    locations: list[str]  # the device each was saved from: recorded, never needed
    stamp: tuple[int, ...]  # the file as it was read (see Checkpoint.check_unchanged)
    globals: dict[str, str]  # the globals the pickle names -> group (all tensor machinery)
    prefixes_removed: list[str]
    # Numbers per row as machine integers (8 bytes, not an int object each): 100,000 rows.
    header_offsets: array[int]  # where each storage's local header lies in the file
    stored_sizes: array[int]  # each storage member's size, as the zip directory records it
    starts: array[int] = field(default_factory=lambda: array("q"))  # where each tensor's bytes start; empty until read

    def __len__(self) -> int:
        return len(self.names)

    def check_unchanged(self) -> None:
        """Raise if the file is no longer the one that was read (size, mtime, inode)."""
        check_unchanged(self.path, self.stamp)

    def stream_starts(self, raw: BinaryIO, order: Sequence[int], *, read_ahead: bool = False) -> Iterator[int]:
        """Each row's data start, for the rows in ``order`` (ascending header offsets, in runs),
        read from its local header as it is reached; ``starts`` is filled once all are read.

        Raises :class:`~converter.errors.CorruptFileError` for a missing or compressed local
        header, or one whose data would run past the end of the file.

        Example:
            >>> with open(flat.path, "rb") as raw:  # doctest: +SKIP
            ...     next(flat.stream_starts(raw, [0]))
            1088
        """
        offsets, sizes, keys = self.header_offsets, self.stored_sizes, self.keys
        found = array("q", bytes(8 * len(self)))
        if order == range(len(self)):  # the rows' own order (as torch writes them): no copies
            in_order, sizes_in_order = offsets, sizes
        else:  # machine integers: lists of 100,000 offsets would be int objects, 7 MB
            in_order, sizes_in_order = (
                array("q", map(offsets.__getitem__, order)),
                array("q", map(sizes.__getitem__, order)),
            )

        def name_of(k: int) -> str:
            return str(keys[order[k]]) if keys else f"at byte {in_order[k]}"

        headers = stream_data_starts(raw, in_order, sizes_in_order, self.stamp[0], name_of, read_ahead=read_ahead)
        for row, start in zip(order, headers, strict=True):
            found[row] = start
            yield start
        self.starts = found

    def read_starts(self, raw: BinaryIO) -> None:
        """Read every row's data start now, in file order (:meth:`stream_starts` to the end).

        Example:
            >>> with open(flat.path, "rb") as raw:  # doctest: +SKIP
            ...     flat.read_starts(raw)
        """
        for _ in self.stream_starts(raw, file_order(self.header_offsets), read_ahead=True):
            pass


def file_order(offsets: array[int]) -> Sequence[int]:
    """Row numbers in the order of ``offsets``: ``range`` when they ascend already (torch writes
    storages in the order it pickles them), else machine integers, not a list of int objects.

    Example:
        >>> file_order(array("q", [10, 30, 20]))
        array('q', [0, 2, 1])
    """
    if all(map(lt, offsets, islice(offsets, 1, None))):
        return range(len(offsets))
    return array("q", sorted(range(len(offsets)), key=offsets.__getitem__))


def read_flat_file(
    path: str | Path,
    *,
    strip_prefix: Sequence[str] = (),
    keep_names: bool = False,
    read_starts: bool = True,
    keep_keys: bool = False,
) -> FlatFile | None:
    """``path`` as rows if it is a flat checkpoint of unshared tensors, else ``None``.

    Names lose a ``_orig_mod.``/``module.`` prefix as :func:`.torchfile.read_checkpoint`
    removes it (``keep_names`` keeps it) and any ``strip_prefix``. Without ``read_starts``
    the local headers are left for the copy to read (:meth:`FlatFile.stream_starts`),
    and a problem in one is met there, as :class:`NotFlat`. The storage keys are kept only
    with ``keep_keys`` (a folder's general plan names storages by them): 6 MB at 100,000
    tensors that nothing else needs once each storage's member is found.

    Example:
        >>> flat = read_flat_file("pytorch_model-00001-of-00163.bin")  # doctest: +SKIP
        >>> len(flat), flat.names[0]
        (46848, 'model.layers.0.mlp.experts.0.gate_proj.weight')
    """
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            stamp = file_stamp(os.fstat(raw.fileno()))
            file_size = stamp[0]
            if raw.read(2) != b"PK":
                return None
            pickle, table = open_torch_zip_in_blocks(raw, file_size)
            context = UnpickleContext()
            columns = read_flat_columns(pickle, context)
            del pickle  # each structure goes once read: peak memory, at 100,000 tensors
            if columns is None or not columns.names or any(n in columns.names for n in _TRAINING_STATE_NAMES):
                return None
            names = columns.names
            if names.has_lone_surrogates() or "__metadata__" in names:
                return None  # not UTF-8 proper, or the name safetensors reserves: the general path names it
            nbytes = columns.nbytes
            if not any(nbytes):
                return None  # only empty tensors: a placeholder file, which the general path refuses
            stored = table.stored(columns.keys, nbytes)
            del table
            if stored is None or not columns.names_distinct():  # a name set twice (told once the table is gone)
                return None
            header_offsets, stored_sizes = stored
            del stored
            if not keep_keys:
                del columns.keys[:]
            flat = FlatFile(
                path,
                columns.names,
                columns.dtypes,
                columns.shapes,
                nbytes,
                columns.keys,
                columns.locations,
                stamp,
                dict(context.globals_seen),
                [],
                header_offsets,
                stored_sizes,
            )
            if read_starts:
                flat.read_starts(raw)
        if strips_nothing(names, strip_prefix, auto=not keep_names):
            return flat
        renamed, flat.prefixes_removed = strip_prefixes(names, strip_prefix, auto=not keep_names)
        if flat.prefixes_removed:
            flat.names = NameColumn(renamed[name] for name in names)
    except (TiesafeError, OSError):
        return None
    return flat
