"""Ties a model *declares*: what its config and class tie, whatever the files hold.

Saving each shard with ``torch.save`` separately breaks shared storage: a tied
embedding lands in two files as two copies. The model folder still says they are
one tensor: ``config.json`` names the architecture, and the transformers class
ties the weights when it is built. When transformers' source settles the answer
(static_ties.py reads it without importing anything), that answer is used;
otherwise we build the class on the ``meta`` device (no memory, no weights, no
code from the folder: only classes transformers ships, no ``trust_remote_code``)
and read the tie groups off parameter identity.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .static_ties import static_ties, transformers_root


def _architecture(folder: Path) -> tuple[str | None, dict[str, object]]:
    """The first ``architectures`` entry of ``config.json``, and the config."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, {}
    if not isinstance(config, dict):
        return None, {}
    architectures = config.get("architectures")
    name = architectures[0] if isinstance(architectures, list) and architectures else None
    return (name if isinstance(name, str) else None), config


def declared_ties(folder: str | Path) -> list[list[str]]:
    """Groups of parameter/buffer names the model class of ``folder`` ties together.

    Empty when the folder has no usable ``config.json`` or transformers does not
    know the architecture. The first name of a group is the one the module
    registers first (the input embedding before ``lm_head``).

    Example:
        >>> declared_ties("llama-folder")  # doctest: +SKIP
        [['model.embed_tokens.weight', 'lm_head.weight']]
    """
    folder = Path(folder)
    architecture, config = _architecture(folder)
    if architecture is None:
        return []
    groups = static_ties(config, architecture)  # milliseconds, when transformers' source settles it
    if groups is not None:
        return groups
    key = _cache_key(folder)
    cached = _read_cache().get(key) if key else None
    if isinstance(cached, list) and all(isinstance(g, list) and all(isinstance(n, str) for n in g) for g in cached):
        return cached
    groups = _build_and_read_ties(folder, architecture)
    if key:
        _write_cache(key, groups)
    return groups


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("TIESAFE_CACHE_DIR") or Path(base) / "tiesafe") / "declared-ties.json"


def _cache_key(folder: Path) -> str | None:
    """transformers' version and the config's bytes: all that decides the tie groups.

    Building the model class costs seconds (torch and transformers imports); a batch
    of checkpoints of one architecture, or a second run, pays it once.
    """
    from importlib import metadata  # lazily: only configs the source does not settle need the cache

    try:
        version = metadata.version("transformers")
        config = (folder / "config.json").read_bytes()
    except (OSError, metadata.PackageNotFoundError):
        return None
    return f"{version}:{hashlib.sha256(config).hexdigest()}"


def _read_cache() -> dict[str, object]:
    try:
        data = json.loads(_cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(key: str, groups: object) -> None:
    path = _cache_file()
    entries = _read_cache()
    entries[key] = groups
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(entries), encoding="utf-8")
        os.replace(tmp, path)  # readers see the old cache or the new one, never half of it
    except OSError:
        pass  # a cache that cannot be written only costs time


def _build_and_read_ties(folder: Path, architecture: str) -> list[list[str]]:
    import torch  # lazily: only folders with a config pay for it
    import transformers

    model_class = getattr(transformers, architecture, None)
    if not isinstance(model_class, type) or not hasattr(model_class, "config_class"):
        return []
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity(logging.ERROR)
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        with torch.device("meta"):
            model = model_class(config)
    except Exception as exc:  # an odd config must not stop the conversion: no declared ties then
        logging.getLogger(__name__).info("could not build %s on meta: %s", architecture, exc)
        return []
    finally:
        transformers.logging.set_verbosity(verbosity)
    return _identity_groups(model)


# --------------------------------------------------------------------------- config.json without architectures


@dataclass(frozen=True)
class Declared:
    """Tie groups a folder's model declares, and how its class was found when the config did not name it."""

    groups: list[list[str]]
    note: str | None = None
    architecture: str | None = None  # the transformers class, named by the config or chosen


def resolve_declared(folder: str | Path, names: Sequence[str]) -> Declared:
    """The ties of ``folder``'s model for a checkpoint holding ``names``.

    ``architectures`` names the class when present. A ``config.json`` saved with
    ``config.save_pretrained`` has only ``model_type``: the candidates are the classes
    transformers' auto mappings list for it, each built on the ``meta`` device, and the
    one whose parameter names cover the checkpoint's with the fewest extra is chosen
    (several equally good with different ties: none is trusted, and the note says so).
    timm's ``config.json`` names a timm model in ``architecture``: no transformers class.

    Example:
        >>> resolve_declared("tiny-llama", ["model.embed_tokens.weight", "lm_head.weight"]).note  # doctest: +SKIP
        "config.json names no architecture: LlamaForCausalLM chosen for model_type 'llama' ..."
    """
    folder = Path(folder)
    architecture, config = _architecture(folder)
    if architecture is not None:
        return Declared(declared_ties(folder), architecture=architecture)
    model_type = config.get("model_type")
    if isinstance(config.get("architecture"), str) and not isinstance(model_type, str):
        return Declared([], f"timm model {config['architecture']}: ties are those its file shares")
    if not isinstance(model_type, str):
        return Declared([])
    candidates = auto_classes(model_type)
    if not candidates:
        return Declared([], f"transformers knows no model_type {model_type!r}: no declared ties")
    key = _cache_key(folder)
    if key:
        key += ":" + hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()
    cached = _read_cache().get(key) if key else None
    if isinstance(cached, dict) and _valid_groups(cached.get("groups")) and isinstance(cached.get("note"), str):
        chosen = cached.get("architecture")
        return Declared(cached["groups"], cached["note"], chosen if isinstance(chosen, str) else None)
    found = _choose_class(folder, model_type, candidates, names)
    if key:
        _write_cache(key, {"groups": found.groups, "note": found.note, "architecture": found.architecture})
    return found


def _valid_groups(groups: object) -> bool:
    return isinstance(groups, list) and all(isinstance(g, list) and all(isinstance(n, str) for n in g) for g in groups)


@functools.cache
def auto_classes(model_type: str) -> list[str]:
    """The class names transformers' auto mappings list for ``model_type`` (read with ast, nothing imported).

    Example:
        >>> auto_classes("llama")[:2]  # doctest: +SKIP
        ['LlamaModel', 'LlamaForCausalLM']
    """
    root = transformers_root()
    if root is None:
        return []
    try:
        module = ast.parse((root / "models" / "auto" / "modeling_auto.py").read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return []
    found: list[str] = []
    for node in module.body:
        if not (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id.endswith("_MAPPING_NAMES") for t in node.targets)
        ):
            continue
        for pair in ast.walk(node.value):
            if not (isinstance(pair, ast.Tuple) and len(pair.elts) == 2):
                continue
            first, second = pair.elts
            if not (isinstance(first, ast.Constant) and first.value == model_type):
                continue
            values = second.elts if isinstance(second, ast.Tuple) else [second]
            found += [v.value for v in values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    return list(dict.fromkeys(found))


def _choose_class(folder: Path, model_type: str, candidates: list[str], names: Sequence[str]) -> Declared:
    import torch  # lazily: only a config without architectures gets here
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity(logging.ERROR)
    wanted = set(names)
    fits: list[tuple[int, str, list[list[str]]]] = []
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        for name in candidates:
            model_class = getattr(transformers, name, None)
            if not isinstance(model_class, type):
                continue
            try:
                with torch.device("meta"):
                    model = model_class(config)
            except Exception:  # a head this config cannot build: not a candidate
                continue
            keys = set(model.state_dict())
            # Names the class drops on load (old per-layer rotary buffers, ...) do not count against it.
            ignored = getattr(model_class, "_keys_to_ignore_on_load_unexpected", None) or []
            if {n for n in wanted if not any(re.search(p, n) for p in ignored)} <= keys:
                fits.append((len(keys - wanted), name, _identity_groups(model)))
    except Exception as exc:  # an odd config must not stop the conversion: no declared ties then
        return Declared(
            [], f"config.json names no architecture and model_type {model_type!r} could not be built ({exc})"
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    if not fits:
        return Declared([], f"config.json names no architecture and no {model_type} class has the checkpoint's names")
    fits.sort(key=lambda fit: fit[0])
    best = [fit for fit in fits if fit[0] == fits[0][0]]
    if len({json.dumps(fit[2]) for fit in best}) > 1:
        classes = ", ".join(fit[1] for fit in best)
        return Declared(
            [], f"config.json names no architecture; {classes} fit the checkpoint and tie differently: no declared ties"
        )
    return Declared(
        best[0][2],
        f"config.json names no architecture: {best[0][1]} chosen for model_type {model_type!r} "
        f"(its parameter names match the checkpoint's; {len(fits)} of {len(candidates)} classes fit)",
        best[0][1],
    )


def _identity_groups(model: Any) -> list[list[str]]:
    """Names of one parameter or buffer object: what the built model ties."""
    groups: dict[int, list[str]] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        groups.setdefault(id(tensor), []).append(name)
    return [names for names in groups.values() if len(names) > 1]
