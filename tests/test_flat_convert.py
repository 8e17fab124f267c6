"""Flat checkpoints of unshared tensors converted as columns: the general path's file, byte for byte.

Every case converts the same file twice, once as columns and once with the columnar
reader switched off, and asserts the two outputs and reports are identical; files the
columnar reader must leave to the general path are checked to go there and to get the
general path's verdict.
"""

from __future__ import annotations

import collections
import os
import random
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from models import tiny_unet
from safetensors.torch import load_file

import converter
from converter import convert as convert_module
from converter import flat_convert, jsonstream
from converter.convert import inspect, verify_file
from converter.errors import TiesafeError, VerificationError
from converter.readers.flat_file import read_flat_file


def _general(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(convert_module, "read_flat_file", lambda *args, **kwargs: None)


def _both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: Path, **options: Any
) -> tuple[bytes, dict[str, Any], bytes, dict[str, Any]]:
    """Convert ``source`` as columns, then by the general path: both outputs and reports."""
    fast_out, general_out = tmp_path / "fast.safetensors", tmp_path / "general.safetensors"
    fast = converter.convert_file(source, fast_out, **options).to_dict()
    with monkeypatch.context() as patch:
        _general(patch)
        general = converter.convert_file(source, general_out, **options).to_dict()
    for report in (fast, general):
        del report["seconds"], report["output"]
    return fast_out.read_bytes(), fast, general_out.read_bytes(), general


def _experts(count: int = 1200) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    for i in range(count // 3):
        for name in ("gate_proj", "up_proj", "down_proj"):
            state[f"model.layers.{i // 100}.mlp.experts.{i % 100}.{name}.weight"] = torch.randn(
                4, 3, dtype=torch.bfloat16
            )
    state["model.norm.weight"] = torch.randn(3)
    state["model.embed.weight"] = torch.randn(7, 3, dtype=torch.float16)
    state["model.rotary.inv_freq"] = torch.arange(5, dtype=torch.int64)
    state["model.mask"] = torch.tensor([True, False, True])
    state["model.scale"] = torch.tensor(0.5)  # 0-dim
    state["model.unused"] = torch.zeros(0, 3)  # no bytes
    state["model.big"] = torch.randn(128, 160)  # 80 KiB: copied by the kernel, not through the buffer
    return state


def _cases() -> dict[str, Any]:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    model.register_buffer("steps", torch.zeros((), dtype=torch.int64))
    return {
        "mixture of experts (long memo, batches, dtypes)": _experts(),
        "model.state_dict() (OrderedDict with _metadata)": model.state_dict(),
        "torch.compile's prefix": {f"_orig_mod.{k}": v for k, v in model.state_dict().items()},
        "ordered dict": collections.OrderedDict({"b": torch.ones(2), "a": torch.zeros(3, 1)}),
        "non-ASCII names": {"名前.weight": torch.ones(2), "b\u00e9ta": torch.randn(2, 2), "😀": torch.ones(1)},
        "a name within another": {"ab": torch.ones(1), "b": torch.ones(3), "a": torch.ones(2)},
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_columns_write_the_general_paths_file(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = _cases()[case]
    source = tmp_path / "pytorch_model.bin"
    torch.save(state, source)
    assert read_flat_file(source) is not None  # this case is read as columns
    fast, fast_report, general, general_report = _both(tmp_path, monkeypatch, source)
    assert fast == general
    assert fast_report == general_report
    loaded = load_file(tmp_path / "fast.safetensors")
    assert loaded.keys() == {k.removeprefix("_orig_mod.") for k in state}
    for name, tensor in state.items():
        assert torch.equal(loaded[name.removeprefix("_orig_mod.")], tensor)


def test_options_and_metadata_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "last.ckpt"
    torch.save({f"model.layer{i}.w": torch.randn(2, 2) for i in range(5)}, source)
    for options in (
        {"strip_prefix": ("model",)},
        {"metadata": {"origin": "test"}},
        {"verify": False},
        {"strict": True},
        {"materialize_views": True},
        {"keep_names": True},
    ):
        fast, fast_report, general, general_report = _both(tmp_path, monkeypatch, source, **options)
        assert fast == general and fast_report == general_report, options
        for out in ("fast", "general"):
            (tmp_path / f"{out}.safetensors").unlink()


def test_a_diffusers_sharded_checkpoint_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "unet", safe_serialization=False, max_shard_size="40KB")  # diffusers' own save
    shards = sorted((tmp_path / "unet").glob("diffusion_pytorch_model-*.bin"))
    assert len(shards) > 1
    for shard in shards:
        assert read_flat_file(shard) is not None
        fast, fast_report, general, general_report = _both(tmp_path, monkeypatch, shard)
        assert fast == general and fast_report == general_report
        for out in ("fast", "general"):
            (tmp_path / f"{out}.safetensors").unlink()


def test_a_peft_adapter_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import peft
    from models import llama_tied

    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lora = peft.get_peft_model(llama_tied().eval(), config)
    lora.save_pretrained(tmp_path / "lora", safe_serialization=False)  # PEFT's own save
    source = tmp_path / "lora" / "adapter_model.bin"
    assert read_flat_file(source) is not None
    fast, fast_report, general, general_report = _both(tmp_path, monkeypatch, source)
    assert fast == general and fast_report == general_report


def _left_to_the_general_path() -> dict[str, Any]:
    base = torch.randn(4, 3)
    return {
        "tied": {"embed.weight": base, "head.weight": base},
        "a view": {"w": base, "row": base[1]},
        "part of a storage": {"tail": base.reshape(-1)[4:]},
        "transposed": {"t": base.t()},
        "parameters": dict(torch.nn.Linear(2, 2).named_parameters()),
        "nested": {"model": {"w": torch.ones(2)}, "step": 3},
    }


@pytest.mark.parametrize("case", list(_left_to_the_general_path()))
def test_what_the_columns_leave_to_the_general_path(case: str, tmp_path: Path) -> None:
    source = tmp_path / "x.pt"
    torch.save(_left_to_the_general_path()[case], source)
    assert read_flat_file(source) is None
    report = converter.convert_file(source)
    assert report.verified


def test_the_legacy_format_goes_to_the_general_path(tmp_path: Path) -> None:
    source = tmp_path / "old.bin"
    torch.save({"w": torch.ones(3)}, source, _use_new_zipfile_serialization=False)
    assert read_flat_file(source) is None
    assert converter.convert_file(source).tensors == 1


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"__metadata__": torch.ones(2), "w": torch.ones(1)}, "reserves"),
        ({"a": torch.zeros(0), "b": torch.zeros(0, 2)}, "only empty tensors"),
        ({"state": torch.ones(1), "param_groups": torch.ones(1)}, "optimizer"),
        ({"w\ud800": torch.ones(2), "v": torch.ones(1)}, "lone surrogate"),
        ({"": torch.ones(2), "v": torch.ones(1)}, "a tensor has an empty name"),
    ],
)
def test_files_the_general_path_refuses_are_refused(state: dict[str, Any], message: str, tmp_path: Path) -> None:
    source = tmp_path / "x.bin"
    torch.save(state, source)
    assert read_flat_file(source) is None
    with pytest.raises(TiesafeError, match=message):
        converter.convert_file(source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_a_damaged_local_header_is_the_general_paths_error(tmp_path: Path) -> None:
    source = tmp_path / "x.bin"
    torch.save({f"w{i}": torch.ones(64) for i in range(3)}, source)
    data = bytearray(source.read_bytes())
    at = data.index(b"PK\x03\x04", data.index(b"/data/1") - 64)  # the local header of storage 1
    data[at : at + 4] = b"XX\x03\x04"
    source.write_bytes(bytes(data))
    assert read_flat_file(source) is None
    # Left for the copy to read, the header is met mid-copy: the output so far is discarded.
    assert read_flat_file(source, read_starts=False) is not None
    with pytest.raises(TiesafeError, match="no valid local header"):
        converter.convert_file(source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_storages_out_of_their_headers_order_go_to_the_general_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "x.bin"
    torch.save({f"w{i}": torch.randn(64) for i in range(3)}, source)
    data = bytearray(source.read_bytes())
    at = data.index(b"PK\x03\x04", data.index(b"/data/0") - 64)  # the local header of storage 0
    (extra,) = struct.unpack_from("<H", data, at + 28)
    struct.pack_into("<H", data, at + 28, extra + 320)  # its data now starts past storage 1's
    source.write_bytes(bytes(data))
    flat = read_flat_file(source, read_starts=False)
    assert flat is not None  # taken for flat until the copy reads the headers
    fast, fast_report, general, general_report = _both(tmp_path, monkeypatch, source)
    assert fast == general and fast_report == general_report


def test_storages_in_torch_1s_order_are_read_as_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import zipfile

    from converter.flat_convert import FlatPlan

    # torch 1.x wrote an archive's storages sorted by key as strings (0, 1, 10, 11, 2, ...), not
    # in the order it pickled them: the output's order is the file's, as the general path's.
    state = {f"w{i}": torch.randn(4 + i) for i in range(12)}
    plain, source = tmp_path / "plain.bin", tmp_path / "x.bin"
    torch.save(state, plain)
    with zipfile.ZipFile(plain) as archive, zipfile.ZipFile(source, "w", zipfile.ZIP_STORED) as out:
        infos = archive.infolist()
        storages = [i for i in infos if i.filename.rsplit("/", 1)[-1].isdigit() and "/data/" in i.filename]
        assert [i.filename for i in storages] != sorted(i.filename for i in storages)
        by_string = iter(sorted(storages, key=lambda i: i.filename))
        for info in infos:
            chosen = next(by_string) if info in storages else info
            out.writestr(chosen.filename, archive.read(chosen))
    flat = read_flat_file(source)
    assert flat is not None
    assert not isinstance(FlatPlan(flat, None).order, range)  # rows reordered to the file's order
    fast, fast_report, general, general_report = _both(tmp_path, monkeypatch, source)
    assert fast == general and fast_report == general_report
    loaded = load_file(tmp_path / "fast.safetensors")
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state.items()) and loaded.keys() == state.keys()


def test_a_compressed_storage_is_the_general_paths_error(tmp_path: Path) -> None:
    import zipfile

    plain = tmp_path / "plain.bin"
    torch.save({f"w{i}": torch.zeros(256) for i in range(3)}, plain)
    source = tmp_path / "x.bin"
    with zipfile.ZipFile(plain) as original, zipfile.ZipFile(source, "w") as rewritten:
        for info in original.infolist():  # the same archive with one storage deflated
            deflate = info.filename.endswith("/data/1")
            rewritten.writestr(info.filename, original.read(info), zipfile.ZIP_DEFLATED if deflate else 0)
    assert read_flat_file(source) is None
    with pytest.raises(TiesafeError, match="storage '1' is compressed"):
        converter.convert_file(source)


def test_a_folders_checkpoint_from_columns_is_the_general_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from converter import folder as folder_module

    state = _experts(300)
    first = dict(list(state.items())[:150])
    second = dict(list(state.items())[150:])
    files = [tmp_path / "pytorch_model-00001-of-00002.bin", tmp_path / "pytorch_model-00002-of-00002.bin"]
    torch.save(first, files[0])
    torch.save(second, files[1])
    fast = folder_module.read_folder_checkpoint(files, None)
    monkeypatch.setattr(folder_module, "read_flat_file", lambda *args, **kwargs: None)
    general = folder_module.read_folder_checkpoint(files, None)
    assert fast == general
    assert list(fast.tensors) == list(general.tensors) and list(fast.storages) == list(general.storages)


def test_a_copy_that_misplaces_bytes_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "x.bin"
    torch.save({f"w{i}": torch.randn(8) for i in range(10)}, source)
    real = flat_convert._copy_ranges

    def copy(src: int, dst: int, ranges: list[tuple[int, int]], position: int) -> None:
        real(src, dst, ranges, position)
        os.pwrite(dst, b"\xff", position + 4 * 8 * 3 + 5)  # a byte of w3

    monkeypatch.setattr(flat_convert, "_copy_ranges", copy)
    with pytest.raises(VerificationError, match="'w3' differs from the source"):
        converter.convert_file(source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]  # nothing left behind


def test_a_source_changed_during_the_conversion_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "x.bin"
    torch.save({f"w{i}": torch.randn(8) for i in range(3)}, source)
    real = flat_convert.verify_written

    def verify(*args: Any) -> int:
        os.utime(source, ns=(1, 1))  # a training job rewrote it meanwhile
        return real(*args)

    monkeypatch.setattr(flat_convert, "verify_written", verify)
    with pytest.raises(TiesafeError, match="changed while it was being converted"):
        converter.convert_file(source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_a_header_that_says_other_than_planned_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "x.bin"
    torch.save({"a": torch.randn(2, 3), "b": torch.randn(3, 2)}, source)
    real = flat_convert.StagedWrites.start_streamed

    def start_streamed(self: Any, dst: Path, header: Iterable[bytes], data_size: int) -> tuple[int, Path, int]:
        pieces = list(header)
        swapped = [p.replace(b'"shape":[3,2]', b'"shape":[2,3]') for p in pieces]  # valid JSON, the same size, wrong
        assert swapped != pieces and list(map(len, swapped)) == list(map(len, pieces))
        return real(self, dst, swapped, data_size)

    monkeypatch.setattr(flat_convert.StagedWrites, "start_streamed", start_streamed)
    with pytest.raises(VerificationError, match="'b' is not described as planned"):
        converter.convert_file(source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


@pytest.mark.parametrize(
    "text",
    [
        '{"a":1,"b":{"c":[1,2]},"d":"x"}',
        ' \n{ "a" : 1 ,\t"b":[ ] }  ',
        "{}",
        '{"\\u00e9\\"q":{"k":"\\ud83d\\ude00"}}',
        '{"a":1,"a":2}',  # both members, in order (json.loads keeps the last)
    ],
)
def test_members_are_what_json_reads(text: str) -> None:
    import json

    members = list(jsonstream.members([text]))
    assert dict(members) == json.loads(text)
    assert [key for key, _ in members] == [key for key, _ in json.loads(text, object_pairs_hook=list)]
    for cut in range(len(text) + 1):  # the text in pieces, cut anywhere (a header read a block at a time)
        for pieces in ([text[:cut], text[cut:]], [text[:cut], "", *text[cut:]]):
            assert list(jsonstream.members(pieces)) == members, pieces


@pytest.mark.parametrize(
    "text", ['{"a":1', '{"a":1}}', '{"a" 1}', "{a:1}", '{"a":1,}', "[1", '{"a":1} x', "", '{"a":12', '{"a":1 2}', "{,}"]
)
def test_members_refuse_what_json_refuses(text: str) -> None:
    import json

    with pytest.raises(ValueError):
        json.loads(text)
    with pytest.raises(ValueError):
        list(jsonstream.members([text]))
    for cut in range(len(text) + 1):
        with pytest.raises(ValueError):
            list(jsonstream.members([text[:cut], *text[cut:]]))


def test_inspect_and_verify_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "pytorch_model.bin"
    torch.save(_experts(300), source)
    out = converter.convert_file(source).output
    fast = (inspect(source).to_dict(), verify_file(source, out))
    rows = inspect(source).tensors  # made as they are read
    with monkeypatch.context() as patch:
        _general(patch)
        general = (inspect(source).to_dict(), verify_file(source, out))
        listed = inspect(source).tensors
    assert fast == general
    assert not isinstance(rows, list) and isinstance(listed, list)
    assert list(rows) == listed and len(rows) == len(listed)
    assert rows[-1] == listed[-1] and rows[7] == listed[7] and rows[5:9] == listed[5:9]


def _header(path: Path) -> tuple[int, dict[str, Any]]:
    import json

    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    return 8 + size, json.loads(data[8 : 8 + size])


@pytest.mark.parametrize("tamper", ["bytes", "dtype", "extra", "missing"])
def test_verify_names_what_differs(tamper: str, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = {f"w{i}": torch.randn(3) for i in range(4)}
    source = tmp_path / "x.bin"
    torch.save(state, source)
    other = dict(state)
    if tamper == "bytes":
        other["w2"] = state["w2"].clone()
        other["w2"][1] += 1
    elif tamper == "dtype":
        other["w1"] = state["w1"].double()
    elif tamper == "extra":
        other["w9"] = torch.ones(1)
    else:
        del other["w3"]
    out = tmp_path / "x.safetensors"
    save_file(other, out)
    message = {
        "bytes": "'w2' differs from the source",
        "dtype": "'w1' is F64\\[3\\] in the output but F32\\[3\\]",
        "extra": "output has a tensor the source lacks: 'w9'",
        "missing": "'w3' is missing from the output",
    }[tamper]
    with pytest.raises(VerificationError, match=message):
        verify_file(source, out)


def test_verify_reads_tiesafes_own_layout_as_it_goes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import save_file

    from converter.flat_convert import verify_as_planned, verify_flat
    from converter.stfile import read_safetensors

    state = _experts(300)
    source = tmp_path / "x.bin"
    torch.save(state, source)
    out = Path(converter.convert_file(source).output)
    flat = read_flat_file(source)
    assert flat is not None
    assert verify_as_planned(flat, out) == verify_flat(flat, read_safetensors(out)) > 0
    other = tmp_path / "other.safetensors"  # the same tensors as another writer lays them out
    save_file(load_file(out), other)
    assert verify_as_planned(flat, other) is None  # read whole instead, whose verdict stands
    assert verify_file(source, other).names == len(state)

    def unread(path: Any) -> None:
        raise AssertionError("tiesafe's own output is read as it goes, never whole")

    monkeypatch.setattr(convert_module, "read_safetensors", unread)
    assert verify_file(source, out).names == len(state)
    header_end, header = _header(out)
    _, end = header["model.layers.0.mlp.experts.7.up_proj.weight"]["data_offsets"]
    data = bytearray(out.read_bytes())
    data[header_end + end - 1] ^= 1
    out.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match=r"'model\.layers\.0\.mlp\.experts\.7\.up_proj\.weight' differs"):
        verify_file(source, out)


def test_a_name_set_twice_goes_to_the_general_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import zipfile

    # torch.save never writes a name twice (a dict's keys are distinct), but a pickle can: the
    # later value wins, as the general path reads it. "w7" written again where "w3" was.
    state = {f"w{i}": torch.full((2,), float(i)) for i in range(9)}
    plain, source = tmp_path / "plain.bin", tmp_path / "x.bin"
    torch.save(state, plain)
    with zipfile.ZipFile(plain) as archive, zipfile.ZipFile(source, "w", zipfile.ZIP_STORED) as out:
        for info in archive.infolist():
            data = archive.read(info)
            if info.filename.endswith("/data.pkl"):
                assert data.count(b"X\x02\x00\x00\x00w3") == 1
                data = data.replace(b"X\x02\x00\x00\x00w3", b"X\x02\x00\x00\x00w7")
            out.writestr(info.filename, data)
    assert read_flat_file(source) is None
    fast, fast_report, general, general_report = _both(tmp_path, monkeypatch, source)
    assert fast == general and fast_report == general_report
    loaded = load_file(tmp_path / "fast.safetensors")
    assert "w3" not in loaded and torch.equal(loaded["w7"], state["w7"])


@pytest.mark.parametrize("count", [0, 1, 4095, 4096, 4097, 9000])
def test_a_header_in_pieces_is_the_json_of_the_whole(count: int) -> None:
    import json

    from converter.layout import encode_header, header_pieces

    rows = [(f"n.{i}.\u00e9", "F32", (2, i), 8 * i, 8 * i + 8, None) for i in range(count)]
    for metadata in ({}, {"format": "pt"}):
        document: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        for name, dtype, shape, begin, end, _ in rows:
            document[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
        expected = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
        pieces = list(header_pieces(rows, metadata))
        assert b"".join(pieces) == expected and all(pieces) and len(pieces) <= count // 4096 + 2
        header = encode_header(rows, metadata)
        assert header[8:].rstrip(b" ") == expected and len(header) % 8 == 0
        assert int.from_bytes(header[:8], "little") == len(header) - 8


def test_a_file_of_many_tensors_read_and_written_in_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from converter.readers import flat_state_dict

    # 12,000 tensors at the default sizes: a pickle of more than one 1 MiB block (the window
    # moves on), names in several chunks, a header of several pieces read back in two blocks.
    torch.manual_seed(1)
    state = {
        f"model.layers.{i // 300}.mlp.experts.{i % 300}.w": torch.randn(2, dtype=torch.bfloat16) for i in range(12_000)
    }
    source = tmp_path / "pytorch_model.bin"
    torch.save(state, source)
    blocks = []
    real = flat_state_dict._Reader.ahead

    def ahead(self: Any, pos: int) -> int:
        moved = real(self, pos)
        blocks.append(moved != pos)
        return moved

    monkeypatch.setattr(flat_state_dict._Reader, "ahead", ahead)
    flat = read_flat_file(source)
    assert flat is not None and len(flat) == 12_000 and sum(blocks) >= 2
    fast, fast_report, general, general_report = _both(tmp_path, monkeypatch, source)
    assert fast == general and fast_report == general_report
    assert int.from_bytes(fast[:8], "little") > 1 << 20  # the header is read back in two blocks
    loaded = load_file(tmp_path / "fast.safetensors")
    assert list(loaded) == list(state) and all(torch.equal(loaded[k], v) for k, v in state.items())


def test_inspect_of_a_safetensors_file_as_columns_is_the_whole_headers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from converter.stcolumns import read_header_columns

    source = tmp_path / "x.bin"
    torch.save(_experts(300), source)
    ours = Path(converter.convert_file(source).output)
    shuffled = tmp_path / "shuffled.safetensors"  # header order is not data order
    header_end, header = _header(ours)
    items = list(header.items())
    random.Random(5).shuffle(items)
    text = json.dumps(dict(items)).encode()
    text += b" " * (-len(text) % 8)
    shuffled.write_bytes(len(text).to_bytes(8, "little") + text + ours.read_bytes()[header_end:])
    tied = tmp_path / "tied.bin"
    weight = torch.randn(4, 3)
    torch.save({"embed.weight": weight, "lm_head.weight": weight}, tied)
    tied_out = Path(converter.convert_file(tied).output)
    columns = read_header_columns(shuffled)
    assert columns is not None and not isinstance(columns.order, range)
    assert read_header_columns(tied_out) is None  # ties: read whole
    for path in (ours, shuffled, tied_out):
        report = inspect(path).to_dict()
        with monkeypatch.context() as patch:
            patch.setattr(convert_module, "read_header_columns", lambda *args: None)
            assert report == inspect(path).to_dict(), path


def test_a_header_nested_too_deeply_is_refused_not_a_crash(tmp_path: Path) -> None:
    deep = '{"w": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(ValueError):
        list(jsonstream.members([deep]))
    source, out = tmp_path / "x.bin", tmp_path / "x.safetensors"
    torch.save({"w": torch.ones(2)}, source)
    raw = ('{"__metadata__": {"format": "pt"}, ' + deep[1:]).encode()
    out.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    for check in (lambda: verify_file(source, out), lambda: inspect(out)):
        with pytest.raises(TiesafeError, match="not valid JSON"):
            check()
