"""Faults while writing: killed, disk full, read-only, no permission, other file system, source changing, races.

Whatever happens, the destination is absent or a complete file (the previous one, or
the new one fully written and verified), the source is untouched, and a temporary
file is either removed or recognisably ours (``.<name>.<random>.tiesafe-tmp``) and
removed by the next write.

``TIESAFE_FAULT_RUNS`` sets how many kill and race rounds run (default 16 each).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from corpus.cli import popen_cli, run_cli

import converter
from converter import convert as convert_module
from converter.errors import TiesafeError, WriteError

RUNS = int(os.environ.get("TIESAFE_FAULT_RUNS", "16"))
TEMP_SUFFIX = ".tiesafe-tmp"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(TEMP_SUFFIX))


def _checkpoint(path: Path, seed: int, mib: int = 1) -> Path:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(mib * 256 * 1024, generator=generator)  # 4 bytes each
    torch.save({"w": w.view(-1, 256), "tied": w.view(-1, 256), "b": torch.randn(16, generator=generator)}, path)
    return path


def _one_line_exit_2(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


# --------------------------------------------------------------------------- killed mid-write


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, bytes, bytes]:
    """Checkpoints A and B (48 MiB each, so that a write takes a while) and their complete conversions."""
    folder = tmp_path_factory.mktemp("sources")
    a, b = _checkpoint(folder / "a.bin", 1, mib=48), _checkpoint(folder / "b.bin", 2, mib=48)
    outputs = []
    for source in (a, b):
        out = folder / f"{source.stem}.safetensors"
        converter.convert_file(source, out)
        outputs.append(out.read_bytes())
    return a, b, outputs[0], outputs[1]


def _kill_during(args: list[object], folder: Path, delay: float, after_temp: bool) -> bool:
    """Start a conversion, SIGKILL it ``delay`` s after it starts (or after its temp file appears).

    Returns whether a temporary file existed at the moment of the kill.
    """
    process = popen_cli(*args)
    deadline = time.monotonic() + 60
    if after_temp:
        while not _temps(folder) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.0005)
    time.sleep(delay)
    mid_write = bool(_temps(folder))
    process.send_signal(signal.SIGKILL)
    process.communicate()
    return mid_write


def test_sigkill_at_random_points_never_leaves_a_partial_destination(
    two_sources: tuple[Path, Path, bytes, bytes], tmp_path: Path
) -> None:
    _, b, out_a, out_b = two_sources
    rng = random.Random(5)
    dst = tmp_path / "model.safetensors"
    started = time.monotonic()
    assert run_cli("convert", b, dst).returncode == 0
    full = time.monotonic() - started
    mid_write_kills = 0
    for round_ in range(RUNS):
        previous = None
        if round_ % 2 == 0:  # half the rounds replace an existing file, half write a new one
            dst.write_bytes(out_a)
            previous = out_a
        else:
            dst.unlink(missing_ok=True)
        after_temp = round_ % 3 != 0
        delay = rng.uniform(0, full / 2 if after_temp else full)
        mid_write_kills += _kill_during(["convert", b, dst, "--overwrite"], tmp_path, delay, after_temp)
        if dst.exists():
            allowed = {hashlib.sha256(x).hexdigest() for x in (previous, out_b) if x is not None}
            assert _digest(dst) in allowed, f"round {round_}: the destination is neither the previous nor the new file"
        leftovers = _temps(tmp_path)
        assert all(name.startswith(".model.safetensors.") for name in leftovers), leftovers
    assert mid_write_kills >= RUNS // 4, "too few kills landed while the temporary file existed"
    # The next write cleans what the killed ones left.
    assert run_cli("convert", b, dst, "--overwrite").returncode == 0
    assert dst.read_bytes() == out_b
    assert _temps(tmp_path) == []


def test_stale_temps_are_removed_but_a_live_writers_temp_is_not(tmp_path: Path) -> None:
    source = _checkpoint(tmp_path / "x.bin", 3)
    dst = tmp_path / "x.safetensors"
    stale = [tmp_path / f".x.safetensors.{name}{TEMP_SUFFIX}" for name in ("abcd1234", "zz_9yy8x")]
    for path in stale:
        path.write_bytes(b"half a file")
    unrelated = [
        tmp_path / f".x.safetensors.backup{TEMP_SUFFIX}",  # not our 8-character random part
        tmp_path / f".y.safetensors.abcd1234{TEMP_SUFFIX}",  # another destination's
        tmp_path / "x.safetensors.abcd1234",
    ]
    for path in unrelated:
        path.write_bytes(b"not ours")
    target = tmp_path / "elsewhere"
    target.write_bytes(b"keep me")
    link = tmp_path / f".x.safetensors.lnk12345{TEMP_SUFFIX}"
    link.symlink_to(target)
    live = tmp_path / f".x.safetensors.live1234{TEMP_SUFFIX}"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('locked', flush=True); time.sleep(60)",
            str(live),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        converter.convert_file(source, dst)
        assert not any(p.exists() for p in stale)
        assert all(p.exists() for p in unrelated) and live.exists()
        assert link.is_symlink() and target.read_bytes() == b"keep me"
    finally:
        holder.kill()
        holder.wait()
    converter.convert_file(source, dst, overwrite=True)  # its writer is gone now: removed
    assert not live.exists()


def test_a_temp_is_locked_by_its_writer_until_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a conversion runs, another process cannot take the lock on its temporary file."""
    source = _checkpoint(tmp_path / "x.bin", 4)
    seen: list[bool] = []
    real = convert_module.verify_output

    def probe(*args: object, **kwargs: object) -> object:
        (name,) = _temps(tmp_path)
        probe_script = (
            "import fcntl, sys\n"
            "f = open(sys.argv[1])\n"
            "try:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept OSError:\n    sys.exit(3)\n"
        )
        code = subprocess.run([sys.executable, "-c", probe_script, str(tmp_path / name)]).returncode
        seen.append(code == 3)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(convert_module, "verify_output", probe)
    converter.convert_file(source)
    assert seen == [True]
    assert fcntl.LOCK_EX  # the lock is an flock: released by the kernel when a killed writer's fds close


# --------------------------------------------------------------------------- disk full


def _limit_file_size(limit: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed by SIGXFSZ
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_file_size_limit_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    source = _checkpoint(tmp_path / "x.bin", 5, mib=4)
    before = _digest(source)
    out = tmp_path / "out"
    out.mkdir()
    result = run_cli("convert", source, out / "x.safetensors", preexec_fn=lambda: _limit_file_size(1 << 20))
    _one_line_exit_2(result, "cannot write the output (File too large)", "nothing was left behind")
    assert list(out.iterdir()) == [] and _digest(source) == before


@contextlib.contextmanager
def _mounted_tmpfs(options: str) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="tiesafe-mnt-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        folder.rmdir()
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); the RLIMIT_FSIZE test covers it")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)
        folder.rmdir()


def test_full_disk_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    source = _checkpoint(tmp_path / "x.bin", 6, mib=4)
    before = _digest(source)
    with _mounted_tmpfs("size=1m") as disk:
        result = run_cli("convert", source, disk / "x.safetensors")
        _one_line_exit_2(result, "No space left on device", "free some space or write elsewhere")
        assert list(disk.iterdir()) == []
    assert _digest(source) == before


# --------------------------------------------------------------------------- read-only, permissions


def test_read_only_file_system_is_a_clear_error(tmp_path: Path) -> None:
    source = _checkpoint(tmp_path / "x.bin", 7)
    before = _digest(source)
    with _mounted_tmpfs("ro,size=1m") as disk:
        result = run_cli("convert", source, disk / "x.safetensors")
        _one_line_exit_2(result, "Read-only file system", "choose another output path")
        assert list(disk.iterdir()) == []
    assert _digest(source) == before


def _without_root_bypass() -> None:
    """In the child: root keeps its uid but loses CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH, so mode bits apply."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP: gone after exec
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_permission_denied_is_a_clear_error(tmp_path: Path) -> None:
    """As root every folder is writable; the child drops the capabilities that make it so."""
    source = _checkpoint(tmp_path / "x.bin", 8)
    before = _digest(source)
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        result = run_cli("convert", source, out / "x.safetensors", preexec_fn=_without_root_bypass)
    finally:
        out.chmod(0o755)
    _one_line_exit_2(result, "Permission denied", "choose an output folder you may write to")
    assert list(out.iterdir()) == [] and _digest(source) == before


def test_immutable_folder_is_a_clear_error_even_for_root(tmp_path: Path) -> None:
    """chattr +i makes a folder unwritable for root too (EPERM)."""
    source = _checkpoint(tmp_path / "x.bin", 9)
    out = tmp_path / "out"
    out.mkdir()
    made = subprocess.run(["chattr", "+i", str(out)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"chattr +i is not available here ({made.stderr.decode().strip()}); see the permission test")
    try:
        result = run_cli("convert", source, out / "x.safetensors")
        _one_line_exit_2(result, "Operation not permitted", "nothing was left behind")
        assert list(out.iterdir()) == []
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=True)


def test_unreadable_source_is_a_clear_error(tmp_path: Path) -> None:
    """The reader says it in one line; the CLI refuses before it (click's readable check, a usage error)."""
    source = _checkpoint(tmp_path / "x.bin", 10)
    source.chmod(0o000)
    out = tmp_path / "out"
    out.mkdir()
    script = (
        "import sys, converter\n"
        "try:\n    converter.convert_file(sys.argv[1], sys.argv[2])\n"
        "except converter.TiesafeError as exc:\n    print(exc)\n"
    )
    try:
        api = subprocess.run(
            [sys.executable, "-c", script, str(source), str(out / "x.safetensors")],
            capture_output=True,
            text=True,
            preexec_fn=_without_root_bypass,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        )
        cli = run_cli("convert", source, out / "x.safetensors", preexec_fn=_without_root_bypass)
    finally:
        source.chmod(0o644)
    assert api.stdout == f"{source}: permission denied\n", api.stderr
    assert cli.returncode == 2 and "Traceback" not in cli.stderr and f"{source}' is not readable" in cli.stderr
    assert list(out.iterdir()) == []


# --------------------------------------------------------------------------- other file systems


@pytest.mark.parametrize("direction", ["to-shm", "from-shm"])
def test_source_and_destination_on_different_file_systems(tmp_path: Path, direction: str) -> None:
    if not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a file system other than the temporary folder's")
    shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        here, there = (tmp_path, shm) if direction == "to-shm" else (shm, tmp_path)
        source = _checkpoint(here / "x.bin", 11, mib=2)
        result = run_cli("convert", source, there / "x.safetensors")
        assert result.returncode == 0, result.stderr
        assert converter.verify_file(source, there / "x.safetensors").names == 3
        loaded = converter.load_file(there / "x.safetensors")
        assert loaded["tied"] is loaded["w"]
        assert _temps(there) == []
    finally:
        shutil.rmtree(shm)


# --------------------------------------------------------------------------- the source changes


def _change_during_verification(monkeypatch: pytest.MonkeyPatch, change: object) -> None:
    """Run ``change(source)`` after the output is written and before it is renamed into place."""
    real = convert_module.verify_output

    def verify_then_change(checkpoint, files, expected, **options):  # type: ignore[no-untyped-def]
        report = real(checkpoint, files, expected, **options)
        change(checkpoint.path)  # type: ignore[operator]
        return report

    monkeypatch.setattr(convert_module, "verify_output", verify_then_change)


def _append(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"more")


def _touch_later(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def _replace_same_size_and_time(path: Path) -> None:
    st = path.stat()
    copy = path.with_suffix(".new")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    copy.write_bytes(bytes(data))
    os.utime(copy, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(copy, path)  # what a downloader finishing does: a new inode under the old name


@pytest.mark.parametrize(
    "change", [_append, _touch_later, _replace_same_size_and_time], ids=["grown", "touched", "replaced"]
)
def test_a_source_that_changes_during_conversion_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: object
) -> None:
    source = _checkpoint(tmp_path / "x.bin", 12)
    _change_during_verification(monkeypatch, change)
    with pytest.raises(TiesafeError, match="changed while it was being converted"):
        converter.convert_file(source, tmp_path / "x.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


@pytest.mark.parametrize("copy", ["_copy_range", "read_pieces"])  # one range per call, or a batch of them
def test_a_source_truncated_during_the_copy_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, copy: str
) -> None:
    from converter import windows, writer

    source = _checkpoint(tmp_path / "x.bin", 13)
    monkeypatch.setattr(windows, "SMALL_RANGE", 0 if copy == "_copy_range" else 1 << 20)
    real = getattr(writer, copy)

    def truncate_then_copy(*args: Any) -> Any:
        os.truncate(source, 1000)
        return real(*args)

    monkeypatch.setattr(writer, copy, truncate_then_copy)
    with pytest.raises(WriteError, match="source ended early"):
        converter.convert_file(source, tmp_path / "x.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]


def test_an_unchanged_source_is_not_flagged(tmp_path: Path) -> None:
    source = _checkpoint(tmp_path / "x.bin", 14)
    source.chmod(0o600)  # metadata changes that leave the bytes alone (ctime) do not count
    assert converter.convert_file(source).verified


# --------------------------------------------------------------------------- two writers


def test_two_processes_writing_one_destination_never_interleave(
    two_sources: tuple[Path, Path, bytes, bytes], tmp_path: Path
) -> None:
    """Last complete writer wins: each rename replaces the whole file atomically."""
    a, b, out_a, out_b = two_sources
    dst = tmp_path / "model.safetensors"
    for _ in range(max(2, RUNS // 2)):
        dst.unlink(missing_ok=True)
        first, second = popen_cli("convert", a, dst, "--overwrite"), popen_cli("convert", b, dst, "--overwrite")
        for process in (first, second):
            _, err = process.communicate(timeout=120)
            assert process.returncode == 0, err
        content = dst.read_bytes()
        assert content in (out_a, out_b), "the destination mixes the two writers"
        assert _temps(tmp_path) == []
    assert converter.verify_file(a if content == out_a else b, dst).names == 3


def test_without_overwrite_a_racing_writer_may_lose_but_never_corrupts(
    two_sources: tuple[Path, Path, bytes, bytes], tmp_path: Path
) -> None:
    a, b, out_a, out_b = two_sources
    dst = tmp_path / "model.safetensors"
    first, second = popen_cli("convert", a, dst), popen_cli("convert", b, dst)
    codes = [p.wait(timeout=120) for p in (first, second)]
    assert set(codes) <= {0, 2} and 0 in codes
    assert dst.read_bytes() in (out_a, out_b)
    assert _temps(tmp_path) == []
