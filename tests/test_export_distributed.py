"""Export from a distributed run: FSDP2, DTensors and DDP on 2 real ranks (gloo, CPU).

One ``torch.multiprocessing`` spawn runs every case (tests/distributed_cases.py);
each test checks what the ranks wrote against ``save_model`` of the same model
unsharded, byte for byte, and loads it with ``load_model``.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from distributed_cases import MAX_SHARD, build_gpt2, build_tied, run
from helpers import same_bits

import converter
from converter.writer import TEMP_SUFFIX

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    folder = tmp_path_factory.mktemp("distributed")
    mp.spawn(run, args=(WORLD, str(folder), _free_port()), nprocs=WORLD, join=True)
    results = [json.loads((folder / f"results-{rank}.json").read_text()) for rank in range(WORLD)]
    for per_rank in results:
        crashed = {name: r["crash"] for name, r in per_rank.items() if "crash" in r}
        assert not crashed, crashed
    return folder, results


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())} if path.is_dir() else {path.name: path.read_bytes()}


def _no_temp_files(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if p.name.endswith(TEMP_SUFFIX)]


@pytest.mark.parametrize("mode", ["default", "parallel"])
def test_fsdp2_tied_column_sharded_model_equals_unsharded_save(
    ran: tuple[Path, list[dict[str, Any]]], mode: str, tmp_path: Path
) -> None:
    folder, results = ran
    for per_rank in results:
        report = per_rank[f"tied-{mode}"]["report"]
        assert report["aliases"] == {"head.weight": "emb.weight"} and report["stored"] == 5
    model = build_tied()
    converter.save_model(model, tmp_path / "ref.safetensors")
    assert (folder / f"tied-{mode}.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    torch.manual_seed(1)
    fresh = build_tied.__globals__["Tied"]()
    loaded = converter.load_model(fresh, folder / f"tied-{mode}.safetensors")
    assert not loaded.missing and not loaded.unexpected
    assert fresh.head.weight is fresh.emb.weight
    assert all(same_bits(fresh.state_dict()[n], t) for n, t in model.state_dict().items())


@pytest.mark.parametrize("mode", ["default", "parallel"])
def test_fsdp2_gpt2_sharded_set_equals_unsharded_save(
    ran: tuple[Path, list[dict[str, Any]]], mode: str, tmp_path: Path
) -> None:
    folder, _ = ran
    model = build_gpt2().eval()
    converter.save_model(model, tmp_path / "ref", max_shard_size=MAX_SHARD)
    written = _files(folder / f"gpt2-{mode}")
    assert len(written) > 3 and "model.safetensors.index.json" in written
    assert written == _files(tmp_path / "ref")
    torch.manual_seed(1)
    fresh = build_gpt2().eval()
    converter.load_model(fresh, folder / f"gpt2-{mode}" / "model.safetensors.index.json")
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


@pytest.mark.parametrize("mode", ["default", "parallel"])
def test_every_placement_equals_save_file_of_the_gathered_tensors(
    ran: tuple[Path, list[dict[str, Any]]], mode: str
) -> None:
    """Shard(0) uneven, Shard(1) of a 3-d tensor, Replicate, Partial, _StridedShard, a 2-d mesh, a tie."""
    folder, results = ran
    assert results[0][f"dtensors-{mode}"]["report"]["aliases"] == {"rows_again": "rows"}
    written = (folder / f"dtensors-{mode}.safetensors").read_bytes()
    assert written == (folder / "dtensors-ref.safetensors").read_bytes()
    loaded = converter.load_file(folder / f"dtensors-{mode}.safetensors")
    assert torch.equal(loaded["sum"], torch.full((2, 3), 3.0))  # the partial sums 1 + 2
    assert loaded["rows_again"] is loaded["rows"]


def test_ranks_with_different_tensors_all_raise_the_same_error(ran: tuple[Path, list[dict[str, Any]]]) -> None:
    folder, results = ran
    errors = {r["differing"]["error"] for r in results}
    assert len(errors) == 1
    assert errors.pop().endswith(
        "differing.safetensors: the ranks hold different tensors (names, dtypes or shapes differ)"
    )
    assert not (folder / "differing.safetensors").exists()


def test_a_piece_its_placement_does_not_give_is_refused_naming_tensor_and_placement(
    ran: tuple[Path, list[dict[str, Any]]],
) -> None:
    folder, results = ran
    errors = [r["misplaced"] for r in results]
    assert all(e.get("kind") == "UnsupportedError" for e in errors), errors
    assert "DTensor 'odd' (Shard(dim=0)) holds a [3, 3] piece where its placement gives [2, 3]" in errors[0]["error"]
    assert errors[0]["error"] == errors[1]["error"] and "\n" not in errors[0]["error"]
    assert not (folder / "misplaced.safetensors").exists()


def test_parallel_mode_on_a_folder_one_rank_does_not_see_is_refused(ran: tuple[Path, list[dict[str, Any]]]) -> None:
    folder, results = ran
    errors = {r["unshared-parallel"]["error"] for r in results}
    assert len(errors) == 1
    assert "rank 1: parallel=True needs a folder every rank sees" in errors.pop()
    assert not (folder / "unshared.safetensors").exists()
    _no_temp_files(folder)


@pytest.mark.parametrize(
    ("case", "kind", "message"),
    [
        ("rank1-write-fails-parallel", "WriteError", "rank 1: cannot write the output (Input/output error)"),
        ("rank1-send-fails-default", "TiesafeError", "rank 1: failed: RuntimeError: device lost"),
        ("rank0-disk-full-default", "WriteError", "rank 0: cannot write the output (No space left on device)"),
    ],
)
def test_a_failing_rank_makes_every_rank_raise_and_leaves_nothing(
    ran: tuple[Path, list[dict[str, Any]]], case: str, kind: str, message: str
) -> None:
    folder, results = ran
    seen = [r[case] for r in results]
    assert all(s.get("kind") == kind for s in seen), seen
    assert len({s["error"] for s in seen}) == 1 and message in seen[0]["error"]
    assert not (folder / "failed").exists() or not list((folder / "failed").iterdir())
    assert not (folder / "full-disk.safetensors").exists()
    _no_temp_files(folder)
    # and the group is not left stuck: the next save works
    assert all("report" in r["after-failures"] for r in results)


def test_ddp_of_a_compiled_model_is_saved_under_the_bare_names(
    ran: tuple[Path, list[dict[str, Any]]], tmp_path: Path
) -> None:
    folder, results = ran
    report = results[0]["ddp-of-compiled"]["report"]
    assert report["removed"] == ["'module.' (DistributedDataParallel)", "'module._orig_mod.' (torch.compile)"]
    converter.save_model(build_tied(), tmp_path / "bare.safetensors")
    assert (folder / "ddp.safetensors").read_bytes() == (tmp_path / "bare.safetensors").read_bytes()


def test_a_compiled_fsdp2_model_is_saved_under_the_bare_names(ran: tuple[Path, list[dict[str, Any]]]) -> None:
    folder, results = ran
    assert all(r["compiled-fsdp"]["report"]["removed"] == ["'_orig_mod.' (torch.compile)"] for r in results)
    written = (folder / "compiled-fsdp.safetensors").read_bytes()
    assert written == (folder / "tied-default.safetensors").read_bytes()
