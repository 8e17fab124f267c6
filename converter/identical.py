"""Find stored tensors whose bytes are identical, reading only the candidates.

Candidates come from descriptors alone (same dtype and shape, different bytes
in the source); only those are hashed, in large blocks, so a model whose
tensors all differ in shape costs nothing. Equal bytes are reported, never tied
on that ground alone: fresh LayerNorm weights are all ones today and trained
apart tomorrow.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from pathlib import Path

from .layout import StoredItem
from .windows import FileWindow, gather

_BLOCK = 16 * 1024 * 1024
_PREFIX = 64 * 1024


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


def identical_groups(items: list[StoredItem]) -> list[list[str]]:
    """Groups of stored names with equal dtype, shape and bytes, in source order.

    Example:
        >>> identical_groups(stored_items(ckpt, sharing))  # doctest: +SKIP
        [['model.embed_tokens.weight', 'lm_head.weight']]
    """
    by_geometry: dict[tuple[object, ...], list[StoredItem]] = defaultdict(list)
    for item in items:
        if item.nbytes and isinstance(item.source, FileWindow):
            by_geometry[(item.dtype, item.shape)].append(item)
    fds: dict[Path, int] = {}
    groups: list[list[str]] = []
    try:
        for candidates in by_geometry.values():
            if len(candidates) < 2:
                continue
            # Trained weights differ in their first bytes: a prefix rules most pairs out
            # before any tensor is read in full.
            by_prefix: dict[bytes, list[StoredItem]] = defaultdict(list)
            for item in candidates:
                assert isinstance(item.source, FileWindow)
                by_prefix[_digest(item.source, fds, _PREFIX)].append(item)
            for alike in by_prefix.values():
                if len(alike) < 2:
                    continue
                by_digest: dict[bytes, list[str]] = defaultdict(list)
                for item in alike:
                    assert isinstance(item.source, FileWindow)
                    by_digest[_digest(item.source, fds)].append(item.name)
                groups.extend(names for names in by_digest.values() if len(names) > 1)
    finally:
        for fd in fds.values():
            os.close(fd)
    order = {item.name: i for i, item in enumerate(items)}
    return sorted(groups, key=lambda names: order[names[0]])
