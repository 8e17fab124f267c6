"""converter.load_model: the file's ties become the module's, conflicts are named, all or nothing."""

from __future__ import annotations

import copy
import io
import json
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers import same_bits, save_and_convert, shares_memory
from models import Seed

import converter
from converter.errors import ModelMismatchError, TieMetadataError, TiesafeError
from converter.ties import TieRecord, View, encode


class TwoLayers(Seed):
    """The same names, built as two independent layers."""

    def __init__(self) -> None:
        super().__init__()
        self.b = torch.nn.Linear(4, 4)


class Stats(torch.nn.Module):
    """Buffers under two names (running statistics shared by two heads)."""

    def __init__(self) -> None:
        super().__init__()
        self.one = torch.nn.BatchNorm1d(4)
        self.two = torch.nn.BatchNorm1d(4)


class Fused(torch.nn.Module):
    """A fused qkv parameter and q/k/v parameters (views of it in the source)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Parameter(torch.zeros(6, 4))
        self.q = torch.nn.Parameter(torch.zeros(2, 4))
        self.k = torch.nn.Parameter(torch.zeros(2, 4))
        self.v = torch.nn.Parameter(torch.zeros(2, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.qkv.t() + (x @ self.q.t()).sum() + (x @ self.v.t()).sum()


def _fused_source() -> Fused:
    source = Fused()
    with torch.no_grad():
        source.qkv.copy_(torch.randn(6, 4))
    for i, name in enumerate("qkv"):
        setattr(source, name, torch.nn.Parameter(source.qkv.data[2 * i : 2 * i + 2]))
    return source


def _snapshot(model: torch.nn.Module) -> dict[str, tuple[int, torch.Tensor]]:
    """Every tensor's identity and a copy of its value: what 'untouched' means."""
    return {n: (id(t), t.detach().clone()) for n, t in model.state_dict(keep_vars=True).items()}


def _assert_untouched(model: torch.nn.Module, before: dict[str, tuple[int, torch.Tensor]]) -> None:
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for name, (identity, value) in before.items():
        assert id(after[name]) == identity, name
        assert same_bits(after[name].detach(), value), name


def test_file_tie_becomes_a_module_tie_even_for_separate_parameters(tmp_path: Path) -> None:
    source = Seed()
    _, converted = save_and_convert(source.state_dict(), tmp_path)
    model = TwoLayers()
    report = converter.load_model(model, converted.output)
    assert model.b.weight is model.a.weight and model.b.bias is model.a.bias
    assert isinstance(model.a.weight, torch.nn.Parameter) and model.a.weight.requires_grad
    assert same_bits(model.a.weight.detach(), source.a.weight.detach())
    assert report.tied == {"b.weight": "a.weight", "b.bias": "a.bias"}
    assert report.missing == report.unexpected == report.cloned == report.conflicts == []
    x = torch.randn(3, 4)
    assert torch.equal(model(x), source(x))


def test_tied_buffers_become_one_buffer(tmp_path: Path) -> None:
    source = Stats()
    with torch.no_grad():
        source.one.running_mean.copy_(torch.randn(4))
    source.two.running_mean = source.one.running_mean  # the buffer shared by both heads
    _, converted = save_and_convert(source.state_dict(), tmp_path)
    model = Stats()
    report = converter.load_model(model, converted.output)
    assert model.two.running_mean is model.one.running_mean
    assert not isinstance(model.one.running_mean, torch.nn.Parameter)
    assert "running_mean" in model.two._buffers
    assert same_bits(model.two.running_mean, source.one.running_mean)
    assert report.tied["two.running_mean"] == "one.running_mean"


def test_views_become_parameters_sharing_the_base_memory(tmp_path: Path) -> None:
    source = _fused_source()
    _, converted = save_and_convert(source.state_dict(), tmp_path)
    assert sorted(converted.views) == ["k", "q", "v"]
    model = Fused()
    report = converter.load_model(model, converted.output)
    for i, name in enumerate("qkv"):
        view = getattr(model, name)
        assert isinstance(view, torch.nn.Parameter)
        assert same_bits(view.detach(), source.qkv.detach()[2 * i : 2 * i + 2])
        assert shares_memory(view, model.qkv)
        assert view.data_ptr() - model.qkv.data_ptr() == 2 * i * 4 * 4
        assert report.tied[name] == "qkv"
    with torch.no_grad():
        model.qkv[4, 0] = 7.0
    assert model.v[0, 0] == 7.0


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_gives_every_tied_name_its_own_parameter(tmp_path: Path) -> None:
    source = Seed()
    _, converted = save_and_convert(source.state_dict(), tmp_path)
    model = TwoLayers()
    report = converter.load_model(model, converted.output, torchscript=True)
    assert report.cloned == ["b.weight", "b.bias"] and report.tied == {}
    assert not shares_memory(model.a.weight, model.b.weight) and not shares_memory(model.a.bias, model.b.bias)
    assert same_bits(model.b.weight.detach(), source.a.weight.detach())
    x = torch.randn(3, 4)
    traced = torch.jit.trace(model, (x,))
    assert set(traced.state_dict()) == set(source.state_dict())
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    restored = torch.jit.load(buffer)
    assert set(restored.state_dict()) == set(source.state_dict())
    assert torch.equal(restored(x), source(x))


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_cannot_part_one_module_under_two_names(tmp_path: Path) -> None:
    source = Seed()
    _, converted = save_and_convert(source.state_dict(), tmp_path)
    model = Seed()  # self.b = self.a: one parameter, whatever the loader does
    report = converter.load_model(model, converted.output, torchscript=True)
    assert report.cloned == [] and report.tied == {"b.weight": "a.weight", "b.bias": "a.bias"}
    assert model.b is model.a and same_bits(model.a.weight.detach(), source.a.weight.detach())
    x = torch.randn(3, 4)
    assert set(torch.jit.trace(model, (x,)).state_dict()) == set(source.state_dict())


def test_copy_stays_independent_unless_the_model_ties_it(tmp_path: Path) -> None:
    layer = torch.nn.Linear(4, 4)
    path = tmp_path / "copies.safetensors"
    record = TieRecord(copies={"b.weight": "a.weight", "b.bias": "a.bias"})
    tensors = {"a.weight": layer.weight.detach(), "a.bias": layer.bias.detach()}
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt", **encode(record)})
    model = TwoLayers()
    report = converter.load_model(model, path)
    assert not shares_memory(model.b.weight, model.a.weight) and report.tied == {}
    assert same_bits(model.b.weight.detach(), layer.weight.detach())
    seed = Seed()
    report = converter.load_model(seed, path)
    assert seed.b is seed.a and report.conflicts == [] and report.tied["b.weight"] == "a.weight"


def test_torchscript_clones_views_too(tmp_path: Path) -> None:
    source = _fused_source()
    _, converted = save_and_convert(source.state_dict(), tmp_path)
    model = Fused()
    report = converter.load_model(model, converted.output, torchscript=True)
    assert report.cloned == ["q", "k", "v"]
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == 4
    assert all(same_bits(getattr(model, n).detach(), getattr(source, n).detach()) for n in ("qkv", "q", "k", "v"))


def test_different_values_for_names_the_model_ties_are_a_conflict(tmp_path: Path) -> None:
    _, converted = save_and_convert(TwoLayers().state_dict(), tmp_path)
    model = Seed()
    before = _snapshot(model)
    with pytest.raises(ModelMismatchError) as caught:
        converter.load_model(model, converted.output)
    message = str(caught.value)
    assert message.startswith(f"{converted.output}: the model ties 'a.weight' and 'b.weight'")
    assert "strict=False" in message and "\n" not in message
    _assert_untouched(model, before)


def test_conflict_with_strict_false_keeps_the_first_and_reports(tmp_path: Path) -> None:
    source = TwoLayers()
    _, converted = save_and_convert(source.state_dict(), tmp_path)
    model = Seed()
    report = converter.load_model(model, converted.output, strict=False)
    assert report.conflicts == [("a.weight", "b.weight"), ("a.bias", "b.bias")]
    assert model.b is model.a and same_bits(model.a.weight.detach(), source.a.weight.detach())


def test_equal_values_are_not_a_tie(tmp_path: Path) -> None:
    layer = torch.nn.Linear(4, 4)
    state = {**{f"a.{k}": v for k, v in layer.state_dict().items()}}
    state.update({f"b.{k}": v for k, v in copy.deepcopy(layer).state_dict().items()})
    _, converted = save_and_convert(state, tmp_path)
    assert converted.aliases == {}
    model = TwoLayers()
    report = converter.load_model(model, converted.output)
    assert model.b.weight is not model.a.weight and not shares_memory(model.b.weight, model.a.weight)
    assert same_bits(model.b.weight.detach(), model.a.weight.detach()) and report.tied == {}
    # Into a model that ties them, equal values are no conflict: the model's tie stays.
    seed = Seed()
    report = converter.load_model(seed, converted.output)
    assert seed.b is seed.a and report.conflicts == []
    assert same_bits(seed.a.weight.detach(), layer.weight.detach())


def test_name_the_model_ties_is_filled_through_its_tie(tmp_path: Path) -> None:
    source = Seed()
    safetensors.torch.save_file(
        {"a.weight": source.a.weight.detach(), "a.bias": source.a.bias.detach()}, tmp_path / "a.safetensors"
    )
    model = Seed()
    report = converter.load_model(model, tmp_path / "a.safetensors")
    assert report.missing == [] and report.tied == {"b.weight": "a.weight", "b.bias": "a.bias"}
    assert same_bits(model.b.weight.detach(), source.a.weight.detach())


def test_hub_convert_service_file_ties_the_module(tmp_path: Path) -> None:
    source = Seed()
    safetensors.torch.save_model(source, tmp_path / "hub.safetensors")  # writes 'b.weight' -> 'a.weight'
    model = TwoLayers()
    converter.load_model(model, tmp_path / "hub.safetensors")
    assert model.b.weight is model.a.weight and model.b.bias is model.a.bias


def test_missing_and_unexpected_names(tmp_path: Path) -> None:
    path = tmp_path / "partial.safetensors"
    safetensors.torch.save_file({"a.weight": torch.ones(4, 4), "extra": torch.ones(1)}, path)
    model = TwoLayers()
    before = _snapshot(model)
    with pytest.raises(ModelMismatchError, match=r"the model's 'a.bias' \(and 2 more\).*the file's 'extra'"):
        converter.load_model(model, path)
    _assert_untouched(model, before)
    report = converter.load_model(model, path, strict=False)
    assert report.missing == ["a.bias", "b.weight", "b.bias"] and report.unexpected == ["extra"]
    assert torch.equal(model.a.weight, torch.ones(4, 4))
    assert id(model.b.weight) == before["b.weight"][0]  # missing names are left as they were


def test_shape_mismatch_is_refused_even_when_not_strict(tmp_path: Path) -> None:
    path = tmp_path / "shape.safetensors"
    state = {k: v for k, v in TwoLayers().state_dict().items()}
    state["b.weight"] = torch.ones(4, 3)
    safetensors.torch.save_file(state, path)
    model = TwoLayers()
    before = _snapshot(model)
    with pytest.raises(ModelMismatchError, match=r"'b.weight' is \[4, 3\] in the file but \[4, 4\] in the model"):
        converter.load_model(model, path, strict=False)
    _assert_untouched(model, before)


def test_model_dtype_is_kept_and_ties_survive_the_conversion(tmp_path: Path) -> None:
    source = _fused_source()
    _, converted = save_and_convert(source.state_dict(), tmp_path)
    model = Fused().double()
    converter.load_model(model, converted.output)
    assert model.qkv.dtype == model.v.dtype == torch.float64
    assert shares_memory(model.v, model.qkv)
    assert torch.equal(model.v.detach(), source.v.detach().double())


def test_model_on_the_meta_device_gets_the_file_tensors(tmp_path: Path) -> None:
    source = Seed()
    _, converted = save_and_convert(source.state_dict(), tmp_path)
    with torch.device("meta"):
        model = TwoLayers()
    converter.load_model(model, converted.output)
    assert model.a.weight.device.type == "cpu" and model.b.weight is model.a.weight
    assert same_bits(model.a.weight.detach(), source.a.weight.detach())


def test_requires_grad_is_kept(tmp_path: Path) -> None:
    _, converted = save_and_convert(Seed().state_dict(), tmp_path)
    model = TwoLayers()
    model.a.weight.requires_grad_(False)
    converter.load_model(model, converted.output)
    assert not model.a.weight.requires_grad and model.a.bias.requires_grad


def test_model_tie_between_views_with_different_values_is_a_conflict(tmp_path: Path) -> None:
    source = _fused_source()
    _, converted = save_and_convert(source.state_dict(), tmp_path)
    model = Fused()
    model.k = model.q  # the model says k is q; the file holds other values for them
    before = _snapshot(model)
    with pytest.raises(ModelMismatchError, match="the model ties 'q' and 'k', but the file holds different values"):
        converter.load_model(model, converted.output)
    _assert_untouched(model, before)


class _ViewTiedElsewhere(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(2, 4))
        self.qkv = torch.nn.Parameter(torch.zeros(6, 4))
        self.q = self.p
        self.k = torch.nn.Parameter(torch.zeros(2, 4))
        self.v = torch.nn.Parameter(torch.zeros(2, 4))


def test_view_the_model_ties_to_a_name_stored_apart_is_a_conflict(tmp_path: Path) -> None:
    # Equal values, so the model's tie q = p could hold; but the file says q lives in qkv's memory.
    source = _fused_source()
    _, converted = save_and_convert({"p": source.q.detach().clone(), **source.state_dict()}, tmp_path)
    model = _ViewTiedElsewhere()
    before = _snapshot(model)
    with pytest.raises(ModelMismatchError, match="keeps 'q' in one memory with 'qkv', but the model ties it to 'p'"):
        converter.load_model(model, converted.output)
    _assert_untouched(model, before)
    report = converter.load_model(model, converted.output, strict=False)
    assert report.conflicts == [("p", "q")] and model.q is model.p
    assert shares_memory(model.k, model.qkv)


def test_sharded_set_loads_into_a_module(tmp_path: Path) -> None:
    source = Seed()
    a = source.a.state_dict()
    safetensors.torch.save_file(
        {"a.weight": a["weight"]},
        tmp_path / "model-00001-of-00002.safetensors",
        metadata={"format": "pt", **encode(TieRecord(aliases={"b.weight": "a.weight"}))},
    )
    safetensors.torch.save_file(
        {"a.bias": a["bias"]},
        tmp_path / "model-00002-of-00002.safetensors",
        metadata={"format": "pt", **encode(TieRecord(aliases={"b.bias": "a.bias"}))},
    )
    weight_map = {"a.weight": "model-00001-of-00002.safetensors", "a.bias": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model = TwoLayers()
    converter.load_model(model, tmp_path)
    assert model.b.weight is model.a.weight and model.b.bias is model.a.bias


# --- hostile tie metadata: a clear error naming the file and the key, the module untouched ---

_QKV = {"qkv": torch.randn(6, 4)}


def _record(**views_and_aliases) -> dict[str, str]:
    return encode(TieRecord(**views_and_aliases))


_HOSTILE = {
    "alias-to-missing": (_record(aliases={"q": "nowhere"}), "points to 'nowhere', which is not in the file"),
    "view-out-of-bounds": (_record(views={"v": View("qkv", 20, (2, 4), (4, 1), "F32")}), "reaches element 28"),
    "view-dtype": (_record(views={"q": View("qkv", 0, (2, 4), (4, 1), "F16")}), "is 'F16' but its base"),
    "cycle": (
        {"tiesafe": json.dumps({"version": 1, "aliases": {"q": "k", "k": "q"}})},
        "which is itself a tie",
    ),
    "invalid-json": ({"tiesafe": "{not json"}, "not valid JSON"),
    "stride-length": (
        {
            "tiesafe": json.dumps(
                {
                    "version": 1,
                    "views": {"q": {"base": "qkv", "dtype": "F32", "offset": 0, "shape": [2, 4], "stride": [4]}},
                }
            )
        },
        "shape and stride differ in length",
    ),
    "newer-version": ({"tiesafe": json.dumps({"version": 99})}, "newer than this tiesafe reads"),
    "tie-is-stored": (_record(aliases={"qkv": "qkv"}), "is also a stored tensor"),
}


@pytest.mark.parametrize("case", sorted(_HOSTILE))
def test_hostile_tie_metadata_leaves_the_module_untouched(tmp_path: Path, case: str) -> None:
    metadata, message = _HOSTILE[case]
    path = tmp_path / "hostile.safetensors"
    safetensors.torch.save_file(_QKV, path, metadata={"format": "pt", **metadata})
    model = Fused()
    before = _snapshot(model)
    with pytest.raises(TieMetadataError) as caught:
        converter.load_model(model, path, strict=False)
    text = str(caught.value)
    assert text.startswith(f"{path}: tie metadata ('tiesafe'): ") and message in text and "\n" not in text
    _assert_untouched(model, before)


def test_damaged_file_leaves_the_module_untouched(tmp_path: Path) -> None:
    path = tmp_path / "damaged.safetensors"
    safetensors.torch.save_file(_QKV, path)
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    path.write_bytes(data[: 8 + length + 10])  # the data section cut short
    model = Fused()
    before = _snapshot(model)
    with pytest.raises(TiesafeError, match=str(path)):
        converter.load_model(model, path, strict=False)
    _assert_untouched(model, before)
