"""Pause Python's cyclic garbage collector while a large acyclic structure is built.

Parsing a safetensors header of 100,000 tensors, or building one window per tensor
for verification, allocates millions of dicts, lists and tuples: every 700 of them
the collector walks the young ones, and every so often the whole heap. Measured on a
46,848-tensor header: ``json.loads`` takes 138 ms with the collector on and 74 ms
with it paused. None of these structures form reference cycles (reference counting
frees them), so nothing is left for the collector to find; it runs again on the first
allocation after the pause.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused_gc() -> Iterator[None]:
    """Run the block with the cyclic collector off, then restore its state (nested pauses keep it off).

    Example:
        >>> with paused_gc():
        ...     table = [{"n": i} for i in range(100_000)]
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
