"""Tensors as windows on files: one byte range, or strided elements to gather; and compared.

The writer copies a window's bytes from a source checkpoint; verification
compares a window of the output with one of the source. A contiguous window is
one byte range and never needs torch. A transposed or strided one is gathered,
one tensor at a time, with ``as_strided(...).contiguous()`` -- the only place on
the conversion path that needs torch, imported lazily so that checkpoints
without such tensors convert without paying for it.
"""

from __future__ import annotations

import heapq
import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from .descriptors import Piece as FilePiece
from .descriptors import StorageRecord, TensorRef
from .errors import CorruptFileError, quoted
from .geometry import numel

# Element sizes to an integer dtype of the same width: moving bytes never needs
# the real dtype (float8, bool, ... all travel as raw integers).
_RAW_DTYPE_NAMES = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}
_BLOCK = 2 * 1024 * 1024  # per read when comparing; see WindowComparer
# Small ranges move in batches: many storages read with one preadv, then written or
# compared at once. A mixture-of-experts file holds tens of thousands of 2-64 KiB
# tensors, and one system call (plus Python around it) per tensor costs more than
# their bytes. Copies: below SMALL_RANGE through a buffer, from it one copy_file_range
# each (no user-space copy; a reflink where the file system can). Measured here by
# whole conversions (convert_file, verified, lowest of 2-3, page cache warm), buffer
# against kernel: over 96 MB of tensors the buffer is a little cheaper at every size
# (4 KiB 0.67 vs 0.74 s, 16 KiB 0.23 vs 0.26 s, 64 KiB 0.12 vs 0.13 s); over 768 MB
# the kernel's copy is far cheaper from 16 KiB on (8 KiB 2.78 vs 2.67 s, 16 KiB 2.85
# vs 2.04 s, 32 KiB 1.51 vs 1.23 s, 64 KiB 1.7 vs 0.95 s, 128 KiB 0.96 vs 0.90 s), the
# buffer's second copy of every byte costing more than a call per range. Comparisons
# always read through a buffer: any range that fits one joins a batch (SMALL_COMPARE).
SMALL_RANGE = 16 * 1024
BATCH_BYTES = _BLOCK  # at most this much tensor data per batch (one buffer)
SMALL_COMPARE = BATCH_BYTES
SMALL_GAP = 64 * 1024  # bytes between two ranges of a batch (zip headers, storage tails) read and dropped
_MAX_PIECES = 500  # ranges per batch: with the gaps between them, below Linux's IOV_MAX (1024)


Range = tuple[int, int]  # (file offset, length): a plain tuple, one per window


class Piece(NamedTuple):
    """``nbytes`` at ``offset`` of one file (what ``read_pieces`` reads back to back); a :data:`Range`."""

    offset: int
    nbytes: int


class FileWindow:
    """A tensor in a file: its storage starts at byte ``storage_offset`` of ``path``.

    Treated as immutable. A slotted class rather than a frozen dataclass, which takes three
    times as long to build: the writer and verification build one or two per tensor, and a
    mixture-of-experts file holds tens of thousands. ``contiguous_range`` is computed once,
    here: the layout, the writer, verification and the identical-bytes search all ask it.

    Example:
        >>> FileWindow(Path("pytorch_model.bin"), 1024, ref).contiguous_range  # doctest: +SKIP
        (1024, 4096)
    """

    __slots__ = ("contiguous_range", "path", "ref", "storage_offset")
    path: Path
    storage_offset: int
    ref: TensorRef
    contiguous_range: Range | None  # (file offset, length) when the bytes are one range, else None

    def __init__(self, path: Path, storage_offset: int, ref: TensorRef) -> None:
        self.path = path
        self.storage_offset = storage_offset
        self.ref = ref
        self.contiguous_range = (
            (storage_offset + ref.offset * ref.dtype.itemsize, ref.nbytes) if ref.is_contiguous else None
        )

    def _key(self) -> tuple[Path, int, TensorRef]:
        return self.path, self.storage_offset, self.ref

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FileWindow) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"FileWindow(path={self.path!r}, storage_offset={self.storage_offset!r}, ref={self.ref!r})"

    def __reduce__(self) -> tuple[type[FileWindow], tuple[Path, int, TensorRef]]:
        return FileWindow, self._key()


@dataclass(frozen=True)
class PieceWindow:
    """A tensor on a storage made of pieces of files (a training run), perhaps cast on the way.

    The readers build these tensors contiguous (a ZeRO parameter, a DCP tensor
    assembled from its chunks), so the tensor's bytes are one span of the storage:
    :meth:`runs` gives the file ranges that make it up, in order, and :meth:`blocks`
    its bytes (converted to ``ref.dtype`` when the storage is cast).
    """

    record: StorageRecord
    ref: TensorRef

    @property
    def disk_itemsize(self) -> int:
        return (self.record.cast_from or self.ref.dtype).itemsize

    def runs(self) -> Iterator[tuple[Path, int, int]]:
        """``(path, file offset, length)`` of the tensor's bytes as they lie in the files, in order.

        Raises :class:`CorruptFileError` where the pieces leave a gap or overlap.
        """
        if not self.ref.is_contiguous:  # readers of runs never build one; refuse rather than guess
            raise CorruptFileError(f"tensor on storage {quoted(self.record.key)} is not contiguous")
        size = self.disk_itemsize
        if self.ref.numel == 0:
            return
        start = self.ref.offset * size
        end = start + self.ref.numel * size
        position = start
        pieces = self.record.pieces or (FilePiece(self.record.path, self.record.offset, self.record.nbytes, 0),)
        wanted = [p for p in pieces if p.at < end and p.at + _piece_extent(p) > start]
        for at, offset, length, path in heapq.merge(*(_located_runs(p) for p in wanted)):
            if at + length <= start:
                continue  # before the tensor (its storage holds other tensors too)
            if at > position or (at < position and position > start):
                problem = "leave a gap" if at > position else "overlap"
                raise CorruptFileError(f"the pieces of storage {quoted(self.record.key)} {problem} at byte {position}")
            skip = position - at
            take = min(length - skip, end - position)
            yield path, offset + skip, take
            position += take
            if position >= end:
                return
        if position < end:
            raise CorruptFileError(f"storage {quoted(self.record.key)} has no bytes for byte {position}")

    def blocks(self, block: int = 8 * 1024 * 1024) -> Iterator[bytes]:
        """The tensor's row-major bytes in ``ref.dtype``, at most ``block`` source bytes at a time."""
        from .cast import cast_bytes

        fds: dict[Path, int] = {}
        buffer = bytearray(block - block % self.disk_itemsize)
        view = memoryview(buffer)
        filled = 0
        try:
            for path, offset, length in self.runs():
                if path not in fds:
                    fds[path] = os.open(path, os.O_RDONLY)
                while length:
                    take = min(length, len(buffer) - filled)
                    read_into(fds[path], view[filled : filled + take], offset)
                    filled, offset, length = filled + take, offset + take, length - take
                    if filled == len(buffer):
                        yield self._converted(view[:filled], cast_bytes)
                        filled = 0
            if filled:
                yield self._converted(view[:filled], cast_bytes)
        finally:
            for fd in fds.values():
                os.close(fd)

    def _converted(self, data: memoryview, cast_bytes: Callable[..., bytes]) -> bytes:
        if self.record.cast_from is None:
            return bytes(data)
        return cast_bytes(data, self.record.cast_from, self.ref.dtype)


def _piece_extent(piece: FilePiece) -> int:
    """Storage bytes from a piece's first byte to its last one, gaps between its blocks included."""
    return piece.length + sum((count - 1) * step for count, step in piece.grid)


def _located_runs(piece: FilePiece) -> Iterator[tuple[int, int, int, Path]]:
    for at, offset, length in piece.runs():
        yield at, offset, length, piece.path


def source_window(record: StorageRecord, ref: TensorRef) -> FileWindow | PieceWindow:
    """Where the bytes of ``ref`` lie: a window on one file, or on pieces of several.

    Example:
        >>> source_window(ckpt.storages[ref.storage], ref)  # doctest: +SKIP
        FileWindow(path=PosixPath('pytorch_model.bin'), storage_offset=1024, ref=...)
    """
    if record.pieces or record.cast_from is not None:
        return PieceWindow(record, ref)
    return FileWindow(record.path, record.offset, ref)


def same_bytes(a: FileWindow | PieceWindow, b: FileWindow | PieceWindow) -> bool:
    """Whether two contiguous windows give the same bytes, streamed block by block (False if a file ends early).

    Example:
        >>> same_bytes(source_window(rec, embed), source_window(rec2, head))  # doctest: +SKIP
        True
    """
    if a.ref.dtype != b.ref.dtype or a.ref.shape != b.ref.shape:
        return False
    first, second = _as_pieces(a), _as_pieces(b)
    # Blocks of equal source bytes give equal output blocks (a cast keeps the element count).
    elements = _BLOCK // max(first.disk_itemsize, second.disk_itemsize)
    try:
        blocks = zip(
            first.blocks(elements * first.disk_itemsize), second.blocks(elements * second.disk_itemsize), strict=True
        )
        return all(x == y for x, y in blocks)
    except (ValueError, EOFError):
        return False


def _as_pieces(window: FileWindow | PieceWindow) -> PieceWindow:
    if isinstance(window, PieceWindow):
        return window
    stop = window.ref.span[1]
    record = StorageRecord("", window.path, 0, stop, "", (FilePiece(window.path, window.storage_offset, stop, 0),))
    return PieceWindow(record, window.ref)


def read_exact(fd: int, offset: int, nbytes: int) -> bytes:
    """``os.pread`` until ``nbytes`` bytes are read (short reads happen on big ranges)."""
    parts = []
    while nbytes > 0:
        chunk = os.pread(fd, min(nbytes, 1 << 30), offset)
        if not chunk:
            raise OSError(f"unexpected end of file at byte {offset}")
        parts.append(chunk)
        offset += len(chunk)
        nbytes -= len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def read_into(fd: int, buffer: memoryview, offset: int) -> None:
    """Fill ``buffer`` from ``fd`` at ``offset`` with ``os.preadv`` (no allocation; short reads retried).

    Raises EOFError when the file ends first.
    """
    filled, size = 0, len(buffer)
    while filled < size:
        got = os.preadv(fd, [buffer[filled:]], offset + filled)
        if not got:
            raise EOFError(f"unexpected end of file at byte {offset + filled}")
        filled += got


# Above this many rows (after merging dimensions) numpy's import (~0.1 s) pays for itself.
_PYTHON_GATHER_ROWS = 4096


def gather(fd: int, storage_offset: int, ref: TensorRef) -> memoryview:
    """The row-major bytes of the tensor ``ref`` whose storage starts at ``storage_offset``."""
    start, stop = ref.span
    if ref.numel == 0:
        return memoryview(b"")
    raw = read_exact(fd, storage_offset + start, stop - start)
    itemsize = ref.dtype.itemsize
    shape, stride = merged_dims(ref.shape, ref.stride)
    offset = ref.offset - start // itemsize
    if numel(shape[:-1]) <= _PYTHON_GATHER_ROWS:
        return memoryview(_gather_rows(raw, itemsize, offset, shape, stride))
    import numpy as np  # lazily: only tensors with many strided rows need it

    flat = np.frombuffer(raw, dtype=_RAW_DTYPE_NAMES[itemsize])[offset:]
    strides = tuple(step * itemsize for step in stride)
    window = np.lib.stride_tricks.as_strided(flat, shape=shape, strides=strides, writeable=False)
    dense: Any = np.ascontiguousarray(window).reshape(-1).view(np.uint8)
    return memoryview(dense)


def merged_dims(shape: tuple[int, ...], stride: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The same window with size-1 dimensions dropped and row-major-adjacent ones merged.

    Example:
        >>> merged_dims((4, 1, 3, 2), (6, 99, 2, 1))  # a contiguous (4, 3, 2) block
        ((24,), (1,))
        >>> merged_dims((3, 4), (1, 3))  # a transpose stays two rows of strided elements
        ((3, 4), (1, 3))
    """
    dims = [(n, s) for n, s in zip(shape, stride, strict=True) if n != 1] or [(1, 1)]
    merged = [dims[-1]]
    for n, s in reversed(dims[:-1]):
        inner_n, inner_s = merged[0]
        if s == inner_n * inner_s:
            merged[0] = (n * inner_n, inner_s)
        else:
            merged.insert(0, (n, s))
    return tuple(n for n, _ in merged), tuple(s for _, s in merged)


def _gather_rows(raw: bytes, itemsize: int, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]) -> bytearray:
    """Row by row: a contiguous row is one slice, a strided one a slice per byte of an element."""
    row_len, row_step = shape[-1], stride[-1]
    row_bytes = row_len * itemsize
    out = bytearray(numel(shape) * itemsize)
    pos = 0
    for index in itertools.product(*(range(n) for n in shape[:-1])):
        base = (offset + sum(i * s for i, s in zip(index, stride, strict=False))) * itemsize
        if row_step == 1:
            out[pos : pos + row_bytes] = raw[base : base + row_bytes]
        elif row_step == 0:  # an expanded (broadcast) row: one element repeated
            out[pos : pos + row_bytes] = raw[base : base + itemsize] * row_len
        else:
            jump = row_step * itemsize
            end = base + (row_len - 1) * jump + 1
            for byte in range(itemsize):
                out[pos + byte : pos + row_bytes : itemsize] = raw[base + byte : end + byte : jump]
        pos += row_bytes
    return out


def batchable(window: FileWindow, limit: int | None = None) -> Range | None:
    """The window's byte range when it is shorter than ``limit`` (SMALL_RANGE), else None."""
    span = window.contiguous_range
    if span is None or span[1] >= (SMALL_RANGE if limit is None else limit):
        return None
    return span


def extends(last: Range, count: int, total: int, piece: Range, gap_limit: int = SMALL_GAP) -> bool:
    """Whether ``piece`` can join a batch of ``count`` pieces and ``total`` bytes ending with ``last``."""
    gap = piece[0] - last[0] - last[1]
    return 0 <= gap <= gap_limit and count < _MAX_PIECES and total + piece[1] <= BATCH_BYTES


def read_pieces(fd: int, pieces: Sequence[Range], buffer: bytearray, scratch: bytearray) -> int:
    """Read ``pieces`` (increasing, close together) back to back into ``buffer``; return their size.

    One ``preadv`` reads the whole span: the pieces land in ``buffer`` (neighbours that
    touch as one vector), the bytes between them in ``scratch``, which is overwritten.
    Pieces further apart than ``scratch`` holds (or out of order) start another
    ``preadv``. Raises EOFError when the file ends first.
    """
    view, junk = memoryview(buffer), memoryview(scratch)
    vectors: list[memoryview] = []
    first = position = pieces[0][0]
    start = filled = 0  # the vector being extended is buffer[start:filled]
    complete = True
    for offset, nbytes in pieces:
        if offset != position:
            vectors.append(view[start:filled])
            start = filled
            if 0 < offset - position <= len(junk):
                vectors.append(junk[: offset - position])
            else:  # far apart: read what is gathered, and go on from ``offset``
                complete = complete and os.preadv(fd, vectors, first) == position - first
                vectors, first = [], offset
        filled += nbytes
        position = offset + nbytes
    vectors.append(view[start:filled])
    if not (complete and os.preadv(fd, vectors, first) == position - first):
        filled = 0  # a short read (a signal, or the end of the file): piece by piece, retrying
        for offset, nbytes in pieces:
            read_into(fd, view[filled : filled + nbytes], offset)
            filled += nbytes
    return filled


def read_span(fd: int, start: int, stop: int, buffer: bytearray) -> memoryview:
    """Bytes ``[start, stop)`` of ``fd`` in the head of ``buffer`` (one ``preadv``); EOFError if the file ends first."""
    view = memoryview(buffer)[: stop - start]
    read_into(fd, view, start)
    return view


_Pair = tuple[str, FileWindow, "FileWindow | PieceWindow"]
K = TypeVar("K")  # what names a compared tensor: a name, or a row of a flat file
# A tensor to compare: its key, the output file and range, the source file and range (None
# where the bytes are not one range), and its windows (None when it has only ranges).
_Item = tuple[K, Path, "Range | None", Path, "Range | None", "tuple[FileWindow, FileWindow | PieceWindow] | None"]


class WindowComparer:
    """Compares windows byte for byte, skipping ranges already proven equal.

    Verification compares each output window with its source; folder conversion
    compares candidate tensors with each other (equal bytes, no hash needed).

    Contiguous windows are read with ``preadv`` into two small reusable buffers
    and compared with ``memcmp`` (``bytearray.startswith``): no allocation per
    block and no page faults, so a block costs two copies out of the page cache
    and one compare. Blocks of a few MiB stay in the CPU cache between the read
    and the compare (measured: about 8 GB/s of tensor here, against about
    1 GB/s for a fresh ``pread`` of 16 MiB per block).
    """

    def __init__(self, wait: Callable[[Path, int], None] | None = None) -> None:
        """``wait(path, end)`` blocks until bytes ``[0, end)`` of the first window's file exist."""
        self._wait = wait
        self._fds: dict[Path, int] = {}
        # (output fd, source fd, output start - source start) -> [(output start, length)]
        self._proven: dict[tuple[int, int, int], list[tuple[int, int]]] = {}
        self._out = bytearray(_BLOCK)
        self._src = bytearray(_BLOCK)
        self._gaps = bytearray(SMALL_GAP)
        self.bytes_compared = 0

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def equal(self, out: FileWindow, src: FileWindow | PieceWindow) -> bool:
        """Whether the two windows hold the same bytes (False if a file ends early).

        Example:
            >>> with contextlib.closing(WindowComparer()) as comparer:  # doctest: +SKIP
            ...     comparer.equal(output_window, source_window)
            True
        """
        if self._wait is not None:
            self._wait(out.path, out.storage_offset + out.ref.span[1])
        if isinstance(src, PieceWindow):
            return self._equal_pieces(out, src)
        out_range, src_range = out.contiguous_range, src.contiguous_range
        if out_range is None or src_range is None:
            self.bytes_compared += 2 * src.ref.nbytes
            out_bytes = gather(self._fd(out.path), out.storage_offset, out.ref)
            src_bytes = gather(self._fd(src.path), src.storage_offset, src.ref)
            return len(out_bytes) == len(src_bytes) and bytearray(out_bytes) == src_bytes
        (o, n), (s, _) = out_range, src_range
        fo, fs = self._fd(out.path), self._fd(src.path)
        proven = self._proven.setdefault((fo, fs, o - s), [])
        if any(start <= o and o + n <= start + length for start, length in proven):
            return True
        if not self._equal_range(fo, o, fs, s, n):
            return False
        proven.append((o, n))
        return True

    def _equal_range(self, fo: int, o: int, fs: int, s: int, n: int) -> bool:
        """Whether ``n`` bytes at ``o`` of ``fo`` equal those at ``s`` of ``fs``, block by block."""
        out_view, src_view = memoryview(self._out), memoryview(self._src)
        done = 0
        while done < n:
            size = min(_BLOCK, n - done)
            try:
                read_into(fo, out_view[:size], o + done)
                read_into(fs, src_view[:size], s + done)
            except EOFError:  # a file shorter than its header says: not equal
                return False
            if not self._out.startswith(src_view[:size]):  # memcmp of the first ``size`` bytes
                return False
            done += size
        self.bytes_compared += 2 * n
        return True

    def first_difference(self, pairs: Iterable[_Pair]) -> str | None:
        """The first name whose output window (first) differs from its source window, else None.

        Runs of small windows that lie close together in both files are read with one
        ``preadv`` per file (the output's run and the source's span, the bytes between its
        tensors included) and compared tensor by tensor with ``memcmp``. The source is read
        as one range here, not gathered as the writer gathers it, so that a slip in either
        way of reading cannot hide itself.

        Example:
            >>> with contextlib.closing(WindowComparer()) as comparer:  # doctest: +SKIP
            ...     comparer.first_difference([("w", output_window, source_window)])
        """

        def items() -> Iterator[_Item[str]]:
            for name, out, src in pairs:
                if isinstance(src, FileWindow):
                    yield name, out.path, out.contiguous_range, src.path, src.contiguous_range, (out, src)
                else:  # pieces of several files: compared on their own
                    yield name, out.path, None, out.path, None, (out, src)

        return self._first_difference(items())

    def first_difference_in(self, out_path: Path, src_path: Path, pairs: Iterable[tuple[K, Range, Range]]) -> K | None:
        """:meth:`first_difference` for keys whose bytes are one range of each of two files
        (``(key, output range, source range)``, in output order): no window per tensor."""
        return self._first_difference((key, out_path, o, src_path, s, None) for key, o, s in pairs)

    def _first_difference(self, items: Iterable[_Item[K]]) -> K | None:
        """The first key whose output bytes differ from its source's: runs of small ranges batched,
        anything else compared on its own (its windows, or its two ranges when it has none)."""
        # Read once, not per tensor (and at call time: tests lower them).
        span_limit = min(BATCH_BYTES, len(self._src))  # a run's source span fits the buffer
        limit, gap_limit, most = min(SMALL_COMPARE, span_limit), SMALL_GAP, _MAX_PIECES
        run: list[tuple[K, Range, Range]] = []
        out_path = src_path = Path()  # the run's files, while it holds any key
        src_start = out_end = src_end = 0
        for key, out_file, o, src_file, s, windows in items:
            if o is not None and s is not None and o[1] < limit and o[1] == s[1]:
                if run:
                    if (
                        (out_file is out_path or out_file == out_path)
                        and (src_file is src_path or src_file == src_path)
                        and 0 <= o[0] - out_end <= gap_limit
                        and 0 <= s[0] - src_end <= gap_limit
                        and s[0] + s[1] - src_start <= span_limit
                        and len(run) < most
                    ):
                        run.append((key, o, s))
                        out_end, src_end = o[0] + o[1], s[0] + s[1]
                        continue
                    different = self._first_in_run(out_path, src_path, run)
                    if different is not None:
                        return different
                run = [(key, o, s)]
                out_path, src_path = out_file, src_file
                src_start, out_end, src_end = s[0], o[0] + o[1], s[0] + s[1]
                continue
            if run:
                different = self._first_in_run(out_path, src_path, run)
                if different is not None:
                    return different
                run = []
            if windows is not None:
                equal = self.equal(*windows)
            else:
                if o is None or s is None or o[1] != s[1]:
                    return key
                if self._wait is not None:
                    self._wait(out_file, o[0] + o[1])
                equal = self._equal_range(self._fd(out_file), o[0], self._fd(src_file), s[0], o[1])
            if not equal:
                return key
        return self._first_in_run(out_path, src_path, run) if run else None

    def _first_in_run(self, out_path: Path, src_path: Path, run: list[tuple[K, Range, Range]]) -> K | None:
        """Compare a run of small contiguous ranges: two reads, one ``memcmp`` per tensor."""
        last = run[-1][1]
        if self._wait is not None:
            self._wait(out_path, last[0] + last[1])
        fo, fs = self._fd(out_path), self._fd(src_path)
        start, end = run[0][2][0], run[-1][2][0] + run[-1][2][1]
        try:
            nbytes = read_pieces(fo, [o for _, o, _ in run], self._out, self._gaps)
            source = read_span(fs, start, end, self._src)
        except EOFError:  # a file shorter than its header says: found key by key
            return next((key for key, o, s in run if not self._equal_range(fo, o[0], fs, s[0], o[1])), None)
        output, at = self._out, 0
        for key, _, (offset, size) in run:
            if not output.startswith(source[offset - start : offset - start + size], at):  # memcmp
                return key
            at += size
        self.bytes_compared += 2 * nbytes
        return None

    def _equal_pieces(self, out: FileWindow, src: PieceWindow) -> bool:
        """Stream the pieces (cast if the storage is) against the output's range."""
        out_range = out.contiguous_range
        if out_range is None:  # outputs are written row-major: a strided output window is a view
            out_bytes = gather(self._fd(out.path), out.storage_offset, out.ref)
            return bytes(out_bytes) == b"".join(src.blocks())
        position, size = out_range
        fo = self._fd(out.path)
        out_view = memoryview(self._out)
        if src.record.cast_from is None:  # plain bytes: range against range, no allocation
            return self._equal_runs(fo, position, size, src)
        done = 0
        for block in src.blocks(_BLOCK):
            n = len(block)
            if done + n > size:
                return False
            try:
                read_into(fo, out_view[:n], position + done)
            except EOFError:
                return False
            if not self._out.startswith(block):
                return False
            done += n
        self.bytes_compared += 2 * done
        return done == size

    def _equal_runs(self, fo: int, position: int, size: int, src: PieceWindow) -> bool:
        out_view, src_view = memoryview(self._out), memoryview(self._src)
        done = 0
        for path, offset, length in src.runs():
            fs = self._fd(path)
            while length:
                n = min(_BLOCK, length)
                if done + n > size:
                    return False
                try:
                    read_into(fo, out_view[:n], position + done)
                    read_into(fs, src_view[:n], offset)
                except EOFError:
                    return False
                if not self._out.startswith(src_view[:n]):
                    return False
                done, offset, length = done + n, offset + n, length - n
        self.bytes_compared += 2 * done
        return done == size
