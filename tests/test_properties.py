"""Properties over random state dicts: convert -> load gives the source back, bit for bit, shared as it was.

Hypothesis draws storages of every dtype with random bytes (NaN payloads, -0.0 and
all), then names on them: the whole storage, aliases (the same tensor object),
slices, transposes, overlapping and self-overlapping (stride 0) windows, empty and
0-dim tensors. Each state dict is saved with ``torch.save`` (zip or legacy),
converted, and loaded back with ``converter.load_file``.

CI runs ``TIESAFE_EXAMPLES`` examples per property (default 30); for a long run:

    TIESAFE_EXAMPLES=3000 python -m pytest tests/test_properties.py
"""

from __future__ import annotations

import io
import os
import pickle
import tempfile
from pathlib import Path

import pytest
import torch
from corpus import craft as c
from helpers import SAFETENSORS_DTYPES, same_bits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import converter
from converter.errors import TiesafeError
from converter.readers.pickle_guard import scan
from converter.readers.torchfile import read_checkpoint

EXAMPLES = int(os.environ.get("TIESAFE_EXAMPLES", "30"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

DTYPES = SAFETENSORS_DTYPES


@st.composite
def _storage(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    numel = draw(st.integers(0, 40))
    size = numel * torch.empty(0, dtype=dtype).element_size()
    raw = bytearray(draw(st.binary(min_size=size, max_size=size)))
    if dtype == torch.bool:  # a bool byte other than 0/1 is no valid bool
        raw = bytearray(b & 1 for b in raw)
    flat = torch.frombuffer(raw, dtype=torch.uint8).clone() if size else torch.zeros(0, dtype=torch.uint8)
    return flat.view(dtype) if size else torch.zeros(0, dtype=dtype)


@st.composite
def _window(draw: st.DrawFn, base: torch.Tensor) -> torch.Tensor:
    """A random strided window inside ``base``'s storage (may overlap itself or others)."""
    numel = base.numel()
    ndim = draw(st.integers(0, 3))
    shape = [draw(st.integers(0 if numel == 0 else 1, 4)) for _ in range(ndim)]
    stride = [draw(st.integers(0, 6)) for _ in range(ndim)]
    reach = sum((n - 1) * s for n, s in zip(shape, stride, strict=True)) + 1 if all(shape) else 0
    if reach > numel:  # too far: shrink to a contiguous window that fits
        shape, stride = [numel], [1]
        reach = numel
    offset = draw(st.integers(0, max(0, numel - reach))) if numel else 0
    return base.as_strided(shape, stride, offset)


KINDS = ["whole", "alias", "window", "slice", "transpose"]


@st.composite
def state_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for s in range(draw(st.integers(1, 4))):
        base = draw(_storage())
        kinds = draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=4))
        for k, kind in enumerate(kinds):
            name = f"s{s}.{kind}{k}"
            if kind == "whole" or base.numel() == 0:
                state[name] = base
            elif kind == "alias" and state:
                state[name] = state[draw(st.sampled_from(sorted(state)))]  # the very same tensor object
            elif kind == "slice":
                start = draw(st.integers(0, base.numel() - 1))
                state[name] = base[start : draw(st.integers(start, base.numel()))]
            elif kind == "transpose" and base.numel() % 2 == 0:
                state[name] = base.view(2, -1).t()
            else:
                state[name] = draw(_window(base))
    return state


def _span(t: torch.Tensor) -> tuple[int, int, int]:
    """(storage address, first byte, one past the last byte) of the memory ``t`` touches."""
    size = t.element_size()
    start = t.storage_offset() * size
    if t.numel() == 0:
        return t.untyped_storage().data_ptr(), start, start
    reach = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True)) + 1
    return t.untyped_storage().data_ptr(), start, start + reach * size


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the two touch a common byte (an empty tensor touches none)."""
    (pa, sa, ea), (pb, sb, eb) = _span(a), _span(b)
    return pa == pb and sa < ea and sb < eb and sa < eb and sb < ea


def _geometry(t: torch.Tensor) -> tuple[object, ...]:
    return (t.dtype, t.storage_offset(), tuple(t.shape), t.stride())


def _relative(a: torch.Tensor, b: torch.Tensor) -> int:
    return (b.storage_offset() - a.storage_offset()) * a.element_size()


def _strides_where_it_matters(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(s for n, s in zip(t.shape, t.stride(), strict=True) if n > 1)


def _convert(state: dict[str, torch.Tensor], folder: Path, legacy: bool, materialize: bool) -> Path:
    source = folder / "source.bin"
    torch.save(state, source, _use_new_zipfile_serialization=not legacy)
    if all(t.numel() == 0 for t in state.values()):  # nothing but empty tensors is never written (exit 0, no weights)
        with pytest.raises(TiesafeError, match="holds only empty tensors"):
            converter.convert_file(source, folder / "out.safetensors")
        state["anchor"] = torch.ones(1)  # the caller checks the round trip with a weight beside them
        torch.save(state, source, _use_new_zipfile_serialization=not legacy)
    report = converter.convert_file(source, folder / "out.safetensors", materialize_views=materialize)
    assert report.verified
    return Path(report.output)


@SETTINGS
@given(state=state_dicts(), legacy=st.booleans())
def test_round_trip_is_bit_exact_and_shared_as_in_the_source(state: dict[str, torch.Tensor], legacy: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        loaded = converter.load_file(_convert(state, Path(tmp), legacy, materialize=False))
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        assert same_bits(loaded[name], tensor), name
    names = sorted(state)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = _overlap(state[a], state[b])
            assert _overlap(loaded[a], loaded[b]) == shared, (a, b, shared)
            if not shared:
                continue
            if _geometry(state[a]) == _geometry(state[b]):  # aliases: one tensor (stored dense if it was not)
                assert _geometry(loaded[a]) == _geometry(loaded[b]), (a, b)
                continue
            # Views of one another: the same windows on one memory, offsets and strides as in the source.
            assert _relative(loaded[a], loaded[b]) == _relative(state[a], state[b]), (a, b)
            for name in (a, b):
                assert _strides_where_it_matters(loaded[name]) == _strides_where_it_matters(state[name]), name


@SETTINGS
@given(state=state_dicts(), legacy=st.booleans())
def test_materialized_views_keep_aliases_and_nothing_else(state: dict[str, torch.Tensor], legacy: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = _convert(state, Path(tmp), legacy, materialize=True)
        loaded = converter.load_file(out)
        clones = converter.load_file(out, ties="clone")
    names = sorted(state)
    for name in names:
        assert same_bits(loaded[name], state[name]) and same_bits(clones[name], state[name]), name
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            alias = _overlap(state[a], state[b]) and _geometry(state[a]) == _geometry(state[b])
            assert _overlap(loaded[a], loaded[b]) == alias, (a, b)
            assert not _overlap(clones[a], clones[b]), (a, b)


@SETTINGS
@given(raw=st.binary(min_size=8, max_size=64), dtypes=st.lists(st.sampled_from(DTYPES[:9]), min_size=2, max_size=3))
def test_the_same_bytes_under_several_dtypes_survive(raw: bytes, dtypes: list[torch.dtype]) -> None:
    """torch.save refuses it, a crafted file does it: no tie says 'these bytes, as another dtype', so each is stored."""
    raw = raw[: len(raw) // 8 * 8]
    views = [
        c.call(
            c.glob("torch._utils", "_rebuild_tensor_v3"),
            c.storage("0", len(raw), "UntypedStorage", module="torch.storage"),
            c.integer(0),
            c.tup(c.integer(len(raw) // _itemsize(d))),
            c.tup(c.integer(1)),
            c.FALSE,
            c.call(c.glob("collections", "OrderedDict")),
            c.glob("torch", str(d).removeprefix("torch.")),
        )
        for d in dtypes
    ]
    body = c.program(c.state_dict(*((f"as{i}", v) for i, v in enumerate(views))))
    with tempfile.TemporaryDirectory() as tmp:
        source = c.torch_zip(Path(tmp) / "mixed.bin", body, {"0": raw})
        loaded = converter.load_file(converter.convert_file(source).output)
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    for i, dtype in enumerate(dtypes):
        assert same_bits(loaded[f"as{i}"], flat.view(dtype)), dtype


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


_PLAIN = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.complex_numbers(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.binary(max_size=8).map(bytearray)
    | st.builds(range, st.integers(-5, 5), st.integers(-5, 5))
    | st.builds(slice, st.integers(0, 5), st.none() | st.integers(0, 5)),
    lambda children: (
        st.lists(children, max_size=4)
        | st.tuples(children, children)
        | st.dictionaries(st.text(max_size=4) | st.integers(-5, 5), children, max_size=4)
        | st.frozensets(st.integers(-(2**64), 2**64) | st.text(max_size=3), max_size=4)
    ),
    max_leaves=30,
)


@SETTINGS
@given(value=_PLAIN, protocol=st.integers(0, 5))
def test_the_pickle_scan_accepts_every_plain_pickle(value: object, protocol: int) -> None:
    """The opcode scan refuses attacks, not pickles: whatever Python pickles, it reads through."""
    data = pickle.dumps(value, protocol=protocol)
    stream = io.BytesIO(data + b"trailing storages")
    assert scan(stream, max_bytes=len(data)) == data
    assert stream.tell() == len(data)


@SETTINGS
@given(extra=_PLAIN, protocol=st.sampled_from([2, 3, 4, 5]), legacy=st.booleans())
def test_training_checkpoints_read_like_torch_load(extra: object, protocol: int, legacy: bool) -> None:
    """Weights wrapped with arbitrary Python values read as torch.load reads them."""
    state = {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(3)}
    checkpoint = {"model": state, "extra": extra, "epoch": 7}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt.pt"
        torch.save(checkpoint, path, pickle_protocol=protocol, _use_new_zipfile_serialization=not legacy)
        read = read_checkpoint(path)
    assert read.wrapper == "model" and set(read.tensors) == set(state)
    assert sorted(entry.split(":")[0] for entry in read.skipped) == ["epoch", "extra"]


def _foreign(plain: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    """Objects of other libraries that training code pickles beside the weights."""
    import argparse
    import collections
    import datetime
    import fractions
    import types

    import numpy as np

    return st.one_of(
        st.dictionaries(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), plain, max_size=4).map(
            lambda kw: argparse.Namespace(**kw)
        ),
        st.dictionaries(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), plain, max_size=4).map(
            lambda kw: types.SimpleNamespace(**kw)
        ),
        st.floats(allow_nan=False).map(np.float64),
        st.integers(-(2**31), 2**31 - 1).map(np.int32),
        st.lists(st.floats(allow_nan=False, width=32), max_size=5).map(lambda v: np.array(v, dtype=np.float32)),
        st.lists(plain, max_size=4).map(lambda v: collections.defaultdict(list, {"k": v})),
        st.integers(0, 10**9).map(lambda n: datetime.datetime.fromtimestamp(n, tz=datetime.timezone.utc)),
        st.tuples(st.integers(-99, 99), st.integers(1, 99)).map(lambda t: fractions.Fraction(*t)),
    )


@SETTINGS
@given(data=st.data(), protocol=st.sampled_from([2, 3, 4, 5]), legacy=st.booleans())
def test_foreign_objects_beside_weights_are_inert(data: st.DataObject, protocol: int, legacy: bool) -> None:
    """Any harmless foreign object is read as an inert placeholder: the weights convert and nothing is imported."""
    extra = data.draw(_foreign(_PLAIN))
    state = {"w": torch.arange(6.0).view(2, 3), "tied": None}
    state["tied"] = state["w"]
    checkpoint = {"model": state, "extra": extra, "nested": {"more": [extra, data.draw(_foreign(_PLAIN))]}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt.pt"
        torch.save(checkpoint, path, pickle_protocol=protocol, _use_new_zipfile_serialization=not legacy)
        report = converter.convert_file(path)
        loaded = converter.load_file(report.output)
    assert report.wrapper == "model" and report.aliases == {"tied": "w"}
    assert any(entry.startswith("extra: ") and entry.endswith("(inert)") for entry in report.skipped), report.skipped
    assert same_bits(loaded["w"], state["w"]) and loaded["tied"] is loaded["w"]


@pytest.mark.parametrize("legacy", [False, True])
def test_a_large_checkpoint_reads_quickly_through_the_scan(tmp_path: Path, legacy: bool) -> None:
    """5,000 tensors: the scan must not refuse a big honest pickle (memo, keys, depth all stay in bounds)."""
    state = {f"layer.{i}.weight": torch.zeros(2) for i in range(5_000)}
    path = tmp_path / "big.bin"
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    assert len(read_checkpoint(path).tensors) == 5_000
