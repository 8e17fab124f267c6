"""converter.load_file: every name back, ties shared or cloned, single files, sharded sets, folders."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers import same_bits, save_and_convert, shares_memory

import converter
from converter.errors import CorruptFileError, TieMetadataError, TiesafeError
from converter.ties import RESERVED_PREFIX, TieRecord, View, encode


def _memory(t: torch.Tensor) -> tuple[int, int]:
    """The byte range of the storage a tensor lives in."""
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges where this process maps ``path``."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(path.resolve())):
            start, stop = line.split()[0].split("-")
            ranges.append((int(start, 16), int(stop, 16)))
    return ranges


@pytest.fixture
def tied_state() -> dict[str, torch.Tensor]:
    """An alias, a row-slice view, a transposed view and an independent tensor."""
    wte = torch.randn(8, 4)
    qkv = torch.randn(6, 4)
    return {"wte": wte, "qkv": qkv, "lm_head": wte, "k": qkv[2:4], "qkv_t": qkv.t(), "ln": torch.randn(4)}


def test_share_mode_gives_every_name_with_source_geometry(tmp_path: Path, tied_state) -> None:
    _, report = save_and_convert(tied_state, tmp_path)
    loaded = converter.load_file(report.output)
    assert set(loaded) == set(tied_state)
    for name, source in tied_state.items():
        assert same_bits(loaded[name], source), name
        assert loaded[name].stride() == source.stride(), name
    assert loaded["lm_head"] is loaded["wte"]
    # A view sits at the same element offset inside its base's memory as in the source.
    assert loaded["k"].data_ptr() - loaded["qkv"].data_ptr() == 2 * 4 * 4
    assert shares_memory(loaded["k"], loaded["qkv"]) and shares_memory(loaded["qkv_t"], loaded["qkv"])
    loaded["qkv"][3, 1] = 42.0  # one memory: a write shows through every view of it
    assert loaded["k"][1, 1] == 42.0 and loaded["qkv_t"][1, 3] == 42.0


def test_share_mode_holds_tied_bytes_once_and_maps_them_from_the_file(tmp_path: Path, tied_state) -> None:
    _, report = save_and_convert(tied_state, tmp_path)
    loaded = converter.load_file(report.output)
    memories = {_memory(t) for t in loaded.values()}
    assert sum(stop - start for start, stop in memories) == report.bytes_written
    mapped = _mapped_ranges(Path(report.output))  # zero-copy: the tensors are the file's pages
    assert mapped
    for start, stop in memories:
        assert any(lo <= start and stop <= hi for lo, hi in mapped)


def test_clone_mode_gives_each_name_its_own_memory(tmp_path: Path, tied_state) -> None:
    _, report = save_and_convert(tied_state, tmp_path)
    loaded = converter.load_file(report.output, ties="clone")
    assert set(loaded) == set(tied_state)
    for name, source in tied_state.items():
        assert same_bits(loaded[name], source), name
    ranges = sorted(_memory(t) for t in loaded.values())
    assert all(a_stop <= b_start for (_, a_stop), (b_start, _) in itertools.pairwise(ranges))
    loaded["wte"].zero_()
    assert same_bits(loaded["lm_head"], tied_state["wte"])


def test_overlap_span_is_dropped_and_its_views_share_it(tmp_path: Path) -> None:
    flat = torch.randn(20)
    _, report = save_and_convert({"x": flat[0:12], "y": flat[6:18]}, tmp_path)
    loaded = converter.load_file(report.output)
    assert set(loaded) == {"x", "y"}
    assert loaded["y"].data_ptr() - loaded["x"].data_ptr() == 6 * 4
    cloned = converter.load_file(report.output, ties="clone")
    assert not shares_memory(cloned["x"], cloned["y"])
    assert same_bits(cloned["y"], flat[6:18])


def test_plain_file_without_ties_loads_as_it_is(tmp_path: Path) -> None:
    state = {"a": torch.randn(3, 3), "b": torch.arange(5)}
    safetensors.torch.save_file(state, tmp_path / "plain.safetensors")
    loaded = converter.load_file(tmp_path / "plain.safetensors")
    assert loaded.keys() == state.keys()
    assert all(same_bits(loaded[k], v) for k, v in state.items())


def test_hub_convert_service_metadata_is_retied(tmp_path: Path) -> None:
    # What the Hub's convert service writes: the removed name -> the kept name, as plain metadata.
    wte = torch.randn(8, 4)
    path = tmp_path / "hub.safetensors"
    safetensors.torch.save_file({"wte": wte}, path, metadata={"format": "pt", "lm_head": "wte"})
    loaded = converter.load_file(path)
    assert set(loaded) == {"wte", "lm_head"} and loaded["lm_head"] is loaded["wte"]


class _Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(8, 4)
        self.head = torch.nn.Linear(4, 8, bias=False)
        self.head.weight = self.emb.weight


def test_safetensors_save_model_output_is_retied(tmp_path: Path) -> None:
    model = _Tied()
    safetensors.torch.save_model(model, tmp_path / "m.safetensors")
    loaded = converter.load_file(tmp_path / "m.safetensors")
    assert set(loaded) == {"emb.weight", "head.weight"}
    assert loaded["head.weight"] is loaded["emb.weight"]
    assert same_bits(loaded["emb.weight"], model.emb.weight.detach())


def test_bad_arguments_are_user_errors(tmp_path: Path) -> None:
    safetensors.torch.save_file({"a": torch.ones(2)}, tmp_path / "x.safetensors")
    with pytest.raises(TiesafeError, match="ties must be 'share' or 'clone'"):
        converter.load_file(tmp_path / "x.safetensors", ties="copy")  # type: ignore[arg-type]
    with pytest.raises(TiesafeError, match=r"x\.safetensors: cannot load: device bogus is invalid"):
        converter.load_file(tmp_path / "x.safetensors", device="bogus")
    with pytest.raises(TiesafeError, match="no such file"):
        converter.load_file(tmp_path / "missing.safetensors")


# --- sharded sets and folders -------------------------------------------------------------


def _write_set(folder: Path, shards: dict[str, tuple[dict[str, torch.Tensor], TieRecord]]) -> Path:
    """Write shards (safetensors + their tie records) and the index naming their stored tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for file, (tensors, record) in shards.items():
        safetensors.torch.save_file(tensors, folder / file, metadata={"format": "pt", **encode(record)})
        weight_map.update(dict.fromkeys(tensors, file))
    index = folder / "model.safetensors.index.json"
    total = sum(t.nbytes for tensors, _ in shards.values() for t in tensors.values())
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return index


@pytest.fixture
def sharded(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """Two shards; ties whose names belong to the other shard are recorded with their target."""
    wte, qkv, head_b = torch.randn(8, 4), torch.randn(6, 4), torch.randn(8)
    one = TieRecord(aliases={"lm_head.weight": "wte"})  # lm_head would sit in shard 2, wte is in shard 1
    two = TieRecord(views={"q": View("qkv", 0, (2, 4), (4, 1), "F32"), "v": View("qkv", 16, (2, 4), (4, 1), "F32")})
    index = _write_set(
        tmp_path / "set",
        {
            "model-00001-of-00002.safetensors": ({"wte": wte}, one),
            "model-00002-of-00002.safetensors": ({"qkv": qkv, "lm_head.bias": head_b}, two),
        },
    )
    expected = {"wte": wte, "lm_head.weight": wte, "lm_head.bias": head_b, "qkv": qkv, "q": qkv[0:2], "v": qkv[4:6]}
    return index, expected


@pytest.mark.parametrize("how", ["index", "folder"])
def test_sharded_set_loads_with_ties_across_shards(sharded, how: str) -> None:
    index, expected = sharded
    loaded = converter.load_file(index if how == "index" else index.parent)
    assert set(loaded) == set(expected)
    assert all(same_bits(loaded[k], v) for k, v in expected.items())
    assert loaded["lm_head.weight"] is loaded["wte"]
    assert shares_memory(loaded["q"], loaded["qkv"]) and shares_memory(loaded["v"], loaded["qkv"])
    clones = converter.load_file(index, ties="clone")
    assert not shares_memory(clones["lm_head.weight"], clones["wte"])
    assert not shares_memory(clones["v"], clones["qkv"])


def test_folder_prefers_the_single_file_like_transformers(sharded) -> None:
    index, _ = sharded
    safetensors.torch.save_file({"only": torch.ones(1)}, index.parent / "model.safetensors")
    assert set(converter.load_file(index.parent)) == {"only"}


def test_folder_without_weights_or_with_several_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TiesafeError, match=r"holds neither model\.safetensors nor"):
        converter.load_file(tmp_path)
    for name in ("a.safetensors", "b.safetensors"):
        safetensors.torch.save_file({"x": torch.ones(1)}, tmp_path / name)
    with pytest.raises(TiesafeError, match="holds several"):
        converter.load_file(tmp_path)


def _edit_index(index: Path, edit) -> None:
    document = json.loads(index.read_text())
    edit(document)
    index.write_text(json.dumps(document))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(weight_map=["wte"]), "'weight_map' must map tensor names to file names"),
        (lambda d: d.update(weight_map={}), "'weight_map' names no tensor"),
        (lambda d: d["weight_map"].update(wte="../elsewhere.safetensors"), "which is not a file name"),
        (lambda d: d["weight_map"].update(wte="model-00002-of-00002.safetensors"), "which does not store it"),
        (lambda d: d["weight_map"].update(ghost="model-00001-of-00002.safetensors"), "'ghost' in model-00001"),
        (lambda d: d["weight_map"].update(q="model-00002-of-00002.safetensors"), "'q' in model-00002"),
    ],
    ids=["not-a-map", "empty", "traversal", "wrong-shard", "absent-name", "tie-name-listed"],
)
def test_index_that_disagrees_with_its_shards_is_refused(sharded, edit, message: str) -> None:
    index, _ = sharded
    _edit_index(index, edit)
    with pytest.raises(CorruptFileError, match=message) as caught:
        converter.load_file(index)
    assert str(caught.value).startswith(f"{index}: ")


def test_index_that_is_not_json_is_refused(sharded) -> None:
    index, _ = sharded
    index.write_text("{not json")
    with pytest.raises(CorruptFileError, match=rf"{index}: index is not valid JSON"):
        converter.load_file(index)


def test_missing_shard_is_named(sharded) -> None:
    index, _ = sharded
    (index.parent / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(TiesafeError, match=r"model-00002-of-00002\.safetensors: no such file"):
        converter.load_file(index)


def test_name_stored_in_two_shards_is_refused(tmp_path: Path) -> None:
    index = _write_set(
        tmp_path,
        {
            "a.safetensors": ({"w": torch.ones(2), "u": torch.ones(1)}, TieRecord()),
            "b.safetensors": ({"w": torch.ones(2)}, TieRecord()),
        },
    )  # the index lists 'u' in a and 'w' in b: both shards are read
    with pytest.raises(CorruptFileError, match=r"'w' is stored in both [ab]\.safetensors and [ab]\.safetensors"):
        converter.load_file(index)


@pytest.mark.parametrize("other", ["stored", "tied"])
def test_tie_that_another_shard_stores_or_ties_is_refused(tmp_path: Path, other: str) -> None:
    second = (
        ({"head": torch.ones(2)}, TieRecord())
        if other == "stored"
        else ({"u": torch.ones(2)}, TieRecord(aliases={"head": "u"}))
    )
    index = _write_set(
        tmp_path,
        {"a.safetensors": ({"w": torch.ones(2)}, TieRecord(aliases={"head": "w"})), "b.safetensors": second},
    )
    verb = "stores" if other == "stored" else "ties"
    with pytest.raises(CorruptFileError, match=rf"ties 'head', which [ab]\.safetensors {verb} too"):
        converter.load_file(index)


def test_hostile_record_in_one_shard_names_that_shard_and_the_key(tmp_path: Path) -> None:
    # A view whose target lives in another shard: each shard's record must hold only its own targets.
    index = _write_set(
        tmp_path,
        {
            "a.safetensors": ({"w": torch.ones(4)}, TieRecord(views={"x": View("b_base", 0, (2,), (1,), "F32")})),
            "b.safetensors": ({"b_base": torch.ones(4)}, TieRecord()),
        },
    )
    with pytest.raises(TieMetadataError, match=r"a\.safetensors: tie metadata \('tiesafe'\): view 'x' points to"):
        converter.load_file(index)


def test_reserved_span_names_stay_hidden_in_a_set(tmp_path: Path) -> None:
    span = torch.randn(18)
    record = TieRecord(
        views={
            "x": View(f"{RESERVED_PREFIX}0", 0, (12,), (1,), "F32"),
            "y": View(f"{RESERVED_PREFIX}0", 6, (12,), (1,), "F32"),
        },
        hidden=[f"{RESERVED_PREFIX}0"],
    )
    index = _write_set(tmp_path, {"a.safetensors": ({f"{RESERVED_PREFIX}0": span}, record)})
    loaded = converter.load_file(index)
    assert set(loaded) == {"x", "y"} and same_bits(loaded["y"], span[6:18])


def test_clone_of_an_expanded_view_is_no_larger_than_its_base(tmp_path: Path) -> None:
    w = torch.randn(4)
    _, report = save_and_convert({"w": w, "e": w.expand(1000, 4)}, tmp_path)
    assert report.views == ["e"]
    cloned = converter.load_file(report.output, ties="clone")
    assert same_bits(cloned["e"], w.expand(1000, 4)) and cloned["e"].stride() == (0, 1)
    assert not shares_memory(cloned["e"], cloned["w"])
    assert cloned["e"].untyped_storage().nbytes() == w.nbytes


@pytest.mark.parametrize(
    ("shape", "stride"),
    [([2**70], [0]), ([2**40, 2**40], [0, 0]), ([1] * 1025, [1] * 1025), ([2], [2**64])],
    ids=["size-beyond-int64", "numel-beyond-int64", "too-many-dims", "stride-beyond-int64"],
)
def test_view_no_tensor_can_hold_is_refused(tmp_path: Path, shape: list[int], stride: list[int]) -> None:
    view = {"base": "w", "dtype": "F32", "offset": 0, "shape": shape, "stride": stride}
    path = tmp_path / "huge.safetensors"
    record = json.dumps({"version": 1, "views": {"v": view}})
    safetensors.torch.save_file({"w": torch.ones(4)}, path, metadata={"format": "pt", "tiesafe": record})
    refusal = "(: (shape|stride) must be a list of at most 1024 non-negative 64-bit integers| repeats 4 bytes)"
    with pytest.raises(TieMetadataError, match=rf"{path}: tie metadata \('tiesafe'\): view 'v'{refusal}"):
        converter.load_file(path)


def test_copy_loads_as_an_independent_tensor(tmp_path: Path) -> None:
    # 'copies' record equal bytes that were not shared in the source: stored once, loaded apart.
    w = torch.randn(3, 2)
    path = tmp_path / "copies.safetensors"
    metadata = {"format": "pt", **encode(TieRecord(copies={"w_copy": "w"}))}
    safetensors.torch.save_file({"w": w}, path, metadata=metadata)
    loaded = converter.load_file(path)
    assert set(loaded) == {"w", "w_copy"} and same_bits(loaded["w_copy"], w)
    assert not shares_memory(loaded["w_copy"], loaded["w"])


def test_a_name_holding_a_quoted_data_offsets_loads(tmp_path: Path) -> None:
    # The loader's quick duplicate count sees '"data_offsets"' inside this name; the parser decides.
    path = tmp_path / "odd.safetensors"
    tensors = {'w"data_offsets': torch.ones(2), "b": torch.zeros(3)}
    safetensors.torch.save_file(tensors, str(path))
    loaded = converter.load_file(path)
    assert sorted(loaded) == sorted(tensors) and same_bits(loaded['w"data_offsets'], tensors['w"data_offsets'])


def test_a_name_given_twice_is_refused_by_the_loader(tmp_path: Path) -> None:
    path = tmp_path / "twice.safetensors"
    safetensors.torch.save_file({"a": torch.ones(2), "b": torch.ones(2)}, str(path))
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + size].replace(b'"b"', b'"a"')
    path.write_bytes(raw[:8] + header + raw[8 + size :])
    with pytest.raises(CorruptFileError):
        converter.load_file(path)
