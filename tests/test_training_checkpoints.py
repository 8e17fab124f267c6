"""Training checkpoints as real training code saves them: foreign objects, the right weights, clean names.

Each fixture is written by the real code path: Lightning's ``Trainer.save_checkpoint`` with
OmegaConf hyper-parameters, a ``torch.compile`` wrapper's and a DDP wrapper's own
``state_dict()``, ``argparse``/``numpy`` objects pickled by ``torch.save`` as fairseq does.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from helpers import same_bits

import converter
from converter.errors import TiesafeError, UnsafeCheckpointError, UnsupportedError
from converter.readers import policy


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "converter", *args], capture_output=True, text=True)


class TinyLM(torch.nn.Module):
    """An embedding tied to its output layer, as GPT-2 and nanoGPT tie them."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(16, 8)
        self.block = torch.nn.Linear(8, 8)
        self.lm_head = torch.nn.Linear(8, 16, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(torch.relu(self.block(self.wte(ids))))


def _trained(model: torch.nn.Module) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.randint(0, 16, (2, 5))).sum().backward()
    optimizer.step()
    return optimizer


def _assert_loads_into_bare_model(output: str | Path, reference: dict[str, torch.Tensor]) -> None:
    fresh = TinyLM()
    report = converter.load_model(fresh, output)
    assert not report.missing and not report.unexpected
    assert fresh.lm_head.weight is fresh.wte.weight
    for name, tensor in fresh.state_dict().items():
        assert same_bits(tensor, reference[name]), name


def test_nanogpt_checkpoint_of_a_compiled_model(tmp_path: Path) -> None:
    """nanoGPT's train.py: the compiled model's state dict beside a scalar tensor that must not win."""
    model = TinyLM()
    compiled = torch.compile(model)  # wraps as OptimizedModule; nothing is compiled until it is called
    optimizer = _trained(model)
    checkpoint = {
        "model": compiled.state_dict(),
        "optimizer": optimizer.state_dict(),
        "model_args": {"n_layer": 1, "vocab_size": 16},
        "iter_num": 5000,
        "best_val_loss": torch.tensor(2.5),
        "config": {"dataset": "shakespeare"},
    }
    assert all(name.startswith("_orig_mod.") for name in checkpoint["model"])
    torch.save(checkpoint, tmp_path / "ckpt.pt")

    report = converter.convert_file(tmp_path / "ckpt.pt")
    assert report.wrapper == "model"
    assert report.prefixes_removed == ["'_orig_mod.' (torch.compile)"]
    assert report.aliases == {"lm_head.weight": "wte.weight"}  # the tie follows the renamed names
    assert "best_val_loss: tensor, not part of the weights" in report.skipped
    assert "optimizer: optimizer state" in report.skipped
    _assert_loads_into_bare_model(report.output, model.state_dict())

    kept = converter.convert_file(tmp_path / "ckpt.pt", tmp_path / "kept.safetensors", keep_names=True)
    assert set(safetensors.torch.load_file(kept.output)) == {"_orig_mod.wte.weight", "_orig_mod.block.weight"} | {
        "_orig_mod.block.bias"
    }
    assert converter.verify_file(tmp_path / "ckpt.pt", kept.output, keep_names=True).names == 4


def test_ddp_prefixed_state_dict(tmp_path: Path) -> None:
    """DistributedDataParallel's own state_dict (one gloo process) names every weight 'module.'."""
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = TinyLM()
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        torch.save({"state_dict": wrapped.state_dict(), "epoch": 1}, tmp_path / "ddp.pt")
    finally:
        dist.destroy_process_group()

    result = _cli("convert", str(tmp_path / "ddp.pt"))
    assert result.returncode == 0, result.stderr
    assert "names: removed prefix 'module.' (DistributedDataParallel)" in result.stdout
    _assert_loads_into_bare_model(tmp_path / "ddp.safetensors", model.state_dict())


def test_fairseq_style_checkpoint_with_namespace_and_numpy(tmp_path: Path) -> None:
    """fairseq saves argparse arguments, numpy scalars and extra state beside the model."""
    model = TinyLM()
    optimizer = _trained(model)
    torch.save(
        {
            "args": argparse.Namespace(arch="transformer_lm", lr=[0.0005], max_tokens=4096),
            "model": model.state_dict(),
            "optimizer_history": [{"criterion_name": "CrossEntropyCriterion", "num_updates": 10}],
            "extra_state": {"epoch": 2, "val_loss": np.float64(3.25), "train_iterator": {"epoch": 2}},
            "best_loss": np.float64(3.25),
            "last_optimizer_state": optimizer.state_dict(),
        },
        tmp_path / "checkpoint_best.pt",
    )
    result = _cli("convert", str(tmp_path / "checkpoint_best.pt"))
    assert result.returncode == 0, result.stderr
    assert "args: argparse.Namespace (inert)" in result.stdout
    assert "best_loss: numpy.float64 (inert)" in result.stdout
    assert "last_optimizer_state: optimizer state" in result.stdout
    _assert_loads_into_bare_model(tmp_path / "checkpoint_best.safetensors", model.state_dict())

    strict = _cli("convert", str(tmp_path / "checkpoint_best.pt"), str(tmp_path / "s.safetensors"), "--strict")
    assert strict.returncode == 2 and not (tmp_path / "s.safetensors").exists()
    assert strict.stderr.count("\n") == 1 and "refused: the pickle asks for 'argparse.Namespace'" in strict.stderr

    inspected = _cli("inspect", str(tmp_path / "checkpoint_best.pt"))
    assert inspected.returncode == 0, inspected.stderr
    assert "globals, inert: argparse.Namespace" in inspected.stdout
    assert "globals, tensor machinery: " in inspected.stdout and "torch._utils._rebuild_tensor_v2" in inspected.stdout


def test_lightning_checkpoint_with_omegaconf_hyperparameters(tmp_path: Path) -> None:
    lightning = pytest.importorskip("lightning")  # a test dependency: pip install 'tiesafe[dev]'
    from omegaconf import OmegaConf

    class Module(lightning.LightningModule):
        def __init__(self, cfg: object) -> None:
            super().__init__()
            self.save_hyperparameters(cfg)
            self.model = TinyLM()

        def training_step(self, batch: list[torch.Tensor], index: int) -> torch.Tensor:
            return self.model(batch[0]).sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=0.01)

    module = Module(OmegaConf.create({"lr": 0.01, "model": {"dim": 8}}))
    trainer = lightning.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    data = torch.utils.data.TensorDataset(torch.randint(0, 16, (4, 5)))
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    trainer.save_checkpoint(tmp_path / "last.ckpt")

    result = _cli("convert", str(tmp_path / "last.ckpt"), "--strip-prefix", "model.")
    assert result.returncode == 0, result.stderr
    assert "weights: the state dict under state_dict" in result.stdout
    assert "hyper_parameters: omegaconf.dictconfig.DictConfig (inert)" in result.stdout
    assert "optimizer_states: optimizer state" in result.stdout
    assert "tied: lm_head.weight = wte.weight" in result.stdout
    _assert_loads_into_bare_model(tmp_path / "last.safetensors", module.model.state_dict())
    # Lightning's own loader reads the checkpoint we converted from: same weights.
    reloaded = Module.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=False)
    loaded = converter.load_file(tmp_path / "last.safetensors")
    assert all(same_bits(loaded[n], t) for n, t in reloaded.model.state_dict().items())


def test_two_state_dicts_of_weight_size_ask_for_key(tmp_path: Path) -> None:
    """timm / torchvision references save the EMA weights beside the model's."""
    model, ema = TinyLM(), TinyLM()
    torch.save({"state_dict": model.state_dict(), "state_dict_ema": ema.state_dict(), "epoch": 3}, tmp_path / "t.pth")
    result = _cli("convert", str(tmp_path / "t.pth"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "several state dicts: 'state_dict' (4 tensors, 800 B), 'state_dict_ema' (4 tensors, 800 B)" in result.stderr
    assert "--key" in result.stderr and not (tmp_path / "t.safetensors").exists()
    report = converter.convert_file(tmp_path / "t.pth", key="state_dict_ema")
    assert report.skipped == ["state_dict: dict of 4", "epoch: int"]
    _assert_loads_into_bare_model(report.output, ema.state_dict())


def test_strip_prefix_collision_names_both(tmp_path: Path) -> None:
    torch.save({"model.w": torch.ones(2), "w": torch.zeros(2)}, tmp_path / "c.pt")
    with pytest.raises(TiesafeError, match=r"makes 'model\.w' and 'w' both 'w'.*--keep-names"):
        converter.convert_file(tmp_path / "c.pt", strip_prefix=["model."])
    with pytest.raises(TiesafeError, match=r"no name starts with 'modle\.'"):
        converter.convert_file(tmp_path / "c.pt", strip_prefix=["modle."])
    assert not (tmp_path / "c.safetensors").exists()


def test_a_pickled_module_is_refused_naming_where_the_tensors_are(tmp_path: Path) -> None:
    torch.save({"model": TinyLM(), "epoch": 1}, tmp_path / "whole.pt")
    with pytest.raises(TiesafeError, match=r"tensors are inside pickled objects \(model\).*state_dict\(\)"):
        converter.convert_file(tmp_path / "whole.pt")


def test_placeholder_only_state_dict_is_an_error_never_an_empty_file(tmp_path: Path) -> None:
    """DeepSpeed ZeRO-3's model states hold empty placeholders (layout as DeepSpeed 0.19 writes it).

    A look-alike: tests/test_training_runs.py reads the files DeepSpeed itself writes.
    """
    names = ["wte.weight", "block.weight"]
    torch.save(
        {
            "module": collections.OrderedDict((n, torch.empty(0)) for n in names),
            "param_shapes": [collections.OrderedDict((n, torch.Size([16, 8])) for n in names)],
            "ds_version": "0.19.0",
        },
        tmp_path / "zero_pp_rank_0_mp_rank_00_model_states.pt",
    )
    with pytest.raises(UnsupportedError, match=r"DeepSpeed ZeRO-3 model-states file.*optimizer partitions"):
        converter.convert_file(tmp_path / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    torch.save({"model": {"a": torch.empty(0), "b": torch.empty(0, 4)}}, tmp_path / "empty.pt")
    with pytest.raises(TiesafeError, match="holds only empty tensors"):
        converter.convert_file(tmp_path / "empty.pt")
    assert not list(tmp_path.glob("*.safetensors"))


class _Call:
    """Pickles as ``func(*args)``: a payload inside an otherwise valid training checkpoint."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.func, self.args


class _CallableCall(_Call):
    """A call whose result is called in turn: pickle only accepts a callable in a call's first place."""

    def __call__(self, *args: object) -> None:
        raise AssertionError("never called: it only stands in the pickle")


def _payloads(sentinel: Path) -> dict[str, tuple[object, str]]:
    import importlib
    import pickle
    import runpy
    import timeit

    touch = f"open({str(sentinel)!r}, 'w').write('ran')"
    script = sentinel.with_name("script.py")
    script.write_text(touch)
    inner = sentinel.with_name("inner.pt")
    inner.write_bytes(pickle.dumps(_Call(os.system, f"touch {sentinel}")))
    getattr_chain = _CallableCall(getattr, _Call(importlib.import_module, "os"), "system")
    return {
        "os.system": (_Call(os.system, f"touch {sentinel}"), "posix.system"),
        "getattr-chain": (_Call(getattr_chain, f"touch {sentinel}"), "builtins.getattr"),
        "import_module": (_Call(importlib.import_module, "antigravity"), "importlib.import_module"),
        "runpy": (_Call(runpy.run_path, str(script)), "runpy.run_path"),
        "torch.load": (_Call(torch.load, str(inner)), "torch.serialization.load"),
        "timeit": (_Call(timeit.timeit, touch), "timeit.timeit"),
        "pickle.loads": (_Call(pickle.loads, inner.read_bytes()), "pickle.loads"),
    }


@pytest.mark.parametrize(
    "kind", ["os.system", "getattr-chain", "import_module", "runpy", "torch.load", "timeit", "pickle.loads"]
)
def test_payloads_beside_real_weights_are_refused(tmp_path: Path, kind: str) -> None:
    sentinel = tmp_path / "sentinel"
    payload, name = _payloads(sentinel)[kind]
    model = TinyLM()
    torch.save({"model": model.state_dict(), "args": payload, "epoch": 1}, tmp_path / "ckpt.pt")
    result = _cli("convert", str(tmp_path / "ckpt.pt"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"refused: the pickle calls '{name}'" in result.stderr and "this file tries to run code" in result.stderr
    assert not sentinel.exists() and not (tmp_path / "ckpt.safetensors").exists()
    inspected = _cli("inspect", str(tmp_path / "ckpt.pt"))
    assert inspected.returncode == 0 and f"globals, refused: {name}" in inspected.stdout
    assert "convert refuses this file" in inspected.stdout and not sentinel.exists()


def test_a_global_the_list_misses_is_still_inert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dangerous list is a verdict on intent, not the safety: drop 'os' from it and os.system stays uncalled."""
    sentinel = tmp_path / "sentinel"
    torch.save({"model": TinyLM().state_dict(), "args": _Call(os.system, f"touch {sentinel}")}, tmp_path / "ckpt.pt")
    with pytest.raises(UnsafeCheckpointError):
        converter.convert_file(tmp_path / "ckpt.pt")
    for module in ("os", "posix"):
        monkeypatch.delitem(policy.DANGEROUS_MODULES, module)
    report = converter.convert_file(tmp_path / "ckpt.pt")
    assert "args: posix.system (inert)" in report.skipped
    assert not sentinel.exists()
    # The payload is live: torch's full unpickler runs it.
    torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert sentinel.exists()


def test_nested_dicts_megatron_style_ask_for_key_then_flatten(tmp_path: Path) -> None:
    """Megatron-LM nests its state dict (language_model/embedding/...): never silently only the largest part.

    A look-alike of model_optim_rng.pt's layout: Megatron does not run on this machine's CPU build.
    """
    encoder = {f"layers.{i}.mlp.weight": torch.randn(32, 32) for i in range(4)}
    model = {"language_model": {"embedding": {"word_embeddings": {"weight": torch.randn(64, 32)}}, "encoder": encoder}}
    torch.save(
        {"model": model, "args": argparse.Namespace(num_layers=4), "rng_state": [{"random_rng_state": (3, ())}]},
        tmp_path / "model_optim_rng.pt",
    )
    with pytest.raises(TiesafeError, match=r"several state dicts: 'model/language_model/encoder' .*dotted names"):
        converter.convert_file(tmp_path / "model_optim_rng.pt")
    report = converter.convert_file(tmp_path / "model_optim_rng.pt", key="model")
    loaded = safetensors.torch.load_file(report.output)
    assert same_bits(
        loaded["language_model.embedding.word_embeddings.weight"],
        model["language_model"]["embedding"]["word_embeddings"]["weight"],
    )
    assert all(same_bits(loaded[f"language_model.encoder.{n}"], t) for n, t in encoder.items())
    assert len(loaded) == 5 and "rng_state: RNG state" in report.skipped


def test_a_trainers_optimizer_and_rng_files_are_not_weights(tmp_path: Path) -> None:
    """transformers' Trainer writes optimizer.pt and rng_state.pth beside the weights, with its own save calls."""
    import random

    model = TinyLM()
    optimizer = _trained(model)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")  # Trainer._save_optimizer_and_scheduler
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    torch.save(rng, tmp_path / "rng_state.pth")  # Trainer._save_rng_state
    with pytest.raises(TiesafeError, match="optimizer's state"):
        converter.convert_file(tmp_path / "optimizer.pt")
    with pytest.raises(TiesafeError, match="saved RNG state"):
        converter.convert_file(tmp_path / "rng_state.pth")
    assert not list(tmp_path.glob("*.safetensors"))
