"""Clean tensor names: remove the prefixes that training wrappers add.

``torch.compile`` wraps a module in an ``OptimizedModule`` whose state dict names
start with ``_orig_mod.``; ``DistributedDataParallel`` (and ``DataParallel``,
DeepSpeed's engine) start them with ``module.``. A file with those names does not
load into the model class. Pure functions on names: the checkpoint reader
(``tiesafe convert``) and the exporter (``save_file``) share the same rules.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import TiesafeError

# The prefixes removed without being asked, when every name carries one, and who adds them.
AUTO_PREFIXES: dict[str, str] = {"_orig_mod.": "torch.compile", "module.": "DistributedDataParallel"}


def strip_prefixes(
    names: Sequence[str], explicit: Sequence[str] = (), auto: bool = True
) -> tuple[dict[str, str], list[str]]:
    """The new name of every name, and a description of each prefix removed.

    ``explicit`` prefixes (``strip_prefix``; a trailing ``.`` is added when missing)
    are removed from every name that carries them, in the order given; one that no
    name carries is an error (a typo must not pass silently). With ``auto``, while
    *every* name carries ``_orig_mod.`` or ``module.``, that prefix is removed too
    (nested wrappers, ``module._orig_mod.``, lose both). A rename that makes two
    names one is an error naming both. Returns ``({old: new} for every name, removed)``;
    ``removed`` is empty when no name changes.

    Example:
        >>> strip_prefixes(["_orig_mod.wte.weight", "_orig_mod.head.w"])
        ({'_orig_mod.wte.weight': 'wte.weight', '_orig_mod.head.w': 'head.w'}, ["'_orig_mod.' (torch.compile)"])
        >>> strip_prefixes(["model.w", "loss.w"], ["model"])[0]
        {'model.w': 'w', 'loss.w': 'loss.w'}
    """
    current = {name: name for name in names}
    removed: list[str] = []
    for given in explicit:
        prefix = given if given.endswith(".") else f"{given}."
        if prefix == ".":
            raise TiesafeError("strip_prefix: an empty prefix removes nothing; give the prefix to remove")
        carrying = [old for old, new in current.items() if new.startswith(prefix)]
        if not carrying:
            raise TiesafeError(f"strip_prefix: no name starts with {prefix!r}; names look like {_example(current)}")
        for old in carrying:
            current[old] = current[old][len(prefix) :]
        removed.append(f"{prefix!r} ({len(carrying)} of {len(current)} names)")
    while auto and current:
        found = next((p for p in AUTO_PREFIXES if all(new.startswith(p) for new in current.values())), None)
        if found is None:
            break
        current = {old: new[len(found) :] for old, new in current.items()}
        removed.append(f"{found!r} ({AUTO_PREFIXES[found]})")
    check_unique(current)
    return current, removed


def strips_nothing(names: Sequence[str], explicit: Sequence[str] = (), auto: bool = True) -> bool:
    """Whether :func:`strip_prefixes` would leave every one of ``names`` (distinct) as it is
    and raise nothing: told in C, where its map of every name would take 10 MB at 100,000.

    Example:
        >>> strips_nothing(["wte.weight", "head.w"]), strips_nothing(["module.w"])
        (True, False)
    """
    if explicit or "" in names:
        return False
    return not auto or not names or not any(names[0].startswith(prefix) for prefix in AUTO_PREFIXES)


_KEEP = "keep the names as they are (keep_names=True, --keep-names)"


def check_unique(renamed: dict[str, str]) -> None:
    """Raise when two old names get one new name (or a new name is empty), naming both."""
    new_names = set(renamed.values())
    if len(new_names) == len(renamed) and "" not in new_names:  # the common case, in C
        return
    seen: dict[str, str] = {}
    for old, new in renamed.items():
        if not old:  # empty before any prefix was removed: nothing to keep
            raise TiesafeError("a tensor has an empty name ''; tiesafe does not make up names")
        if not new:
            raise TiesafeError(f"removing prefixes leaves {old!r} without a name; {_KEEP}")
        other = seen.setdefault(new, old)
        if other != old:
            raise TiesafeError(f"removing prefixes makes {other!r} and {old!r} both {new!r}; {_KEEP}")


def _example(current: dict[str, str]) -> str:
    shown = [repr(n) for n in list(current.values())[:2]]
    return ", ".join(shown) if shown else "(no names)"
