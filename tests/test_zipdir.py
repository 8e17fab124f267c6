"""Our central-directory reader against zipfile's, on archives that torch and zipfile write."""

from __future__ import annotations

import random
import zipfile
from array import array
from pathlib import Path

import pytest
import torch

from converter.errors import CorruptFileError
from converter.readers import zipdir
from converter.readers.zipdir import Member, read_directory, read_member


def _ours(path: Path) -> list[Member]:
    with open(path, "rb") as raw:
        return read_directory(raw, path.stat().st_size)


def _zipfiles(path: Path) -> list[Member]:
    with zipfile.ZipFile(path) as archive:
        return [
            Member(i.filename, i.header_offset, i.compress_type, i.compress_size, i.file_size, i.flag_bits, i.CRC)
            for i in archive.infolist()
        ]


def _members_read_alike(path: Path) -> None:
    ours = _ours(path)
    assert ours == _zipfiles(path)
    size = path.stat().st_size
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        for member in ours:
            assert read_member(raw, member, size) == archive.read(member.filename), member.filename


def test_torch_save_archives(tmp_path: Path) -> None:
    state = {f"layers.{i}.weight": torch.randn(3, 2) for i in range(300)}  # memo slots past 255
    state["tied"] = state["layers.0.weight"]
    path = tmp_path / "model.bin"
    torch.save(state, path)
    _members_read_alike(path)
    assert len(_ours(path)) > 300


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_comment_prefix_and_compression(tmp_path: Path, compression: int) -> None:
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w", compression) as archive:
        archive.comment = b"a comment the end record announces"
        for i in range(20):
            archive.writestr(f"a/data/{i}", bytes(range(i * 7 % 256)) * 3)
        archive.writestr("a/ünïcode", b"x")  # the UTF-8 flag
    _members_read_alike(path)
    # Bytes before the archive (a self-extracting stub): every offset shifts by their length.
    prefixed = tmp_path / "prefixed.zip"
    prefixed.write_bytes(b"#!/bin/sh\nexit 0\n" * 10 + path.read_bytes())
    _members_read_alike(prefixed)


def test_zip64_records_and_extra_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # zipfile writes zip64 end records past 65,535 members and zip64 extra fields past 4 GiB;
    # lowering its limits makes it write both layouts for a small archive.
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 4)
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 64)
    path = tmp_path / "z64.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(10):
            archive.writestr(f"z/data/{i}", bytes([i]) * (40 + 20 * i))
    monkeypatch.undo()
    raw = path.read_bytes()
    assert b"PK\x06\x06" in raw and b"PK\x06\x07" in raw
    assert any(m.file_size > 64 for m in _ours(path))
    _members_read_alike(path)


def test_a_directory_read_a_block_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Records of every length (names, extra fields, comments) cut across blocks anywhere: the
    # blocks made small, with the record bound lowered to fit (these records are shorter).
    path = tmp_path / "many.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(300):
            info = zipfile.ZipInfo(f"p/data/{i}" + "x" * (i % 37))
            info.comment = b"c" * (i % 11)
            info.extra = b"\xfe\xca" + (i % 5).to_bytes(2, "little") + bytes(i % 5)
            archive.writestr(info, bytes(i % 7))
    monkeypatch.setattr(zipdir, "_RECORD_MAX", 120)
    for block in (120, 121, 250, 997):
        monkeypatch.setattr(zipdir, "_DIRECTORY_BLOCK", block)
        _members_read_alike(path)
    data = path.read_bytes()
    cut = tmp_path / "cut.zip"  # the directory's last record cut short, its end record intact
    end = data.rindex(b"PK\x05\x06")
    cut.write_bytes(data[: end - 3] + data[end:])
    with pytest.raises(CorruptFileError):
        _ours(cut)


def test_damaged_directories_are_refused_or_read_as_zipfile_reads_them(tmp_path: Path) -> None:
    source = tmp_path / "model.bin"
    torch.save({f"w{i}": torch.randn(2) for i in range(8)}, source)
    clean = source.read_bytes()
    directory = clean.index(b"PK\x01\x02")
    rng = random.Random(16)
    outcomes = {"refused": 0, "same": 0}
    for trial in range(400):
        data = bytearray(clean)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(directory, len(data))] = rng.randrange(256)
        if trial % 5 == 0:
            data = data[: rng.randrange(len(data) // 2, len(data))]
        path = tmp_path / f"m{trial}.bin"
        path.write_bytes(bytes(data))
        try:
            ours = _ours(path)
        except CorruptFileError:
            outcomes["refused"] += 1
            continue
        try:
            theirs = _zipfiles(path)
        except (zipfile.BadZipFile, ValueError, NotImplementedError, EOFError, OSError):
            continue  # zipfile refuses what we read (an extra field we never need): ours stays consistent
        assert ours == theirs, trial
        outcomes["same"] += 1
    assert outcomes["refused"] > 50 and outcomes["same"] > 50, outcomes


def test_a_small_member_is_bounded_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a/data.pkl", b"\x00" * 100_000)
    member = _ours(path)[0]
    size = path.stat().st_size
    with open(path, "rb") as raw:
        assert read_member(raw, member, size) == b"\x00" * 100_000
        with pytest.raises(CorruptFileError, match="another size"):
            read_member(raw, member._replace(file_size=10), size)  # a bomb that lies about its size
        with pytest.raises(CorruptFileError, match="CRC"):
            read_member(raw, member._replace(crc=member.crc ^ 1), size)


def test_a_stored_member_in_blocks_is_the_member_whole(tmp_path: Path) -> None:
    from converter.readers.zipdir import iter_member

    data = bytes(random.Random(3).randrange(256) for _ in range(10_000))
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("a/data.pkl", data)
        archive.writestr("a/empty", b"")
    member, empty = _ours(path)
    size = path.stat().st_size
    with open(path, "rb") as raw:
        for block in (1, 999, 10_000, 1 << 20):
            blocks = list(iter_member(raw, member, size, block=block))
            assert b"".join(blocks) == data and max(map(len, blocks)) == min(block, len(data))
        assert list(iter_member(raw, empty, size)) == [] and read_member(raw, empty, size) == b""
        damaged = iter_member(raw, member._replace(crc=member.crc ^ 1), size, block=4096)
        assert len(next(damaged)) == 4096 and len(next(damaged)) == 4096  # read as it goes ...
        with pytest.raises(CorruptFileError, match="CRC"):
            next(damaged)  # ... and refused before its last block is given
        with pytest.raises(CorruptFileError, match="CRC"):
            list(iter_member(raw, empty._replace(crc=1), size))


def _zipfile_data_starts(path: Path) -> dict[str, int]:
    """Where each member's data starts, as zipfile finds it (its file position after opening it)."""
    with zipfile.ZipFile(path) as archive:
        starts = {}
        for info in archive.infolist():
            with archive.open(info) as member:
                starts[info.filename] = member._fileobj.tell()  # type: ignore[attr-defined]
        return starts


@pytest.mark.parametrize(
    ("count", "block", "read_ahead"),
    [(3, 1024, False), (600, 1024, True), (600, 64 * 1024, False)],  # few; many, read one by one; many a block
)
def test_data_starts_as_zipfile_finds_them_read_ahead_or_not(
    count: int, block: int, read_ahead: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "x.bin"
    torch.save({f"w{i}": torch.randn(700 + i) for i in range(count)}, path)  # headers 3 KiB apart and more
    monkeypatch.setattr(zipdir, "_HEADERS_BLOCK", block)
    started: list[int] = []
    real = zipdir.ReadAhead

    def spy(fd: int, start: int, end: int) -> object:
        started.append(start)
        return real(fd, start, end)

    monkeypatch.setattr(zipdir, "ReadAhead", spy)
    with open(path, "rb") as raw:
        ours = zipdir.data_starts(raw, read_directory(raw, path.stat().st_size), path.stat().st_size)
    assert ours == _zipfile_data_starts(path)
    # Many headers, each read on its own: the file is read ahead in a thread. Read a block of
    # many at a time, the reads go through the file already.
    assert bool(started) == read_ahead


def _archive(path: Path, names: list[str]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("p/data.pkl", b"\x80\x02}q\x00.")
        for i, name in enumerate(names):
            archive.writestr(name, bytes(range(8 + i)))
    return path


def test_the_storage_table_holds_every_member_as_the_directory_reads_it(tmp_path: Path) -> None:
    from converter.readers.containers import open_torch_zip

    # Numbered members held as rows (in any order, with a gap), the rest by name: a key with a
    # leading zero, a name that is not a number, one far past the others, nested folders.
    keys = ["10", "0", "2", "1", "007", "x", "99999999", "a/1", "3"]
    path = _archive(tmp_path / "x.bin", [f"p/data/{key}" for key in keys])
    by_name = {m.filename: m for m in _ours(path)}
    with open(path, "rb") as raw:
        _, table = open_torch_zip(raw, path.stat().st_size)
    for key in keys:
        assert table.get(key) == by_name[f"p/data/{key}"], key
    assert table.get("4") is None and table.get("11") is None and table.get("01") is None
    numbers = ["10", "0", "2", "1", "99999999", "3"]  # every number: in C, or by name when far out
    sizes = [by_name[f"p/data/{key}"].file_size for key in numbers]
    offsets = [by_name[f"p/data/{key}"].header_offset for key in numbers]
    assert table.stored([int(k) for k in numbers], sizes) == (array("q", offsets), array("q", sizes))
    numbered = [by_name[f"p/data/{k}"] for k in ("0", "1", "2", "3", "10")]  # all rows: read in C
    numbered_sizes = [m.file_size for m in numbered]
    assert table.stored([0, 1, 2, 3, 10], numbered_sizes) == (
        array("q", [m.header_offset for m in numbered]),
        array("q", numbered_sizes),
    )
    assert table.stored([0, 4], [1, 1]) is None  # no member 4
    assert table.stored([0, 5000], [1, 1]) is None  # none so far out
    assert table.stored([0], [by_name["p/data/0"].file_size + 1]) is None  # more bytes than its member holds


def test_a_storage_number_held_twice_is_refused(tmp_path: Path) -> None:
    from converter.readers.containers import open_torch_zip

    with pytest.warns(UserWarning, match="Duplicate name"):
        path = _archive(tmp_path / "x.bin", ["p/data/0", "p/data/1", "p/data/1"])
    with open(path, "rb") as raw, pytest.raises(CorruptFileError, match="duplicate member names"):
        open_torch_zip(raw, path.stat().st_size)
