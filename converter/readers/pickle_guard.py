"""Read a pickle's opcodes before any of them runs, and refuse the ones that hurt.

The restricted unpickler closes the door to callables (``find_class``), but the C
unpickler has other ways to crash, hang or exhaust a process that no ``find_class``
sees, all reachable from a few bytes:

- ``EXT1/2/4`` push whatever ``copyreg``'s *process-wide* extension cache holds for
  a code, without asking ``find_class`` when another unpickler filled it before;
- a tuple nested a few hundred thousand deep segfaults CPython when it is hashed
  (as a dict key or set element): ``tuplehash`` recurses without a depth check;
- ``LONG_BINPUT 2**30`` makes the unpickler allocate a 16 GB memo;
- thousands of distinct dict keys that hash alike (huge ints, floats, tuples:
  their hashes are not randomised) make dict insertion quadratic: minutes of CPU
  from a few hundred KB;
- a string opcode announcing gigabytes makes the reader allocate them.

So each pickle is walked once with :func:`pickletools.genops` (pure Python, no
object built), simulating only the stack's *shape*: for each item, how deep its
tuples nest and whether an attacker can choose its hash. The walk costs about a
microsecond per opcode (a weights pickle has about 30 per tensor), and it stops
at 8 million opcodes so that it cannot become the slow part itself. A real weights
pickle never comes near any limit; a hostile one is refused by name.

The walk also yields the pickle's exact bytes, so the caller unpickles from
memory a stream it has already measured.
"""

from __future__ import annotations

import contextvars
import io
import pickletools
from collections.abc import Iterable
from typing import IO, BinaryIO, NamedTuple, cast

from ..errors import CorruptFileError, UnsafeCheckpointError

MAX_TUPLE_DEPTH = 1_000  # real checkpoints nest tuples 3-4 deep; CPython crashes near 100,000
MAX_FLOODABLE_KEYS = 4_096  # keys with attacker-chosen hashes; 4,096 colliding ones cost ~0.1 s
MAX_OPCODES = 8_000_000  # ~30 per tensor: 260,000 tensors; bounds the walk itself to seconds
_MEMO_SLACK = 1_024  # picklers number memo slots in order; allow a little disorder, not gaps of 2**30
_SAFE_INT = (1 << 61) - 2  # |n| below this hashes to itself (sys.hash_info.modulus is 2**61 - 1)

_TUPLES = frozenset({"EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"})
_INTS = frozenset({"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"})
# Objects whose hash an attacker cannot choose: randomised (str, bytes), identity-based
# (the markers find_class and persistent_load hand out) or unhashable (containers).
_SAFE = frozenset(
    {
        "STRING",
        "BINSTRING",
        "SHORT_BINSTRING",
        "BINBYTES",
        "SHORT_BINBYTES",
        "BINBYTES8",
        "BYTEARRAY8",
        "NONE",
        "NEWTRUE",
        "NEWFALSE",
        "UNICODE",
        "SHORT_BINUNICODE",
        "BINUNICODE",
        "BINUNICODE8",
        "EMPTY_LIST",
        "LIST",
        "APPEND",
        "APPENDS",
        "EMPTY_DICT",
        "DICT",
        "SETITEM",
        "SETITEMS",
        "EMPTY_SET",
        "ADDITEMS",
        "GLOBAL",
        "STACK_GLOBAL",
        "PERSID",
        "BINPERSID",
    }
)


class _Item(NamedTuple):
    depth: int  # how deep tuples nest inside (an upper bound)
    floodable: bool  # hashable with a hash the pickle can choose


_MARK = _Item(-1, False)  # stands for a MARK on the simulated stack
_FLOODABLE_BUDGET: contextvars.ContextVar[list[int]] = contextvars.ContextVar("tiesafe_floodable_budget")


def _malformed(problem: str) -> CorruptFileError:
    return CorruptFileError(f"the pickle is malformed ({problem})")


def _small_int(value: object) -> bool:
    return type(value) is int and -_SAFE_INT < value < _SAFE_INT


def _floodable_int(value: object) -> bool:
    return type(value) is int and not _small_int(value)


class _Scanner:
    """One pass over the opcodes of one pickle, simulating labels instead of objects."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.stack: list[_Item] = []
        self.memo: dict[int, _Item] = {}
        self.floodable_keys = 0

    def _pop(self) -> _Item:
        if not self.stack or self.stack[-1] is _MARK:
            raise _malformed("stack underflow")
        return self.stack.pop()

    def _pop_to_mark(self) -> list[_Item]:
        items: list[_Item] = []
        while self.stack and self.stack[-1] is not _MARK:
            items.append(self.stack.pop())
        if not self.stack:
            raise _malformed("no MARK on the stack")
        self.stack.pop()
        items.reverse()
        return items

    def _count_keys(self, keys: Iterable[_Item]) -> None:
        self.floodable_keys += sum(1 for k in keys if k.floodable)
        if self.floodable_keys > MAX_FLOODABLE_KEYS:
            raise CorruptFileError(
                f"refused: the pickle inserts more than {MAX_FLOODABLE_KEYS} dict keys or set elements whose "
                "hash it can choose (numbers, tuples): a hash-flooding attack, not a weights file"
            )

    def step(self, opcode: pickletools.OpcodeInfo, arg: object) -> None:
        name, before = opcode.name, opcode.stack_before
        if name in ("EXT1", "EXT2", "EXT4"):
            raise UnsafeCheckpointError(
                f"refused: the pickle uses extension code {arg} ({name}), which a weights file does not need "
                "and which could resolve to any callable registered in this process"
            )
        if name == "FRAME" and isinstance(arg, int) and arg > self.max_bytes:
            raise CorruptFileError(f"the pickle announces a frame of {arg} bytes: too large for a weights file")
        if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            self._memoize(len(self.memo) if name == "MEMOIZE" else arg)
            return
        if name in ("GET", "BINGET", "LONG_BINGET"):
            if not isinstance(arg, int) or arg not in self.memo:
                raise _malformed(f"memo slot {arg} was never stored")
            self.stack.append(self.memo[arg])
            return
        if name == "POP" and self.stack and self.stack[-1] is _MARK:
            self.stack.pop()  # as the C unpickler does: POP on a MARK drops the MARK
            return

        # Take what the opcode consumes, as pickletools describes it.
        if pickletools.markobject in before:
            sliced = self._pop_to_mark()
            consumed = [self._pop() for _ in range(before.index(pickletools.markobject))] + sliced
            if name in ("SETITEMS", "DICT"):
                self._count_keys(sliced[0::2])
            elif name in ("ADDITEMS", "FROZENSET"):
                self._count_keys(sliced)
        else:
            consumed = [self._pop() for _ in before]  # in pop order: the top of the stack first
            if name == "SETITEM":
                self._count_keys(consumed[1:2])  # value, key, dict

        # Push a label for what it produces.
        if not opcode.stack_after or name == "READONLY_BUFFER":
            if name == "READONLY_BUFFER":
                self.stack.append(consumed[0])
            return
        depth = max((item.depth for item in consumed), default=0)
        if name == "MARK":
            self.stack.append(_MARK)
        elif name == "DUP":
            self.stack.extend([consumed[0], consumed[0]])
        elif name == "BUILD":
            self.stack.append(_Item(depth, consumed[1].floodable))  # the object, with its new state
        elif name in _TUPLES:
            if depth + 1 > MAX_TUPLE_DEPTH:
                raise CorruptFileError(f"the pickle nests tuples more than {MAX_TUPLE_DEPTH} deep")
            self.stack.append(_Item(depth + 1, True))
        elif name in _INTS:
            self.stack.append(_Item(0, _floodable_int(arg)))
        else:  # scalars, containers, and the results of calls (unknown, so floodable)
            self.stack.append(_Item(depth, name not in _SAFE))

    def _memoize(self, index: object) -> None:
        if not isinstance(index, int) or index > len(self.memo) + _MEMO_SLACK:
            raise CorruptFileError(f"the pickle stores memo slot {index} far out of order: a memory bomb")
        if not self.stack or self.stack[-1] is _MARK:
            raise _malformed("nothing to store in the memo")
        self.memo[index] = self.stack[-1]


class _Bounded:
    """Reads through to ``raw`` and keeps the bytes, refusing to go past ``limit`` of them."""

    def __init__(self, raw: BinaryIO, limit: int) -> None:
        self._raw, self._limit = raw, limit
        self.taken = bytearray()

    def _check(self, n: int) -> None:
        if len(self.taken) + n > self._limit:
            raise CorruptFileError(f"the pickle is larger than {self._limit} bytes: not a weights file")

    def tell(self) -> int:
        return len(self.taken)

    def read(self, n: int) -> bytes:
        self._check(n)  # before reading: a string may announce any length
        data = self._raw.read(n)
        self.taken += data
        return data

    def readline(self) -> bytes:
        data = self._raw.readline(self._limit - len(self.taken) + 1)
        self._check(len(data))
        self.taken += data
        return data


def scan(stream: BinaryIO, *, max_bytes: int) -> bytes:
    """Walk one pickle from ``stream``'s position to its ``STOP``; return its bytes.

    Raises :class:`~converter.errors.UnsafeCheckpointError` for extension codes and
    :class:`~converter.errors.CorruptFileError` for malformed pickles and for the
    crash, memory and time bombs listed in the module docstring. ``stream`` is left
    just after the ``STOP`` opcode.

    Example:
        >>> scan(io.BytesIO(b"\\x80\\x02}q\\x00."), max_bytes=100)
        b'\\x80\\x02}q\\x00.'
    """
    # In memory (a zip member, already size-checked) the bytes are sliced; a file is read through a bound.
    in_memory = isinstance(stream, io.BytesIO)
    source: BinaryIO | _Bounded = stream if in_memory else _Bounded(stream, max_bytes)
    start = stream.tell()
    scanner = _Scanner(max_bytes)
    try:
        for count, (opcode, arg, _) in enumerate(pickletools.genops(cast(IO[bytes], source))):
            if count == MAX_OPCODES:
                raise CorruptFileError(f"the pickle has more than {MAX_OPCODES} opcodes: not a weights file")
            scanner.step(opcode, arg)
    except (CorruptFileError, UnsafeCheckpointError):
        raise
    except (ValueError, TypeError, EOFError, OverflowError, UnicodeDecodeError) as exc:
        raise _malformed(f"{type(exc).__name__}: {str(exc)[:120]}") from None
    except MemoryError:
        raise CorruptFileError("the pickle needs more memory than a weights file can") from None
    _FLOODABLE_BUDGET.set([MAX_FLOODABLE_KEYS - scanner.floodable_keys])
    if isinstance(source, _Bounded):
        return bytes(source.taken)
    return cast(io.BytesIO, stream).getbuffer()[start : stream.tell()].tobytes()


def charge_floodable(items: Iterable[object], *, safe: tuple[type, ...]) -> None:
    """Count, against the current pickle's budget, hashed elements whose hash it chose.

    For the containers a pickle builds by calling ``set``/``frozenset``/``OrderedDict``
    with arguments (the scan cannot see inside those arguments): ``safe`` lists the
    types whose hash is identity-based or randomised.
    """
    floodable = sum(
        1 for item in items if not (isinstance(item, (str, bytes, bool, type(None), *safe)) or _small_int(item))
    )
    budget = _FLOODABLE_BUDGET.get([MAX_FLOODABLE_KEYS])
    budget[0] -= floodable
    if budget[0] < 0:
        raise CorruptFileError(
            f"refused: the pickle builds sets or dicts with more than {MAX_FLOODABLE_KEYS} elements whose hash "
            "it can choose (numbers, tuples): a hash-flooding attack, not a weights file"
        )
