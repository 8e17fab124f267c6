"""Training runs: DeepSpeed ZeRO 1/2/3 and torch.distributed.checkpoint (FSDP2) folders.

The checkpoints are written by the libraries themselves (tests/training_runs.py, two gloo
ranks under torchrun and one plain rank, in parallel), once per session. Each conversion
is compared name for name and bit for bit with what DeepSpeed's zero_to_fp32 and torch's
dcp_to_torch_save produce from the same files, and loaded into the model.
"""

from __future__ import annotations

import concurrent.futures
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import same_bits
from training_runs import TinyLM

import converter
from converter.cli import main
from converter.errors import TiesafeError
from converter.run import convert_run

HERE = Path(__file__).parent
DEEPSPEED = [f"ds-z{stage}-w{world}" for world in (1, 2) for stage in (1, 2, 3)]
DCP = ["dcp-rows", "dcp-cols"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every fixture checkpoint: DeepSpeed stages 1-3 on one and two ranks, FSDP2 DCP by rows and by columns."""
    root = tmp_path_factory.mktemp("runs")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    script = str(HERE / "training_runs.py")
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    launches = [
        subprocess.Popen([*two, script, str(root)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT),
        subprocess.Popen(
            [sys.executable, script, str(root)],
            env={**env, "MASTER_PORT": str(_free_port())},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        ),
    ]
    for launch in launches:
        output, _ = launch.communicate(timeout=900)
        assert launch.returncode == 0, output.decode(errors="replace")[-4000:]
    return {name: root / name for name in [*DEEPSPEED, *DCP]}


def _zero_to_fp32(folder: Path) -> dict[str, torch.Tensor]:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(folder)))


def _dcp_to_torch_save(folder: Path, tmp_path: Path, *path: str) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(folder), str(tmp_path / "reference.pt"))
    state = torch.load(tmp_path / "reference.pt")
    for part in path:
        state = state[part]
    return state


def _assert_same(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(reference)
    different = [n for n in reference if not same_bits(ours[n], reference[n].contiguous())]
    assert not different


@pytest.mark.parametrize("name", DEEPSPEED)
def test_deepspeed_equals_zero_to_fp32_and_loads_into_the_model(
    runs: dict[str, Path], name: str, tmp_path: Path
) -> None:
    report = convert_run(runs[name], tmp_path / "out")
    ours = converter.load_file(tmp_path / "out")
    reference = _zero_to_fp32(runs[name])
    if name.startswith("ds-z1"):  # stage 1 lists no frozen parameters; zero_to_fp32 drops them, we do not
        assert "pos" not in reference and report.warnings[0].startswith("1 frozen parameters (pos) taken")
        reference["pos"] = torch.load(runs[name] / "reference.pt")["pos"]
    _assert_same(ours, reference)
    assert ours["head.weight"] is ours["embed.weight"]  # shared_params: one tensor, written once
    assert [(t.name, t.target) for t in report.ties] == [("head.weight", "embed.weight")]
    assert report.bytes_written == sum(t.nbytes for n, t in ours.items() if n != "head.weight")
    model, trained = TinyLM(), TinyLM()
    converter.load_model(model, tmp_path / "out")
    trained.load_state_dict(torch.load(runs[name] / "reference.pt"))
    assert model.head.weight is model.embed.weight
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model(ids), trained(ids))


@pytest.mark.parametrize(("name", "path"), [("dcp-rows", ("model",)), ("dcp-cols", ("app", "model"))])
def test_dcp_equals_dcp_to_torch_save_and_loads_into_the_model(
    runs: dict[str, Path], name: str, path: tuple[str, ...], tmp_path: Path
) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    report = convert_run(runs[name], tmp_path / "out")
    ours = converter.load_file(tmp_path / "out")
    _assert_same(ours, _dcp_to_torch_save(runs[name], tmp_path, *path))
    assert report.copied == ["config.json"]
    assert [(t.name, t.target, t.origin) for t in report.ties] == [
        ("lm_head.weight", "model.embed_tokens.weight", "config")
    ]
    assert any("optimizer" in s for s in report.skipped)  # the optimizer state is left out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    trained = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(runs[name]))
    trained.load_state_dict(torch.load(runs[name] / "reference.pt"))
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model(ids).logits, trained(ids).logits)


@pytest.mark.parametrize(("name", "dtype"), [("ds-z3-w2", "bf16"), ("ds-z2-w2", "fp16"), ("dcp-cols", "bf16")])
def test_dtype_casts_as_tensor_to_does(runs: dict[str, Path], name: str, dtype: str, tmp_path: Path) -> None:
    target = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    convert_run(runs[name], tmp_path / "out", dtype=dtype)
    ours = converter.load_file(tmp_path / "out")
    full = convert_run(runs[name], tmp_path / "fp32")
    assert full.verified
    reference = converter.load_file(tmp_path / "fp32")
    expected = {n: t.to(target) if t.is_floating_point() else t for n, t in reference.items()}
    _assert_same(ours, expected)
    if "ds" in name:
        assert ours["steps"].dtype == torch.int64  # integer buffers keep their dtype


def test_shards_in_parallel_equal_the_serial_ones(runs: dict[str, Path], tmp_path: Path) -> None:
    serial = convert_run(runs["ds-z3-w2"], tmp_path / "serial", max_shard_size=3000)
    parallel = convert_run(runs["ds-z3-w2"], tmp_path / "parallel", max_shard_size=3000, workers=2)
    assert len(serial.files) > 3 and serial.files == parallel.files
    for name in serial.files:
        assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "parallel" / name).read_bytes()
    assert not [p for p in (tmp_path / "parallel").iterdir() if p.name.startswith(".")]  # no staging left
    with concurrent.futures.ThreadPoolExecutor(2) as executor:  # any executor: Dask's client passes through here
        threaded = converter.convert_run(runs["ds-z3-w2"], tmp_path / "threads", max_shard_size=3000, executor=executor)
    assert threaded.files == serial.files
    assert (tmp_path / "threads" / "model.safetensors.index.json").read_bytes() == (
        tmp_path / "serial" / "model.safetensors.index.json"
    ).read_bytes()


def test_cli_converts_a_run_folder_and_a_step_folder(runs: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["convert", str(runs["ds-z2-w1"]), str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["convert", str(runs["ds-z2-w1"] / "global_step1"), str(tmp_path / "b"), "--json"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    result = runner.invoke(main, ["convert", str(runs["dcp-cols"]), str(tmp_path / "c"), "--key", "app/model"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["convert", str(runs["dcp-cols"]), str(tmp_path / "d"), "--key", "model"])
    assert result.exit_code == 2 and "no tensors under 'model'" in result.output
    result = runner.invoke(main, ["convert", str(runs["ds-z2-w1"]), str(tmp_path / "e"), "--strip-prefix", "x"])
    assert result.exit_code == 2 and "not to training runs" in result.output and not (tmp_path / "e").exists()


def test_zero3_model_states_file_alone_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    source = runs["ds-z3-w2"] / "global_step1" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    result = CliRunner().invoke(main, ["convert", str(source), str(tmp_path / "x.safetensors")])
    assert result.exit_code == 2
    assert "placeholders" in result.output and "global_stepN" in result.output
    assert not list(tmp_path.iterdir())


def _broken_copy(runs: dict[str, Path], name: str, tmp_path: Path) -> Path:
    copy = tmp_path / name
    shutil.copytree(runs[name], copy)
    return copy


def _fails(source: Path, tmp_path: Path, *words: str) -> str:
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["convert", str(source), str(out)])
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert "\n" not in line and line.startswith("tiesafe: error: ")
    assert all(w in line for w in words), line
    assert not out.exists() or not list(out.iterdir())
    return line


def test_deepspeed_missing_rank_file(runs: dict[str, Path], tmp_path: Path) -> None:
    copy = _broken_copy(runs, "ds-z2-w2", tmp_path)
    (copy / "global_step1" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    _fails(copy, tmp_path, "global_step1", "saved by 2 ranks but 1")
    (copy / "global_step1" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").rename(
        copy / "global_step1" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    )
    _fails(copy, tmp_path, "rank 0", "missing")


def test_deepspeed_partition_shorter_than_param_shapes(runs: dict[str, Path], tmp_path: Path) -> None:
    for name, key in (("ds-z2-w2", "single_partition_of_fp32_groups"), ("ds-z3-w2", "fp32_flat_groups")):
        copy = _broken_copy(runs, name, tmp_path)
        for rank in (0, 1):
            path = copy / "global_step1" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
            state = torch.load(path, weights_only=False)  # our own fixture, written by DeepSpeed
            groups = state["optimizer_state_dict"][key]
            groups[0] = groups[0][:-40].clone()
            torch.save(state, path)
        _fails(copy, tmp_path, "shorter than param_shapes says")
        shutil.rmtree(copy)


def test_deepspeed_tensor_parallel_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    copy = _broken_copy(runs, "ds-z2-w1", tmp_path)
    step = copy / "global_step1"
    shutil.copy(step / "mp_rank_00_model_states.pt", step / "mp_rank_01_model_states.pt")
    _fails(copy, tmp_path, "tensor-parallel", "mp_rank_01")


def test_dcp_damaged_checkpoints(runs: dict[str, Path], tmp_path: Path) -> None:
    copy = _broken_copy(runs, "dcp-rows", tmp_path)
    (copy / "__1_0.distcp").unlink()
    _fails(copy, tmp_path, "__1_0.distcp", "missing")
    shutil.copy(runs["dcp-rows"] / "__1_0.distcp", copy / "__1_0.distcp")
    with open(copy / "__1_0.distcp", "r+b") as f:
        f.truncate(1000)
    _fails(copy, tmp_path, "__1_0.distcp", "past the end of the file")

    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

    copy = _broken_copy(runs, "dcp-cols", tmp_path / "b")
    with open(copy / ".metadata", "rb") as f:
        meta = pickle.load(f)  # our own fixture, written by dcp.save
    entry = meta.state_dict_metadata["app.model.model.norm.weight"]
    entry.chunks[1] = ChunkStorageMetadata(torch.Size([entry.size[0] - 1]), entry.chunks[1].sizes)
    with open(copy / ".metadata", "wb") as f:
        pickle.dump(meta, f)
    _fails(copy, tmp_path, ".metadata", "outside the tensor")


def test_dcp_metadata_is_read_without_running_it(tmp_path: Path) -> None:
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "__0_0.distcp").write_bytes(b"")

    class Boom:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, ("touch pwned",))

    (folder / ".metadata").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(TiesafeError, match=r"refused: the DCP metadata asks for '(posix|os)\.system'"):
        convert_run(folder, tmp_path / "out")
    assert not (Path.cwd() / "pwned").exists()


def test_batch_finds_training_runs(runs: dict[str, Path], tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(runs["ds-z3-w1"], tree / "deepspeed" / "checkpoint-1")
    shutil.copytree(runs["dcp-rows"], tree / "fsdp" / "step-1")
    results = list(converter.convert_tree(tree, tmp_path / "out", workers=1))
    assert sorted((r.item, r.status) for r in results) == [
        ("deepspeed/checkpoint-1", "converted"),
        ("fsdp/step-1", "converted"),
    ]
    assert (tmp_path / "out" / "deepspeed" / "checkpoint-1" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "fsdp" / "step-1" / "config.json").is_file()
    again = list(converter.convert_tree(tree, tmp_path / "out", workers=1))
    assert {r.status for r in again} == {"unchanged"}


@pytest.mark.parametrize("layout", ["torch_save", "safetensors"])
def test_dcp_serialization_formats(layout: str, tmp_path: Path) -> None:
    """dcp.save in one process, both formats FileSystemWriter writes (safetensors: the header locates chunks)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.filesystem import FileSystemWriter, SerializationFormat

    torch.manual_seed(0)
    state = {"a.weight": torch.randn(5, 3), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(6).reshape(2, 3)}
    writer = FileSystemWriter(tmp_path / "ckpt", serialization_format=SerializationFormat(layout))
    dcp.save({"model": state, "step": 3}, storage_writer=writer)
    report = convert_run(tmp_path / "ckpt", tmp_path / "out")
    _assert_same(converter.load_file(tmp_path / "out"), state)
    assert report.skipped == ["step"]
