"""Reading checkpoints: formats, dtypes, wrappers, devices; bytes preserved exactly."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers import SAFETENSORS_DTYPES, same_bits, save_and_convert

import converter
from converter.errors import TiesafeError, UnsupportedError
from converter.readers.torchfile import read_checkpoint

DTYPES = SAFETENSORS_DTYPES


def _sample(dtype: torch.dtype) -> torch.Tensor:
    raw = torch.randint(0, 256, (6 * torch.empty((), dtype=dtype).element_size(),), dtype=torch.uint8)
    if dtype == torch.bool:
        return raw[:6] % 2 == 1
    return raw.view(dtype).reshape(2, 3)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_round_trips_bit_exact(tmp_path: Path, dtype: torch.dtype, legacy: bool) -> None:
    state = {
        "x": _sample(dtype),
        "scalar": _sample(dtype).reshape(-1)[0].clone(),
        "empty": torch.zeros(0, 3, dtype=dtype),
    }
    _, report = save_and_convert(state, tmp_path, legacy=legacy)
    loaded = safetensors.torch.load_file(report.output)
    for name, tensor in state.items():
        assert same_bits(loaded[name], tensor), name


def test_nan_payloads_and_negative_zero_survive(tmp_path: Path) -> None:
    bits = torch.tensor([0x7FC00001, 0xFFC12345, 0x80000000, 0x7F800000], dtype=torch.int64).to(torch.int32)
    state = {"x": bits.view(torch.float32)}
    _, report = save_and_convert(state, tmp_path)
    assert torch.equal(safetensors.torch.load_file(report.output)["x"].view(torch.int32), bits)


def test_legacy_format_with_ties(tmp_path: Path) -> None:
    w = torch.randn(4, 4)
    source, report = save_and_convert({"a": w, "b": w, "c": w[1]}, tmp_path, legacy=True)
    assert read_checkpoint(source).format == "legacy"
    assert report.aliases == {"b": "a"} and report.views == ["c"]
    loaded = converter.load_file(report.output)
    assert loaded["b"] is loaded["a"] and same_bits(loaded["c"], w[1])


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt"])
def test_every_checkpoint_suffix(tmp_path: Path, suffix: str) -> None:
    _, report = save_and_convert({"x": torch.ones(2)}, tmp_path, name=f"model{suffix}")
    assert report.output == str(tmp_path / "model.safetensors")


def test_default_output_names() -> None:
    from converter.convert import default_output

    assert default_output(Path("m/pytorch_model.bin")) == Path("m/model.safetensors")
    assert default_output(Path("m/pytorch_model-00002-of-00003.bin")) == Path("m/model-00002-of-00003.safetensors")
    assert default_output(Path("m/weights.pt")) == Path("m/weights.safetensors")


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "module", "model_state_dict"])
def test_training_checkpoint_wrappers_are_unwrapped(tmp_path: Path, wrapper: str) -> None:
    weights = {"layer.weight": torch.randn(2, 2), "layer.bias": torch.randn(2)}
    state = {wrapper: weights, "epoch": 7, "optimizer": {"lr": 0.1, "state": {0: {"step": torch.tensor(3.0)}}}}
    _, report = save_and_convert(state, tmp_path)
    assert report.wrapper == wrapper
    assert sorted(report.skipped) == ["epoch: int", "optimizer: optimizer state"]
    loaded = safetensors.torch.load_file(report.output)
    assert set(loaded) == set(weights)  # names exactly as the user would load them


def test_nested_wrapper_and_explicit_key(tmp_path: Path) -> None:
    inner = {"w": torch.randn(3)}
    ema = {"w": torch.randn(3)}
    state = {"model": {"module": inner}, "ema": ema, "step": 10}
    torch.save(state, tmp_path / "ckpt.pt")
    with pytest.raises(TiesafeError, match=r"several state dicts: 'model/module' \(1 tensors, 12 B\), 'ema'.*--key"):
        converter.convert_file(tmp_path / "ckpt.pt")
    report = converter.convert_file(tmp_path / "ckpt.pt", key="model/module")
    assert report.wrapper == "model/module"
    assert sorted(report.skipped) == ["ema: dict of 1", "step: int"]
    assert same_bits(safetensors.torch.load_file(report.output)["w"], inner["w"])
    report = converter.convert_file(tmp_path / "ckpt.pt", tmp_path / "ema.safetensors", key="ema")
    assert same_bits(safetensors.torch.load_file(report.output)["w"], ema["w"])
    with pytest.raises(TiesafeError, match="no entry 'nope'"):
        converter.convert_file(tmp_path / "ckpt.pt", tmp_path / "x.safetensors", key="nope")


def test_non_tensor_entries_of_a_state_dict_are_listed(tmp_path: Path) -> None:
    _, report = save_and_convert({"w": torch.ones(2), "note": "hello", "version": 3}, tmp_path)
    assert report.skipped == ["note: str", "version: int"]


def _retag_location(path: Path, location: str) -> None:
    """Rewrite a zip checkpoint as if its storages had been saved from ``location``."""
    with zipfile.ZipFile(path) as src:
        members = [(info, src.read(info)) for info in src.infolist()]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as dst:
        for info, data in members:
            if info.filename.endswith("data.pkl"):
                data = data.replace(pickle.dumps("cpu", protocol=2)[2:-2], pickle.dumps(location, protocol=2)[2:-2])
            dst.writestr(info.filename, data)
    path.write_bytes(buffer.getvalue())


def test_gpu_saved_checkpoint_reads_on_cpu(tmp_path: Path) -> None:
    w = torch.randn(3, 3)
    torch.save({"w": w, "tied": w}, tmp_path / "gpu.pt")
    _retag_location(tmp_path / "gpu.pt", "cuda:0")
    ckpt = read_checkpoint(tmp_path / "gpu.pt")
    assert {r.location for r in ckpt.storages.values()} == {"cuda:0"}
    report = converter.convert_file(tmp_path / "gpu.pt")
    assert report.aliases == {"tied": "w"}
    assert same_bits(safetensors.torch.load_file(report.output)["w"], w)


def test_parameters_and_tensor_attributes(tmp_path: Path) -> None:
    p = torch.nn.Parameter(torch.randn(2, 2))
    t = torch.randn(3)
    t.custom_attribute = "x"  # pickled through _rebuild_from_type_v2
    _, report = save_and_convert({"p": p, "t": t}, tmp_path)
    loaded = safetensors.torch.load_file(report.output)
    assert same_bits(loaded["p"], p.detach()) and same_bits(loaded["t"], t)


@pytest.mark.parametrize(
    ("tensor", "what"),
    [
        (torch.zeros(2, dtype=torch.complex128), "complex128"),
        (torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8), "quantized"),
        (torch.eye(2).to_sparse(), "sparse"),
    ],
    ids=["complex128", "quantized", "sparse"],
)
def test_unsupported_tensors_are_named(tmp_path: Path, tensor: torch.Tensor, what: str) -> None:
    torch.save({"ok": torch.ones(1), "bad": tensor}, tmp_path / "x.pt")
    with pytest.raises(UnsupportedError, match=rf"tensor 'bad' is .*{what}"):
        converter.convert_file(tmp_path / "x.pt")
    assert not (tmp_path / "x.safetensors").exists()
