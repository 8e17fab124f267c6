"""What a model folder is: which library wrote it, and which folders make one model.

A diffusers pipeline (``model_index.json``) and a sentence-transformers model
(``modules.json``) are one model spread over component folders, each converted by its
own rules; every other folder is one component, itself. The names are the
conventions table's (:mod:`converter.conventions`); this module reads only small JSON
files, never weights, and validates them (they are untrusted input).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import conventions
from .conventions import ADAPTER_CONFIG, CONFIG, MODEL_INDEX, MODULES, OPEN_CLIP_CONFIG
from .errors import TiesafeError


@dataclass(frozen=True)
class Component:
    """One folder of a model: ``path`` relative to the model folder ("" for the folder itself)."""

    path: str
    library: str


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None when it is missing, unreadable or not an object.

    Example:
        >>> read_json_object(Path("no-such-folder/config.json")) is None
        True
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def detect_library(folder: Path) -> str:
    """The library whose layout ``folder`` has (a key of :data:`converter.conventions.LIBRARIES`).

    Example:
        >>> detect_library(Path("sd-pipeline"))  # doctest: +SKIP
        'diffusers-pipeline'
    """
    if (folder / MODEL_INDEX).is_file():
        return "diffusers-pipeline"
    if (folder / MODULES).is_file():
        return "sentence-transformers"
    if (folder / ADAPTER_CONFIG).is_file():
        return "peft"
    if (folder / OPEN_CLIP_CONFIG).is_file():
        return "open_clip"
    config = read_json_object(folder / CONFIG) or {}
    if "_class_name" in config or "_diffusers_version" in config:
        return "diffusers"
    if "architectures" in config or "model_type" in config:
        return "transformers"
    if isinstance(config.get("architecture"), str):
        return "timm"  # timm's config.json names its model in `architecture`
    # No config to go by: the weight file names say whose they are (diffusers, open_clip, ...).
    written = {conventions.library_of_stem(w.stem) for w in _weight_names(folder)} - {None, "transformers"}
    if len(written) == 1:
        return str(written.pop())
    return "transformers" if config else "other"


def _weight_names(folder: Path) -> list[conventions.WeightName]:
    names = (conventions.parse_weight_name(p.name) for p in folder.iterdir() if p.is_file())
    return [n for n in names if n is not None]


def _subfolder(folder: Path, manifest: str, name: str) -> str:
    """A component folder name from a manifest, checked to be a folder inside the model."""
    if not name or Path(name).is_absolute() or ".." in Path(name).parts or name.startswith("."):
        raise TiesafeError(f"names a component outside the model folder: {name!r}", path=folder / manifest)
    if not (folder / name).is_dir():
        raise TiesafeError(f"names component {name!r}, whose folder is missing", path=folder / manifest)
    return Path(name).as_posix()


def _diffusers_components(folder: Path) -> list[Component]:
    index = read_json_object(folder / MODEL_INDEX)
    if index is None:
        raise TiesafeError("unreadable (not a JSON object)", path=folder / MODEL_INDEX)
    found = []
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list):
            continue  # _class_name, _diffusers_version, options such as requires_safety_checker
        if len(value) != 2 or value[0] is None or value[1] is None:
            continue  # [null, null]: an optional component the pipeline was saved without
        found.append(Component(_subfolder(folder, MODEL_INDEX, name), ""))
    return [Component(c.path, detect_library(folder / c.path)) for c in found]


def _sentence_transformers_components(folder: Path) -> list[Component]:
    try:
        modules = json.loads((folder / MODULES).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        modules = None
    if not isinstance(modules, list) or not all(
        isinstance(m, dict) and isinstance(m.get("path"), str) for m in modules
    ):
        raise TiesafeError("unreadable (a list of modules with a path each)", path=folder / MODULES)
    found = []
    for module in modules:
        path = "" if module["path"] in ("", ".") else _subfolder(folder, MODULES, module["path"])
        # A module folder holding a transformers model is loaded by transformers (which reads
        # shards); any other module by sentence-transformers' Module.load (one file).
        library = "transformers" if detect_library(folder / path) == "transformers" else "sentence-transformers"
        found.append(Component(path, library))
    return found


def model_components(folder: Path) -> tuple[str, list[Component]]:
    """The library of ``folder`` and the component folders that make its one model.

    Raises a one-line error when ``model_index.json`` or ``modules.json`` names a folder that is
    missing or outside the model.

    Example:
        >>> model_components(Path("st-model"))  # doctest: +SKIP
        ('sentence-transformers', [Component(path='', library='transformers'), ...])
    """
    library = detect_library(folder)
    if library == "diffusers-pipeline":
        return library, _diffusers_components(folder)
    if library == "sentence-transformers":
        return library, _sentence_transformers_components(folder)
    return library, [Component("", library)]


def model_files(folder: Path, components: list[Component]) -> list[str]:
    """The files that make the model, relative to ``folder``: its own, and every file inside each
    component folder (hidden ones left out). A subfolder no manifest names is not part of it.

    Example:
        >>> model_files(Path("sd-pipeline"), model_components(Path("sd-pipeline"))[1])  # doctest: +SKIP
        ['model_index.json', 'scheduler/scheduler_config.json', 'unet/config.json', ...]
    """
    found = {p.name for p in folder.iterdir() if p.is_file()}
    for component in components:
        if component.path:
            inside = (p.relative_to(folder) for p in (folder / component.path).rglob("*") if p.is_file())
            found.update(p.as_posix() for p in inside if not any(part.startswith(".") for part in p.parts))
    return sorted(found)


def stray_folders(folder: Path, components: list[Component]) -> list[str]:
    """Subfolders of ``folder`` that are not component folders (training runs, caches...)."""
    owned = {Path(c.path).parts[0] for c in components if c.path}
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in owned)


def is_multi_component(library: str) -> bool:
    """A library whose model spans several folders (converted and uploaded as a whole).

    Example:
        >>> is_multi_component("diffusers-pipeline"), is_multi_component("peft")
        (True, False)
    """
    return library in ("diffusers-pipeline", "sentence-transformers")
