"""Model folders: sharded pickles, ties across shards, other files, sharded output."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers import same_bits
from models import llama_tied
from transformers import AutoModelForCausalLM

import converter
from converter import identical
from converter.errors import TiesafeError


def _save_sharded(model: torch.nn.Module, folder: Path, shards: int = 2) -> dict[str, torch.Tensor]:
    """Save like old transformers did: each shard dict with its own torch.save (ties break)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    names = list(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        part = names[i * per : (i + 1) * per]
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: state[n] for n in part}, folder / file)
        weight_map.update(dict.fromkeys(part, file))
    index = {"metadata": {"total_size": sum(t.nbytes for t in state.values())}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    model.config.architectures = [type(model).__name__]  # as save_pretrained records it
    model.config.save_pretrained(folder)
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "README.md").write_text("# tiny llama\n")
    return state


@pytest.fixture
def llama_folder(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = llama_tied().eval()
    _save_sharded(model, tmp_path / "llama")
    return tmp_path / "llama", model


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[1, 2, 3, 4, 5]])).logits


def test_declared_tie_across_shards_is_stored_once(llama_folder, tmp_path: Path) -> None:
    src, model = llama_folder
    report = converter.convert_folder(src, tmp_path / "out")
    assert [(t.name, t.target, t.origin) for t in report.ties] == [
        ("lm_head.weight", "model.embed_tokens.weight", "config")
    ]
    assert report.bytes_saved == model.lm_head.weight.nbytes
    assert report.files == ["model.safetensors"]
    assert sorted(report.copied) == ["README.md", "config.json", "tokenizer.json"]
    out = Path(report.output)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "tokenizer.json"]
    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(_logits(loaded.eval()), _logits(model))


def test_sharded_output_with_index(llama_folder, tmp_path: Path) -> None:
    src, model = llama_folder
    report = converter.convert_folder(src, tmp_path / "out", max_shard_size="4KiB")
    out = Path(report.output)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards == sorted(f for f in report.files if f.endswith(".safetensors"))
    assert "lm_head.weight" not in index["weight_map"]  # only tensors that are in a file
    stored = {}
    for shard in shards:
        stored.update(safetensors.torch.load_file(out / shard))
    assert set(stored) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in stored.values()) == report.bytes_written
    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(_logits(loaded.eval()), _logits(model))
    state = converter.load_file(out)  # the tie across shards comes back as one tensor
    assert state["lm_head.weight"] is state["model.embed_tokens.weight"]
    assert set(state) == set(model.state_dict())


def test_tensor_larger_than_the_shard_size_gets_its_own_shard(llama_folder, tmp_path: Path) -> None:
    src, model = llama_folder
    embed = model.model.embed_tokens.weight
    report = converter.convert_folder(src, tmp_path / "out", max_shard_size=embed.nbytes - 1)
    out = Path(report.output)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.embed_tokens.weight"]
    assert [n for n, f in index["weight_map"].items() if f == shard] == ["model.embed_tokens.weight"]
    # Every other shard respects the limit.
    for name in set(index["weight_map"].values()) - {shard}:
        assert sum(t.nbytes for t in safetensors.torch.load_file(out / name).values()) <= embed.nbytes - 1


def test_output_is_deterministic(llama_folder, tmp_path: Path) -> None:
    src, _ = llama_folder
    one = Path(converter.convert_folder(src, tmp_path / "one", max_shard_size="8KB").output)
    two = Path(converter.convert_folder(src, tmp_path / "two", max_shard_size="8KB").output)
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    for path in one.iterdir():
        assert path.read_bytes() == (two / path.name).read_bytes(), path.name


@pytest.mark.parametrize("search", [True, False])  # found by the identical-bytes search, or compared alone
def test_declared_tie_with_different_bytes_is_refused_or_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, search: bool
) -> None:
    if not search:
        monkeypatch.setattr(identical, "SEARCH_AT_MOST", 2)  # the tiny Llama has more candidates: skipped
    torch.manual_seed(0)
    model = llama_tied().eval()
    folder = tmp_path / "llama"
    state = _save_sharded(model, folder)
    last = sorted(folder.glob("pytorch_model-*.bin"))[-1]
    part = torch.load(last, weights_only=True)
    part["lm_head.weight"] = state["lm_head.weight"] + 1  # fine-tuned apart
    torch.save(part, last)
    with pytest.raises(TiesafeError, match=r"ties 'lm_head\.weight' to 'model\.embed_tokens\.weight' but their bytes"):
        converter.convert_folder(folder, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()
    report = converter.convert_folder(folder, tmp_path / "out", allow_untied=True)
    assert report.warnings and "both kept" in report.warnings[0]
    assert any("identical bytes not searched" in w for w in report.warnings) is not search
    plain = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(plain["lm_head.weight"], part["lm_head.weight"])


def test_many_small_candidates_are_not_searched_unless_asked_and_the_report_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(identical, "SEARCH_AT_MOST", 8)
    folder = tmp_path / "moe"
    folder.mkdir()
    state = {f"experts.{i}.w": torch.randn(4, 4) for i in range(12)}
    state["experts.12.w"] = state["experts.3.w"].clone()
    torch.save(state, folder / "pytorch_model.bin")
    report = converter.convert_folder(folder, tmp_path / "out")
    assert report.identical == [] and report.stored == 13
    assert report.warnings == [
        "identical bytes not searched: 13 small tensors share a dtype and shape "
        "(--dedup-identical searches them and stores equal ones once)"
    ]
    report = converter.convert_folder(folder, tmp_path / "dedup", dedup_identical=True)
    assert [(t.name, t.target, t.kind) for t in report.ties] == [("experts.12.w", "experts.3.w", "copy")]
    assert report.warnings == [] and report.stored == 12


def test_identical_bytes_are_reported_and_deduplicated_as_copies(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    ones = torch.ones(16)
    state = {"norm1.weight": ones.clone(), "norm2.weight": ones.clone(), "w": torch.randn(4, 4)}
    torch.save(state, folder / "pytorch_model.bin")
    report = converter.convert_folder(folder, tmp_path / "reported")
    assert report.identical == [["norm1.weight", "norm2.weight"]] and report.stored == 3
    report = converter.convert_folder(folder, tmp_path / "dedup", dedup_identical=True)
    assert [(t.name, t.kind, t.origin) for t in report.ties] == [("norm2.weight", "copy", "identical")]
    assert report.stored == 2 and report.bytes_saved == 64
    loaded = converter.load_file(tmp_path / "dedup" / "model.safetensors")
    assert torch.equal(loaded["norm2.weight"], ones)
    assert loaded["norm2.weight"].data_ptr() != loaded["norm1.weight"].data_ptr()  # a copy, not a tie


def test_in_place_conversion_keeps_or_deletes_the_source(llama_folder) -> None:
    src, _ = llama_folder
    pickles = sorted(p.name for p in src.glob("pytorch_model*"))
    report = converter.convert_folder(src)
    assert report.output == str(src) and report.copied == []
    assert sorted(p.name for p in src.glob("pytorch_model*")) == pickles
    with pytest.raises(TiesafeError, match="--overwrite"):
        converter.convert_folder(src)
    report = converter.convert_folder(src, overwrite=True, delete_source=True)
    assert sorted(report.deleted) == pickles
    assert not list(src.glob("pytorch_model*")) and (src / "model.safetensors").exists()


def test_overwrite_with_other_sharding_leaves_no_stale_shards(llama_folder, tmp_path: Path) -> None:
    src, _ = llama_folder
    converter.convert_folder(src, tmp_path / "out", max_shard_size="4KiB")
    converter.convert_folder(src, tmp_path / "out", overwrite=True)
    assert (
        not list((tmp_path / "out").glob("model-*"))
        and not (tmp_path / "out" / "model.safetensors.index.json").exists()
    )


@pytest.mark.parametrize(
    ("files", "message"),
    [([], "no pickle weights"), (["a.pt", "b.pt"], "several pickles and no index")],
)
def test_folders_without_clear_weights_are_refused(tmp_path: Path, files: list[str], message: str) -> None:
    for name in files:
        torch.save({"w": torch.ones(1)}, tmp_path / name)
    with pytest.raises(TiesafeError, match=message):
        converter.convert_folder(tmp_path)


def test_training_leftovers_are_not_weights(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "weights.pt")
    torch.save({"lr": 0.1}, tmp_path / "optimizer.pt")
    torch.save({"x": 1}, tmp_path / "training_args.bin")
    (tmp_path / "logs").mkdir()
    report = converter.convert_folder(tmp_path, tmp_path / "out")
    assert sorted(report.copied) == ["optimizer.pt", "training_args.bin"]
    assert report.warnings == ["subfolders not carried over: logs"]


def test_parse_size() -> None:
    from converter.folder import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size(" 2GiB") == 2 * 2**30 and parse_size("123") == 123
    assert parse_size("1.5mb") == 1_500_000 and parse_size(4096) == 4096
    for bad in ("five gigs", "-1GB", "5 parsecs", True):
        with pytest.raises(TiesafeError, match="not a size"):
            parse_size(bad)  # type: ignore[arg-type]
    with pytest.raises(TiesafeError, match="must be positive"):
        parse_size(0)


def test_cli_converts_a_folder(llama_folder, tmp_path: Path) -> None:
    src, _ = llama_folder
    result = subprocess.run(
        [sys.executable, "-m", "converter", "convert", str(src), str(tmp_path / "out"), "--json"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ties"][0]["origin"] == "config" and report["verified"] is True


def test_declared_ties_are_cached_per_config(llama_folder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from converter import declared

    monkeypatch.setenv("TIESAFE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(declared, "static_ties", lambda config, architecture: None)  # as for code it cannot read
    src, _ = llama_folder
    first = declared.declared_ties(src)
    assert first == [["model.embed_tokens.weight", "lm_head.weight"]]

    def must_not_build(*args: object) -> list[list[str]]:
        raise AssertionError("the cached answer should have been used")

    monkeypatch.setattr(declared, "_build_and_read_ties", must_not_build)
    assert declared.declared_ties(src) == first
    config = json.loads((src / "config.json").read_text())
    config["tie_word_embeddings"] = False  # another config: no cached answer for it
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(AssertionError, match="cached answer"):
        declared.declared_ties(src)


def _peft_adapter(folder: Path) -> dict[str, torch.Tensor]:
    """A LoRA adapter folder as PEFT's save_pretrained(safe_serialization=False) leaves it."""
    torch.manual_seed(3)
    prefix = "base_model.model.model.layers"
    state = {
        f"{prefix}.{layer}.self_attn.{proj}.lora_{ab}.weight": torch.randn((4, 16) if ab == "A" else (16, 4))
        for layer in range(2)
        for proj in ("q_proj", "v_proj")
        for ab in ("A", "B")
    }
    folder.mkdir(parents=True)
    torch.save(state, folder / "adapter_model.bin")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8}
    config |= {"target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "tiny-llama"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "README.md").write_text("# a LoRA adapter\n")
    return state


def test_peft_adapter_becomes_adapter_model_safetensors(tmp_path: Path) -> None:
    """PEFT writes and loads adapter_model.safetensors: a model.safetensors beside adapter_config.json
    would be ignored by PEFT (and taken for a full model by transformers)."""
    state = _peft_adapter(tmp_path / "lora")
    report = converter.convert_folder(tmp_path / "lora", tmp_path / "out")
    assert report.files == ["adapter_model.safetensors"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    loaded = safetensors.torch.load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert loaded.keys() == state.keys()
    assert all(same_bits(loaded[name], tensor) for name, tensor in state.items())


def test_peft_adapter_in_place_refuses_to_overwrite_its_own_output(tmp_path: Path) -> None:
    _peft_adapter(tmp_path / "lora")
    (tmp_path / "lora" / "model.safetensors").write_bytes(b"someone else's file")  # not this output's name
    assert converter.convert_folder(tmp_path / "lora").files == ["adapter_model.safetensors"]
    assert (tmp_path / "lora" / "adapter_model.bin").exists()
    assert (tmp_path / "lora" / "model.safetensors").read_bytes() == b"someone else's file"
    with pytest.raises(TiesafeError, match=r"adapter_model\.safetensors already"):
        converter.convert_folder(tmp_path / "lora")
    assert converter.convert_folder(tmp_path / "lora", overwrite=True).files == ["adapter_model.safetensors"]


def test_peft_adapter_is_never_sharded(tmp_path: Path) -> None:
    state = _peft_adapter(tmp_path / "lora")
    report = converter.convert_folder(tmp_path / "lora", tmp_path / "out", max_shard_size="1KB")
    assert report.files == ["adapter_model.safetensors"]
    assert any("PEFT loads adapter_model.safetensors unsharded" in w for w in report.warnings)
    loaded = safetensors.torch.load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert all(same_bits(loaded[name], tensor) for name, tensor in state.items())


def test_a_sharded_set_is_verified_while_later_shards_are_written(
    llama_folder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first shard's bytes are compared before the last shard is copied (page cache,
    # not disk, for a model larger than RAM); the set is still complete and verified.
    from converter import windows, writer

    src, _ = llama_folder
    monkeypatch.setattr(windows, "SMALL_RANGE", 0)  # one copy and one comparison per tensor
    monkeypatch.setattr(windows, "SMALL_COMPARE", 0)
    first_shard_read = threading.Event()
    trailed: list[bool] = []
    real_copy, real_read = writer._copy_range, windows.read_into

    def shard(fd: int) -> tuple[int, int] | None:
        """(K, N) of a staged model-0000K-of-0000N.safetensors this descriptor writes, if any."""
        found = re.search(r"/\.model-(\d+)-of-(\d+)\.safetensors\.", os.readlink(f"/proc/self/fd/{fd}"))
        return (int(found[1]), int(found[2])) if found else None

    def copy(src_fd: int, dst_fd: int, *args: int) -> None:
        number = shard(dst_fd)
        if number is not None and number[0] == number[1] > 2 and not trailed:  # the last shard begins
            trailed.append(first_shard_read.wait(10))
        real_copy(src_fd, dst_fd, *args)

    def read(fd: int, buffer: memoryview, offset: int) -> None:
        if (shard(fd) or (0, 0))[0] == 1:
            first_shard_read.set()
        real_read(fd, buffer, offset)

    monkeypatch.setattr(writer, "_copy_range", copy)
    monkeypatch.setattr(windows, "read_into", read)
    report = converter.convert_folder(src, tmp_path / "out", max_shard_size="4KiB")
    assert report.verified and len([f for f in report.files if f.endswith(".safetensors")]) > 2
    assert trailed == [True]
