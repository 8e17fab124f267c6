"""Folders whose weight set is one flat file, planned and written from its columns.

Each case converts the same folder twice, once as planned (the set from columns, checked
to be so) and once with the columnar plan switched off, and asserts the two outputs are
the same files, byte for byte, with the same report. Sources are real models' state
dicts as torch.save writes them (transformers 5 saves safetensors only), and the files
PEFT's and diffusers' own save_pretrained write.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import same_bits
from models import llama_tied, qwen_moe, tiny_unet
from transformers import Qwen2MoeForCausalLM

import converter
from converter import folder as folder_module
from converter import identical
from converter.errors import TiesafeError
from converter.folder import FlatSetOutput, SetOutput, plan_folder


@pytest.fixture(autouse=True)
def _few_candidates_are_costly(monkeypatch: pytest.MonkeyPatch) -> None:
    # A tiny model stands for thousands of experts: past 2 candidates of one shape the
    # identical-bytes search is skipped, as it is for a mixture of experts.
    monkeypatch.setattr(identical, "SEARCH_AT_MOST", 2)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _both(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **options: Any
) -> tuple[dict[str, bytes], dict[str, Any], dict[str, bytes], dict[str, Any]]:
    """Convert ``source`` as planned, then with the columnar plan off: both outputs and reports."""
    reports = []
    for name in ("fast", "general"):
        with monkeypatch.context() as patch:
            if name == "general":
                patch.setattr(folder_module, "_plan_flat_set", lambda *args, **kwargs: None)
            report = converter.convert_folder(source, tmp_path / name, **options).to_dict()
        del report["seconds"], report["output"]
        reports.append(report)
    return _files(tmp_path / "fast"), reports[0], _files(tmp_path / "general"), reports[1]


def _qwen_moe_folder(folder: Path, weights: str = "pytorch_model.bin", prefix: str = "") -> dict[str, torch.Tensor]:
    """A tiny Qwen2-MoE (a real transformers model, untied) as a folder: its config and a torch.save'd state dict."""
    model = qwen_moe()
    model.config.architectures = ["Qwen2MoeForCausalLM"]
    folder.mkdir(parents=True)
    model.config.save_pretrained(folder)
    state = {prefix + name: tensor for name, tensor in model.state_dict().items()}
    torch.save(state, folder / weights)
    return state


def _assert_planned_from_columns(source: Path, **options: Any) -> None:
    assert [type(s) for s in plan_folder(source, **options).sets] == [FlatSetOutput]


@pytest.mark.parametrize(
    ("weights", "prefix", "options"),
    [
        ("pytorch_model.bin", "", {}),
        ("pytorch_model.fp16.bin", "", {}),  # a variant: model.fp16.safetensors
        ("pytorch_model.bin", "module.", {}),  # DDP's prefix, removed over the set
        ("pytorch_model.bin", "module.", {"keep_names": True}),
        ("pytorch_model.bin", "", {"strip_prefix": ("model.",)}),
        ("pytorch_model.bin", "", {"verify": False}),
    ],
)
def test_a_mixture_of_experts_folder_is_the_general_paths_folder(
    weights: str, prefix: str, options: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "moe"
    _qwen_moe_folder(source, weights, prefix)
    planning = {k: v for k, v in options.items() if k != "verify"}
    _assert_planned_from_columns(source, **planning)
    fast, fast_report, general, general_report = _both(source, tmp_path, monkeypatch, **options)
    assert fast == general and fast_report == general_report
    assert any(name.endswith(".safetensors") for name in fast)
    assert any("identical bytes not searched" in w for w in fast_report["warnings"])


def test_an_index_over_one_shard_is_read_from_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "moe"
    state = _qwen_moe_folder(source, "pytorch_model-00001-of-00001.bin")
    index = {"metadata": {"total_size": 0}, "weight_map": dict.fromkeys(state, "pytorch_model-00001-of-00001.bin")}
    (source / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    _assert_planned_from_columns(source)
    fast, fast_report, general, general_report = _both(source, tmp_path, monkeypatch)
    assert fast == general and fast_report == general_report
    assert "model.safetensors" in fast and fast_report["replaced"] == general_report["replaced"]


def test_sets_the_columns_leave_to_the_general_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "moe"
    _qwen_moe_folder(source)
    assert [type(s) for s in plan_folder(source, max_shard_size="2KB").sets] == [SetOutput]  # sharded
    assert [type(s) for s in plan_folder(source, dedup_identical=True).sets] == [SetOutput]
    monkeypatch.setattr(identical, "SEARCH_AT_MOST", 10_000)  # few candidates: identical bytes are searched
    assert [type(s) for s in plan_folder(source).sets] == [SetOutput]


def test_a_tie_the_model_declares_goes_to_the_general_path(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = llama_tied().eval()
    folder = tmp_path / "llama"
    folder.mkdir()
    model.config.save_pretrained(folder)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}  # lm_head: equal bytes, own storage
    torch.save(state, folder / "pytorch_model.bin")
    assert [type(s) for s in plan_folder(folder).sets] == [SetOutput]
    report = converter.convert_folder(folder, tmp_path / "out")
    assert [(t.name, t.target, t.origin) for t in report.ties] == [
        ("lm_head.weight", "model.embed_tokens.weight", "config")
    ]
    state["lm_head.weight"] += 1  # fine-tuned apart: refused, as the general path refuses it
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(TiesafeError, match="their bytes differ"):
        converter.convert_folder(folder, tmp_path / "apart")


def test_a_peft_adapter_over_the_shard_size_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import peft

    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lora = peft.get_peft_model(llama_tied().eval(), config)
    lora.save_pretrained(tmp_path / "lora", safe_serialization=False)  # PEFT's own save
    source = tmp_path / "lora"
    assert (source / "adapter_model.bin").exists()
    _assert_planned_from_columns(source, max_shard_size="100B")
    fast, fast_report, general, general_report = _both(source, tmp_path, monkeypatch, max_shard_size="100B")
    assert fast == general and fast_report == general_report
    assert any("written as one file over the shard size" in w for w in fast_report["warnings"])
    assert "adapter_model.safetensors" in fast


def test_a_diffusers_unet_folder_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "unet"
    tiny_unet().save_pretrained(source, safe_serialization=False)  # diffusers' own save
    assert (source / "diffusion_pytorch_model.bin").exists()
    _assert_planned_from_columns(source)
    fast, fast_report, general, general_report = _both(source, tmp_path, monkeypatch)
    assert fast == general and fast_report == general_report
    assert "diffusion_pytorch_model.safetensors" in fast


def _local_header(data: bytearray, key: str) -> int:
    return data.index(b"PK\x03\x04", data.index(f"/data/{key}".encode()) - 64)


def test_a_damaged_local_header_met_mid_copy_is_the_general_paths_error(tmp_path: Path) -> None:
    source = tmp_path / "moe"
    _qwen_moe_folder(source)
    weights = source / "pytorch_model.bin"
    data = bytearray(weights.read_bytes())
    at = _local_header(data, "3")
    data[at : at + 4] = b"XX\x03\x04"
    weights.write_bytes(bytes(data))
    _assert_planned_from_columns(source)  # the headers are read as the copy reaches them
    with pytest.raises(TiesafeError, match="no valid local header"):
        converter.convert_folder(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing left behind, not even the folder


def test_storages_out_of_their_headers_order_are_written_by_the_general_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "moe"
    _qwen_moe_folder(source)
    weights = source / "pytorch_model.bin"
    data = bytearray(weights.read_bytes())
    at = _local_header(data, "0")
    (extra,) = struct.unpack_from("<H", data, at + 28)
    struct.pack_into("<H", data, at + 28, extra + 320)  # storage 0's data now starts past storage 1's
    weights.write_bytes(bytes(data))
    _assert_planned_from_columns(source)
    fast, fast_report, general, general_report = _both(source, tmp_path, monkeypatch)
    assert fast == general and fast_report == general_report


def test_the_output_loads_in_transformers_as_the_model_it_came_from(tmp_path: Path) -> None:
    source = tmp_path / "moe"
    state = _qwen_moe_folder(source)
    _assert_planned_from_columns(source)
    converter.convert_folder(source, tmp_path / "out")
    loaded = Qwen2MoeForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    assert (tmp_path / "out" / "model.safetensors").exists() and not (tmp_path / "out" / "pytorch_model.bin").exists()
    ids = torch.tensor([[1, 5, 7, 3]])
    expected = qwen_moe()
    expected.load_state_dict(state)
    with torch.no_grad():
        assert same_bits(loaded(ids).logits, expected.eval()(ids).logits)


def test_a_diffusers_pipeline_with_a_flat_component_loads_in_diffusers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import diffusers

    unet = tiny_unet()
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=10))
    source = tmp_path / "ddpm"
    pipe.save_pretrained(source, safe_serialization=False)  # diffusers' own save: unet/diffusion_pytorch_model.bin
    assert [type(s) for s in plan_folder(source).sets] == [FlatSetOutput]
    fast, fast_report, general, general_report = _both(source, tmp_path, monkeypatch)
    assert fast == general and fast_report == general_report
    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "fast", use_safetensors=True, local_files_only=True)
    sample = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert same_bits(loaded.unet(sample, 3).sample, unet(sample, 3).sample)


def test_a_dry_run_reads_the_local_headers_a_conversion_would_meet(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    _qwen_moe_folder(tree / "good")
    _qwen_moe_folder(tree / "damaged")
    weights = tree / "damaged" / "pytorch_model.bin"
    data = bytearray(weights.read_bytes())
    at = _local_header(data, "3")
    data[at : at + 4] = b"XX\x03\x04"
    weights.write_bytes(bytes(data))
    results = {r.item: r for r in converter.convert_tree(tree, tmp_path / "out", dry_run=True, workers=1)}
    assert results["good"].status == "planned" and results["good"].error is None
    assert results["damaged"].status == "failed"  # listed as the conversion would end: refused
    assert results["damaged"].error is not None and "no valid local header" in results["damaged"].error
    assert not (tmp_path / "out").exists()


def test_a_declared_tie_is_found_among_the_names_as_held() -> None:
    from converter.folder import _declared_tie_present
    from converter.readers.name_column import NameColumn

    names = NameColumn([f"model.layers.{i}.w" for i in range(200)] + ["embed.weight", "lm_head.weight"])
    assert _declared_tie_present([["embed.weight", "lm_head.weight"]], names)
    assert not _declared_tie_present([["embed.weight", "head.weight"]], names)
    assert not _declared_tie_present([["lm_head"], ["embed"]], names)  # parts of names are not names
    many = [[f"model.layers.{i}.w", f"other.{i}"] for i in range(40)]  # a set of the names, for many
    assert not _declared_tie_present(many, names)
    assert _declared_tie_present([*many, ["model.layers.3.w", "model.layers.4.w"]], names)
