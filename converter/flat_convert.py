"""Convert and verify a flat checkpoint of unshared tensors (:mod:`.readers.flat_file`) as columns.

Such a file has nothing to deduplicate and no tie to record: its output is every tensor's
bytes in the order they lie in the source, under the header :func:`.layout.plan_file`
would write. At mixture-of-experts scale (tens of thousands of tensors of a few KiB) the
general pipeline's objects per tensor (sharing plan, windows, pairs) cost more than the
bytes; here a tensor is an index into lists, copied and compared in batches of many.
The result is the same file the general path writes, byte for byte (the tests hold the
two to it). It is verified before it is renamed into place: its header read back one
entry at a time by json's scanner, each entry held to the planned one, and every
tensor's bytes compared bit for bit with the source (:func:`verify_written`);
``tiesafe verify`` of any output reads it with :func:`.stfile.read_safetensors` instead
(:func:`verify_flat`).
"""

from __future__ import annotations

import contextlib
import os
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from . import ties
from .errors import CorruptFileError, TiesafeError, VerificationError
from .jsonstream import header_text, members
from .layout import FORMAT_METADATA, header_pieces
from .readahead import READ_AHEAD_FROM, ReadAhead
from .readers.flat_file import FlatFile, NotFlat, file_order
from .readers.name_column import names_in_order
from .stfile import SafetensorsFile
from .windows import Range, WindowComparer
from .writer import StagedWrites, copy_ranges


class FlatPlan:
    """Where each row of a flat file goes, as :func:`.layout.plan_file` would lay it out:
    ``order`` (row indices in output order), ``data_size`` and the header's entries
    (:meth:`header_pieces`), written as they are made; ``header_size`` once written.

    Example:
        >>> plan = FlatPlan(read_flat_file("pytorch_model.bin"), None)  # doctest: +SKIP
        >>> plan.data_size, list(plan.order[:3])
        (101056512, [0, 1, 2])
    """

    def __init__(self, flat: FlatFile, metadata: dict[str, str] | None) -> None:
        # plan_file's order: element size (largest first), then where the bytes lie in the source,
        # here where each storage's local header lies: the same order, as the copy checks
        # (_source_ranges) when it reads each header. (Stable sorts: rows with equal keys keep
        # their order, as plan_file's index tiebreak does.) Kept as a range or machine integers:
        # a list of 100,000 row numbers would be 3.6 MB of int objects.
        offsets, count = flat.header_offsets, len(flat)
        self.order: Sequence[int]
        if flat.dtypes.count(flat.dtypes[0]) == count:  # one dtype, the common case: no key tuple per row
            self.order = file_order(offsets)
        else:
            itemsizes = [dtype.itemsize for dtype in flat.dtypes]
            self.order = array("q", sorted(range(count), key=lambda i: (-itemsizes[i], offsets[i])))
        self.data_size = sum(flat.nbytes)
        self.metadata = {**(metadata or {}), **FORMAT_METADATA, **ties.encode(ties.TieRecord())}
        self.header_size = 0  # the length prefix, the JSON and its padding: known once written
        self._flat = flat

    @property
    def file_size(self) -> int:
        return self.header_size + self.data_size

    def header_pieces(self) -> Iterator[bytes]:
        """The header's JSON in pieces, made as the writer takes them (11 MB at 100,000 tensors, never whole)."""
        return header_pieces(self._rows(), self.metadata)

    def _rows(self) -> Iterator[tuple[str, str, tuple[int, ...], int, int, None]]:
        """Each row's header entry in output order, made as the header takes it (no list of them)."""
        flat = self._flat
        dtypes, shapes, nbytes = flat.dtypes, flat.shapes, flat.nbytes
        position = 0
        for i, name in zip(self.order, names_in_order(flat.names, self.order), strict=True):
            end = position + nbytes[i]
            yield name, dtypes[i].code, shapes[i], position, end, None
            position = end


def write_flat(flat: FlatFile, plan: FlatPlan, dst: Path, *, verify: bool) -> None:
    """Write ``plan`` to ``dst`` atomically; with ``verify``, read it back and compare it first.

    Raises :class:`~converter.errors.VerificationError` (nothing left behind) on a difference,
    the reader's error if the source changed meanwhile, and :class:`.readers.flat_file.NotFlat`
    (nothing left behind) if a local header read during the copy says the file is not flat.

    Example:
        >>> flat = read_flat_file("pytorch_model.bin")  # doctest: +SKIP
        >>> write_flat(flat, FlatPlan(flat, None), Path("model.safetensors"), verify=True)  # doctest: +SKIP
    """
    with StagedWrites() as staged:
        stage_flat(staged, flat, plan, dst, verify=verify)


def stage_flat(staged: StagedWrites, flat: FlatFile, plan: FlatPlan, dst: Path, *, verify: bool) -> None:
    """:func:`write_flat` into ``staged``: ``dst`` appears when ``staged`` commits, with the rest.

    Example:
        >>> with StagedWrites() as staged:  # doctest: +SKIP
        ...     stage_flat(staged, flat, FlatPlan(flat, None), Path("out/model.safetensors"), verify=True)
    """
    fd, tmp, header_size = staged.start_streamed(dst, plan.header_pieces(), plan.data_size)
    plan.header_size = header_size
    with open(flat.path, "rb") as src, contextlib.ExitStack() as stack:
        ranges = _source_ranges(flat, plan, src)
        if len(flat) >= READ_AHEAD_FROM:  # thousands of small copies: the disk reads ahead meanwhile
            ranges = stack.enter_context(ReadAhead(src.fileno(), 0, flat.stamp[0])).follow(ranges)
        _copy_ranges(src.fileno(), fd, ranges, header_size)
    staged.sync_later(fd)  # the disk flushes while the output is read back
    if verify:
        try:
            verify_written(flat, plan, tmp)
        except TiesafeError as exc:  # named by the output's final name, not the temporary one
            raise type(exc)(exc.problem, path=dst) from None
    flat.check_unchanged()  # the bytes just verified are those of the file that was read


def _source_ranges(flat: FlatFile, plan: FlatPlan, src: BinaryIO) -> Iterator[Range]:
    """Each row's source range in output order, its local header read as the copy reaches it.

    Raises NotFlat if a header is damaged, or if the bytes do not lie in the order of their
    headers, one after the other: the plan's order would not be the general path's.
    """
    nbytes, offsets = flat.nbytes, flat.header_offsets
    last_offset = last_end = 0
    try:
        for row, start in zip(plan.order, flat.stream_starts(src, plan.order), strict=True):
            offset = offsets[row]
            if offset < last_offset:  # the next run of the order (another element size)
                last_end = 0
            if start < last_end:
                raise NotFlat(f"{flat.path}: storages overlap or lie out of order")
            last_offset, last_end = offset, start + nbytes[row]
            yield start, nbytes[row]
    except CorruptFileError as exc:
        raise NotFlat(str(exc)) from None


def _copy_ranges(src: int, dst: int, ranges: Iterable[Range], position: int) -> None:
    """Copy source ``ranges`` back to back into ``dst`` from ``position`` (the writer's :func:`.writer.copy_ranges`)."""
    for _ in copy_ranges(src, dst, ranges, position):
        pass


def verify_flat(flat: FlatFile, out: SafetensorsFile) -> int:
    """Check that ``out`` gives every tensor of ``flat``, bit for bit, and nothing else; the bytes compared.

    The output is taken as read back by :func:`.stfile.read_safetensors` (validated, as a
    loader reads it): each name's dtype and shape are compared, then its bytes. The source
    of a run of tensors is read as one range, not as the copy gathered it, so that a slip in
    either way of reading cannot hide itself.

    Example:
        >>> verify_flat(read_flat_file("pytorch_model.bin"), read_safetensors("model.safetensors"))  # doctest: +SKIP
        216006656
    """
    where = out.path
    record = out.record
    if record.aliases or record.views or record.copies:
        raise VerificationError("the tie record read back differs from the one planned", path=where)
    entries = out.entries
    hidden = set(record.hidden)
    if len(entries) - len(hidden & entries.keys()) != len(flat):
        extra = sorted(entries.keys() - hidden - set(flat.names))
        if extra:
            raise VerificationError(f"output has a tensor the source lacks: {extra[0]!r}", path=where)
    pairs: list[tuple[int, int, int]] = []  # (output offset, row, size): compared in output order
    for i, (name, dtype, shape) in enumerate(zip(flat.names, flat.dtypes, flat.shapes, strict=True)):
        entry = entries.get(name)
        if entry is None or name in hidden:
            raise VerificationError(f"tensor {name!r} is missing from the output", path=where)
        if (entry.dtype is not dtype and entry.dtype != dtype) or entry.shape != shape:
            raise VerificationError(
                f"tensor {name!r} is {entry.dtype.code}{list(entry.shape)} in the output "
                f"but {dtype.code}{list(shape)} in the source",
                path=where,
            )
        pairs.append((entry.start, i, entry.nbytes))
    pairs.sort()
    different = _first_difference(flat, out.path, pairs)
    if different is not None:
        raise VerificationError(f"tensor {flat.names[different]!r} differs from the source", path=where)
    return 2 * sum(flat.nbytes)


def verify_written(flat: FlatFile, plan: FlatPlan, path: Path) -> int:
    """Check the file just written from ``plan``: its header read back says what the plan says,
    entry by entry, and every tensor's bytes equal the source's; the bytes compared.

    As :func:`verify_flat`, but the header is parsed one entry at a time by json's own
    scanners (:func:`.jsonstream.members`) and each entry is compared with the one planned: a header of
    100,000 entries is never held as 100,000 dicts at once (json.loads would take about
    0.6 KiB a tensor), and an entry that is not exactly the planned one (name, dtype, shape,
    offsets, in order) is an error.

    Example:
        >>> verify_written(flat, plan, Path(".model.safetensors.x1y2z3w4.tiesafe-tmp"))  # doctest: +SKIP
        216006656
    """
    try:
        with open(path, "rb") as f:
            data_start = _read_planned_header(flat, plan, f)
    except _NotAsPlanned as exc:
        raise VerificationError(str(exc), path=path) from None
    except OSError as exc:
        raise VerificationError(f"cannot read the output back ({exc.strerror or exc})", path=path) from None
    except (ValueError, StopIteration):
        raise VerificationError("the header read back is not the JSON object written", path=path) from None
    return _compare_planned(flat, plan, path, data_start)


def verify_as_planned(flat: FlatFile, path: Path) -> int | None:
    """``tiesafe verify`` of an output laid out as tiesafe lays out ``flat``: its header checked
    entry by entry as it is read (as :func:`verify_written` does), then every tensor's bytes;
    the bytes compared. ``None`` when the header is not that layout (another writer's order,
    other metadata, not JSON): the caller reads the output whole (:func:`verify_flat`),
    whose verdict stands. Memory stays that of the rows, where reading the header whole
    takes about 0.6 KiB a tensor.

    Example:
        >>> verify_as_planned(read_flat_file("pytorch_model.bin"), Path("model.safetensors"))  # doctest: +SKIP
        216006656
    """
    plan = FlatPlan(flat, None)
    try:
        with open(path, "rb") as f:
            data_start = _read_planned_header(flat, plan, f)
    except (_NotAsPlanned, OSError, ValueError, StopIteration):
        return None
    plan.header_size = data_start
    return _compare_planned(flat, plan, path, data_start)


class _NotAsPlanned(Exception):
    """The header read is not the one planned; the message says how."""


def _read_planned_header(flat: FlatFile, plan: FlatPlan, f: BinaryIO) -> int:
    """Read the header of ``f`` (at its start) and hold it to ``plan``, entry by entry; where the data start.

    Raises :class:`_NotAsPlanned` for a difference; ValueError or StopIteration for a header
    that is not one JSON object; OSError from reading.
    """
    names, dtypes, shapes, nbytes = flat.names, flat.dtypes, flat.shapes, flat.nbytes
    size = os.fstat(f.fileno()).st_size
    length = int.from_bytes(f.read(8), "little")
    data_start = 8 + length
    if size != data_start + plan.data_size or (plan.header_size and data_start != plan.header_size):
        raise _NotAsPlanned("the output's size or header length differs from the one planned")
    read = members(header_text(f, length))
    if next(read) != ("__metadata__", plan.metadata):
        raise _NotAsPlanned("the metadata read back differs from the one planned")
    position, order, planned_names = 0, iter(plan.order), names_in_order(names, plan.order)
    for name, spec in read:
        row = next(order, None)
        if row is None:
            raise _NotAsPlanned(f"output has a tensor the source lacks: {name!r}")
        end = position + nbytes[row]
        planned = {"dtype": dtypes[row].code, "shape": list(shapes[row]), "data_offsets": [position, end]}
        if name != next(planned_names) or spec != planned:
            raise _NotAsPlanned(f"tensor {names[row]!r} is not described as planned in the output")
        position = end
    missing = next(order, None)
    if missing is not None:
        raise _NotAsPlanned(f"tensor {names[missing]!r} is missing from the output")
    return data_start


def _compare_planned(flat: FlatFile, plan: FlatPlan, path: Path, data_start: int) -> int:
    """Compare every row's bytes where ``plan`` placed them in ``path`` with the source's; the bytes compared."""
    # Each row where the header just read says it lies: the planned places, made as compared (no list).
    different = _first_difference(flat, path, _planned_places(plan, flat.nbytes, data_start))
    if different is not None:
        raise VerificationError(f"tensor {flat.names[different]!r} differs from the source", path=path)
    return 2 * sum(flat.nbytes)


def _planned_places(plan: FlatPlan, nbytes: list[int], data_start: int) -> Iterator[tuple[int, int, int]]:
    """(output offset, row, size) of every row, in output order, as ``plan`` lays them out."""
    position = data_start
    for row in plan.order:
        yield position, row, nbytes[row]
        position += nbytes[row]


def _first_difference(flat: FlatFile, out_path: Path, pairs: Iterable[tuple[int, int, int]]) -> int | None:
    """The first row whose output bytes differ from the source's, in output order, else None.

    ``pairs`` are (output offset, row, size); the comparer reads the source span of a run
    of them as one range, not as the copy gathered it.
    """
    starts = flat.starts
    comparer = WindowComparer()
    try:
        return comparer.first_difference_in(
            out_path, flat.path, ((row, (offset, size), (starts[row], size)) for offset, row, size in pairs)
        )
    finally:
        comparer.close()
