"""Convert one model folder: sharded or single pickles in, what save_pretrained writes out.

A folder holds ``pytorch_model.bin`` or ``pytorch_model-0000N-of-0000M.bin`` shards with
their index, plus config, tokenizer and the rest. The shards are read as one
checkpoint, ties are found within files (shared storage), across files (ties the
config declares, checked bit-identical) and optionally among identical bytes, and
the output -- ``model.safetensors`` or shards with ``model.safetensors.index.json``
(``adapter_model.safetensors`` for a PEFT adapter) -- appears all at once, verified,
beside every other file of the folder.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .declared import declared_ties
from .descriptors import Checkpoint, StorageRecord, TensorRef
from .errors import TiesafeError, VerificationError
from .identical import identical_groups
from .layout import SetPlan, plan_shards, set_file_names, stored_items
from .names import strip_prefixes
from .readers.torchfile import read_checkpoint
from .reports import SavedBytesReport
from .sharing import SharingPlan, plan_sharing, retie
from .stfile import read_safetensors
from .verify import verify_output
from .writer import StagedWrites, WriteProgress

PICKLE_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# A PEFT adapter: PEFT's save_pretrained writes adapter_model.safetensors in place of this
# pickle, and PEFT loads that name only (one file: it reads no shards and no index).
ADAPTER_PICKLE = "adapter_model.bin"
ADAPTER_STEM = "adapter_model"
ADAPTER_CONFIG = "adapter_config.json"
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Pickles a training run leaves beside the weights that are not weights.
NOT_WEIGHTS = re.compile(r"^(training_args\.bin|optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state.*\.pth)$")
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


@dataclass
class FolderReport(SavedBytesReport):
    """What converting one model folder did."""

    source: str
    output: str
    files: list[str]  # safetensors files and index written
    copied: list[str]  # other files carried over
    tensors: int
    stored: int
    bytes_all_names: int
    bytes_written: int
    ties: list[Tie]
    identical: list[list[str]]  # groups of equal bytes found (stored once only with dedup_identical)
    skipped: list[str]
    warnings: list[str] = field(default_factory=list)
    renames: list[str] = field(default_factory=list)  # prefixes removed from the names
    deleted: list[str] = field(default_factory=list)
    verified: bool = False
    seconds: float = 0.0


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
    return sorted(files), weight_map


def find_weights(folder: str | Path) -> tuple[list[Path], dict[str, str] | None]:
    """The pickle weight files of a model folder (and the index's weight map, if sharded).

    Example:
        >>> find_weights("llama")  # doctest: +SKIP
        ([PosixPath('llama/pytorch_model-00001-of-00002.bin'), ...], {...})
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise TiesafeError("is not a folder", path=folder)
    if (folder / PICKLE_INDEX).is_file():
        return _index_files(folder, folder / PICKLE_INDEX)
    shards = sorted(folder.glob("pytorch_model*.bin"))
    if shards:
        return shards, None
    loose = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES and not NOT_WEIGHTS.match(p.name)
    )
    if len(loose) == 1:
        return loose, None
    if loose:
        names = ", ".join(p.name for p in loose[:5])
        raise TiesafeError(f"several pickles and no index ({names}); convert them one by one", path=folder)
    raise TiesafeError("no pickle weights (.bin/.pt/.pth/.ckpt) in this folder", path=folder)


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
        ckpt = read_checkpoint(path, strict=strict, keep_names=True)
        formats.add(ckpt.format)
        stamps.update(ckpt.stamps)
        for key, record in ckpt.storages.items():
            storages[f"{path.name}/{key}"] = dataclasses.replace(record, key=f"{path.name}/{key}")
        for name, ref in ckpt.tensors.items():
            if weight_map is not None and weight_map.get(name, path.name) != path.name:
                continue  # the index places this name in another file
            if name in tensors:
                raise TiesafeError(f"tensor {name!r} is in more than one weight file", path=path)
            tensors[name] = dataclasses.replace(ref, storage=f"{path.name}/{ref.storage}")
        skipped += [f"{path.name}:{s}" for s in ckpt.skipped]
    if weight_map is not None:
        missing = [n for n in weight_map if n not in tensors]
        if missing:
            raise TiesafeError(f"the index lists {missing[0]!r}, which no weight file holds", path=files[0].parent)
    try:
        renamed, renames = strip_prefixes(tensors, strip_prefix, automatic=not keep_names)
    except TiesafeError as exc:
        raise exc.at(files[0].parent) from None
    tensors = {renamed[name]: ref for name, ref in tensors.items()}
    return Checkpoint(
        files[0].parent, "+".join(sorted(formats)), tensors, storages, skipped, stamps=stamps, renames=renames
    )


def _apply_declared(
    folder: Path, ckpt: Checkpoint, sharing: SharingPlan, identical: list[list[str]], allow_untied: bool
) -> tuple[list[Tie], list[str], set[str]]:
    """Store once the tensors the model declares tied, after checking their bytes agree."""
    stored = {s.name for s in sharing.stored}
    equal_to = {name: group[0] for group in identical for name in group}
    ties, warnings, moved = [], [], set()
    for group in declared_ties(folder):
        present = [n for n in group if n in stored]
        if len(present) < 2:
            continue  # already one storage in the file (or absent): nothing to do
        keeper = min(present, key=list(ckpt.tensors).index)
        for name in present:
            if name == keeper:
                continue
            if equal_to.get(name, name) != equal_to.get(keeper, keeper):
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


def _output_stem(files: list[Path]) -> str:
    """``adapter_model`` for a PEFT adapter (its one pickle is ``adapter_model.bin``), else ``model``."""
    return ADAPTER_STEM if [p.name for p in files] == [ADAPTER_PICKLE] else "model"


def _output_folder(src: Path, dst: Path | None) -> Path:
    out = src if dst is None else dst
    if out.exists() and not out.is_dir():
        raise TiesafeError("output must be a folder", path=out)
    return out


def _refuse_existing(out: Path, stem: str, overwrite: bool) -> None:
    if out.is_dir() and not overwrite:
        existing = sorted(p.name for p in out.iterdir() if set_file_names(stem).fullmatch(p.name))
        if existing:
            raise TiesafeError(f"holds {existing[0]} already; pass --overwrite to replace it", path=out)


@dataclass
class FolderPlan:
    """Everything decided about a folder before a byte is written (what --dry-run shows)."""

    source: Path
    weights: list[Path]  # the pickle files (and index) the output replaces
    checkpoint: Checkpoint
    sharing: SharingPlan
    ties: list[Tie]
    identical: list[list[str]]
    warnings: list[str]
    declared: set[str]  # names tied across storages on purpose (exempt from the sharing check)
    others: list[Path]  # files carried over as they are
    output: SetPlan
    stem: str = "model"  # output names: model.safetensors, or adapter_model.safetensors for a PEFT adapter

    @property
    def index_name(self) -> str | None:
        """``model.safetensors.index.json`` when the output is sharded, else None."""
        return f"{self.stem}.safetensors.index.json" if self.output.index is not None else None

    @property
    def written_names(self) -> list[str]:
        """The files the output consists of: the safetensors files, then the index if sharded."""
        return [*self.output.files, *([self.index_name] if self.index_name else [])]

    def _left_behind(self, output: Path) -> list[str]:
        """Subfolders are not model files: say so when the output goes elsewhere."""
        if output == self.source:
            return []
        subfolders = sorted(p.name for p in self.source.iterdir() if p.is_dir() and p.resolve() != output.resolve())
        return [f"subfolders not carried over: {', '.join(subfolders)}"] if subfolders else []

    def report(self, output: Path, files: list[str], *, verified: bool, seconds: float) -> FolderReport:
        return FolderReport(
            source=str(self.source),
            output=str(output),
            files=files,
            copied=[p.name for p in self.others] if output != self.source else [],
            tensors=len(self.checkpoint.tensors),
            stored=len(self.sharing.stored),
            bytes_all_names=sum(t.nbytes for t in self.checkpoint.tensors.values()),
            bytes_written=self.output.data_size,
            ties=self.ties,
            identical=self.identical,
            skipped=self.checkpoint.skipped,
            renames=self.checkpoint.renames,
            warnings=self.warnings + self._left_behind(output),
            verified=verified,
            seconds=seconds,
        )


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
    """Read a model folder and decide its output, without writing anything.

    Example:
        >>> plan = plan_folder("llama")  # doctest: +SKIP
        >>> list(plan.output.files), plan.output.data_size
        (['model.safetensors'], 2471645184)
    """
    src = Path(src)
    files, weight_map = find_weights(src)
    limit = parse_size(max_shard_size)
    ckpt = read_folder_checkpoint(files, weight_map, strict=strict, strip_prefix=strip_prefix, keep_names=keep_names)
    sharing = plan_sharing(ckpt.tensors, materialize_views=materialize_views)
    ties = [Tie(n, t, "alias", "storage") for n, t in sharing.ties.aliases.items()]
    ties += [Tie(n, v.base, "view", "storage") for n, v in sharing.ties.views.items()]
    identical = identical_groups(stored_items(ckpt, sharing))
    declared, warnings, moved = _apply_declared(src, ckpt, sharing, identical, allow_untied)
    ties += declared
    identical = [g for g in identical if not set(g) & moved]
    if dedup_identical:
        copies, copied_names = _apply_identical(sharing, identical)
        ties += copies
        moved |= copied_names
    stem = _output_stem(files)
    items = stored_items(ckpt, sharing)
    total = sum(item.nbytes for item in items)
    if stem == ADAPTER_STEM and total > limit:  # PEFT loads one file: an adapter is never sharded
        warnings.append(f"written as one file over the shard size: PEFT loads {ADAPTER_STEM}.safetensors unsharded")
        limit = total
    output = plan_shards(items, sharing.ties, max_shard_size=limit, stem=stem)
    weights = [*files, *([src / PICKLE_INDEX] if weight_map is not None else [])]
    names = {p.name for p in weights}
    own = set_file_names(stem)
    others = [p for p in sorted(src.iterdir()) if p.is_file() and p.name not in names and not own.fullmatch(p.name)]
    return FolderPlan(src, weights, ckpt, sharing, ties, identical, warnings, moved, others, output, stem)


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
    """Convert a model folder to safetensors the way ``save_pretrained`` lays it out.

    With no ``dst`` the output goes beside the source. Other files (config,
    tokenizer, README, ...) are copied to ``dst`` as they are. Everything appears
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
    _refuse_existing(out, plan.stem, overwrite)
    written = _write_set(plan, out, verify=verify)
    deleted = []
    if delete_source:
        for path in plan.weights:
            path.unlink(missing_ok=True)
            deleted.append(path.name)
    report = plan.report(out, written, verified=verify, seconds=time.perf_counter() - started)
    report.deleted = deleted
    return report


def _write_set(plan: FolderPlan, out: Path, *, verify: bool) -> list[str]:
    """Stage every output file, verify the staged set as it is written, then rename it all into place."""
    out.mkdir(parents=True, exist_ok=True)

    def check(temporary: list[Path], progress: WriteProgress) -> None:
        staged_files = [read_safetensors(t) for t in temporary]
        try:
            verify_output(plan.checkpoint, staged_files, plan.sharing.ties, declared=plan.declared, wait=progress.wait)
            plan.checkpoint.check_unchanged()  # the verified bytes are those of the files that were read
        except TiesafeError as exc:
            raise VerificationError(exc.problem, path=out) from None

    with StagedWrites() as staged:
        plans = {out / name: file_plan for name, file_plan in plan.output.files.items()}
        staged.write_set(plans, check if verify else None)
        if out != plan.source:
            for path in plan.others:
                staged.copy_file(path, out / path.name)
        if plan.index_name is not None:
            staged.write_bytes(plan.output.index_json(), out / plan.index_name)
    names = plan.written_names
    remove_stale_set(out, plan.stem, set(names))
    return names


def remove_stale_set(folder: Path, stem: str, written: set[str]) -> None:
    """Remove files of an older output set (other shard count, or one file) that ``written`` replaces.

    transformers reads ``model.safetensors`` before an index, so a stale file would
    shadow new shards; save_pretrained cleans up the same way.
    """
    pattern = set_file_names(stem)
    for path in folder.iterdir():
        if path.name not in written and pattern.fullmatch(path.name) and path.is_file():
            path.unlink()
