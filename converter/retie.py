"""Load a file into an ``nn.Module`` so that the file's ties become the module's ties.

``load_state_dict`` copies values into whatever the constructor built: ties the
constructor did not make are lost, and when the file holds different values for
names the model ties, whichever is copied last silently wins. Here a load is
planned first and written second:

1. the file is read and its tie record validated (:func:`converter.loader.read_tied`);
2. names are grouped into *classes* that must be one tensor after the load: a
   name and the stored tensor it aliases (the file's ties), and names that are
   one tensor in the model (its own ties, ``self.b = self.a``);
3. shapes, missing and unexpected names, and conflicts (a class holding
   different values in the file) are checked;
4. the tensors are built (memory-mapped, converted only where the model's
   dtype or device differs) -- and only then written into the modules.

Any problem raises before step 4, so a failed load leaves the module untouched.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ModelMismatchError
from .loader import TiedTensors, read_tied

if TYPE_CHECKING:
    import torch


@dataclass
class LoadReport:
    """What :func:`load_model` did.

    ``tied`` maps every name that shares memory with an earlier name of the model
    after the load to that name; ``cloned`` lists tied names given their own copy
    (``torchscript=True``); ``conflicts`` lists ``(kept, other)`` pairs the model
    ties but the file holds apart (only with ``strict=False``).
    """

    source: str
    missing: list[str] = field(default_factory=list)  # model names the file does not give: left as they were
    unexpected: list[str] = field(default_factory=list)  # file names the model does not have: ignored
    tied: dict[str, str] = field(default_factory=dict)
    cloned: list[str] = field(default_factory=list)
    conflicts: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class _Slot:
    """Where one state-dict name lives: ``module._parameters[leaf]`` or ``module._buffers[leaf]``."""

    module: torch.nn.Module
    leaf: str
    is_param: bool
    value: torch.Tensor

    @property
    def key(self) -> tuple[int, str]:
        return id(self.module), self.leaf


def _slots(model: torch.nn.Module) -> dict[str, _Slot]:
    """Every tensor of the model's state dict, in state-dict order, with where it lives.

    Walked like ``state_dict`` walks it (a module reachable under two names is
    listed under both), without running state-dict hooks.
    """
    slots: dict[str, _Slot] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for leaf, param in module._parameters.items():
            if param is not None:
                slots[dot + leaf] = _Slot(module, leaf, True, param)
        for leaf, buffer in module._buffers.items():
            if buffer is not None and leaf not in module._non_persistent_buffers_set:
                slots[dot + leaf] = _Slot(module, leaf, False, buffer)
    return slots


class _UnionFind:
    """Classes of names that must be one tensor after the load."""

    def __init__(self) -> None:
        self._parent: dict[str, str] = {}

    def find(self, name: str) -> str:
        root = self._parent.setdefault(name, name)
        while root != self._parent[root]:
            root = self._parent[root]
        self._parent[name] = root
        return root

    def union(self, a: str, b: str) -> None:
        self._parent[self.find(a)] = self.find(b)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bytes (NaN payloads and -0.0 count), read without copying either side."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    raw = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.view(raw), b.view(raw))


@dataclass
class _Plan:
    """The outcome of planning: every loaded model name -> the file name whose tensor it gets."""

    report: LoadReport
    final: dict[str, str]  # model name -> file object (a stored name, a view or a copy)


def _object(tied: TiedTensors, name: str) -> str:
    """The file name whose tensor object ``name`` is (an alias is its target's)."""
    return tied.record.aliases.get(name, name)


def _plan(slots: dict[str, _Slot], tied: TiedTensors, strict: bool) -> _Plan:
    """Decide which file tensor every model name gets; raise on any mismatch (nothing written)."""
    file_names = tied.names()
    in_file = set(file_names)
    report = LoadReport(str(tied.where), unexpected=[n for n in file_names if n not in slots])
    _check_shapes(slots, tied, in_file)

    kept_by: dict[str, str] = {}  # model name -> the first loaded name of its class
    problems: list[str] = []  # one sentence per conflict, for the error
    for names in _classes(slots, tied, file_names):
        loaded = [n for n in names if n in in_file]
        if not loaded:
            report.missing.extend(names)
            continue
        kept = loaded[0]
        compared = {_object(tied, kept)}
        for other in loaded[1:]:
            if _object(tied, other) not in compared:
                compared.add(_object(tied, other))
                if not _same_bits(tied.value(kept), tied.value(other)):
                    report.conflicts.append((kept, other))
                    problems.append(f"the model ties {kept!r} and {other!r}, but the file holds different values")
        kept_by.update(dict.fromkeys(names, kept))
    order = {name: i for i, name in enumerate(slots)}
    report.missing.sort(key=order.__getitem__)
    kept_by = dict(sorted(kept_by.items(), key=lambda item: order[item[0]]))
    problems += _check_shared_memory_kept(tied, kept_by, in_file, report)

    if strict and (report.missing or report.unexpected):
        raise ModelMismatchError(_names_problem(report), path=tied.where)
    if strict and problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        kept, _ = report.conflicts[0]
        raise ModelMismatchError(
            f"{problems[0]}{more}; load with strict=False to keep the value of {kept!r} for the model's tie",
            path=tied.where,
        )
    return _Plan(report, {name: _object(tied, kept) for name, kept in kept_by.items()})


def _check_shapes(slots: dict[str, _Slot], tied: TiedTensors, in_file: set[str]) -> None:
    for name, slot in slots.items():
        if name in in_file:
            shape = tuple(tied.value(name).shape)
            if shape != tuple(slot.value.shape):
                raise ModelMismatchError(
                    f"{name!r} is {list(shape)} in the file but {list(slot.value.shape)} in the model",
                    path=tied.where,
                )


def _classes(slots: dict[str, _Slot], tied: TiedTensors, file_names: list[str]) -> list[list[str]]:
    """The model's names grouped into what must be one tensor: the file's ties and the model's own."""
    classes = _UnionFind()
    for name in file_names:
        classes.union(name, _object(tied, name))
    first_holder: dict[int, str] = {}
    for name, slot in slots.items():
        classes.union(name, first_holder.setdefault(id(slot.value), name))
    members: dict[str, list[str]] = defaultdict(list)
    for name in slots:
        members[classes.find(name)].append(name)
    return list(members.values())


def _check_shared_memory_kept(
    tied: TiedTensors, kept_by: dict[str, str], in_file: set[str], report: LoadReport
) -> list[str]:
    """Names the file keeps in one memory must end in one memory.

    Aliases always do (they are one class); a view loses its base's memory when
    the model ties it to a name the file stores apart.
    """
    problems = []
    first_in: dict[str, str] = {}  # file memory -> the first model name in it
    for name, kept in kept_by.items():
        if name not in in_file or name in tied.record.copies:
            continue  # loaded through the model's own tie, or a copy: owns its memory
        memory = tied.storage_of(name)
        first = first_in.setdefault(memory, name)
        if tied.storage_of(_object(tied, kept)) != tied.storage_of(_object(tied, kept_by[first])):
            moved, other = (name, first) if tied.storage_of(_object(tied, kept)) != memory else (first, name)
            report.conflicts.append((kept_by[moved], moved))
            problems.append(
                f"the file keeps {moved!r} in one memory with {other!r}, but the model ties it to "
                f"{kept_by[moved]!r}, which the file stores apart"
            )
    return problems


def _names_problem(report: LoadReport) -> str:
    parts = []
    for what, names, hint in (
        ("the model's", report.missing, "which the file does not hold"),
        ("the file's", report.unexpected, "which the model does not have"),
    ):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            parts.append(f"{what} {names[0]!r}{more}, {hint}")
    return "; ".join(parts) + "; load with strict=False to leave them out"


def _build(slots: dict[str, _Slot], tied: TiedTensors, plan: _Plan, torchscript: bool) -> dict[str, torch.Tensor]:
    """The new tensor of every loaded name: nothing is written into the model yet.

    Each stored tensor is converted once, to the dtype and device of the first
    model name it feeds (no copy when they match: it stays memory-mapped); views
    are rebuilt on the converted tensor, so they keep sharing its memory.
    """
    bases: dict[str, torch.Tensor] = {}
    objects: dict[str, torch.Tensor] = {}
    for name, obj in plan.final.items():
        if obj in objects:
            continue
        slot = slots[name]
        stored = tied.stored[tied.source(obj)]
        device = stored.device if slot.value.is_meta else slot.value.device
        if obj in tied.record.copies:
            objects[obj] = stored.to(device=device, dtype=slot.value.dtype, copy=True)
            continue
        storage = tied.storage_of(obj)
        if storage not in bases:
            bases[storage] = stored.to(device=device, dtype=slot.value.dtype)
        objects[obj] = tied.value(obj, base=bases[storage])

    owner: dict[str, _Slot] = {}  # object -> the first parameter slot it fills (it becomes a Parameter)
    for name, obj in plan.final.items():
        if slots[name].is_param:
            owner.setdefault(obj, slots[name])

    result: dict[str, torch.Tensor] = {}
    by_slot: dict[tuple[int, str], torch.Tensor] = {}  # a module reachable under two names is one slot
    by_object: dict[str, torch.Tensor] = {}
    first_in: dict[str, str] = {}  # memory -> the first model name in it
    report = plan.report
    for name, obj in plan.final.items():
        slot = slots[name]
        first = first_in.setdefault(tied.storage_of(obj), name)
        if slot.key in by_slot:
            result[name] = by_slot[slot.key]  # cannot be parted, even for TorchScript
        elif torchscript and first != name:
            result[name] = _wrap(objects[obj].clone(), slot if slot.is_param else None)
            report.cloned.append(name)
            first = name  # its own memory now
        else:
            if obj not in by_object:
                by_object[obj] = _wrap(objects[obj], owner.get(obj))
            result[name] = by_object[obj]
        by_slot.setdefault(slot.key, result[name])
        if first != name:
            report.tied[name] = first
    return result


def _wrap(tensor: torch.Tensor, param_slot: _Slot | None) -> torch.Tensor:
    """A Parameter (keeping the slot's ``requires_grad``) when it fills a parameter slot."""
    import torch

    if param_slot is None:
        return tensor
    return torch.nn.Parameter(tensor, requires_grad=param_slot.value.requires_grad)


def load_model(
    model: torch.nn.Module, path: str | Path, *, torchscript: bool = False, strict: bool = True
) -> LoadReport:
    """Load ``path`` (a file, a sharded set's index, or a folder) into ``model``, ties and all.

    With ``torchscript=False`` every tie the file records becomes a tie of the
    module -- ``model.b.weight is model.a.weight`` even when the constructor
    built two parameters, for buffers too; a view becomes a parameter sharing
    its base's memory. Names the model ties are kept tied (filled from the file
    when one of them is missing). With ``torchscript=True`` every tied name gets
    its own parameter, cloned from the stored value, so ``torch.jit.trace``
    keeps every name.

    Tensors are taken from the file memory-mapped, in place of the model's own
    (converted only where the model's dtype or device differs; a model built
    on the meta device gets them on the CPU). The file's independent tensors stay
    independent, even with equal values.

    With ``strict=True``, missing or unexpected names and *conflicts* (the
    model ties names for which the file holds different values) raise
    :class:`~converter.errors.ModelMismatchError`; with ``strict=False`` they are
    reported and, for a conflict, the first name's value is kept. Shapes must
    match either way. Everything is checked before the first write: a load that
    fails leaves ``model`` untouched.

    Example:
        >>> model = GPT2LMHeadModel(config)  # doctest: +SKIP
        >>> report = load_model(model, "gpt2/")  # doctest: +SKIP
        >>> model.lm_head.weight is model.transformer.wte.weight, report.tied
        (True, {'lm_head.weight': 'transformer.wte.weight'})
    """
    tied = read_tied(path)
    slots = _slots(model)
    plan = _plan(slots, tied, strict)
    new = _build(slots, tied, plan, torchscript)
    for name, tensor in new.items():  # the first write into the model: nothing can fail any more
        slot = slots[name]
        if slot.is_param:
            slot.module._parameters[slot.leaf] = tensor  # type: ignore[assignment]
        else:
            slot.module._buffers[slot.leaf] = tensor
    return plan.report
