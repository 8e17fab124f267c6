"""The flat state dict reader against the general path: same trees, or it stands aside.

The property that matters: whenever the fast reader accepts a pickle, the general path
(opcode scan + restricted unpickler) accepts it too and builds the same tree, records
the same storages in the same order and sees the same globals.
"""

from __future__ import annotations

import collections
import io
import pickle
import random
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from converter.dtypes import BYTE
from converter.errors import TiesafeError
from converter.geometry import contiguous_strides
from converter.readers import flat_state_dict
from converter.readers.flat_state_dict import read_flat_columns, read_flat_state_dict
from converter.readers.torchfile import read_tree
from converter.readers.unpickler import StorageNode, UnpickleContext, is_storage_number, storage_fields, unpickle


def _data_pkl(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with zipfile.ZipFile(buffer) as archive:
        return archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))


class _Storages:
    """An ``on_storage`` that records its calls, as read_zip's does (one node per key)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, int]] = []
        self.nodes: dict[str, StorageNode] = {}

    def __call__(self, data: tuple[object, ...]) -> StorageNode:
        storage_type, key, location, numel = storage_fields(data)
        self.calls.append((storage_type.name, key, location, numel))
        if key not in self.nodes:
            self.nodes[key] = StorageNode(key, storage_type.dtype or BYTE, 0, storage_type.unsupported)
        return self.nodes[key]


def _summary(root: Any, storages: _Storages, context: UnpickleContext) -> tuple[Any, ...]:
    if not isinstance(root, dict):  # a mutant can make the root anything: the fast reader never does
        return type(root), storages.calls, context.globals_seen
    entries = [(type(name), name, type(node).__name__, getattr(node, "ref", None)) for name, node in root.items()]
    shared = [id(node) for node in root.values()]
    same_object = [shared.index(i) for i in shared]  # which names hold one object
    return type(root), entries, same_object, storages.calls, context.globals_seen


def _general(data: bytes) -> tuple[Any, ...]:
    storages, context = _Storages(), UnpickleContext()
    root = unpickle(io.BytesIO(data), context, storages)
    return _summary(root, storages, context)


def _fast(data: bytes) -> tuple[Any, ...] | None:
    storages, context = _Storages(), UnpickleContext()
    root = read_flat_state_dict(data, context, storages)
    return None if root is None else _summary(root, storages, context)


def _state_dicts() -> dict[str, Any]:
    torch.manual_seed(0)
    base = torch.randn(6, 4)
    tied = {"embed.weight": base, "head.weight": base, "bias": torch.zeros(4)}
    views = {"whole": base, "row": base[2], "column": base[:, 1], "tail": base.reshape(-1)[5:]}
    many = {f"model.layers.{i}.mlp.experts.{j}.w": torch.randn(2, 2) for i in range(3) for j in range(400)}
    dtypes = {str(d): torch.ones(3, dtype=d) for d in (torch.float16, torch.bfloat16, torch.int64, torch.bool)}
    odd = {
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 3),
        "five_dims": torch.zeros(1, 2, 1, 2, 1),
        "名前.weight": torch.ones(2),
        "0": torch.ones(1),  # a name that is also a storage key
        "cpu": torch.ones(1),  # ... and a location
    }
    same = torch.ones(2)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Sequential(torch.nn.Linear(3, 1)))
    model.register_buffer("counter", torch.zeros((), dtype=torch.int64))
    return {
        "model.state_dict() (with _metadata)": model.state_dict(),
        "tied": tied,
        "views": views,
        "many (long memo, batches)": many,
        "dtypes": dtypes,
        "odd": odd,
        "one entry": {"only": torch.ones(2)},
        "empty dict": {},
        "ordered": collections.OrderedDict(tied),
        "same object twice": {"a": same, "b": same, "c": torch.zeros(1)},
    }


@pytest.mark.parametrize("case", list(_state_dicts()))
def test_torch_save_pickles_read_alike(case: str) -> None:
    data = _data_pkl(_state_dicts()[case])
    assert _fast(data) == _general(data)


def test_what_the_fast_reader_leaves_to_the_general_path() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    others = {
        "parameters": dict(model.named_parameters()),
        "nested": {"model": {"w": torch.ones(2)}},
        "a number beside": {"w": torch.ones(2), "step": 3},
    }
    for name, obj in others.items():
        data = _data_pkl(obj)
        assert _fast(data) is None, name
        _general(data)  # the general path reads them
    protocol4 = io.BytesIO()
    torch.save({"w": torch.ones(2)}, protocol4, pickle_protocol=4)
    with zipfile.ZipFile(protocol4) as archive:
        assert _fast(archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))) is None


def _mutants(data: bytes, rng: random.Random, count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        mutated = bytearray(data)
        small_ints = [i + 1 for i in range(len(mutated) - 1) if mutated[i] == 0x4B]  # BININT1's argument
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(mutated) or 1)
            action = rng.random()
            if action < 0.4 and small_ints:  # a number changes: shapes, offsets, memo slots read back
                where, value = rng.choice(small_ints), rng.randrange(256)
                if where < len(mutated):  # an earlier deletion may have shortened it
                    mutated[where] = value
            elif action < 0.6 and at < len(mutated):
                mutated[at] = rng.randrange(256)
            elif action < 0.8:
                del mutated[at : at + rng.randint(1, 8)]
            else:
                mutated[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        out.append(bytes(mutated))
    return out


def test_whatever_it_accepts_the_general_path_accepts_alike() -> None:
    rng = random.Random(14)
    seeds = [_data_pkl(sd) for name, sd in _state_dicts().items() if name != "many (long memo, batches)"]
    seeds.append(_data_pkl({f"e.{i}": torch.ones(1) for i in range(300)}))
    accepted = refused_by_both = 0
    for mutant in (m for seed in seeds for m in _mutants(seed, rng, 250)):
        fast = _fast(mutant)
        try:
            general = _general(mutant)
        except TiesafeError:
            assert fast is None, mutant  # the fast reader never accepts what the general path refuses
            refused_by_both += 1
            continue
        if fast is not None:
            assert fast == general, mutant
            accepted += 1
    assert accepted > 100 and refused_by_both > 100, (accepted, refused_by_both)


def test_hostile_pieces_in_the_template_go_to_the_general_path() -> None:
    data = _data_pkl({f"w{i}": torch.ones(2) for i in range(4)})
    # A memo write far out of order (a 16 GB memo in the C unpickler) in place of a BINPUT.
    at = data.rindex(b"Rq") + 1  # the memo write after the last REDUCE
    bomb = data[:at] + b"r\x00\x00\x00\x40" + data[at + 2 :]
    assert bomb != data and _fast(bomb) is None
    with pytest.raises(TiesafeError, match="memo"):
        _general(bomb)
    # A global that runs code where the storage class stands.
    evil = data.replace(b"ctorch\nFloatStorage\n", b"cposix\nsystem\n", 1)
    assert _fast(evil) is None
    with pytest.raises(TiesafeError, match="refused"):
        _general(evil)


def test_a_whole_file_reads_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = {f"layers.{i}.w": torch.randn(3, 2) for i in range(1200)}
    state["tied"] = state["layers.3.w"]
    path = tmp_path / "pytorch_model.bin"
    torch.save(state, path)
    fast = read_tree(path)
    monkeypatch.setattr("converter.readers.containers.read_flat_state_dict", lambda *args: None)
    general = read_tree(path)
    assert [(k, v.ref) for k, v in fast.root.items()] == [(k, v.ref) for k, v in general.root.items()]
    assert fast.records == general.records and fast.globals == general.globals
    assert pickle.loads(pickle.dumps(fast.root["tied"].ref)) == general.root["layers.3.w"].ref


# --------------------------------------------------------------------------- columns


def _columns(data: bytes) -> tuple[Any, ...] | None:
    return _columns_of(data)


def _columns_of(data: bytes | Iterator[bytes]) -> tuple[Any, ...] | None:
    context = UnpickleContext()
    columns = read_flat_columns(data, context)
    if columns is None or not columns.names_distinct():
        return None
    dtypes = [d.code for d in columns.dtypes]
    return (
        list(columns.names),
        list(columns.keys),
        dtypes,
        columns.shapes,
        columns.nbytes,
        columns.locations,
        context.globals_seen,
    )


def _general_columns(data: bytes) -> tuple[Any, ...] | None:
    """What the columns must be, from the general path's tree: None unless every value is a
    supported tensor that is a whole, contiguous storage of its own, numbered as torch numbers them."""
    storages, context = _Storages(), UnpickleContext()
    root = unpickle(io.BytesIO(data), context, storages)
    if not isinstance(root, dict) or not root:
        return None
    numel = {key: count for _, key, _, count in storages.calls}
    location = {key: where for _, key, where, _ in storages.calls}
    names, keys, dtypes, shapes, sizes, locations = [], [], [], [], [], []
    for name, node in root.items():
        ref = getattr(node, "ref", None)
        if (
            type(name) is not str
            or ref is None
            or ref.offset
            or ref.stride != contiguous_strides(ref.shape)
            or ref.numel != numel[ref.storage]
            or not is_storage_number(ref.storage)
        ):
            return None
        names.append(name)
        keys.append(int(ref.storage))
        dtypes.append(ref.dtype.code)
        shapes.append(ref.shape)
        sizes.append(ref.nbytes)
        locations.append(location[ref.storage])
    if len(set(keys)) != len(keys) or len(storages.calls) != len(keys):
        return None
    return names, keys, dtypes, shapes, sizes, locations, context.globals_seen


@pytest.mark.parametrize("case", list(_state_dicts()))
def test_columns_are_the_general_trees_or_none(case: str) -> None:
    data = _data_pkl(_state_dicts()[case])
    expected = _general_columns(data)
    got = _columns(data)
    if got is None:
        # Left to the general path: shared storage, views, names that repeat a string of the
        # pickle (a storage key, the location) and are read back from its memo.
        assert expected is None or case in ("odd",), case
    else:
        assert got == expected, case


@pytest.mark.parametrize("block", [1, 5, 64, 1000])
def test_columns_of_a_pickle_read_in_blocks_are_those_of_the_whole(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # The window held ahead of each entry made small, so that it moves on in every place it can:
    # between items, within a run of rows, before the _metadata and its STOP.
    monkeypatch.setattr(flat_state_dict, "_MARGIN", 300)
    cases = dict(_state_dicts())
    model = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(40)])
    cases["model.state_dict() (long _metadata)"] = model.state_dict()
    for case, state in cases.items():
        data = _data_pkl(state)
        whole = _columns(data)
        in_blocks = _columns_of(iter([data[i : i + block] for i in range(0, len(data), block)]))
        assert in_blocks == whole, case
    data = _data_pkl(cases["many (long memo, batches)"])
    assert _columns_of(iter([data[:-1]])) is None  # the pickle cut short: never a verdict, the general path's
    assert _columns_of(iter([data, b"."])) is None  # bytes after STOP


def test_columns_of_a_mixture_of_experts_and_a_model() -> None:
    experts = {
        f"model.layers.{i}.mlp.experts.{j}.{w}.weight": torch.randn(4, 2, dtype=torch.bfloat16)
        for i in range(2)
        for j in range(150)
        for w in ("gate_proj", "up_proj", "down_proj")
    }
    experts["model.norm.weight"] = torch.ones(2)  # another storage class midway
    experts["lm_head.weight"] = torch.randn(5, 2, dtype=torch.bfloat16)
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    for case in (experts, model.state_dict(), {"scalar": torch.tensor(2.0), "v": torch.arange(3)}):
        data = _data_pkl(case)
        got = _columns(data)
        assert got is not None and got == _general_columns(data)
        assert got[0] == list(case)


def test_whatever_the_columns_accept_the_general_path_reads_alike() -> None:
    rng = random.Random(16)
    seeds = [
        _data_pkl({f"e.{i}": torch.ones(2, 1) for i in range(300)}),
        _data_pkl({"a": torch.ones(3), "b": torch.zeros(2, dtype=torch.float16), "c": torch.tensor(1)}),
        _data_pkl(torch.nn.Linear(2, 3).state_dict()),
    ]
    accepted = 0
    for mutant in (m for seed in seeds for m in _mutants(seed, rng, 700)):
        got = _columns(mutant)
        if got is None:
            continue
        assert got == _general_columns(mutant), mutant  # accepted: the general path agrees (and does not refuse)
        accepted += 1
    assert accepted > 8, accepted


def test_hostile_pieces_are_never_columns() -> None:
    data = _data_pkl({f"w{i}": torch.ones(2) for i in range(300)})
    at = data.rindex(b"Rr") + 1  # the last memo write, LONG_BINPUT: far out of order instead
    bomb = data[:at] + b"r\x00\x00\x00\x40" + data[at + 5 :]
    assert bomb != data and _columns(bomb) is None
    assert _columns(data.replace(b"ctorch\nFloatStorage\n", b"cposix\nsystem\n", 1)) is None
    rewrite = data.replace(b"h\x02((", b"h\x06((", 5)  # a memo read of the location where the function stands
    assert rewrite != data and _columns(rewrite) is None
