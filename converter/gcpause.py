"""Pause Python's cyclic garbage collector while a conversion builds its per-tensor bookkeeping.

A checkpoint of tens of thousands of tensors (a mixture-of-experts file) is described by
hundreds of thousands of small objects that live until the conversion ends. Each batch of
new objects triggers a collection, and every full collection walks all of them again:
measured on a 46,848-tensor file, reading the pickle spent 0.3-0.5 s and planning, writing
and verifying about a second more in collections that found nothing to free (the
pipeline's objects form no cycles; reference counting frees them). A conversion runs with
the collector paused: memory is unchanged, and the pause ends with the conversion, so a
long batch of conversions still collects between them.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_depth = 0  # blocks open, in any thread
_was_enabled = False  # whether the collector ran before the first of them


@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    """No cyclic collection inside the block (reference counting still frees).

    The collector is process-wide: blocks nest, in one thread or several (conversions
    run side by side), and it is switched back on when the last one ends, if it was on.

    Example:
        >>> import gc
        >>> with collection_paused():
        ...     gc.isenabled()
        False
    """
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
