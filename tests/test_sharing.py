"""Shared storage: aliases, views, overlaps, disjoint slices, partial storages."""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from helpers import same_bits, save_and_convert, shares_memory
from models import Seed

import converter
from converter.descriptors import TensorRef
from converter.dtypes import BY_CODE
from converter.sharing import plan_sharing
from converter.ties import RESERVED_PREFIX


def test_seed_module_weight_and_bias_are_aliases(tmp_path: Path) -> None:
    _, report = save_and_convert(Seed().state_dict(), tmp_path)
    assert report.aliases == {"b.weight": "a.weight", "b.bias": "a.bias"}
    loaded = converter.load_file(report.output)
    assert loaded["b.weight"] is loaded["a.weight"] and loaded["b.bias"] is loaded["a.bias"]


def test_fused_qkv_slices_are_views(tmp_path: Path) -> None:
    qkv = torch.randn(12, 4)
    state = {"qkv": qkv, "q": qkv[0:4], "k": qkv[4:8], "v": qkv[8:12]}
    _, report = save_and_convert(state, tmp_path)
    assert report.views == ["k", "q", "v"] and report.stored == 1
    assert report.bytes_written == qkv.nbytes
    loaded = converter.load_file(report.output)
    for name in state:
        assert same_bits(loaded[name], state[name])
        assert shares_memory(loaded[name], loaded["qkv"])
    # A plain loader sees only what is stored under its own name, with its own bytes.
    assert set(safetensors.torch.load_file(report.output)) == {"qkv"}


def test_transpose_is_a_view_with_its_strides(tmp_path: Path) -> None:
    w = torch.randn(3, 5)
    _, report = save_and_convert({"w": w, "wt": w.t()}, tmp_path)
    loaded = converter.load_file(report.output)
    assert report.views == ["wt"]
    assert loaded["wt"].stride() == (1, 5) and same_bits(loaded["wt"], w.t())


def test_overlapping_slices_store_the_span_under_a_reserved_name(tmp_path: Path) -> None:
    flat = torch.randn(20)
    state = {"x": flat[0:12], "y": flat[6:18]}
    _, report = save_and_convert(state, tmp_path)
    plain = safetensors.torch.load_file(report.output)
    assert list(plain) == [f"{RESERVED_PREFIX}0"]  # no real name ever holds other bytes
    assert same_bits(plain[f"{RESERVED_PREFIX}0"], flat[0:18])
    loaded = converter.load_file(report.output)
    assert set(loaded) == {"x", "y"}
    assert same_bits(loaded["x"], state["x"]) and same_bits(loaded["y"], state["y"])
    assert shares_memory(loaded["x"], loaded["y"])


def test_disjoint_slices_of_a_flat_buffer_are_independent(tmp_path: Path) -> None:
    flat = torch.randn(30)  # a DeepSpeed/FSDP flat parameter
    state = {"w1": flat[0:10].view(2, 5), "w2": flat[10:25].view(3, 5), "b": flat[25:30]}
    _, report = save_and_convert(state, tmp_path)
    assert report.aliases == {} and report.views == [] and report.stored == 3
    assert [g.kind for g in report.groups] == ["disjoint"]
    plain = safetensors.torch.load_file(report.output)
    assert all(same_bits(plain[k], v) for k, v in state.items())


def test_storage_larger_than_its_tensors_writes_only_used_bytes(tmp_path: Path) -> None:
    big = torch.randn(1000)
    _, report = save_and_convert({"head": big[:10]}, tmp_path)
    assert report.bytes_written == 40
    assert same_bits(safetensors.torch.load_file(report.output)["head"], big[:10])


def test_materialize_views_writes_them_as_tensors(tmp_path: Path) -> None:
    qkv = torch.randn(6, 2)
    state = {"qkv": qkv, "q": qkv[:2], "q_again": qkv[:2], "kv": qkv[2:]}
    _, report = save_and_convert(state, tmp_path, materialize_views=True)
    plain = safetensors.torch.load_file(report.output)
    assert set(plain) == {"qkv", "q", "kv"}  # q_again is an exact alias of q: stored once
    assert report.aliases == {"q_again": "q"} and sorted(report.materialized) == ["kv", "q"]
    assert all(same_bits(plain[k], state[k]) for k in plain)


def test_aliased_non_contiguous_tensor_is_stored_once_densely(tmp_path: Path) -> None:
    base = torch.randn(4, 3)
    t = base.t()
    _, report = save_and_convert({"t1": t, "t2": t}, tmp_path)
    assert report.aliases == {"t2": "t1"}
    plain = safetensors.torch.load_file(report.output)
    assert same_bits(plain["t1"], t)


def test_different_dtypes_over_the_same_bytes_are_kept_apart() -> None:
    f32, i32 = BY_CODE["F32"], BY_CODE["I32"]
    plan = plan_sharing({"f": TensorRef("0", f32, 0, (4,), (1,)), "i": TensorRef("0", i32, 0, (4,), (1,))})
    assert [s.name for s in plan.stored] == ["f", "i"] and not plan.ties


def test_alias_group_keeps_the_first_name_in_checkpoint_order() -> None:
    f32 = BY_CODE["F32"]
    ref = TensorRef("0", f32, 0, (2, 2), (2, 1))
    plan = plan_sharing({"lm_head.weight": ref, "wte.weight": ref})
    assert [s.name for s in plan.stored] == ["lm_head.weight"]
    assert plan.ties.aliases == {"wte.weight": "lm_head.weight"}


def test_conversion_is_deterministic(tmp_path: Path) -> None:
    w = torch.randn(8, 8)
    state = {"a": w, "b": w, "c": w[2:4], "d": torch.randn(3)}
    torch.save(state, tmp_path / "x.pt")
    first = converter.convert_file(tmp_path / "x.pt", tmp_path / "one.safetensors")
    second = converter.convert_file(tmp_path / "x.pt", tmp_path / "two.safetensors")
    assert Path(first.output).read_bytes() == Path(second.output).read_bytes()
