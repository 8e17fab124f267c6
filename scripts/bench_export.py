"""Memory of saving a live model: tiesafe's save_model vs safetensors.torch.save_model.

Each run is a fresh process that builds GPT-2 124M (transformers' default config,
random weights, nothing downloaded), resets the kernel's peak-RSS counter
(``/proc/self/clear_refs``), saves, and reports the peak resident memory above
what the process held before the save: the model itself is not counted, only what
the save adds. Then scripts/bench_export_dist.py: an FSDP2 model saved from 2 ranks.
Run through ``python scripts/bench.py --export`` or directly.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = {
    "tiesafe save_model (verify)": "converter.save_model(model, out / 'model.safetensors')",
    "tiesafe save_model --no-verify": "converter.save_model(model, out / 'model.safetensors', verify=False)",
    "tiesafe save_model, 200MB shards": "converter.save_model(model, out, max_shard_size='200MB')",
    "safetensors.torch.save_model": "safetensors.torch.save_model(model, str(out / 'model.safetensors'))",
}
MiB = 2**20


def proc_status(key: str) -> int:
    """A byte count from /proc/self/status (VmRSS:, VmHWM:, ...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _child(code: str, folder: str, tiny: bool) -> None:
    import gc

    import safetensors.torch
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import converter

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000) if tiny else GPT2Config()
    model = GPT2LMHeadModel(config).eval()
    gc.collect()
    out = Path(folder)
    baseline = proc_status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak counter (VmHWM) starts again here: building the model does not count
    started = time.perf_counter()
    exec(code, {"converter": converter, "safetensors": safetensors, "model": model, "out": out})
    seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for p in out.iterdir())
    print(json.dumps({"above": proc_status("VmHWM:") - baseline, "seconds": seconds, "bytes": size}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs per tool (medians are reported)")
    parser.add_argument("--quick", action="store_true", help="a tiny GPT-2, one run: checks that the script works")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.child:
        _child(RUNS[opts.child[0]], opts.child[1], opts.quick)
        return 0
    runs = 1 if opts.quick else opts.runs
    print("| save | above the model MiB | s | file MiB |\n| --- | ---: | ---: | ---: |")
    for name in RUNS:
        results = []
        for _ in range(runs):
            with tempfile.TemporaryDirectory() as folder:
                args = [sys.executable, __file__, "--child", name, folder, *(["--quick"] if opts.quick else [])]
                done = subprocess.run(
                    args, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}
                )
                if done.returncode:
                    print(done.stderr[-2000:], file=sys.stderr)
                    return 1
                results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            shutil.rmtree(folder, ignore_errors=True)
        above = statistics.median(r["above"] for r in results) / MiB
        seconds = statistics.median(r["seconds"] for r in results)
        print(f"| {name} | {above:.1f} | {seconds:.2f} | {results[0]['bytes'] / MiB:.1f} |")
    import bench_export_dist  # beside this script: FSDP2 over 2 ranks, both collective modes

    return bench_export_dist.main([*(["--quick"] if opts.quick else []), "--runs", str(runs)])


if __name__ == "__main__":
    sys.exit(main())
