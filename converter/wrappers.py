"""The names a wrapped module's state dict would have on the bare model.

``torch.compile`` returns an ``OptimizedModule`` holding the model as ``_orig_mod``;
``DistributedDataParallel`` and ``DataParallel`` hold it as ``module``. Their state
dicts prefix every name with that attribute, anywhere in the tree (a compiled
submodule gives ``encoder._orig_mod.layer.weight``), and the file no longer loads
into the model class. The module tree says where each wrapper is, so the prefix is
removed exactly there (a bare model's own submodule called ``module`` is kept).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from .names import check_unique

if TYPE_CHECKING:
    import torch

# Wrapper class (module, name) -> the attribute holding the wrapped module, and who adds it.
_WRAPPERS = {
    ("torch._dynamo.eval_frame", "OptimizedModule"): ("_orig_mod", "torch.compile"),
    ("torch.nn.parallel.distributed", "DistributedDataParallel"): ("module", "DistributedDataParallel"),
    ("torch.nn.parallel.data_parallel", "DataParallel"): ("module", "DataParallel"),
}


def _wrapper(module: torch.nn.Module) -> tuple[str, str] | None:
    """(attribute, tool) when ``module`` is a wrapper whose class is already imported, else None."""
    for (where, name), found in _WRAPPERS.items():
        cls = getattr(sys.modules.get(where), name, None)  # never imported here: a wrapper needs its module loaded
        if cls is not None and isinstance(module, cls):
            return found
    return None


def unwrapped_names(model: torch.nn.Module, names: list[str]) -> tuple[dict[str, str], list[str]]:
    """Map each state dict name of ``model`` to its name on the bare model; describe what was removed.

    Example:
        >>> unwrapped_names(torch.compile(torch.nn.Linear(2, 2)), ["_orig_mod.weight"])  # doctest: +SKIP
        ({'_orig_mod.weight': 'weight'}, ["'_orig_mod.' (torch.compile)"])
    """
    wrapped: dict[str, tuple[str, str]] = {}  # module path -> (attribute to drop, tool)
    for path, module in model.named_modules(remove_duplicate=False):
        found = _wrapper(module)
        if found is not None:
            wrapped[path] = found
    if not wrapped:
        return {n: n for n in names}, []
    used: dict[str, None] = {}
    renamed = {}
    for name in names:
        parts = name.split(".")
        kept: list[str] = []
        for i, part in enumerate(parts[:-1]):  # the last part is the tensor's own name
            found = wrapped.get(".".join(parts[:i]))
            if found is not None and part == found[0]:
                used[f"{'.'.join(parts[: i + 1]) + '.'!r} ({found[1]})"] = None
                continue
            kept.append(part)
        renamed[name] = ".".join([*kept, parts[-1]])
    check_unique(renamed)
    return renamed, list(used)
