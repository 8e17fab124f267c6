"""Tensor names as the bare model has them: wrapper prefixes removed, collisions refused.

``torch.compile`` registers the model under ``_orig_mod`` and DDP / DataParallel under
``module``, so a state dict taken from the wrapper names every weight
``_orig_mod.x`` / ``module.x``: a file that does not load into the model class. When
*every* name carries one of those prefixes it is removed (repeatedly: a compiled DDP
model has both); other prefixes (Lightning's ``model.``) only when the user names them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .errors import TiesafeError, quoted

# Prefixes a wrapper adds to every name, and who adds them.
WRAPPER_PREFIXES = {"_orig_mod.": "torch.compile", "module.": "DistributedDataParallel / DataParallel"}


def strip_prefixes(
    names: Iterable[str], explicit: Sequence[str] = (), *, automatic: bool = True
) -> tuple[dict[str, str], list[str]]:
    """New names for ``names`` and a line per prefix removed.

    ``explicit`` prefixes are removed from every name that starts with them (one that
    no name starts with is an error: a typo would otherwise pass unnoticed);
    ``automatic`` removes a :data:`WRAPPER_PREFIXES` entry while every name carries it.
    Returns ``{old: new}`` for every name (unchanged ones included) and report lines.
    Raises :class:`~converter.errors.TiesafeError` when two names would become one.

    Example:
        >>> strip_prefixes(["_orig_mod.wte.weight", "_orig_mod.lm_head.weight"])
        ({'_orig_mod.wte.weight': 'wte.weight', '_orig_mod.lm_head.weight': 'lm_head.weight'}, \
["removed prefix '_orig_mod.' (torch.compile)"])
    """
    original = list(names)
    current = list(original)
    notes: list[str] = []
    for prefix in explicit:
        if not prefix:
            raise TiesafeError("--strip-prefix needs a non-empty prefix")
        hits = sum(1 for n in current if n.startswith(prefix))
        if not hits:
            raise TiesafeError(f"no tensor name starts with {quoted(prefix)} (asked by --strip-prefix)")
        current = [n[len(prefix) :] if n.startswith(prefix) else n for n in current]
        notes.append(f"removed prefix {quoted(prefix)} from {hits} of {len(current)} names (--strip-prefix)")
    while automatic and current:
        wrapper = next((p for p in WRAPPER_PREFIXES if all(n.startswith(p) for n in current)), None)
        if wrapper is None:
            break
        current = [n[len(wrapper) :] for n in current]
        notes.append(f"removed prefix {quoted(wrapper)} ({WRAPPER_PREFIXES[wrapper]})")
    _refuse_collisions(original, current)
    return dict(zip(original, current, strict=True)), notes


def _refuse_collisions(original: list[str], renamed: list[str]) -> None:
    first: dict[str, str] = {}
    for old, new in zip(original, renamed, strict=True):
        if not new:
            raise TiesafeError(f"removing prefixes would leave tensor {quoted(old)} without a name")
        if new in first:
            raise TiesafeError(
                f"removing prefixes would give {quoted(first[new])} and {quoted(old)} the same name "
                f"{quoted(new)}; keep the names (--keep-names) or remove fewer prefixes"
            )
        first[new] = old
