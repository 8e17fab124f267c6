"""Write a planned safetensors file: streamed, durable and atomic.

Bytes go from the source file to the output by the kernel (``os.copy_file_range``)
without passing through Python, so memory stays flat whatever the model size.
The output is written under a temporary name in the target folder, checked
(optionally) by a thread that reads each range just after it lands, synced in
the background, then renamed once all is done: the final name never holds a
partial or unsynced file.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from . import windows
from .errors import WriteError
from .gcpause import paused_gc
from .layout import FilePlan
from .libc import libc_function
from .readahead import READ_AHEAD_FROM, ReadAhead
from .windows import FileWindow, PieceWindow, Range, gather, read_pieces

TEMP_SUFFIX = ".tiesafe-tmp"  # temporary files are named .<final name>.<8 random characters>.tiesafe-tmp
_RANDOM = 8  # length of tempfile.mkstemp's random part
_CHUNK = 64 * 1024 * 1024  # per copy_file_range call; the kernel may copy less


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _copy_range(src: int, dst: int, src_offset: int, dst_offset: int, nbytes: int) -> None:
    """Copy ``nbytes`` between two files inside the kernel, falling back to pread/pwrite."""
    use_kernel = hasattr(os, "copy_file_range")
    while nbytes > 0:
        copied = 0
        if use_kernel:
            try:
                copied = os.copy_file_range(src, dst, min(nbytes, _CHUNK), src_offset, dst_offset)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                    raise
                use_kernel = False
        if not copied:
            block = os.pread(src, min(nbytes, 8 * 1024 * 1024), src_offset)
            if not block:
                raise OSError(f"source ended early at byte {src_offset}")
            copied = os.pwrite(dst, block, dst_offset)
        src_offset += copied
        dst_offset += copied
        nbytes -= copied


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """``os.pwrite`` until every byte is written (it may write less than asked)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _create_temp(dst: Path) -> tuple[int, Path]:
    """A new, locked file beside ``dst`` under a name recognisably ours, with the umask's mode.

    Stale temporary files of earlier writes to ``dst`` whose writer is gone are removed first.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(dst)
    fd, tmp = _locked_temp(dst)
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a normal file follows the umask
    return fd, tmp


def _locked_temp(dst: Path) -> tuple[int, Path]:
    """A new temporary file beside ``dst``, locked for as long as this process keeps it open."""
    while True:
        fd, name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=TEMP_SUFFIX, dir=dst.parent)
        with contextlib.suppress(OSError):  # a file system without locks: the name still says whose it is
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits only while another run's cleanup looks at it
        if os.fstat(fd).st_nlink:
            return fd, Path(name)
        os.close(fd)  # that cleanup removed it between mkstemp and flock: take another name


def _remove_stale_temps(dst: Path) -> None:
    """Remove the temporary files of earlier writes to ``dst`` whose process is gone (no lock held)."""
    prefix = f".{dst.name}."
    try:
        names = os.listdir(dst.parent)
    except OSError:
        return
    for name in names:
        if len(name) != len(prefix) + _RANDOM + len(TEMP_SUFFIX) or not (
            name.startswith(prefix) and name.endswith(TEMP_SUFFIX)
        ):
            continue
        try:
            fd = os.open(dst.parent / name, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while its writer lives
                os.unlink(dst.parent / name)
        except OSError:
            pass
        finally:
            os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable; best effort, as the complete output is in place already."""
    with contextlib.suppress(OSError):  # some file systems cannot sync a folder (EINVAL)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def atomic_output(dst: Path) -> Iterator[tuple[int, Path]]:
    """Yield ``(fd, temp path)`` in ``dst``'s folder; on success fsync and rename to ``dst``.

    On any exception the temporary file is removed and ``dst`` is left as it was; an
    ``OSError`` (disk full, read-only file system, permission denied, ...) becomes a
    one-line :class:`~converter.errors.WriteError`.

    Killed mid-write (SIGKILL, power loss), a run leaves only its temporary file, named
    ``.<dst name>.<random>.tiesafe-tmp``; the next write to ``dst`` removes it. Each
    writer holds an ``flock`` on its temporary file until the rename, so a temporary
    file is removed only when the process that made it is gone.

    Two processes writing one ``dst`` never mix their bytes: each writes its own
    temporary file and ``rename`` replaces ``dst`` atomically, so ``dst`` is always one
    complete file, the one whose writer finished last.
    """
    with StagedWrites() as staged:
        yield staged.open(dst)


class _BackgroundSync:
    """fsync staged files on a thread, so the disk flushes while this process goes on.

    ``fsync`` releases the GIL for as long as the device takes; meanwhile the next
    file is written and verification reads pages from the page cache. Errors are kept
    and raised by ``wait``.
    """

    def __init__(self) -> None:
        self._queue: list[int] = []
        self._error: OSError | None = None
        self._done = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, fd: int) -> None:
        with self._done:
            self._queue.append(fd)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tiesafe-fsync", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            with self._done:
                if not self._queue:
                    self._thread = None
                    self._done.notify_all()
                    return
                fd = self._queue[0]
            try:
                os.fsync(fd)
            except OSError as exc:
                self._error = self._error or exc
            with self._done:
                self._queue.pop(0)

    def wait(self) -> None:
        """Block until every added file is synced; raise the first fsync error."""
        with self._done:
            self._done.wait_for(lambda: self._thread is None)
        if self._error is not None:
            raise self._error


class WriteStopped(Exception):
    """Raised in a reader waiting on :class:`WriteProgress` when the writing stopped early."""


class WriteProgress:
    """How far each staged file is written, for a reader that trails the writer.

    Verification reads each range just after it lands, while its bytes (and the
    source's, just copied) are still in the page cache: a model larger than RAM is
    not read back from disk, and the comparison runs on another core during the copy.
    """

    def __init__(self) -> None:
        self._written: dict[Path, int] = {}
        self._stopped = False
        self._changed = threading.Condition()
        self._awaited: dict[Path, list[int]] = {}  # the ends readers wait for, per file

    def advance(self, path: Path, end: int) -> None:
        """Bytes ``[0, end)`` of ``path`` are written."""
        with self._changed:
            self._written[path] = end
            # Wake readers only when what one waits for has landed: thousands of small
            # tensors would otherwise wake the verifier for each, to wait again.
            if any(end >= awaited for awaited in self._awaited.get(path, ())):
                self._changed.notify_all()

    def stop(self) -> None:
        """No more bytes will come: waiting readers raise :class:`WriteStopped`."""
        with self._changed:
            self._stopped = True
            self._changed.notify_all()

    def wait(self, path: Path, end: int) -> None:
        """Block until bytes ``[0, end)`` of ``path`` are written."""
        with self._changed:
            awaited = self._awaited.setdefault(path, [])
            awaited.append(end)
            try:
                while self._written.get(path, 0) < end:
                    if self._stopped:
                        raise WriteStopped(path)
                    self._changed.wait()
            finally:
                awaited.remove(end)


class _Checker:
    """Runs a check on a thread beside the writer and keeps what it raised."""

    def __init__(self, check: Callable[[list[Path], WriteProgress], None], paths: list[Path]) -> None:
        self.progress = WriteProgress()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(check, paths), name="tiesafe-check", daemon=True)
        self._thread.start()

    def _run(self, check: Callable[[list[Path], WriteProgress], None], paths: list[Path]) -> None:
        try:
            check(paths, self.progress)
        except WriteStopped:
            pass  # the writer failed first; its error is the one to report
        except BaseException as exc:  # raised in the caller's thread by finish()
            self.error = exc
            self.progress.stop()

    def finish(self) -> None:
        """Wait for the check; raise its error."""
        self._thread.join()
        if self.error is not None:
            raise self.error

    def abandon(self) -> None:
        """The writer failed: release the check and wait for it to end."""
        self.progress.stop()
        self._thread.join()


class StagedWrites:
    """Files that appear together: each is written under a temporary name, synced, and
    all are renamed into place when the block ends without error (in the order they
    were staged, so an index staged last appears last). On error every temporary file
    is removed and no final name is touched.

    Example:
        >>> with StagedWrites() as staged:  # doctest: +SKIP
        ...     staged.write_plan(shard_plan, out / "model-00001-of-00002.safetensors")
        ...     staged.write_bytes(index_json, out / "model.safetensors.index.json")
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []  # (temporary, final), not renamed yet
        self._renamed: list[Path] = []
        self._open: list[int] = []
        self._sync = _BackgroundSync()

    def __enter__(self) -> StagedWrites:
        return self

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        if error is not None:
            self._discard()
            if isinstance(error, OSError):
                raise _write_error(error, self._staged[-1][1] if self._staged else Path(".")) from error
            return
        try:
            self._commit()
        except OSError as exc:
            raise _write_error(exc, self._staged[-1][1]) from exc

    def open(self, dst: Path) -> tuple[int, Path]:
        """A descriptor to write ``dst``'s content to; synced and closed at commit."""
        fd, tmp = _create_temp(dst)
        self._staged.append((tmp, dst))
        self._open.append(fd)
        return fd, tmp

    def write_plan(self, plan: FilePlan, dst: Path, check: Callable[[Path], None] | None = None) -> Path:
        """Write a planned safetensors file; ``check`` reads its temporary file while it syncs.

        Returns the temporary path, readable until the block ends (to verify a set).
        """
        fd, tmp = self.open(dst)
        _write_plan(fd, plan)
        self._sync.add(fd)  # flushes while the next file is written, or while ``check`` reads
        if check is not None:
            check(tmp)
        return tmp

    def write_set(
        self, plans: dict[Path, FilePlan], check: Callable[[list[Path], WriteProgress], None] | None = None
    ) -> list[Path]:
        """Write planned safetensors files while ``check`` reads them, trailing the writer.

        Every header is written first, so ``check(temporary paths, progress)`` may
        parse them at once; it runs on a thread and must ``progress.wait(path, end)``
        before reading a range. Each file is synced in the background once written.
        An error of ``check`` stops the writing and is raised here. Returns the
        temporary paths, readable until the block ends.
        """
        with paused_gc():  # tens of thousands of tensors: see gcpause
            return self._write_set(plans, check)

    def _write_set(
        self, plans: dict[Path, FilePlan], check: Callable[[list[Path], WriteProgress], None] | None
    ) -> list[Path]:
        opened = []
        for dst, plan in plans.items():
            fd, tmp = self.open(dst)
            _start_plan(fd, plan)
            opened.append((fd, tmp, plan))
        checker = _Checker(check, [tmp for _, tmp, _ in opened]) if check is not None else None
        try:
            for fd, tmp, plan in opened:
                for end in _copy_tensors(fd, plan):
                    if checker is not None:
                        if checker.error is not None:
                            break  # raised by finish() below
                        checker.progress.advance(tmp, end)
                self._sync.add(fd)
        except BaseException:
            if checker is not None:
                checker.abandon()
            raise
        if checker is not None:
            checker.finish()
        return [tmp for _, tmp, _ in opened]

    def start_plan(self, plan: FilePlan, dst: Path) -> tuple[int, Path]:
        """Stage ``dst`` with its blocks reserved, its final size and its header; the tensors are the caller's.

        For writers that fill the data section themselves (every rank of a collective
        save writes its own pieces at their offsets). Returns ``(fd, temporary path)``.
        """
        fd, tmp = self.open(dst)
        _start_plan(fd, plan)
        return fd, tmp

    def start_streamed(self, dst: Path, header: Iterable[bytes], data_size: int) -> tuple[int, Path, int]:
        """Stage ``dst`` from its header's JSON in pieces (:func:`.layout.header_pieces`), each
        written as it comes, then padded and prefixed as :func:`.layout.encode_header` does;
        the descriptor, the temporary path and the header's size (prefix and padding included).

        Example:
            >>> fd, tmp, size = staged.start_streamed(dst, plan.header_pieces(), plan.data_size)  # doctest: +SKIP
        """
        fd, tmp = self.open(dst)
        position = 8
        for piece in header:
            pwrite_all(fd, piece, position)
            position += len(piece)
        padding = -(position - 8) % 8
        pwrite_all(fd, b" " * padding, position)
        header_size = position + padding
        pwrite_all(fd, (header_size - 8).to_bytes(8, "little"), 0)
        _preallocate(fd, header_size + data_size)
        os.ftruncate(fd, header_size + data_size)
        return fd, tmp, header_size

    def sync_later(self, fd: int) -> None:
        """Start syncing a staged file that is complete, while the caller goes on (verifies it)."""
        self._sync.add(fd)

    def commit(self) -> None:
        """Sync and rename every staged file now, as leaving the block without error does."""
        self.__exit__(None, None, None)

    def discard(self) -> None:
        """Remove every staged file now, as leaving the block with an error does."""
        self._discard()

    def write_bytes(self, data: bytes, dst: Path) -> None:
        fd, _ = self.open(dst)
        pwrite_all(fd, data, 0)

    def copy_file(self, src: Path, dst: Path) -> int:
        """Copy ``src`` as it is (config, tokenizer, ...), inside the kernel."""
        fd, _ = self.open(dst)
        with open(src, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            _copy_range(f.fileno(), fd, 0, 0, size)
        return size

    def _commit(self) -> None:
        try:
            self._sync.wait()
            for fd in self._open:
                os.fsync(fd)  # a no-op for files synced in the background
            # The locks are still held: no other run's cleanup can take a file before its rename.
            while self._staged:
                tmp, dst = self._staged[0]
                os.replace(tmp, dst)
                self._staged.pop(0)
                self._renamed.append(dst)
        except BaseException:
            self._discard()
            raise
        self._close()
        for folder in dict.fromkeys(dst.parent for dst in self._renamed):
            _fsync_dir(folder)

    def _close(self) -> None:
        for fd in self._open:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._open.clear()

    def _discard(self) -> None:
        with contextlib.suppress(OSError):
            self._sync.wait()  # never close a descriptor under a running fsync
        for tmp, _ in self._staged:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        self._close()


def _preallocate(fd: int, size: int) -> None:
    """Reserve the output's blocks before copying into it.

    A disk too small fails here, in a moment, rather than after copying most of a
    large model; and one allocation is cheaper than one per copied range (ext4:
    GPT-2's 148 ranges copied ~15% faster). ``fallocate(2)`` is called directly
    because glibc's ``posix_fallocate`` falls back to writing every block on file
    systems without it; there we simply skip the reservation.
    """
    fallocate = _libc_fallocate()
    if fallocate is None or size == 0:
        return
    if fallocate(fd, 0, 0, size) != 0:
        code = ctypes.get_errno()
        if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(code, os.strerror(code))
        # EOPNOTSUPP, ENOSYS, EINVAL, ...: no reservation on this file system


def _libc_fallocate() -> Callable[[int, int, int, int], int] | None:
    return libc_function("fallocate", (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64))


def _start_plan(fd: int, plan: FilePlan) -> None:
    _start_file(fd, plan.header, plan.file_size)


def _start_file(fd: int, header: bytes, file_size: int) -> None:
    """Reserve the file's blocks, give it its final size and write its header."""
    _preallocate(fd, file_size)
    os.ftruncate(fd, file_size)  # the full size at once: a reader may parse the header now
    pwrite_all(fd, header, 0)


def _copy_tensors(fd: int, plan: FilePlan) -> Iterator[int]:
    """Copy every tensor into place, in file order; yield the end offset of what is written so far.

    Runs of contiguous windows of one source file, back to back in the output, go to
    :func:`copy_ranges` (batches of small ranges, the kernel's copy for large ones); its
    range was computed once per tensor, with its window.
    """
    sources: dict[Path, int] = {}
    buffers: list[bytearray] = []  # copy_ranges' two buffers, made with the first batch
    segment: list[Range] = []  # contiguous windows of one source file, back to back in the output
    segment_path = Path()  # the segment's source, while it holds any range
    segment_start = 0
    try:
        base = len(plan.header)
        for tensor in plan.tensors:
            source = tensor.source
            if isinstance(source, FileWindow) and source.contiguous_range is not None:
                if segment and (source.path is segment_path or source.path == segment_path):
                    segment.append(source.contiguous_range)
                    continue
                if segment:
                    yield from _copy_segment(_source_fd(sources, segment_path), fd, segment, segment_start, buffers)
                segment, segment_path, segment_start = [source.contiguous_range], source.path, base + tensor.begin
                continue
            if segment:
                yield from _copy_segment(_source_fd(sources, segment_path), fd, segment, segment_start, buffers)
                segment = []
            if isinstance(source, PieceWindow):  # a training run's tensor: ranges of several files
                _copy_pieces(source, fd, base + tensor.begin, sources)
            elif isinstance(source, FileWindow):  # strided: gathered
                src = _source_fd(sources, source.path)
                pwrite_all(fd, gather(src, source.storage_offset, source.ref), base + tensor.begin)
            else:
                source.write_into(fd, base + tensor.begin)
            yield base + tensor.end
        if segment:
            yield from _copy_segment(_source_fd(sources, segment_path), fd, segment, segment_start, buffers)
    finally:
        for src in sources.values():
            os.close(src)


def _copy_segment(src: int, fd: int, segment: list[Range], position: int, buffers: list[bytearray]) -> Iterator[int]:
    """:func:`copy_ranges` of one run of contiguous windows; many small ones with a :class:`ReadAhead`."""
    if len(segment) < READ_AHEAD_FROM:
        yield from copy_ranges(src, fd, segment, position, buffers)
        return
    with ReadAhead(src, segment[0][0], max(offset + size for offset, size in segment)) as ahead:
        yield from copy_ranges(src, fd, ahead.follow(segment), position, buffers)


def copy_ranges(
    src: int, dst: int, ranges: Iterable[Range], position: int, buffers: list[bytearray] | None = None
) -> Iterator[int]:
    """Copy ``ranges`` of ``src`` back to back into ``dst`` from ``position``; yield the end
    offset written after each batch or range copied.

    A range from SMALL_RANGE on is copied inside the kernel (``copy_file_range``); runs of
    smaller ones that lie close together are read with one ``preadv`` into a reusable buffer
    and written with one ``pwrite``: one pair of system calls per batch instead of one call
    per tensor. ``buffers`` (empty at first) keeps the buffer between calls.

    Example:
        >>> list(copy_ranges(src_fd, out_fd, [(1024, 2048), (3136, 2048)], 4096))  # doctest: +SKIP
        [8192]
    """
    # Read at call time (tests lower them), once per call rather than once per range.
    gap_limit, cap, most = windows.SMALL_GAP, windows.BATCH_BYTES, windows._MAX_PIECES
    small = min(windows.SMALL_RANGE, cap)  # a batchable range always fits the buffer
    buffers = [] if buffers is None else buffers
    batch: list[Range] = []
    total = last_end = 0
    for offset, nbytes in ranges:
        if batch and (
            nbytes >= small or not 0 <= offset - last_end <= gap_limit or total + nbytes > cap or len(batch) >= most
        ):
            position = _write_batch(dst, src, batch, position, buffers)
            yield position
            batch, total = [], 0
        if nbytes >= small:
            _copy_range(src, dst, offset, position, nbytes)
            position += nbytes
            yield position
            continue
        if not buffers:
            buffers += [bytearray(cap), bytearray(gap_limit)]
        batch.append((offset, nbytes))
        total += nbytes
        last_end = offset + nbytes
    if batch:
        yield _write_batch(dst, src, batch, position, buffers)


def _source_fd(sources: dict[Path, int], path: Path) -> int:
    """The descriptor of a source file, opened on first use."""
    fd = sources.get(path)
    if fd is None:
        fd = sources[path] = os.open(path, os.O_RDONLY)
    return fd


def _copy_pieces(source: PieceWindow, fd: int, offset: int, sources: dict[Path, int]) -> None:
    """A tensor gathered from pieces of several files: each range by the kernel, or cast block by block."""
    if source.record.cast_from is not None:
        for block in source.blocks():
            pwrite_all(fd, block, offset)
            offset += len(block)
        return
    for path, start, length in source.runs():
        _copy_range(_source_fd(sources, path), fd, start, offset, length)
        offset += length


def _write_batch(fd: int, src: int, pieces: list[Range], start: int, buffers: list[bytearray]) -> int:
    """Write ``pieces`` of ``src`` back to back at ``start``; return the end offset written."""
    try:
        nbytes = read_pieces(src, pieces, buffers[0], buffers[1])
    except EOFError as exc:
        raise OSError(f"source ended early ({exc})") from None
    pwrite_all(fd, memoryview(buffers[0])[:nbytes], start)
    return start + nbytes


def _write_plan(fd: int, plan: FilePlan) -> None:
    _start_plan(fd, plan)
    for _ in _copy_tensors(fd, plan):
        pass


_HINTS = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is exhausted; free some space or write elsewhere",
    errno.EROFS: "the output folder is on a read-only file system; choose another output path",
    errno.EACCES: "choose an output folder you may write to",
    errno.EPERM: "choose an output folder you may write to",
    errno.EFBIG: "the file exceeds a file-size limit (ulimit -f) or the file system's maximum",
}


def _write_error(exc: OSError, dst: Path) -> WriteError:
    reason = exc.strerror or str(exc)
    ours = exc.filename is None or str(exc.filename).endswith(TEMP_SUFFIX) or Path(exc.filename) in (dst, dst.parent)
    if not ours:  # e.g. the source, opened again to copy its bytes
        reason += f": {exc.filename}"
    hint = _HINTS.get(exc.errno or 0) if ours else None
    message = f"cannot write the output ({reason}); nothing was left behind" + (f"; {hint}" if hint else "")
    return WriteError(message, path=dst)


def write_file(plan: FilePlan, dst: str | Path, *, check: Callable[[Path, WriteProgress], None] | None = None) -> int:
    """Write ``plan`` to ``dst`` atomically and return the bytes written.

    ``check(temporary path, progress)`` runs beside the writer, reading each range
    once ``progress.wait(path, end)`` says it landed (verification); if it raises,
    the writing stops and no output is left behind.

    Example:
        >>> write_file(plan_file(items, sharing.ties), "model.safetensors")  # doctest: +SKIP
        497759232
    """
    one_file = None if check is None else lambda paths, progress: check(paths[0], progress)
    with StagedWrites() as staged:
        staged.write_set({Path(dst): plan}, one_file)
    return plan.file_size
