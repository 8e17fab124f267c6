"""converter.load_model on real transformers models: ties rebuilt, TorchScript traces every name."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import torch
from models import AUTO_CLASSES, EXPECTED_TIES

import converter

IDS = torch.tensor([[3, 5, 7, 11]])


class _Logits(torch.nn.Module):
    """A traceable forward: token ids in, logits out (no cache, no output dataclass)."""

    def __init__(self, model: torch.nn.Module, name: str) -> None:
        super().__init__()
        self.model = model
        self.kwargs = {"use_cache": False} if name != "bert" else {}
        self.seq2seq = name in ("t5", "bart")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        extra = {"decoder_input_ids": ids} if self.seq2seq else {}
        return self.model(input_ids=ids, **self.kwargs, **extra).logits


@pytest.fixture(params=sorted(EXPECTED_TIES))
def folder(request: pytest.FixtureRequest, model_folders: dict[str, Path], tmp_path: Path) -> tuple[str, Path, dict]:
    """A folder tiesafe wrote (config.json + model.safetensors), and the original state dict."""
    name = request.param
    folder = tmp_path / name
    shutil.copytree(model_folders[name], folder)
    converter.convert_file(folder / "pytorch_model.bin")
    original = torch.load(folder / "pytorch_model.bin", weights_only=True)
    (folder / "pytorch_model.bin").unlink()
    return name, folder, original


def _fresh(name: str, folder: Path) -> torch.nn.Module:
    auto = AUTO_CLASSES[name]
    config = auto.from_pretrained(folder).config
    return auto.from_config(config).eval()


def _original(name: str, folder: Path, state: dict) -> torch.nn.Module:
    model = _fresh(name, folder)
    model.load_state_dict(state)
    return model


def test_ties_become_module_ties_even_when_the_constructor_made_separate_parameters(folder) -> None:
    name, path, state = folder
    model = _fresh(name, path)
    for group in EXPECTED_TIES[name]:  # untie what the constructor tied
        for alias in group[1:]:
            prefix, _, leaf = alias.rpartition(".")
            owner = model.get_submodule(prefix)
            setattr(owner, leaf, torch.nn.Parameter(getattr(owner, leaf).detach().clone()))
            assert model.get_parameter(alias) is not model.get_parameter(group[0])
    report = converter.load_model(model, path)
    assert report.missing == report.unexpected == report.conflicts == []
    for group in EXPECTED_TIES[name]:
        for alias in group[1:]:
            assert model.get_parameter(alias) is model.get_parameter(group[0]), alias
            assert report.tied[alias] == group[0]
    with torch.no_grad():
        assert torch.equal(_Logits(model, name)(IDS), _Logits(_original(name, path, state), name)(IDS))


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # transformers' shape checks, constant here
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_torchscript_load_traces_every_name_with_the_tied_output(folder) -> None:
    name, path, _ = folder
    tied = AUTO_CLASSES[name].from_pretrained(path).eval()
    model = _fresh(name, path)
    report = converter.load_model(model, path, torchscript=True)
    aliases = sorted(a for group in EXPECTED_TIES[name] for a in group[1:])
    assert sorted(report.cloned) == aliases and report.tied == {}
    tensors = model.state_dict(keep_vars=True)
    assert len({t.untyped_storage().data_ptr() for t in tensors.values()}) == len(tensors)

    traced = torch.jit.trace(_Logits(model, name), (IDS,))
    assert {f"model.{n}" for n in tensors} <= set(traced.state_dict())
    with torch.no_grad():
        expected = _Logits(tied, name)(IDS)
        assert torch.equal(traced(IDS), expected)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        buffer.seek(0)
        restored = torch.jit.load(buffer)
        assert {f"model.{n}" for n in tensors} <= set(restored.state_dict())
        assert torch.equal(restored(IDS), expected)
