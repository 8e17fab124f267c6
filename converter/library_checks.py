"""prepare-upload's load check for folders transformers does not load: each with its own library.

A diffusers pipeline or model, a sentence-transformers model and a PEFT adapter are
loaded by their library's own loader, as a user of the uploaded repo will load them,
with empty weights where the library builds that way (diffusers' default
``low_cpu_mem_usage``, the PEFT base model on the ``meta`` device). A library that
is not installed (or does not import) makes the check a warning naming the package.
Nothing from the folder runs: only classes the libraries ship (no remote code).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import conventions
from .components import model_components, read_json_object
from .conventions import ADAPTER_CONFIG, CONFIG, MODEL_INDEX
from .hub_checks import LoadProbe

# The package each library's check imports, and the extra that installs it.
PACKAGES = {
    "diffusers-pipeline": ("diffusers", "tiesafe[diffusers]"),
    "diffusers": ("diffusers", "tiesafe[diffusers]"),
    "sentence-transformers": ("sentence_transformers", "tiesafe[sentence-transformers]"),
    "peft": ("peft", "tiesafe[peft]"),
    "timm": ("timm", "timm"),
    "open_clip": ("open_clip", "open_clip_torch"),
}
# PEFT's task_type -> the transformers auto class its base model is loaded with.
_PEFT_BASES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


@contextmanager
def _quiet() -> Iterator[None]:
    """No warnings, logs or progress bars from the libraries while we probe."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _import(library: str, probe: LoadProbe) -> Any:
    """The library's module, or None with ``probe.skipped`` saying what to install."""
    package, extra = PACKAGES[library]
    if importlib.util.find_spec(package) is None:
        probe.skipped = f"{package} is not installed: pip install '{extra}' to check that {library} loads it"
        return None
    try:
        return importlib.import_module(package)
    except Exception as exc:  # e.g. timm/open_clip without a working torchvision
        probe.skipped = f"{package} does not import here ({_first_line(exc)})"
        return None


def probe_library_load(folder: str | Path, library: str) -> LoadProbe:
    """Load ``folder`` with the loader of ``library`` (a key of :data:`PACKAGES`); what it made of it.

    Example:
        >>> probe_library_load("sd-upload", "diffusers-pipeline").error is None  # doctest: +SKIP
        True
    """
    folder = Path(folder)
    probe = LoadProbe(library=library)
    module = _import(library, probe)
    if module is None:
        return probe
    probe.known = True
    try:
        with _quiet():
            if library == "diffusers-pipeline":
                _load_pipeline(module, folder, probe)
            elif library == "diffusers":
                _load_diffusers_model(module, folder, probe)
            elif library == "sentence-transformers":
                probe.architecture = "SentenceTransformer"
                if _component_keys(folder, probe, None):  # other modules load strictly; transformers only warns
                    module.SentenceTransformer(str(folder), device="cpu", local_files_only=True)
            elif library == "peft":
                _load_peft(module, folder, probe)
            else:
                probe.skipped = f"{library} folders are checked by name only (no loader call here)"
    except Exception as exc:  # a library on user files can fail in any way: one line for the report
        probe.error = _first_line(exc)
    return probe


def _load_pipeline(diffusers: Any, folder: Path, probe: LoadProbe) -> None:
    name = (read_json_object(folder / MODEL_INDEX) or {}).get("_class_name")
    if not (isinstance(name, str) and hasattr(getattr(diffusers, name, None), "from_pretrained")):
        probe.skipped = f"diffusers has no pipeline class {name!r} (custom code: tiesafe never runs it)"
        return
    if not _component_keys(folder, probe, diffusers):  # the pipeline's loader only warns about keys
        return
    pipeline = diffusers.DiffusionPipeline.from_pretrained(folder, use_safetensors=True, local_files_only=True)
    probe.architecture = f"diffusers {type(pipeline).__name__}"


def _component_keys(folder: Path, probe: LoadProbe, diffusers: Any) -> bool:
    """Missing, unexpected and mismatched keys of every diffusers or transformers component, by path.

    Their loaders only warn about keys, so a whole model would load with a weight left
    uninitialised; each component is loaded on its own first (meta device for transformers).
    False (and ``probe.error`` set) when a component does not load at all.
    """
    from .hub import probe_from_pretrained, read_facts  # the transformers probe lives with prepare-upload

    for component in model_components(folder)[1]:
        where = folder / component.path
        if component.library == "diffusers" and diffusers is not None:
            sub = LoadProbe(library="diffusers")
            _load_diffusers_model(diffusers, where, sub)
        elif component.library == "transformers":
            sub = probe_from_pretrained(where, read_facts(where))
        else:
            continue
        prefix = f"{component.path}/" if component.path else ""
        if sub.error is not None:
            probe.error = f"{prefix or './'}: {sub.error}"
            return False
        probe.missing += [prefix + n for n in sub.missing]
        probe.unexpected += [prefix + n for n in sub.unexpected]
        probe.mismatched += [prefix + n for n in sub.mismatched]
    return True


def _load_diffusers_model(diffusers: Any, folder: Path, probe: LoadProbe) -> None:
    name = (read_json_object(folder / CONFIG) or {}).get("_class_name")
    model_class: Any = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not hasattr(model_class, "from_pretrained"):
        probe.skipped = f"diffusers has no model class {name!r} (custom code: tiesafe never runs it)"
        return
    probe.architecture = f"diffusers {name}"
    _, info = model_class.from_pretrained(folder, use_safetensors=True, local_files_only=True, output_loading_info=True)
    probe.missing = sorted(info.get("missing_keys", ()))
    probe.unexpected = sorted(info.get("unexpected_keys", ()))
    probe.mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", ()))


def _base_folder(base: str) -> Path | None:
    """The PEFT base model as a local folder, or its snapshot in the local Hugging Face cache."""
    if Path(base).is_dir():
        return Path(base)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base, local_files_only=True))
    except Exception:  # not cached, or not a repo id: the check is skipped and says so
        return None


def _load_peft(peft: Any, folder: Path, probe: LoadProbe) -> None:
    config = read_json_object(folder / ADAPTER_CONFIG) or {}
    base = config.get("base_model_name_or_path")
    base_folder = _base_folder(base) if isinstance(base, str) and base else None
    if base_folder is None:
        probe.skipped = f"PEFT's base model {base!r} is neither a folder nor in the local cache: adapter not loaded"
        return
    if importlib.util.find_spec("accelerate") is None:
        probe.skipped = "loading PEFT's base on the meta device needs accelerate: pip install 'tiesafe[hub]'"
        return
    import transformers

    model = _base_class(transformers, config, base_folder).from_pretrained(
        base_folder, device_map="meta", local_files_only=True
    )
    peft_model = peft.PeftModel.from_pretrained(model, folder, low_cpu_mem_usage=True)
    probe.architecture = f"PEFT {config.get('peft_type', '')} on {type(model).__name__}"
    adapter = {n for n, _ in peft_model.named_parameters() if "lora_" in n or "adapter" in n}
    stored = set(
        _safetensors_names(folder / conventions.safetensors_name(conventions.safetensors_stem("adapter_model")))
    )
    as_saved = {_adapter_key(n) for n in adapter}
    probe.unexpected = sorted(stored - as_saved)
    probe.missing = sorted(as_saved - stored) if stored else []


def _base_class(transformers: Any, adapter_config: dict[str, Any], base_folder: Path) -> Any:
    """The class PEFT's base is loaded with: the task type's auto class, else the base config's
    architecture (an adapter saved without task_type was trained on that class), else AutoModel."""
    task = _PEFT_BASES.get(str(adapter_config.get("task_type")))
    if task is not None:
        return getattr(transformers, task)
    architectures = (read_json_object(base_folder / CONFIG) or {}).get("architectures")
    named = architectures[0] if isinstance(architectures, list) and architectures else None
    found = getattr(transformers, named, None) if isinstance(named, str) else None
    return found if hasattr(found, "from_pretrained") else transformers.AutoModel


def _adapter_key(name: str) -> str:
    """A PeftModel parameter name as PEFT saves it (the adapter name dropped)."""
    return name.replace(".default.", ".")


def _safetensors_names(path: Path) -> list[str]:
    from .stfile import read_safetensors

    return list(read_safetensors(path).entries) if path.is_file() else []
