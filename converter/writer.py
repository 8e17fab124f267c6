"""Write a planned safetensors file: streamed, durable and atomic.

Bytes go from the source file to the output by the kernel (``os.copy_file_range``)
without passing through Python, so memory stays flat whatever the model size.
The output is written under a temporary name in the target folder, synced,
optionally checked, then renamed: the final name never holds a partial file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .layout import FilePlan
from .windows import FileWindow, gather

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


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


@contextlib.contextmanager
def atomic_output(dst: Path) -> Iterator[tuple[int, Path]]:
    """Yield ``(fd, temp path)`` in ``dst``'s folder; on success fsync and rename to ``dst``.

    On any exception the temporary file is removed and ``dst`` is left as it was.
    """
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tiesafe-tmp", dir=dst.parent)
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a normal file follows the umask
        yield fd, tmp
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, dst)
        dir_fd = os.open(dst.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise


def write_file(plan: FilePlan, dst: str | Path, *, check: Callable[[Path], None] | None = None) -> int:
    """Write ``plan`` to ``dst`` atomically and return the bytes written.

    ``check`` runs on the synced temporary file before it is renamed into place
    (verification): if it raises, no output is left behind.

    Example:
        >>> write_file(plan_file(ckpt, plan_sharing(ckpt.tensors)), "model.safetensors")  # doctest: +SKIP
        497759232
    """
    dst = Path(dst)
    sources: dict[Path, int] = {}
    try:
        with atomic_output(dst) as (fd, tmp):
            _pwrite_all(fd, plan.header, 0)
            base = len(plan.header)
            for tensor in plan.tensors:
                source = tensor.source
                if not isinstance(source, FileWindow):
                    source.write_into(fd, base + tensor.begin)
                    continue
                if source.path not in sources:
                    sources[source.path] = os.open(source.path, os.O_RDONLY)
                src = sources[source.path]
                span = source.contiguous_range
                if span is not None:
                    _copy_range(src, fd, span[0], base + tensor.begin, span[1])
                else:
                    _pwrite_all(fd, gather(src, source.storage_offset, source.ref), base + tensor.begin)
            os.ftruncate(fd, plan.file_size)
            if check is not None:
                os.fsync(fd)
                check(tmp)
    finally:
        for src in sources.values():
            os.close(src)
    return plan.file_size
