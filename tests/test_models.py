"""Real transformers models: ties found, stored once, valid for every loader."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from models import AUTO_CLASSES, EXPECTED_TIES

import converter


@pytest.fixture(params=sorted(EXPECTED_TIES))
def converted(request: pytest.FixtureRequest, model_folders: dict[str, Path], tmp_path: Path):
    name = request.param
    folder = tmp_path / name
    shutil.copytree(model_folders[name], folder)
    report = converter.convert_file(folder / "pytorch_model.bin")
    return name, folder, report


def test_ties_found_and_first_name_kept(converted) -> None:
    name, _, report = converted
    expected = {alias: group[0] for group in EXPECTED_TIES[name] for alias in group[1:]}
    assert report.aliases == expected
    assert report.views == []


def test_each_byte_written_once(converted) -> None:
    name, folder, report = converted
    source = torch.load(folder / "pytorch_model.bin", weights_only=True)
    unique = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in source.values()}
    assert report.bytes_written == sum(unique.values())
    repeated = sum(source[a].nbytes for group in EXPECTED_TIES[name] for a in group[1:])
    assert report.bytes_saved == repeated > 0


def test_plain_safetensors_loader_reads_it(converted) -> None:
    name, folder, report = converted
    plain = safetensors.torch.load_file(report.output)
    source = torch.load(folder / "pytorch_model.bin", weights_only=True)
    aliases = {a for group in EXPECTED_TIES[name] for a in group[1:]}
    assert set(plain) == set(source) - aliases
    for key, tensor in plain.items():
        assert torch.equal(tensor, source[key])
    with safetensors.safe_open(report.output, framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt"
    for alias in aliases:  # the Hub convert service's convention, for tools that know it
        assert metadata[alias] in plain


def test_tiesafe_loader_rebuilds_every_name_tied(converted) -> None:
    name, folder, report = converted
    source = torch.load(folder / "pytorch_model.bin", weights_only=True)
    loaded = converter.load_file(report.output)
    assert set(loaded) == set(source)
    for key in source:
        assert torch.equal(loaded[key], source[key]), key
    for group in EXPECTED_TIES[name]:
        for alias in group[1:]:
            assert loaded[alias] is loaded[group[0]]


def test_transformers_loads_the_folder_with_identical_logits(converted) -> None:
    name, folder, _ = converted
    (folder / "pytorch_model.bin").rename(folder.parent / f"{name}.bin")  # only safetensors left
    auto = AUTO_CLASSES[name]
    original = auto.from_config(auto.from_pretrained(folder).config)
    original.load_state_dict(torch.load(folder.parent / f"{name}.bin", weights_only=True))
    loaded, info = auto.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.tensor([[3, 5, 7, 11]])
    kwargs = {"decoder_input_ids": ids} if name in ("t5", "bart") else {}
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids, **kwargs).logits, original.eval()(ids, **kwargs).logits)
