"""A zip archive's central directory, read as plain tuples; where its members' data starts; its small members.

:mod:`zipfile` builds a ``ZipInfo`` object for every member: about 10 µs and half a
KiB each, which a mixture-of-experts checkpoint (one member per storage, 100,000 of
them) turns into a second of CPU and 50 MB before the first tensor is read. The
reader needs five numbers a member, so the directory is parsed here in one pass
over one read, by the same rules :mod:`zipfile` applies (end record, zip64 records
and extra fields, data prepended to the archive, names up to a NUL byte); the
tests hold the two readers to the same answers.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, NamedTuple

from ..errors import CorruptFileError, quoted
from ..readahead import READ_AHEAD_FROM, ReadAhead

STORED = 0
DEFLATED = 8
_END = struct.Struct("<4s4H2LH")  # end of central directory record
_END64_LOCATOR = struct.Struct("<4sLQL")
_END64 = struct.Struct("<4sQ2H2L4Q")
_CENTRAL = struct.Struct("<4s2xBx2H4x3L3H8xL")  # one member's central directory record
_LOCAL = struct.Struct("<4s2x2H8x2L2H")  # one member's local header
_MAX_COMMENT = 0xFFFF
_UTF8_NAMES = 0x800
_ENCRYPTED = 0x1
_ZIP64_EXTRA = 0x0001
_LIMIT32 = 0xFFFFFFFF
_HEADERS_BLOCK = 64 * 1024  # local headers closer than this are read together
_HEADER_OFFSET = itemgetter(1)  # Member.header_offset, without an attribute look-up
_MAX_EXTRACT_VERSION = 63  # zipfile's: newer features (e.g. strong encryption) it refuses, and so do we


class Member(NamedTuple):
    """What the reader needs of one member's central directory record."""

    filename: str
    header_offset: int  # of its local header, from the start of the archive
    compress_type: int
    compress_size: int
    file_size: int
    flags: int
    crc: int


def _damaged(problem: str) -> CorruptFileError:
    return CorruptFileError(f"damaged zip archive ({problem})")


def _pread(raw: Any, size: int, offset: int) -> bytes:
    return os.pread(raw.fileno(), size, getattr(raw, "base_offset", 0) + offset)


def _end_record(raw: Any, file_size: int) -> tuple[int, int, int]:
    """``(where the directory starts, its size, bytes before the archive)``, as zipfile finds them."""
    tail_size = min(file_size, _END.size + _MAX_COMMENT)
    tail = _pread(raw, tail_size, file_size - tail_size)
    at = tail.rfind(b"PK\x05\x06", 0, len(tail) - _END.size + 4) if len(tail) >= _END.size else -1
    if at < 0:
        raise _damaged("File is not a zip file")
    _, disk, disk_dir, _, _, dir_size, dir_offset, _ = _END.unpack_from(tail, at)
    end_at = file_size - tail_size + at
    locator_at = at - _END64_LOCATOR.size
    if locator_at >= 0 and tail[locator_at : locator_at + 4] == b"PK\x06\x07":
        _, _, _, disks = _END64_LOCATOR.unpack_from(tail, locator_at)
        if disks > 1:
            raise _damaged("zipfiles that span multiple disks are not supported")
        end64_at = end_at - _END64_LOCATOR.size - _END64.size
        record = _pread(raw, _END64.size, end64_at) if end64_at >= 0 else b""
        if len(record) != _END64.size or record[:4] != b"PK\x06\x06":
            raise _damaged("Corrupt zip64 end of central directory")
        _, _, _, _, disk, disk_dir, _, _, dir_size, dir_offset = _END64.unpack(record)
        end_at = end64_at
    if disk or disk_dir:
        raise _damaged("zipfiles that span multiple disks are not supported")
    # Bytes before the archive (a self-extracting stub) shift every offset it records.
    concat = end_at - dir_size - dir_offset
    if dir_offset + concat < 0:
        raise _damaged("Bad offset for central directory")
    return dir_offset + concat, dir_size, concat


def _zip64_fields(extra: bytes, file_size: int, compress_size: int, header_offset: int) -> tuple[int, int, int]:
    """The sizes and offset a zip64 extra field carries in place of 0xFFFFFFFF (as zipfile reads them)."""
    pos = 0
    while pos + 4 <= len(extra):
        kind, length = struct.unpack_from("<HH", extra, pos)
        if length + 4 > len(extra) - pos:
            raise _damaged("Corrupt extra field")
        if kind == _ZIP64_EXTRA:
            field, at = extra[pos + 4 : pos + 4 + length], 0
            try:
                if file_size == _LIMIT32:
                    file_size = struct.unpack_from("<Q", field, at)[0]
                    at += 8
                if compress_size == _LIMIT32:
                    compress_size = struct.unpack_from("<Q", field, at)[0]
                    at += 8
                if header_offset == _LIMIT32:
                    header_offset = struct.unpack_from("<Q", field, at)[0]
            except struct.error:
                raise _damaged("Corrupt zip64 extra field") from None
        pos += 4 + length
    return file_size, compress_size, header_offset


def read_directory(raw: Any, file_size: int) -> list[Member]:
    """Every member of the zip archive ``raw`` (``file_size`` bytes), in directory order
    (:func:`iter_directory` as a list).

    ``raw`` needs ``fileno()``; a ``base_offset`` attribute places the archive inside
    a larger file. Raises :class:`~converter.errors.CorruptFileError` for anything
    :mod:`zipfile` would refuse, and for a directory that lies outside the file.

    Example:
        >>> with open("pytorch_model.bin", "rb") as raw:  # doctest: +SKIP
        ...     read_directory(raw, os.fstat(raw.fileno()).st_size)[0].filename
        'archive/data.pkl'
    """
    return list(iter_directory(raw, file_size))


_RECORD_MAX = _CENTRAL.size + 3 * 0xFFFF  # a central directory record: its fixed part, name, extra, comment
_DIRECTORY_BLOCK = 1 << 20


def iter_directory(raw: Any, file_size: int) -> Iterator[Member]:
    """The members of the zip archive ``raw`` one at a time, in directory order: a caller that
    keeps only what it needs of each (:class:`.containers.StorageTable`) holds no tuple
    per member. Raises as :func:`read_directory` does.
    """
    start, dir_size, concat = _end_record(raw, file_size)
    if start + dir_size > file_size:
        raise _damaged("Truncated central directory")
    # Read a block at a time (an archive of 100,000 storages has a directory of 6 MB): each
    # block holds every whole record that starts in it, as a record is at most _RECORD_MAX long.
    data, data_at, pos = b"", 0, 0  # data: the directory from data_at on; pos: the next record in data
    unpack, fixed = _CENTRAL.unpack_from, _CENTRAL.size
    new = tuple.__new__  # a Member without its Python-level __new__: 100,000 of them in an MoE archive
    sizes: dict[int, int] = {}
    while data_at + pos < dir_size:
        if pos + _RECORD_MAX > len(data) and data_at + len(data) < dir_size:
            data_at += pos
            wanted = min(_DIRECTORY_BLOCK, dir_size - data_at - (len(data) - pos))
            block = _pread(raw, wanted, start + data_at + len(data) - pos)
            if len(block) != wanted:
                raise _damaged("Truncated central directory")
            data, pos = data[pos:] + block, 0
        if pos + fixed > len(data):
            raise _damaged("Truncated central directory")
        signature, version, flags, method, crc, compress_size, size, name_len, extra_len, comment_len, offset = unpack(
            data, pos
        )
        if signature != b"PK\x01\x02":
            raise _damaged("Bad magic number for central directory")
        if version > _MAX_EXTRACT_VERSION:
            raise _damaged(f"zip file version {version / 10:.1f}")
        pos += fixed
        raw_name = data[pos : pos + name_len]
        pos += name_len
        if extra_len:
            extra = data[pos : pos + extra_len]
            if compress_size == _LIMIT32 or size == _LIMIT32 or offset == _LIMIT32:
                size, compress_size, offset = _zip64_fields(extra, size, compress_size, offset)
            pos += extra_len
        pos += comment_len
        if pos > len(data):
            raise _damaged("Truncated central directory")
        try:
            name = raw_name.decode("utf-8" if flags & _UTF8_NAMES else "cp437")
        except UnicodeDecodeError:
            raise _damaged(f"a member name is not valid UTF-8: {quoted(raw_name)}") from None
        if "\x00" in name:
            name = name[: name.index("\x00")]
        if os.sep != "/":  # pragma: no cover - zipfile turns the platform's separator into "/"
            name = name.replace(os.sep, "/")
        # Sizes repeat (experts of one shape) and a stored member's two are equal: one int object each.
        size = sizes.setdefault(size, size)
        compress_size = size if compress_size == size else compress_size
        yield new(Member, (name, offset + concat, method, compress_size, size, flags, crc))


def _data_start(block: bytes, at: int, header_offset: int) -> tuple[int, int] | None:
    """Where a member's data starts and its compression method, from its local header at
    ``block[at:]`` (a block read for many headers, or just this one), which lies at
    ``header_offset`` in the archive; None if no local header is there.

    The central directory does not say where data starts: the local header's extra field
    (torch pads it to align storages) may differ from the directory's, so each is read.
    """
    if len(block) < at + _LOCAL.size:
        return None
    signature, _, method, _, _, name_len, extra_len = _LOCAL.unpack_from(block, at)
    if signature != b"PK\x03\x04":
        return None
    return header_offset + _LOCAL.size + name_len + extra_len, method


def data_starts(raw: Any, members: list[Member], file_size: int) -> dict[str, int]:
    """Where each stored member's data starts (by file name), from its local header.

    Example:
        >>> data_starts(raw, read_directory(raw, size), size)["archive/data/0"]  # doctest: +SKIP
        1088
    """
    ordered = sorted(members, key=_HEADER_OFFSET)
    offsets = list(map(_HEADER_OFFSET, ordered))
    found = stream_data_starts(
        raw, offsets, [m.file_size for m in ordered], file_size, lambda i: ordered[i].filename, read_ahead=True
    )
    return dict(zip([m.filename for m in ordered], found, strict=True))


def stream_data_starts(
    raw: Any,
    offsets: Sequence[int],
    sizes: Sequence[int],
    file_size: int,
    name_of: Callable[[int], str],
    *,
    read_ahead: bool = False,
) -> Iterator[int]:
    """Where the data of each stored member starts, read from its local header as it is reached.

    ``offsets`` are the members' local header offsets, ascending (within runs: a later
    run may start over), ``sizes`` their stored sizes; ``name_of(i)`` names member ``i``
    in an error. Headers that lie close together (thousands of small storages) are read
    by one ``pread`` for many. Consumed alongside the copy of each member's bytes, the
    reads walk the file once, in order: on a cold cache the kernel's readahead brings in
    each header with the data around it, where reading every header first would be
    thousands of small synchronous reads and then a second pass for the data.
    ``read_ahead`` (when every header is read first, before the data is copied) reads
    the file in a thread ahead of the headers when they are many (:mod:`..readahead`):
    one sequential pass over the disk, and the copy after it finds the data cached.

    Example:
        >>> list(stream_data_starts(raw, [0, 1088], [1024, 64], size, str))  # doctest: +SKIP
        [64, 1152]
    """
    size = _LOCAL.size
    block, block_start, block_end = b"", 0, 0
    count = len(offsets)
    base = getattr(raw, "base_offset", 0)
    # Headers further apart than a block are read one by one: then the thread keeps the disk busy.
    # (Closer ones are read a block of many at a time, which reads the file through already.)
    sparse = count >= READ_AHEAD_FROM and offsets[-1] - offsets[0] > count * _HEADERS_BLOCK
    ahead = ReadAhead(raw.fileno(), base + offsets[0], base + file_size) if read_ahead and sparse else None
    try:
        for i, offset in enumerate(offsets):
            if ahead is not None:
                ahead.reached(base + offset)
            if offset < block_start or offset + size > block_end:
                last = i  # read through the last header within _HEADERS_BLOCK of this one
                while last + 1 < count and 0 <= offsets[last + 1] + size - offset <= _HEADERS_BLOCK:
                    last += 1
                block_start = offset
                block = _pread(raw, offsets[last] + size - block_start, block_start)
                block_end = block_start + len(block)
            found = _data_start(block, offset - block_start, offset)
            if found is None:
                raise CorruptFileError(f"zip member {quoted(name_of(i))} has no valid local header")
            start, method = found
            if method != STORED:  # the central directory said stored: the two disagree
                raise CorruptFileError(
                    f"zip member {quoted(name_of(i))} is compressed; torch writes storages uncompressed"
                )
            if start + sizes[i] > file_size:
                raise CorruptFileError(f"zip member {quoted(name_of(i))} claims more bytes than the file holds")
            yield start
    finally:
        if ahead is not None:
            ahead.close()


def read_member(raw: Any, member: Member, file_size: int) -> bytes:
    """The bytes of a small member (``data.pkl``, ``byteorder``): stored or deflated, CRC checked.

    The caller bounds ``member.file_size`` first; a deflated member is inflated to at
    most that many bytes, so a decompression bomb stops there.
    """
    return b"".join(iter_member(raw, member, file_size, block=member.compress_size or 1))


def iter_member(raw: Any, member: Member, file_size: int, *, block: int = 1 << 20) -> Iterator[bytes]:
    """The bytes of a member as :func:`read_member` gives them, ``block`` bytes at a time when
    it is stored (a deflated one comes whole): a reader of a 13 MB ``data.pkl`` holds one
    block, not the whole. The CRC is checked once the last block is read: a caller acts on
    what it read only after the end. Raises as :func:`read_member` does.

    Example:
        >>> b"".join(iter_member(raw, member, size)) == read_member(raw, member, size)  # doctest: +SKIP
        True
    """
    what = f"zip member {quoted(member.filename)}"
    found = _data_start(_pread(raw, _LOCAL.size, member.header_offset), 0, member.header_offset)
    if found is None:
        raise CorruptFileError(f"{what} has no valid local header")
    start = found[0]
    if member.flags & _ENCRYPTED:
        raise CorruptFileError(f"cannot read {what}: it is encrypted")
    if start + member.compress_size > file_size:
        raise CorruptFileError(f"{what} claims more bytes than the file holds")
    crc = 0
    if member.compress_type == STORED:
        if member.compress_size != member.file_size:
            raise CorruptFileError(f"{what} is stored but its two sizes differ")
        for at in range(start, start + member.compress_size, block):
            data = _pread(raw, min(block, start + member.compress_size - at), at)
            crc = zlib.crc32(data, crc)
            if at + block >= start + member.compress_size and crc != member.crc:
                raise CorruptFileError(f"cannot read {what} (Bad CRC-32)")
            yield data
        if member.compress_size == 0 and member.crc != 0:
            raise CorruptFileError(f"cannot read {what} (Bad CRC-32)")
        return
    if member.compress_type != DEFLATED:
        raise CorruptFileError(
            f"cannot read {what}: it is compressed with method {member.compress_type}, which torch never writes"
        )
    packed = _pread(raw, member.compress_size, start)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        data = inflater.decompress(packed, member.file_size + 1)
    except zlib.error as exc:
        raise CorruptFileError(f"cannot read {what} ({str(exc)[:120]})") from None
    if len(data) != member.file_size or not inflater.eof:
        raise CorruptFileError(f"cannot read {what} (it inflates to another size than recorded)")
    if zlib.crc32(data) != member.crc:
        raise CorruptFileError(f"cannot read {what} (Bad CRC-32)")
    yield data
