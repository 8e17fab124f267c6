"""The opcode scan's replay of tensor entries: it must walk exactly like the opcode loop alone.

``pickle_guard`` replays the tensor entries ``torch.save`` writes (see its module
docstring). Each test walks the same bytes twice, with the replay and without it
(``_Walk(fast=False)``, ``_REPLAY = False``), and requires the same verdict (the
same error type and message) and, when both accept, the same final memo, stack,
MARK positions, stored-slot count, floodable-key count and opcode count; on real
pickles, the same state after every entry too (a wrong label pushed by a replayed
entry could be hidden in the final state by the dict that takes it). The inputs
are real ``torch.save`` pickles (protocols 2-5, zip and legacy, 300 to 1,100 entries:
past 256 memo slots and past one SETITEMS batch), re-encoded ones, randomly mutated
ones, and hostile ones hidden inside entries the replay would otherwise match.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import random
import struct
import zipfile
from collections.abc import Collection

import pytest
import torch

from converter.errors import CorruptFileError, UnsafeCheckpointError
from converter.readers import pickle_guard


def _state(rng: random.Random, entries: int) -> dict[str, torch.Tensor]:
    """Tensors of every shape torch.save writes differently: ranks 0-5, ints of 1, 2 and 4 bytes, shared storages."""
    state: dict[str, torch.Tensor] = {}
    for i in range(entries):
        kind = rng.randrange(10)
        if kind == 0:
            t = torch.tensor(float(i))  # 0-dim: EMPTY_TUPLE shape and stride
        elif kind == 1:
            t = torch.zeros(1, 2, 1, 2, dtype=torch.float16)  # rank 4: MARK ... TUPLE
        elif kind == 2:
            t = torch.zeros(rng.choice([300, 70_000]), dtype=torch.uint8)  # BININT2 / BININT sizes
        elif kind == 3 and state:
            t = state[rng.choice(sorted(state))]  # the very same tensor: fetched from the memo
        elif kind == 4 and state:
            base = state[rng.choice(sorted(state))]
            t = base.as_strided((base.numel() // 2,), (1,), base.storage_offset())  # a view: storage key fetched
        elif kind == 5:
            t = torch.zeros(2, requires_grad=True)  # NEWTRUE
        elif kind == 6:
            t = torch.zeros(3, 2).t()  # strided
        elif kind == 7:
            t = torch.zeros(0, 3)  # empty
        else:
            t = torch.zeros(rng.randrange(1, 4), rng.randrange(1, 4), dtype=rng.choice([torch.bfloat16, torch.float32]))
        state[f"layers.{i}.weight"] = t
    return state


def _main_pickle(raw: bytes) -> bytes:
    """The pickle of the state dict: data.pkl of a zip checkpoint, or the 4th pickle of a legacy one."""
    if raw[:2] == b"PK":
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            return archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    stream = io.BytesIO(raw)
    for _ in range(3):  # magic number, protocol version, system info
        pickle.load(stream)
    start = stream.tell()
    for _ in pickletools.genops(stream):
        pass
    return raw[start : stream.tell()]


def _saved(state: dict[str, torch.Tensor], protocol: int, legacy: bool) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer, pickle_protocol=protocol, _use_new_zipfile_serialization=not legacy)
    return _main_pickle(buffer.getvalue())


def _walk(data: bytes, *, fast: bool) -> tuple[object, ...]:
    """What the walk ends with: ("refused", type, message), or its whole state."""
    walk = pickle_guard._Walk(len(data), fast=fast)
    try:
        pos = walk.run(data, 0, True)
    except Exception as exc:  # any exception: both walks must raise the same
        return ("refused", type(exc), str(exc))
    state = (pos, walk.done, walk.stack, walk.marks, walk.memo, walk.stored, walk.floodable_keys, walk.opcodes)
    return ("walked", *state)


def _same_walks(data: bytes) -> tuple[object, ...]:
    """Walk with and without the replay, assert they agree, return the verdict."""
    slow = _walk(data, fast=False)
    assert _walk(data, fast=True) == slow
    return slow


def _trace(data: bytes, keys: Collection[str], *, fast: bool) -> list[tuple[object, ...]]:
    """The walk's state at each of the state dict's ``keys``: each replayed entry checked alone."""
    stops = [pos for op, arg, pos in pickletools.genops(data) if "UNICODE" in op.name and arg in keys]
    assert len(stops) == len(keys)
    walk = pickle_guard._Walk(len(data), fast=fast)
    trace: list[tuple[object, ...]] = []
    pos = 0
    for stop in [*stops, len(data)]:
        pos = walk.run(data, pos, True, stop)
        trace.append((pos, tuple(walk.stack), tuple(walk.marks), len(walk.memo), walk.stored, walk.opcodes))
    trace.append((walk.done, tuple(walk.memo), walk.floodable_keys))
    return trace


def _scan(data: bytes, *, replay: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[object, ...]:
    """Scan through a file-like stream read in 4 KiB blocks, as the legacy format is read."""
    monkeypatch.setattr(pickle_guard, "_REPLAY", replay)
    monkeypatch.setattr(pickle_guard, "_READ", 4096)
    stream = io.BufferedReader(io.BytesIO(data + b"trailing storages"))  # type: ignore[arg-type]
    try:
        scanned = pickle_guard.scan(stream, max_bytes=len(data) + 100)
    except Exception as exc:
        return ("refused", type(exc), str(exc))
    return ("scanned", scanned, stream.tell())


def _replayed(data: bytes) -> int:
    walk = pickle_guard._Walk(len(data))
    walk.run(data, 0, True)
    return walk.replayed


# --------------------------------------------------------------------------- real torch.save pickles


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_the_replay_walks_torch_save_pickles_like_the_loop(
    protocol: int, legacy: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = _state(random.Random(protocol * 2 + legacy), 300)
    data = _saved(state, protocol, legacy)
    verdict = _same_walks(data)
    assert verdict[0] == "walked" and verdict[2] is True  # accepted, up to its STOP
    assert _trace(data, state, fast=True) == _trace(data, state, fast=False)  # and alike after every entry
    replayed = _replayed(data)
    assert replayed > 100, replayed  # most entries went through the replay, not the loop
    # Through a stream read in blocks: entries cut by a block's end.
    scanned = _scan(data, replay=True, monkeypatch=monkeypatch)
    assert scanned == _scan(data, replay=False, monkeypatch=monkeypatch) == ("scanned", data, len(data))


def test_the_replay_walks_a_thousand_entry_state_dict_like_the_loop() -> None:
    """Past 1,000 entries (a second SETITEMS batch) and past 256 memo slots (LONG_BINPUT), all alike."""
    state = {f"model.layers.{i // 3}.mlp.experts.{i % 3}.weight": torch.zeros(4, 4) for i in range(1_100)}
    for protocol in (2, 4):
        data = _saved(state, protocol, legacy=False)
        assert _same_walks(data)[0] == "walked"
        assert _trace(data, state, fast=True) == _trace(data, state, fast=False)
        assert _replayed(data) > 1_000


def _reencode(data: bytes, *, shift: int = 0, long1: bool = False, prologue: bytes = b"") -> bytes:
    """The same pickle with memo slots moved up by ``shift`` (after ``prologue``), ints as LONG1 if asked."""
    out = [data[:2], prologue]  # PROTO
    ops = list(pickletools.genops(data))
    for (op, arg, pos), (_, _, after) in zip(ops, [*ops[1:], (None, None, len(data))], strict=True):
        assert isinstance(pos, int) and isinstance(after, int)
        if op.name == "PROTO":
            continue
        if op.name in ("BINPUT", "LONG_BINPUT"):
            out.append(_put(int(arg) + shift))  # type: ignore[call-overload]
        elif op.name in ("BINGET", "LONG_BINGET"):
            out.append(_get(int(arg) + shift))  # type: ignore[call-overload]
        elif long1 and op.name in ("BININT1", "BININT2", "BININT"):
            raw = int(arg).to_bytes(5, "little", signed=True)  # type: ignore[call-overload]
            out.append(b"\x8a\x05" + raw)
        else:
            out.append(data[pos:after])
    return b"".join(out)


def _put(index: int) -> bytes:
    return b"q" + bytes([index]) if index < 256 else b"r" + struct.pack("<I", index)


def _get(index: int) -> bytes:
    return b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index)


def test_entries_with_long1_ints_are_replayed_like_the_loop() -> None:
    state = {f"w{i}": torch.zeros(3, 2) for i in range(200)}
    data = _reencode(_saved(state, 2, legacy=False), long1=True)
    assert b"\x8a\x05" in data
    assert _same_walks(data)[0] == "walked"
    assert _trace(data, state, fast=True) == _trace(data, state, fast=False)
    assert _replayed(data) > 150


# --------------------------------------------------------------------------- mutated pickles

SNIPPETS = [b"(", b"t", b"R", b"0", b"u", b"N", b")", b"\x85", b"\x86", b"\x87", b"Q", b"h\x00", b"q\x00"]
SNIPPETS += [b"r\x00\x00\x00\x40", b"j\xff\xff\x00\x00", b"\x82\x01", b"\x8a\x08" + b"\xff" * 8, b"M\x00\x04", b"."]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    """One random change, mostly past the first entries (where the replay has templates to use)."""
    at = rng.randrange(len(data) // 4, len(data) - 1)
    kind = rng.randrange(6)
    if kind == 0:  # a byte changed
        return data[:at] + bytes([rng.randrange(256)]) + data[at + 1 :]
    if kind == 1:  # an opcode or memo trick spliced in
        return data[:at] + rng.choice(SNIPPETS) + data[at:]
    if kind == 2:  # a few bytes removed
        return data[:at] + data[at + rng.randrange(1, 8) :]
    if kind == 3:  # a stretch repeated (a whole entry, or half of one)
        length = rng.randrange(1, 120)
        return data[: at + length] + data[at : at + length] + data[at + length :]
    if kind == 4:  # a memo slot number changed where one is stored or fetched
        spots = [i for i in range(at, min(len(data) - 1, at + 400)) if data[i] in b"qhrj"]
        if spots:
            i = rng.choice(spots)
            return data[: i + 1] + bytes([rng.choice([0, 1, 2, 3, 255, data[i + 1] ^ 1])]) + data[i + 2 :]
        return data
    # an int's kind swapped (BININT1 <-> BININT2 <-> BININT keeps the opcode shape, not its length)
    spots = [i for i in range(at, min(len(data) - 2, at + 400)) if data[i] == 0x4B]
    if spots:
        i = rng.choice(spots)
        return (
            data[:i]
            + rng.choice([b"M" + bytes([data[i + 1], 0]), b"J" + bytes([data[i + 1], 0, 0, 0])])
            + data[i + 2 :]
        )
    return data


@pytest.mark.parametrize("protocol", [2, 4])
def test_the_replay_walks_mutated_pickles_like_the_loop(protocol: int) -> None:
    rng = random.Random(protocol)
    data = _saved(_state(rng, 300), protocol, legacy=False)
    verdicts = {"walked": 0, "refused": 0}
    for _ in range(300):
        verdict = _same_walks(_mutate(rng, data))
        verdicts[str(verdict[0])] += 1
    assert verdicts["walked"] > 20 and verdicts["refused"] > 20, verdicts  # both outcomes were exercised


# --------------------------------------------------------------------------- hostile entries


def _ops(data: bytes) -> list[tuple[str, object, int]]:
    return [(op.name, arg, pos) for op, arg, pos in pickletools.genops(data)]


def _slot_of(data: bytes, string: str) -> int:
    """The memo slot a string was stored in."""
    ops = _ops(data)
    at = next(i for i, (name, arg, _) in enumerate(ops) if arg == string and "UNICODE" in name)
    return int(ops[at + 1][1])  # type: ignore[call-overload]


def _entry_ops(data: bytes, key: str) -> list[tuple[str, object, int]]:
    """The opcodes of the entry ``key`` (its key string first), up to the next key."""
    ops = _ops(data)
    at = next(i for i, (name, arg, _) in enumerate(ops) if arg == key)
    end = next(i for i in range(at + 1, len(ops)) if str(ops[i][1]).startswith("w") or ops[i][0] == "STOP")
    return ops[at:end]


def _deep_tuple(depth: int) -> bytes:
    return b")" + b"\x85" * (depth - 1)  # EMPTY_TUPLE, then TUPLE1 around it depth - 1 times


def _refused_alike(data: bytes, error: type[Exception], match: str) -> None:
    verdict = _same_walks(data)
    assert verdict[0] == "refused" and verdict[1] is error and match in str(verdict[2]), verdict
    with pytest.raises(error, match=match):
        pickle_guard.scan(io.BytesIO(data), max_bytes=len(data))


@pytest.fixture(scope="module")
def plain() -> bytes:
    """300 alike entries (protocol 2): the replay has learnt the shape long before the last ones."""
    return _saved({f"w{i}": torch.zeros(2, 3) for i in range(300)}, 2, legacy=False)


def test_a_deep_tuple_fetched_inside_an_entry_is_refused(plain: bytes) -> None:
    """A tuple nested 999 deep in slot 0; entry 200 fetches it in place of the device string: 1,001 deep."""
    data = _reencode(plain, shift=1, prologue=_deep_tuple(999) + _put(0) + b"0")
    assert _same_walks(data)[0] == "walked"  # stored and dropped, never nested further: accepted
    cpu = _slot_of(data, "cpu")
    at = next(pos for name, arg, pos in _entry_ops(data, "w200") if name.endswith("GET") and arg == cpu)
    hostile = data[:at] + _get(0) + data[at + len(_get(cpu)) :]
    _refused_alike(hostile, CorruptFileError, "nests tuples more than 1000 deep")


def test_a_deep_tuple_stored_over_a_fetched_slot_is_refused(plain: bytes) -> None:
    """Between two entries a deep tuple rewrites the device string's slot, which every later entry fetches."""
    cpu = _slot_of(plain, "cpu")
    at = _entry_ops(plain, "w200")[0][2]
    hostile = plain[:at] + _deep_tuple(999) + _put(cpu) + b"0" + plain[at:]
    _refused_alike(hostile, CorruptFileError, "nests tuples more than 1000 deep")
    # A harmless rewrite of the same slot is accepted, and walked alike.
    harmless = plain[:at] + b"N" + _put(cpu) + b"0" + plain[at:]
    assert _same_walks(harmless)[0] == "walked"


@pytest.mark.parametrize("key", ["w5", "w200"])  # stores as BINPUT (slots < 256) and as LONG_BINPUT
def test_a_store_far_out_of_order_inside_an_entry_is_refused(plain: bytes, key: str) -> None:
    entry = _entry_ops(plain, key)
    name, _, pos = next(op for op in entry[2:] if op[0] in ("BINPUT", "LONG_BINPUT"))  # past the key's own
    width = 2 if name == "BINPUT" else 5
    hostile = plain[:pos] + b"r" + struct.pack("<I", 2**30) + plain[pos + width :]
    _refused_alike(hostile, CorruptFileError, "far out of order: a memory bomb")


def test_a_stop_inside_what_looks_like_an_entry_ends_the_walk_alike(plain: bytes) -> None:
    """A STOP right after a storage key string: the pickle ends there, wherever the replay thought the entry ended."""
    entry = _entry_ops(plain, "w200")
    pos = next(pos for name, _, pos in entry[1:] if name == "BINUNICODE")  # the storage key
    after = pos + 5 + struct.unpack_from("<I", plain, pos + 1)[0]
    cut = plain[:after] + b"." + plain[after:]
    verdict = _same_walks(cut)
    assert verdict[:3] == ("walked", after + 1, True)


def test_an_extension_code_inside_an_entry_is_refused(plain: bytes) -> None:
    entry = _entry_ops(plain, "w200")
    pos = next(pos for name, _, pos in entry if name == "NEWFALSE")
    hostile = plain[:pos] + b"\x82\x01" + plain[pos + 1 :]  # EXT1 1 in place of requires_grad
    _refused_alike(hostile, UnsafeCheckpointError, "extension code 1")


def test_the_opcode_limit_falls_inside_a_replayed_entry_alike(plain: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _replayed(plain) > 250
    total = _walk(plain, fast=False)[-1]
    assert isinstance(total, int)
    for limit in (total - 1, total // 2 + 7, 1_000 + 13):  # at the STOP, and in the middle of entries
        monkeypatch.setattr(pickle_guard, "MAX_OPCODES", limit)
        _refused_alike(plain, CorruptFileError, f"more than {limit} opcodes")
    monkeypatch.setattr(pickle_guard, "MAX_OPCODES", total)
    assert _same_walks(plain)[0] == "walked"  # exactly at the limit: accepted by both
