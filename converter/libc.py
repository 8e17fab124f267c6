"""The few C library functions called directly, where Python has no wrapper: ``fallocate``
(glibc's ``posix_fallocate`` falls back to writing every block) and ``mallopt``."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import Any

_M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
_MMAP_THRESHOLD = 128 * 1024  # glibc's default


@functools.cache
def libc_function(name: str, argtypes: tuple[Any, ...], restype: Any = ctypes.c_int) -> Callable[..., Any] | None:
    """The C library's ``name`` (errno kept for ``ctypes.get_errno``), or None where there is none.

    Example:
        >>> libc_function("fallocate", (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)) is not None
        True
    """
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError, TypeError):  # not a Unix C library, or no such symbol
        return None
    function.argtypes = list(argtypes)
    function.restype = restype
    return function  # type: ignore[no-any-return]


def fix_mmap_threshold() -> bool:
    """Keep glibc's mmap threshold at its default for the rest of this process; whether it was set.

    glibc raises the threshold, by default, to the size of each large block freed (up to
    32 MiB): after the first few MiB-sized buffers are freed, mid-sized allocations
    (columns growing, a window of the pickle) come from the heap, and freed ones are
    left there between objects that live on. At 100,000 tensors that held about 8 MB
    of freed memory. Setting the threshold stops the adjustment: a large block is mapped
    and unmapped as it comes and goes. The ``tiesafe`` command does this for its own
    process only; a program that imports the library keeps its allocator as it set it.

    Example:
        >>> fix_mmap_threshold()  # doctest: +SKIP
        True
    """
    mallopt = libc_function("mallopt", (ctypes.c_int, ctypes.c_int))
    return mallopt is not None and mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
