"""The cases of the corpus: what each input is, and what tiesafe must do with it."""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import craft as c
from .craft import (
    BUILD,
    EMPTY_DICT,
    EMPTY_LIST,
    EMPTY_TUPLE,
    FALSE,
    MARK,
    NEWOBJ,
    NEWOBJ_EX,
    NONE,
    POP,
    SETITEM,
    STACK_GLOBAL,
    call,
    dct,
    glob,
    integer,
    lst,
    program,
    simple_tensor,
    state_dict,
    text,
    tup,
)

# A builder gets (folder, sentinel) and returns the CLI arguments after the command.
Builder = Callable[[Path, Path], list[Path]]


@dataclass(frozen=True)
class Case:
    id: str
    build: Builder
    error: str | None  # TiesafeError subclass name, or None: the input converts
    message: str = ""  # regex the one-line error must match
    command: str = "convert"  # convert | inspect | verify
    live: bool = False  # torch.load(weights_only=False) runs the payload


class Payload:
    """Pickles as ``func(*args)``: what a malicious checkpoint carries."""

    def __init__(self, func: object, *args: object) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.func, self.args


def _touch(sentinel: Path) -> str:
    return f"touch {sentinel}"


def _py(sentinel: Path) -> str:
    return f"open({str(sentinel)!r}, 'w').write('ran')"


def _real(folder: Path, name: str = "real.bin", **save: object) -> Path:
    """A real checkpoint from torch.save: a weight, its alias and a bias."""
    path = folder / name
    w = torch.arange(8, dtype=torch.float32)
    torch.save({"w": w, "tied": w, "b": torch.ones(2)}, path, **save)  # type: ignore[arg-type]
    return path


def _embedded(payload: bytes, *, protocol: int = 2) -> bytes:
    """A state dict whose second entry is ``payload`` (the real tensor comes after it)."""
    return program(state_dict(("evil", payload), ("w", simple_tensor())), protocol)


def _in_real_zip(payload: bytes, *, protocol: int = 2) -> Builder:
    def build(folder: Path, sentinel: Path) -> list[Path]:
        return [c.rewrite_data_pkl(_real(folder), _embedded(payload, protocol=protocol))]

    return build


def _payload_builder(make: Callable[[Path, Path], bytes], *, legacy: bool = False) -> Builder:
    """A real zip checkpoint (or a legacy file) whose pickle carries ``make(folder, sentinel)``."""

    def build(folder: Path, sentinel: Path) -> list[Path]:
        body = _embedded(make(folder, sentinel))
        if legacy:
            return [c.legacy(folder / "evil.bin", body)]
        return [c.rewrite_data_pkl(_real(folder), body)]

    return build


def _refused(name: str) -> str:
    """A global known to run code: refused whatever else the file holds."""
    return rf"refused: the pickle calls '{name}' \(.*\) — this file tries to run code"


# --------------------------------------------------------------------------- callables


def _system(folder: Path, sentinel: Path) -> bytes:
    return call(glob("os", "system"), text(_touch(sentinel)))


def _posix_system(folder: Path, sentinel: Path) -> bytes:
    return call(glob("posix", "system"), text(_touch(sentinel)))


def _eval(folder: Path, sentinel: Path) -> bytes:
    return call(glob("builtins", "eval"), text(_py(sentinel)))


def _exec_py2(folder: Path, sentinel: Path) -> bytes:
    return call(glob("__builtin__", "exec"), text(_py(sentinel)))


def _subprocess(folder: Path, sentinel: Path) -> bytes:
    return call(glob("subprocess", "check_call"), lst(text("touch"), text(str(sentinel))))


def _getattr_import(folder: Path, sentinel: Path) -> bytes:
    os_module = call(glob("builtins", "__import__"), text("os"))
    return call(call(glob("builtins", "getattr"), os_module, text("system")), text(_touch(sentinel)))


def _torch_load(folder: Path, sentinel: Path) -> bytes:
    inner = folder / "inner.pkl"
    inner.write_bytes(pickle.dumps(Payload(os.system, _touch(sentinel)), protocol=2))
    pickle_module = call(glob("builtins", "__import__"), text("pickle"))
    return call(glob("torch", "load"), text(str(inner)), NONE, pickle_module)


def _numpy_runstring(folder: Path, sentinel: Path) -> bytes:
    return call(glob("numpy.testing._private.utils", "runstring"), text(_py(sentinel)), EMPTY_DICT)


def _numpy_load(folder: Path, sentinel: Path) -> bytes:
    inner = folder / "inner.npy"
    np.save(inner, np.array([Payload(os.system, _touch(sentinel))], dtype=object), allow_pickle=True)
    return call(glob("numpy", "load"), text(str(inner)), NONE, c.TRUE)


def _numpy_reconstruct(folder: Path, sentinel: Path) -> bytes:
    return call(glob("numpy.core.multiarray", "_reconstruct"), glob("numpy", "ndarray"), tup(integer(0)), text("b"))


def _numpy_beside_weights(folder: Path, sentinel: Path) -> list[Path]:
    """What training code saves: numpy arrays and scalars beside the weights (torch.save's own pickle)."""
    path = folder / "train.pt"
    torch.save({"w": torch.arange(4.0), "history": np.arange(3), "best_loss": np.float64(1.5)}, path)
    return [path]


def _inst(folder: Path, sentinel: Path) -> bytes:
    # Protocol 0: MARK, arguments, INST module\nname\n -- calls the class found.
    return MARK + b"V" + _touch(sentinel).encode() + b"\n" + b"ios\nsystem\n"


def _obj(folder: Path, sentinel: Path) -> bytes:
    return MARK + glob("builtins", "exec") + text(_py(sentinel)) + b"o"


def _newobj(folder: Path, sentinel: Path) -> bytes:
    return glob("subprocess", "Popen") + tup(lst(text("touch"), text(str(sentinel)))) + NEWOBJ


def _newobj_ex(folder: Path, sentinel: Path) -> bytes:
    kwargs = dct((text("args"), lst(text("touch"), text(str(sentinel)))))
    return glob("subprocess", "Popen") + EMPTY_TUPLE + kwargs + NEWOBJ_EX


def _stack_global_memo(folder: Path, sentinel: Path) -> bytes:
    # The module and attribute names come from the memo, not from a GLOBAL line.
    names = tup(text("os"), c.put(200) + POP + text("system"), c.put(201)) + POP
    return names + c.get(200) + c.get(201) + STACK_GLOBAL + tup(text(_touch(sentinel))) + c.REDUCE


def _stack_global_computed(folder: Path, sentinel: Path) -> bytes:
    # torch.device("os") is one of ours and returns the string "os": a computed module name.
    module = call(glob("torch", "device"), text("os"))
    return module + text("system") + STACK_GLOBAL + tup(text(_touch(sentinel))) + c.REDUCE


def _nested(folder: Path, sentinel: Path) -> bytes:
    inner = tup(integer(1), _system(folder, sentinel))
    return lst(dct((text("x"), lst(inner))), integer(2))


def _in_persistent_id(folder: Path, sentinel: Path) -> bytes:
    return tup(text("storage"), _system(folder, sentinel), text("0"), text("cpu"), integer(4)) + c.BINPERSID


def _persistent_module(folder: Path, sentinel: Path) -> bytes:
    return tup(text("module"), text("os")) + c.BINPERSID


def _ext(opcode: bytes, code: int, size: int) -> Callable[[Path, Path], bytes]:
    def make(folder: Path, sentinel: Path) -> bytes:
        return opcode + code.to_bytes(size, "little") + tup(text(_touch(sentinel))) + c.REDUCE

    return make


def _build_builder(folder: Path, sentinel: Path) -> bytes:
    # BUILD on one of our rebuild functions would set its __defaults__ (process-wide).
    state = tup(NONE, dct((text("__defaults__"), tup(text("latin1")))))
    return glob("_codecs", "encode") + state + BUILD


def _build_tensor(folder: Path, sentinel: Path) -> bytes:
    return simple_tensor() + dct((text("ref"), NONE)) + BUILD


def _memo_cycle(folder: Path, sentinel: Path) -> list[Path]:
    # {"model": <itself>}: the wrapper search must not recurse forever.
    body = EMPTY_DICT + c.put(0) + text("model") + c.get(0) + SETITEM
    return [c.rewrite_data_pkl(_real(folder), program(body))]


def _memo_unknown(folder: Path, sentinel: Path) -> list[Path]:
    return [c.rewrite_data_pkl(_real(folder), program(state_dict(("w", c.get(99)))))]


def _deep_key(folder: Path, sentinel: Path) -> list[Path]:
    # A dict key nested 200,000 tuples deep: str()/repr() of it would blow the stack.
    key = EMPTY_TUPLE + (b"\x85" * 200_000)
    body = EMPTY_DICT + MARK + text("w") + simple_tensor() + key + integer(1) + c.SETITEMS
    return [c.rewrite_data_pkl(_real(folder), program(body))]


def _name_not_str(folder: Path, sentinel: Path) -> list[Path]:
    body = dct((integer(7), simple_tensor()))
    return [c.torch_zip(folder / "name.bin", program(body))]


def _name_surrogate(folder: Path, sentinel: Path) -> list[Path]:
    return [c.torch_zip(folder / "name.bin", program(state_dict(("w\ud800", simple_tensor()))))]


def _name_metadata(folder: Path, sentinel: Path) -> list[Path]:
    return [c.torch_zip(folder / "name.bin", program(state_dict(("__metadata__", simple_tensor()))))]


def _memo_bomb(folder: Path, sentinel: Path) -> list[Path]:
    # LONG_BINPUT 2**30: the C unpickler would allocate a 16 GiB memo for this 10-byte opcode pair.
    body = NONE + b"r" + struct.pack("<I", 1 << 30) + POP + state_dict(("w", simple_tensor()))
    return [c.torch_zip(folder / "memo.bin", program(body))]


def _colliding_ints(n: int) -> list[bytes]:
    modulus = 2**61 - 1  # sys.hash_info.modulus: k * modulus + 7 all hash to 7
    return [integer(k * modulus + 7) for k in range(n)]


def _hash_flood(folder: Path, sentinel: Path) -> list[Path]:
    # 20,000 distinct keys with one hash: 2.5 s of dict insertion; 2 million would take hours.
    keys = _colliding_ints(20_000)
    flood = EMPTY_DICT + MARK + b"".join(k + NONE for k in keys) + c.SETITEMS
    return [c.torch_zip(folder / "flood.bin", program(state_dict(("w", simple_tensor()), ("meta", flood))))]


def _hash_flood_set(folder: Path, sentinel: Path) -> list[Path]:
    flood = call(glob("builtins", "set"), lst(*_colliding_ints(20_000)))
    return [c.torch_zip(folder / "flood.bin", program(state_dict(("w", simple_tensor()), ("meta", flood))))]


def _frame_bomb(folder: Path, sentinel: Path) -> list[Path]:
    body = c.FRAME + struct.pack("<Q", 1 << 62) + state_dict(("w", simple_tensor()))
    return [c.legacy(folder / "frame.bin", program(body, 4))]


def _huge_repr(folder: Path, sentinel: Path) -> list[Path]:
    # A "shape" list of 2 million references to one 1 KB string: its repr would take 2 GB.
    body = text("x" * 1024) + c.put(1) + POP
    items = EMPTY_LIST + c.put(2) + MARK + c.get(1) * 2_000_000 + b"e"
    bad_tensor = call(
        glob("torch._utils", "_rebuild_tensor_v2"),
        c.storage("0", 4),
        integer(0),
        items,
        tup(integer(1)),
        FALSE,
        call(glob("collections", "OrderedDict")),
    )
    return [c.rewrite_data_pkl(_real(folder), program(body + state_dict(("w", bad_tensor))))]


def _newline_name(folder: Path, sentinel: Path) -> list[Path]:
    # A global whose name carries a newline and an escape sequence: the error stays one line.
    body = text("os") + text("system\n\x1b[2Jrm -rf /") + STACK_GLOBAL
    return [c.rewrite_data_pkl(_real(folder), program(state_dict(("evil", body), ("w", simple_tensor())), 4))]


# --------------------------------------------------------------------------- protocols


def _protocol_payload(protocol: int) -> Builder:
    def build(folder: Path, sentinel: Path) -> list[Path]:
        state = {"w": torch.ones(2), "evil": Payload(os.system, _touch(sentinel))}
        path = folder / "evil.bin"
        if protocol == 0:  # torch cannot write protocol 0 (its storage ids are tuples)
            return [c.torch_zip(path, pickle.dumps({"evil": state["evil"]}, protocol=0))]
        torch.save(state, path, pickle_protocol=protocol)
        return [path]

    return build


def _protocol_clean(protocol: int) -> Builder:
    def build(folder: Path, sentinel: Path) -> list[Path]:
        return [_real(folder, pickle_protocol=protocol)]

    return build


# --------------------------------------------------------------------------- zip damage


def _zip_members(path: Path) -> list[zipfile.ZipInfo]:
    with zipfile.ZipFile(path) as z:
        return z.infolist()


def _cd_offset(raw: bytes) -> int:
    end = raw.rindex(b"PK\x05\x06")
    return int(struct.unpack("<I", raw[end + 16 : end + 20])[0])


def _patch_central(path: Path, member_suffix: str, patch: Callable[[bytearray, int], None]) -> None:
    """Edit the central directory record of the member whose name ends with ``member_suffix``."""
    raw = bytearray(path.read_bytes())
    pos = _cd_offset(bytes(raw))
    while raw[pos : pos + 4] == b"PK\x01\x02":
        name_len, extra_len, comment_len = struct.unpack("<HHH", raw[pos + 28 : pos + 34])
        name = raw[pos + 46 : pos + 46 + name_len].decode()
        if name.endswith(member_suffix):
            patch(raw, pos)
            path.write_bytes(bytes(raw))
            return
        pos += 46 + name_len + extra_len + comment_len
    raise AssertionError(f"no member {member_suffix}")


def _zip_truncated_cd(folder: Path, sentinel: Path) -> list[Path]:
    path = _real(folder)
    raw = path.read_bytes()
    path.write_bytes(raw[: _cd_offset(raw) + 30])
    return [path]


def _zip_bad_crc(suffix: str) -> Builder:
    def build(folder: Path, sentinel: Path) -> list[Path]:
        path = _real(folder)
        _patch_central(path, suffix, lambda raw, pos: raw.__setitem__(slice(pos + 16, pos + 20), b"\xde\xad\xbe\xef"))
        raw = bytearray(path.read_bytes())  # the local header carries a CRC too
        for info in _zip_members(path):
            if info.filename.endswith(suffix):
                raw[info.header_offset + 14 : info.header_offset + 18] = b"\xde\xad\xbe\xef"
        path.write_bytes(bytes(raw))
        return [path]

    return build


def _zip_size_lie(size: int) -> Builder:
    def build(folder: Path, sentinel: Path) -> list[Path]:
        path = _real(folder)

        def patch(raw: bytearray, pos: int) -> None:
            raw[pos + 20 : pos + 28] = struct.pack("<II", size, size)

        _patch_central(path, "/data/0", patch)
        return [path]

    return build


def _zip_compressed_pickle(folder: Path, sentinel: Path) -> list[Path]:
    body = program(state_dict(("w", simple_tensor())))
    return [c.torch_zip(folder / "deflated.bin", body, compress=True)]


def _zip_compressed_storage(folder: Path, sentinel: Path) -> list[Path]:
    path = folder / "deflated.bin"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("archive/data.pkl", program(state_dict(("w", simple_tensor()))))
        z.writestr("archive/data/0", c.FLOATS)
    return [path]


def _zip_corrupt_deflate(folder: Path, sentinel: Path) -> list[Path]:
    path = c.torch_zip(folder / "bad.bin", program(state_dict(("w", simple_tensor()))) * 50, compress=True)
    info = next(i for i in _zip_members(path) if i.filename.endswith("data.pkl"))
    raw = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode())
    raw[start : start + 8] = b"\xff" * 8  # not a deflate stream any more
    path.write_bytes(bytes(raw))
    return [path]


def _zip_encrypted(folder: Path, sentinel: Path) -> list[Path]:
    path = _real(folder)

    def patch(raw: bytearray, pos: int) -> None:
        raw[pos + 8] |= 0x01  # general purpose flag bit 0: encrypted

    _patch_central(path, "data.pkl", patch)
    return [path]


def _zip_unknown_method(folder: Path, sentinel: Path) -> list[Path]:
    path = _real(folder)
    _patch_central(path, "data.pkl", lambda raw, pos: raw.__setitem__(slice(pos + 10, pos + 12), b"\x63\x00"))
    return [path]


def _zip_duplicate(folder: Path, sentinel: Path) -> list[Path]:
    path = folder / "dup.bin"
    body = program(state_dict(("w", simple_tensor())))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", body)
        z.writestr("archive/data/0", c.FLOATS)
        z.writestr("archive/data/0", struct.pack("<4f", 9, 9, 9, 9))
    return [path]


def _zip_traversal(folder: Path, sentinel: Path) -> list[Path]:
    body = program(state_dict(("w", simple_tensor())))
    return [c.torch_zip(folder / "trav.bin", body, extra=[("archive/../../x", b"oops")])]


def _zip_prefix_differs(folder: Path, sentinel: Path) -> list[Path]:
    body = program(state_dict(("w", simple_tensor())))
    return [c.torch_zip(folder / "prefix.bin", body, extra=[("other/data/1", c.FLOATS)])]


def _zip_bomb(folder: Path, sentinel: Path) -> list[Path]:
    # data.pkl inflates to 300 MiB of zeros from a few hundred KB.
    path = folder / "bomb.bin"
    info = zipfile.ZipInfo("archive/data.pkl")
    info.compress_type = zipfile.ZIP_DEFLATED
    zero = bytes(1 << 20)
    with zipfile.ZipFile(path, "w") as z:
        with z.open(info, "w") as member:
            for _ in range(300):
                member.write(zero)
        z.writestr("archive/data/0", c.FLOATS)
    return [path]


def _zip_bomb_liar(folder: Path, sentinel: Path) -> list[Path]:
    # data.pkl claims 64 bytes but its deflate stream holds 50 MiB: reading must stop at the claim.
    path = folder / "liar.bin"
    payload = zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = payload.compress(bytes(50 << 20)) + payload.flush()
    header_pickle = program(state_dict(("w", simple_tensor())))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", header_pickle, compress_type=zipfile.ZIP_DEFLATED)
        z.writestr("archive/data/0", c.FLOATS)
    raw = bytearray(path.read_bytes())
    info = next(i for i in _zip_members(path) if i.filename.endswith("data.pkl"))
    start = info.header_offset + 30 + len(info.filename.encode())
    raw[start : start + info.compress_size] = stream[: info.compress_size]
    path.write_bytes(bytes(raw))
    return [path]


def _zip_record_beyond_file(folder: Path, sentinel: Path) -> list[Path]:
    return _zip_size_lie(1 << 30)(folder, sentinel)


def _zip_version_too_new(folder: Path, sentinel: Path) -> list[Path]:
    # "version needed to extract" 25.1: zipfile raises NotImplementedError (found by scripts/fuzz.py).
    path = _real(folder)
    _patch_central(path, "data.pkl", lambda raw, pos: raw.__setitem__(slice(pos + 6, pos + 8), b"\xfb\x00"))
    return [path]


def _zip_bad_local_header(folder: Path, sentinel: Path) -> list[Path]:
    path = _real(folder)
    _patch_central(path, "/data/0", lambda raw, pos: raw.__setitem__(slice(pos + 42, pos + 46), struct.pack("<I", 3)))
    return [path]


# --------------------------------------------------------------------------- numbers that lie


def _geometry(offset: int, shape: tuple[int, ...], stride: tuple[int, ...], numel: int = 4) -> Builder:
    def build(folder: Path, sentinel: Path) -> list[Path]:
        body = program(state_dict(("w", c.tensor(c.storage("0", numel), offset, shape, stride))))
        return [c.torch_zip(folder / "lie.bin", body)]

    return build


def _many_huge_dims(folder: Path, sentinel: Path) -> list[Path]:
    # 1,000 dimensions of 1,000-digit numbers: multiplying them naively takes minutes.
    dim = 10**1000
    shape = tup(*([integer(dim)] * 1000))
    body = call(
        glob("torch._utils", "_rebuild_tensor_v2"),
        c.storage("0", 4),
        integer(0),
        shape,
        shape,
        FALSE,
        call(glob("collections", "OrderedDict")),
    )
    return [c.torch_zip(folder / "dims.bin", program(state_dict(("w", body))))]


def _storage_disagrees(folder: Path, sentinel: Path) -> list[Path]:
    body = program(state_dict(("w", c.tensor(c.storage("0", 2), 0, (2,), (1,)))))
    return [c.torch_zip(folder / "short.bin", body, {"0": b"\x00" * 6})]


def _storage_negative(folder: Path, sentinel: Path) -> list[Path]:
    body = program(state_dict(("w", c.tensor(c.storage("0", -4), 0, (2,), (1,)))))
    return [c.torch_zip(folder / "neg.bin", body)]


def _unknown_dtype(folder: Path, sentinel: Path) -> list[Path]:
    v3 = call(
        glob("torch._utils", "_rebuild_tensor_v3"),
        c.storage("0", 16, "UntypedStorage", module="torch.storage"),
        integer(0),
        tup(integer(4)),
        tup(integer(1)),
        FALSE,
        call(glob("collections", "OrderedDict")),
        glob("torch", "float128"),
    )
    return [c.torch_zip(folder / "dtype.bin", program(state_dict(("w", v3))), {"0": bytes(16)})]


def _unknown_storage(folder: Path, sentinel: Path) -> list[Path]:
    body = program(state_dict(("w", c.tensor(c.storage("0", 4, "Float128Storage"), 0, (4,), (1,)))))
    return [c.torch_zip(folder / "st.bin", body)]


def _dtype_not_dtype(folder: Path, sentinel: Path) -> list[Path]:
    v3 = call(
        glob("torch._utils", "_rebuild_tensor_v3"),
        c.storage("0", 16, "UntypedStorage", module="torch.storage"),
        integer(0),
        tup(integer(4)),
        tup(integer(1)),
        FALSE,
        call(glob("collections", "OrderedDict")),
        text("float32"),
    )
    return [c.torch_zip(folder / "dtype.bin", program(state_dict(("w", v3))), {"0": bytes(16)})]


def _shape_floats(folder: Path, sentinel: Path) -> list[Path]:
    shape = tup(b"G" + struct.pack(">d", 4.0))
    body = call(
        glob("torch._utils", "_rebuild_tensor_v2"),
        c.storage("0", 4),
        integer(0),
        shape,
        tup(integer(1)),
        FALSE,
        call(glob("collections", "OrderedDict")),
    )
    return [c.torch_zip(folder / "float.bin", program(state_dict(("w", body))))]


def _not_a_state_dict(folder: Path, sentinel: Path) -> list[Path]:
    return [c.torch_zip(folder / "list.bin", program(lst(simple_tensor())))]


def _clean_aliases_via_memo(folder: Path, sentinel: Path) -> list[Path]:
    # The same tensor object under two names through PUT/GET: an alias, converted.
    body = state_dict(("w", simple_tensor() + c.put(50)), ("tied", c.get(50)))
    return [c.torch_zip(folder / "memo.bin", program(body))]


# --------------------------------------------------------------------------- legacy


def _legacy_clean(folder: Path, sentinel: Path) -> list[Path]:
    return [_real(folder, _use_new_zipfile_serialization=False)]


def _legacy_bad_magic(folder: Path, sentinel: Path) -> list[Path]:
    return [c.legacy(folder / "l.bin", program(state_dict(("w", simple_tensor()))), magic=12345)]


def _legacy_wrong_count(folder: Path, sentinel: Path) -> list[Path]:
    body = program(state_dict(("w", simple_tensor("0", 3))))
    return [c.legacy(folder / "l.bin", body)]


def _legacy_truncated(folder: Path, sentinel: Path) -> list[Path]:
    path = c.legacy(folder / "l.bin", program(state_dict(("w", simple_tensor()))))
    path.write_bytes(path.read_bytes()[:-5])
    return [path]


def _legacy_keys_malformed(folder: Path, sentinel: Path) -> list[Path]:
    return [c.legacy(folder / "l.bin", program(state_dict(("w", simple_tensor()))), keys={"0": 1})]


def _legacy_key_unused(folder: Path, sentinel: Path) -> list[Path]:
    body = program(state_dict(("w", simple_tensor())))
    return [c.legacy(folder / "l.bin", body, {"0": c.FLOATS, "1": c.FLOATS})]


def _legacy_big_endian(folder: Path, sentinel: Path) -> list[Path]:
    path = c.legacy(folder / "l.bin", program(state_dict(("w", simple_tensor()))))
    raw = path.read_bytes()
    little = pickle.dumps(c.LEGACY_SYS_INFO, protocol=2)
    big = pickle.dumps({**c.LEGACY_SYS_INFO, "little_endian": False}, protocol=2)
    path.write_bytes(raw.replace(little, big))
    return [path]


def _legacy_bad_view(folder: Path, sentinel: Path) -> list[Path]:
    view = tup(text("v"), integer(-1), integer(2))
    body = program(state_dict(("w", c.tensor(c.storage("0", 4, legacy_view=view), 0, (2,), (1,)))))
    return [c.legacy(folder / "l.bin", body)]


# --------------------------------------------------------------------------- other formats


def _raw(name: str, content: bytes) -> Builder:
    def build(folder: Path, sentinel: Path) -> list[Path]:
        path = folder / name
        path.write_bytes(content)
        return [path]

    return build


def _safetensors_as_bin(folder: Path, sentinel: Path) -> list[Path]:
    header = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    return [c.safetensors(folder / "model.bin", header, c.FLOATS)]


def _npz_as_bin(folder: Path, sentinel: Path) -> list[Path]:
    path = folder / "weights.bin"
    with open(path, "wb") as f:
        np.savez(f, w=np.ones(4, dtype=np.float32))
    return [path]


def _torchscript(folder: Path, sentinel: Path) -> list[Path]:
    path = folder / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    return [path]


# --------------------------------------------------------------------------- safetensors


def _st(header: dict[str, object] | bytes, data: bytes, *, length: int | None = None) -> Builder:
    def build(folder: Path, sentinel: Path) -> list[Path]:
        return [c.safetensors(folder / "model.safetensors", header, data, length=length)]

    return build


def _st_ties(record: dict[str, object], entries: dict[str, object] | None = None, data: bytes = bytes(64)) -> Builder:
    return _st(c.tied_header(record, entries=entries), data)


def _st_verify(header: dict[str, object], data: bytes) -> Builder:
    """``verify SRC DST`` where DST is a hostile file claiming to be SRC's conversion."""

    def build(folder: Path, sentinel: Path) -> list[Path]:
        source = folder / "pytorch_model.bin"
        torch.save({"w": torch.zeros(4, 4), "tied": torch.zeros(4, 4)}, source)
        return [source, c.safetensors(folder / "model.safetensors", header, data)]

    return build


def _st_huge_record(folder: Path, sentinel: Path) -> list[Path]:
    record = json.dumps({"version": 1, "hidden": [], "pad": "x" * (65 << 20)})
    header = {"__metadata__": {"format": "pt", "tiesafe": record}}
    header["w"] = {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}
    return [c.safetensors(folder / "model.safetensors", header, bytes(64))]


def _st_duplicate_keys(folder: Path, sentinel: Path) -> list[Path]:
    # Two entries named "w": json.loads keeps the last, other parsers may keep the first.
    header = (
        b'{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'
    )
    return [c.safetensors(folder / "model.safetensors", header, bytes(16))]


def _st_bigint_dims(folder: Path, sentinel: Path) -> list[Path]:
    dims = ",".join(["9" * 4000] * 3000)
    header = ('{"w":{"dtype":"F32","shape":[' + dims + '],"data_offsets":[0,16]}}').encode()
    return [c.safetensors(folder / "model.safetensors", header, bytes(16))]


F32_W = {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}}
VIEW = {"base": "w", "dtype": "F32", "offset": 0, "shape": [4], "stride": [1]}

# --------------------------------------------------------------------------- the corpus

_CALLABLES: list[Case] = [
    Case("reduce-os-system", _payload_builder(_system), "UnsafeCheckpointError", _refused("os.system"), live=True),
    Case(
        "reduce-posix-system",
        _payload_builder(_posix_system),
        "UnsafeCheckpointError",
        _refused("posix.system"),
        live=True,
    ),
    Case("reduce-eval", _payload_builder(_eval), "UnsafeCheckpointError", _refused("builtins.eval"), live=True),
    Case(
        "reduce-exec-py2-name-legacy",
        _payload_builder(_exec_py2, legacy=True),
        "UnsafeCheckpointError",
        _refused("builtins.exec"),
        live=True,
    ),
    Case(
        "reduce-subprocess",
        _payload_builder(_subprocess),
        "UnsafeCheckpointError",
        _refused("subprocess.check_call"),
        live=True,
    ),
    Case(
        "getattr-import-gadget",
        _payload_builder(_getattr_import),
        "UnsafeCheckpointError",
        _refused("builtins.getattr"),
        live=True,
    ),
    Case(
        "torch-load-nested", _payload_builder(_torch_load), "UnsafeCheckpointError", _refused("torch.load"), live=True
    ),
    Case(
        "numpy-runstring",
        _payload_builder(_numpy_runstring),
        "UnsafeCheckpointError",
        _refused(r"numpy\.testing\._private\.utils\.runstring"),
        live=True,
    ),
    Case(
        "numpy-load-allow-pickle",
        _payload_builder(_numpy_load),
        "UnsafeCheckpointError",
        _refused("numpy.load"),
        live=True,
    ),
    # Harmless foreign globals become inert objects: the weights beside them convert.
    Case("numpy-reconstruct", _payload_builder(_numpy_reconstruct), None),
    Case("numpy-beside-weights", _numpy_beside_weights, None),
    Case("inst-protocol-0", _payload_builder(_inst), "UnsafeCheckpointError", _refused("os.system"), live=True),
    Case("obj-exec", _payload_builder(_obj), "UnsafeCheckpointError", _refused("builtins.exec"), live=True),
    Case("newobj-popen", _payload_builder(_newobj), "UnsafeCheckpointError", _refused("subprocess.Popen")),
    Case("newobj-ex-popen", _payload_builder(_newobj_ex), "UnsafeCheckpointError", _refused("subprocess.Popen")),
    Case(
        "stack-global-memo-names",
        _payload_builder(_stack_global_memo),
        "UnsafeCheckpointError",
        _refused("os.system"),
        live=True,
    ),
    Case(
        "stack-global-computed-name",
        _payload_builder(_stack_global_computed),
        "UnsafeCheckpointError",
        _refused("os.system"),
    ),
    Case("nested-in-containers", _payload_builder(_nested), "UnsafeCheckpointError", _refused("os.system"), live=True),
    Case(
        "nested-in-containers-legacy",
        _payload_builder(_nested, legacy=True),
        "UnsafeCheckpointError",
        _refused("os.system"),
        live=True,
    ),
    Case(
        "inside-persistent-id",
        _payload_builder(_in_persistent_id),
        "UnsafeCheckpointError",
        _refused("os.system"),
        live=True,
    ),
    Case(
        "persistent-id-not-storage",
        _payload_builder(_persistent_module),
        "UnsafeCheckpointError",
        "persistent id of kind 'module'",
    ),
    Case("ext1", _payload_builder(_ext(b"\x82", 0xF0, 1)), "UnsafeCheckpointError", r"extension code 240 \(EXT1\)"),
    Case("ext2", _payload_builder(_ext(b"\x83", 0x1234, 2)), "UnsafeCheckpointError", r"extension code 4660 \(EXT2\)"),
    Case(
        "ext4",
        _payload_builder(_ext(b"\x84", 0x7FFFFFFF, 4)),
        "UnsafeCheckpointError",
        r"extension code 2147483647 \(EXT4\)",
    ),
    Case("build-on-rebuild-function", _payload_builder(_build_builder), "UnsafeCheckpointError", "set the state of"),
    Case("build-on-tensor", _payload_builder(_build_tensor), "UnsafeCheckpointError", "set the state of"),
    Case("memo-cycle", _memo_cycle, "TiesafeError", "no tensors found"),
    Case("memo-get-unknown", _memo_unknown, "CorruptFileError", "malformed"),
    Case("deep-tuple-key", _deep_key, "CorruptFileError", "nests tuples more than 1000 deep"),
    Case("tensor-name-not-a-string", _name_not_str, "CorruptFileError", "tensor name 7 is not a string"),
    Case("tensor-name-lone-surrogate", _name_surrogate, "CorruptFileError", "not valid Unicode"),
    Case("tensor-named-metadata", _name_metadata, "UnsupportedError", "'__metadata__'"),
    Case("memo-index-bomb", _memo_bomb, "CorruptFileError", "memo slot 1073741824 far out of order"),
    Case("hash-flooding-keys", _hash_flood, "CorruptFileError", "hash-flooding"),
    Case("hash-flooding-set-call", _hash_flood_set, "CorruptFileError", "hash-flooding"),
    Case("frame-too-large", _frame_bomb, "CorruptFileError", "frame of"),
    Case("huge-repr", _huge_repr, "CorruptFileError", "shape is not a tuple of at most 1024 integers"),
    Case("newline-in-global-name", _newline_name, "UnsafeCheckpointError", r"'os\.system\\n\\x1b\[2Jrm -rf /'"),
    Case("memo-alias-clean", _clean_aliases_via_memo, None),
]

_PROTOCOLS: list[Case] = [
    Case(f"protocol-{p}-payload", _protocol_payload(p), "UnsafeCheckpointError", _refused("posix.system"), live=p > 0)
    for p in range(6)
] + [Case(f"protocol-{p}-clean", _protocol_clean(p), None) for p in range(1, 6)]

_ZIP: list[Case] = [
    Case("zip-truncated-central-directory", _zip_truncated_cd, "CorruptFileError", "damaged zip archive"),
    Case("zip-bad-crc-data-pkl", _zip_bad_crc("data.pkl"), "CorruptFileError", "cannot read .*data.pkl.*CRC"),
    Case("zip-bad-crc-byteorder", _zip_bad_crc("byteorder"), "CorruptFileError", "cannot read .*byteorder.*CRC"),
    Case("zip-size-too-small", _zip_size_lie(8), "CorruptFileError", "should hold 32 bytes but its record has 8"),
    Case(
        "zip-record-beyond-file", _zip_record_beyond_file, "CorruptFileError", "claims more bytes than the file holds"
    ),
    Case("zip-compressed-pickle", _zip_compressed_pickle, None),
    Case("zip-compressed-storage", _zip_compressed_storage, "CorruptFileError", "compressed"),
    Case("zip-corrupt-deflate", _zip_corrupt_deflate, "CorruptFileError", "cannot read .*data.pkl"),
    Case("zip-encrypted-flag", _zip_encrypted, "CorruptFileError", "cannot read .*data.pkl"),
    Case("zip-unknown-method", _zip_unknown_method, "CorruptFileError", "cannot read .*data.pkl"),
    Case("zip-duplicate-names", _zip_duplicate, "CorruptFileError", "duplicate member names"),
    Case("zip-path-traversal", _zip_traversal, "CorruptFileError", "lies outside the archive folder"),
    Case("zip-prefix-differs", _zip_prefix_differs, "CorruptFileError", "lies outside the archive folder"),
    Case("zip-bomb", _zip_bomb, "CorruptFileError", "data.pkl claims 314572800 bytes"),
    Case("zip-bomb-lying-size", _zip_bomb_liar, "CorruptFileError", "cannot read .*data.pkl"),
    Case("zip-bad-local-header", _zip_bad_local_header, "CorruptFileError", "no valid local header"),
    Case("zip-version-too-new", _zip_version_too_new, "CorruptFileError", "damaged zip archive .zip file version"),
]

_NUMBERS: list[Case] = [
    Case("negative-shape", _geometry(0, (-4,), (1,)), "CorruptFileError", "negative"),
    Case("negative-stride", _geometry(0, (4,), (-1,)), "CorruptFileError", "negative"),
    Case("negative-offset", _geometry(-1, (4,), (1,)), "CorruptFileError", "offset is invalid"),
    Case("huge-offset", _geometry(2**62, (4,), (1,)), "CorruptFileError", "implausibly large"),
    Case("numel-overflows-int64", _geometry(0, (2**40, 2**40), (1, 1)), "CorruptFileError", "implausibly large"),
    Case("huge-stride", _geometry(0, (2,), (2**63,)), "CorruptFileError", "implausibly large"),
    Case(
        "offset-past-storage",
        _geometry(3, (4,), (1,)),
        "CorruptFileError",
        "reaches byte 28 of storage '0', which holds 16",
    ),
    Case("many-huge-dims", _many_huge_dims, "CorruptFileError", "implausibly large"),
    Case("expanded-tensor-bomb", _geometry(0, (2**33,), (0,)), "UnsupportedError", "repeats 4 bytes as 34359738368"),
    Case("shape-and-stride-lengths-differ", _geometry(0, (2, 2), (1,)), "CorruptFileError", "differ in length"),
    Case("shape-of-floats", _shape_floats, "CorruptFileError", "not a tuple of at most 1024 integers"),
    Case(
        "storage-length-disagrees-with-dtype",
        _storage_disagrees,
        "CorruptFileError",
        "should hold 8 bytes but its record has 6",
    ),
    Case("storage-size-negative", _storage_negative, "CorruptFileError", "invalid size"),
    Case("dtype-does-not-exist", _unknown_dtype, "UnsupportedError", "dtype 'torch.float128' is not one tiesafe knows"),
    Case(
        "storage-class-does-not-exist",
        _unknown_storage,
        "UnsupportedError",
        "storage type 'torch.Float128Storage' is not one tiesafe knows",
    ),
    Case("dtype-is-a-string", _dtype_not_dtype, "CorruptFileError", "not a torch dtype"),
    Case("not-a-state-dict", _not_a_state_dict, "TiesafeError", "holds a list, not a state dict"),
]

_LEGACY: list[Case] = [
    Case("legacy-clean", _legacy_clean, None),
    Case("legacy-bad-magic", _legacy_bad_magic, "CorruptFileError", "no legacy magic number"),
    Case(
        "legacy-element-count-mismatch",
        _legacy_wrong_count,
        "CorruptFileError",
        "holds 4 elements but is described with 3",
    ),
    Case("legacy-truncated", _legacy_truncated, "CorruptFileError", "cut off"),
    Case("legacy-keys-malformed", _legacy_keys_malformed, "CorruptFileError", "key list is malformed"),
    Case("legacy-key-unused", _legacy_key_unused, "CorruptFileError", "listed but never used"),
    Case("legacy-big-endian", _legacy_big_endian, "UnsupportedError", "big-endian"),
    Case("legacy-bad-view", _legacy_bad_view, "CorruptFileError", "malformed view record"),
]

_FOREIGN: list[Case] = [
    Case("empty", _raw("x.bin", b""), "CorruptFileError", "the file is empty"),
    Case(
        "text",
        _raw("x.bin", b"version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 12\n"),
        "CorruptFileError",
        "text file",
    ),
    Case("gguf-as-bin", _raw("x.bin", b"GGUF\x03\x00\x00\x00" + bytes(64)), "CorruptFileError", "GGUF"),
    Case("h5-as-bin", _raw("x.bin", b"\x89HDF\r\n\x1a\n" + bytes(64)), "CorruptFileError", "HDF5"),
    Case("npy-as-bin", _raw("x.bin", b"\x93NUMPY\x01\x00" + bytes(64)), "CorruptFileError", "NumPy .npy"),
    Case("npz-as-bin", _npz_as_bin, "CorruptFileError", "NumPy .npz"),
    Case("safetensors-as-bin", _safetensors_as_bin, "CorruptFileError", "safetensors file already"),
    Case("torchscript", _torchscript, "CorruptFileError", "TorchScript"),
    Case("random-bytes", _raw("x.bin", bytes(range(256)) * 4), "CorruptFileError", "not a torch checkpoint"),
]

_SAFETENSORS: list[Case] = [
    Case(
        "st-header-past-end", _st(F32_W, bytes(64), length=10_000), "CorruptFileError", "runs past the end", "inspect"
    ),
    Case(
        "st-header-too-large", _st(F32_W, bytes(64), length=1 << 40), "CorruptFileError", "runs past the end", "inspect"
    ),
    Case("st-not-json", _st(b"{not json", b""), "CorruptFileError", "not valid JSON", "inspect"),
    Case("st-not-object", _st(b"[1, 2]", b""), "CorruptFileError", "not a JSON object", "inspect"),
    Case(
        "st-metadata-not-strings",
        _st({"__metadata__": {"a": 1}}, b""),
        "CorruptFileError",
        "map strings to strings",
        "inspect",
    ),
    Case(
        "st-overlapping-offsets",
        _st(
            {
                "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
            },
            bytes(24),
        ),
        "CorruptFileError",
        "overlaps",
        "inspect",
    ),
    Case(
        "st-gap-between-offsets",
        _st({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8)),
        "CorruptFileError",
        "gap",
        "inspect",
    ),
    Case(
        "st-offsets-reversed",
        _st({"a": {"dtype": "F32", "shape": [0], "data_offsets": [16, 0]}}, bytes(16)),
        "CorruptFileError",
        "invalid data_offsets",
        "inspect",
    ),
    Case("st-trailing-bytes", _st(F32_W, bytes(80)), "CorruptFileError", "data section holds 80 bytes", "inspect"),
    Case(
        "st-dtype-not-a-string",  # found by scripts/fuzz.py: a list as dtype was a TypeError
        _st({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
        "CorruptFileError",
        "unknown dtype",
        "inspect",
    ),
    Case(
        "st-unknown-dtype",
        _st({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, bytes(16)),
        "CorruptFileError",
        "unknown dtype",
        "inspect",
    ),
    Case(
        "st-size-mismatch",
        _st({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, bytes(16)),
        "CorruptFileError",
        "needs 12 bytes",
        "inspect",
    ),
    Case("st-duplicate-keys", _st_duplicate_keys, "CorruptFileError", "more than once", "inspect"),
    Case("st-bigint-dims", _st_bigint_dims, "CorruptFileError", "invalid shape", "inspect"),
    Case(
        "st-tie-missing-target", _st_ties({"aliases": {"x": "nope"}}), "TieMetadataError", "not in the file", "inspect"
    ),
    Case(
        "st-tie-cycle", _st_ties({"aliases": {"x": "y", "y": "x"}}), "TieMetadataError", "chains and cycles", "inspect"
    ),
    Case(
        "st-tie-chain", _st_ties({"aliases": {"x": "w", "y": "x"}}), "TieMetadataError", "chains and cycles", "inspect"
    ),
    Case(
        "st-tie-view-out-of-bounds",
        _st_ties({"views": {"v": {**VIEW, "offset": 13}}}),
        "TieMetadataError",
        "reaches element 17",
        "inspect",
    ),
    Case(
        "st-tie-view-huge-stride",
        _st_ties({"views": {"v": {**VIEW, "stride": [2**70]}}}),
        "TieMetadataError",
        "at most 1024 non-negative 64-bit integers",
        "inspect",
    ),
    Case(
        "st-tie-view-dtype-mismatch",
        _st_ties({"views": {"v": {**VIEW, "dtype": "F16"}}}),
        "TieMetadataError",
        "is 'F16' but its base",
        "inspect",
    ),
    Case(
        "st-tie-view-negative",
        _st_ties({"views": {"v": {**VIEW, "offset": -1}}}),
        "TieMetadataError",
        "non-negative",
        "inspect",
    ),
    Case(
        "st-tie-alias-is-stored",
        _st_ties({"aliases": {"w": "w"}}),
        "TieMetadataError",
        "also a stored tensor",
        "inspect",
    ),
    Case(
        "st-tie-view-expanded-bomb",
        _st_ties({"views": {"v": {**VIEW, "shape": [2**40], "stride": [0]}}}),
        "TieMetadataError",
        "repeats 4 bytes of 'w' as 4398046511104",
        "inspect",
    ),
    Case(
        "st-tie-view-dim-overflows-int64",  # found by scripts/fuzz.py: as_strided raised TypeError
        _st_ties({"views": {"v": {**VIEW, "shape": [2**63, 0], "stride": [1, 1]}}}),
        "TieMetadataError",
        "64-bit integers",
        "inspect",
    ),
    Case(
        "st-dim-overflows-int64",  # torch cannot hold the shape: reshape raised TypeError in load_file
        _st({"w": {"dtype": "F32", "shape": [2**63, 0], "data_offsets": [0, 0]}}, b""),
        "CorruptFileError",
        "invalid shape",
        "inspect",
    ),
    Case(
        "st-tie-hidden-unknown",
        _st_ties({"hidden": ["ghost"]}),
        "TieMetadataError",
        "not a tensor of the file",
        "inspect",
    ),
    Case(
        "st-tie-newer-version",
        _st({"__metadata__": {"tiesafe": '{"version": 99}'}, **F32_W}, bytes(64)),
        "TieMetadataError",
        "newer",
        "inspect",
    ),
    Case(
        "st-tie-not-json",
        _st({"__metadata__": {"tiesafe": "{"}, **F32_W}, bytes(64)),
        "TieMetadataError",
        "not valid JSON",
        "inspect",
    ),
    Case("st-tie-huge-json", _st_huge_record, "TieMetadataError", "more than the", "inspect"),
    Case(
        "st-verify-false-tie",
        _st_verify({"__metadata__": {"format": "pt", "tied": "w"}, **F32_W}, bytes(64)),
        "VerificationError",
        "the tie record read back differs from the one planned",
        "verify",
    ),
    Case(
        "st-verify-wrong-bytes",
        _st_verify(
            {"w": F32_W["w"], "tied": {"dtype": "F32", "shape": [4, 4], "data_offsets": [64, 128]}},
            bytes(64) + b"\x01" * 64,
        ),
        "VerificationError",
        "'tied' differs from the source",
        "verify",
    ),
]

CASES: list[Case] = _CALLABLES + _PROTOCOLS + _ZIP + _NUMBERS + _LEGACY + _FOREIGN + _SAFETENSORS
assert len({case.id for case in CASES}) == len(CASES)
