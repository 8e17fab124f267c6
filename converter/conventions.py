"""The file names each library writes and loads: one table, asked by every module that names a file.

Read from the loaders' own code (transformers ``modeling_utils``/``utils``, diffusers
``utils/constants.py`` and ``models/model_loading_utils.py``, PEFT ``utils/constants.py``,
sentence-transformers ``base/modules/module.py``, timm ``models/_hub.py``, open_clip
``constants.py``):

- a weight file is ``STEM[.VARIANT][-0000K-of-0000N].EXT``; the variant goes before the
  extension (``pytorch_model.fp16.bin``) and the shard number after the variant
  (``pytorch_model.fp16-00001-of-00002.bin``), as ``save_pretrained`` writes them;
- an index is ``STEM.EXT.index[.VARIANT].json`` (``model.safetensors.index.fp16.json``);
  diffusers before 0.27 wrote ``STEM.EXT.VARIANT.index.json``, which it still reads;
- the pickle stem maps to the safetensors stem in :data:`CONVENTIONS`; any other
  ``X.bin/.pt/.pth/.ckpt`` becomes ``X.safetensors`` (what the Hub's convert service does).

Nothing here reads a file: these are names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Pickles a training run leaves beside the weights that are not weights.
NOT_WEIGHTS = re.compile(r"^(training_args\.bin|optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state.*\.pth)$")

CONFIG = "config.json"
MODEL_INDEX = "model_index.json"  # a diffusers pipeline: one component folder per entry
MODULES = "modules.json"  # a sentence-transformers model: one module folder per entry
ADAPTER_CONFIG = "adapter_config.json"  # a PEFT adapter
OPEN_CLIP_CONFIG = "open_clip_config.json"  # an open_clip model on the Hub


@dataclass(frozen=True)
class Convention:
    """One family of weight names: the pickle stem a library wrote and the safetensors stem it loads."""

    pickle_stem: str
    safetensors_stem: str
    library: str  # a key of LIBRARIES: the library that writes this stem (timm and
    # sentence-transformers modules write pytorch_model too, and load model.safetensors)


CONVENTIONS: tuple[Convention, ...] = (
    Convention("pytorch_model", "model", "transformers"),
    Convention("diffusion_pytorch_model", "diffusion_pytorch_model", "diffusers"),
    Convention("adapter_model", "adapter_model", "peft"),
    Convention("open_clip_pytorch_model", "open_clip_model", "open_clip"),
)
_BY_PICKLE_STEM = {c.pickle_stem: c for c in CONVENTIONS}


@dataclass(frozen=True)
class Library:
    """A kind of model folder: how it is recognised, whether its loader reads shards, who loads it."""

    name: str
    marker: str  # what identifies the folder (README)
    # The folder's pytorch_model / diffusion_pytorch_model sets are loaded by a loader that reads
    # shards through an index (transformers, diffusers; the transformers copy beside an open_clip
    # model). Other stems (adapter_model, open_clip_model, X) are always one file.
    shards: bool
    loader: str  # the loader the tests load the output with (README)


LIBRARIES: dict[str, Library] = {
    lib.name: lib
    for lib in (
        Library("transformers", f"{CONFIG} with architectures or model_type", True, "AutoModel*.from_pretrained"),
        Library("diffusers-pipeline", MODEL_INDEX, True, "DiffusionPipeline.from_pretrained"),
        Library("diffusers", f"{CONFIG} with _class_name", True, "ModelMixin.from_pretrained"),
        Library("sentence-transformers", MODULES, False, "SentenceTransformer(folder)"),
        Library("peft", ADAPTER_CONFIG, False, "PeftModel.from_pretrained"),
        Library("timm", f"{CONFIG} with architecture", False, "timm.create_model(pretrained_cfg_overlay=...)"),
        Library("open_clip", f"{OPEN_CLIP_CONFIG} or open_clip_pytorch_model.bin", True, "open_clip hf-hub loader"),
        Library("other", "any single pickle", True, "safetensors.torch.load_file"),
    )
}

_WEIGHT_NAME = re.compile(
    r"^(?P<stem>[^.]+?)(?:\.(?P<variant>[^.]+?))?(?:-(?P<k>\d{5})-of-(?P<n>\d{5}))?\.(?P<ext>bin|pt|pth|ckpt)$"
)
_INDEX_NAME = re.compile(r"^(?P<stem>[^.]+)\.(?P<ext>bin|pt|pth|ckpt)\.index(?:\.(?P<variant>[^.]+))?\.json$")
_LEGACY_INDEX_NAME = re.compile(r"^(?P<stem>[^.]+)\.(?P<ext>bin|pt|pth|ckpt)\.(?P<variant>[^.]+)\.index\.json$")


@dataclass(frozen=True)
class WeightName:
    """A pickle file name taken apart: ``pytorch_model.fp16-00001-of-00002.bin``."""

    stem: str  # pytorch_model
    variant: str | None  # fp16
    shard: tuple[int, int] | None  # (1, 2)

    @property
    def known(self) -> bool:
        """A stem of :data:`CONVENTIONS` (its library loads the converted name)."""
        return self.stem in _BY_PICKLE_STEM


def parse_weight_name(name: str) -> WeightName | None:
    """Stem, variant and shard number of a pickle weight file name (None if it is no such name).

    Example:
        >>> parse_weight_name("pytorch_model.fp16-00001-of-00002.bin")
        WeightName(stem='pytorch_model', variant='fp16', shard=(1, 2))
    """
    match = _WEIGHT_NAME.match(name)
    if match is None:
        return None
    shard = (int(match["k"]), int(match["n"])) if match["k"] else None
    return WeightName(match["stem"], match["variant"], shard)


def parse_index_name(name: str) -> tuple[str, str | None] | None:
    """(stem, variant) of a pickle index (``pytorch_model.bin.index.fp16.json``), None otherwise.

    Example:
        >>> parse_index_name("diffusion_pytorch_model.bin.index.json")
        ('diffusion_pytorch_model', None)
    """
    match = _INDEX_NAME.match(name) or _LEGACY_INDEX_NAME.match(name)
    return (match["stem"], match["variant"]) if match else None


def is_legacy_index_name(name: str) -> bool:
    """An index named as diffusers before 0.27 named a variant's (``STEM.bin.VARIANT.index.json``)."""
    return _INDEX_NAME.match(name) is None and _LEGACY_INDEX_NAME.match(name) is not None


def library_of_stem(pickle_stem: str) -> str | None:
    """The library that writes ``pickle_stem`` (None for a stem of no convention).

    Example:
        >>> library_of_stem("diffusion_pytorch_model"), library_of_stem("ema")
        ('diffusers', None)
    """
    convention = _BY_PICKLE_STEM.get(pickle_stem)
    return convention.library if convention else None


def safetensors_stem(pickle_stem: str) -> str:
    """The stem the library of ``pickle_stem`` loads: ``pytorch_model`` -> ``model``; others unchanged.

    Example:
        >>> safetensors_stem("open_clip_pytorch_model"), safetensors_stem("ema")
        ('open_clip_model', 'ema')
    """
    convention = _BY_PICKLE_STEM.get(pickle_stem)
    return convention.safetensors_stem if convention else pickle_stem


def _with_variant(stem: str, variant: str | None) -> str:
    return f"{stem}.{variant}" if variant else stem


def safetensors_name(stem: str, variant: str | None = None, shard: tuple[int, int] | None = None) -> str:
    """The safetensors file name for a safetensors stem, variant and shard number.

    Example:
        >>> safetensors_name("model", "fp16", (1, 2))
        'model.fp16-00001-of-00002.safetensors'
    """
    number = f"-{shard[0]:05d}-of-{shard[1]:05d}" if shard else ""
    return f"{_with_variant(stem, variant)}{number}.safetensors"


def shard_pattern(stem: str, variant: str | None = None) -> str:
    """huggingface_hub's ``filename_pattern`` for a set: ``model.fp16{suffix}.safetensors``."""
    return _with_variant(stem, variant) + "{suffix}.safetensors"


def index_name(stem: str, variant: str | None = None) -> str:
    """The safetensors index of a set, as transformers and diffusers name it (variant before ``.json``).

    Example:
        >>> index_name("model", "fp16")
        'model.safetensors.index.fp16.json'
    """
    return f"{stem}.safetensors.index{'.' + variant if variant else ''}.json"


def converted_name(pickle_name: str) -> str:
    """The safetensors name of one pickle file (not of a sharded set, which is re-planned whole).

    Example:
        >>> converted_name("pytorch_model.fp16.bin"), converted_name("open_clip_pytorch_model.bin")
        ('model.fp16.safetensors', 'open_clip_model.safetensors')
        >>> converted_name("x.ckpt"), converted_name("pytorch_model-00001-of-00002.bin")
        ('x.safetensors', 'model-00001-of-00002.safetensors')
    """
    parsed = parse_weight_name(pickle_name)
    if parsed is None:
        return pickle_name.rsplit(".", 1)[0] + ".safetensors"
    return safetensors_name(safetensors_stem(parsed.stem), parsed.variant, parsed.shard)


def set_file_names(stem: str = "model", variant: str | None = None) -> re.Pattern[str]:
    """The names an output set for ``stem``/``variant`` may use: one file, shards, the index (``fullmatch``).

    Example:
        >>> bool(set_file_names("model", "fp16").fullmatch("model.fp16-00001-of-00003.safetensors"))
        True
    """
    s = re.escape(_with_variant(stem, variant))
    index = re.escape(index_name(stem, variant))
    return re.compile(rf"{s}\.safetensors|{index}|{s}-\d{{5}}-of-\d{{5}}\.safetensors")


def is_shard_name(name: str) -> bool:
    """``STEM[.VARIANT]-0000K-of-0000N.safetensors``: a file that belongs to a sharded set.

    Example:
        >>> is_shard_name("diffusion_pytorch_model-00001-of-00002.safetensors"), is_shard_name("model.safetensors")
        (True, False)
    """
    return re.fullmatch(r"[^.]+(\.[^.]+)?-\d{5}-of-\d{5}\.safetensors", name) is not None


def index_of_shard(name: str) -> str | None:
    """The index a safetensors shard belongs with: ``model.fp16-00001-of-00002.safetensors`` ->
    ``model.safetensors.index.fp16.json``; None for a name that is no shard.

    Example:
        >>> index_of_shard("diffusion_pytorch_model-00001-of-00002.safetensors")
        'diffusion_pytorch_model.safetensors.index.json'
    """
    match = re.fullmatch(r"([^.]+?)(?:\.([^.]+))?-\d{5}-of-\d{5}\.safetensors", name)
    return index_name(match[1], match[2]) if match else None


def safetensors_indexes(names: list[str]) -> list[str]:
    """The safetensors index files among ``names`` (any stem, any variant)."""
    return sorted(n for n in names if re.fullmatch(r"[^.]+\.safetensors\.index(\.[^.]+)?\.json", n))


def main_weights(names: list[str]) -> str | None:
    """The single safetensors weight file a loader takes in a folder listing, without variant.

    Example:
        >>> main_weights(["config.json", "diffusion_pytorch_model.safetensors"])
        'diffusion_pytorch_model.safetensors'
    """
    for convention in CONVENTIONS:
        if f"{convention.safetensors_stem}.safetensors" in names:
            return f"{convention.safetensors_stem}.safetensors"
    singles = [n for n in names if n.endswith(".safetensors") and not is_shard_name(n)]
    return singles[0] if len(singles) == 1 else None
