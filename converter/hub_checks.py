"""The plan half of prepare-upload: checks and the upload plan, as pure functions.

Each ``check_*`` turns facts read from the upload-ready folder (:class:`FolderFacts`,
:class:`LoadProbe`, the conversion report) into a :class:`Check` -- ``pass``, ``warn``
or ``fail`` with the reason and what to do -- and ``plan_upload`` turns the folder and
its source into the commit to make. No I/O here: :mod:`converter.hub` reads the facts
and carries the plan out, as huggingface_hub's serialization splits the sharding
strategy from the writing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from . import conventions, ties
from .folder import FolderReport, parse_size
from .reports import human_bytes
from .stfile import SafetensorsFile
from .windows import FileWindow

HUB_FILE_LIMIT = 50 * 10**9  # the Hub refuses larger files (its docs: 50GB max per file)
_MAX_LISTED = 10


@dataclass
class Check:
    """One check of the upload-ready folder: ``status`` is ``pass``, ``warn`` or ``fail``."""

    name: str
    status: str
    summary: str
    details: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PlannedFile:
    path: str  # in the repo
    size: int


@dataclass
class UploadPlan:
    """The commit that makes a repo hold the upload-ready folder."""

    add: list[PlannedFile]
    delete: list[str]  # source files the folder replaces, deleted on the Hub where present

    @property
    def bytes_to_upload(self) -> int:
        return sum(f.size for f in self.add)


@dataclass
class FolderFacts:
    """What the checks look at, read once from the upload-ready folder."""

    files: dict[str, int]  # top-level file -> size
    safetensors: dict[str, SafetensorsFile]
    problems: dict[str, str]  # file -> why it cannot be read (header, index, config, tie record)
    index: dict[str, Any] | None = None  # the main set's index (no variant), when sharded
    config: dict[str, Any] | None = None
    record: ties.TieRecord = field(default_factory=ties.TieRecord)  # ties of the model's weights
    windows: dict[str, FileWindow] = field(default_factory=dict)  # every name of the weights -> its bytes
    index_name: str | None = None  # model.safetensors.index.json, diffusion_pytorch_model..., by the conventions
    indexes: dict[str, dict[str, Any]] = field(default_factory=dict)  # every readable index (variants too)

    @property
    def weights(self) -> list[str]:
        """The model's weight files: the main index's shards, else the one file its library loads."""
        if self.index is not None:
            return sorted({f for f in self.index["weight_map"].values() if f in self.safetensors})
        main = conventions.main_weights(list(self.safetensors))
        return [main] if main else []


@dataclass
class LoadProbe:
    """What ``from_pretrained`` on the ``meta`` device made of the folder."""

    architecture: str | None = None
    known: bool = False  # transformers (or the folder's library) ships the class
    library: str = "transformers"  # whose loader was tried (converter.library_checks for the others)
    skipped: str | None = None  # why no load was tried
    error: str | None = None
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    tied: dict[str, str] = field(default_factory=dict)  # target -> source the model ties on load
    tie_word_embeddings: bool | None = None
    differing: list[tuple[str, str]] = field(default_factory=list)  # tied pairs stored apart, bytes differ


# --------------------------------------------------------------------------- checks


def _listed(names: Iterable[str]) -> str:
    names = list(names)
    more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return ", ".join(names[:_MAX_LISTED]) + more


def check_pickles(upload_pickles: list[str], left_out: list[str], refused: dict[str, str]) -> Check:
    """No pickle in the upload, unless kept on purpose; a kept pickle that imports code is refused.

    Example:
        >>> check_pickles([], ["training_args.bin"], {}).status
        'warn'
    """
    details = [f"refused: {name}: {why}" for name, why in refused.items()]
    if upload_pickles:
        details.append(f"kept (--keep-pickles): {_listed(upload_pickles)}; whoever loads them must trust them")
    if left_out:
        details.append(f"left out of the upload (pickles, not weights): {_listed(left_out)}; --keep-pickles keeps them")
    if refused:
        return Check("pickles", "fail", f"{len(refused)} pickle(s) import more than plain tensors", details)
    if upload_pickles or left_out:
        return Check("pickles", "warn", "pickles kept or left out", details)
    return Check("pickles", "pass", "no pickle file in the upload")


def check_conversion(report: FolderReport | None, notes: list[str], facts: FolderFacts) -> Check:
    """The weights were converted and verified bit for bit, ties included (or were safetensors already).

    ``notes`` are what building the folder found worth a warning (files replaced, folders not carried).
    """
    problems = [f"{name}: {why}" for name, why in facts.problems.items() if name.endswith(".safetensors")]
    if problems:
        return Check("conversion", "fail", "unreadable safetensors", problems)
    if report is None:
        summary = "no pickle weights: the safetensors files are uploaded as they are"
        return Check("conversion", "warn" if notes else "pass", summary, notes)
    ties_found = (
        ", ".join(
            f"{t.name} = {t.target} ({t.kind}, {t.origin}{', ' + t.where if t.where else ''})" for t in report.ties
        )
        or "none"
    )
    summary = (
        f"converted into {len(report.files)} file(s), {report.tensors} names verified bit for bit; "
        f"{human_bytes(report.bytes_saved)} saved by ties"
    )
    details = [f"ties: {ties_found}"]
    details += [
        f"identical bytes, not tied (--dedup-identical stores them once): {_listed(g)}" for g in report.identical
    ]
    details += [f"skipped non-tensor entries: {_listed(report.skipped)}"] if report.skipped else []
    details += report.notes  # how declared ties were found (a class chosen for a config without architectures)
    warnings = [*report.warnings, *notes]
    return Check("conversion", "warn" if warnings else "pass", summary, details + warnings)


def check_config(facts: FolderFacts, probe: LoadProbe, record: ties.TieRecord) -> Check:
    """config.json is there, names an architecture transformers knows, and ties what the weights tie."""
    if "config.json" in facts.problems:
        return Check("config", "fail", f"config.json: {facts.problems['config.json']}")
    if probe.library != "transformers":
        return Check("config", "pass", f"a {probe.library} folder: its own loader is checked (from_pretrained)")
    if facts.config is None:
        missing = "no config.json: from_pretrained cannot load this folder (fine for weights of other libraries)"
        return Check("config", "warn", missing)
    if not probe.known:
        return Check("config", "warn", probe.skipped or "config.json names no architecture")
    if probe.skipped or probe.error:
        return Check("config", "warn", f"{probe.architecture}; ties not compared (from_pretrained did not load)")
    details = [
        f"config.json ties {target} to {source} (tie_word_embeddings={probe.tie_word_embeddings}) but their bytes "
        "differ: from_pretrained would not tie them; set tie_word_embeddings to false"
        for target, source in probe.differing
    ]
    details += [
        f"{name} is tied to {record.aliases[name]} in the weights, but config.json does not tie them "
        f"(tie_word_embeddings={probe.tie_word_embeddings}): from_pretrained leaves {name} uninitialised; "
        "set tie_word_embeddings to true"
        for name in probe.missing
        if name in record.aliases
    ]
    if details:
        return Check("config", "fail", "config.json disagrees with the weights' ties", details)
    return Check(
        "config",
        "pass",
        f"{probe.architecture}; tie_word_embeddings={probe.tie_word_embeddings} agrees with the weights",
    )


def check_from_pretrained(probe: LoadProbe, record: ties.TieRecord) -> Check:
    """``from_pretrained`` (on the meta device) finds every key, and no key it does not expect."""
    if probe.skipped:
        return Check("from_pretrained", "warn", f"not checked: {probe.skipped}")
    if probe.error is not None:
        return Check("from_pretrained", "fail", f"from_pretrained failed: {probe.error}")
    details = []
    for what, names in (("missing", probe.missing), ("unexpected", probe.unexpected), ("mismatched", probe.mismatched)):
        if names:
            details.append(f"{what}: {_listed(names)}")
    hints = [n for n in probe.missing if n in record.views or n in record.copies]
    if hints:
        details.append(f"stored as views/copies only tiesafe restores: {_listed(hints)} (see plain_loaders)")
    loader = f"{probe.architecture}.from_pretrained" if probe.library == "transformers" else str(probe.architecture)
    if details:
        return Check("from_pretrained", "fail", f"{loader} does not load it cleanly", details)
    how = "meta device" if probe.library == "transformers" else f"{probe.library}'s own loader"
    return Check("from_pretrained", "pass", f"{loader} ({how}): no missing, unexpected or mismatched keys")


def check_shards(facts: FolderFacts, max_shard_size: int | str = "5GB") -> Check:
    """Shards within the limit (and the Hub's), index consistent with the files.

    Sizes count tensor bytes (as ``max_shard_size`` does when transformers shards).

    Example:
        >>> check_shards(read_facts("llama-upload"), "2GB").status  # doctest: +SKIP
        'pass'
    """
    shown = max_shard_size if isinstance(max_shard_size, str) else human_bytes(max_shard_size)
    max_shard_size = parse_size(max_shard_size)
    details: list[str] = []
    warnings: list[str] = []
    for name, st in facts.safetensors.items():
        data = st.size - st.data_start
        if st.size > HUB_FILE_LIMIT:
            details.append(f"{name} is {human_bytes(st.size)}: the Hub refuses files over 50GB")
        elif data > max_shard_size:
            message = f"{name} holds {human_bytes(data)} of tensors, over the limit of {shown}"
            if len(st.entries) == 1:
                warnings.append(f"{message} (one tensor: cannot be split)")
            else:
                details.append(f"{message}; convert with a smaller --max-shard-size")
    details += [f"{name}: {why}" for name, why in facts.problems.items() if name in facts.indexes or ".index" in name]
    for name in facts.indexes:
        details += _index_problems(facts, name)
    listed = {f for index in facts.indexes.values() for f in index["weight_map"].values()}
    strays = [n for n in facts.safetensors if conventions.is_shard_name(n) and n not in listed]
    if strays:
        if facts.indexes:
            details.append(f"shards the index does not name (stale?): {_listed(strays)}")
        else:
            details.append(f"shards without {conventions.index_of_shard(strays[0])}: {_listed(strays)}")
    if not facts.safetensors:
        details.append("no safetensors file")
    total = human_bytes(sum(st.size for st in facts.safetensors.values()))
    summary = f"{len(facts.safetensors)} safetensors file(s), {total}; limit {shown} a shard"
    if details:
        return Check("shards", "fail", summary, details + warnings)
    return Check("shards", "warn" if warnings else "pass", summary, warnings)


def _index_problems(facts: FolderFacts, name: str) -> list[str]:
    index = facts.indexes[name]
    weight_map: dict[str, str] = index["weight_map"]
    problems = [
        f"{name} names {f}, which is missing" for f in sorted(set(weight_map.values())) if f not in facts.safetensors
    ]
    shards = sorted({f for f in weight_map.values() if f in facts.safetensors})
    for file in shards:
        listed = {n for n, f in weight_map.items() if f == file}
        stored = set(facts.safetensors[file].entries)
        if stored - listed:
            problems.append(f"{file} holds tensors the index does not place there: {_listed(sorted(stored - listed))}")
        if listed - stored:
            problems.append(f"the index places tensors in {file} that it lacks: {_listed(sorted(listed - stored))}")
    single = name.replace(".safetensors.index", "").replace(".json", ".safetensors")  # model.fp16.safetensors
    if single in facts.safetensors and single not in weight_map.values():
        problems.append(f"{single} beside an index: loaders take {single} and ignore the shards")
    total = index.get("metadata", {}).get("total_size")
    data = sum(facts.safetensors[f].size - facts.safetensors[f].data_start for f in shards)
    if total is not None and total != data:
        problems.append(f"the index's total_size is {total}, the shards hold {data} bytes of tensors")
    return problems


def check_plain_loaders(record: ties.TieRecord, probe: LoadProbe) -> Check:
    """Names a plain safetensors loader will not see, and what to do about them."""
    retied = set(probe.tied) | set(probe.tied.values())
    details = [
        f"{name}: view of {view.base}; pass --materialize-views to store it as a tensor"
        for name, view in record.views.items()
    ]
    details += [
        f"{name}: copy of {target}; drop --dedup-identical to store it on its own"
        for name, target in record.copies.items()
    ]
    details += [
        f"{name}: alias of {target}, which the model class does not re-tie; converter.load_file restores it"
        for name, target in record.aliases.items()
        if name not in retied
    ]
    if details:
        return Check("plain_loaders", "warn", f"{len(details)} name(s) only tiesafe restores", details)
    return Check("plain_loaders", "pass", "every name is stored, or re-tied by the model class on load")


def plan_upload(files: dict[str, int], source_files: Iterable[str]) -> UploadPlan:
    """Add every file of the upload-ready folder; delete the source's files it replaces.

    The folder carries every other file of the source over, so a source file that
    is not in it was replaced (a pickle, its index, a stale shard): it is deleted
    on the Hub where the repo holds it.

    Example:
        >>> plan = plan_upload({"model.safetensors": 10, "config.json": 2}, ["pytorch_model.bin", "config.json"])
        >>> [f.path for f in plan.add], plan.delete, plan.bytes_to_upload
        (['config.json', 'model.safetensors'], ['pytorch_model.bin'], 12)
    """
    return UploadPlan(
        add=[PlannedFile(name, size) for name, size in sorted(files.items())],
        delete=sorted(set(source_files) - set(files)),
    )
