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

import hashlib
import json
import logging
import os
from pathlib import Path

from .static_ties import static_ties


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


def _write_cache(key: str, groups: list[list[str]]) -> None:
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
    groups: dict[int, list[str]] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        groups.setdefault(id(tensor), []).append(name)
    return [names for names in groups.values() if len(names) > 1]
