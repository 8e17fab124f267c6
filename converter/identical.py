"""Find stored tensors whose bytes are identical, reading only the candidates.

Candidates come from descriptors alone (same dtype and shape, different bytes
in the source); a digest of their first 64 KiB rules most out, and the rest are
compared byte for byte (memcmp through reusable buffers: several times faster
than hashing them), so a model whose tensors all differ in shape costs nothing. Equal bytes are reported, never tied
on that ground alone: fresh LayerNorm weights are all ones today and trained
apart tomorrow.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from collections.abc import Callable, Hashable
from pathlib import Path

from .layout import StoredItem
from .windows import FileWindow, WindowComparer, gather

_BLOCK = 16 * 1024 * 1024
_PREFIX = 64 * 1024
_COMPARE_AT_MOST = 8  # tensors alike in dtype, shape and prefix compared pairwise; more are hashed


def _digest(window: FileWindow, fds: dict[Path, int], limit: int | None = None) -> bytes:
    if window.path not in fds:
        fds[window.path] = os.open(window.path, os.O_RDONLY)
    fd = fds[window.path]
    digest = hashlib.blake2b(digest_size=32)
    span = window.contiguous_range
    if span is None:
        digest.update(gather(fd, window.storage_offset, window.ref))
        return digest.digest()
    offset, remaining = span
    if limit is not None:
        remaining = min(remaining, limit)
    while remaining:
        block = os.pread(fd, min(_BLOCK, remaining), offset)
        if not block:
            raise OSError(f"{window.path}: unexpected end of file")
        digest.update(block)
        offset += len(block)
        remaining -= len(block)
    return digest.digest()


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
        for candidates in _alike(windowed, lambda pair: (pair[0].dtype, pair[0].shape)):
            # Trained weights differ in their first bytes: a prefix rules most pairs out
            # before any tensor is read in full.
            for alike in _alike(candidates, lambda pair: _digest(pair[1], fds, _PREFIX)):
                if len(alike) > _COMPARE_AT_MOST:  # comparing pairs grows as the square: hash each once
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
