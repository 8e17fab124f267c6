"""tiesafe side by side with today's converters and with a durable copy.

    python scripts/bench.py                  # GPT-2 124M (0.5 GB), a Llama-3.2-1B-shaped sharded set (3 GB),
                                             # and two mixture-of-experts files (12,288 and 46,848 tensors)
    python scripts/bench.py --inputs moe-100k --tools tiesafe,floor   # 100,608 tensors: memory vs tensor count
    python scripts/bench.py --quick          # tiny inputs, one run each: keeps the script working (CI)
    python scripts/bench.py --huge           # adds a 30 GB input, larger than this machine's RAM
    python scripts/bench.py --json out.json  # every run, not only the medians

Inputs are built here (random weights from transformers configs, nothing is
downloaded) and cached under ``--cache``. Every conversion is a fresh
subprocess: wall time is measured around it, CPU time and peak RSS come from
the OS (``os.wait4``). Tools alternate run by run, ``--runs`` times each, and
the medians are reported.

Page cache: by default the input files are evicted before every run (``sync``,
then ``posix_fadvise(DONTNEED)``), so every tool reads its input from disk while
its own code (Python, torch) stays cached as after a first run; each tool runs
once untimed on a tiny input first, which also compiles tiesafe's bytecode.
``--cache-mode drop`` drops the whole page cache instead (root only),
``--cache-mode warm`` reads the input into the cache before every run.

The floor is ``cp`` of the same weight files followed by ``sync`` of the copies:
tiesafe's output is durable (fsync, then rename), so the floor must be too.
The references run as users run them, and do not fsync.

The parent never imports torch: builders, references and load measurements are
this same script run as a child (``bench.py child TASK ...``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHECKOUT = [ROOT]  # where the children import ``converter`` from (--checkout)
PYTHON = sys.executable
MiB = 1 << 20
GB = 10**9
_MAP_NORESERVE = 0x4000  # Linux; the mmap module exports it only from Python 3.13

# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class InputSpec:
    """A benchmark input: a model folder (config.json + .bin weights) built by a child task."""

    name: str
    title: str
    build: str  # child task that builds it
    sharded: bool  # a .bin set with an index rather than one pytorch_model.bin
    warmup: str | None = None  # tiny input of the same kind, run untimed first
    folder: bool = False  # tiesafe converts the folder (convert FOLDER OUT), even with one .bin
    transformers: bool = True  # a transformers model (from_pretrained applies)
    commands: bool = False  # also time inspect and verify on the output


GPT2_TINY = InputSpec("gpt2-tiny", "tiny GPT-2 fp32, one .bin (tied)", "build-gpt2-tiny", sharded=False)
LLAMA_TINY = InputSpec("llama-tiny", "tiny Llama bf16, 3 .bin shards (tied)", "build-llama-tiny", sharded=True)
GPT2 = InputSpec("gpt2", "GPT-2 124M fp32, one .bin (tied)", "build-gpt2", sharded=False, warmup="gpt2-tiny")
LLAMA = InputSpec(
    "llama-1b", "Llama-3.2-1B-shaped bf16, 1 GB .bin shards (tied)", "build-llama", sharded=True, warmup="llama-tiny"
)
HUGE = InputSpec(
    "huge-30g",
    "Llama-3.1-8B-shaped fp32 (tied), one sparse 30 GB .bin",
    "build-huge",
    sharded=False,
    warmup="gpt2-tiny",
)
# Mixture-of-experts shape: experts x layers x {gate, up, down}, bf16, one pytorch_model.bin.
MOE_TINY = InputSpec(
    "moe-tiny",
    "tiny MoE bf16, 48 tensors",
    "build-moe-tiny",
    sharded=False,
    folder=True,
    transformers=False,
    commands=True,
)
MOE_12K = InputSpec(
    "moe-12k",
    "MoE bf16, 16 layers x 256 experts x 3: 12,288 tensors of 64 KiB (0.8 GB), convert FOLDER",
    "build-moe-12k",
    sharded=False,
    warmup="moe-tiny",
    folder=True,
    transformers=False,
    commands=True,
)
MOE_47K = InputSpec(
    "moe-47k",
    "MoE bf16, 61 layers x 256 experts x 3: 46,848 tensors of 2 KiB (0.1 GB), convert FILE",
    "build-moe-47k",
    sharded=False,
    warmup="moe-tiny",
    transformers=False,
    commands=True,
)
MOE_100K = InputSpec(
    "moe-100k",
    "MoE bf16, 131 layers x 256 experts x 3: 100,608 tensors of 2 KiB (0.2 GB), convert FILE",
    "build-moe-100k",
    sharded=False,
    warmup="moe-tiny",
    transformers=False,
    commands=True,
)
# facenet-pytorch's pnet.pt shape: a 27 KB legacy-format file of transposed convolutions
# (strided tensors). Start-up and the gather dominate: target 0.2 s end to end.
STRIDED = InputSpec(
    "strided-legacy",
    "legacy-format .bin of strided conv weights (facenet-pytorch pnet.pt shape), 27 KB",
    "build-strided-legacy",
    sharded=False,
    transformers=False,
    commands=True,
)
SPECS = {s.name: s for s in (GPT2_TINY, LLAMA_TINY, MOE_TINY, GPT2, LLAMA, MOE_12K, MOE_47K, MOE_100K, STRIDED, HUGE)}


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint files of a model folder, in name order."""
    return sorted(p for p in folder.iterdir() if p.suffix == ".bin")


def ensure_inputs(specs: Sequence[InputSpec], cache: Path) -> dict[str, Path]:
    """Build the inputs not yet under ``cache``, all in one child process (one import of transformers)."""
    folders = {s.name: cache / s.name for s in specs}
    done = {s.name: cache / f"{s.name}.complete" for s in specs}  # outside the folder, which is a model folder
    missing = [s for s in dict.fromkeys(specs) if not done[s.name].exists()]
    if missing:
        args = []
        for spec in missing:
            shutil.rmtree(folders[spec.name], ignore_errors=True)
            folders[spec.name].mkdir(parents=True)
            args += [spec.build, str(folders[spec.name])]
        print(f"building {', '.join(s.name for s in missing)} in {cache} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        subprocess.run([PYTHON, __file__, "child", "build", *args], check=True, env=child_env())
        for spec in missing:
            done[spec.name].write_text("")
        print(f"  built in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return folders


# --------------------------------------------------------------------------- tools

Command = Callable[[Path, Path], "list[str] | None"]  # (input folder, output folder) -> argv, None: not applicable


@dataclass(frozen=True)
class Tool:
    """One way to convert an input."""

    name: str
    kind: str  # "tiesafe", "reference" or "floor"
    command: Command
    note: str = ""


def _spec(folder: Path) -> InputSpec | None:
    """The input a folder of the cache holds (it is named after it)."""
    return SPECS.get(folder.name)


def _tiesafe(verify: bool) -> Command:
    def command(src: Path, out: Path) -> list[str] | None:
        flags = [] if verify else ["--no-verify"]
        files = weight_files(src)
        spec = _spec(src)
        if len(files) == 1 and not (spec and spec.folder):
            return [PYTHON, "-m", "converter", "convert", str(files[0]), str(out / "model.safetensors"), *flags]
        if not folder_conversion_available():
            return None  # reported as pending: the folder conversion is not on this branch yet
        return [PYTHON, "-m", "converter", "convert", str(src), str(out), *flags]

    return command


def _tiesafe_per_shard(src: Path, out: Path) -> list[str] | None:
    """Until folder conversion lands: every shard converted by its own CLI call."""
    files = weight_files(src)
    if len(files) == 1 or folder_conversion_available():
        return None
    target = shlex.quote(f"{out}/")
    calls = [f"{shlex.quote(PYTHON)} -m converter convert {shlex.quote(str(f))} {target}" for f in files]
    return ["sh", "-c", " && ".join(calls)]


def _child_task(task: str) -> Command:
    def command(src: Path, out: Path) -> list[str] | None:
        spec = _spec(src)
        if task == "transformers" and spec is not None and not spec.transformers:
            return None  # not a transformers model: from_pretrained does not apply
        return [PYTHON, __file__, "child", task, str(src), str(out)]

    return command


def _floor(src: Path, out: Path) -> list[str]:
    # --sparse=never: a sparse input (--huge) is copied as the bytes tiesafe must write.
    files = [str(f) for f in weight_files(src)]
    copies = [str(out / Path(f).name) for f in files]
    script = f"cp --sparse=never {shlex.join(files)} {shlex.quote(str(out))}/ && sync {shlex.join([*copies, str(out)])}"
    return ["sh", "-c", script]


TOOLS = {
    "tiesafe": Tool("tiesafe", "tiesafe", _tiesafe(verify=True), "CLI, verification on"),
    "tiesafe-no-verify": Tool("tiesafe --no-verify", "tiesafe", _tiesafe(verify=False), "CLI"),
    "tiesafe-per-shard": Tool(
        "tiesafe, one call per shard",
        "tiesafe",
        _tiesafe_per_shard,
        "interim until folder conversion: verification on; the tie across shards is not seen",
    ),
    "hub-convert": Tool(
        "Hub convert logic",
        "reference",
        _child_task("hub-convert"),
        "torch.load -> _remove_duplicate_names -> save_file -> reload and compare, per file",
    ),
    "mmap-hub": Tool(
        "torch.load(mmap) + save_torch_state_dict",
        "reference",
        _child_task("mmap-hub"),
        "every file torch.load(mmap=True), then huggingface_hub.save_torch_state_dict",
    ),
    "transformers": Tool(
        "transformers from/save_pretrained",
        "reference",
        _child_task("transformers"),
        "AutoModelForCausalLM.from_pretrained(dtype='auto') then save_pretrained",
    ),
    "floor": Tool("floor: cp + sync", "floor", _floor, "cp --sparse=never, then sync (fsync) of the copies"),
}


_FOLDER_SUPPORT: dict[str, bool] = {}


def folder_conversion_available() -> bool:
    """Whether this checkout has ``converter.convert_folder`` (issue "Folders and batch")."""
    if "ok" not in _FOLDER_SUPPORT:
        probe = subprocess.run(
            [PYTHON, "-c", "import converter; print(hasattr(converter, 'convert_folder'))"],
            capture_output=True,
            text=True,
            cwd=CHECKOUT[0],
            env=child_env(),
        )
        _FOLDER_SUPPORT["ok"] = probe.stdout.strip() == "True"
    return _FOLDER_SUPPORT["ok"]


# --------------------------------------------------------------------------- measuring


@dataclass
class Run:
    """One measured subprocess."""

    wall: float
    cpu: float
    peak_rss: int  # bytes, from the OS (ru_maxrss)
    returncode: int
    written: int = 0  # bytes of output files
    stopped: str = ""  # why the watchdog stopped it
    error: str = ""  # last line of stderr when it failed
    load: float = 0.0  # 1-minute load average when it started (other work on the machine)


def child_env() -> dict[str, str]:
    """The environment of every child: this checkout's ``converter``, with bytecode caching on.

    An installed package has its ``.pyc`` files; with ``PYTHONDONTWRITEBYTECODE``
    set (as in some sandboxes) every run would recompile tiesafe from source.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CHECKOUT[0]), env.get("PYTHONPATH", "")]))
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _anon_rss(pid: int) -> int:
    """Anonymous resident memory of ``pid`` in bytes: memory that no file backs."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# Linux carries a process's peak RSS over exec: a child's ru_maxrss starts at the RSS its
# parent had when it started it (a 500 MiB parent gives `python -c pass` 500 MiB). This
# launcher, a bare interpreter (-S: nothing imported, ~8 MiB), starts the command and
# writes back what wait4 said of it, so that the figure is the command's own.
_LAUNCHER = """import json, os, sys, time
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - started
with open(sys.argv[1], "w") as f:
    json.dump([wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss, os.waitstatus_to_exitcode(status)], f)
"""


def measure(
    argv: Sequence[str], *, anon_limit: int | None = None, stdout: Any = subprocess.DEVNULL, small_parent: bool = False
) -> Run:
    """Run ``argv`` once: wall clock around it, CPU time and peak RSS from ``wait4``.

    The peak RSS is Linux's for a reaped child: the largest of the child's own and
    of every descendant it reaped (one process's peak, not a sum), and never less
    than this process's RSS when it started the child (Linux carries the peak over
    exec). ``small_parent`` starts ``argv`` from a bare interpreter instead, so a
    large parent (one that imported torch or Dask) does not show in the figure; wall
    and CPU time are then measured by that launcher around the command alone.
    ``stdout`` takes what ``subprocess.Popen`` does (a file to read a report from).

    ``anon_limit`` stops the child when its anonymous memory passes that many
    bytes. It stands in for running out of RAM on this shared machine: a
    conversion whose anonymous memory grows with the model cannot convert a
    model larger than RAM, and we stop it before it takes the machine down.
    """
    if small_parent and anon_limit is not None:
        raise ValueError("anon_limit watches the child itself: not with small_parent")
    load = os.getloadavg()[0]
    with tempfile.TemporaryFile() as err, tempfile.TemporaryDirectory() as scratch:
        launched = Path(scratch) / "wait4.json"
        command = [PYTHON, "-S", "-c", _LAUNCHER, str(launched), *argv] if small_parent else list(argv)
        started = time.perf_counter()
        proc = subprocess.Popen(command, stdout=stdout, stderr=err, cwd=CHECKOUT[0], env=child_env())
        stopped: list[str] = []
        done = threading.Event()
        if anon_limit is not None:

            def watch() -> None:
                while not done.wait(0.05):
                    anon = _anon_rss(proc.pid)
                    if anon > anon_limit:
                        stopped.append(f"stopped at {anon / 2**30:.1f} GiB of anonymous memory, still growing")
                        proc.kill()
                        return

            threading.Thread(target=watch, daemon=True).start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        done.set()
        cpu, peak_kib = usage.ru_utime + usage.ru_stime, usage.ru_maxrss
        proc.returncode = os.waitstatus_to_exitcode(status)
        if small_parent and proc.returncode == 0:
            wall, cpu, peak_kib, proc.returncode = json.loads(launched.read_text())
        err.seek(0)
        lines = [line for line in err.read().decode("utf-8", "replace").splitlines() if line.strip()]
    return Run(
        wall=wall,
        cpu=cpu,
        peak_rss=peak_kib * 1024,
        returncode=proc.returncode,
        stopped=stopped[0] if stopped else "",
        error=lines[-1].strip()[:300] if lines and proc.returncode else "",
        load=load,
    )


def evict(files: Sequence[Path]) -> None:
    """Write back dirty pages, then drop ``files`` from the page cache."""
    os.sync()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def drop_caches() -> bool:
    """Write back dirty pages and drop the whole page cache; False when not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def read_through(files: Sequence[Path]) -> None:
    """Read ``files`` once so that they are in the page cache."""
    os.sync()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.read(64 * MiB):
                pass


def prepare_cache(mode: str, files: Sequence[Path]) -> None:
    if mode == "drop":
        drop_caches()
    elif mode == "warm":
        read_through(files)
    else:
        evict(files)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def free_disk(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@dataclass
class Row:
    """All runs of one tool on one input, and their medians."""

    input: str
    tool: str
    kind: str
    note: str
    runs: list[Run] = field(default_factory=list)
    status: str = "ok"  # "ok", "pending", "failed", "skipped"

    def median(self, attr: str) -> float:
        values = [getattr(r, attr) for r in self.runs if r.returncode == 0]
        return statistics.median(values) if values else float("nan")


def bench_input(
    spec: InputSpec,
    folder: Path,
    tools: list[str],
    runs: int,
    work: Path,
    *,
    cache_mode: str,
    anon_limit: int | None = None,
    warmup: Path | None = None,
) -> list[Row]:
    """Run every applicable tool on ``folder``, alternating tools run by run."""
    files = weight_files(folder)
    input_bytes = sum(p.stat().st_size for p in files)
    rows: dict[str, Row] = {}
    for key in tools:
        tool = TOOLS[key]
        if tool.command(folder, work) is None:
            if key != "tiesafe-per-shard" and tool.kind == "tiesafe":
                row = Row(spec.name, tool.name, tool.kind, "folder conversion not on this branch yet", status="pending")
                rows[key] = row
            continue
        rows[key] = Row(spec.name, tool.name, tool.kind, tool.note)
    if warmup is not None:  # untimed: bytecode compiled, code in the page cache
        for key in rows:
            argv = TOOLS[key].command(warmup, _fresh(work / "warmup"))
            if argv is not None:
                measure(argv)
        shutil.rmtree(work / "warmup", ignore_errors=True)
    for round_ in range(runs):
        for key, row in rows.items():
            tool = TOOLS[key]
            if row.status != "ok":
                continue
            if free_disk(work) < input_bytes + 4 * GB:
                row.status = "skipped"
                row.note = f"{free_disk(work) / GB:.0f} GB free on disk, the output needs {input_bytes / GB:.0f}"
                continue
            out = _fresh(work / f"{spec.name}-{key}")
            argv = tool.command(folder, out)
            assert argv is not None
            prepare_cache(cache_mode, files)
            limit = anon_limit if tool.kind == "reference" else None
            # From a bare launcher: Linux would report this script's own size as a small tool's peak.
            run = measure(argv, anon_limit=limit, small_parent=limit is None)
            run.written = folder_bytes(out)
            shutil.rmtree(out, ignore_errors=True)
            row.runs.append(run)
            print(
                f"  [{round_ + 1}/{runs}] {spec.name:10} {tool.name:42} {run.wall:7.2f} s {run.peak_rss / MiB:7.0f} MiB"
                + (f"  exit {run.returncode}: {run.stopped or run.error}" if run.returncode else ""),
                file=sys.stderr,
                flush=True,
            )
            if run.returncode != 0:
                row.status = "failed"
    return list(rows.values())


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


# --------------------------------------------------------------------------- load


def bench_load(file: Path, runs: int, repeats: int) -> dict[str, Any]:
    """``converter.load_file`` vs ``safetensors.torch.load_file`` on one tied file, in fresh processes.

    Each process loads ``repeats`` times (median kept) after one load whose
    resident memory is read before and after every name is read once.
    """
    modes = ["safetensors", "share", "clone"]
    results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    read_through([file])  # every mode finds the file in the page cache alike
    for _ in range(runs):
        for mode in modes:
            proc = subprocess.run(
                [PYTHON, __file__, "child", "load", mode, str(file), str(repeats)],
                capture_output=True,
                text=True,
                cwd=CHECKOUT[0],
                env=child_env(),
            )
            if proc.returncode != 0:
                raise RuntimeError(f"load ({mode}) failed: {proc.stderr.strip().splitlines()[-1:]}")
            results[mode].append(json.loads(proc.stdout))
    summary: dict[str, Any] = {"file": str(file), "file_bytes": file.stat().st_size, "runs": runs, "repeats": repeats}
    for mode in modes:
        summary[mode] = {key: statistics.median(r[key] for r in results[mode]) for key in results[mode][0]}
    for mode in ("share", "clone"):
        summary[f"time_ratio_{mode}"] = summary[mode]["seconds"] / summary["safetensors"]["seconds"]
    return summary


# --------------------------------------------------------------------------- inspect and verify


def bench_commands(spec: InputSpec, folder: Path, runs: int, work: Path) -> list[dict[str, Any]]:
    """``tiesafe inspect`` (output and source) and ``tiesafe verify`` on tiesafe's output of ``folder``.

    The output is written once, untimed; the commands then run ``runs`` times each with
    the files in the page cache, their stdout a pipe (inspect prints plain columns,
    grouped by name pattern, as it does for any reader that is not a terminal).
    """
    out = _fresh(work / f"{spec.name}-commands")
    argv = TOOLS["tiesafe"].command(folder, out)
    assert argv is not None
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, cwd=CHECKOUT[0], env=child_env())
    output, source = out / "model.safetensors", weight_files(folder)[0]
    cases = {
        f"tiesafe inspect {output.name}": ["inspect", str(output)],
        f"tiesafe inspect {source.name}": ["inspect", str(source)],
        f"tiesafe verify {source.name} {output.name}": ["verify", str(source), str(output)],
    }
    results = []
    for label, args in cases.items():
        timed = [measure([PYTHON, "-m", "converter", *args], small_parent=True) for _ in range(runs)]
        results.append(
            {
                "input": spec.name,
                "command": label,
                "wall": statistics.median(r.wall for r in timed),
                "cpu": statistics.median(r.cpu for r in timed),
                "peak_rss": statistics.median(r.peak_rss for r in timed),
                "returncode": max(r.returncode for r in timed),
                "error": next((r.error for r in timed if r.returncode), ""),
            }
        )
        print(f"  {spec.name:10} {label:42} {results[-1]['wall']:7.2f} s", file=sys.stderr, flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return results


def commands_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| input | command | wall s | CPU s | peak RSS MiB |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in results:
        failed = f" (exit {r['returncode']}: {r['error']})" if r["returncode"] else ""
        lines.append(
            f"| {r['input']} | {r['command']}{failed} | {r['wall']:.2f} | {r['cpu']:.2f} | {r['peak_rss'] / MiB:.0f} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- startup


def bench_startup(big_bin: Path, runs: int, work: Path) -> dict[str, Any]:
    """``tiesafe --help`` and ``tiesafe inspect`` of a large file: wall time, and whether torch is imported."""
    out = _fresh(work / "startup") / "model.safetensors"
    cases = {
        "tiesafe --help": ["--help"],
        f"tiesafe inspect {big_bin.name} ({big_bin.stat().st_size / GB:.1f} GB)": ["inspect", str(big_bin)],
        "tiesafe convert --no-verify": ["convert", str(big_bin), str(out), "--no-verify", "--overwrite"],
    }
    summary: dict[str, Any] = {}
    for label, args in cases.items():
        probe = subprocess.run(
            [PYTHON, "-X", "importtime", "-m", "converter", *args],
            capture_output=True,
            text=True,
            cwd=CHECKOUT[0],
            env=child_env(),
        )
        modules = {line.rsplit("|", 1)[-1].strip() for line in probe.stderr.splitlines() if "|" in line}
        summary[label] = {"imports_torch": "torch" in modules, "returncode": probe.returncode}
        if args[0] != "convert":
            timed = [measure([PYTHON, "-m", "converter", *args]) for _ in range(runs)]
            summary[label]["seconds"] = statistics.median(r.wall for r in timed)
            summary[label]["cpu"] = statistics.median(r.cpu for r in timed)
    shutil.rmtree(out.parent, ignore_errors=True)
    return summary


# --------------------------------------------------------------------------- report


def _fmt(value: float, spec: str) -> str:
    return "–" if value != value else format(value, spec)  # NaN -> dash


def ratio(row: Row, base: Row | None) -> float:
    """Median over rounds of ``row``'s wall time over ``base``'s in the same round.

    Tools alternate, so a round's runs share the machine's load at that moment:
    on a busy machine this is steadier than a ratio of medians.
    """
    if base is None:
        return float("nan")
    rounds = zip(row.runs, base.runs, strict=False)  # a failed tool stops early
    pairs = [a.wall / b.wall for a, b in rounds if a.returncode == 0 and b.returncode == 0]
    return statistics.median(pairs) if pairs else float("nan")


def table(rows: list[Row]) -> str:
    """Medians as a Markdown table, with wall-time ratios to the floor and to the best reference."""
    lines = [
        "| input | tool | wall s | CPU s | peak RSS MiB | written MB | × floor | × best ref |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in dict.fromkeys(r.input for r in rows):
        group = [r for r in rows if r.input == name]
        floor = next((r for r in group if r.kind == "floor" and r.status == "ok"), None)
        refs = [r for r in group if r.kind == "reference" and r.status == "ok"]
        best = min(refs, key=lambda r: r.median("wall")) if refs else None
        for r in group:
            if r.status in ("pending", "skipped"):
                lines.append(f"| {name} | {r.tool} | {r.status}: {r.note} | | | | | |")
                continue
            if r.status == "failed":
                bad = next(x for x in r.runs if x.returncode)
                why = bad.stopped or bad.error or f"exit {bad.returncode}"
                lines.append(
                    f"| {name} | {r.tool} | fails after {bad.wall:.1f} s: {why} | {bad.cpu:.1f} | "
                    f"{bad.peak_rss / MiB:.0f} | | | |"
                )
                continue
            lines.append(
                f"| {name} | {r.tool} | {_fmt(r.median('wall'), '.2f')} | {_fmt(r.median('cpu'), '.2f')} | "
                f"{_fmt(r.median('peak_rss') / MiB, '.0f')} | {_fmt(r.median('written') / 1e6, '.0f')} | "
                f"{_fmt(ratio(r, floor), '.2f') if r is not floor else '1.00'} | "
                f"{_fmt(ratio(r, best), '.2f') if r.kind != 'floor' else '–'} |"
            )
    return "\n".join(lines)


def load_table(load: dict[str, Any]) -> str:
    base = load["safetensors"]["seconds"]
    lines = [
        f"Load of {Path(load['file']).name} ({load['file_bytes'] / MiB:.0f} MiB, lm_head tied), "
        f"median of {load['runs']} processes x {load['repeats']} loads, file in the page cache:",
        "",
        "| loader | load ms | × safetensors | RSS after load MiB | RSS after reading every name MiB |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for mode, label in (
        ("safetensors", "safetensors.torch.load_file"),
        ("share", "converter.load_file (ties='share')"),
        ("clone", "converter.load_file (ties='clone')"),
    ):
        m = load[mode]
        lines.append(
            f"| {label} | {m['seconds'] * 1000:.1f} | {m['seconds'] / base:.2f} | "
            f"{m['rss_loaded'] / MiB:.0f} | {m['rss_touched'] / MiB:.0f} |"
        )
    return "\n".join(lines)


def startup_lines(startup: dict[str, Any]) -> str:
    lines = []
    for label, s in startup.items():
        timing = f"{s['seconds']:.3f} s wall, {s['cpu']:.3f} s CPU; " if "seconds" in s else ""
        lines.append(f"- {label}: {timing}imports torch: {'yes' if s['imports_torch'] else 'no'}")
    return "\n".join(lines)


def machine() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) * 1024
    return f"{os.cpu_count()} cores ({cpu}), {mem / 2**30:.0f} GiB RAM, Linux {os.uname().release}"


# --------------------------------------------------------------------------- child tasks
# Run as ``bench.py child TASK ...`` in a fresh process; they may import torch.


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _seeded(name: str, shape: Sequence[int], dtype: Any) -> Any:
    import torch

    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return (torch.randn(tuple(shape), generator=generator) * 0.02).to(dtype)


def _build_gpt2(folder: Path, tiny: bool) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    small = dict(n_layer=2, n_embd=64, n_head=2, vocab_size=1000, n_positions=64, bos_token_id=0, eos_token_id=0)
    config = GPT2Config(**small) if tiny else GPT2Config()
    config.architectures = ["GPT2LMHeadModel"]  # as save_pretrained writes it
    state = GPT2LMHeadModel(config).state_dict()
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()
    torch.save(state, folder / "pytorch_model.bin")
    config.save_pretrained(folder)


def _llama_config(size: str) -> Any:
    from transformers import LlamaConfig

    shapes = {
        "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=64),
        "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=128),
        "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    }[size]  # fmt: skip
    return LlamaConfig(
        **shapes, tie_word_embeddings=True, max_position_embeddings=131072, rope_theta=500000.0, bos_token_id=0,
        eos_token_id=0, architectures=["LlamaForCausalLM"],
    )  # fmt: skip


def _meta_layout(config: Any) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Names and shapes of a LlamaForCausalLM state dict (no memory), and tied name -> the name it repeats."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    persistent = set(model.state_dict())
    shapes: dict[str, tuple[int, ...]] = {}
    first: dict[int, str] = {}
    ties: dict[str, str] = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        if name in shapes or name not in persistent:
            continue
        shapes[name] = tuple(tensor.shape)
        if id(tensor) in first:
            ties[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return shapes, ties


def _build_llama(folder: Path, size: str, max_shard: int) -> None:
    """A tied bf16 Llama saved as .bin shards + index, one shard in memory at a time.

    Values are seeded by name, so a tied name that a shard boundary separates
    from its target holds equal bytes in both files, as in a real sharded save.
    """
    import torch

    config = _llama_config(size)
    config.dtype = torch.bfloat16
    shapes, ties = _meta_layout(config)
    shards: list[list[str]] = [[]]
    filled = 0
    for name, shape in shapes.items():
        nbytes = 2 * _numel(shape)
        if shards[-1] and filled + nbytes > max_shard:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for i, names in enumerate(shards, 1):
        file = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        state: dict[str, Any] = {}
        for name in names:
            target = ties.get(name, name)
            state[name] = state[target] if target in state else _seeded(target, shapes[name], torch.bfloat16)
            weight_map[name] = file
            total += state[name].nbytes
        torch.save(state, folder / file)
        del state
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(folder)


class _HoleWriter:
    """A file object for ``torch.save`` that leaves large records as holes (their bytes are all zero)."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "wb")  # noqa: SIM115 -- closed by close()

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        if n >= MiB:
            self._file.seek(n, os.SEEK_CUR)
        else:
            self._file.write(data)
        return n

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.truncate(self._file.tell())
        self._file.close()


def _build_huge(folder: Path) -> None:
    """A 30 GB tied fp32 checkpoint in torch's own zip layout, tensor bytes left as holes.

    The tensors are never-written anonymous mappings (all zero, no memory), and
    their records are skipped over in the file, so building it needs neither
    30 GB of memory nor of disk; reading it gives 30 GB of zeros.
    """
    import mmap

    import torch

    config = _llama_config("8b")
    shapes, ties = _meta_layout(config)
    state: dict[str, Any] = {}
    for name, shape in shapes.items():
        if name in ties:
            state[name] = state[ties[name]]
            continue
        buffer = mmap.mmap(-1, 4 * _numel(shape), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
        state[name] = torch.frombuffer(buffer, dtype=torch.float32).view(shape)
    writer = _HoleWriter(folder / "pytorch_model.bin")
    torch.save(state, writer)
    writer.close()
    config.save_pretrained(folder)


def _build_moe(folder: Path, layers: int, experts: int, shape: tuple[int, int]) -> None:
    """A mixture-of-experts-shaped bf16 state dict: layers x experts x {gate, up, down}, each tensor its own storage.

    Values are random (seeded), so no two experts hold equal bytes; one layer is in
    memory at a time besides the state dict itself.
    """
    import torch

    generator = torch.Generator().manual_seed(0)
    state: dict[str, Any] = {}
    for layer in range(layers):
        block = (torch.randn(experts * 3, *shape, generator=generator) * 0.02).to(torch.bfloat16)
        for expert in range(experts):
            for j, proj in enumerate(("gate_proj", "up_proj", "down_proj")):
                state[f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"] = block[3 * expert + j].clone()
    torch.save(state, folder / "pytorch_model.bin")
    config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "tie_word_embeddings": False}
    (folder / "config.json").write_text(json.dumps(config))


def _build_strided_legacy(folder: Path) -> None:
    """P-Net's layers as a model saved with transposed views: every conv weight strided, legacy format."""
    import torch

    generator = torch.Generator().manual_seed(0)
    shapes = {"conv1": (10, 3, 3, 3), "conv2": (16, 10, 3, 3), "conv3": (32, 16, 3, 3)}
    state: dict[str, Any] = {}
    for name, shape in shapes.items():
        state[f"{name}.weight"] = torch.randn(shape, generator=generator).transpose(2, 3)
        state[f"{name}.bias"] = torch.randn(shape[0], generator=generator)
        state[f"prelu{name[-1]}.weight"] = torch.randn(shape[0], generator=generator)
    state["conv4_1.weight"] = torch.randn(32, 2, generator=generator).t()[:, :, None, None]
    state["conv4_2.weight"] = torch.randn(32, 4, generator=generator).t()[:, :, None, None]
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    (folder / "config.json").write_text(json.dumps({"model_type": "pnet"}))


def _sf_name(pt_name: str) -> str:
    return pt_name.replace("pytorch_model", "model").replace(".bin", ".safetensors")


def _hub_convert(src: Path, out: Path) -> None:
    """The Hub convert service's logic (safetensors' convert.py), file by file, then the index renamed."""
    import torch
    from safetensors.torch import _remove_duplicate_names, load_file, save_file

    for pt_file in weight_files(src):
        loaded = torch.load(pt_file, map_location="cpu", weights_only=True)
        if "state_dict" in loaded:
            loaded = loaded["state_dict"]
        metadata = {"format": "pt"}
        for kept, removed in _remove_duplicate_names(loaded).items():
            for name in removed:
                metadata.setdefault(name, kept)
                del loaded[name]
        loaded = {k: v.contiguous() for k, v in loaded.items()}
        sf_file = out / _sf_name(pt_file.name)
        save_file(loaded, sf_file, metadata=metadata)
        if (sf_file.stat().st_size - pt_file.stat().st_size) / pt_file.stat().st_size > 0.01:
            raise RuntimeError(f"file sizes differ by more than 1%: {sf_file}")
        reloaded = load_file(sf_file)
        for k, v in loaded.items():
            if not torch.equal(v, reloaded[k]):
                raise RuntimeError(f"the output tensors differ for {k}")
    index = src / "pytorch_model.bin.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: _sf_name(v) for k, v in data["weight_map"].items()}
        (out / "model.safetensors.index.json").write_text(json.dumps(data, indent=4))


def _mmap_hub(src: Path, out: Path) -> None:
    import torch
    from huggingface_hub import save_torch_state_dict

    state: dict[str, Any] = {}
    for file in weight_files(src):
        state.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
    save_torch_state_dict(state, out)


def _transformers(src: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(src, dtype="auto").save_pretrained(out)


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _load(mode: str, file: Path, repeats: int) -> None:
    """Resident memory after one load and after reading every name; then the median of ``repeats`` loads."""
    import gc

    import safetensors.torch
    import torch

    import converter

    def load() -> dict[str, torch.Tensor]:
        if mode == "safetensors":
            return safetensors.torch.load_file(file)
        return converter.load_file(file, ties="share" if mode == "share" else "clone")

    before = _rss()
    state = load()
    loaded = _rss() - before
    for name in state:  # read every byte of every name
        state[name].contiguous().view(torch.uint8).max()
    touched = _rss() - before
    names = len(state)
    del state
    gc.collect()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        state = load()
        times.append(time.perf_counter() - started)
        del state
    result = {"seconds": statistics.median(times), "rss_loaded": loaded, "rss_touched": touched, "names": names}
    print(json.dumps(result))


def child(argv: list[str]) -> None:
    """Entry point of ``bench.py child TASK ARGS...``."""
    task, *args = argv
    builders: dict[str, Callable[[Path], None]] = {
        "build-gpt2": lambda folder: _build_gpt2(folder, tiny=False),
        "build-gpt2-tiny": lambda folder: _build_gpt2(folder, tiny=True),
        "build-llama": lambda folder: _build_llama(folder, "1b", max_shard=GB),
        "build-llama-tiny": lambda folder: _build_llama(folder, "tiny", max_shard=200_000),
        "build-huge": _build_huge,
        "build-moe-tiny": lambda folder: _build_moe(folder, 2, 8, (4, 8)),
        "build-moe-12k": lambda folder: _build_moe(folder, 16, 256, (128, 256)),
        "build-moe-47k": lambda folder: _build_moe(folder, 61, 256, (32, 32)),
        "build-moe-100k": lambda folder: _build_moe(folder, 131, 256, (32, 32)),
        "build-strided-legacy": _build_strided_legacy,
    }
    converters: dict[str, Callable[[Path, Path], None]] = {
        "hub-convert": _hub_convert,
        "mmap-hub": _mmap_hub,
        "transformers": _transformers,
    }
    if task == "build":  # build NAME FOLDER [NAME FOLDER ...]
        for name, folder in zip(args[::2], args[1::2], strict=True):
            builders[name](Path(folder))
    elif task == "load":
        _load(args[0], Path(args[1]), int(args[2]))
    else:
        converters[task](Path(args[0]), Path(args[1]))


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=ROOT / ".bench-cache", help="where inputs are built and kept")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per tool and input (medians are reported)")
    parser.add_argument("--quick", action="store_true", help="tiny inputs, one run: checks that the script works")
    parser.add_argument("--huge", action="store_true", help="add a 30 GB input, larger than this machine's RAM")
    parser.add_argument(
        "--inputs",
        help="comma-separated: gpt2, llama-1b, moe-12k, moe-47k, strided-legacy (the default set), moe-100k; none",
    )
    parser.add_argument("--tools", help=f"comma-separated subset of {','.join(TOOLS)}")
    parser.add_argument("--cache-mode", choices=["evict", "drop", "warm"], default="evict", help="see above")
    parser.add_argument("--anon-limit-gib", type=float, default=8.0, help="--huge: stop a reference past this")
    parser.add_argument("--no-load", action="store_true", help="skip the load and start-up measurements")
    parser.add_argument("--json", type=Path, help="write every run and the summary here")
    parser.add_argument("--checkout", type=Path, help="measure the converter package of another checkout")
    parser.add_argument(
        "--dask", action="store_true", help="only the tree benchmark: a Dask LocalCluster vs the local executor"
    )
    parser.add_argument(
        "--export", action="store_true", help="only the export benchmark: memory of save_model vs safetensors'"
    )
    parser.add_argument(
        "--training",
        action="store_true",
        help="only the training-run benchmark: ZeRO-3 and DCP checkpoints vs zero_to_fp32.py and dcp_to_torch_save",
    )
    opts = parser.parse_args(argv)
    if opts.training:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_runs

        size = ["--size-mb", "20"] if opts.quick else []
        return int(bench_runs.main(["--runs", str(1 if opts.quick else opts.runs), "--cache", str(opts.cache), *size]))
    if opts.export:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_export

        return int(bench_export.main([*(["--quick"] if opts.quick else []), "--runs", str(opts.runs)]))
    if opts.dask:  # one entry point for every benchmark; the tree one lives beside this script
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_dask

        forwarded = ["--runs", str(opts.runs), "--cache", str(opts.cache)]
        forwarded += [*(["--quick"] if opts.quick else []), *(["--json", str(opts.json)] if opts.json else [])]
        return int(bench_dask.main(forwarded))

    if opts.checkout:
        CHECKOUT[0] = opts.checkout.resolve()
    tools = opts.tools.split(",") if opts.tools else list(TOOLS)
    if set(tools) - set(TOOLS):
        parser.error(f"unknown tools: {', '.join(sorted(set(tools) - set(TOOLS)))}")
    specs = [GPT2_TINY, LLAMA_TINY, MOE_TINY, STRIDED] if opts.quick else [GPT2, LLAMA, MOE_12K, MOE_47K, STRIDED]
    if opts.inputs:
        names = [n for n in opts.inputs.split(",") if n and n != "none"]
        if set(names) - set(SPECS) or HUGE.name in names:
            parser.error(f"unknown inputs: {', '.join(sorted(set(names) - set(SPECS)))} (the 30 GB one: --huge)")
        specs = [SPECS[n] for n in names]
    runs = 1 if opts.quick else opts.runs
    cache: Path = opts.cache.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    work = cache / "out"
    work.mkdir(exist_ok=True)
    if opts.cache_mode == "drop" and not drop_caches():
        print("cannot drop the page cache (not root): evicting the input files instead", file=sys.stderr)
        opts.cache_mode = "evict"

    load_avg = [os.getloadavg()[0]]
    rows: list[Row] = []
    commands: list[dict[str, Any]] = []
    warmups = [SPECS[s.warmup] for s in (*specs, *([HUGE] if opts.huge else [])) if s.warmup]
    folders = ensure_inputs([*specs, *warmups], cache)
    for spec in specs:
        chosen = tools
        if opts.quick and not spec.sharded:  # --quick: the references run once, on the sharded input
            chosen = [t for t in tools if TOOLS[t].kind != "reference"]
        warmup = folders[spec.warmup] if spec.warmup else None
        rows += bench_input(spec, folders[spec.name], chosen, runs, work, cache_mode=opts.cache_mode, warmup=warmup)
        if spec.commands and "tiesafe" in tools:
            commands += bench_commands(spec, folders[spec.name], runs, work)
    if opts.huge:
        needed = 36 * GB
        if free_disk(cache) < needed:
            print(f"--huge skipped: {free_disk(cache) / GB:.0f} GB free, it needs {needed / GB:.0f}", file=sys.stderr)
        else:
            folder = ensure_inputs([HUGE], cache)[HUGE.name]
            limit = int(opts.anon_limit_gib * 2**30)
            warmup = folders[GPT2_TINY.name]
            rows += bench_input(
                HUGE, folder, tools, 1, work, cache_mode=opts.cache_mode, anon_limit=limit, warmup=warmup
            )
    load_avg.append(os.getloadavg()[0])

    load: dict[str, Any] | None = None
    startup: dict[str, Any] | None = None
    if specs and not opts.no_load:
        first = weight_files(folders[specs[0].name])[0]
        tied = _fresh(work / "load") / "model.safetensors"
        convert = [PYTHON, "-m", "converter", "convert", str(first), str(tied)]
        subprocess.run(convert, check=True, stdout=subprocess.DEVNULL, cwd=CHECKOUT[0], env=child_env())
        load = bench_load(tied, runs, repeats=1 if opts.quick else 25)  # a load is ~1.5 ms: many, for a stable median
        biggest = max((f for s in specs for f in weight_files(folders[s.name])), key=lambda p: p.stat().st_size)
        startup = bench_startup(biggest, runs, work)
    shutil.rmtree(work, ignore_errors=True)

    cache_note = {
        "evict": "input files evicted from the page cache before every run",
        "drop": "whole page cache dropped before every run",
        "warm": "input files in the page cache before every run",
    }[opts.cache_mode]
    per_input: dict[str, int] = {}
    for r in rows:
        per_input[r.input] = max(per_input.get(r.input, 0), len(r.runs))
    counts = ", ".join(f"{name}: {n}" for name, n in per_input.items())
    print(f"\n{machine()}; {cache_note}; load average {load_avg[0]:.2f} -> {load_avg[1]:.2f}")
    print(f"medians of the runs per input ({counts})")
    titles = {s.name: s.title for s in SPECS.values()}
    print("; ".join(f"{name}: {titles[name]}" for name in per_input) + "\n")
    print(table(rows))
    if commands:
        print("\ninspect and verify of tiesafe's output (files in the page cache, stdout a pipe), medians:\n")
        print(commands_table(commands))
    if load:
        print("\n" + load_table(load))
    if startup:
        print("\n" + startup_lines(startup))
    if opts.json:
        document = {
            "machine": machine(),
            "cache_mode": opts.cache_mode,
            "runs": runs,
            "load_average": load_avg,
            "rows": [asdict(r) | {"median_wall": r.median("wall")} for r in rows],
            "load": load,
            "startup": startup,
            "commands": commands,
        }
        opts.json.write_text(json.dumps(document, indent=2, default=str))
    failed = any(r.status == "failed" and r.kind == "tiesafe" for r in rows) or any(c["returncode"] for c in commands)
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(sys.argv[2:])
    else:
        sys.exit(main())
