"""Every library's model folder, written by that library's own save call in pickle mode, converted by
``convert FOLDER``, ``batch`` and ``prepare-upload``, and loaded back by that library's own loader.

Where the installed version no longer writes pickles (transformers 5 writes safetensors only), the
folder is written with ``torch.save`` under the names transformers 4 wrote, and the test says so.
timm and open_clip need torchvision, which cannot be installed here: their folders are checked by name.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers import same_bits
from models import llama_tied, tiny_unet

import converter
from converter import conventions
from converter.errors import TiesafeError

diffusers = pytest.importorskip("diffusers")  # installed by the dev extra (tiesafe[diffusers])
warnings.filterwarnings("ignore", category=FutureWarning)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "converter", *args], capture_output=True, text=True)


def _tree(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _unet() -> torch.nn.Module:
    return tiny_unet()


def _unet_output(unet: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(1)
    with torch.no_grad():
        return unet(torch.randn(1, 3, 8, 8), 3).sample


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A DDPM pipeline as DiffusionPipeline.save_pretrained(safe_serialization=False) writes it."""
    folder = tmp_path_factory.mktemp("pipe") / "ddpm"
    unet = _unet()
    pipe = diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(num_train_timesteps=10))
    pipe.save_pretrained(folder, safe_serialization=False)
    assert (folder / "unet" / "diffusion_pytorch_model.bin").is_file()  # what the library wrote
    return folder, _unet_output(unet)


def _check_pipeline(out: Path, expected: torch.Tensor) -> None:
    assert not [n for n in _tree(out) if n.endswith(".bin")]
    assert "unet/diffusion_pytorch_model.safetensors" in _tree(out)
    assert "scheduler/scheduler_config.json" in _tree(out) and "model_index.json" in _tree(out)
    loaded = diffusers.DiffusionPipeline.from_pretrained(out, use_safetensors=True, local_files_only=True)
    assert type(loaded).__name__ == "DDPMPipeline"
    assert same_bits(_unet_output(loaded.unet), expected)


def test_diffusers_pipeline_converts_whole_with_convert_batch_and_prepare_upload(pipeline, tmp_path: Path) -> None:
    src, expected = pipeline
    result = _cli("convert", str(src), str(tmp_path / "converted"))
    assert result.returncode == 0, result.stderr
    assert "unet/diffusion_pytorch_model.safetensors" in result.stdout
    _check_pipeline(tmp_path / "converted", expected)

    root = tmp_path / "tree"
    root.mkdir()
    shutil.copytree(src, root / "ddpm")
    results = list(converter.convert_tree(root, tmp_path / "tree-out", workers=1))
    assert [(r.item, r.status) for r in results] == [("ddpm", "converted")]  # one item, not unet/ alone
    _check_pipeline(tmp_path / "tree-out" / "ddpm", expected)
    again = list(converter.convert_tree(root, tmp_path / "tree-out", workers=1))
    assert [r.status for r in again] == ["unchanged"]

    report = converter.prepare_upload(src, tmp_path / "upload")
    statuses = {c.name: c.status for c in report.checks}
    assert report.ok and statuses["pickles"] == "pass" and statuses["from_pretrained"] == "pass", report.checks
    assert "DDPMPipeline" in next(c.summary for c in report.checks if c.name == "from_pretrained")
    assert report.plan is not None and report.plan.delete == ["unet/diffusion_pytorch_model.bin"]
    assert "unet/diffusion_pytorch_model.safetensors" in [f.path for f in report.plan.add]
    _check_pipeline(tmp_path / "upload", expected)


def test_a_subfolder_no_manifest_names_is_not_part_of_the_model(pipeline, tmp_path: Path) -> None:
    src, expected = pipeline
    shutil.copytree(src, tmp_path / "pipe")
    (tmp_path / "pipe" / "checkpoint-10").mkdir()  # a training run left beside the components
    torch.save({"w": torch.ones(2)}, tmp_path / "pipe" / "checkpoint-10" / "pytorch_model.bin")
    report = converter.convert_folder(tmp_path / "pipe", tmp_path / "out")
    assert report.files == ["unet/diffusion_pytorch_model.safetensors"]
    assert report.warnings == ["subfolders not carried over: checkpoint-10"]
    assert not (tmp_path / "out" / "checkpoint-10").exists()
    _check_pipeline(tmp_path / "out", expected)
    from converter.batch import discover

    shutil.copytree(tmp_path / "pipe", tmp_path / "tree" / "pipe")
    items = {i.key: i.kind for i in discover(tmp_path / "tree", tmp_path / "tree-out")}
    assert items == {"pipe": "folder", "pipe/checkpoint-10": "folder"}  # the run is an item of its own
    upload = converter.prepare_upload(tmp_path / "pipe", tmp_path / "upload")
    assert upload.ok and upload.plan is not None and upload.plan.delete == ["unet/diffusion_pytorch_model.bin"]
    assert any("subfolders are not carried over: checkpoint-10/" in d for c in upload.checks for d in c.details)


def test_a_pipeline_whose_component_lacks_a_weight_fails_the_load_check(pipeline, tmp_path: Path) -> None:
    """DiffusionPipeline.from_pretrained only warns when a weight is missing: each component's keys are checked."""
    src, _ = pipeline
    converter.convert_folder(src, tmp_path / "st")
    weights = tmp_path / "st" / "unet" / "diffusion_pytorch_model.safetensors"
    state = safetensors.torch.load_file(weights)
    state["extra"] = state.pop("conv_in.bias")
    safetensors.torch.save_file(state, weights, metadata={"format": "pt"})
    report = converter.prepare_upload(tmp_path / "st", tmp_path / "upload")
    load_check = next(c for c in report.checks if c.name == "from_pretrained")
    assert not report.ok and load_check.status == "fail" and not (tmp_path / "upload").exists()
    assert load_check.details == ["missing: unet/conv_in.bias", "unexpected: unet/extra"]


def test_a_pipeline_appears_whole_or_not_at_all(pipeline, tmp_path: Path) -> None:
    src, _ = pipeline
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    index = json.loads((broken / "model_index.json").read_text())
    index["vae"] = ["diffusers", "AutoencoderKL"]
    (broken / "model_index.json").write_text(json.dumps(index))
    result = _cli("convert", str(broken), str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"tiesafe: error: {broken / 'model_index.json'}: names component 'vae', whose folder is missing"
    ]
    assert not (tmp_path / "out").exists()

    (broken / "vae").mkdir()  # the component is there now, but its pickle is damaged: unet must not appear
    (broken / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"PK\x03\x04 not a zip")
    result = _cli("convert", str(broken), str(tmp_path / "out"))
    assert result.returncode == 2 and "vae/diffusion_pytorch_model.bin" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def sharded_unet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """ModelMixin.save_pretrained(safe_serialization=False, max_shard_size=...) and its fp16 variant."""
    folder = tmp_path_factory.mktemp("unet") / "unet"
    unet = _unet()
    unet.save_pretrained(folder, safe_serialization=False, max_shard_size="40KB")
    unet.half().save_pretrained(folder, safe_serialization=False, max_shard_size="40KB", variant="fp16")
    names = _tree(folder)
    assert "diffusion_pytorch_model.bin.index.json" in names and "diffusion_pytorch_model.bin.index.fp16.json" in names
    # the variant's shards, as diffusers names them
    assert any(n.startswith("diffusion_pytorch_model.fp16-00001-of-0000") and n.endswith(".bin") for n in names)
    return folder, _unet_output(_unet())


def test_diffusers_sharded_model_and_variant(sharded_unet, tmp_path: Path) -> None:
    src, expected = sharded_unet
    report = converter.convert_folder(src, tmp_path / "out", max_shard_size="40KB")
    written = set(report.files)
    assert {conventions.index_name("diffusion_pytorch_model", v) for v in (None, "fp16")} <= written
    assert any(n.startswith("diffusion_pytorch_model.fp16-00001-of-") for n in written)
    loaded = diffusers.UNet2DModel.from_pretrained(tmp_path / "out", use_safetensors=True, local_files_only=True)
    assert same_bits(_unet_output(loaded), expected)
    half = diffusers.UNet2DModel.from_pretrained(
        tmp_path / "out", use_safetensors=True, local_files_only=True, variant="fp16", torch_dtype=torch.float16
    )
    original = _unet().half().state_dict()
    assert all(same_bits(half.state_dict()[n], t) for n, t in original.items())

    tree = tmp_path / "tree"
    tree.mkdir()
    shutil.copytree(src, tree / "unet")
    results = list(converter.convert_tree(tree, tmp_path / "tree-out", workers=1, max_shard_size="40KB"))
    assert [(r.item, r.status) for r in results] == [("unet", "converted")]
    assert set(_tree(tmp_path / "tree-out" / "unet")) == set(_tree(tmp_path / "out"))

    upload = converter.prepare_upload(src, tmp_path / "upload", max_shard_size="40KB")
    assert upload.ok, upload.checks
    assert {c.name: c.status for c in upload.checks}["from_pretrained"] == "pass"
    assert upload.plan is not None and "diffusion_pytorch_model.bin.index.fp16.json" in upload.plan.delete


def test_a_legacy_variant_index_of_diffusers_is_read(sharded_unet, tmp_path: Path) -> None:
    """diffusers before 0.27 named a variant's index STEM.bin.VARIANT.index.json; current diffusers still reads it."""
    src, _ = sharded_unet
    legacy = tmp_path / "legacy"
    shutil.copytree(src, legacy)
    (legacy / "diffusion_pytorch_model.bin.index.fp16.json").rename(
        legacy / "diffusion_pytorch_model.bin.fp16.index.json"
    )
    report = converter.convert_folder(legacy, delete_source=True, max_shard_size="40KB")
    assert "diffusion_pytorch_model.safetensors.index.fp16.json" in report.files
    assert "diffusion_pytorch_model.bin.fp16.index.json" in report.deleted
    assert not [n for n in _tree(legacy) if n.endswith(".bin") or ".bin." in n]  # converted in place, pickles gone
    half = diffusers.UNet2DModel.from_pretrained(legacy, variant="fp16", torch_dtype=torch.float16)
    assert all(same_bits(half.state_dict()[n], t) for n, t in _unet().half().state_dict().items())


def test_an_index_naming_a_missing_shard_is_one_line_and_no_output(sharded_unet, tmp_path: Path) -> None:
    src, _ = sharded_unet
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    weight_map = json.loads((broken / "diffusion_pytorch_model.bin.index.json").read_text())["weight_map"]
    missing = sorted(set(weight_map.values()))[1]
    (broken / missing).unlink()
    result = _cli("convert", str(broken), str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr == (
        f"tiesafe: error: {broken / 'diffusion_pytorch_model.bin.index.json'}: "
        f"index names {missing!r}, which is missing\n"
    )
    assert not (tmp_path / "out").exists()


def test_sentence_transformers_with_a_dense_module(tmp_path: Path) -> None:
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.sentence_transformer import modules as models
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(config).save_pretrained(tmp_path / "bert")
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]))
    modules = [models.Transformer(str(tmp_path / "bert")), models.Pooling(16), models.Dense(16, 4)]
    model = st.SentenceTransformer(modules=modules, device="cpu")
    src = tmp_path / "st"
    model.save(str(src), safe_serialization=False)
    # Dense wrote a pickle; the root module is transformers', which (version 5) writes safetensors only:
    # torch.save writes it under the name transformers 4 wrote, pytorch_model.bin.
    assert (src / "2_Dense" / "pytorch_model.bin").is_file() and (src / "modules.json").is_file()
    torch.save(safetensors.torch.load_file(src / "model.safetensors"), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    expected = model.encode(["a b", "b"], convert_to_tensor=True)

    result = _cli("convert", str(src), str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert {"model.safetensors", "2_Dense/model.safetensors", "1_Pooling/config.json"} <= set(_tree(tmp_path / "out"))
    loaded = st.SentenceTransformer(str(tmp_path / "out"), device="cpu", local_files_only=True)
    assert same_bits(loaded.encode(["a b", "b"], convert_to_tensor=True), expected)

    (tmp_path / "tree").mkdir()
    shutil.copytree(src, tmp_path / "tree" / "st")
    results = list(converter.convert_tree(tmp_path / "tree", tmp_path / "tree-out", workers=1))
    assert [(r.item, r.status) for r in results] == [("st", "converted")]
    loaded = st.SentenceTransformer(str(tmp_path / "tree-out" / "st"), device="cpu", local_files_only=True)
    assert same_bits(loaded.encode(["a b", "b"], convert_to_tensor=True), expected)

    report = converter.prepare_upload(src, tmp_path / "upload")
    assert report.ok, report.checks
    assert {c.name: c.status for c in report.checks}["from_pretrained"] == "pass"
    assert report.plan is not None and report.plan.delete == ["2_Dense/pytorch_model.bin", "pytorch_model.bin"]


def test_peft_lora_on_a_tiny_llama(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = llama_tied().eval()
    base.save_pretrained(tmp_path / "base")
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora", safe_serialization=False)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "base")  # a local base: the load check can run
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps(config))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = lora(ids).logits

    def load(folder: Path) -> torch.Tensor:
        fresh = converter_free_base(tmp_path / "base")
        with torch.no_grad():
            return peft.PeftModel.from_pretrained(fresh, folder).eval()(ids).logits

    result = _cli("convert", str(tmp_path / "lora"), str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert _tree(tmp_path / "out") == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert same_bits(load(tmp_path / "out"), expected)

    report = converter.prepare_upload(tmp_path / "lora", tmp_path / "upload")
    assert report.ok, report.checks
    load_check = next(c for c in report.checks if c.name == "from_pretrained")
    assert load_check.status == "pass" and "PEFT LORA on LlamaForCausalLM" in load_check.summary
    assert same_bits(load(tmp_path / "upload"), expected)


def converter_free_base(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def _save_variant(model: torch.nn.Module, folder: Path, variant: str, shards: int) -> None:
    """What transformers 4's save_pretrained(variant=..., safe_serialization=False) wrote; transformers 5
    writes safetensors only, so torch.save writes its names: pytorch_model.fp16.bin, or shards
    pytorch_model.fp16-0000K-of-0000N.bin (each shard saved apart: the tie breaks) with
    pytorch_model.bin.index.fp16.json."""
    folder.mkdir(parents=True)
    state = model.state_dict()
    if shards == 1:
        torch.save(state, folder / f"pytorch_model.{variant}.bin")
    else:
        names = list(state)
        per = -(-len(names) // shards)
        weight_map = {}
        for i in range(shards):
            file = f"pytorch_model.{variant}-{i + 1:05d}-of-{shards:05d}.bin"
            torch.save({n: state[n] for n in names[i * per : (i + 1) * per]}, folder / file)
            weight_map.update(dict.fromkeys(names[i * per : (i + 1) * per], file))
        index = {"metadata": {"total_size": sum(t.nbytes for t in state.values())}, "weight_map": weight_map}
        (folder / f"pytorch_model.bin.index.{variant}.json").write_text(json.dumps(index))
    model.config.save_pretrained(folder)  # config.save_pretrained: model_type, no architectures


@pytest.mark.parametrize("shards", [1, 2])
def test_transformers_fp16_variant_with_a_config_without_architectures(tmp_path: Path, shards: int) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = llama_tied().half().eval()
    _save_variant(model, tmp_path / "src", "fp16", shards)
    assert "architectures" not in json.loads((tmp_path / "src" / "config.json").read_text())

    report = converter.convert_folder(tmp_path / "src", tmp_path / "out", max_shard_size="4KB" if shards > 1 else "5GB")
    if shards == 1:
        assert report.files == ["model.fp16.safetensors"]
    else:
        assert "model.safetensors.index.fp16.json" in report.files
        assert all(re_name.startswith("model.fp16-") for re_name in report.files if re_name.endswith(".safetensors"))
        # the tie the config declares (torch.save of each shard broke it) is found through model_type
        assert [(t.name, t.origin) for t in report.ties] == [("lm_head.weight", "config")]
        assert any("LlamaForCausalLM chosen for model_type 'llama'" in n for n in report.notes)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", variant="fp16", dtype=torch.float16).eval()
    assert all(same_bits(loaded.state_dict()[n], t) for n, t in model.state_dict().items())
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight

    upload = converter.prepare_upload(tmp_path / "src", tmp_path / "upload")
    assert upload.ok, upload.checks
    assert "LlamaForCausalLM" in next(c.summary for c in upload.checks if c.name == "from_pretrained")


def test_timm_and_open_clip_style_folders_get_their_loaders_names(tmp_path: Path) -> None:
    # timm and open_clip need torchvision, which cannot run here: these folders are checked by name
    # (timm's _hub.py and open_clip's constants.py), with torch.save writing what they write.
    torch.manual_seed(0)
    state = {"conv1.weight": torch.randn(4, 3, 3, 3), "fc.weight": torch.randn(2, 4), "fc.bias": torch.zeros(2)}
    timm_dir = tmp_path / "timm"
    timm_dir.mkdir()
    torch.save(state, timm_dir / "pytorch_model.bin")
    (timm_dir / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 2}))
    report = converter.convert_folder(timm_dir, tmp_path / "timm-out")
    assert report.files == ["model.safetensors"] and report.library == "timm"
    loaded = safetensors.torch.load_file(tmp_path / "timm-out" / "model.safetensors")
    assert all(same_bits(loaded[n], t) for n, t in state.items())

    clip_dir = tmp_path / "clip"
    clip_dir.mkdir()
    torch.save(state, clip_dir / "open_clip_pytorch_model.bin")
    (clip_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 4}}))
    report = converter.convert_folder(clip_dir, tmp_path / "clip-out")
    assert report.files == ["open_clip_model.safetensors"] and report.library == "open_clip"
    loaded = safetensors.torch.load_file(tmp_path / "clip-out" / "open_clip_model.safetensors")
    assert all(same_bits(loaded[n], t) for n, t in state.items())

    upload = converter.prepare_upload(timm_dir, tmp_path / "timm-upload")
    load_check = next(c for c in upload.checks if c.name == "from_pretrained")
    assert upload.ok and load_check.status == "warn" and "timm" in load_check.summary


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("pytorch_model.bin", "model.safetensors"),
        ("pytorch_model.fp16.bin", "model.fp16.safetensors"),
        ("pytorch_model-00001-of-00002.bin", "model-00001-of-00002.safetensors"),
        ("pytorch_model.fp16-00001-of-00002.bin", "model.fp16-00001-of-00002.safetensors"),
        ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.safetensors"),
        ("diffusion_pytorch_model.fp16.bin", "diffusion_pytorch_model.fp16.safetensors"),
        ("adapter_model.bin", "adapter_model.safetensors"),
        ("open_clip_pytorch_model.bin", "open_clip_model.safetensors"),
        ("ema.ckpt", "ema.safetensors"),
        ("weights.pth", "weights.safetensors"),
    ],
)
def test_the_conventions_table(name: str, expected: str) -> None:
    assert conventions.converted_name(name) == expected


def test_index_names_of_every_family_and_variant() -> None:
    assert conventions.parse_index_name("pytorch_model.bin.index.fp16.json") == ("pytorch_model", "fp16")
    assert conventions.parse_index_name("diffusion_pytorch_model.bin.fp16.index.json") == (
        "diffusion_pytorch_model",
        "fp16",
    )  # diffusers before 0.27
    assert conventions.index_name("model", "fp16") == "model.safetensors.index.fp16.json"
    assert conventions.index_name("diffusion_pytorch_model") == "diffusion_pytorch_model.safetensors.index.json"


def test_two_pickles_that_would_share_an_output_name_are_refused(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(1)}, tmp_path / "pytorch_model.bin")
    torch.save({"w": torch.ones(1)}, tmp_path / "pytorch_model-00001-of-00001.bin")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TiesafeError, match="would both become"):
        converter.convert_folder(tmp_path, tmp_path / "out")


def test_a_pipeline_component_ties_what_its_own_config_declares(pipeline, tmp_path: Path) -> None:
    """A transformers text encoder inside a pipeline, its shards saved apart (the tie broken): the tie
    its own config.json declares is found and stored once, and transformers loads it tied."""
    from test_folder import _save_sharded
    from transformers import AutoModelForCausalLM

    src, _ = pipeline
    shutil.copytree(src, tmp_path / "pipe")
    torch.manual_seed(0)
    encoder = llama_tied().eval()
    _save_sharded(encoder, tmp_path / "pipe" / "text_encoder")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    index["text_encoder"] = ["transformers", "LlamaForCausalLM"]
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps(index))

    report = converter.convert_folder(tmp_path / "pipe", tmp_path / "out")
    assert [(t.name, t.origin, t.where) for t in report.ties if t.origin == "config"] == [
        ("lm_head.weight", "config", "text_encoder/model")
    ]
    assert (
        "text_encoder/model.safetensors" in report.files and "unet/diffusion_pytorch_model.safetensors" in report.files
    )
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "text_encoder").eval()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert all(same_bits(loaded.state_dict()[n], t) for n, t in encoder.state_dict().items())


def test_a_config_without_architectures_still_refuses_tied_weights_that_differ(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = llama_tied().eval()
    state = {n: t.clone() for n, t in model.state_dict().items()}
    state["lm_head.weight"] += 1  # the config ties it to the embedding, but the bytes differ
    (tmp_path / "src").mkdir()
    torch.save(state, tmp_path / "src" / "pytorch_model.bin")
    model.config.save_pretrained(tmp_path / "src")  # model_type and tie_word_embeddings, no architectures
    report = converter.prepare_upload(tmp_path / "src", tmp_path / "upload")
    assert not report.ok and not (tmp_path / "upload").exists()
    failed = next(c for c in report.checks if c.status == "fail")
    assert "the model ties 'lm_head.weight' to 'model.embed_tokens.weight' but their bytes differ" in failed.summary


def test_the_load_check_names_the_missing_library_or_base(
    pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_folder import _peft_adapter

    from converter import library_checks

    src, _ = pipeline
    real = library_checks.importlib.util.find_spec
    monkeypatch.setattr(
        library_checks.importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a)
    )
    report = converter.prepare_upload(src, tmp_path / "upload")
    load_check = next(c for c in report.checks if c.name == "from_pretrained")
    assert report.ok and load_check.status == "warn"
    assert "diffusers is not installed: pip install 'tiesafe[diffusers]'" in load_check.summary
    monkeypatch.undo()

    custom = tmp_path / "custom"
    shutil.copytree(src, custom)
    index = json.loads((custom / "model_index.json").read_text())
    (custom / "model_index.json").write_text(json.dumps({**index, "_class_name": "MyPipeline"}))
    report = converter.prepare_upload(custom, tmp_path / "custom-upload")
    load_check = next(c for c in report.checks if c.name == "from_pretrained")
    assert report.ok and load_check.status == "warn" and "custom code: tiesafe never runs it" in load_check.summary

    _peft_adapter(tmp_path / "lora")  # its base, tiny-llama, is neither a folder nor in the cache
    report = converter.prepare_upload(tmp_path / "lora", tmp_path / "lora-upload")
    load_check = next(c for c in report.checks if c.name == "from_pretrained")
    assert report.ok and load_check.status == "warn" and "'tiny-llama'" in load_check.summary


def test_a_transformers_copy_beside_an_open_clip_model_is_sharded_as_transformers_loads_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = llama_tied().eval()
    (tmp_path / "src").mkdir()
    torch.save(model.state_dict(), tmp_path / "src" / "pytorch_model.bin")
    torch.save({"visual.proj": torch.randn(4, 4)}, tmp_path / "src" / "open_clip_pytorch_model.bin")
    (tmp_path / "src" / "open_clip_config.json").write_text("{}")
    model.config.architectures = ["LlamaForCausalLM"]
    model.config.save_pretrained(tmp_path / "src")
    report = converter.convert_folder(tmp_path / "src", tmp_path / "out", max_shard_size="4KB")
    assert "open_clip_model.safetensors" in report.files and "model.safetensors.index.json" in report.files
    assert [(t.name, t.origin) for t in report.ties] == [("lm_head.weight", "storage")]
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert all(same_bits(loaded.state_dict()[n], t) for n, t in model.state_dict().items())
