"""Find stored tensors whose bytes are identical, reading only the candidates.

Candidates come from descriptors alone (same dtype and shape, different bytes
in the source); a digest of their first and last KiB rules most out (read for
many candidates at once, in file order: a mixture-of-experts file makes every
expert a candidate), and the rest are compared byte for byte (memcmp through
reusable buffers: several times faster than hashing them), so a model whose
tensors all differ in shape costs nothing. Equal bytes are reported, never tied
on that ground alone: fresh LayerNorm weights are all ones today and trained
apart tomorrow.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path

from .layout import StoredItem
from .windows import BATCH_BYTES, SMALL_GAP, FileWindow, Piece, WindowComparer, extends, gather, read_pieces

_BLOCK = 16 * 1024 * 1024
_SAMPLE = 1024  # bytes read from each end of a candidate: trained weights differ there
_SAMPLE_GAP = 4 * 1024  # ends further apart are read apart: reading the bytes between costs more
_COMPARE_AT_MOST = 8  # tensors alike in dtype, shape and samples compared pairwise; more are hashed


def _digest(window: FileWindow, fds: dict[Path, int]) -> bytes:
    """A digest of the whole tensor."""
    if window.path not in fds:
        fds[window.path] = os.open(window.path, os.O_RDONLY)
    fd = fds[window.path]
    digest = hashlib.blake2b(digest_size=32)
    span = window.contiguous_range
    if span is None:
        digest.update(gather(fd, window.storage_offset, window.ref))
        return digest.digest()
    offset, remaining = span
    while remaining:
        block = os.pread(fd, min(_BLOCK, remaining), offset)
        if not block:
            raise OSError(f"{window.path}: unexpected end of file")
        digest.update(block)
        offset += len(block)
        remaining -= len(block)
    return digest.digest()


def _ends(span: tuple[int, int]) -> list[Piece]:
    """The first and last ``_SAMPLE`` bytes of a range, or all of it when it is short."""
    offset, nbytes = span
    if nbytes <= 2 * _SAMPLE:
        return [Piece(offset, nbytes)]
    return [Piece(offset, _SAMPLE), Piece(offset + nbytes - _SAMPLE, _SAMPLE)]


def _sample_digests(windows: list[FileWindow], fds: dict[Path, int]) -> list[bytes]:
    """For each window, a digest of its two ends (of all of it when short or strided).

    The ends of neighbouring tensors are read together: one ``preadv`` for a run of
    them (windows.read_pieces), not two reads per tensor.
    """
    digests = [b""] * len(windows)
    buffer, gaps = bytearray(BATCH_BYTES), bytearray(SMALL_GAP)
    pieces: list[Piece] = []  # read together, from one file
    owners: list[tuple[int, int]] = []  # (window index, bytes of its pieces), in the same order
    total = 0

    def flush() -> None:
        read_pieces(fds[windows[owners[0][0]].path], pieces, buffer, gaps)
        view, at = memoryview(buffer), 0
        for index, size in owners:
            digests[index] = hashlib.blake2b(view[at : at + size], digest_size=32).digest()
            at += size
        pieces.clear()
        owners.clear()

    for index in sorted(range(len(windows)), key=lambda i: (str(windows[i].path), windows[i].storage_offset)):
        window = windows[index]
        if window.path not in fds:
            fds[window.path] = os.open(window.path, os.O_RDONLY)
        span = window.contiguous_range
        if span is None:  # strided: gathered whole, rare
            digests[index] = _digest(window, fds)
            continue
        own = _ends(span)
        if pieces and (
            window.path != windows[owners[0][0]].path
            or not extends(pieces[-1], len(pieces), total, own[0], _SAMPLE_GAP)
            or (len(own) == 2 and not extends(own[0], len(pieces) + 1, total + own[0].nbytes, own[1], _SAMPLE_GAP))
        ):
            flush()
            total = 0
        pieces.extend(own)
        owners.append((index, sum(piece.nbytes for piece in own)))
        total += owners[-1][1]
    if pieces:
        flush()
    return digests


_Pair = tuple[StoredItem, FileWindow]


def _alike(pairs: list[_Pair], key: Callable[[_Pair], Hashable]) -> list[list[_Pair]]:
    """The groups of two or more that share ``key``, in the given order."""
    groups: dict[Hashable, list[_Pair]] = defaultdict(list)
    for pair in pairs:
        groups[key(pair)].append(pair)
    return [group for group in groups.values() if len(group) > 1]


def _equal_classes(pairs: list[_Pair], comparer: WindowComparer) -> list[list[_Pair]]:
    """Split ``pairs`` into classes of equal bytes: each joins the first class whose first member it equals."""
    classes: list[list[_Pair]] = []
    for pair in pairs:
        for members in classes:
            if comparer.equal(members[0][1], pair[1]):
                members.append(pair)
                break
        else:
            classes.append([pair])
    return [members for members in classes if len(members) > 1]


# Past this many small candidates (mixture-of-experts experts: thousands of one shape) the
# search is skipped unless asked for (--dedup-identical): reading and hashing both ends of
# each costs tens of microseconds a tensor, as much as the copy of a 64 KiB expert.
SEARCH_AT_MOST = 1_000
_SMALL_CANDIDATE = 1 << 20


def search_is_costly(items: list[StoredItem]) -> int:
    """How many candidates ``identical_groups`` would read, when they are many and small; else 0.

    Example:
        >>> search_is_costly(stored_items(ckpt, sharing))  # doctest: +SKIP
        12288
    """
    return costly_candidates(
        (item.dtype, item.shape, item.nbytes) for item in items if isinstance(item.source, FileWindow)
    )


def costly_candidates(tensors: Iterable[tuple[object, tuple[int, ...], int]]) -> int:
    """:func:`search_is_costly` of tensors given as (dtype, shape, bytes), all of them in files."""
    shapes: dict[tuple[object, ...], list[int]] = defaultdict(list)
    for dtype, shape, nbytes in tensors:
        if nbytes:
            shapes[(dtype, shape)].append(nbytes)
    sizes = [n for group in shapes.values() if len(group) > 1 for n in group]
    if len(sizes) > SEARCH_AT_MOST and sum(sizes) < _SMALL_CANDIDATE * len(sizes):
        return len(sizes)
    return 0


def equal_bytes(a: StoredItem, b: StoredItem) -> bool:
    """Whether two stored items hold the same bytes (a tie the model declares, checked)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not (isinstance(a.source, FileWindow) and isinstance(b.source, FileWindow)):
        return False
    comparer = WindowComparer()
    try:
        return comparer.equal(a.source, b.source)
    finally:
        comparer.close()


def identical_groups(items: list[StoredItem]) -> list[list[str]]:
    """Groups of stored names with equal dtype, shape and bytes, in source order.

    Example:
        >>> identical_groups(stored_items(ckpt, sharing))  # doctest: +SKIP
        [['model.embed_tokens.weight', 'lm_head.weight']]
    """
    windowed = [(item, item.source) for item in items if item.nbytes and isinstance(item.source, FileWindow)]
    fds: dict[Path, int] = {}
    groups: list[list[str]] = []
    comparer = WindowComparer()
    try:
        candidates = [pair for alike in _alike(windowed, lambda pair: (pair[0].dtype, pair[0].shape)) for pair in alike]
        digests = _sample_digests([window for _, window in candidates], fds)
        samples = {id(pair): digest for pair, digest in zip(candidates, digests, strict=True)}
        for alike in _alike(candidates, lambda pair: (pair[0].dtype, pair[0].shape, samples[id(pair)])):
            span = alike[0][1].contiguous_range
            if span is None or span[1] <= 2 * _SAMPLE:  # the samples were whole tensors: their digests settle it
                classes = [alike]
            elif len(alike) > _COMPARE_AT_MOST:  # comparing pairs grows as the square: hash each once
                classes = _alike(alike, lambda pair: _digest(pair[1], fds))
            else:
                classes = _equal_classes(alike, comparer)
            groups.extend([item.name for item, _ in same] for same in classes)
    finally:
        comparer.close()
        for fd in fds.values():
            os.close(fd)
    order = {item.name: i for i, item in enumerate(items)}
    return sorted(groups, key=lambda names: order[names[0]])
