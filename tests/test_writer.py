"""Writes are atomic, durable, verified before they land, and follow the umask."""

from __future__ import annotations

import ctypes
import errno
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import converter
from converter import convert as convert_module
from converter import verify as verify_module
from converter import windows as windows_module
from converter import writer as writer_module
from converter.errors import VerificationError, WriteError


def _checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "x.bin"
    w = torch.randn(32, 4)
    torch.save({"w": w, "tied": w, "b": torch.randn(4)}, path)
    return path


def test_failed_verification_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(windows_module, "SMALL_RANGE", 0)  # one copy and one comparison per tensor
    monkeypatch.setattr(windows_module, "SMALL_COMPARE", 0)
    source = _checkpoint(tmp_path)
    real_equal = windows_module.WindowComparer.equal
    monkeypatch.setattr(windows_module.WindowComparer, "equal", lambda self, a, b: False)
    with pytest.raises(VerificationError, match="differs from the source"):
        converter.convert_file(source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]  # no output, no temp file
    monkeypatch.setattr(windows_module.WindowComparer, "equal", real_equal)
    assert Path(converter.convert_file(source).output).exists()


def test_an_existing_output_survives_a_failed_overwrite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(windows_module, "SMALL_RANGE", 0)  # one copy and one comparison per tensor
    monkeypatch.setattr(windows_module, "SMALL_COMPARE", 0)
    source = _checkpoint(tmp_path)
    output = Path(converter.convert_file(source).output)
    before = output.read_bytes()
    monkeypatch.setattr(windows_module.WindowComparer, "equal", lambda self, a, b: False)
    with pytest.raises(VerificationError):
        converter.convert_file(source, overwrite=True)
    assert output.read_bytes() == before


def test_file_mode_follows_the_umask(tmp_path: Path) -> None:
    source = _checkpoint(tmp_path)
    old = os.umask(0o027)
    try:
        output = Path(converter.convert_file(source).output)
    finally:
        os.umask(old)
    assert output.stat().st_mode & 0o777 == 0o640


def test_no_verify_skips_the_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(windows_module, "SMALL_RANGE", 0)  # one copy and one comparison per tensor
    monkeypatch.setattr(windows_module, "SMALL_COMPARE", 0)
    source = _checkpoint(tmp_path)
    monkeypatch.setattr(windows_module.WindowComparer, "equal", lambda self, a, b: False)
    report = converter.convert_file(source, verify=False)
    assert report.verified is False and Path(report.output).exists()


def test_output_may_not_replace_the_source(tmp_path: Path) -> None:
    source = tmp_path / "x.safetensors"
    torch.save({"w": torch.ones(1)}, source)
    with pytest.raises(converter.TiesafeError, match="replace the source"):
        converter.convert_file(source, source)


def test_verify_file_catches_a_false_tie(tmp_path: Path) -> None:
    """An output claiming a tie the source does not have is refused even if values agree."""
    from safetensors.torch import save_file

    w = torch.zeros(4)
    source = tmp_path / "x.bin"
    torch.save({"a": w, "b": w.clone()}, source)  # equal values, not shared
    save_file({"a": w}, tmp_path / "fake.safetensors", metadata={"format": "pt", "b": "a"})
    with pytest.raises(VerificationError):
        converter.verify_file(source, tmp_path / "fake.safetensors")


@pytest.mark.parametrize("verify", [True, False])
def test_a_failed_fsync_is_a_one_line_write_error_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, verify: bool
) -> None:
    # The output is synced on a background thread while it is verified: its error must
    # still reach the caller, and the temporary file must still go.
    source = _checkpoint(tmp_path)
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        if os.path.isfile(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(writer_module.os, "fsync", failing_fsync)
    with pytest.raises(WriteError, match=r"cannot write the output \(Input/output error\)") as caught:
        converter.convert_file(source, verify=verify)
    assert "\n" not in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_verification_overlaps_the_sync_but_the_rename_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _checkpoint(tmp_path)
    events: list[str] = []
    real_fsync, real_replace, real_verify = os.fsync, os.replace, verify_module.verify_output
    verified = threading.Event()

    def background_fsync(fd: int) -> None:
        if threading.current_thread() is not threading.main_thread():
            # A slow disk: the sync ends only after verification finished (or 10 s passed),
            # which is possible only if verification does not wait for it.
            events.append("verified before the sync ended" if verified.wait(10) else "verification waited")
            real_fsync(fd)
            events.append("synced in the background")
        else:
            real_fsync(fd)

    def recording_replace(src: str | Path, dst: str | Path) -> None:
        events.append("renamed")
        real_replace(src, dst)

    def recording_verify(*args: Any, **kwargs: Any) -> Any:
        report = real_verify(*args, **kwargs)
        verified.set()
        return report

    monkeypatch.setattr(writer_module.os, "fsync", background_fsync)
    monkeypatch.setattr(writer_module.os, "replace", recording_replace)
    monkeypatch.setattr(convert_module, "verify_output", recording_verify)
    converter.convert_file(source)
    assert events == ["verified before the sync ended", "synced in the background", "renamed"]


def test_a_full_disk_fails_before_any_byte_is_copied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The output's blocks are reserved first, so a disk too small is told at once
    # rather than after copying most of a large model.
    source = _checkpoint(tmp_path)

    def no_space(fd: int, mode: int, offset: int, length: int) -> int:
        ctypes.set_errno(errno.ENOSPC)
        return -1

    copies: list[int] = []
    monkeypatch.setattr(writer_module, "_libc_fallocate", lambda: no_space)
    monkeypatch.setattr(writer_module, "_copy_range", lambda *args: copies.append(1))
    with pytest.raises(WriteError, match=r"No space left on device.*free some space") as caught:
        converter.convert_file(source)
    assert "\n" not in str(caught.value) and copies == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_file_systems_without_fallocate_still_convert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _checkpoint(tmp_path)

    def unsupported(fd: int, mode: int, offset: int, length: int) -> int:
        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1

    monkeypatch.setattr(writer_module, "_libc_fallocate", lambda: unsupported)
    report = converter.convert_file(source)
    assert report.verified and Path(report.output).stat().st_size == report.file_size


def _many_tensors(tmp_path: Path, count: int = 6) -> Path:
    path = tmp_path / "many.bin"
    state = {f"layer{i}.weight": torch.randn(64, 16) for i in range(count)}
    state["head.weight"] = state["layer0.weight"]  # a tie: the general pipeline (writer + trailing verifier)
    torch.save(state, path)
    return path


def test_verification_trails_the_writer_and_reads_only_what_landed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first tensor is verified while the last one is still to be copied: its bytes are
    # read back while they are in the page cache. No range is read before it is written.
    monkeypatch.setattr(windows_module, "SMALL_RANGE", 0)  # one copy and one comparison per tensor
    monkeypatch.setattr(windows_module, "SMALL_COMPARE", 0)
    source = _many_tensors(tmp_path)
    first_verified = threading.Event()
    written: dict[str, int] = {}
    reads_before_written: list[tuple[str, int]] = []
    trailed: list[bool] = []
    real_copy, real_advance, real_read = (
        writer_module._copy_range,
        writer_module.WriteProgress.advance,
        windows_module.read_into,
    )

    copies: list[int] = []

    def copy(*args: int) -> None:
        copies.append(1)
        if len(copies) == 6:  # before the last tensor: wait until the first one was verified
            trailed.append(first_verified.wait(10))
        real_copy(*args)

    def advance(self: writer_module.WriteProgress, path: Path, end: int) -> None:
        written[str(path)] = end
        real_advance(self, path, end)

    def read(fd: int, buffer: memoryview, offset: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.endswith(writer_module.TEMP_SUFFIX):  # the output being written
            if written.get(path, 0) < offset + len(buffer):
                reads_before_written.append((path, offset))
            first_verified.set()
        real_read(fd, buffer, offset)

    monkeypatch.setattr(writer_module, "_copy_range", copy)
    monkeypatch.setattr(writer_module.WriteProgress, "advance", advance)
    monkeypatch.setattr(windows_module, "read_into", read)
    report = converter.convert_file(source)
    assert report.verified and trailed == [True] and reads_before_written == []


def test_a_difference_found_mid_write_stops_the_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(windows_module, "SMALL_RANGE", 0)  # one copy and one comparison per tensor
    monkeypatch.setattr(windows_module, "SMALL_COMPARE", 0)
    source = _many_tensors(tmp_path)
    copies: list[int] = []
    check_failed = threading.Event()
    real_copy, real_run = writer_module._copy_range, writer_module._Checker._run

    def run(self: Any, check: Any, paths: list[Path]) -> None:
        real_run(self, check, paths)
        if self.error is not None:
            check_failed.set()

    def copy(*args: int) -> None:
        copies.append(1)
        if len(copies) > 1:
            check_failed.wait(10)  # the first tensor's check has failed before the second is copied
        real_copy(*args)

    monkeypatch.setattr(writer_module._Checker, "_run", run)
    monkeypatch.setattr(writer_module, "_copy_range", copy)
    monkeypatch.setattr(windows_module.WindowComparer, "equal", lambda self, a, b: False)
    with pytest.raises(VerificationError, match="differs from the source"):
        converter.convert_file(source)
    # The writer stops at the first tensor boundary after the failure: at the latest, the
    # copy in flight when it failed (the second) ends; none of the six after that is copied.
    assert len(copies) in (1, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.bin"]


def test_an_interrupted_write_releases_a_waiting_verifier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(windows_module, "SMALL_RANGE", 0)  # one copy and one comparison per tensor
    monkeypatch.setattr(windows_module, "SMALL_COMPARE", 0)
    source = _many_tensors(tmp_path)
    real_copy = writer_module._copy_range
    copies: list[int] = []

    def copy(*args: int) -> None:
        copies.append(1)
        if len(copies) == 3:
            raise KeyboardInterrupt  # Ctrl-C while the verifier waits for this tensor
        real_copy(*args)

    monkeypatch.setattr(writer_module, "_copy_range", copy)
    with pytest.raises(KeyboardInterrupt):
        converter.convert_file(source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.bin"]
    assert not [t for t in threading.enumerate() if t.name == "tiesafe-check"]  # the verifier ended


def _reads_of(monkeypatch: pytest.MonkeyPatch, *, cold: bool = True) -> list[tuple[int, int]]:
    """(offset, size) of every blocking ``os.preadv`` from now on (the read-ahead thread's reads);
    ``cold``: every block is taken as not cached (a file just written here is)."""
    reads: list[tuple[int, int]] = []
    real = os.preadv

    def preadv(fd: int, buffers: list[bytearray], offset: int, flags: int = 0) -> int:
        read = real(fd, buffers, offset, flags)
        if not flags:  # not the non-blocking probe of a page
            reads.append((offset, read))
        return read

    monkeypatch.setattr(os, "preadv", preadv)
    if cold:
        monkeypatch.setattr(writer_module.ReadAhead, "_cached", lambda self, page, offset: False)
    return reads


def _until(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + 10
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


def test_read_ahead_stays_within_its_lead_and_follows_the_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(1 << 20))
    monkeypatch.setattr(writer_module.ReadAhead, "LEAD", 64 * 1024)
    monkeypatch.setattr(writer_module.ReadAhead, "BLOCK", 16 * 1024)
    reads = _reads_of(monkeypatch)
    fd = os.open(source, os.O_RDONLY)
    try:
        with writer_module.ReadAhead(fd, 4096, 1 << 20) as ahead:
            assert _until(lambda: sum(n for _, n in reads) >= 64 * 1024)
            time.sleep(0.05)  # it would go on now if it did not wait for the copy
            assert reads[0][0] == 4096 and max(o + n for o, n in reads) <= 4096 + 64 * 1024 + 16 * 1024
            ranges = [(offset, 1024) for offset in range(4096, 1 << 20, 64 * 1024)]
            assert list(ahead.follow(ranges)) == ranges  # the ranges as they are, the reader told
            assert _until(lambda: max(o + n for o, n in reads) == 1 << 20)  # it read on to the end
    finally:
        os.close(fd)
    offsets = [o for o, _ in reads]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)  # front to back, each block once


def test_read_ahead_stops_when_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(bytes(1 << 20))
    monkeypatch.setattr(writer_module.ReadAhead, "LEAD", 32 * 1024)
    monkeypatch.setattr(writer_module.ReadAhead, "BLOCK", 16 * 1024)
    reads = _reads_of(monkeypatch)
    fd = os.open(source, os.O_RDONLY)
    try:
        ahead = writer_module.ReadAhead(fd, 0, 1 << 20)
        assert _until(lambda: len(reads) >= 2)
        ahead.close()  # the reader waits for the copy: closing wakes it and it ends
        assert not ahead._thread.is_alive()
    finally:
        os.close(fd)
    assert max(o + n for o, n in reads) <= 48 * 1024


def test_read_ahead_skips_what_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(1 << 20))  # just written: in the page cache
    monkeypatch.setattr(writer_module.ReadAhead, "BLOCK", 64 * 1024)
    reads = _reads_of(monkeypatch, cold=False)
    probes: list[int] = []
    real = writer_module.ReadAhead._cached

    def cached(self: writer_module.ReadAhead, page: bytearray, offset: int) -> bool:
        probes.append(offset)
        return real(self, page, offset)

    monkeypatch.setattr(writer_module.ReadAhead, "_cached", cached)
    fd = os.open(source, os.O_RDONLY)
    try:
        with writer_module.ReadAhead(fd, 0, 1 << 20):
            assert _until(lambda: len(probes) == 16)  # one probe a block, through to the end
    finally:
        os.close(fd)
    assert reads == []  # every block found cached: none read


def test_a_long_run_of_small_tensors_is_read_ahead_and_written_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _many_tensors(tmp_path, count=40)
    expected = converter.convert_file(source, tmp_path / "plain.safetensors")
    started: list[tuple[int, int]] = []
    real = writer_module.ReadAhead.__init__

    def init(self: writer_module.ReadAhead, fd: int, start: int, end: int) -> None:
        started.append((start, end))
        real(self, fd, start, end)

    monkeypatch.setattr(writer_module, "READ_AHEAD_FROM", 8)
    monkeypatch.setattr(writer_module.ReadAhead, "__init__", init)
    report = converter.convert_file(source, tmp_path / "ahead.safetensors")
    assert started and report.verified and report.aliases == expected.aliases
    assert (tmp_path / "ahead.safetensors").read_bytes() == (tmp_path / "plain.safetensors").read_bytes()
