#!/usr/bin/env python
"""Mutation fuzzer for tiesafe's readers: checkpoints in, safetensors in.

Seeds are real checkpoints (``torch.save``, zip and legacy, tied, viewed, strided,
every dtype, training wrappers), the hostile corpus of ``tests/corpus`` and the
safetensors files tiesafe writes from them. Each input is a seed mutated at the
byte level (flips, inserts, deletes, splices, interesting integers) or with
knowledge of its structure (a pickle opcode or argument of data.pkl rewritten and
the zip rebuilt, a central-directory field, a header JSON value, the tie record).

The only allowed outcomes for an input are:

- success, and then the output must be verified bit for bit (``convert_file`` does
  it before the rename; it is read back again with ``verify_file``), load with
  ``load_file`` giving every source name with its dtype and shape, and, when
  ``torch.load(weights_only=True)`` also accepts the input, equal it bit for bit;
- a :class:`converter.TiesafeError` (one of ours).

Whatever the outcome, the opcode scan must walk each pickle of a checkpoint input
the same with its replay of tensor entries and without it (same verdict, same
error, same final memo, stack and counts).

Anything else is a finding: another exception type, a worker that takes longer
than ``--timeout`` seconds (killed), dies (a segfault, the memory limit), or a
sentinel file written by a payload. Each input runs in a worker process with
``RLIMIT_AS`` set to ``--memory-mb``; findings are saved under ``--out`` with the
input and a description.

Usage::

    python scripts/fuzz.py                      # 10,000 inputs, 2 workers (a few minutes)
    python scripts/fuzz.py -n 300 --seed 1      # what CI runs (tests/test_fuzz.py)
    python scripts/fuzz.py --atheris -n 100000  # coverage-guided (libFuzzer), needs atheris

The exit status is 0 when nothing was found, 1 otherwise; ``--json`` prints the
summary as JSON.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
import pickletools
import random
import shutil
import struct
import sys
import tempfile
import time
import traceback
import zipfile
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

INTERESTING = [0, 1, -1, 2, 3, 4, 7, 8, 16, 127, 128, 255, 256, 2**15, 2**16, 2**31 - 1, 2**31, 2**32, 2**53]
INTERESTING += [2**56, 2**61 - 1, 2**62, 2**63 - 1, 2**63, 2**64, -(2**31), -(2**63), 10**20]
# Snippets a mutation may splice into a pickle: calls, marks, memo tricks, extension codes.
SNIPPETS = [
    b"(",
    b"t",
    b"R",
    b"b",
    b"\x93",
    b"0",
    b"2",
    b"s",
    b"u",
    b"a",
    b"e",
    b"N",
    b")",
    b"}",
    b"]",
    b"\x85",
    b"\x86",
    b"\x87",
    b"\x81",
    b"\x92",
    b"\x94",
    b"h\x00",
    b"h\x01",
    b"q\x00",
    b"q\xff",
    b"r\xff\xff\xff\x7f",
    b"\x82\x01",
    b"\x83\x01\x00",
    b"\x84\x01\x00\x00\x00",
    b"cos\nsystem\n",
    b"cbuiltins\neval\n",
    b"ctorch._utils\n_rebuild_tensor_v2\n",
    b"ccollections\nOrderedDict\n",
    b"ctorch\nFloatStorage\n",
    b"Q",
    b"P0\n",
    b"\x8a\x09" + (2**64).to_bytes(9, "little"),
    b"J\xff\xff\xff\xff",
    b"K\xff",
    b"X\xff\xff\xff\x7f",
    b"\x95" + struct.pack("<Q", 2**40),
]


@dataclasses.dataclass(frozen=True)
class Seed:
    name: str
    kind: str  # "checkpoint" or "safetensors"
    data: bytes
    source: bytes | None = None  # for a safetensors seed: the checkpoint it was converted from


# --------------------------------------------------------------------------- seeds


def build_seeds(root: Path, sentinels: Path, *, corpus: bool = True) -> list[Seed]:
    """Real checkpoints, their conversions and (optionally) the hostile corpus."""
    import numpy as np
    import torch

    import converter

    torch.manual_seed(0)
    qkv = torch.randn(12, 4)
    flat = torch.arange(40, dtype=torch.float32)
    w = torch.randn(6, 4)
    states: dict[str, dict[str, Any]] = {
        "tied": {"wte.weight": w, "lm_head.weight": w, "bias": torch.zeros(4)},
        "views": {"qkv": qkv, "q": qkv[0:4], "k": qkv[4:8], "v": qkv[8:12], "t": qkv.t()},
        "overlap": {"a": flat[0:20], "b": flat[10:30]},
        "flat": {"x": flat[0:10].view(2, 5), "y": flat[10:40].view(5, 6)},
        "dtypes": {
            "bf16": torch.randn(3, dtype=torch.bfloat16),
            "f16": torch.randn(3).half(),
            "i64": torch.arange(3),
            "bool": torch.tensor([True, False]),
            "u8": torch.arange(5, dtype=torch.uint8),
            "f8": torch.zeros(4, dtype=torch.float8_e4m3fn),
            "u16": torch.zeros(3, dtype=torch.uint16),
            "c64": torch.zeros(2, dtype=torch.complex64),
            "scalar": torch.tensor(3.5),
            "empty": torch.zeros(0, 3),
        },
        "training": {"model": {"w": w, "b": torch.ones(2)}, "epoch": 3, "optimizer": {"lr": 0.1, "betas": (0.9, 0.99)}},
        # Foreign objects read as inert placeholders (fairseq / nanoGPT shapes), prefixes stripped.
        "inert": {
            "model": {"_orig_mod.w": w, "_orig_mod.b": torch.ones(2)},
            "args": argparse.Namespace(lr=0.1, arch="tiny", layers=[1, 2]),
            "best_loss": np.float64(1.5),
            "history": np.arange(4),
            "counts": collections.defaultdict(list, {"a": [torch.ones(1)]}),
            "best_val_loss": torch.tensor(2.5),
        },
        "strided": {"w": torch.randn(5, 6)[:, ::2], "e": torch.randn(4, 4).expand(2, 4, 4)},
        # Many alike entries (mixture-of-experts shape), past 256 memo slots: the scan replays them.
        "experts": {
            f"layers.{i // 12}.experts.{i // 3 % 4}.{proj}.weight": torch.randn(2, 3).bfloat16()
            for i, proj in enumerate(["gate", "up", "down"] * 12)
        },
    }
    seeds: list[Seed] = []
    for name, state in states.items():
        for legacy in (False, True):
            for protocol in (2, 5) if not legacy else (2,):
                path = root / f"{name}-{'legacy' if legacy else 'zip'}-p{protocol}.bin"
                torch.save(state, path, _use_new_zipfile_serialization=not legacy, pickle_protocol=protocol)
                seeds.append(Seed(path.name, "checkpoint", path.read_bytes()))
                out = path.with_suffix(".safetensors")
                converter.convert_file(path, out)
                seeds.append(Seed(out.name, "safetensors", out.read_bytes(), path.read_bytes()))
    if corpus:
        seeds += _corpus_seeds(root, sentinels)
    return seeds


def _corpus_seeds(root: Path, sentinels: Path) -> list[Seed]:
    from corpus import CASES

    seeds = []
    for i, case in enumerate(CASES):
        if case.id in ("zip-bomb", "st-tie-huge-json"):  # hundreds of MB once mutated; covered by the corpus
            continue
        folder = root / f"corpus-{i}"
        folder.mkdir()
        inputs = case.build(folder, sentinels / f"{i}")
        for path in inputs:
            kind = "safetensors" if path.suffix == ".safetensors" else "checkpoint"
            source = inputs[0].read_bytes() if kind == "safetensors" and len(inputs) > 1 else None
            seeds.append(Seed(f"corpus-{case.id}-{path.name}", kind, path.read_bytes(), source))
    return seeds


# --------------------------------------------------------------------------- mutations


def _interesting_int(rng: random.Random) -> int:
    return rng.choice(INTERESTING) if rng.random() < 0.8 else rng.randrange(-(2**40), 2**40)


def mutate_bytes(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    """One to four byte-level edits."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        pos = rng.randrange(len(buf) + 1) if buf else 0
        if op == 0 and buf:  # flip one bit
            i = min(pos, len(buf) - 1)
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # interesting byte
            buf[min(pos, len(buf) - 1)] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, ord("."), ord("("), ord("R")])
        elif op == 2:  # insert random bytes
            buf[pos:pos] = rng.randbytes(rng.choice([1, 2, 4, 8, 64]))
        elif op == 3 and buf:  # delete a range
            del buf[pos : pos + rng.choice([1, 2, 4, 16, 256])]
        elif op == 4 and buf:  # duplicate a range
            n = rng.choice([1, 4, 16, 128])
            buf[pos:pos] = buf[pos : pos + n]
        elif op == 5 and len(buf) >= pos + 4:  # rewrite a little-endian integer
            width = rng.choice([2, 4, 8])
            value = _interesting_int(rng) % (1 << (8 * width))
            buf[pos : pos + width] = value.to_bytes(width, "little")
        elif op == 6 and pool:  # splice a chunk of another seed
            other = rng.choice(pool)
            start = rng.randrange(len(other) + 1)
            buf[pos : pos + rng.randrange(64)] = other[start : start + rng.randrange(1, 256)]
        elif op == 7:  # truncate
            del buf[pos:]
    return bytes(buf)


def mutate_pickle(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    """Edit one opcode of a pickle: its argument, itself, or what comes next to it."""
    try:
        ops = [(op, arg, pos) for op, arg, pos in pickletools.genops(io.BytesIO(data)) if pos is not None]
    except Exception:
        return mutate_bytes(rng, data, pool)
    if not ops:
        return mutate_bytes(rng, data, pool)
    index = rng.randrange(len(ops))
    op, arg, pos = ops[index]
    end = ops[index + 1][2] if index + 1 < len(ops) else len(data)
    choice = rng.randrange(6)
    if choice == 0 and isinstance(arg, int) and not isinstance(arg, bool) and op.arg is not None:
        encoded = _encode_int(op.name, _interesting_int(rng))
        if encoded is not None:
            return data[:pos] + encoded + data[end:]
    if choice == 1:  # delete the opcode
        return data[:pos] + data[end:]
    if choice == 2:  # duplicate it
        return data[:end] + data[pos:end] + data[end:]
    if choice == 3:  # splice in a snippet
        return data[:pos] + rng.choice(SNIPPETS) + data[pos:]
    if choice == 4 and index + 1 < len(ops):  # swap with the next opcode
        nxt_end = ops[index + 2][2] if index + 2 < len(ops) else len(data)
        return data[:pos] + data[end:nxt_end] + data[pos:end] + data[nxt_end:]
    if choice == 5:  # replace the opcode byte by another opcode
        return data[:pos] + bytes([ord(rng.choice(pickletools.opcodes).code)]) + data[pos + 1 :]
    return mutate_bytes(rng, data, pool)


def _encode_int(name: str, value: int) -> bytes | None:
    if name in ("BININT1", "BINGET", "BINPUT") and 0 <= value < 256:
        return {"BININT1": b"K", "BINGET": b"h", "BINPUT": b"q"}[name] + bytes([value])
    if name in ("BININT", "LONG_BINGET", "LONG_BINPUT"):
        code = {"BININT": b"J", "LONG_BINGET": b"j", "LONG_BINPUT": b"r"}[name]
        if name == "BININT" and -(2**31) <= value < 2**31:
            return code + struct.pack("<i", value)
        if name != "BININT" and 0 <= value < 2**32:
            return code + struct.pack("<I", value)
        return None
    if name in ("BININT2",) and 0 <= value < 2**16:
        return b"M" + struct.pack("<H", value)
    if name in ("LONG1", "BININT", "BININT1", "BININT2"):
        raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
        return b"\x8a" + bytes([len(raw)]) + raw
    return None


def mutate_zip(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    """Rewrite data.pkl (pickle-aware), a member, a name, or a raw central-directory field."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            members = [(info.filename, z.read(info), info.compress_type) for info in z.infolist()]
    except Exception:
        return mutate_bytes(rng, data, pool)
    choice = rng.randrange(6)
    if choice == 0 or not members:
        return _central_field(rng, data)
    edited = list(members)
    i = rng.randrange(len(edited))
    name, raw, method = edited[i]
    if choice <= 2:  # the pickle, most of the time
        for j, (n, r, m) in enumerate(edited):
            if n.endswith("data.pkl"):
                edited[j] = (n, mutate_pickle(rng, r, pool), m)
    elif choice == 3:
        edited[i] = (name, mutate_bytes(rng, raw, pool), method)
    elif choice == 4:
        renames = [name + "x", name.replace("data/", "data/../"), "other/" + name.split("/")[-1], name[:-1]]
        new_name = rng.choice(renames)
        edited[i] = (new_name, raw, method)
    else:
        edited[i] = (name, raw, zipfile.ZIP_DEFLATED if method == zipfile.ZIP_STORED else zipfile.ZIP_STORED)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for n, r, m in edited:
            z.writestr(n, r, compress_type=m)
    return out.getvalue()


def _central_field(rng: random.Random, data: bytes) -> bytes:
    records = [i for i in range(len(data) - 46) if data[i : i + 4] in (b"PK\x01\x02", b"PK\x03\x04", b"PK\x05\x06")]
    if not records:
        return data
    start = rng.choice(records)
    buf = bytearray(data)
    offset = rng.choice([6, 8, 10, 14, 16, 18, 20, 22, 24, 26, 28, 30, 42])
    width = 4 if offset in (14, 16, 18, 20, 22, 24, 42) else 2
    if start + offset + width <= len(buf):
        buf[start + offset : start + offset + width] = (_interesting_int(rng) % (1 << (8 * width))).to_bytes(
            width, "little"
        )
    return bytes(buf)


def mutate_legacy(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    """Edit the main pickle of a legacy file (after the magic, protocol and sys-info pickles)."""
    stream = io.BytesIO(data)
    try:
        for _ in range(3):
            for _op in pickletools.genops(stream):
                pass
        start = stream.tell()
        for _op in pickletools.genops(stream):
            pass
        end = stream.tell()
    except Exception:
        return mutate_bytes(rng, data, pool)
    if rng.random() < 0.2:  # or a storage's element count, just after the key list
        return mutate_bytes(rng, data[:end], pool) + data[end:]
    return data[:start] + mutate_pickle(rng, data[start:end], pool) + data[end:]


def mutate_safetensors(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    """Edit one value of the header JSON (the tie record too), or its bytes."""
    if len(data) < 8 or rng.random() < 0.25:
        return mutate_bytes(rng, data, pool)
    (length,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8 : 8 + length])
    except Exception:
        return mutate_bytes(rng, data, pool)
    record = None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if isinstance(meta, dict) and "tiesafe" in meta and rng.random() < 0.5:
        try:
            record = json.loads(meta["tiesafe"])
            _mutate_json(rng, record)
            meta["tiesafe"] = json.dumps(record)
        except Exception:
            record = None
    if record is None:
        _mutate_json(rng, header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    prefix = struct.pack("<Q", len(raw) if rng.random() < 0.95 else _interesting_int(rng) % 2**64)
    return prefix + raw + data[8 + length :]


def _mutate_json(rng: random.Random, node: Any) -> None:
    for _ in range(rng.randint(1, 8)):  # walk down to a container
        if isinstance(node, dict):
            children = list(node.items())
        else:
            children = list(enumerate(node)) if isinstance(node, list) else []
        containers = [(k, v) for k, v in children if isinstance(v, (dict, list)) and v]
        if not containers or rng.random() < 0.3:
            break
        _, node = rng.choice(containers)
    if isinstance(node, dict) and node:
        key = rng.choice(list(node))
        action = rng.randrange(4)
        if action == 0:
            del node[key]
        elif action == 1:
            node[key + rng.choice(["", "x", ".weight"])] = node[key]
        else:
            node[key] = _json_value(rng, node[key])
    elif isinstance(node, list) and node:
        i = rng.randrange(len(node))
        node[i] = _json_value(rng, node[i])
    elif isinstance(node, list):
        node.append(_interesting_int(rng))


def _json_value(rng: random.Random, old: Any) -> Any:
    return rng.choice(
        [
            _interesting_int(rng),
            -1,
            "F32",
            "F16",
            "BF16",
            "I64",
            "U8",
            "BOOL",
            "w",
            "",
            None,
            [],
            {},
            [_interesting_int(rng)],
            [0, _interesting_int(rng)],
            old if not isinstance(old, int) else old + rng.choice([-1, 1, 8]),
            1.5,
            True,
        ]
    )


def mutate(rng: random.Random, seed: Seed, pool: list[bytes]) -> bytes:
    if seed.kind == "safetensors":
        return mutate_safetensors(rng, seed.data, pool)
    if seed.data.startswith(b"PK"):
        return mutate_zip(rng, seed.data, pool) if rng.random() < 0.75 else mutate_bytes(rng, seed.data, pool)
    return mutate_legacy(rng, seed.data, pool) if rng.random() < 0.75 else mutate_bytes(rng, seed.data, pool)


# --------------------------------------------------------------------------- one input


def run_one(kind: str, path: Path, source: Path | None, differential: bool) -> str:
    """Run the readers on one input; return "ok", "refused:<class>" or raise (a finding)."""
    import converter
    from converter.errors import TiesafeError

    try:
        if kind == "checkpoint":
            _check_checkpoint(path, differential)
        else:
            _check_safetensors(path, source)
    except TiesafeError as exc:
        return f"refused:{type(exc).__name__}"
    del converter
    return "ok"


def _check_checkpoint(path: Path, differential: bool) -> None:
    import converter
    from converter.readers.torchfile import read_checkpoint

    _replay_alike(path)
    converter.inspect(path)
    out = path.with_name("out.safetensors")
    converter.convert_file(path, out, overwrite=True)  # verifies bit for bit before the rename
    ckpt = read_checkpoint(path)
    converter.verify_file(path, out)
    loaded = converter.load_file(out)
    if set(loaded) != set(ckpt.tensors):
        raise AssertionError(f"names differ after load: {sorted(set(loaded) ^ set(ckpt.tensors))[:5]}")
    for name, ref in ckpt.tensors.items():
        if tuple(loaded[name].shape) != ref.shape or str(loaded[name].dtype) != f"torch.{ref.dtype.torch_name}":
            raise AssertionError(f"{name!r} loads as {loaded[name].dtype}{tuple(loaded[name].shape)}")
    if differential:
        _against_torch(path, loaded)


def _replay_alike(path: Path) -> None:
    """The scan walks each pickle of the input alike with and without replaying tensor entries."""
    from converter.readers import pickle_guard

    raw = path.read_bytes()
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            pickles = [archive.read(name) for name in archive.namelist() if name.endswith(".pkl")]
    except Exception:  # a legacy file (its pickles one after another), or an archive the readers will judge
        pickles = [raw]

    def walk(data: bytes, pos: int, fast: bool) -> tuple[object, ...]:
        state = pickle_guard._Walk(len(data), fast=fast)
        try:
            end = state.run(data, pos, True)
        except Exception as exc:
            return ("refused", type(exc).__name__, str(exc))
        counts = (state.stored, state.floodable_keys, state.opcodes)
        return (end, state.done, state.stack, state.marks, state.memo, *counts)

    for data in pickles:
        pos = 0
        for _ in range(5):  # a legacy file: magic number, protocol, system info, the weights, the storage keys
            slow = walk(data, pos, False)
            if walk(data, pos, True) != slow:
                raise AssertionError(f"the scan's replay walks a pickle at byte {pos} unlike its opcode loop")
            if slow[0] == "refused" or not slow[1]:
                break
            pos = int(slow[0])  # type: ignore[call-overload]


def _against_torch(path: Path, loaded: dict[str, Any]) -> None:
    """When torch's own (weights-only) reader accepts the file too, both must read the same bits."""
    import torch

    try:
        theirs = torch.load(path, weights_only=True, map_location="cpu")
    except Exception:
        return  # torch refuses what we accept (e.g. storages with a wrong CRC): not a misreading
    from converter.names import strip_prefixes
    from converter.readers.torchfile import read_checkpoint

    wrapper = read_checkpoint(path).wrapper  # where tiesafe found the weights; torch's reading must agree
    for part in wrapper.split("/") if wrapper else ():
        if isinstance(theirs, dict) and part in theirs:
            theirs = theirs[part]
        elif isinstance(theirs, (list, tuple)) and part.isdigit() and int(part) < len(theirs):
            theirs = theirs[int(part)]
        else:
            raise AssertionError(f"torch.load finds no entry {wrapper!r}, where tiesafe read the weights")
    if not isinstance(theirs, dict):
        return
    theirs = {n: t for n, t in theirs.items() if isinstance(n, str) and isinstance(t, torch.Tensor)}
    renamed, _ = strip_prefixes(list(theirs))
    theirs = {renamed[n]: t for n, t in theirs.items()}
    for name, tensor in theirs.items():
        if name in loaded and isinstance(tensor, torch.Tensor):
            mine = loaded[name]
            if mine.dtype != tensor.dtype or mine.shape != tensor.shape or not _same_bits(mine, tensor):
                raise AssertionError(f"{name!r} differs from torch.load's reading of the same file")


def _same_bits(a: Any, b: Any) -> bool:
    import torch

    raw = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    if a.dtype.is_complex:
        a, b = torch.view_as_real(a), torch.view_as_real(b)
        raw = torch.int32
    return bool(torch.equal(a.contiguous().view(raw), b.contiguous().view(raw)))


def _check_safetensors(path: Path, source: Path | None) -> None:
    import converter

    converter.inspect(path)
    loaded = converter.load_file(path)
    clones = converter.load_file(path, ties="clone")
    if set(loaded) != set(clones):
        raise AssertionError("share and clone give different names")
    if source is not None:
        converter.verify_file(source, path)


# --------------------------------------------------------------------------- workers


def _worker(conn: Connection, memory_mb: int, differential: bool) -> None:
    import resource
    import warnings

    warnings.simplefilter("ignore")  # torch's notes about protocols and duplicate zip names, once per input
    limit = memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    import converter  # noqa: F401  (imported once, before the first input)

    if differential:
        import torch  # noqa: F401
    while True:
        job = conn.recv()
        if job is None:
            return
        kind, path, source = job
        try:
            outcome = run_one(kind, Path(path), Path(source) if source else None, differential)
        except BaseException as exc:  # a finding: report it, keep serving
            tb = traceback.format_exc(limit=-6)
            outcome = f"crash:{type(exc).__name__}: {str(exc)[:200]}\n{tb}"
        # A MemoryError turned into a clean refusal still means memory was not bounded:
        # the high-water mark of the worker's resident memory tells.
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        conn.send((outcome, peak_mb))


class _Worker:
    def __init__(self, ctx: Any, folder: Path, memory_mb: int, rss_mb: int, differential: bool) -> None:
        self.folder, self.ctx, self.memory_mb, self.differential = folder, ctx, memory_mb, differential
        self.rss_mb = rss_mb
        folder.mkdir(parents=True, exist_ok=True)
        self._start()

    def _start(self) -> None:
        self.conn, child = self.ctx.Pipe()
        self.process = self.ctx.Process(target=_worker, args=(child, self.memory_mb, self.differential), daemon=True)
        self.process.start()
        child.close()

    def run(self, kind: str, data: bytes, source: bytes | None, timeout: float) -> str:
        for leftover in self.folder.iterdir():
            leftover.unlink()
        path = self.folder / ("input.safetensors" if kind == "safetensors" else "input.bin")
        path.write_bytes(data)
        source_path = None
        if source is not None:
            source_path = self.folder / "source.bin"
            source_path.write_bytes(source)
        self.conn.send((kind, str(path), str(source_path) if source_path else None))
        if self.conn.poll(timeout):
            try:
                outcome, peak_mb = self.conn.recv()
            except EOFError:
                pass
            else:
                if peak_mb <= self.rss_mb:
                    return str(outcome)
                self.stop()  # a fresh worker, so that the next input's peak is its own
                self._start()
                return f"memory: the worker's resident memory reached {peak_mb} MiB ({outcome.split(chr(10))[0]})"
        else:
            self.process.kill()
            self.process.join()
            self._start()
            return f"hang: no answer in {timeout} s"
        self.process.join()
        code = self.process.exitcode
        self._start()
        return f"died: worker exit code {code} (negative: signal; the memory limit shows as MemoryError or -9)"

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()


@dataclasses.dataclass
class Summary:
    inputs: int = 0
    seconds: float = 0.0
    outcomes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    findings: list[dict[str, str]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "seconds": round(self.seconds, 1),
            "inputs_per_second": round(self.inputs / self.seconds, 1) if self.seconds else None,
            "outcomes": dict(self.outcomes.most_common()),
            "findings": self.findings,
        }


def fuzz(args: argparse.Namespace) -> Summary:
    import warnings

    warnings.simplefilter("ignore")
    work = Path(tempfile.mkdtemp(prefix="tiesafe-fuzz-", dir=args.workdir))
    try:
        return _fuzz_in(work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fuzz_in(work: Path, args: argparse.Namespace) -> Summary:
    import threading

    sentinels = work / "sentinels"
    sentinels.mkdir()
    out = Path(args.out)
    (work / "seeds").mkdir()
    seeds = build_seeds(work / "seeds", sentinels, corpus=not args.no_corpus)
    pool = [s.data for s in seeds]
    summary = Summary()
    ctx = multiprocessing.get_context("spawn")
    workers = [
        _Worker(ctx, work / f"w{i}", args.memory_mb, args.rss_mb, not args.no_differential) for i in range(args.workers)
    ]
    lock = threading.Lock()
    counter = iter(range(args.iterations))
    started = time.perf_counter()

    def loop(worker: _Worker) -> None:
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            rng = random.Random(f"{args.seed}:{index}")
            seed = rng.choice(seeds)
            data = mutate(rng, seed, pool)
            outcome = worker.run(seed.kind, data, seed.source, args.timeout)
            ran = sorted(p.name for p in sentinels.iterdir())
            if ran:
                outcome = f"sentinel: a payload ran ({ran})"
                for p in sentinels.iterdir():
                    p.unlink()
            with lock:
                summary.inputs += 1
                summary.outcomes[_label(outcome)] += 1
                if not outcome.startswith(("ok", "refused:")):
                    _save_finding(out, summary, index, seed, data, outcome)
                if args.progress and summary.inputs % args.progress == 0:
                    rate = summary.inputs / (time.perf_counter() - started)
                    print(f"{summary.inputs} inputs, {rate:.0f}/s, {len(summary.findings)} findings", file=sys.stderr)

    threads = [threading.Thread(target=loop, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w in workers:
        w.stop()
    summary.seconds = time.perf_counter() - started
    return summary


def _label(outcome: str) -> str:
    first = outcome.split("\n", 1)[0]
    if first.startswith("crash:"):
        return "crash: " + first.split(":", 2)[1]  # the exception type
    if first.startswith(("ok", "refused:")):
        return first
    return first.split(":", 1)[0]  # hang, died, sentinel, memory


def _save_finding(out: Path, summary: Summary, index: int, seed: Seed, data: bytes, outcome: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"finding-{index:07d}"
    suffix = ".safetensors" if seed.kind == "safetensors" else ".bin"
    (out / f"{stem}{suffix}").write_bytes(data)
    if seed.source is not None:
        (out / f"{stem}.source.bin").write_bytes(seed.source)
    (out / f"{stem}.txt").write_text(f"seed: {seed.name}\n{outcome}\n")
    summary.findings.append({"input": str(out / f"{stem}{suffix}"), "seed": seed.name, "outcome": outcome[:500]})


# --------------------------------------------------------------------------- atheris


def _write_seeds(work: Path, corpus: bool) -> None:
    """In a child process: converter must first be imported under atheris' instrumentation."""
    import warnings

    warnings.simplefilter("ignore")
    (work / "seeds").mkdir()
    for i, seed in enumerate(build_seeds(work / "seeds", work / "sentinels", corpus=corpus)):
        if seed.kind == "checkpoint":
            (work / "corpus" / f"{i}").write_bytes(seed.data)


def fuzz_atheris(args: argparse.Namespace) -> None:
    """Coverage-guided: libFuzzer drives, our mutators help it through the zip and the pickle."""
    import resource
    import warnings

    import atheris

    warnings.simplefilter("ignore")
    # libFuzzer ends the process itself, so nothing here is cleaned up at exit: the work
    # folder lives under --out, and a later run resumes from the corpus it grew.
    work = Path(args.out).resolve() / "atheris"
    sentinels, corpus_dir = work / "sentinels", work / "corpus"
    sentinels.mkdir(parents=True, exist_ok=True)
    corpus_dir.mkdir(exist_ok=True)
    if not any(corpus_dir.iterdir()):
        shutil.rmtree(work / "seeds", ignore_errors=True)
        child = multiprocessing.get_context("spawn").Process(target=_write_seeds, args=(work, not args.no_corpus))
        child.start()
        child.join()
    pool = [p.read_bytes() for p in corpus_dir.iterdir()]
    with atheris.instrument_imports(include=["converter"]):
        import converter
        from converter.errors import TiesafeError
    target = work / "input.bin"
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    def test_one(data: bytes) -> None:
        target.write_bytes(data)
        with contextlib.suppress(TiesafeError):
            _check_checkpoint(target, differential=False)
        if any(sentinels.iterdir()):
            raise AssertionError("a payload ran")

    def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        if rng.random() < 0.5:
            return bytes(atheris.Mutate(data, max_size))
        try:
            return mutate(rng, Seed("", "checkpoint", data), pool)[:max_size]
        except Exception:  # a mutator bug must not stop the campaign
            return bytes(atheris.Mutate(data, max_size))

    del converter
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.argv[0],
        str(corpus_dir),
        f"-runs={args.iterations}",
        f"-timeout={int(args.timeout)}",
        f"-rss_limit_mb={args.memory_mb}",
        f"-seed={abs(hash(args.seed)) % 2**31}",
        f"-artifact_prefix={out}/",
        "-max_len=1048576",
        "-print_final_stats=1",
    ]
    atheris.Setup(argv, test_one, custom_mutator=custom_mutator)
    atheris.Fuzz()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--iterations", type=int, default=10_000, help="inputs to run (default 10,000)")
    parser.add_argument("--seed", default="0", help="random seed: the same seed runs the same inputs")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per input before it counts as a hang")
    parser.add_argument("--memory-mb", type=int, default=3072, help="address-space limit of a worker (MiB)")
    parser.add_argument("--rss-mb", type=int, default=1024, help="resident memory that counts as a finding (MiB)")
    parser.add_argument(
        "--out", default="fuzz-findings", help="folder for findings; atheris also keeps its corpus there"
    )
    parser.add_argument("--workdir", default="/dev/shm" if os.path.isdir("/dev/shm") else None, help="scratch space")
    parser.add_argument("--no-corpus", action="store_true", help="seed only with real checkpoints")
    parser.add_argument("--no-differential", action="store_true", help="skip the comparison with torch.load")
    parser.add_argument("--progress", type=int, default=0, help="print progress every N inputs")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--atheris", action="store_true", help="coverage-guided fuzzing with atheris (libFuzzer)")
    args = parser.parse_args()
    if args.atheris:
        fuzz_atheris(args)
        return 0
    summary = fuzz(args)
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        data = summary.to_dict()
        print(f"{data['inputs']} inputs in {data['seconds']} s ({data['inputs_per_second']}/s)")
        for outcome, count in data["outcomes"].items():
            print(f"  {count:6d}  {outcome}")
        print(f"{len(summary.findings)} findings" + (f" (saved under {args.out})" if summary.findings else ""))
    return 1 if summary.findings else 0


if __name__ == "__main__":
    sys.exit(main())
