"""Many small tensors (mixture-of-experts shape): copied and compared in batches, still bit for bit.

The batch limits are lowered so that a small checkpoint makes many batches: the
batches break on size, on gaps, on dtype order and at the large tensors between them.
"""

from __future__ import annotations

import gc
import os
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from helpers import same_bits
from hypothesis import given, settings
from hypothesis import strategies as st

import converter
from converter import windows, writer
from converter.errors import VerificationError
from converter.gcpause import paused_gc
from converter.stfile import read_safetensors


@pytest.fixture
def small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(windows, "SMALL_RANGE", 4096)  # ranges below 4 KiB are copied in batches
    monkeypatch.setattr(windows, "BATCH_BYTES", 16 * 1024)  # at most 16 KiB per batch
    monkeypatch.setattr(windows, "SMALL_COMPARE", 16 * 1024)


def _experts(path: Path, *, legacy: bool = False) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for layer in range(3):
        for expert in range(20):
            for proj in ("gate", "up", "down"):
                state[f"layers.{layer}.experts.{expert}.{proj}.weight"] = torch.randn(8, 16).to(torch.bfloat16)
        state[f"layers.{layer}.norm.weight"] = torch.randn(4)  # another dtype: written before the bf16 ones
        state[f"layers.{layer}.big.weight"] = torch.randn(64, 64)  # 16 KiB: one kernel copy
    state["tied"] = state["layers.0.experts.0.gate.weight"]
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return state


@pytest.mark.parametrize("legacy", [False, True])
def test_small_tensors_are_copied_in_batches_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_batches: None, legacy: bool
) -> None:
    state = _experts(tmp_path / "moe.bin", legacy=legacy)
    batches: list[int] = []
    copies: list[int] = []
    real_read, real_copy = writer.read_pieces, writer._copy_range

    def read(fd: int, pieces: list[windows.Range], *buffers: bytearray) -> int:
        batches.append(len(pieces))
        return real_read(fd, pieces, *buffers)

    def copy(*args: int) -> None:
        copies.append(args[-1])
        real_copy(*args)

    monkeypatch.setattr(writer, "read_pieces", read)
    monkeypatch.setattr(writer, "_copy_range", copy)
    report = converter.convert_file(tmp_path / "moe.bin", tmp_path / "moe.safetensors")
    assert report.verified and report.stored == len(state) - 1
    assert copies == [16384] * 3  # the large tensors alone
    # 183 small tensors in batches of at most 16 KiB (64 bf16 tensors of 256 bytes, or fewer)
    assert sum(batches) == report.stored - 3 and len(batches) < 20 and max(batches) > 10
    loaded = converter.load_file(report.output)
    assert set(loaded) == set(state) and all(same_bits(loaded[n], state[n]) for n in state)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_difference_inside_a_batch_names_its_tensor(tmp_path: Path, small_batches: None, where: str) -> None:
    _experts(tmp_path / "moe.bin")
    output = Path(converter.convert_file(tmp_path / "moe.bin", tmp_path / "moe.safetensors").output)
    names = [n for n in read_safetensors(output).entries if ".experts." in n]
    name = {"first": names[0], "middle": names[len(names) // 2], "last": names[-1]}[where]
    entry = read_safetensors(output).entries[name]
    data = bytearray(output.read_bytes())
    data[entry.start + entry.nbytes - 1] ^= 0x01
    output.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match=f"'{name}' differs from the source"):
        converter.verify_file(tmp_path / "moe.bin", output)


def test_batched_verification_reads_only_what_landed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_batches: None
) -> None:
    _experts(tmp_path / "moe.bin")
    written: dict[str, int] = {}
    early: list[tuple[str, int]] = []
    compared = threading.Event()
    real_advance, real_read = writer.WriteProgress.advance, windows.read_pieces

    def advance(self: writer.WriteProgress, path: Path, end: int) -> None:
        written[str(path)] = end
        real_advance(self, path, end)

    def read(fd: int, pieces: list[windows.Range], *buffers: bytearray) -> int:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.endswith(writer.TEMP_SUFFIX):
            compared.set()
            offset, nbytes = pieces[-1]
            if written.get(path, 0) < offset + nbytes:
                early.append((path, offset))
        return real_read(fd, pieces, *buffers)

    monkeypatch.setattr(writer.WriteProgress, "advance", advance)
    monkeypatch.setattr(windows, "read_pieces", read)
    assert converter.convert_file(tmp_path / "moe.bin", tmp_path / "moe.safetensors").verified
    assert compared.is_set() and early == []


def test_a_slip_in_the_writers_gather_is_caught_by_verification(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, small_batches: None
) -> None:
    """Verification reads a run's source as one span, not through the gather the writer uses:
    a gather that misplaces bytes (here: ignores the bytes between storages) cannot vouch for itself."""
    _experts(tmp_path / "moe.bin")

    def gather_without_gaps(fd: int, pieces: list[windows.Range], buffer: bytearray, scratch: bytearray) -> int:
        nbytes = sum(n for _, n in pieces)
        windows.read_into(fd, memoryview(buffer)[:nbytes], pieces[0][0])
        return nbytes

    monkeypatch.setattr(writer, "read_pieces", gather_without_gaps)
    monkeypatch.setattr(windows, "read_pieces", gather_without_gaps)  # wherever verification might use it
    with pytest.raises(converter.TiesafeError, match="differs from the source"):
        converter.convert_file(tmp_path / "moe.bin", tmp_path / "moe.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe.bin"]


@settings(max_examples=40, deadline=None)
@given(
    spans=st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 300)), min_size=1, max_size=30),
    scratch=st.sampled_from([1, 64, 4096]),
)
def test_read_pieces_reads_any_pieces_in_place(spans: list[tuple[int, int]], scratch: int) -> None:
    """Pieces close together, far apart (beyond the scratch buffer) or out of order: each lands in place."""
    data = os.urandom(5400)
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        buffer = bytearray(sum(n for _, n in spans))
        assert windows.read_pieces(f.fileno(), spans, buffer, bytearray(scratch)) == len(buffer)
    assert bytes(buffer) == b"".join(data[o : o + n] for o, n in spans)


def test_the_collector_is_paused_inside_nested_and_threaded_blocks() -> None:
    assert gc.isenabled()
    inside = threading.Event()
    leave = threading.Event()
    seen: list[bool] = []

    def other() -> None:
        with paused_gc():
            inside.set()
            leave.wait(10)
            seen.append(gc.isenabled())

    thread = threading.Thread(target=other)
    with paused_gc():
        thread.start()
        inside.wait(10)
        with paused_gc():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert not gc.isenabled()  # the other thread's block is still open
    leave.set()
    thread.join()
    assert seen == [False] and gc.isenabled()
    gc.disable()
    try:
        with paused_gc():
            pass
        assert not gc.isenabled()  # off before: left off
    finally:
        gc.enable()
