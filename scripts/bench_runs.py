"""Training runs: tiesafe against DeepSpeed's zero_to_fp32.py and torch's dcp_to_torch_save + save_file.

Inputs (built once under ``--cache``, by the libraries themselves through
``tests/training_runs.py``): a DeepSpeed ZeRO-3 checkpoint over two gloo ranks of a model
with about 1 GB of fp32 weights (TinyLM, tied embedding, one optimizer step), and an
FSDP2 ``dcp.save`` checkpoint over two ranks of a tiny-vocabulary Llama of the same weight
size. Each tool runs in a fresh process, one after the other in each round, with the
input files evicted from the page cache before every run; wall time, CPU time and peak
RSS come from the OS (``wait4``), through bench.py's ``measure``. The floor is a durable
copy of the weight bytes: ``cp`` of a file of that size (the fp32 output), then ``sync``.
Run through ``python scripts/bench.py --training`` or directly.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # bench.py's measure, evict and child environment

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20

_DCP_REFERENCE = """
import sys, os, torch, tempfile
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from safetensors.torch import save_file
src, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
tmp = os.path.join(out, "full.pt")
dcp_to_torch_save(src, tmp)
state = torch.load(tmp, mmap=True)["model"]
save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out, "model.safetensors"),
          metadata={"format": "pt"})
os.unlink(tmp)
"""


def build(cache: Path, size_mb: int) -> dict[str, Path]:
    """The two checkpoints, written by DeepSpeed and by FSDP2 under torchrun (kept between runs)."""
    root = cache / f"training-runs-{size_mb}mb"
    wanted = {"ds-z3-w2": root / "ds-z3-w2", "dcp-rows": root / "dcp-rows"}
    if all((p / "reference.pt").exists() for p in wanted.values()):
        return wanted
    shutil.rmtree(root, ignore_errors=True)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29611"]
    command += [str(ROOT / "tests" / "training_runs.py"), str(root), "--only", "ds-z3-w2,dcp-rows"]
    command += ["--size-mb", str(size_mb), "--no-reference"]
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    for path in wanted.values():
        (path / "reference.pt").touch()  # built: the benchmark needs no reference state dict
    return wanted


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def tools(kind: str, src: Path, out: Path, floor_source: Path) -> dict[str, list[str]]:
    python = sys.executable
    tiesafe = [python, "-m", "converter", "convert", str(src), str(out), "--overwrite"]
    found = {"tiesafe": tiesafe, "tiesafe --no-verify": [*tiesafe, "--no-verify"]}
    if kind == "deepspeed":
        # The copy DeepSpeed saves beside every checkpoint, run as its docstring says (from the
        # package's folder, deepspeed/utils/torch.py would shadow torch).
        script = src / "zero_to_fp32.py"
        # --safe_serialization refuses tied weights ("Some tensors share memory"): the pickle output is measured too.
        zero_to_fp32 = [python, str(script), str(src), str(out)]
        found["zero_to_fp32.py (pytorch_model.bin)"] = zero_to_fp32
        found["zero_to_fp32.py --safe_serialization"] = [*zero_to_fp32, "--safe_serialization"]
    else:
        found["dcp_to_torch_save + save_file"] = [python, "-c", _DCP_REFERENCE, str(src), str(out)]
    found["floor: cp + sync"] = ["sh", "-c", f"cp --sparse=never '{floor_source}' '{out}/copy' && sync '{out}/copy'"]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--cache", type=Path, default=ROOT / ".bench-cache")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size-mb", type=int, default=1000, help="fp32 weight size of each model")
    parser.add_argument("--inputs", default="ds-z3-w2,dcp-rows", help="comma-separated subset of the two")
    opts = parser.parse_args(argv)
    inputs = {k: v for k, v in build(opts.cache.resolve(), opts.size_mb).items() if k in opts.inputs.split(",")}
    work = opts.cache.resolve() / "runs-out"
    rows: list[tuple[str, str, list[bench.Run], int]] = []
    print(f"{bench.machine()}; input files evicted from the page cache before every run")
    for name, src in inputs.items():
        kind = "deepspeed" if name.startswith("ds") else "dcp"
        # The floor copies a file as large as the weights: tiesafe's own fp32 output, made once.
        shutil.rmtree(work, ignore_errors=True)
        subprocess.run(
            [sys.executable, "-m", "converter", "convert", str(src), str(work / "floor")],
            check=True,
            env=bench.child_env(),
            stdout=subprocess.DEVNULL,
        )
        floor_source = work / "floor" / "model.safetensors"
        weight_bytes = floor_source.stat().st_size
        measured: dict[str, list[bench.Run]] = {}
        for _ in range(opts.runs):
            for tool, command in tools(kind, src, work / "out", floor_source).items():
                shutil.rmtree(work / "out", ignore_errors=True)
                (work / "out").mkdir(parents=True)
                bench.evict([*_files(src), floor_source])
                run = bench.measure(command, small_parent=True)
                if run.returncode:
                    print(f"{name}: {tool} failed: {run.error}", file=sys.stderr)
                run.written = sum(p.stat().st_size for p in (work / "out").rglob("*") if p.is_file())
                measured.setdefault(tool, []).append(run)
        for tool, runs in measured.items():
            rows.append((name, tool, runs, weight_bytes))
    shutil.rmtree(work, ignore_errors=True)
    weights = ", ".join(f"{n} {w / 1e9:.2f} GB" for n, t, _, w in rows if t == "tiesafe")
    print(f"\nmedians of {opts.runs} runs; weights: {weights}\n")
    print("| input | tool | wall s | CPU s | peak RSS MiB | written MB | × floor |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, tool, runs, _ in rows:
        floor = next(r for n, t, r, _ in rows if n == name and t.startswith("floor"))
        ok = [r for r in runs if not r.returncode]
        if not ok:
            print(f"| {name} | {tool} | fails: {runs[0].error[-150:]} | | | | |")
            continue
        wall = statistics.median(r.wall for r in ok)
        ratios = [r.wall / f.wall for r, f in zip(runs, floor, strict=True) if not r.returncode]
        print(
            f"| {name} | {tool} | {wall:.2f} | {statistics.median(r.cpu for r in ok):.2f} | "
            f"{statistics.median(r.peak_rss for r in ok) / MiB:.0f} | "
            f"{statistics.median(r.written for r in ok) / 1e6:.0f} | {statistics.median(ratios):.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
