"""Hand-assembled pickles, torch zip/legacy containers and safetensors files.

The corpus needs inputs that ``torch.save`` would never write: opcodes chosen one
by one, lying numbers, damaged archives. These helpers spell them out byte by
byte so every case states exactly what it feeds the reader.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from collections.abc import Iterable
from pathlib import Path

# --------------------------------------------------------------------------- pickle opcodes


def proto(n: int) -> bytes:
    return b"\x80" + bytes([n])


STOP = b"."
MARK = b"("
REDUCE = b"R"
BUILD = b"b"
TUPLE = b"t"
EMPTY_DICT = b"}"
EMPTY_LIST = b"]"
EMPTY_TUPLE = b")"
SETITEM = b"s"
SETITEMS = b"u"
APPEND = b"a"
POP = b"0"
NONE = b"N"
FALSE = b"\x89"
TRUE = b"\x88"
BINPERSID = b"Q"
NEWOBJ = b"\x81"
NEWOBJ_EX = b"\x92"
STACK_GLOBAL = b"\x93"
MEMOIZE = b"\x94"
FRAME = b"\x95"


def glob(module: str, name: str) -> bytes:
    """``GLOBAL module name`` (protocol 0 text form, valid in every protocol)."""
    return b"c" + f"{module}\n{name}\n".encode()


def text(value: str) -> bytes:
    """``BINUNICODE``."""
    raw = value.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def short_text(value: str) -> bytes:
    """``SHORT_BINUNICODE`` (protocol 4)."""
    raw = value.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


def integer(n: int) -> bytes:
    """``BININT`` when it fits, else ``LONG1``/``LONG4`` (any size)."""
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    if len(raw) < 256:
        return b"\x8a" + bytes([len(raw)]) + raw
    return b"\x8b" + struct.pack("<i", len(raw)) + raw


def tup(*items: bytes) -> bytes:
    return MARK + b"".join(items) + TUPLE


def lst(*items: bytes) -> bytes:
    return EMPTY_LIST + (MARK + b"".join(items) + b"e" if items else b"")


def dct(*pairs: tuple[bytes, bytes]) -> bytes:
    return EMPTY_DICT + (MARK + b"".join(k + v for k, v in pairs) + SETITEMS if pairs else b"")


def call(func: bytes, *args: bytes) -> bytes:
    """``func(*args)`` through ``REDUCE``."""
    return func + tup(*args) + REDUCE


def put(index: int) -> bytes:
    return b"q" + bytes([index])


def get(index: int) -> bytes:
    return b"h" + bytes([index])


def program(body: bytes, protocol: int = 2) -> bytes:
    return proto(protocol) + body + STOP


# --------------------------------------------------------------------------- torch structures

DTYPE_STORAGE = {"F32": "FloatStorage", "F16": "HalfStorage", "I64": "LongStorage", "U8": "ByteStorage"}


def storage(
    key: str, numel: int, cls: str = "FloatStorage", *, module: str = "torch", legacy_view: bytes | None = None
) -> bytes:
    """A persistent id for a storage, as torch writes it (``legacy_view`` adds the 6th field)."""
    fields = [text("storage"), glob(module, cls), text(key), text("cpu"), integer(numel)]
    if legacy_view is not None:
        fields.append(legacy_view)
    return tup(*fields) + BINPERSID


def tensor(storage_op: bytes, offset: int, shape: Iterable[int], stride: Iterable[int]) -> bytes:
    """``torch._utils._rebuild_tensor_v2(storage, offset, shape, stride, False, OrderedDict())``."""
    return call(
        glob("torch._utils", "_rebuild_tensor_v2"),
        storage_op,
        integer(offset),
        tup(*map(integer, shape)),
        tup(*map(integer, stride)),
        FALSE,
        call(glob("collections", "OrderedDict")),
    )


def simple_tensor(key: str = "0", numel: int = 4) -> bytes:
    return tensor(storage(key, numel), 0, (numel,), (1,))


def state_dict(*pairs: tuple[str, bytes]) -> bytes:
    return dct(*((text(name), value) for name, value in pairs))


FLOATS = struct.pack("<4f", 1.0, -2.0, 0.5, 3.25)


def torch_zip(
    path: Path,
    data_pkl: bytes,
    storages: dict[str, bytes] | None = None,
    *,
    prefix: str = "archive",
    compress: bool = False,
    extra: Iterable[tuple[str, bytes]] = (),
) -> Path:
    """A torch zip checkpoint: ``prefix/data.pkl``, ``prefix/data/<key>`` and torch's small members."""
    storages = {"0": FLOATS} if storages is None else storages
    method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", data_pkl, compress_type=method)
        z.writestr(f"{prefix}/byteorder", b"little")
        for key, raw in storages.items():
            z.writestr(f"{prefix}/data/{key}", raw)
        z.writestr(f"{prefix}/version", b"3\n")
        for name, raw in extra:
            z.writestr(name, raw)
    return path


def rewrite_data_pkl(real_checkpoint: Path, data_pkl: bytes) -> Path:
    """Replace ``data.pkl`` inside a checkpoint ``torch.save`` wrote, keeping every other member."""
    with zipfile.ZipFile(real_checkpoint) as z:
        members = [(i, z.read(i)) for i in z.infolist()]
    with zipfile.ZipFile(real_checkpoint, "w", zipfile.ZIP_STORED) as z:
        for info, raw in members:
            z.writestr(info.filename, data_pkl if info.filename.endswith("/data.pkl") else raw)
    return real_checkpoint


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}


def legacy(
    path: Path,
    main_pickle: bytes,
    storages: dict[str, bytes] | None = None,
    *,
    itemsize: int = 4,
    keys: object = None,
    magic: int = LEGACY_MAGIC,
) -> Path:
    """A legacy (non-zip) checkpoint: magic, protocol, sys info, the pickle, the keys, raw storages."""
    storages = {"0": FLOATS} if storages is None else storages
    out = io.BytesIO()
    for header in (magic, 1001, LEGACY_SYS_INFO):
        out.write(pickle.dumps(header, protocol=2))
    out.write(main_pickle)
    out.write(pickle.dumps(list(storages) if keys is None else keys, protocol=2))
    for raw in storages.values():
        out.write(struct.pack("<q", len(raw) // itemsize))
        out.write(raw)
    path.write_bytes(out.getvalue())
    return path


# --------------------------------------------------------------------------- safetensors


def safetensors(path: Path, header: dict[str, object] | bytes, data: bytes, *, length: int | None = None) -> Path:
    """A safetensors file from a header (a dict is JSON-encoded, bytes are used as they are)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def tied_header(record: dict[str, object], *, entries: dict[str, object] | None = None) -> dict[str, object]:
    """A header with a 4x4 F32 tensor ``w`` (64 bytes) and the tie record ``record``."""
    header: dict[str, object] = {"__metadata__": {"format": "pt", "tiesafe": json.dumps({"version": 1, **record})}}
    header.update(entries or {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}})
    return header
