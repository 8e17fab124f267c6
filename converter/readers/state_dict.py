"""Find the model's weights in a checkpoint's object tree, and say what was left out.

A training checkpoint is a dict of everything a run needs to resume: the weights,
an optimizer's state, schedulers, RNG state, arguments, a loss. The weights are the
*state dict with the most tensor bytes* — never the first tensor found (nanoGPT's
top-level ``best_val_loss`` is a tensor beside ``model``). Two state dicts of weight
size (``model`` and ``ema``) are a question only the user can answer (``--key``), and
a state dict whose parameters are empty (DeepSpeed ZeRO-3 placeholders) is an error,
never an empty output.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..descriptors import TensorRef
from ..errors import TiesafeError, UnsupportedError, quoted
from ..reports import human_bytes
from .inert import InertObject, describe
from .unpickler import TensorNode

# A second state dict holding at least this share of the largest one's bytes (in
# storages of its own) makes the choice ambiguous: EMA weights, a teacher, a GAN's
# other half, the embeddings of a Megatron checkpoint nested beside its layers. Dicts
# of scalars (metrics, a loss, a step) are never rivals, whatever their share.
AMBIGUOUS_SHARE = 0.01

# Entries that hold training state, never weights, by the keys trainers save them under.
NON_WEIGHT_KEYS = {
    "optimizer": "optimizer state",
    "optimizers": "optimizer state",
    "optimizer_states": "optimizer state",
    "optimizer_state_dict": "optimizer state",
    "optimizer_state": "optimizer state",
    "optim": "optimizer state",
    "optim_state": "optimizer state",
    "optim_state_dict": "optimizer state",
    "opt": "optimizer state",
    "opt_state": "optimizer state",
    "last_optimizer_state": "optimizer state",
    "lr_scheduler": "scheduler state",
    "lr_schedulers": "scheduler state",
    "scheduler": "scheduler state",
    "schedulers": "scheduler state",
    "scaler": "gradient scaler state",
    "grad_scaler": "gradient scaler state",
    "amp": "gradient scaler state",
    "rng_state": "RNG state",
    "rng_states": "RNG state",
    "cpu_rng_state": "RNG state",
    "cuda_rng_state": "RNG state",
    "torch_rng_state": "RNG state",
    "torch_manual_seed": "RNG state",  # accelerate's random_states_N.pkl
    "torch_cuda_manual_seed": "RNG state",
    "torch_xla_manual_seed": "RNG state",
    "random_state": "RNG state",
}


@dataclass(frozen=True)
class Candidate:
    """A mapping of names to tensors somewhere in the tree."""

    path: tuple[Any, ...]  # keys from the root
    mapping: dict[Any, Any]
    tensors: int
    nbytes: int
    storages: frozenset[str]
    holds_arrays: bool  # a tensor of more than one element: not only scalars (metrics, a loss)

    @property
    def key(self) -> str:
        return "/".join(str(p) for p in self.path)

    def shown(self) -> str:
        return f"{quoted(self.key or '(top level)')} ({self.tensors} tensors, {human_bytes(self.nbytes)})"


@dataclass
class Choice:
    weights: dict[Any, Any]
    key: str | None  # where the weights were found (None: the top level)
    skipped: list[str]  # "name: what it is", for the report


def _is_optimizer_state(value: Any) -> bool:
    return isinstance(value, dict) and "state" in value and "param_groups" in value


def _non_weight(key: Any, value: Any) -> str | None:
    """What a training-state entry is, or None when it may hold weights."""
    if isinstance(key, str) and key in NON_WEIGHT_KEYS:
        return NON_WEIGHT_KEYS[key]
    if _is_optimizer_state(value):
        return "optimizer state"
    if isinstance(value, (list, tuple)) and value and all(_is_optimizer_state(v) for v in value):
        return "optimizer state"
    return None


def _children(value: Any) -> Iterator[tuple[Any, Any]]:
    if isinstance(value, dict):
        yield from value.items()
    elif isinstance(value, (list, tuple)):
        yield from enumerate(value)


def _candidates(root: Any) -> list[Candidate]:
    found: list[Candidate] = []
    seen: set[int] = set()  # a pickle can make a container hold itself
    stack: list[tuple[tuple[Any, ...], Any]] = [((), root)]
    while stack:
        path, value = stack.pop()
        if id(value) in seen or not isinstance(value, (dict, list, tuple)):
            continue
        seen.add(id(value))
        if isinstance(value, dict):
            refs = [v.ref for v in value.values() if isinstance(v, TensorNode)]
            if refs:
                found.append(_candidate(path, value, refs))
        children = value.items() if isinstance(value, dict) else enumerate(value)
        for key, child in reversed(list(children)):
            if isinstance(child, (dict, list, tuple)) and _non_weight(key, child) is None:
                stack.append(((*path, key), child))
    return found


def _candidate(path: tuple[Any, ...], mapping: dict[Any, Any], refs: list[TensorRef | None]) -> Candidate:
    """A state dict's bytes, a tied alias (same storage, same geometry) counted once.

    Grouped by storage first: hashing every descriptor whole would cost more than the rest
    of the choice for a file of 100,000 tensors, where almost every storage has one name.
    """
    first: dict[str, TensorRef] = {}
    repeats: list[TensorRef] = []
    for ref in refs:
        if ref is not None and first.setdefault(ref.storage, ref) is not ref:
            repeats.append(ref)
    distinct = [*first.values(), *{ref for ref in repeats if ref != first[ref.storage]}]
    return Candidate(
        path,
        mapping,
        len(refs),
        sum(ref.nbytes for ref in distinct),
        frozenset(first),
        any(ref.numel > 1 for ref in distinct),
    )


def _tensors_inside(value: Any, limit: int = 1_000_000) -> int:
    """How many tensors an entry holds, through containers and inert objects alike."""
    count, seen, stack = 0, set(), [value]
    while stack and limit:
        limit -= 1
        item = stack.pop()
        if isinstance(item, TensorNode):
            count += 1
        elif id(item) not in seen:
            seen.add(id(item))
            if isinstance(item, InertObject):
                stack.extend(item.children())
            elif isinstance(item, dict):
                stack.extend(item.values())
            elif isinstance(item, (list, tuple, set, frozenset)):
                stack.extend(item)
    return count


def _what(key: Any, value: Any) -> str:
    """``best_loss: numpy.float64``, ``args: argparse.Namespace (inert)``, ``optimizer: optimizer state``."""
    kind = _non_weight(key, value)
    if kind is None:
        if isinstance(value, TensorNode):
            kind = "tensor, not part of the weights"
        elif isinstance(value, (InertObject, type)):
            kind = f"{describe(value)} (inert)"
            inside = _tensors_inside(value)
            if inside:
                kind = f"{describe(value)} (inert; {inside} tensor{'s' * (inside != 1)} inside, skipped)"
        elif isinstance(value, dict):
            kind = f"dict of {len(value)}"
        else:
            kind = type(value).__name__
    return f"{display(key)}: {kind}"


def display(name: object) -> str:
    """A key as the report shows it: plain when it is a short printable string, else quoted."""
    if isinstance(name, str) and name.isprintable() and len(name) <= 200:
        return name
    return quoted(name)


def flattened(tree: dict[Any, Any], prefix: str = "", depth: int = 0) -> dict[Any, Any]:
    """Nested dicts of tensors as one mapping with dotted names (``{"a": {"b": t}}`` -> ``{"a.b": t}``).

    Training state (optimizer, RNG) is not descended into; other values stay, named, to be listed.
    """
    if depth > 64:
        raise TiesafeError("the chosen entry nests dicts more than 64 deep")
    flat: dict[Any, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}" if isinstance(key, str) else key
        if isinstance(value, dict) and isinstance(key, str) and _non_weight(key, value) is None:
            flat.update(flattened(value, f"{name}.", depth + 1))
        else:
            flat[name] = value
    return flat


def _look_up(root: Any, key: str) -> tuple[dict[Any, Any], tuple[Any, ...]]:
    node, path = root, tuple[Any, ...]()
    for part in key.split("/"):
        if isinstance(node, dict) and part in node:
            step: Any = part
        elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            step = int(part)
        else:
            raise TiesafeError(f"no entry {quoted(key)} in the checkpoint (looked up by --key)")
        node, path = node[step], (*path, step)
    if not isinstance(node, dict):
        raise TiesafeError(f"entry {quoted(key)} is not a dict of tensors")
    return node, path


def _skipped_along(root: Any, path: tuple[Any, ...], weights: dict[Any, Any]) -> list[str]:
    """Every entry not converted: the weights' non-tensor entries and the siblings along the path."""
    prefix = "/".join(display(p) for p in path)
    skipped = [
        f"{prefix}/{_what(k, v)}" if prefix else _what(k, v)
        for k, v in weights.items()
        if not isinstance(v, TensorNode)
    ]
    node = root
    for depth, step in enumerate(path):
        above = "/".join(display(p) for p in path[:depth])
        skipped += [f"{above}/{_what(k, v)}" if above else _what(k, v) for k, v in _children(node) if k != step]
        node = node[step]
    return skipped


def _deepspeed_placeholders(root: Any) -> None:
    """Refuse a DeepSpeed ZeRO-3 model-states file: its parameters are empty placeholders."""
    if not (isinstance(root, dict) and "param_shapes" in root and isinstance(root.get("module"), dict)):
        return
    empty = [
        k for k, v in root["module"].items() if isinstance(v, TensorNode) and v.ref is not None and not v.ref.numel
    ]
    if empty:
        raise UnsupportedError(
            "this is a DeepSpeed ZeRO-3 model-states file: its parameters are empty placeholders "
            f"({len(empty)} of them, e.g. {quoted(empty[0])}) and the weights live in the optimizer partitions "
            "(*_optim_states.pt); convert the checkpoint folder (global_stepN) instead of this file"
        )


def _training_state_file(root: Any) -> None:
    """Refuse a file that is all training state: an optimizer's or RNG state_dict holds no weights.

    A Trainer's checkpoint folder has ``optimizer.pt`` and ``rng_state.pth`` beside the
    weights; their tensors (Adam moments, the CPU generator's bytes) must never be written as
    if they were a model's.
    """
    if _is_optimizer_state(root):
        raise TiesafeError("this is an optimizer's state (state, param_groups), not model weights")
    if isinstance(root, dict) and isinstance(root.get("cpu"), TensorNode) and {"python", "numpy"} & set(root):
        raise TiesafeError("this is a saved RNG state (python, numpy, cpu generators), not model weights")


def choose_weights(root: Any, key: str | None) -> Choice:
    """Pick the state dict in ``root`` (or the one ``key`` names) and list what is left out.

    Example:
        >>> choice = choose_weights(tree, None)  # doctest: +SKIP
        >>> choice.key, choice.skipped[:2]
        ('model', ['optimizer: optimizer state', 'iter_num: int'])
    """
    if isinstance(root, TensorNode):
        raise TiesafeError("the checkpoint is a single tensor, not a state dict")
    if key is not None:
        weights, path = _look_up(root, key)
        if not any(isinstance(v, TensorNode) for v in weights.values()):
            weights = flattened(weights)  # a dict of dicts (Megatron's model): names joined with dots
        return Choice(weights, key, _skipped_along(root, path, weights))
    _deepspeed_placeholders(root)
    _training_state_file(root)
    candidates = sorted(_candidates(root), key=lambda c: (-c.nbytes, -c.tensors))
    if not candidates:
        raise TiesafeError(_nothing_found(root))
    best = candidates[0]
    rivals = [
        c
        for c in candidates[1:]
        if c.holds_arrays and (own := _own_bytes(c, best)) and own >= AMBIGUOUS_SHARE * best.nbytes
    ]
    if rivals:
        listed = ", ".join(c.shown() for c in [best, *rivals][:6])
        more = f" and {len(rivals) - 5} more" if len(rivals) > 5 else ""
        raise TiesafeError(
            f"the checkpoint holds several state dicts: {listed}{more}; choose one with --key "
            "(a key naming a dict of dicts converts all of them, with dotted names)"
        )
    if best.nbytes == 0 and all(
        v.ref is not None and not v.ref.numel for v in best.mapping.values() if isinstance(v, TensorNode)
    ):
        raise TiesafeError(
            f"the state dict {best.shown()} holds only empty tensors: no weights to convert "
            "(a placeholder-only checkpoint, such as DeepSpeed ZeRO-3's model states)"
        )
    return Choice(best.mapping, best.key or None, _skipped_along(root, best.path, best.mapping))


def _own_bytes(candidate: Candidate, best: Candidate) -> int:
    """Bytes of ``candidate``'s tensors whose storages ``best`` does not use."""
    return sum(
        ref.nbytes
        for ref in {v.ref for v in candidate.mapping.values() if isinstance(v, TensorNode) and v.ref is not None}
        if ref.storage not in best.storages
    )


def _nothing_found(root: Any) -> str:
    if isinstance(root, (InertObject, type)):
        inside = _tensors_inside(root)
        return (
            f"the checkpoint is a pickled {describe(root)} object"
            + (f" holding {inside} tensors, which tiesafe never rebuilds" if inside else "")
            + "; save model.state_dict() instead of the model object"
        )
    if not isinstance(root, dict):
        return f"the checkpoint holds a {type(root).__name__}, not a state dict"
    holders = [display(k) for k, v in root.items() if _tensors_inside(v) and not isinstance(v, (dict, list, tuple))]
    if holders:
        return (
            f"no state dict found: the tensors are inside pickled objects ({', '.join(holders[:6])}), "
            "which tiesafe never rebuilds; save model.state_dict() instead of the model object"
        )
    dicts = [display(k) for k, v in root.items() if isinstance(v, dict)]
    hint = f" (entries holding dicts: {', '.join(dicts[:8])}; pick one with --key)" if dicts else ""
    return f"no tensors found in the checkpoint{hint}"
