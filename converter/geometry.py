"""Arithmetic on tensor geometry (shape, stride, element offset): pure, no torch."""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

# Untrusted shapes are refused beyond this many dimensions (torch sets no limit; real
# tensors have a handful), which keeps arithmetic on them cheap whatever the file says.
MAX_DIMS = 1024
# A tensor that reads its bytes more than once (stride 0: expand, broadcast) is written out
# repeat by repeat: a few bytes of a file could ask for terabytes. Beyond its own bytes,
# at most this much is materialised.
MAX_EXPANDED_BYTES = 1 << 30
# Shapes, strides and offsets as torch holds them (int64); larger ones no torch tensor can take.
MAX_INT64 = (1 << 63) - 1


def numel(shape: Sequence[int]) -> int:
    """Number of elements of a shape (1 for a 0-dim tensor)."""
    return prod(shape)


def extent(offset: int, shape: Sequence[int], stride: Sequence[int]) -> int:
    """One past the last element a strided window touches (``offset`` if it is empty)."""
    return offset + _reach(shape, stride, prod(shape))


def _reach(shape: Sequence[int], stride: Sequence[int], count: int) -> int:
    """How many elements past its offset a window of ``count`` elements reaches."""
    return 1 + sum([(n - 1) * s for n, s in zip(shape, stride, strict=True)]) if count else 0


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """Row-major strides of a dense tensor of ``shape``."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def is_contiguous(shape: Sequence[int], stride: Sequence[int]) -> bool:
    """Row-major dense, as torch defines it (size-1 dims may have any stride)."""
    if 0 in shape:  # no elements (numel == 0, without a loop: asked of every tensor)
        return True
    expected = 1
    for n, s in zip(reversed(shape), reversed(stride), strict=True):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


# Window geometry by (shape, stride): an MoE file repeats a handful of shapes tens of thousands
# of times. Bounded, so that a file of hash-colliding shapes costs at most a short scan a look-up.
_GEOMETRY: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[int, int, bool]] = {}
_GEOMETRY_KEPT = 256


def window_geometry(shape: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, int, bool]:
    """``(numel, reach, contiguous)`` of a window: its element count, how far past its offset it
    reaches (``extent(offset, ...) - offset``) and whether it is row-major dense.

    Example:
        >>> window_geometry((2, 3), (3, 1))
        (6, 6, True)
    """
    key = (shape, stride)
    cacheable = type(shape) is tuple and type(stride) is tuple  # a list is not a dict key
    known = _GEOMETRY.get(key) if cacheable else None
    if known is None:
        count = prod(shape)
        known = (count, _reach(shape, stride, count), is_contiguous(shape, stride))
        if cacheable and len(_GEOMETRY) < _GEOMETRY_KEPT:
            _GEOMETRY[key] = known
    return known
