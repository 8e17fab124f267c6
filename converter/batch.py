"""Convert whole trees: every model folder and loose checkpoint under a root.

The plan (which items, where their output goes, what is already done) and the
report are one code path; the work runs inline, in a process pool, or on any
``concurrent.futures.Executor`` (a Dask client's executor included). A JSON-lines
manifest under the output root records each finished item with its sources' size
and mtime and its outputs' hashes, so a rerun skips what is done and unchanged
and picks up where a killed run stopped; outputs are written atomically, so a
kill never leaves a partial file under a final name.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import conventions
from .components import Component, detect_library, is_multi_component, model_components, model_files, stray_folders
from .conventions import ADAPTER_CONFIG, CONFIG, NOT_WEIGHTS, OPEN_CLIP_CONFIG, WEIGHT_SUFFIXES
from .convert import convert_file, default_output
from .errors import TiesafeError
from .folder import convert_folder, plan_folder
from .readers.torchfile import read_checkpoint
from .run import convert_run, is_training_run, plan_run
from .sharing import plan_sharing
from .writer import TEMP_SUFFIX

MANIFEST = ".tiesafe-manifest.jsonl"
# Options of convert_folder a batch passes on; the manifest records them filled in,
# so that the same run from the CLI and from Python is recognised as done.
DEFAULT_OPTIONS: dict[str, Any] = {
    "max_shard_size": "5GB",
    "verify": True,
    "materialize_views": False,
    "dedup_identical": False,
    "allow_untied": False,
    "strict": False,
    "strip_prefix": [],
    "keep_names": False,
}
# The options that apply to a single checkpoint file (the rest are folder options).
FILE_OPTIONS = ("verify", "materialize_views", "strict", "strip_prefix", "keep_names")
_HASH_BLOCK = 16 * 1024 * 1024
_START_POLL_SECONDS = 0.2  # how soon an item an executor takes from its queue shows as started


@dataclass(frozen=True)
class BatchItem:
    """One unit of work: a model folder or a loose checkpoint file."""

    kind: str  # "folder", "file" or "run" (a DeepSpeed or DCP training checkpoint)
    source: Path
    output: Path  # a folder for folder items, a .safetensors file for file items
    key: str  # path relative to the root, the item's name in the manifest
    size: int  # bytes of pickle weights, to balance and to show progress
    recursive: bool = False  # a multi-component model: its subfolders belong to it


@dataclass
class ItemResult:
    """What happened to one item."""

    item: str
    kind: str
    status: str  # "converted", "unchanged", "failed" or "planned" (dry run)
    source: str
    output: str
    size: int
    bytes_written: int = 0
    bytes_saved: int = 0
    seconds: float = 0.0
    error: str | None = None
    report: dict[str, Any] | None = None
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> size, sha256
    # The process that ran the item and its peak resident memory (bytes) when the item
    # ended: the high-water mark of that whole process so far, the figure to size a worker by.
    worker_pid: int | None = None
    peak_rss: int | None = None


def _weight_files(folder: Path) -> tuple[bool, list[Path], bool]:
    """Whether ``folder`` is a model folder, its loose pickles otherwise, and whether it is a
    multi-component model (a diffusers pipeline, a sentence-transformers model: one item, its
    subfolders included)."""
    if is_multi_component(detect_library(folder)):
        return True, [], True
    names = {p.name: p for p in folder.iterdir() if p.is_file()}
    pickles = sorted(p for n, p in names.items() if p.suffix in WEIGHT_SUFFIXES and not NOT_WEIGHTS.match(n))
    parsed = [conventions.parse_weight_name(p.name) for p in pickles]
    if any(conventions.parse_index_name(n) for n in names) or any(w is not None and w.known for w in parsed):
        return True, [], False  # names a library loads (conventions table)
    markers = (CONFIG, ADAPTER_CONFIG, OPEN_CLIP_CONFIG)
    if any(m in names for m in markers) and len(pickles) == 1:
        return True, [], False  # a model with its config, or a PEFT adapter with its own
    return False, pickles, False


def _components(folder: Path) -> list[Component]:
    """The component folders of a multi-component model; none when its manifest is broken (the
    item then fails with the reason, and nothing below it is guessed)."""
    try:
        return model_components(folder)[1]
    except TiesafeError:
        return []


def _not_components(folder: Path) -> set[str]:
    """Subfolders of a multi-component model that no manifest names (searched as any other folder)."""
    components = _components(folder)
    return set(stray_folders(folder, components)) if components else set()


def discover(root: str | Path, out: str | Path | None = None, *, in_place: bool = False) -> list[BatchItem]:
    """Every model folder and loose checkpoint under ``root``, largest first.

    Outputs mirror the tree under ``out``, or sit beside the sources with ``in_place``.

    Example:
        >>> [i.key for i in discover("runs", "runs-st")]  # doctest: +SKIP
        ['llama-7b', 'gpt2/checkpoint-500', 'loose/weights.pt']
    """
    root = Path(root)
    if not root.is_dir():
        raise TiesafeError("is not a folder", path=root)
    if out is None and not in_place:
        raise TiesafeError("give an output folder (--out) or --in-place")
    target = root if in_place or out is None else Path(out)
    skip = target.resolve() if target != root else None
    items: list[BatchItem] = []
    for folder, dirs, _ in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (here / d).resolve() != skip)
        relative = here.relative_to(root)
        if is_training_run(here):
            dirs[:] = []  # global_stepN folders belong to the run
            size = sum(p.stat().st_size for p in here.rglob("*") if p.is_file())
            items.append(BatchItem("run", here, target / relative, relative.as_posix(), size))
            continue
        is_model, loose, whole = _weight_files(here)
        if whole:
            dirs[:] = [d for d in dirs if d in _not_components(here)]  # its components are part of the item
        if is_model:
            files = [here / n for n in model_files(here, _components(here))] if whole else here.iterdir()
            size = sum(p.stat().st_size for p in files if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
            items.append(BatchItem("folder", here, target / relative, relative.as_posix(), size, whole))
        stems = Counter(default_output(p).name for p in loose)
        for path in loose:
            name = default_output(path).name
            # x.pt and x.bin side by side would both become x.safetensors: keep each apart.
            output = target / relative / (name if stems[name] == 1 else f"{path.name}.safetensors")
            items.append(BatchItem("file", path, output, (relative / path.name).as_posix(), path.stat().st_size))
    return sorted(items, key=lambda i: (-i.size, i.key))


def _signature(item: BatchItem) -> dict[str, list[int]]:
    """Size and mtime of every source file of the item: what "unchanged" means."""
    if item.kind == "file":
        files = [item.source]
    elif item.kind == "run":  # the rank files lie in a step folder below
        files = [p for p in item.source.rglob("*") if p.is_file() and not p.name.startswith(".")]
    elif item.recursive:  # the model's own files and its components' (not a training run beside them)
        files = [item.source / name for name in model_files(item.source, _components(item.source))]
    else:
        files = [p for p in item.source.iterdir() if p.is_file() and not p.name.startswith(".")]
    base = item.source if item.kind in ("folder", "run") else item.source.parent
    return {p.relative_to(base).as_posix(): [st.st_size, st.st_mtime_ns] for p in sorted(files) if (st := p.stat())}


def process_peak_rss() -> int | None:
    """This process's peak resident memory so far, in bytes (None where the OS does not say).

    On Linux it is ``VmHWM``, the peak of this program's own memory. ``getrusage``'s
    ``ru_maxrss`` is not: Linux carries it over exec, so a worker started by a
    large process would report that process's size.

    Example:
        >>> process_peak_rss() > 0
        True
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on the BSDs


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _clean_stale_temporaries(item: BatchItem) -> None:
    """Temporary files a killed run or a dead worker left for the item's outputs.

    They are named ``.<final>.<random>.tiesafe-tmp``. A file item removes only
    its own: loose checkpoints of one folder share their output folder, and
    another worker may be writing there at this moment.
    """
    whole = item.kind in ("folder", "run")
    folder, prefix = (item.output, ".") if whole else (item.output.parent, f".{item.output.name}.")
    if folder.is_dir():
        # A multi-component model writes into its component folders too.
        for path in folder.rglob(f"{prefix}*") if item.recursive else folder.iterdir():
            if path.name.startswith(prefix) and path.name.endswith(TEMP_SUFFIX) and path.is_file():
                path.unlink(missing_ok=True)


def run_item(item: BatchItem, options: dict[str, Any], dry_run: bool = False) -> ItemResult:
    """Convert (or, with ``dry_run``, plan) one item; errors become a failed result.

    A module-level function so that process pools and Dask workers can run it.
    """
    started = time.perf_counter()
    result = ItemResult(
        item.key, item.kind, "planned" if dry_run else "converted", str(item.source), str(item.output), item.size
    )
    try:
        if dry_run:
            report = _plan_item(item, options)
        else:
            _clean_stale_temporaries(item)
            if item.kind == "run":
                run_options = {k: v for k, v in options.items() if k in ("max_shard_size", "verify", "allow_untied")}
                report = convert_run(item.source, item.output, overwrite=True, **run_options).to_dict()
                written = {name: item.output / name for name in report["files"]}
            elif item.kind == "folder":
                report = convert_folder(item.source, item.output, overwrite=True, **options).to_dict()
                written = {name: item.output / name for name in report["files"]}  # relative to the item's output
            else:
                file_options = {k: v for k, v in options.items() if k in FILE_OPTIONS}
                report = convert_file(item.source, item.output, overwrite=True, **file_options).to_dict()
                written = {item.output.name: item.output}
            result.outputs = {n: {"size": p.stat().st_size, "sha256": _hash_file(p)} for n, p in written.items()}
        result.report = report
        result.bytes_written = report["bytes_written"]
        result.bytes_saved = report["bytes_saved"]
    except TiesafeError as exc:
        result.status, result.error = "failed", str(exc)
    except Exception as exc:  # keep going past a bug in one item; it is reported, not hidden
        result.status, result.error = "failed", f"{item.source}: internal error: {type(exc).__name__}: {exc}"
    result.seconds = time.perf_counter() - started
    result.worker_pid, result.peak_rss = os.getpid(), process_peak_rss()
    return result


def _plan_item(item: BatchItem, options: dict[str, Any]) -> dict[str, Any]:
    if item.kind == "run":
        run_plan = plan_run(item.source, max_shard_size=options.get("max_shard_size", "5GB"))
        return run_plan.report(item.output, run_plan.written_names, verified=False, seconds=0.0).to_dict()
    if item.kind == "folder":
        planning = {k: v for k, v in options.items() if k != "verify"}
        plan = plan_folder(item.source, **planning)
        plan.confirm_flat_sets()  # not copied here: their local headers are read now
        return plan.report(item.output, plan.written_names, verified=False, seconds=0.0).to_dict()
    ckpt = read_checkpoint(
        item.source,
        strict=bool(options.get("strict")),
        strip_prefix=tuple(options.get("strip_prefix", ())),
        keep_names=bool(options.get("keep_names")),
    )
    sharing = plan_sharing(ckpt.tensors, materialize_views=bool(options.get("materialize_views")))
    total = sum(t.nbytes for t in ckpt.tensors.values())
    written = sum(s.ref.nbytes for s in sharing.stored)
    return {"bytes_all_names": total, "bytes_written": written, "bytes_saved": total - written}


class Manifest:
    """The JSON-lines record of finished items under the output root."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done: dict[str, dict[str, Any]] = {}
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self.done[entry["item"]] = entry
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a kill: that item is simply redone

    def is_current(self, item: BatchItem, options: dict[str, Any]) -> bool:
        entry = self.done.get(item.key)
        if entry is None or entry.get("options") != options or entry.get("sources") != _signature(item):
            return False
        folder = item.output if item.kind in ("folder", "run") else item.output.parent
        outputs = entry.get("outputs", {})
        return bool(outputs) and all(
            (folder / name).is_file() and (folder / name).stat().st_size == meta.get("size")
            for name, meta in outputs.items()
        )

    def record(self, item: BatchItem, options: dict[str, Any], result: ItemResult) -> None:
        entry = {
            "item": item.key,
            "kind": item.kind,
            "sources": _signature(item),
            "outputs": result.outputs,
            "options": options,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[item.key] = entry


def default_workers() -> int:
    """One worker per core, at most 2: what was measured to pay (README, Whole trees).

    An item keeps one core busy about 80% of its time (copy, verification, the
    manifest's SHA-256) and waits on the disk the rest; on the 2-core benchmark
    machine a second worker converted the tree in 0.70x the time of one (0.9x on
    a first run, when each worker also builds the declared ties' model classes),
    for ~57 MiB more. More than two was not measured: ``--workers N`` goes higher.

    Example:
        >>> 1 <= default_workers() <= 2
        True
    """
    return max(1, min(2, os.cpu_count() or 1))


def convert_tree(
    root: str | Path,
    out: str | Path | None = None,
    *,
    in_place: bool = False,
    workers: int | None = None,
    force: bool = False,
    dry_run: bool = False,
    executor: concurrent.futures.Executor | None = None,
    client: Any = None,
    on_start: Callable[[BatchItem], None] | None = None,
    **options: Any,
) -> Iterator[ItemResult]:
    """Convert every model folder and loose checkpoint under ``root``; yield a result per item.

    ``options`` are those of :func:`~converter.convert_folder` (``max_shard_size``,
    ``verify``, ``dedup_identical``, ...). Items already converted and unchanged
    are yielded as ``"unchanged"`` unless ``force``. A failed item does not stop
    the others. ``client`` (a ``distributed.Client``) runs the items on its Dask
    cluster, largest first as workers free up; ``executor`` on any
    ``concurrent.futures.Executor``; by default ``workers`` processes (inline for one).

    Example:
        >>> failed = [r for r in convert_tree("runs", "runs-st") if r.status == "failed"]  # doctest: +SKIP
    """
    unknown = set(options) - set(DEFAULT_OPTIONS)
    if unknown:
        raise TypeError(f"convert_tree() got unexpected options: {', '.join(sorted(unknown))}")
    if client is not None and executor is not None:
        raise TypeError("convert_tree() takes client or executor, not both")
    if client is not None:  # workers elsewhere do not share our working directory
        root, out = Path(root).absolute(), None if out is None else Path(out).absolute()
    options = {**DEFAULT_OPTIONS, **options}
    options["strip_prefix"] = list(options["strip_prefix"])  # as the manifest's JSON holds it
    items = discover(root, out, in_place=in_place)
    target = Path(root) if in_place or out is None else Path(out)
    manifest = Manifest(target / MANIFEST)
    if client is not None:
        from .dask_executor import DaskExecutor, check_workers

        if not dry_run:
            target.mkdir(parents=True, exist_ok=True)  # so that workers can be asked whether they may write there
        check_workers(client, root, None if dry_run else target)
        executor = DaskExecutor(client)
    todo = []
    for item in items:
        if not dry_run and not force and manifest.is_current(item, options):
            yield ItemResult(item.key, item.kind, "unchanged", str(item.source), str(item.output), item.size)
        else:
            todo.append(item)
    workers = workers or default_workers()
    if executor is None and (workers == 1 or len(todo) <= 1):
        for item in todo:
            if on_start:
                on_start(item)
            result = run_item(item, options, dry_run)
            if result.status == "converted":
                manifest.record(item, options, result)
            yield result
        return
    own = executor is None or client is not None
    pool = executor or concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    # Our own pool gets an item only when a worker is free, so that a submitted item is one
    # being converted (on_start means what it says); an executor passed in keeps its own queue.
    window = workers if executor is None else len(todo)
    try:
        for item, result in _run_on(pool, todo, options, dry_run, window, on_start):
            if result.status == "converted":
                manifest.record(item, options, result)
            yield result
    finally:
        if own:
            pool.shutdown(wait=True, cancel_futures=True)


def _run_on(
    pool: concurrent.futures.Executor,
    todo: list[BatchItem],
    options: dict[str, Any],
    dry_run: bool,
    window: int,
    on_start: Callable[[BatchItem], None] | None,
) -> Iterator[tuple[BatchItem, ItemResult]]:
    """Run ``todo`` on ``pool``, at most ``window`` submitted at once, in order; yield results as they come.

    ``on_start`` is called when the executor starts an item (its future is running),
    not when it is queued, so a progress display shows the items actually in flight.
    """
    waiting = deque(todo)
    pending: dict[concurrent.futures.Future[ItemResult], BatchItem] = {}
    started: set[concurrent.futures.Future[ItemResult]] = set()

    def submit() -> None:
        while waiting and len(pending) < window:
            item = waiting.popleft()
            pending[pool.submit(run_item, item, options, dry_run)] = item

    def announce(future: concurrent.futures.Future[ItemResult], item: BatchItem) -> None:
        started.add(future)
        if on_start:
            on_start(item)

    submit()
    while pending:
        done = {future for future in pending if future.done()}
        if not done:  # items that finished are reported before the ones that took their place are shown
            for future, item in pending.items():
                if future not in started and future.running():
                    announce(future, item)
            queued = len(started) < len(pending)  # look again soon: a queued item may start any moment
            done, _ = concurrent.futures.wait(
                pending, timeout=_START_POLL_SECONDS if queued else None, return_when=concurrent.futures.FIRST_COMPLETED
            )
        finished = [(future, pending.pop(future)) for future in list(pending) if future in done]
        submit()  # the next items go out before the finished ones are recorded and reported
        for future, item in finished:
            if future not in started:  # it started and finished between two looks
                announce(future, item)
            started.discard(future)
            yield item, _outcome(future, item)


def _outcome(future: concurrent.futures.Future[ItemResult], item: BatchItem) -> ItemResult:
    try:
        return future.result()
    except Exception as exc:  # the executor lost the item (e.g. Dask: its workers kept dying)
        result = ItemResult(item.key, item.kind, "failed", str(item.source), str(item.output), item.size)
        result.error = f"{item.source}: not converted: {type(exc).__name__}: {exc}"
        return result


@dataclass
class BatchReport:
    """All items of a batch run, for the summary and ``--json``.

    ``pid`` and ``peak_rss`` (bytes) are those of the process that ran the batch;
    each item carries its worker's (``ItemResult.worker_pid``, ``.peak_rss``):
    the same process when the items ran inline.
    """

    root: str
    output: str
    items: list[ItemResult]
    seconds: float
    peak_rss: int | None = None
    pid: int = field(default_factory=os.getpid)

    @property
    def failed(self) -> list[ItemResult]:
        return [r for r in self.items if r.status == "failed"]

    @property
    def peak_rss_by_worker(self) -> dict[int, int]:
        """Worker pid -> its peak resident memory in bytes (the most any of its items saw).

        Example:
            >>> max(report.peak_rss_by_worker.values()) / 2**20  # doctest: +SKIP
            61.2
        """
        peaks: dict[int, int] = {}
        for r in self.items:
            if r.worker_pid is not None and r.peak_rss is not None:
                peaks[r.worker_pid] = max(peaks.get(r.worker_pid, 0), r.peak_rss)
        return peaks

    def to_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for r in self.items:
            counts[r.status] = counts.get(r.status, 0) + 1
        return {
            **asdict(self),
            "counts": counts,
            "bytes_saved": sum(r.bytes_saved for r in self.items),
            "bytes_written": sum(r.bytes_written for r in self.items),
            "peak_rss_by_worker": {str(pid): peak for pid, peak in self.peak_rss_by_worker.items()},
        }
