"""Before you upload to the Hub: check, convert, plan, push.

``prepare_upload`` turns a model folder -- a local one, or a repo in the local
Hugging Face cache -- into an upload-ready folder and a report of every check.
As huggingface_hub's serialization module splits the sharding strategy from the
writing, the work is split in three:

1. I/O that *builds and reads* (here): the conversion (``convert_folder``), the
   facts about the new folder (file sizes, safetensors headers, index, config),
   and one ``from_pretrained`` on the ``meta`` device;
2. pure functions that turn those facts into checks and into the upload plan
   (:mod:`converter.hub_checks`);
3. I/O that *carries the plan out* (here): ``push``, one ``HfApi.create_commit``.

Nothing here needs the network except ``push``; the cache is found with
huggingface_hub's own ``snapshot_download(local_files_only=True)``, which honours
``HF_HOME``/``HF_HUB_CACHE`` and works under ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import secrets
import shutil
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import conventions
from .components import is_multi_component, model_components, model_files, stray_folders
from .conventions import WEIGHT_SUFFIXES
from .declared import resolve_declared
from .errors import TiesafeError, UnsafeCheckpointError
from .folder import FolderReport, convert_folder, find_weight_sets, parse_size
from .hub_checks import (
    Check,
    FolderFacts,
    LoadProbe,
    UploadPlan,
    check_config,
    check_conversion,
    check_from_pretrained,
    check_pickles,
    check_plain_loaders,
    check_shards,
    plan_upload,
)
from .identical import identical_groups
from .layout import StoredItem
from .readers.torchfile import read_tree
from .stfile import read_safetensors
from .verify import output_windows
from .writer import TEMP_SUFFIX, StagedWrites

PICKLE_SUFFIXES = (*WEIGHT_SUFFIXES, ".pkl")


# --------------------------------------------------------------------------- report


@dataclass
class PushResult:
    """What ``push`` committed."""

    repo_id: str
    revision: str | None
    pull_request: bool
    commit_url: str
    pr_url: str | None
    added: list[str]
    deleted: list[str]
    not_on_hub: list[str]  # planned deletions the repo did not hold


@dataclass
class UploadReport:
    """Every check, the upload-ready folder (only when no check failed) and the plan."""

    source: str  # the folder or repo id given
    folder: str  # the folder read (a cache snapshot for a repo id)
    commit: str | None  # the cached snapshot's commit, for a repo id
    output: str | None
    checks: list[Check]
    plan: UploadPlan | None
    conversion: FolderReport | None = None
    push: PushResult | None = None

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (what ``--json`` prints)."""
        data = asdict(self)
        data["conversion"] = None if self.conversion is None else self.conversion.to_dict()
        if self.plan is not None:
            data["plan"]["bytes_to_upload"] = self.plan.bytes_to_upload
        data["ok"] = self.ok
        return data


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


# --------------------------------------------------------------------------- reading the folder


def _looks_like_pickle(path: Path) -> bool:
    """A pickle or a torch zip archive, whatever its name (an OpenVINO ``.bin`` is neither)."""
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:1] == b"\x80":  # the PROTO opcode every pickle of protocol 2 or later starts with
        return True
    if head == b"PK":
        try:
            with zipfile.ZipFile(path) as archive:
                return any(n.endswith(".pkl") for n in archive.namelist())
        except (zipfile.BadZipFile, OSError):
            return False
    return False


def _files(folder: Path, recursive: bool) -> list[str]:
    """The folder's files as relative paths: its component folders' too for a multi-component model."""
    if not recursive:
        return sorted(p.name for p in folder.iterdir() if p.is_file())
    return model_files(folder, model_components(folder)[1])


def _pickles(folder: Path, recursive: bool = False) -> list[str]:
    return [
        name
        for name in _files(folder, recursive)
        if Path(name).suffix in PICKLE_SUFFIXES and _looks_like_pickle(folder / name)
    ]


def _read_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"not valid JSON ({str(exc)[:80]})"
    if not isinstance(data, dict):
        return None, "not a JSON object"
    return data, None


def read_facts(folder: str | Path) -> FolderFacts:
    """Read what the checks need from ``folder``: sizes, headers, index, config, tie records.

    Example:
        >>> read_facts("gpt2-upload").weights  # doctest: +SKIP
        ['model.safetensors']
    """
    folder = Path(folder)
    facts = FolderFacts({p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}, {}, {})
    for name in facts.files:
        if name.endswith(".safetensors"):
            try:
                facts.safetensors[name] = read_safetensors(folder / name)
            except TiesafeError as exc:
                facts.problems[name] = exc.problem
    indexes = conventions.safetensors_indexes(list(facts.files))
    for name in indexes:
        index, problem = _read_json(folder / name)
        weight_map = index.get("weight_map") if index else None
        if problem is None and not (
            isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
        ):
            problem = "no weight_map of tensor names to file names"
        if problem is not None or index is None:
            facts.problems[name] = problem or "unreadable"
        else:
            facts.indexes[name] = index
    main = [n for n in indexes if n.count(".") == 3] or indexes  # no variant: the set loaded by default
    if main:
        facts.index_name = main[0]
        facts.index = facts.indexes.get(main[0])
    if "config.json" in facts.files:
        facts.config, problem = _read_json(folder / "config.json")
        if problem is not None:
            facts.problems["config.json"] = problem
    try:
        facts.windows, facts.record = output_windows(facts.safetensors[n] for n in facts.weights)
    except TiesafeError as exc:
        facts.problems[Path(exc.path).name if exc.path else "weights"] = exc.problem
    return facts


# --------------------------------------------------------------------------- from_pretrained


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No warnings or progress bars from transformers while we probe; restored afterwards."""
    import transformers

    tf_logging: Any = transformers.utils.logging  # partly untyped
    verbosity = tf_logging.get_verbosity()
    bars = tf_logging.is_progress_bar_enabled()
    tf_logging.set_verbosity(logging.ERROR)
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        tf_logging.set_verbosity(verbosity)
        if bars:
            tf_logging.enable_progress_bar()


def _differing(facts: FolderFacts, pairs: dict[str, str]) -> list[tuple[str, str]]:
    """Tied pairs that the files store as two tensors whose bytes differ."""
    found = []
    for target, source in pairs.items():
        a, b = facts.windows.get(target), facts.windows.get(source)
        if a is None or b is None or a == b:
            continue  # one is absent (tied on load) or both resolve to the same bytes
        items = [StoredItem(n, w.ref.dtype, w.ref.shape, w) for n, w in ((target, a), (source, b))]
        if a.ref.dtype != b.ref.dtype or a.ref.shape != b.ref.shape or not identical_groups(items):
            found.append((target, source))
    return found


def _variant(weights_file: str) -> str | None:
    """``fp16`` for ``model.fp16.safetensors`` or its shards: what from_pretrained needs as ``variant``."""
    stem = weights_file.removesuffix(".safetensors").split("-", 1)[0] if "-of-" in weights_file else weights_file
    parts = stem.removesuffix(".safetensors").split(".")
    return parts[1] if len(parts) == 2 else None


def probe_from_pretrained(folder: str | Path, facts: FolderFacts) -> LoadProbe:
    """Load ``folder`` with the class its config names, on the ``meta`` device.

    Cheap whatever the model size: ``device_map="meta"`` makes transformers build the
    model without memory, read each tensor through a memory map and drop it onto the
    meta device, so what is checked is the key matching ``from_pretrained`` does
    (missing, unexpected, mismatched, tied) -- not the values, which the conversion
    verified bit for bit. Only classes transformers ships are used (never remote code).

    Example:
        >>> probe_from_pretrained("llama-upload", read_facts("llama-upload")).missing  # doctest: +SKIP
        []
    """
    if facts.config is None:
        return LoadProbe(skipped="no config.json")
    architectures = facts.config.get("architectures")
    name = architectures[0] if isinstance(architectures, list) and architectures else None
    if not isinstance(name, str) and isinstance(facts.config.get("model_type"), str):
        name = resolve_declared(folder, list(facts.windows)).architecture  # chosen by the weights' names
    if not isinstance(name, str):
        return LoadProbe(skipped="config.json names no architecture")
    probe = LoadProbe(architecture=name)
    variant = _variant(facts.weights[0]) if facts.weights else None
    import transformers

    model_class = getattr(transformers, name, None)
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        probe.skipped = f"transformers has no class {name} (custom code: tiesafe never runs it)"
        return probe
    probe.known = True
    if importlib.util.find_spec("accelerate") is None:
        probe.skipped = "loading on the meta device needs accelerate: pip install 'tiesafe[hub]'"
        return probe
    try:
        with _quiet_transformers():
            loaded: Any = model_class.from_pretrained(
                Path(folder),
                device_map="meta",
                output_loading_info=True,
                local_files_only=True,
                use_safetensors=True,
                variant=variant,
            )
    except Exception as exc:  # transformers on user files can fail in any way: one line for the report
        probe.error = f"{type(exc).__name__}: {_first_line(exc)}"
        return probe
    model, info = loaded
    probe.missing = sorted(info.get("missing_keys", ()))
    probe.unexpected = sorted(info.get("unexpected_keys", ()))
    probe.mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", ()))
    probe.tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    tie = getattr(model.config, "tie_word_embeddings", None)
    probe.tie_word_embeddings = tie if isinstance(tie, bool) else None
    probe.differing = _differing(facts, probe.tied)
    return probe


# --------------------------------------------------------------------------- building the folder


@dataclass(frozen=True)
class _Source:
    folder: Path
    repo_id: str | None
    commit: str | None


def _cached_revisions(repo_id: str, cache_dir: str | Path | None) -> str:
    """``main (81416e5); v1 (0a1b2c3)``: what the cache holds of ``repo_id``, for error messages."""
    from huggingface_hub import scan_cache_dir

    try:
        cache = scan_cache_dir(cache_dir)
    except Exception:  # no cache folder at all, or one scan_cache_dir cannot read: nothing to list
        return ""
    found = []
    for repo in cache.repos:
        if repo.repo_id == repo_id and repo.repo_type == "model":
            for revision in sorted(repo.revisions, key=lambda r: r.commit_hash):
                refs = ", ".join(sorted(revision.refs)) or "no branch"
                found.append(f"{refs} ({revision.commit_hash[:7]})")
    return "; ".join(found)


def _resolve_source(source: str | Path, *, revision: str | None, cache_dir: str | Path | None) -> _Source:
    """A local folder, or the snapshot of a repo id in the local Hugging Face cache (no network).

    ``snapshot_download(local_files_only=True)`` finds it as the library lays the cache
    out (``HF_HUB_CACHE``, else ``HF_HOME/hub``), branch and tag names included.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    path = Path(source)
    if path.is_dir():
        if revision is not None:
            raise TiesafeError("--revision applies to repo ids, not to folders", path=path)
        return _Source(path, None, None)
    if path.exists():
        raise TiesafeError("is a file: prepare-upload takes a model folder (tiesafe convert takes files)", path=path)
    repo_id = str(source)
    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True))
    except HFValidationError:
        raise TiesafeError("no such folder, and not a repo id (org/name)", path=path) from None
    except Exception as exc:  # LocalEntryNotFoundError, IncompleteSnapshotError, ...: one line either way
        cached = _cached_revisions(repo_id, cache_dir)
        where = f"cached: {cached}" if cached else "not in the local Hugging Face cache (first: hf download)"
        wanted = f" at revision {revision!r}" if revision else ""
        raise TiesafeError(
            f"no usable cached snapshot{wanted} ({_first_line(exc)[:120]}); {where}", path=repo_id
        ) from None
    # The cache names each snapshot folder after its commit hash.
    return _Source(snapshot, repo_id, snapshot.name)


def _default_out(source: _Source) -> Path:
    if source.repo_id is not None:
        return Path.cwd() / f"{source.repo_id.split('/')[-1]}-upload"
    return source.folder.parent / f"{source.folder.name}-upload"


def _check_out(out: Path, source: Path) -> None:
    if out.resolve() == source.resolve():
        raise TiesafeError("--out must be a new folder, not the source", path=out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TiesafeError("exists and is not an empty folder; choose a new --out or remove it", path=out)


def _scan_pickles(folder: Path, names: list[str]) -> dict[str, str]:
    """Kept pickles that ask for anything beyond plain tensors, with the refusal.

    Strict: a pickle that goes to the Hub is run by whoever loads it, so a foreign
    global that tiesafe itself would read as an inert object still fails the check.
    """
    refused = {}
    for name in names:
        try:
            read_tree(folder / name, strict=True)
        except UnsafeCheckpointError as exc:
            refused[name] = exc.problem
        except TiesafeError:
            pass  # not a state dict (optimizer state, plain pickle): refused only for what it imports
    return refused


def _replaced_weights(source: Path) -> tuple[str, list[str]]:
    """The library of ``source`` and the pickle weights (and indexes) a conversion replaces, as relative paths."""
    library, components = model_components(source)
    replaced = []
    for component in components:
        for weights in find_weight_sets(source / component.path):
            replaced += [p.relative_to(source).as_posix() for p in weights.replaced]
    return library, replaced


def _build(
    source: Path, staging: Path, *, keep_pickles: bool, options: dict[str, Any]
) -> tuple[FolderReport | None, list[str], list[str], str]:
    """Fill ``staging`` with the upload: converted weights and the other files.

    Returns the conversion report (None when the folder had no pickle weights),
    the pickles left out, notes (the source's safetensors outputs the conversion
    replaced; subfolders not carried over, except the components of a multi-folder
    model, which are all carried), and the library of the folder.
    """
    library, replaced = _replaced_weights(source)
    recursive = is_multi_component(library)
    report = None
    weights = set(replaced)  # the pickle weights (and their index) that the conversion replaces
    if weights:
        report = convert_folder(source, staging, verify=True, **options)  # copies every other file too
    pickles = set(_pickles(source, recursive))
    left_out = [] if keep_pickles else sorted(pickles - weights)
    if report is None:
        to_copy = [n for n in _files(source, recursive) if keep_pickles or n not in pickles]
    else:
        to_copy = sorted(weights) if keep_pickles else []
    for name in to_copy:
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
    with StagedWrites() as staged:
        for name in to_copy:
            staged.copy_file(source / name, staging / name)
    for name in left_out:
        (staging / name).unlink(missing_ok=True)  # convert_folder copied it with the other files
    if report is not None:
        report.copied = sorted(set(report.copied) - set(left_out))
    notes = [
        f"{n} of the source is replaced by the conversion of the pickles"
        for n in (report.files if report else [])
        if (source / n).is_file()
    ]
    folders = [name + "/" for name in stray_folders(source, model_components(source)[1])]
    if folders:
        notes.append(f"subfolders are not carried over: {', '.join(folders)}")
    return report, left_out, notes, library


def _load_probe(staging: Path, facts: FolderFacts, library: str) -> LoadProbe:
    """The load check: transformers' from_pretrained, or the folder's own library's loader."""
    if library in ("transformers", "other"):
        return probe_from_pretrained(staging, facts)
    from .library_checks import probe_library_load

    return probe_library_load(staging, library)


def _component_facts(staging: Path, library: str) -> dict[str, FolderFacts]:
    """Facts of every folder of the upload that holds safetensors (the model folder alone for one-folder models)."""
    if not is_multi_component(library):
        return {"": read_facts(staging)}
    _, components = model_components(staging)
    found = {}
    for component in components:
        facts = read_facts(staging / component.path)
        if facts.safetensors or component.path == "":
            found[component.path] = facts
    return found


def _merged_shards(checks: dict[str, Check]) -> Check:
    """One shards check over the components: the worst status, each detail prefixed by its folder."""
    if list(checks) == [""]:
        return checks[""]
    order = {"pass": 0, "warn": 1, "fail": 2}
    status = max((c.status for c in checks.values()), key=order.__getitem__, default="pass")
    details = [f"{k or '.'}/: {d}" for k, c in checks.items() for d in c.details]
    summary = "; ".join(f"{k or '.'}/: {c.summary}" for k, c in checks.items())
    return Check("shards", status, summary, details)


def _run_checks(
    staging: Path,
    report: FolderReport | None,
    left_out: list[str],
    notes: list[str],
    max_shard_size: int | str,
    library: str,
) -> list[Check]:
    recursive = is_multi_component(library)
    facts_by_folder = _component_facts(staging, library)
    facts = facts_by_folder.get("") or read_facts(staging)
    for folder, component in facts_by_folder.items():
        if folder:
            facts.problems.update({f"{folder}/{n}": why for n, why in component.problems.items()})
    upload_pickles = _pickles(staging, recursive)
    probe = _load_probe(staging, facts, library)
    shards = {
        folder: check_shards(component, max_shard_size)
        for folder, component in facts_by_folder.items()
        if component.safetensors or not recursive
    }
    return [
        check_pickles(upload_pickles, left_out, _scan_pickles(staging, upload_pickles)),
        check_conversion(report, notes, facts),
        check_config(facts, probe, facts.record),
        check_from_pretrained(probe, facts.record),
        _merged_shards(shards) if shards else Check("shards", "fail", "no safetensors file in any component"),
        check_plain_loaders(facts.record, probe),
    ]


def prepare_upload(
    source: str | Path,
    out: str | Path | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    max_shard_size: int | str = "5GB",
    keep_pickles: bool = False,
    materialize_views: bool = False,
    dedup_identical: bool = False,
    allow_untied: bool = False,
) -> UploadReport:
    """Check a model folder (or a repo in the local HF cache) and build its upload-ready folder.

    The folder is built beside ``out`` under a temporary name, checked, and renamed
    to ``out`` only when no check failed; otherwise nothing is left behind and the
    report says why. The source is never modified.

    Example:
        >>> report = prepare_upload("gpt2", "gpt2-upload")  # doctest: +SKIP
        >>> [(c.name, c.status) for c in report.checks][:2], report.plan.delete
        ([('pickles', 'pass'), ('conversion', 'pass')], ['pytorch_model.bin'])
    """
    resolved = _resolve_source(source, revision=revision, cache_dir=cache_dir)
    limit = parse_size(max_shard_size)
    target = Path(out) if out is not None else _default_out(resolved)
    _check_out(target, resolved.folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    options = {
        "max_shard_size": limit,
        "materialize_views": materialize_views,
        "dedup_identical": dedup_identical,
        "allow_untied": allow_untied,
    }
    report = UploadReport(str(source), str(resolved.folder), resolved.commit, None, [], None)
    staging = target.parent / f".{target.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    staging.mkdir()  # mode from the umask, like any new folder (mkdtemp would make it private)
    try:
        try:
            report.conversion, left_out, notes, library = _build(
                resolved.folder, staging, keep_pickles=keep_pickles, options=options
            )
        except UnsafeCheckpointError as exc:
            report.checks.append(
                Check("pickles", "fail", "a weights pickle imports more than plain tensors", [str(exc)])
            )
            return report
        except TiesafeError as exc:
            report.checks.append(Check("conversion", "fail", str(exc)))
            return report
        report.checks = _run_checks(staging, report.conversion, left_out, notes, max_shard_size, library)
        if report.ok:
            recursive = is_multi_component(library)
            files = {name: (staging / name).stat().st_size for name in _files(staging, recursive)}
            report.plan = plan_upload(files, _files(resolved.folder, recursive))
            os.replace(staging, target)  # replaces an empty folder; the upload appears whole
            report.output = str(target)
        if report.conversion is not None:
            report.conversion.output = report.output or ""  # not the temporary folder it was built in
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


# --------------------------------------------------------------------------- push


def _remote_errors() -> tuple[type[BaseException], ...]:
    """What the Hub client raises for HTTP statuses, transport failures and offline mode."""
    from huggingface_hub import errors

    # huggingface_hub 1.x+ raises its HTTP client's errors for transport failures.
    transport = getattr(errors, "HTTPError", OSError)
    return (OSError, ValueError, transport)


def _one_line(exc: BaseException) -> str:
    """The first line of a Hub client error, with the server's own message when it adds one."""
    first = _first_line(exc)
    server = getattr(exc, "server_message", None)
    if server and server.strip() and server.strip() not in first:
        first += f" ({server.strip().splitlines()[0]})"
    return first[:300]


def _description(report: UploadReport) -> str:
    lines = ["Prepared with tiesafe (`tiesafe prepare-upload`):", ""]
    lines += [f"- {c.status}: {c.name}: {c.summary}" for c in report.checks]
    return "\n".join(lines) + "\n"


def push(
    report: UploadReport,
    repo_id: str,
    *,
    pr: bool = False,
    message: str | None = None,
    revision: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
) -> PushResult:
    """Upload a prepared folder to ``repo_id`` in one commit: the plan's files, and its deletions.

    Refuses when a check failed. Deletions are limited to files the repo holds, and
    the commit names the head it was planned against (``parent_commit``), so the Hub
    refuses it if the branch moved in between. The token is huggingface_hub's
    (``HF_TOKEN`` or ``hf auth login``). ``pr=True`` opens a pull request, as the
    Hub's own convert bot does.

    Example:
        >>> push(prepare_upload("gpt2-local"), "me/gpt2", pr=True).pr_url  # doctest: +SKIP
        'https://huggingface.co/me/gpt2/discussions/1'
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token
    from huggingface_hub.errors import RepositoryNotFoundError

    if not report.ok or report.output is None or report.plan is None:
        failed = ", ".join(c.name for c in report.failed) or "the report has no upload folder"
        raise TiesafeError(f"not pushed: checks failed ({failed})")
    folder = Path(report.output)
    for planned in report.plan.add:
        path = folder / planned.path
        if not path.is_file() or path.stat().st_size != planned.size:
            raise TiesafeError(f"{planned.path} changed since the checks; run prepare-upload again", path=folder)
    token = token or get_token()
    if not token:
        raise TiesafeError("no Hugging Face token: run `hf auth login` or set HF_TOKEN")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        info = api.model_info(repo_id, revision=revision)
        on_hub = {s.rfilename for s in info.siblings or []}
        deleted = [name for name in report.plan.delete if name in on_hub]
        operations: list[Any] = [
            CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=str(folder / f.path)) for f in report.plan.add
        ]
        operations += [CommitOperationDelete(path_in_repo=name) for name in deleted]
        commit = api.create_commit(
            repo_id,
            operations,
            commit_message=message or "Upload safetensors weights prepared by tiesafe",
            commit_description=_description(report),
            revision=revision,
            create_pr=pr,
            parent_commit=info.sha,
        )
    except _remote_errors() as exc:
        hint = " (does it exist, and may your token write to it?)" if isinstance(exc, RepositoryNotFoundError) else ""
        raise TiesafeError(f"push to {repo_id} failed: {_one_line(exc)}{hint}; the local folder is unchanged") from None
    return PushResult(
        repo_id=repo_id,
        revision=revision,
        pull_request=pr,
        commit_url=str(commit.commit_url),
        pr_url=commit.pr_url,
        added=[f.path for f in report.plan.add],
        deleted=deleted,
        not_on_hub=[n for n in report.plan.delete if n not in on_hub],
    )
