"""Convert one model folder: pickles in, the names its library loads out.

A folder holds one or more *weight sets* -- ``pytorch_model.bin``, shards with their
index, a variant such as ``pytorch_model.fp16.bin``, ``diffusion_pytorch_model.bin``,
``adapter_model.bin``, ... (the names are :mod:`converter.conventions`' table) -- plus
config, tokenizer and the rest. A diffusers pipeline (``model_index.json``) or a
sentence-transformers model (``modules.json``) is one model over several component
folders (:mod:`converter.components`), each converted by its own rules. Each set is
read as one checkpoint; ties are found within files (shared storage), across files
(ties the component's config declares, checked bit-identical) and optionally among
identical bytes. The whole output -- every set of every component, the side files --
appears at once, after every set verified.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
import time
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import conventions
from .components import Component, is_multi_component, model_components, model_files, stray_folders
from .conventions import ADAPTER_CONFIG, NOT_WEIGHTS, WEIGHT_SUFFIXES, WeightName
from .declared import resolve_declared
from .descriptors import Checkpoint, StorageRecord, TensorRef
from .errors import TiesafeError, VerificationError
from .flat_convert import FlatPlan, stage_flat
from .gcpause import paused_gc
from .geometry import contiguous_strides
from .identical import costly_candidates, equal_bytes, identical_groups, search_is_costly
from .layout import SetPlan, plan_shards, stored_items
from .names import strip_prefixes, strips_nothing
from .readers.flat_file import FlatFile, NotFlat, read_flat_file
from .readers.torchfile import read_checkpoint
from .reports import SavedBytesReport
from .sharing import SharingPlan, plan_sharing, retie
from .stfile import read_safetensors
from .verify import verify_output
from .writer import StagedWrites, WriteProgress

__all__ = [
    "ADAPTER_CONFIG",
    "NOT_WEIGHTS",
    "WEIGHT_SUFFIXES",
    "FolderPlan",
    "FolderReport",
    "SetOutput",
    "Tie",
    "WeightSet",
    "convert_folder",
    "find_weight_sets",
    "parse_size",
    "plan_folder",
]

# Stems whose loaders read a sharded set through an index (transformers, diffusers);
# PEFT, open_clip, timm and a loose X.pt are loaded as one file.
_SHARDED_STEMS = {"pytorch_model", "diffusion_pytorch_model"}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(size: int | str) -> int:
    """``"5GB"`` -> 5·10⁹ (decimal, as transformers reads it), ``"2GiB"`` -> 2·2³⁰, ``"123"`` -> 123.

    Example:
        >>> parse_size("500MB"), parse_size("1GiB"), parse_size(42)
        (500000000, 1073741824, 42)
    """
    if isinstance(size, bool):
        raise TiesafeError(f"shard size {size!r} is not a size (examples: 5GB, 500MB, 2GiB, 1000000)")
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE.match(size)
        if not match:
            raise TiesafeError(f"shard size {size!r} is not a size (examples: 5GB, 500MB, 2GiB, 1000000)")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if value <= 0:
        raise TiesafeError(f"shard size {size!r} must be positive")
    return value


@dataclass(frozen=True)
class Tie:
    """One name that is not stored under its own name, and why."""

    name: str
    target: str
    kind: str  # "alias", "view" or "copy"
    origin: str  # "storage" (shared in the file), "config" (declared by the model) or "identical"
    where: str = ""  # the output set it belongs to (e.g. "unet/diffusion_pytorch_model"), for several sets


@dataclass
class FolderReport(SavedBytesReport):
    """What converting one model folder did."""

    source: str
    output: str
    files: list[str]  # safetensors files and indexes written (paths relative to the output folder)
    copied: list[str]  # other files carried over (relative paths)
    tensors: int
    stored: int
    bytes_all_names: int
    bytes_written: int
    ties: list[Tie]
    identical: list[list[str]]  # groups of equal bytes found (stored once only with dedup_identical)
    skipped: list[str]
    warnings: list[str] = field(default_factory=list)
    prefixes_removed: list[str] = field(default_factory=list)  # prefixes removed from the names
    deleted: list[str] = field(default_factory=list)
    verified: bool = False
    seconds: float = 0.0
    library: str = ""  # the layout recognised (conventions.LIBRARIES)
    notes: list[str] = field(default_factory=list)  # how ties were found (e.g. the class chosen for a config)
    replaced: list[str] = field(default_factory=list)  # source files the output replaces (relative paths)


# --------------------------------------------------------------------------- finding the weight sets


@dataclass(frozen=True)
class WeightSet:
    """The pickles of one set: one file, or shards (with their index when there is one)."""

    folder: Path
    stem: str  # the pickle stem: pytorch_model, diffusion_pytorch_model, adapter_model, ...
    variant: str | None
    files: list[Path]
    weight_map: dict[str, str] | None
    index: Path | None

    @property
    def replaced(self) -> list[Path]:
        """The source files the converted set replaces."""
        return [*self.files, *([self.index] if self.index else [])]

    @property
    def out_stem(self) -> str:
        return conventions.safetensors_stem(self.stem)


def _index_files(folder: Path, index_path: Path) -> tuple[list[Path], dict[str, str]]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise ValueError("weight_map must map names to file names")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TiesafeError(f"unreadable index ({exc})", path=index_path) from None
    files = []
    for name in dict.fromkeys(weight_map.values()):
        if Path(name).name != name:
            raise TiesafeError(f"index names a file outside the folder: {name!r}", path=index_path)
        if not (folder / name).is_file():
            raise TiesafeError(f"index names {name!r}, which is missing", path=index_path)
        files.append(folder / name)
    if not files:
        raise TiesafeError("index names no weight file", path=index_path)
    return sorted(files), weight_map


def _indexed_sets(folder: Path, names: list[str]) -> list[WeightSet]:
    sets: dict[tuple[str, str | None], WeightSet] = {}
    # The current name first: diffusers reads it before the legacy one when both are there.
    for name in sorted(names, key=conventions.is_legacy_index_name):
        parsed = conventions.parse_index_name(name)
        if parsed is None or parsed in sets:
            continue
        files, weight_map = _index_files(folder, folder / name)
        sets[parsed] = WeightSet(folder, parsed[0], parsed[1], files, weight_map, folder / name)
    return list(sets.values())


def _unindexed_shards(folder: Path, key: tuple[str, str | None], shards: list[tuple[Path, WeightName]]) -> WeightSet:
    """Shards without an index: accepted when numbered 1..N with none missing."""
    totals = {parsed.shard[1] for _, parsed in shards if parsed.shard}
    numbers = sorted(parsed.shard[0] for _, parsed in shards if parsed.shard)
    if len(totals) != 1 or numbers != list(range(1, next(iter(totals)) + 1)):
        names = ", ".join(p.name for p, _ in shards[:3])
        raise TiesafeError(f"incomplete shards and no index ({names}, ...): a shard is missing", path=folder)
    return WeightSet(folder, key[0], key[1], sorted(p for p, _ in shards), None, None)


def find_weight_sets(folder: str | Path) -> list[WeightSet]:
    """The pickle weight sets of one folder (no subfolders), each converted on its own.

    Indexes of every family and variant claim their shards; shards without an index
    form a set when complete; each remaining file of a known stem is a set. Other
    pickles form a set only when they are alone; beside known sets they are left as
    files. Empty when the folder holds no pickle weights.

    Example:
        >>> [(s.stem, s.variant) for s in find_weight_sets("unet")]  # doctest: +SKIP
        [('diffusion_pytorch_model', None), ('diffusion_pytorch_model', 'fp16')]
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise TiesafeError("is not a folder", path=folder)
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    sets = _indexed_sets(folder, names)
    claimed = {p.name for s in sets for p in s.files}
    shards: dict[tuple[str, str | None], list[tuple[Path, WeightName]]] = {}
    unknown: list[tuple[Path, WeightName | None]] = []
    for name in names:
        if Path(name).suffix not in WEIGHT_SUFFIXES or NOT_WEIGHTS.match(name) or name in claimed:
            continue
        parsed = conventions.parse_weight_name(name)
        if parsed is not None and parsed.shard is not None:
            shards.setdefault((parsed.stem, parsed.variant), []).append((folder / name, parsed))
        elif parsed is not None and parsed.known:
            sets.append(WeightSet(folder, parsed.stem, parsed.variant, [folder / name], None, None))
        else:
            unknown.append((folder / name, parsed))
    sets += [_unindexed_shards(folder, key, group) for key, group in shards.items()]
    if not sets and len(unknown) == 1:
        path, parsed = unknown[0]
        stem = path.name[: -len(path.suffix)]
        sets.append(WeightSet(folder, stem, None, [path], None, None))
    elif not sets and unknown:
        listed = ", ".join(p.name for p, _ in unknown[:5])
        raise TiesafeError(f"several pickles and no index ({listed}); convert them one by one", path=folder)
    outputs: dict[str, WeightSet] = {}
    for weight_set in sets:
        name = conventions.safetensors_name(weight_set.out_stem, weight_set.variant)
        if name in outputs:
            both = f"{outputs[name].files[0].name} and {weight_set.files[0].name}"
            raise TiesafeError(f"{both} would both become {name}; convert them one by one", path=folder)
        outputs[name] = weight_set
    return sorted(sets, key=lambda s: (s.stem, s.variant or ""))


def read_folder_checkpoint(
    files: list[Path],
    weight_map: dict[str, str] | None,
    *,
    strict: bool = False,
    strip_prefix: Sequence[str] = (),
    keep_names: bool = False,
) -> Checkpoint:
    """Read every weight file as one checkpoint; storage keys are made unique per file.

    Names are stripped of prefixes over the whole set (see :mod:`converter.names`),
    after the index placed them: a prefix every shard but one carries is kept.
    """
    tensors: dict[str, TensorRef] = {}
    storages: dict[str, StorageRecord] = {}
    skipped: list[str] = []
    formats = set()
    stamps: dict[Path, tuple[int, ...]] = {}
    for path in files:
        flat = read_flat_file(path, keep_names=True, keep_keys=True)
        if flat is not None:  # the common shape (a mixture of experts' shards): from its columns
            formats.add("zip")
            stamps[path] = flat.stamp
            _add_flat(flat, weight_map, tensors, storages)
            continue
        ckpt = read_checkpoint(path, strict=strict, keep_names=True)
        formats.add(ckpt.format)
        stamps.update(ckpt.stamps)
        # Built directly, not with dataclasses.replace: tens of thousands of tensors in an MoE shard.
        for key, record in ckpt.storages.items():
            own = f"{path.name}/{key}"
            storages[own] = StorageRecord(own, record.path, record.offset, record.nbytes, record.location)
        for name, ref in ckpt.tensors.items():
            if weight_map is not None and weight_map.get(name, path.name) != path.name:
                continue  # the index places this name in another file
            if name in tensors:
                raise TiesafeError(f"tensor {name!r} is in more than one weight file", path=path)
            tensors[name] = TensorRef(f"{path.name}/{ref.storage}", ref.dtype, ref.offset, ref.shape, ref.stride)
        skipped += [f"{path.name}:{s}" for s in ckpt.skipped]
    if weight_map is not None:
        missing = [n for n in weight_map if n not in tensors]
        if missing:
            raise TiesafeError(f"the index lists {missing[0]!r}, which no weight file holds", path=files[0].parent)
    try:
        renamed, prefixes_removed = strip_prefixes(list(tensors), strip_prefix, auto=not keep_names)
    except TiesafeError as exc:
        raise exc.at(files[0].parent) from None
    tensors = {renamed[name]: ref for name, ref in tensors.items()}
    return Checkpoint(
        files[0].parent,
        "+".join(sorted(formats)),
        tensors,
        storages,
        skipped,
        stamps=stamps,
        prefixes_removed=prefixes_removed,
    )


def _declared_tie_present(groups: list[list[str]], names: Sequence[str]) -> bool:
    """Whether a tie the model declares has two or more of its names among ``names``.

    A model declares a few (the embedding and ``lm_head``): each name is searched for
    in the names as they are held (one buffer, :class:`.readers.name_column.NameColumn`);
    a set of 100,000 names, 14 MB, is built only for many.
    """
    present: Container[str] = set(names) if sum(map(len, groups)) > 64 else names
    return any(sum(name in present for name in group) > 1 for group in groups)


def _add_flat(
    flat: FlatFile, weight_map: dict[str, str] | None, tensors: dict[str, TensorRef], storages: dict[str, StorageRecord]
) -> None:
    """A flat file's rows as :func:`read_folder_checkpoint` adds a checkpoint's tensors and storages."""
    path = flat.path
    strides: dict[tuple[int, ...], tuple[int, ...]] = {}  # experts repeat a few shapes
    for name, key, dtype, shape, start, nbytes, location in zip(
        flat.names, flat.keys, flat.dtypes, flat.shapes, flat.starts, flat.nbytes, flat.locations, strict=True
    ):
        own = f"{path.name}/{key}"
        storages[own] = StorageRecord(own, path, start, nbytes, location)
        if weight_map is not None and weight_map.get(name, path.name) != path.name:
            continue  # the index places this name in another file
        if name in tensors:
            raise TiesafeError(f"tensor {name!r} is in more than one weight file", path=path)
        stride = strides.get(shape)
        if stride is None:
            stride = strides[shape] = contiguous_strides(shape)
        tensors[name] = TensorRef(own, dtype, 0, shape, stride)


# --------------------------------------------------------------------------- ties


def _apply_declared(
    folder: Path,
    groups: list[list[str]],
    ckpt: Checkpoint,
    sharing: SharingPlan,
    identical: list[list[str]] | None,
    allow_untied: bool,
) -> tuple[list[Tie], list[str], set[str]]:
    """Store once the tensors the model declares tied, after checking their bytes agree.

    ``identical`` is None when the search for identical bytes was skipped: each declared
    pair is then compared on its own.
    """
    stored = {s.name for s in sharing.stored}
    equal_to = {name: group[0] for group in identical or [] for name in group}
    by_name = {item.name: item for item in stored_items(ckpt, sharing)} if identical is None else {}
    order = {name: i for i, name in enumerate(ckpt.tensors)}
    ties, warnings, moved = [], [], set()
    for group in groups:
        present = [n for n in group if n in stored]
        if len(present) < 2:
            continue  # already one storage in the file (or absent): nothing to do
        keeper = min(present, key=order.__getitem__)
        for name in present:
            if name == keeper:
                continue
            if (
                not equal_bytes(by_name[name], by_name[keeper])
                if identical is None
                else equal_to.get(name, name) != equal_to.get(keeper, keeper)
            ):
                problem = f"the model ties {name!r} to {keeper!r} but their bytes differ"
                if not allow_untied:
                    raise TiesafeError(f"{problem}; pass --allow-untied to keep both", path=folder)
                warnings.append(f"{problem}: both kept (--allow-untied)")
                continue
            for re_tied in retie(sharing, keeper, name, kind="alias"):
                ties.append(Tie(re_tied, keeper, "alias", "config"))
                moved.add(re_tied)
    return ties, warnings, moved


def _apply_identical(sharing: SharingPlan, identical: list[list[str]]) -> tuple[list[Tie], set[str]]:
    stored = {s.name for s in sharing.stored}
    tied_to = {*sharing.ties.aliases.values(), *(v.base for v in sharing.ties.views.values())}
    ties, moved = [], set()
    for group in identical:
        keeper, *rest = [n for n in group if n in stored]
        for name in rest:
            if name not in tied_to:  # a tensor other names are tied to stays stored
                retie(sharing, keeper, name, kind="copy")
                ties.append(Tie(name, keeper, "copy", "identical"))
                moved.add(name)
    return ties, moved


# --------------------------------------------------------------------------- planning


@dataclass
class SetOutput:
    """Everything decided about one weight set before a byte is written."""

    component: str  # the component folder, relative ("" for the model folder itself)
    weights: WeightSet
    checkpoint: Checkpoint
    sharing: SharingPlan
    ties: list[Tie]
    identical: list[list[str]]
    warnings: list[str]
    declared: set[str]  # names tied across storages on purpose (exempt from the sharing check)
    output: SetPlan
    stem: str  # the safetensors stem: model, diffusion_pytorch_model, adapter_model, ...
    variant: str | None = None

    @property
    def index_name(self) -> str | None:
        """``model.safetensors.index.json`` (variant included) when the output is sharded, else None."""
        return conventions.index_name(self.stem, self.variant) if self.output.index is not None else None

    @property
    def written_names(self) -> list[str]:
        """The files of this set, relative to its component folder: safetensors files, then the index."""
        return [*self.output.files, *([self.index_name] if self.index_name else [])]

    @property
    def label(self) -> str:
        """``unet/diffusion_pytorch_model.fp16``: the set's name in reports."""
        return _label(self.component, self.stem, self.variant)

    # What the folder's report sums over its sets.
    @property
    def tensor_count(self) -> int:
        return len(self.checkpoint.tensors)

    @property
    def stored_count(self) -> int:
        return len(self.sharing.stored)

    @property
    def bytes_all_names(self) -> int:
        return sum(t.nbytes for t in self.checkpoint.tensors.values())

    @property
    def bytes_written(self) -> int:
        return self.output.data_size

    @property
    def skipped(self) -> list[str]:
        return self.checkpoint.skipped

    @property
    def prefixes_removed(self) -> list[str]:
        return self.checkpoint.prefixes_removed


@dataclass
class FlatSetOutput:
    """A weight set that is one flat file (a mixture of experts' ``pytorch_model.bin``, every
    tensor a storage of its own) with nothing to tie: no tie declared among its names, too
    many small tensors of one shape for the identical-bytes search, one output file.

    Written from its columns (:func:`.flat_convert.stage_flat`): the same file the general
    plan writes, without an object per tensor. ``general`` plans the set by the general
    path, for a file whose local headers turn out, during the copy, not to be flat.
    """

    component: str
    weights: WeightSet
    flat: FlatFile
    plan: FlatPlan
    filename: str  # the output file, in the component folder
    warnings: list[str]
    stem: str
    variant: str | None
    general: Callable[[], SetOutput]
    ties: list[Tie] = field(default_factory=list)  # none: kept for the report's sake
    identical: list[list[str]] = field(default_factory=list)  # not searched (a warning says so)
    index_name: str | None = None  # never sharded

    @property
    def written_names(self) -> list[str]:
        return [self.filename]

    @property
    def label(self) -> str:
        return _label(self.component, self.stem, self.variant)

    @property
    def tensor_count(self) -> int:
        return len(self.flat)

    @property
    def stored_count(self) -> int:
        return len(self.flat)

    @property
    def bytes_all_names(self) -> int:
        return self.plan.data_size

    @property
    def bytes_written(self) -> int:
        return self.plan.data_size

    @property
    def skipped(self) -> list[str]:
        return []

    @property
    def prefixes_removed(self) -> list[str]:
        return self.flat.prefixes_removed


PlannedSet = SetOutput | FlatSetOutput


def _label(component: str, stem: str, variant: str | None) -> str:
    return _relative(component, conventions.safetensors_name(stem, variant)[: -len(".safetensors")])


def _relative(component: str, name: str) -> str:
    return f"{component}/{name}" if component else name


@dataclass
class FolderPlan:
    """Everything decided about a model folder before a byte is written (what --dry-run shows)."""

    source: Path
    library: str
    sets: list[PlannedSet]
    others: list[str]  # files carried over as they are, relative to the source
    multi: bool  # several component folders make one model (all carried over)
    notes: list[str] = field(default_factory=list)
    components: list[Component] = field(default_factory=list)

    @property
    def replaced(self) -> list[Path]:
        """The source pickles (and indexes) the output replaces."""
        return [p for s in self.sets for p in s.weights.replaced]

    @property
    def written_names(self) -> list[str]:
        """Every file written, relative to the output folder."""
        return [_relative(s.component, name) for s in self.sets for name in s.written_names]

    def confirm_flat_sets(self) -> None:
        """Read now the local headers of sets planned from columns, which a conversion reads
        as it copies: a set they show is not flat is planned again by the general path,
        which raises its verdict on a damaged file. For a plan shown and not written
        (``batch --dry-run``), so that what it lists as convertible is.

        Example:
            >>> plan = plan_folder("mixtral-bin"); plan.confirm_flat_sets()  # doctest: +SKIP
        """
        for i, s in enumerate(self.sets):
            if isinstance(s, FlatSetOutput):
                try:
                    with open(s.flat.path, "rb") as raw:
                        s.flat.read_starts(raw)
                except (TiesafeError, OSError):
                    self.sets[i] = s.general()

    def _left_behind(self, output: Path) -> list[str]:
        """Subfolders that are not part of the model: say so when the output goes elsewhere."""
        if output == self.source:
            return []
        strays = stray_folders(self.source, self.components)
        subfolders = [n for n in strays if (self.source / n).resolve() != output.resolve()]
        return [f"subfolders not carried over: {', '.join(subfolders)}"] if subfolders else []

    def report(self, output: Path, files: list[str], *, verified: bool, seconds: float) -> FolderReport:
        several = len(self.sets) > 1
        return FolderReport(
            source=str(self.source),
            output=str(output),
            files=files,
            copied=list(self.others) if output != self.source else [],
            tensors=sum(s.tensor_count for s in self.sets),
            stored=sum(s.stored_count for s in self.sets),
            bytes_all_names=sum(s.bytes_all_names for s in self.sets),
            bytes_written=sum(s.bytes_written for s in self.sets),
            ties=[dataclasses.replace(t, where=s.label if several else "") for s in self.sets for t in s.ties],
            identical=[g for s in self.sets for g in s.identical],
            skipped=[_relative(s.component, k) for s in self.sets for k in s.skipped],
            prefixes_removed=[
                f"{s.component}: {r}" if s.component else r for s in self.sets for r in s.prefixes_removed
            ],
            warnings=[w for s in self.sets for w in s.warnings] + self._left_behind(output),
            verified=verified,
            seconds=seconds,
            library=self.library,
            notes=list(self.notes),
            replaced=[p.relative_to(self.source).as_posix() for p in self.replaced],
        )


@dataclass(frozen=True)
class _Options:
    limit: int
    materialize_views: bool
    dedup_identical: bool
    allow_untied: bool
    strict: bool = False
    strip_prefix: tuple[str, ...] = ()
    keep_names: bool = False


def _plan_set(component: Component, weights: WeightSet, options: _Options) -> tuple[PlannedSet, str | None]:
    """Read one weight set and decide its output; the note says how declared ties were found."""
    flat = _plan_flat_set(component, weights, options)
    return flat if flat is not None else _plan_general_set(component, weights, options)


def _plan_general_set(component: Component, weights: WeightSet, options: _Options) -> tuple[SetOutput, str | None]:
    """:func:`_plan_set` by the general path: every tensor a descriptor, every kind of tie looked for."""
    ckpt = read_folder_checkpoint(
        weights.files,
        weights.weight_map,
        strict=options.strict,
        strip_prefix=options.strip_prefix,
        keep_names=options.keep_names,
    )
    sharing = plan_sharing(ckpt.tensors, materialize_views=options.materialize_views)
    ties = [Tie(n, t, "alias", "storage") for n, t in sharing.ties.aliases.items()]
    ties += [Tie(n, v.base, "view", "storage") for n, v in sharing.ties.views.items()]
    items = stored_items(ckpt, sharing)
    costly = 0 if options.dedup_identical else search_is_costly(items)
    identical = [] if costly else identical_groups(items)
    declared = resolve_declared(weights.folder, list(ckpt.tensors))
    config_ties, warnings, moved = _apply_declared(
        weights.folder, declared.groups, ckpt, sharing, None if costly else identical, options.allow_untied
    )
    if costly:  # said, not silent: the report names what was not looked for
        warnings.append(_not_searched(costly))
    ties += config_ties
    identical = [g for g in identical if not set(g) & moved]
    if options.dedup_identical:
        copies, copied_names = _apply_identical(sharing, identical)
        ties += copies
        moved |= copied_names
    items = stored_items(ckpt, sharing)
    total = sum(item.nbytes for item in items)
    limit = options.limit
    stem = weights.out_stem
    shardable = _shardable(component, weights)
    if not shardable and total > limit:  # its loader reads one file: never sharded
        warnings.append(_unsharded(component, weights))
    if not shardable:
        limit = max(limit, total)
    pattern = conventions.shard_pattern(stem, weights.variant)
    output = plan_shards(items, sharing.ties, max_shard_size=limit, stem=stem, filename_pattern=pattern)
    plan = SetOutput(
        component.path, weights, ckpt, sharing, ties, identical, warnings, moved, output, stem, weights.variant
    )
    note = f"{plan.label}: {declared.note}" if declared.note else None
    return plan, note


def _plan_flat_set(
    component: Component, weights: WeightSet, options: _Options
) -> tuple[FlatSetOutput, str | None] | None:
    """:func:`_plan_set` from a flat file's columns, when the general path would find nothing
    to tie and write one file from it; else None (the general path plans the set).

    Every decision the general path takes is taken here on the columns: names placed by
    the index and stripped of prefixes over the set, the identical-bytes search skipped as
    too costly (else it runs there), no tie the model declares among the names, one output
    file under the same name. The tests hold the two to the same files and report.
    """
    if options.dedup_identical or len(weights.files) != 1:
        return None
    path = weights.files[0]
    flat = read_flat_file(path, keep_names=True, read_starts=False)  # headers: read as the copy reaches them
    if flat is None:
        return None
    names = flat.names
    weight_map = weights.weight_map
    if weight_map is not None and (len(weight_map) != len(names) or any(weight_map.get(n) != path.name for n in names)):
        return None  # the index places names elsewhere, or lists others
    costly = costly_candidates(zip(flat.dtypes, flat.shapes, flat.nbytes, strict=True))
    if not costly:
        return None  # the general path searches identical bytes
    if not strips_nothing(names, options.strip_prefix, auto=not options.keep_names):
        try:
            renamed, flat.prefixes_removed = strip_prefixes(names, options.strip_prefix, auto=not options.keep_names)
        except TiesafeError:
            return None  # the general path refuses it, naming the folder
        if flat.prefixes_removed:
            flat.names = names = [renamed[name] for name in names]
    declared = resolve_declared(weights.folder, names)
    if _declared_tie_present(declared.groups, names):
        return None  # a tie the model declares: the general path checks and records it
    warnings = [_not_searched(costly)]
    plan = FlatPlan(flat, None)
    if plan.data_size > options.limit:
        if _shardable(component, weights):
            return None  # sharded: the general path splits it
        warnings.append(_unsharded(component, weights))
    stem = weights.out_stem
    output = FlatSetOutput(
        component.path,
        weights,
        flat,
        plan,
        conventions.shard_pattern(stem, weights.variant).format(suffix=""),  # huggingface_hub's name for one shard
        warnings,
        stem,
        weights.variant,
        functools.partial(_general_only, component, weights, options),
    )
    note = f"{output.label}: {declared.note}" if declared.note else None
    return output, note


def _general_only(component: Component, weights: WeightSet, options: _Options) -> SetOutput:
    return _plan_general_set(component, weights, options)[0]


def _not_searched(costly: int) -> str:
    return (
        f"identical bytes not searched: {costly} small tensors share a dtype and shape "
        "(--dedup-identical searches them and stores equal ones once)"
    )


def _shardable(component: Component, weights: WeightSet) -> bool:
    """Whether the set's loader reads shards through an index (transformers, diffusers)."""
    return weights.stem in _SHARDED_STEMS and conventions.LIBRARIES[component.library or "other"].shards


def _unsharded(component: Component, weights: WeightSet) -> str:
    who = "PEFT" if component.library == "peft" else component.library
    name = conventions.safetensors_name(weights.out_stem, weights.variant)
    return f"written as one file over the shard size: {who} loads {name} unsharded"


def _carried_files(source: Path, sets: list[PlannedSet], components: list[Component]) -> list[str]:
    """Files copied as they are: the model's files (its own, and its component folders') that are
    neither a replaced pickle nor an output name of a set in the same folder."""
    replaced = {p for s in sets for p in s.weights.replaced}
    own = {
        c.path: [conventions.set_file_names(s.stem, s.variant) for s in sets if s.component == c.path]
        for c in components
    }
    carried = []
    for name in model_files(source, components):
        path, relative = source / name, Path(name)
        folder = relative.parent.as_posix() if relative.parent != Path(".") else ""
        if path in replaced or any(pattern.fullmatch(path.name) for pattern in own.get(folder, [])):
            continue
        carried.append(relative.as_posix())
    return carried


def plan_folder(
    src: str | Path,
    *,
    max_shard_size: int | str = "5GB",
    materialize_views: bool = False,
    dedup_identical: bool = False,
    allow_untied: bool = False,
    strict: bool = False,
    strip_prefix: Sequence[str] = (),
    keep_names: bool = False,
) -> FolderPlan:
    """Read a model folder (every component of a multi-folder model) and decide its output, writing nothing.

    Example:
        >>> plan = plan_folder("sd-pipeline")  # doctest: +SKIP
        >>> plan.library, plan.written_names
        ('diffusers-pipeline', ['unet/diffusion_pytorch_model.safetensors', 'vae/diffusion_pytorch_model.safetensors'])
    """
    src = Path(src)
    if not src.is_dir():
        raise TiesafeError("is not a folder", path=src)
    options = _Options(
        parse_size(max_shard_size),
        materialize_views,
        dedup_identical,
        allow_untied,
        strict,
        tuple(strip_prefix),
        keep_names,
    )
    library, components = model_components(src)
    multi = is_multi_component(library)
    sets: list[PlannedSet] = []
    notes: list[str] = []
    for component in components:
        for weights in find_weight_sets(src / component.path):
            planned, note = _plan_set(component, weights, options)
            sets.append(planned)
            notes += [note] if note else []
    if not sets:
        where = "this folder or its components" if multi else "this folder"
        raise TiesafeError(f"no pickle weights (.bin/.pt/.pth/.ckpt) in {where}", path=src)
    return FolderPlan(src, library, sets, _carried_files(src, sets, components), multi, notes, components)


# --------------------------------------------------------------------------- writing


def _output_folder(src: Path, dst: Path | None) -> Path:
    out = src if dst is None else dst
    if out.exists() and not out.is_dir():
        raise TiesafeError("output must be a folder", path=out)
    return out


def _refuse_existing(out: Path, plan: FolderPlan, overwrite: bool) -> None:
    if overwrite:
        return
    for s in plan.sets:
        folder = out / s.component
        if folder.is_dir():
            pattern = conventions.set_file_names(s.stem, s.variant)
            existing = sorted(p.name for p in folder.iterdir() if pattern.fullmatch(p.name))
            if existing:
                raise TiesafeError(f"holds {existing[0]} already; pass --overwrite to replace it", path=folder)


def convert_folder(
    src: str | Path,
    dst: str | Path | None = None,
    *,
    max_shard_size: int | str = "5GB",
    verify: bool = True,
    materialize_views: bool = False,
    dedup_identical: bool = False,
    allow_untied: bool = False,
    delete_source: bool = False,
    overwrite: bool = False,
    strict: bool = False,
    strip_prefix: Sequence[str] = (),
    keep_names: bool = False,
) -> FolderReport:
    """Convert a model folder to safetensors under the names its library loads.

    With no ``dst`` the output goes beside the source. Other files (config,
    tokenizer, README, ...; every file of every component for a diffusers pipeline or a
    sentence-transformers model) are copied to ``dst`` as they are. Everything appears
    at once after verification; ``delete_source`` removes the pickles only then.

    Example:
        >>> report = convert_folder("llama", "llama-st", max_shard_size="2GB")  # doctest: +SKIP
        >>> [(t.name, t.origin) for t in report.ties]
        [('lm_head.weight', 'config')]
    """
    started = time.perf_counter()
    src = Path(src)
    if delete_source and not verify:
        raise TiesafeError("--delete-source needs verification; drop --no-verify")
    out = _output_folder(src, None if dst is None else Path(dst))
    with paused_gc():  # per-tensor bookkeeping of large checkpoints: see gcpause
        plan = plan_folder(
            src,
            max_shard_size=max_shard_size,
            materialize_views=materialize_views,
            dedup_identical=dedup_identical,
            allow_untied=allow_untied,
            strict=strict,
            strip_prefix=strip_prefix,
            keep_names=keep_names,
        )
        _refuse_existing(out, plan, overwrite)
        written = write_plan(plan, out, verify=verify)
    deleted = []
    if delete_source:
        for path in plan.replaced:
            path.unlink(missing_ok=True)
            deleted.append(path.relative_to(src).as_posix())
    report = plan.report(out, written, verified=verify, seconds=time.perf_counter() - started)
    report.deleted = deleted
    return report


def _make_folders(folders: list[Path]) -> list[Path]:
    """Create ``folders`` (and parents); return those created, deepest first, to undo on failure."""
    created: list[Path] = []
    for folder in folders:
        missing = []
        for parent in [folder, *folder.parents]:
            if parent.exists():
                break
            missing.append(parent)
        for parent in reversed(missing):
            parent.mkdir(exist_ok=True)
            created.append(parent)
    return sorted(created, key=lambda p: -len(p.parts))


def write_plan(plan: FolderPlan, out: Path, *, verify: bool) -> list[str]:
    """Stage every set and side file, verify each set as it is written, then rename it all into place.

    Returns the files written, relative to ``out``. On failure nothing is left: no file,
    and no folder this call created.

    A set planned from a flat file's columns whose local headers turn out not to be flat
    (:class:`.readers.flat_file.NotFlat`, met during the copy) is planned again by the
    general path, and the whole plan written again.

    Example:
        >>> write_plan(plan_folder("sd-pipeline"), Path("sd-st"), verify=True)  # doctest: +SKIP
        ['unet/diffusion_pytorch_model.safetensors', 'vae/diffusion_pytorch_model.safetensors']
    """
    try:
        return _write_plan(plan, out, verify=verify)
    except NotFlat:  # nothing was left behind: plan those sets as the general path does, and write again
        plan.sets = [s.general() if isinstance(s, FlatSetOutput) else s for s in plan.sets]
        return _write_plan(plan, out, verify=verify)


def _write_plan(plan: FolderPlan, out: Path, *, verify: bool) -> list[str]:
    copies = plan.others if out != plan.source else []
    folders = [out, *(out / s.component for s in plan.sets), *((out / c).parent for c in copies)]
    created = _make_folders(list(dict.fromkeys(folders)))
    try:
        with StagedWrites() as staged:
            for s in plan.sets:
                if isinstance(s, FlatSetOutput):
                    stage_flat(staged, s.flat, s.plan, out / s.component / s.filename, verify=verify)
                    continue
                plans = {out / s.component / name: file_plan for name, file_plan in s.output.files.items()}
                staged.write_set(plans, _checker(s, out) if verify else None)
            for relative in copies:
                staged.copy_file(plan.source / relative, out / relative)
            for s in plan.sets:
                if isinstance(s, SetOutput) and s.index_name is not None:  # an index appears after its shards
                    staged.write_bytes(s.output.index_json(), out / s.component / s.index_name)
    except BaseException:
        for folder in created:
            with contextlib.suppress(OSError):  # not empty: something else wrote there meanwhile
                folder.rmdir()
        raise
    for s in plan.sets:
        remove_stale_set(out / s.component, s.stem, set(s.written_names), s.variant)
    return plan.written_names


def _checker(s: SetOutput, out: Path) -> Callable[[list[Path], WriteProgress], None]:
    """The verification of one set's staged files, run by the writer as it writes them."""

    def check(temporary: list[Path], progress: WriteProgress) -> None:
        staged_files = [read_safetensors(t) for t in temporary]
        try:
            verify_output(s.checkpoint, staged_files, s.sharing.ties, declared=s.declared, wait=progress.wait)
            s.checkpoint.check_unchanged()  # the verified bytes are those of the files that were read
        except TiesafeError as exc:
            raise VerificationError(exc.problem, path=out / s.component) from None

    return check


def remove_stale_set(folder: Path, stem: str, written: set[str], variant: str | None = None) -> None:
    """Remove files of an older output set (other shard count, or one file) that ``written`` replaces.

    transformers reads ``model.safetensors`` before an index, so a stale file would
    shadow new shards; save_pretrained cleans up the same way.
    """
    pattern = conventions.set_file_names(stem, variant)
    for path in folder.iterdir():
        if path.name not in written and pattern.fullmatch(path.name) and path.is_file():
            path.unlink()
