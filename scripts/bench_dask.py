"""The tree benchmark: ``tiesafe batch`` on a Dask LocalCluster against the local executor.

    python scripts/bench_dask.py               # a tree of 15 models (0.96 GB), 2 workers, median of 3
    python scripts/bench_dask.py --quick       # a tiny tree, one run: keeps the script working (CI)
    python scripts/bench_dask.py --json out.json

The tree (built once under ``--cache``; random weights in GPT-2 shapes from
transformers configs, tied ``lm_head``; nothing is downloaded) mixes sizes so
that balance matters: one 124M-parameter folder, two of 41M, four of 7M and
eight loose ``.pt`` files of 1 MB.

Two tables:

- **end to end**: the command a user runs, in a fresh process each time
  (``tiesafe batch --workers 1``, ``--workers 2``, ``--scheduler local:2``): it
  includes starting the processes or the cluster and the workers' imports. With
  peak RSS: of each worker process (from ``tiesafe batch --json``: every item
  carries its worker's pid and ``VmHWM``), of the coordinating process, their
  sum, and ``wait4``'s for the command (the largest single process of its tree).
- **warm workers**: ``convert_tree`` in this process on workers that already ran
  a batch, as on a long-lived cluster: inline, a process pool, Dask through
  tiesafe's :class:`DaskExecutor` (largest first, one item per free worker
  thread) and through Dask's own ``client.get_executor()`` (everything sent to
  the scheduler at once). Throughput per worker comes from this table.

Before every run the source files are evicted from the page cache
(``posix_fadvise(DONTNEED)``), so every run reads them from disk. Every output
of every mode is checked to be the same bytes (the manifest's SHA-256s).
``main()`` is what ``scripts/bench.py --dask`` calls.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the converter package of this checkout, also in spawned workers
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import evict, measure  # noqa: E402  (one page-cache eviction and one wait4 for every benchmark)

MB = 10**6
MiB = 2**20
# The declared-ties cache (converter/declared.py): filled, a run finds every folder's ties in
# it; empty, each process that converts a folder imports torch and transformers and builds
# the model class on the meta device once per config: what a first run on a machine pays.
TIE_CACHE_VARIABLE = "TIESAFE_CACHE_DIR"
_COLD = ", empty tie cache"
_ONE_WORKER, _ONE_WORKER_COLD = "tiesafe batch --workers 1", f"tiesafe batch --workers 1{_COLD}"
_RSS_KEYS = ("peak_rss_per_worker", "peak_rss_coordinator", "peak_rss_sum", "peak_rss_command")
# name -> (GPT-2 n_embd, n_layer, vocab or None for GPT-2's, copies); loose files are added apart
TREE: dict[str, tuple[int, int, int | None, int]] = {
    "gpt2-124m": (768, 12, None, 1),
    "gpt2-41m": (512, 8, 32000, 2),
    "gpt2-7m": (256, 4, 16000, 4),
}
QUICK_TREE: dict[str, tuple[int, int, int | None, int]] = {"gpt2-tiny": (64, 2, 1000, 3)}


# --------------------------------------------------------------------------- the tree


def _save_gpt2(folder: Path, n_embd: int, n_layer: int, vocab: int | None, seed: int) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    vocab_size = {"vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 0} if vocab else {}
    config = GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=8, **vocab_size)
    model = GPT2LMHeadModel(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]  # as on the Hub: the declared ties are read from it
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")


def _save_loose(path: Path, seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    weight = torch.randn(250_000)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"embed": weight, "head": weight, "bias": torch.randn(64)}, path)


def build_tree(cache: Path, quick: bool) -> Path:
    """The benchmark tree under ``cache`` (built unless a finished one is there)."""
    tree = cache / ("dask-tree-quick" if quick else "dask-tree")
    if (tree / ".complete").exists():
        return tree
    shutil.rmtree(tree, ignore_errors=True)
    seed = 0
    for name, (n_embd, n_layer, vocab, copies) in (QUICK_TREE if quick else TREE).items():
        for i in range(copies):
            seed += 1
            _save_gpt2(tree / "models" / f"{name}-{i}", n_embd, n_layer, vocab, seed)
    for i in range(4 if quick else 8):
        seed += 1
        _save_loose(tree / "loose" / f"run{i}.pt", seed)
    (tree / ".complete").touch()
    return tree


def _sources(tree: Path) -> list[Path]:
    return [p for p in tree.rglob("*") if p.suffix in (".bin", ".pt")]


def _hashes(out: Path) -> dict[str, dict[str, Any]]:
    """item -> its outputs' sizes and SHA-256s, from the manifest."""
    lines = (out / ".tiesafe-manifest.jsonl").read_text().splitlines()
    return {entry["item"]: entry["outputs"] for entry in map(json.loads, lines)}


# --------------------------------------------------------------------------- runs


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def end_to_end(tree: Path, work: Path, workers: int, runs: int) -> tuple[dict[str, list[dict[str, Any]]], list[Any]]:
    """``tiesafe batch`` in a fresh process, per mode: wall time and memory of each run; the outputs.

    Memory, from the OS: each item's result carries the peak RSS of the process that
    converted it when the item ended (its ``VmHWM``), so the largest per worker pid is
    that worker's peak, and the report has the coordinating process's own. Their sum
    bounds what the command held at once (peaks need not coincide). ``wait4`` on the
    command, started from a bare launcher (``measure(small_parent=True)``: Linux
    would otherwise count this process's size), gives the largest of the command
    and every child it reaped: one process's peak, not a sum.
    """
    modes = {  # mode -> (arguments, whether the declared-ties cache starts empty)
        _ONE_WORKER: (["--workers", "1"], False),
        f"tiesafe batch --workers {workers}": (["--workers", str(workers)], False),
        f"tiesafe batch --scheduler local:{workers}": (["--scheduler", f"local:{workers}"], False),
        _ONE_WORKER_COLD: (["--workers", "1"], True),
        f"tiesafe batch --workers {workers}{_COLD}": (["--workers", str(workers)], True),
    }
    measured: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    outputs = []
    argv = [sys.executable, "-m", "converter", "batch", str(tree), "--quiet", "--json", "--out"]
    _run_batch([*argv, str(_fresh(work / "e2e")), "--workers", "1"])  # fills the tie cache, compiles bytecode
    for _ in range(runs):
        for mode, (extra, empty_cache) in modes.items():  # modes alternate run by run
            out = _fresh(work / "e2e")
            evict(_sources(tree))
            with _tie_cache(_fresh(work / "empty-tie-cache") if empty_cache else None):
                run, report = _run_batch([*argv, str(out), *extra])
            peaks = {int(pid): peak for pid, peak in report["peak_rss_by_worker"].items()}
            measured[mode].append(
                {
                    "wall": run.wall,
                    "cpu": run.cpu,
                    "load": run.load,  # 1-minute load average when it started: other work on the machine
                    "workers_seen": len(peaks),
                    "peak_rss_per_worker": max(peaks.values()),
                    "peak_rss_by_worker": peaks,
                    "peak_rss_coordinator": report["peak_rss"],
                    "peak_rss_sum": report["peak_rss"] + sum(p for pid, p in peaks.items() if pid != report["pid"]),
                    "peak_rss_command": run.peak_rss,
                }
            )
            outputs.append(_hashes(out))
    return measured, outputs


def _run_batch(argv: list[str]) -> tuple[Any, dict[str, Any]]:
    """Run ``tiesafe batch ... --json`` once, measured; its report (every item must convert)."""
    with tempfile.TemporaryFile() as stdout:
        run = measure(argv, stdout=stdout, small_parent=True)
        stdout.seek(0)
        report = json.loads(stdout.read()) if run.returncode == 0 else None
    if report is None or report["counts"] != {"converted": len(report["items"])}:
        raise RuntimeError(f"{' '.join(argv)} failed: {run.error if report is None else report['counts']}")
    return run, report


@contextlib.contextmanager
def _tie_cache(folder: Path | None) -> Iterator[None]:
    """Point the declared-ties cache of the children at ``folder`` (None: leave it as it is)."""
    before = os.environ.get(TIE_CACHE_VARIABLE)
    if folder is not None:
        os.environ[TIE_CACHE_VARIABLE] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(TIE_CACHE_VARIABLE, None)
        else:
            os.environ[TIE_CACHE_VARIABLE] = before


def warm_workers(tree: Path, work: Path, workers: int, runs: int) -> tuple[dict[str, Any], list[Any]]:
    """``convert_tree`` on workers that are already up and have converted once: wall time and
    the seconds each item took inside its worker."""
    import concurrent.futures
    import multiprocessing

    from converter import DaskExecutor, convert_tree, dask_client

    started = time.perf_counter()
    with (
        dask_client(f"local:{workers}") as client,
        concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool,
    ):
        cluster_start = time.perf_counter() - started
        executors: dict[str, Callable[[], Any]] = {
            "inline (1 process)": lambda: None,
            f"process pool ({workers})": lambda: pool,
            f"Dask DaskExecutor ({workers} workers)": lambda: DaskExecutor(client),
            f"Dask client.get_executor() ({workers} workers)": lambda: client.get_executor(pure=False),
        }
        times: dict[str, list[float]] = {mode: [] for mode in executors}
        item_seconds: dict[str, list[list[float]]] = {mode: [] for mode in executors}
        first: dict[str, float] = {}
        outputs = []
        for run in range(runs + 1):  # run 0 warms every worker up (imports, first item) and is reported apart
            for mode, make in executors.items():
                out = _fresh(work / "warm")
                evict(_sources(tree))
                executor = make()
                workers_arg = 1 if executor is None else workers
                clock = time.perf_counter()
                results = list(convert_tree(tree, out, workers=workers_arg, executor=executor))
                seconds = time.perf_counter() - clock
                if run == 0:
                    first[mode] = seconds
                else:
                    times[mode].append(seconds)
                    item_seconds[mode].append([r.seconds for r in results])
                outputs.append(_hashes(out))
        overhead = {}
        for mode in list(executors)[2:]:  # per-item cost of going through the cluster: 200 empty calls
            executor = executors[mode]()
            clock = time.perf_counter()
            for future in [executor.submit(time.sleep, 0) for _ in range(200)]:
                future.result()
            overhead[mode] = time.perf_counter() - clock
    document = {"cluster_start": cluster_start, "first": first, "times": times, "item_seconds": item_seconds}
    return {**document, "overhead_per_call": overhead}, outputs


def cpu_parallelism(workers: int) -> float:
    """How many times one process's CPU-bound work ``workers`` processes get done together.

    A shared or throttled virtual machine may give far less than ``workers``:
    then no parallel mode can gain here, and the per-worker figures are the ones to scale.
    """
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_hash_work, [0] * workers))  # start the processes
        alone = pool.submit(_hash_work, 0).result()
        together = max(pool.map(_hash_work, [0] * workers))
    return workers * alone / together


def _hash_work(_: int) -> float:
    data = b"x" * (64 << 20)
    started = time.perf_counter()
    for _ in range(8):
        hashlib.sha256(data).digest()
    return time.perf_counter() - started


# --------------------------------------------------------------------------- report


def _table(title: str, times: dict[str, list[float]], size: int, workers: dict[str, int]) -> str:
    lines = [title, f"  {'mode':<44} {'wall s':>8} {'MB/s':>8} {'MB/s/worker':>12}"]
    for mode, values in times.items():
        wall = statistics.median(values)
        rate = size / wall / MB
        lines.append(f"  {mode:<44} {wall:8.2f} {rate:8.0f} {rate / workers[mode]:12.0f}")
    return "\n".join(lines)


def _e2e_table(measured: dict[str, list[dict[str, Any]]], size: int, workers: dict[str, int]) -> str:
    """Wall time, throughput and peak RSS per mode, medians over runs; time against one worker."""
    lines = [
        "end to end (fresh process, as a user runs it); x w1: wall time over --workers 1's with the same tie",
        "  cache, median of per-round ratios",
        "  peak RSS, MiB: of the largest worker process; of the coordinating tiesafe process; their sum (bounds what",
        "  they held together); wait4 on the command (the largest single process of its tree)",
        f"  {'mode':<44} {'wall s':>7} {'x w1':>5} {'MB/s':>5} {'MB/s/worker':>11} {'RSS/worker':>10}"
        f" {'coordinator':>11} {'sum':>5} {'wait4':>5}",
    ]
    for mode, runs in measured.items():
        wall = statistics.median(r["wall"] for r in runs)
        one = measured[_ONE_WORKER_COLD if mode.endswith(_COLD) else _ONE_WORKER]
        ratio = statistics.median(r["wall"] / base["wall"] for r, base in zip(runs, one, strict=True))
        rate = size / wall / MB
        rss = {key: statistics.median(r[key] for r in runs) / MiB for key in _RSS_KEYS}
        lines.append(
            f"  {mode:<44} {wall:7.2f} {ratio:5.2f} {rate:5.0f} {rate / workers[mode]:11.0f}"
            f" {rss['peak_rss_per_worker']:10.0f} {rss['peak_rss_coordinator']:11.0f} {rss['peak_rss_sum']:5.0f}"
            f" {rss['peak_rss_command']:5.0f}"
        )
    return "\n".join(lines)


def _balance_table(warm: dict[str, Any], size: int, workers: dict[str, int]) -> str:
    """Per mode: MB per second inside a worker, and wall time against the best a schedule could do."""
    lines = [
        "  inside the workers (median run): MB per second of item time; wall / ideal, where ideal is "
        "max(item time / workers, largest item)",
        f"  {'mode':<44} {'MB/s/item-s':>12} {'wall/ideal':>11}",
    ]
    for mode, runs in warm["item_seconds"].items():
        middle = sorted(range(len(runs)), key=lambda i: warm["times"][mode][i])[len(runs) // 2]
        seconds, wall = runs[middle], warm["times"][mode][middle]
        ideal = max(sum(seconds) / workers[mode], max(seconds))
        lines.append(f"  {mode:<44} {size / sum(seconds) / MB:12.0f} {wall / ideal:11.2f}")
    return "\n".join(lines)


def _workers_of(mode: str, workers: int) -> int:
    return 1 if "--workers 1" in mode or mode.startswith("inline") else workers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=ROOT / ".bench-cache", help="where the tree is built and kept")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per mode (medians are reported)")
    parser.add_argument("--workers", type=int, default=2, help="workers of the pool and of the LocalCluster")
    parser.add_argument("--quick", action="store_true", help="a tiny tree, one run: checks that the script works")
    parser.add_argument("--json", type=Path, help="write every run here")
    opts = parser.parse_args(argv)
    try:
        import distributed  # noqa: F401
    except ImportError:
        print("bench_dask: needs dask[distributed]: pip install 'tiesafe[dask]'", file=sys.stderr)
        return 2
    runs = 1 if opts.quick else opts.runs
    cache: Path = opts.cache.resolve()
    tree = build_tree(cache, opts.quick)
    size = sum(p.stat().st_size for p in _sources(tree))
    items = len(list((tree / "models").iterdir())) + len(list((tree / "loose").iterdir()))
    work = cache / "dask-out"
    os.environ[TIE_CACHE_VARIABLE] = str(work / "tie-cache")  # this run's own, not the user's ~/.cache

    parallelism = cpu_parallelism(opts.workers)
    e2e, e2e_outputs = end_to_end(tree, work, opts.workers, runs)
    warm, warm_outputs = warm_workers(tree, work, opts.workers, runs)
    shutil.rmtree(work, ignore_errors=True)
    outputs = e2e_outputs + warm_outputs
    if any(o != outputs[0] for o in outputs):
        print("bench_dask: the modes wrote different outputs", file=sys.stderr)
        return 1

    workers = {mode: _workers_of(mode, opts.workers) for mode in [*e2e, *warm["times"]]}
    print(f"\n{os.cpu_count()} cores; tree of {items} items, {size / MB:.0f} MB of pickles; median of {runs}")
    print(f"{opts.workers} CPU-bound processes here do {parallelism:.2f}x the work of one (sha256)")
    print("sources evicted from the page cache before every run; every mode wrote the same bytes")
    loads = [run["load"] for runs in e2e.values() for run in runs]
    print(f"load average when the end-to-end runs started: {min(loads):.2f} to {max(loads):.2f}\n")
    print(_e2e_table(e2e, size, workers))
    print()
    print(_table("warm workers (convert_tree in a long-lived process)", warm["times"], size, workers))
    print(_balance_table(warm, size, workers))
    print(f"\n  LocalCluster({opts.workers}) start: {warm['cluster_start']:.2f} s; first run on fresh workers:")
    for mode, seconds in warm["first"].items():
        print(f"    {mode:<44} {seconds:6.2f} s")
    print("  cost of one call through the cluster (200 empty calls):")
    for mode, seconds in warm["overhead_per_call"].items():
        print(f"    {mode:<44} {seconds / 200 * 1000:6.1f} ms")
    if opts.json:
        document = {"items": items, "bytes": size, "runs": runs, "cpu_parallelism": parallelism, "end_to_end": e2e}
        document["warm"] = warm
        opts.json.write_text(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
