"""Export: live state dicts and modules saved with their ties (converter.save_file / save_model)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from helpers import same_bits, shares_memory
from models import BUILDERS, Seed

import converter
from converter import export
from converter.errors import UnsupportedError, VerificationError
from converter.stfile import read_safetensors
from converter.ties import TieRecord, View


class FusedQKV(torch.nn.Module):
    """Attention projections kept as q/k/v parameters that are views of one fused qkv."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.qkv = torch.nn.Parameter(torch.randn(3 * d, d))
        self.q = torch.nn.Parameter(self.qkv.data[0:d])
        self.k = torch.nn.Parameter(self.qkv.data[d : 2 * d])
        self.v = torch.nn.Parameter(self.qkv.data[2 * d :])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = x @ self.q.T, x @ self.k.T, x @ self.v.T
        return torch.softmax(q @ k.T, dim=-1) @ v


class FlatParams(torch.nn.Module):
    """Two linear layers whose parameters are views of one flat buffer (FSDP/DeepSpeed style)."""

    def __init__(self, persistent: bool = True) -> None:
        super().__init__()
        flat = torch.randn(4 * 6 + 4 + 3 * 4 + 3)
        self.register_buffer("flat", flat, persistent=persistent)
        self.w1 = torch.nn.Parameter(flat[0:24].view(4, 6))
        self.b1 = torch.nn.Parameter(flat[24:28])
        self.w2 = torch.nn.Parameter(flat[28:40].view(3, 4))
        self.b2 = torch.nn.Parameter(flat[40:43])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, self.w1, self.b1)), self.w2, self.b2)


def _patterns() -> dict[str, Callable[[], dict[str, torch.Tensor]]]:
    def qkv() -> dict[str, torch.Tensor]:
        fused = torch.randn(12, 4)
        return {"qkv": fused, "q": fused[0:4], "k": fused[4:8], "v": fused[8:12]}

    def transpose() -> dict[str, torch.Tensor]:
        w = torch.randn(3, 5)
        return {"w": w, "wt": w.t(), "col": w[:, 1]}

    def overlapping() -> dict[str, torch.Tensor]:
        flat = torch.randn(20)
        return {"x": flat[0:12], "y": flat[6:18], "z": torch.randn(2)}

    def flat_buffer() -> dict[str, torch.Tensor]:
        flat = torch.randn(30)
        return {"w1": flat[0:10].view(2, 5), "w2": flat[10:25].view(3, 5), "b": flat[25:30]}

    def aliased_transpose() -> dict[str, torch.Tensor]:
        t = torch.randn(4, 3).t()
        return {"t1": t, "t2": t}

    def partial_storage() -> dict[str, torch.Tensor]:
        big = torch.randn(1000)
        return {"head": big[:10], "tail": big[990:]}

    def dtypes() -> dict[str, torch.Tensor]:
        base = torch.randn(6, 4)
        out = {name: base.to(getattr(torch, name)) for name in ("bfloat16", "float16", "float64", "complex64")}
        out |= {"i8": torch.arange(-4, 4, dtype=torch.int8), "u8": torch.arange(8, dtype=torch.uint8)}
        out |= {"mask": base > 0, "f8": base.to(torch.float8_e4m3fn), "i64": torch.arange(5)}
        out |= {"scalar": torch.tensor(-0.0), "empty": torch.zeros(0, 3), "nan": torch.tensor([float("nan")])}
        h = out["float16"]
        out["float16_row"] = h[2]  # a view in a narrow dtype
        return out

    def seed_module() -> dict[str, torch.Tensor]:
        return Seed().state_dict()

    def fused_module() -> dict[str, torch.Tensor]:
        return FusedQKV().state_dict()

    def flat_module() -> dict[str, torch.Tensor]:
        return FlatParams().state_dict()

    return {f.__name__: f for f in (qkv, transpose, overlapping, flat_buffer, aliased_transpose, partial_storage)} | {
        f.__name__: f for f in (dtypes, seed_module, fused_module, flat_module)
    }


PATTERNS = _patterns()


def _converted(state: dict[str, torch.Tensor], folder: Path, **options: object) -> bytes:
    """What `tiesafe convert` writes for torch.save(state)."""
    torch.save(state, folder / "source.pt")
    report = converter.convert_file(folder / "source.pt", folder / "converted.safetensors", **options)  # type: ignore[arg-type]
    return Path(report.output).read_bytes()


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_save_file_equals_convert_of_torch_save(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    state = PATTERNS[name]()
    report = converter.save_file(state, tmp_path / "live.safetensors")
    assert report.verified and report.tensors == len(state)
    assert (tmp_path / "live.safetensors").read_bytes() == _converted(state, tmp_path)
    loaded = converter.load_file(tmp_path / "live.safetensors")
    assert set(loaded) == set(state)
    assert all(same_bits(loaded[n], t) for n, t in state.items())


@pytest.mark.parametrize("model", sorted(BUILDERS))
def test_save_model_of_tiny_transformers_equals_convert(model: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = BUILDERS[model]()
    report = converter.save_model(module, tmp_path / "live.safetensors")
    assert report.aliases  # every one of these models ties its embeddings
    assert (tmp_path / "live.safetensors").read_bytes() == _converted(module.state_dict(), tmp_path)


def test_options_give_the_same_bytes_as_convert(tmp_path: Path) -> None:
    state = PATTERNS["qkv"]() | PATTERNS["overlapping"]()
    metadata = {"author": "tests", "step": "100"}
    converter.save_file(state, tmp_path / "live.safetensors", metadata, materialize_views=True)
    expected = _converted(state, tmp_path, metadata=metadata, materialize_views=True)
    assert (tmp_path / "live.safetensors").read_bytes() == expected
    assert read_safetensors(tmp_path / "live.safetensors").metadata["author"] == "tests"


def test_storages_are_told_apart_by_identity_not_address(tmp_path: Path) -> None:
    """Two storages over one numpy buffer are two storages to torch.save, so to export too."""
    array = np.arange(8, dtype=np.float32)
    state = {"a": torch.from_numpy(array), "b": torch.from_numpy(array), "e1": torch.zeros(0), "e2": torch.zeros(0)}
    assert state["a"].data_ptr() == state["b"].data_ptr()
    report = converter.save_file(state, tmp_path / "x.safetensors")
    assert report.aliases == {} and report.stored == 4
    assert (tmp_path / "x.safetensors").read_bytes() == _converted(state, tmp_path)


def test_drop_in_for_safetensors_save_file(tmp_path: Path) -> None:
    plain = {"embedding": torch.randn(8, 4), "attention": torch.randn(4, 4)}
    converter.save_file(plain, str(tmp_path / "ours.safetensors"), {"note": "hi"})  # same positional call
    ours = safetensors.torch.load_file(tmp_path / "ours.safetensors")
    assert all(same_bits(ours[k], v) for k, v in plain.items())
    w = torch.randn(4, 4)
    shared = {"w": w, "w_again": w, "row": w[1]}
    with pytest.raises(RuntimeError):  # safetensors refuses shared memory ...
        safetensors.torch.save_file(shared, tmp_path / "theirs.safetensors")
    report = converter.save_file(shared, tmp_path / "ours.safetensors")  # ... tiesafe records it
    assert report.aliases == {"w_again": "w"} and report.views == ["row"]
    assert report.bytes_written == w.nbytes


def test_save_model_takes_what_safetensors_save_model_refuses(tmp_path: Path) -> None:
    module = FlatParams(persistent=False)  # slices of a buffer that is not in the state dict
    with pytest.raises(RuntimeError, match="None is covering the entire storage"):
        safetensors.torch.save_model(module, str(tmp_path / "theirs.safetensors"))
    report = converter.save_model(module, tmp_path / "ours.safetensors", None, True)  # same positional call
    assert report.stored == 4 and [g.kind for g in report.groups] == ["disjoint"]
    plain = safetensors.torch.load_file(tmp_path / "ours.safetensors")
    assert all(same_bits(plain[k], v) for k, v in module.state_dict().items())


# --------------------------------------------------------------------------- round trips


def _reload(build: Callable[[], torch.nn.Module], path: Path) -> torch.nn.Module:
    """A fresh module (other weights) loaded with converter.load_model: ties rebuilt from the file."""
    torch.manual_seed(1234)
    fresh = build().eval()
    report = converter.load_model(fresh, path)
    assert not report.missing and not report.unexpected and not report.conflicts
    return fresh


def test_seed_module_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = Seed()
    report = converter.save_model(module, tmp_path / "seed.safetensors")
    assert report.aliases == {"b.weight": "a.weight", "b.bias": "a.bias"}
    loaded = converter.load_file(tmp_path / "seed.safetensors")
    assert loaded["b.weight"] is loaded["a.weight"] and loaded["b.bias"] is loaded["a.bias"]
    x = torch.randn(3, 4)
    assert torch.equal(_reload(Seed, tmp_path / "seed.safetensors")(x), module(x))


def test_fused_qkv_module_round_trip_keeps_views(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = FusedQKV()
    report = converter.save_model(module, tmp_path / "attn.safetensors")
    assert report.views == ["k", "q", "v"] and report.stored == 1
    fresh = _reload(FusedQKV, tmp_path / "attn.safetensors")
    for name in ("q", "k", "v"):
        assert shares_memory(getattr(fresh, name), fresh.qkv)
    with torch.no_grad():
        fresh.qkv.mul_(2)  # writes through the fused tensor reach the views, as in the source module
        module.qkv.mul_(2)
    x = torch.randn(5, 8)
    assert torch.equal(fresh(x), module(x))


def test_flat_parameter_module_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = FlatParams()
    report = converter.save_model(module, tmp_path / "flat.safetensors")
    assert report.stored == 1 and sorted(report.views) == ["b1", "b2", "w1", "w2"]
    fresh = _reload(FlatParams, tmp_path / "flat.safetensors")
    assert all(shares_memory(p, fresh.flat) for p in fresh.parameters())
    x = torch.randn(2, 6)
    assert torch.equal(fresh(x), module(x))


def test_gpt2_round_trip_identical_logits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = BUILDERS["gpt2"]().eval()
    converter.save_model(model, tmp_path / "gpt2.safetensors")
    loaded = converter.load_file(tmp_path / "gpt2.safetensors")
    assert loaded["lm_head.weight"] is loaded["transformer.wte.weight"]
    fresh = _reload(BUILDERS["gpt2"], tmp_path / "gpt2.safetensors")
    assert fresh.lm_head.weight is fresh.transformer.wte.weight
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


# --------------------------------------------------------------------------- sharded and folder output


def test_sharded_output_with_index_and_ties_in_their_shard(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = BUILDERS["gpt2"]()
    state = model.state_dict()
    out = tmp_path / "gpt2"
    report = converter.save_model(model, out, max_shard_size=5000)
    index_text = (out / "model.safetensors.index.json").read_text()
    index = json.loads(index_text)
    assert index_text == json.dumps(index, indent=2, sort_keys=True) + "\n"
    assert report.output == str(out / "model.safetensors.index.json")
    assert index["metadata"]["total_size"] == report.bytes_written
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in out.iterdir()) == sorted([*shards, "model.safetensors.index.json"])
    assert "lm_head.weight" not in index["weight_map"]  # a tie is never in the weight map
    names: dict[str, torch.Tensor] = {}
    for shard in shards:
        part = converter.load_file(out / shard)  # each shard validates and loads on its own
        assert set(part).isdisjoint(names)
        names |= part
        stored = {n for n, f in index["weight_map"].items() if f == shard}
        assert set(safetensors.torch.load_file(out / shard)) == stored
    assert set(names) == set(state) and all(same_bits(names[n], t) for n, t in state.items())
    wte_shard = index["weight_map"]["transformer.wte.weight"]
    assert "lm_head.weight" in converter.load_file(out / wte_shard)


def test_shards_keep_views_and_overlap_spans_with_their_base(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = torch.nn.ModuleDict({"attn": FusedQKV(), "mlp": FlatParams(), "head": Seed()})
    flat = torch.randn(64)
    module.register_buffer("x", flat[0:40])
    module.register_buffer("y", flat[20:60])  # overlaps x: stored as a hidden span
    state = module.state_dict()
    report = converter.save_model(module, tmp_path / "out.safetensors", max_shard_size=200)
    index = json.loads((tmp_path / "out.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and report.views
    loaded: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        assert shard.startswith("out-0000")
        loaded |= converter.load_file(tmp_path / shard)
    assert set(loaded) == set(state) and all(same_bits(loaded[n], t) for n, t in state.items())
    assert shares_memory(loaded["x"], loaded["y"]) and shares_memory(loaded["attn.q"], loaded["attn.qkv"])


def test_an_empty_state_dict_gives_an_empty_file(tmp_path: Path) -> None:
    converter.save_file({}, tmp_path / "empty.safetensors", {"note": "nothing yet"})
    assert converter.load_file(tmp_path / "empty.safetensors") == {}
    assert read_safetensors(tmp_path / "empty.safetensors").metadata["note"] == "nothing yet"


def test_an_existing_folder_gets_model_safetensors_and_stale_files_go(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = BUILDERS["gpt2"]()
    converter.save_model(model, tmp_path, max_shard_size="5KB")
    (tmp_path / "config.json").write_text("{}")
    assert (tmp_path / "model.safetensors.index.json").exists()
    report = converter.save_model(model, tmp_path)  # a folder: default 5GB shards, so one file
    assert report.output == str(tmp_path / "model.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert (tmp_path / "model.safetensors").read_bytes() == _converted(model.state_dict(), tmp_path)


# --------------------------------------------------------------------------- refused input


def test_meta_tensors_are_named(tmp_path: Path) -> None:
    with torch.device("meta"):
        model = BUILDERS["gpt2"]()
    with pytest.raises(UnsupportedError, match=r"meta device.*'transformer\.wte\.weight'.*more") as caught:
        converter.save_model(model, tmp_path / "x.safetensors")
    assert str(caught.value).startswith(str(tmp_path / "x.safetensors"))
    state = {"ok": torch.ones(2), "lazy": torch.empty(3, device="meta")}
    with pytest.raises(UnsupportedError, match="'lazy'"):
        converter.save_file(state, tmp_path / "y.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (torch.zeros(2, dtype=torch.complex128), "complex128"),
        (torch.eye(3).to_sparse(), "sparse_coo"),
        (torch.randn(2, dtype=torch.complex64).conj(), "resolve_conj"),
        ("not a tensor", "is a str, not a tensor"),
    ],
)
def test_what_safetensors_cannot_hold_is_named(value: object, message: str, tmp_path: Path) -> None:
    with pytest.raises(converter.TiesafeError, match=message) as caught:
        converter.save_file({"fine": torch.ones(1), "bad": value}, tmp_path / "x.safetensors")  # type: ignore[dict-item]
    assert "'bad'" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_save_model_skips_and_lists_extra_state(tmp_path: Path) -> None:
    class WithExtra(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))

        def get_extra_state(self) -> object:
            return {"calibration": 3}

        def set_extra_state(self, state: object) -> None:
            pass

    report = converter.save_model(WithExtra(), tmp_path / "x.safetensors")
    assert report.skipped == ["_extra_state"] and report.tensors == 1


def test_same_bytes_in_two_dtypes_are_stored_apart(tmp_path: Path) -> None:
    """torch.save refuses this; export stores each view of the bytes under its own name."""
    w = torch.randn(4)
    state = {"f": w, "i": w.view(torch.int32)}
    report = converter.save_file(state, tmp_path / "x.safetensors")
    assert report.stored == 2 and not report.aliases and not report.views
    loaded = converter.load_file(tmp_path / "x.safetensors")
    assert same_bits(loaded["f"], w) and same_bits(loaded["i"], state["i"])


# --------------------------------------------------------------------------- verification and streaming


def test_a_wrong_byte_is_caught_and_nothing_is_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def corrupt(self: export._LiveSource, fd: int, offset: int) -> None:
        export.pwrite_all(fd, export._host_bytes((self.tensor + 1).contiguous()), offset)

    monkeypatch.setattr(export._LiveSource, "write_into", corrupt)
    with pytest.raises(VerificationError, match="differs from the tensor in memory") as caught:
        converter.save_model(BUILDERS["gpt2"](), tmp_path, max_shard_size="5KB")
    assert str(caught.value).startswith(str(tmp_path / "model.safetensors.index.json"))
    assert list(tmp_path.iterdir()) == []
    assert converter.save_file({"w": torch.ones(2)}, tmp_path / "x.safetensors", verify=False).verified is False


def test_a_tie_that_does_not_hold_in_memory_is_caught() -> None:
    w = torch.randn(3, 4)
    copy = w.clone()  # equal values, other memory
    with pytest.raises(VerificationError, match="'copy' is recorded as tied to 'w'"):
        export._check_ties_hold({"w": w, "copy": copy}, TieRecord(aliases={"copy": "w"}))
    view = TieRecord(views={"row": View("w", 4, (4,), (1,), "F32")})
    export._check_ties_hold({"w": w, "row": w[1]}, view)  # offset 4 elements: row 1, holds
    with pytest.raises(VerificationError, match="'row'"):
        export._check_ties_hold({"w": w, "row": w[2]}, view)


@pytest.mark.parametrize(
    "make", [lambda: torch.randn(7, 5, 3).transpose(0, 2), lambda: torch.randn(40)[::3], lambda: torch.randn(9, 2)]
)
def test_byte_blocks_are_bounded_and_in_order(make: Callable[[], torch.Tensor]) -> None:
    t = make()
    blocks = list(export._byte_blocks(t, limit=16))
    assert all(len(b) <= 16 for b in blocks)
    assert b"".join(bytes(b) for b in blocks) == t.contiguous().numpy().tobytes()


def test_small_blocks_write_the_same_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    state = PATTERNS["transpose"]() | PATTERNS["dtypes"]() | BUILDERS["t5"]().state_dict()
    monkeypatch.setattr(export, "_BLOCK", 24)
    converter.save_file(state, tmp_path / "live.safetensors")
    assert (tmp_path / "live.safetensors").read_bytes() == _converted(state, tmp_path)


# --------------------------------------------------------------------------- wrapped modules and prefixes


class Encoder(torch.nn.Module):
    """A model whose encoder is compiled on its own (``model.encoder = torch.compile(model.encoder)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
        self.module = torch.nn.Linear(4, 2)  # a bare model's own child named "module" keeps its name
        self.head = Seed()


def test_compiled_models_are_saved_under_the_bare_names(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Encoder()
    converter.save_model(model, tmp_path / "bare.safetensors")
    bare = (tmp_path / "bare.safetensors").read_bytes()
    whole = torch.compile(model)  # never called: wrapping does not compile
    assert all(n.startswith("_orig_mod.") for n in whole.state_dict())
    report = converter.save_model(whole, tmp_path / "whole.safetensors")
    assert report.prefixes_removed == ["'_orig_mod.' (torch.compile)"]
    assert (tmp_path / "whole.safetensors").read_bytes() == bare
    model.encoder = torch.compile(model.encoder)  # type: ignore[assignment]
    assert "encoder._orig_mod.0.weight" in model.state_dict()
    report = converter.save_model(model, tmp_path / "part.safetensors")
    assert report.prefixes_removed == ["'encoder._orig_mod.' (torch.compile)"]
    assert (tmp_path / "part.safetensors").read_bytes() == bare
    kept = converter.save_model(model, tmp_path / "kept.safetensors", keep_names=True)
    assert kept.prefixes_removed == [] and "encoder._orig_mod.0.weight" in converter.load_file(kept.output)
    fresh = Encoder()
    assert not converter.load_model(fresh, tmp_path / "part.safetensors").missing
    assert all(same_bits(fresh.state_dict()[n], t) for n, t in Encoder.state_dict(model).items() if "_orig" not in n)


def test_data_parallel_is_unwrapped(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Encoder()
    report = converter.save_model(torch.nn.DataParallel(model), tmp_path / "dp.safetensors")
    assert report.prefixes_removed == ["'module.' (DataParallel)"]
    assert set(converter.load_file(tmp_path / "dp.safetensors")) == set(model.state_dict())


def test_save_file_removes_a_prefix_every_name_carries(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = BUILDERS["gpt2"]()
    plain = model.state_dict()
    converter.save_model(model, tmp_path / "bare.safetensors")
    for prefixes, removed in [
        (["_orig_mod."], ["'_orig_mod.' (torch.compile)"]),
        (["module."], ["'module.' (DistributedDataParallel)"]),
        (["module.", "_orig_mod."], ["'module.' (DistributedDataParallel)", "'_orig_mod.' (torch.compile)"]),
    ]:
        prefix = "".join(prefixes)
        report = converter.save_file({prefix + n: t for n, t in plain.items()}, tmp_path / "x.safetensors")
        assert report.prefixes_removed == removed
        assert report.aliases == {"lm_head.weight": "transformer.wte.weight"}  # ties follow the new names
        assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "bare.safetensors").read_bytes()
    mixed = {"module.w": torch.ones(2), "other": torch.ones(2)}  # not every name: nothing removed
    assert converter.save_file(mixed, tmp_path / "m.safetensors").prefixes_removed == []
    kept = converter.save_file({"_orig_mod.w": torch.ones(1)}, tmp_path / "k.safetensors", keep_names=True)
    assert list(converter.load_file(kept.output)) == ["_orig_mod.w"]


def test_strip_prefix_removes_a_named_prefix(tmp_path: Path) -> None:
    w = torch.randn(3, 4)
    state = {"model.enc.w": w, "model.dec.w": w, "model.dec.row": w[1], "loss.weight": torch.ones(3)}
    report = converter.save_file(state, tmp_path / "x.safetensors", strip_prefix=["model"])
    assert report.prefixes_removed == ["'model.' (3 of 4 names)"]
    assert report.aliases == {"dec.w": "enc.w"} and report.views == ["dec.row"]
    assert set(converter.load_file(tmp_path / "x.safetensors")) == {"enc.w", "dec.w", "dec.row", "loss.weight"}
    with pytest.raises(converter.TiesafeError, match=r"no name starts with 'modle\.'") as caught:
        converter.save_file(state, tmp_path / "y.safetensors", strip_prefix=["modle."])
    assert str(caught.value).startswith(str(tmp_path / "y.safetensors"))
    module = torch.nn.ModuleDict({"model": torch.nn.Linear(2, 2)})
    report = converter.save_model(module, tmp_path / "z.safetensors", strip_prefix=["model."])
    assert set(converter.load_file(report.output)) == {"weight", "bias"}


def test_a_rename_that_joins_two_names_is_refused_naming_both(tmp_path: Path) -> None:
    state = {"model.w": torch.ones(2), "w": torch.zeros(2)}
    with pytest.raises(converter.TiesafeError, match=r"makes 'model\.w' and 'w' both 'w'|makes 'w' and 'model\.w'"):
        converter.save_file(state, tmp_path / "x.safetensors", strip_prefix=["model."])
    with pytest.raises(converter.TiesafeError, match=r"leaves 'module\.' without a name"):
        converter.save_file({"module.": torch.ones(1), "module.x": torch.ones(1)}, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_strip_prefixes_is_pure_and_reusable() -> None:
    from converter.names import strip_prefixes

    renamed, removed = strip_prefixes(["module._orig_mod.a", "module._orig_mod.b.c"])
    assert renamed == {"module._orig_mod.a": "a", "module._orig_mod.b.c": "b.c"}
    assert removed == ["'module.' (DistributedDataParallel)", "'_orig_mod.' (torch.compile)"]
    assert strip_prefixes(["module.a", "module.b"], auto=False) == (
        {"module.a": "module.a", "module.b": "module.b"},
        [],
    )
    with pytest.raises(converter.TiesafeError, match=r"no name starts with 'x\.'"):
        strip_prefixes([], ["x"])
