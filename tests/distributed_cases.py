"""What each rank runs in tests/test_export_distributed.py: real gloo process groups, 2 ranks, CPU.

One spawn runs every case (start-up is the slow part). Each case saves with the
real FSDP2 / DTensor / DDP objects and records, per rank, the report or the error
in ``<folder>/results-<rank>.json``; the test process checks the files against
``save_model`` of the same model unsharded.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from models import BUILDERS
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

import converter
from converter import collective
from converter.writer import TEMP_SUFFIX

STARTED = time.perf_counter()
MAX_SHARD = 300  # bytes: a sharded set of several files for the tiny models


class Tied(torch.nn.Module):
    """A tied embedding (7 rows: uneven over 2 ranks), a column-sharded linear layer, fp16, a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(7, 4)
        self.lin = torch.nn.Linear(4, 5)
        self.head = torch.nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight
        self.h16 = torch.nn.Parameter(torch.randn(3, 6).half())
        self.register_buffer("steps", torch.arange(3.0))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.lin.weight[:, :4].sum() + self.emb(ids))


def build_tied() -> torch.nn.Module:
    torch.manual_seed(0)
    return Tied()


def build_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    return BUILDERS["gpt2"]()


def _columns(p: torch.nn.Parameter) -> Shard | None:
    return Shard(1) if p.dim() == 2 else None


def shard_tied() -> torch.nn.Module:
    model = build_tied()
    fully_shard(model.lin, shard_placement_fn=_columns)  # weight: Shard(1), bias: Shard(0)
    fully_shard(model)
    return model


def shard_gpt2() -> torch.nn.Module:
    model = build_gpt2()
    for block in model.transformer.h:  # type: ignore[union-attr]
        fully_shard(block, shard_placement_fn=_columns)
    fully_shard(model)
    return model


def _dtensors(folder: Path) -> dict[str, torch.Tensor]:
    """A state dict of DTensors made with the DTensor API itself: every placement kind, and plain tensors."""
    mesh = init_device_mesh("cpu", (2,))
    rank = dist.get_rank()
    torch.manual_seed(0)
    grid = init_device_mesh("cpu", (1, 2), mesh_dim_names=("replicas", "shards"))  # HSDP-like: 2-D mesh
    full = {"rows": torch.randn(5, 3), "cols": torch.randn(3, 5, 2), "rep": torch.randn(4), "ids": torch.arange(6)}
    full["grid"] = torch.randn(2, 7).to(torch.bfloat16)
    state: dict[str, torch.Tensor] = {
        "rows": distribute_tensor(full["rows"], mesh, [Shard(0)]),
        "cols": distribute_tensor(full["cols"], mesh, [Shard(1)]),
        "rep": distribute_tensor(full["rep"], mesh, [Replicate()]),
        "ids": distribute_tensor(full["ids"], mesh, [Shard(0)]),
        "grid": distribute_tensor(full["grid"], grid, [Replicate(), Shard(1)]),
        # each rank holds a partial sum: the value is their total
        "sum": DTensor.from_local(torch.full((2, 3), float(rank + 1)), mesh, [Partial()]),
        # FSDP2-over-TP's strided shards: written from a gathered copy
        "strided": DTensor.from_local(
            torch.arange(8.0).reshape(4, 2) + 100 * rank, mesh, [_StridedShard(0, split_factor=2)]
        ),
        "plain": torch.arange(3, dtype=torch.int16),
    }
    state["rows_again"] = state["rows"]  # one DTensor under two names
    # the reference: what save_file writes for the gathered tensors (ties kept)
    gathered = {n: (t.full_tensor() if isinstance(t, DTensor) else t) for n, t in state.items() if n != "rows_again"}
    gathered["rows_again"] = gathered["rows"]
    if rank == 0:
        converter.save_file(gathered, folder / "dtensors-ref.safetensors")
    return state


def _fail_on_rank_1(name: str, error: BaseException) -> Callable[[], None]:
    original = getattr(collective, name)

    def failing(*args: Any, **kwargs: Any) -> Any:
        if dist.get_rank() == 1:
            raise error
        return original(*args, **kwargs)

    setattr(collective, name, failing)
    return lambda: setattr(collective, name, original)


def _fail_on_rank_0_second_tensor() -> Callable[[], None]:
    original = collective._write_chunk
    calls = [0]

    def failing(fd: int, base: int, data: memoryview, chunk: Any) -> None:
        calls[0] += 1
        if calls[0] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(fd, base, data, chunk)

    collective._write_chunk = failing  # type: ignore[assignment]
    return lambda: setattr(collective, "_write_chunk", original)


def _report(r: converter.ConversionReport) -> dict[str, Any]:
    return {"output": r.output, "aliases": r.aliases, "stored": r.stored, "removed": r.prefixes_removed}


def cases(folder: Path) -> dict[str, Callable[[], dict[str, Any]]]:
    rank = dist.get_rank()
    tied, gpt2 = shard_tied(), shard_gpt2()
    out: dict[str, Callable[[], dict[str, Any]]] = {}
    for parallel in (False, True):
        mode = "parallel" if parallel else "default"
        out[f"tied-{mode}"] = lambda p=parallel, m=mode: _report(
            converter.save_model(tied, folder / f"tied-{m}.safetensors", parallel=p)
        )
        out[f"gpt2-{mode}"] = lambda p=parallel, m=mode: _report(
            converter.save_model(gpt2, folder / f"gpt2-{m}", max_shard_size=MAX_SHARD, parallel=p)
        )
        out[f"dtensors-{mode}"] = lambda p=parallel, m=mode: _report(
            converter.save_file(_dtensors(folder), folder / f"dtensors-{m}.safetensors", parallel=p)
        )

    def differing_plans() -> dict[str, Any]:
        state = dict(tied.state_dict())
        if rank == 1:
            state["extra"] = torch.zeros(2)
        return _report(converter.save_file(state, folder / "differing.safetensors"))

    def failing(name: str, error: BaseException, parallel: bool) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            undo = _fail_on_rank_1(name, error)
            try:
                return _report(
                    converter.save_model(gpt2, folder / "failed", max_shard_size=MAX_SHARD, parallel=parallel)
                )
            finally:
                undo()

        return run

    def rank_0_disk_full() -> dict[str, Any]:
        undo = _fail_on_rank_0_second_tensor()
        try:
            return _report(converter.save_model(gpt2, folder / "full-disk.safetensors"))
        finally:
            undo()

    def ddp_of_compiled() -> dict[str, Any]:
        model = build_tied()
        wrapped = torch.nn.parallel.DistributedDataParallel(torch.compile(model))  # never called: nothing compiles
        if rank != 0:
            return {}
        return _report(converter.save_model(wrapped, folder / "ddp.safetensors"))

    def misplaced() -> dict[str, Any]:
        """Rows 3 + 1 under Shard(0), where torch's chunking gives 2 + 2: the layout cannot be trusted."""
        mesh = init_device_mesh("cpu", (2,))
        local = torch.ones(3 if rank == 0 else 1, 3)
        odd = DTensor.from_local(local, mesh, [Shard(0)], shape=torch.Size((4, 3)), stride=(3, 1))
        return _report(converter.save_file({"ok": torch.ones(2), "odd": odd}, folder / "misplaced.safetensors"))

    def unshared_folder() -> dict[str, Any]:
        """parallel=True where rank 1 does not see rank 0's staged files (a node-local disk)."""
        original = os.open

        def hidden(path: Any, *args: Any, **kwargs: Any) -> int:
            if rank == 1 and str(path).endswith(TEMP_SUFFIX):
                raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
            return original(path, *args, **kwargs)

        os.open = hidden  # type: ignore[assignment]
        try:
            return _report(converter.save_model(tied, folder / "unshared.safetensors", parallel=True))
        finally:
            os.open = original

    out["differing"] = differing_plans
    out["misplaced"] = misplaced
    out["unshared-parallel"] = unshared_folder
    out["rank1-write-fails-parallel"] = failing("_write_own", OSError(errno.EIO, "Input/output error"), True)
    out["rank1-send-fails-default"] = failing("_chunk_tensor", RuntimeError("device lost"), False)
    out["rank0-disk-full-default"] = rank_0_disk_full
    out["after-failures"] = lambda: _report(converter.save_model(tied, folder / "after.safetensors"))
    out["ddp-of-compiled"] = ddp_of_compiled
    out["compiled-fsdp"] = lambda: _report(  # torch.compile over an FSDP2 model: bare names, DTensors
        converter.save_model(torch.compile(tied), folder / "compiled-fsdp.safetensors")
    )
    return out


def run(rank: int, world: int, folder: str, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    # a deadlock fails the test in a minute rather than hanging it for gloo's default 30
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    results: dict[str, Any] = {}
    try:
        for name, case in cases(Path(folder)).items():
            if os.environ.get("TIESAFE_TEST_TRACE"):
                print(f"rank {rank}: {name} {time.perf_counter() - STARTED:.1f}s", flush=True)
            try:
                results[name] = {"report": case()}
            except converter.TiesafeError as exc:
                results[name] = {"error": str(exc), "kind": type(exc).__name__}
            except Exception:
                results[name] = {"crash": traceback.format_exc()}
            dist.barrier()
            if os.environ.get("TIESAFE_TEST_TRACE"):
                print(f"rank {rank}: {name} done {time.perf_counter() - STARTED:.1f}s", flush=True)
    finally:
        Path(folder, f"results-{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()
