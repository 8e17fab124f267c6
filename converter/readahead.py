"""Read a file ahead of a pass that walks it in order, in a thread of its own.

On a cold cache, a pass of thousands of small steps (copies of 64 KiB tensors, reads
of their zip headers) and the disk take turns: the kernel's own readahead keeps only a
few MiB ahead, and each step waits for its bytes. A thread that reads the file front
to back, a bounded distance ahead, keeps the disk busy meanwhile; what it reads stays
in the page cache for the pass. (``posix_fadvise(WILLNEED)`` asks for the same and
measured no gain here: it is advice the kernel may cut short.)
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Iterator

# A pass of this many steps or more is read ahead: a few large copies keep the disk busy on their own.
READ_AHEAD_FROM = 256
_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)  # Linux 4.14+


class ReadAhead:
    """Read ``fd`` from ``start`` to ``end`` in a thread, at most LEAD bytes ahead of the pass.

    The bytes read are dropped; they stay in the page cache for the pass (and for a
    verification after it). A block already cached is not read again: a non-blocking read
    of its last page (``RWF_NOWAIT``) says so, and a cached file costs one such read a
    block. ``reached(offset)`` tells the reader where the pass is; ``close()`` stops it.

    Example:
        >>> with ReadAhead(src_fd, 0, size) as ahead:  # doctest: +SKIP
        ...     list(copy_ranges(src_fd, out_fd, ahead.follow(ranges), 4096))
    """

    LEAD = 128 * 1024 * 1024  # how far ahead of the pass the reader may go
    BLOCK = 2 * 1024 * 1024  # one read
    _PAGE = 4096

    def __init__(self, fd: int, start: int, end: int) -> None:
        self._fd, self._end = fd, end
        self._copy_at = start
        self._stop = False
        self._moved = threading.Condition()
        self._thread = threading.Thread(target=self._run, args=(start,), name="tiesafe-readahead", daemon=True)
        self._thread.start()

    def _run(self, at: int) -> None:
        block, page = bytearray(self.BLOCK), bytearray(self._PAGE)
        with contextlib.suppress(OSError):  # a read error is the pass's to meet and report
            while at < self._end:
                with self._moved:
                    while not self._stop and at >= self._copy_at + self.LEAD:
                        self._moved.wait()
                    if self._stop:
                        return
                if self._cached(page, min(at + self.BLOCK, self._end) - 1):
                    at += self.BLOCK
                    continue
                read = os.preadv(self._fd, [block], at)
                if read <= 0:
                    return
                at += read

    def _cached(self, page: bytearray, offset: int) -> bool:
        """Whether the page holding ``offset`` is in the page cache (read without waiting for the disk)."""
        if _NOWAIT is None:
            return False
        try:
            return os.preadv(self._fd, [page], offset - offset % self._PAGE, _NOWAIT) > 0
        except OSError:  # EAGAIN: not cached; EOPNOTSUPP: the filesystem cannot say
            return False

    def reached(self, offset: int) -> None:
        """The pass is now at ``offset`` of the file."""
        if offset >= self._copy_at + self.BLOCK:  # wake the reader only when it can move a block on
            with self._moved:
                self._copy_at = offset
                self._moved.notify()

    def follow(self, ranges: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
        """``ranges`` (offset, size) as they are, the reader told where each starts as the pass takes it."""
        for offset_and_size in ranges:
            self.reached(offset_and_size[0])
            yield offset_and_size

    def close(self) -> None:
        with self._moved:
            self._stop = True
            self._moved.notify()
        self._thread.join()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
