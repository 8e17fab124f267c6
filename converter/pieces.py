"""Where the rows of a sharded tensor's piece go in the output: pure arithmetic, no torch.

A rank of a DTensor holds a *piece*: a box of the global tensor (an offset and a
shape per dimension). In the row-major output the box is a set of equal runs of
bytes; a piece cut along dimension 0 is one run, a piece cut along dimension 1 is
one run per row. The piece is sent and written in *chunks* of at most a block of
bytes (whole runs, or one run split), so memory stays bounded by the block.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .geometry import contiguous_strides, numel


@dataclass(frozen=True)
class Piece:
    """The box of a global tensor that one rank holds."""

    offset: tuple[int, ...]
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Chunk:
    """Bytes ``[start, stop)`` of rows ``[first, last)`` of the piece seen as (runs, run bytes).

    ``runs`` are ``(byte offset in the tensor's output, position in the chunk, length)``.
    """

    first: int
    last: int
    start: int
    stop: int
    runs: tuple[tuple[int, int, int], ...]

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


def _outer_dims(piece: Piece, global_shape: Sequence[int]) -> int:
    """How many leading dims index the runs: every dim after them is whole, so a run spans the rest."""
    k = len(global_shape) - 1
    while k > 0 and piece.shape[k] == global_shape[k]:
        k -= 1
    return max(k, 0)


def run_shape(piece: Piece, global_shape: Sequence[int]) -> tuple[int, int]:
    """``(runs, elements per run)``: the piece as a matrix whose rows are contiguous in the output.

    Example:
        >>> run_shape(Piece((0, 2), (3, 2)), (3, 4))  # a column shard: one run per row
        (3, 2)
        >>> run_shape(Piece((2, 0), (1, 4)), (3, 4))  # a row shard: one run
        (1, 4)
    """
    k = _outer_dims(piece, global_shape)
    return numel(piece.shape[:k]), numel(piece.shape[k:])


def chunks(piece: Piece, global_shape: Sequence[int], itemsize: int, block: int) -> Iterator[Chunk]:
    """The piece's bytes in order, in chunks of at most ``block`` bytes, with where each run goes.

    ``block`` must be a multiple of ``itemsize``. A run longer than a block is split.

    Example:
        >>> [c.runs for c in chunks(Piece((0, 2), (2, 2)), (2, 4), 4, 1 << 20)]
        [((8, 0, 8), (24, 8, 8))]
    """
    runs, per_run = run_shape(piece, global_shape)
    run_bytes = per_run * itemsize
    if runs * run_bytes == 0:
        return
    starts = _run_starts(piece, global_shape)
    if run_bytes >= block:
        for q, begin in enumerate(starts):
            for a in range(0, run_bytes, block):
                b = min(a + block, run_bytes)
                yield Chunk(q, q + 1, a, b, ((begin * itemsize + a, 0, b - a),))
        return
    rows = block // run_bytes
    for first in range(0, runs, rows):
        last = min(first + rows, runs)
        merged: list[tuple[int, int, int]] = []
        for q in range(first, last):
            where, position = next(starts) * itemsize, (q - first) * run_bytes
            if merged and merged[-1][0] + merged[-1][2] == where:  # adjacent in the output: one write
                merged[-1] = (merged[-1][0], merged[-1][1], merged[-1][2] + run_bytes)
            else:
                merged.append((where, position, run_bytes))
        yield Chunk(first, last, 0, (last - first) * run_bytes, tuple(merged))


def _run_starts(piece: Piece, global_shape: Sequence[int]) -> Iterator[int]:
    """The element offset in the output of each run, in order."""
    strides = contiguous_strides(global_shape)
    k = _outer_dims(piece, global_shape)
    inner = sum(o * s for o, s in zip(piece.offset[k:], strides[k:], strict=True))
    outer = list(zip(piece.shape[:k], piece.offset[:k], strides[:k], strict=True))[::-1]
    for q in range(numel(piece.shape[:k])):
        index, rest = inner, q
        for n, o, s in outer:
            rest, i = divmod(rest, n)
            index += (o + i) * s
        yield index


def tiling_problem(global_shape: Sequence[int], boxes: Sequence[Piece]) -> str | None:
    """Why ``boxes`` do not cover the global tensor exactly once, or None.

    The boxes of a sharded tensor form a grid: along every dimension their
    intervals partition ``[0, n)``, and every combination of intervals is one box.

    Example:
        >>> tiling_problem((4, 2), [Piece((0, 0), (2, 2)), Piece((2, 0), (2, 2))]) is None
        True
        >>> tiling_problem((4, 2), [Piece((0, 0), (2, 2)), Piece((1, 0), (3, 2))])
        'pieces overlap or leave gaps along dimension 0'
    """
    boxes = [b for b in boxes if numel(b.shape)] or list(boxes[:1])
    if numel(global_shape) == 0:
        return None
    if len(set(boxes)) != len(boxes):
        return "two ranks write the same piece"
    total = 1
    for d, n in enumerate(global_shape):
        intervals = sorted({(b.offset[d], b.offset[d] + b.shape[d]) for b in boxes})
        position = 0
        for start, stop in intervals:
            if start != position:
                return f"pieces overlap or leave gaps along dimension {d}"
            position = stop
        if position != n:
            return f"pieces leave gaps along dimension {d}"
        total *= len(intervals)
    if total != len(boxes):
        return f"{len(boxes)} pieces do not form a grid of {total}"
    return None
