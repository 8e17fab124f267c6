"""Saving an FSDP2 model from 2 ranks: tiesafe's two modes vs gathering the full state dict.

Every run is a fresh 2-rank job (``torch.multiprocessing`` spawn, gloo, CPU) that
builds a Llama-shaped model (bf16, tied embeddings, random weights, nothing
downloaded) on the meta device, shards it with ``fully_shard`` (one group per
layer and the root) and materialises only each rank's shard. Each rank then
resets its kernel peak-RSS counter (``/proc/self/clear_refs``), saves, and reports
its peak resident memory above what it held before the save (its shard included
there; buffers that reuse memory the process already held do not raise it) and its
absolute peak, and rank 0 the wall time between two barriers. Tools:

- ``tiesafe save_model``: rank 0 writes, pieces come to it block by block;
- ``tiesafe save_model(parallel=True)``: every rank writes its pieces in place;
- reference: ``get_model_state_dict(full_state_dict=True, cpu_offload=True)`` on
  every rank, then ``safetensors.torch.save_file`` on rank 0 (the documented way).

Run through ``python scripts/bench.py --export`` or directly.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_export import proc_status  # beside this script (scripts/ is on sys.path)

MiB = 2**20
TOOLS = ("tiesafe save_model", "tiesafe save_model(parallel=True)", "get_model_state_dict + safetensors save_file")
FULL = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 12}
TINY = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}


def _build(shape: dict[str, int]) -> Any:
    import torch
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **shape,
        num_attention_heads=16 if shape["hidden_size"] >= 1024 else 4,
        num_key_value_heads=4,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(1234 + torch.distributed.get_rank())
    with torch.no_grad():
        for p in model.parameters():
            local = p.to_local()
            local.copy_(torch.randn(local.shape, generator=generator, dtype=torch.float32).to(local.dtype))
    return model


def _save(tool: str, model: Any, out: Path) -> None:
    import torch.distributed as dist

    import converter

    if tool == TOOLS[0]:
        converter.save_model(model, out / "model.safetensors")
    elif tool == TOOLS[1]:
        converter.save_model(model, out / "model.safetensors", parallel=True)
    else:
        import safetensors.torch
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if dist.get_rank() == 0:
            state.pop("lm_head.weight", None)  # a separate gathered copy of the tied embedding: save_file refuses ties
            safetensors.torch.save_file(state, str(out / "model.safetensors"))
        del state


def _rank(rank: int, world: int, port: int, tools: list[str], folder: str, quick: bool) -> None:
    import gc

    import torch
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = _build(TINY if quick else FULL)
    shard = sum(p.to_local().nbytes for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    results = []
    for tool in tools:
        out = Path(folder) / tool.split()[0] / str(len(results))
        out.mkdir(parents=True, exist_ok=True)
        gc.collect()
        dist.barrier()
        baseline = proc_status("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak counter (VmHWM) starts again here: building the model does not count
        started = time.perf_counter()
        _save(tool, model, out)
        dist.barrier()
        seconds = time.perf_counter() - started
        size = sum(p.stat().st_size for p in out.iterdir()) if rank == 0 else 0
        results.append(
            {
                "tool": tool,
                "above": proc_status("VmHWM:") - baseline,
                "baseline": baseline,
                "peak": proc_status("VmHWM:"),
                "seconds": seconds,
                "bytes": size,
                "output": str(out),
            }
        )
    Path(folder, f"rank-{rank}.json").write_text(
        json.dumps(
            {
                "shard": shard,
                "largest": largest,
                "total": sum(p.numel() * 2 for p in model.parameters()),
                "runs": results,
            }
        )
    )
    del torch
    dist.destroy_process_group()


def _job(tools: list[str], folder: str, quick: bool) -> list[dict[str, Any]]:
    """One 2-rank job running ``tools`` in turn; the per-rank reports."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "import sys, torch.multiprocessing as mp; sys.path.insert(0, sys.argv[1]); import bench_export_dist as b; "
        "mp.spawn(b._rank, args=(2, int(sys.argv[2]), sys.argv[3].split('|'), sys.argv[4], sys.argv[5] == '1'), "
        "nprocs=2)"
    )
    args = [sys.executable, "-c", code, str(Path(__file__).parent), str(port), "|".join(tools), folder, str(int(quick))]
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return [json.loads(Path(folder, f"rank-{r}.json").read_text()) for r in range(2)]


def _same_output(runs: list[dict[str, Any]]) -> bool:
    """tiesafe's two modes wrote the same bytes."""
    files = [Path(r["output"], "model.safetensors") for r in runs if r["tool"] in TOOLS[:2]]
    return len(files) == 2 and all(f.read_bytes() == files[0].read_bytes() for f in files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs per tool (medians are reported)")
    parser.add_argument("--quick", action="store_true", help="a tiny model, one job running every tool once")
    parser.add_argument("--json", type=Path, help="write every run here")
    opts = parser.parse_args(argv)
    collected: dict[str, list[list[dict[str, Any]]]] = {tool: [] for tool in TOOLS}
    sizes: dict[str, Any] = {}
    same = True
    with tempfile.TemporaryDirectory() as scratch:
        jobs = [list(TOOLS)] if opts.quick else [[tool] for _ in range(opts.runs) for tool in TOOLS]
        for i, tools in enumerate(jobs):
            folder = Path(scratch, str(i))
            folder.mkdir()
            ranks = _job(tools, str(folder), opts.quick)
            sizes = {k: ranks[0][k] for k in ("shard", "largest", "total")} | {"shard_1": ranks[1]["shard"]}
            for j, tool in enumerate(tools):
                collected[tool].append([ranks[r]["runs"][j] for r in range(2)])
            if opts.quick:
                same = _same_output(ranks[0]["runs"])
            shutil.rmtree(folder, ignore_errors=True)
    print(
        f"\nFSDP2 Llama-shaped model, bf16, tied: {sizes['total'] / MiB:.0f} MiB over 2 ranks "
        f"(shards {sizes['shard'] / MiB:.0f} + {sizes['shard_1'] / MiB:.0f} MiB; largest tensor "
        f"{sizes['largest'] / MiB:.0f} MiB), {1 if opts.quick else opts.runs} run(s), medians\n"
    )
    print(
        "| save (every rank calls) | wall s | peak RSS above the model, rank 0 / rank 1 MiB "
        "| peak RSS, rank 0 / rank 1 MiB | file MiB |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    summary = {}
    for tool, runs in collected.items():
        wall = statistics.median(r[0]["seconds"] for r in runs)
        above = [statistics.median(r[rank]["above"] for r in runs) / MiB for rank in range(2)]
        peak = [statistics.median(r[rank]["peak"] for r in runs) / MiB for rank in range(2)]
        size = runs[0][0]["bytes"] / MiB
        summary[tool] = {"seconds": wall, "above_mib": above, "peak_mib": peak, "file_mib": size}
        print(f"| {tool} | {wall:.2f} | {above[0]:.0f} / {above[1]:.0f} | {peak[0]:.0f} / {peak[1]:.0f} | {size:.0f} |")
    limit_default = sizes["largest"] / MiB + 100
    print(
        f"\ntargets: default rank 0 <= largest tensor + 100 MiB = {limit_default:.0f} MiB: "
        f"{'met' if summary[TOOLS[0]]['above_mib'][0] <= limit_default else 'MISSED'}; "
        f"parallel <= 100 MiB above the shard on every rank: "
        f"{'met' if max(summary[TOOLS[1]]['above_mib']) <= 100 else 'MISSED'}"
        + ("" if not opts.quick else f"; both modes wrote the same bytes: {same}")
    )
    if opts.json:
        opts.json.write_text(json.dumps({"sizes": sizes, "summary": summary, "runs": collected}, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
