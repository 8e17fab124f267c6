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

So each pickle is walked once before it is unpickled, simulating only the stack's
*shape*: for each item, how deep its tuples nest and whether an attacker can choose
its hash. No object is built. A real weights pickle never comes near any limit; a
hostile one is refused by name. The walk stops at 8 million opcodes so that it
cannot become the slow part itself.

Speed: a mixture-of-experts checkpoint has tens of thousands of tensors, about 32
opcodes each (1.5 million for 46,848 tensors). :func:`pickletools.genops` costs
about 5 µs an opcode there, so the walk is a loop of our own over the bytes: the
opcodes ``torch.save`` and ``pickle`` write in binary protocols are handled inline
(an item is one int, ``depth * 2 + floodable``), and every other opcode goes
through :mod:`pickletools`' own argument readers and stack descriptions, by the
same rules. Hand-written because no library walks a pickle's opcodes in C.

That loop still costs about 0.4 µs an opcode, and ``torch.save`` writes every
tensor of a state dict with the same few dozen opcodes. So tensor entries are
*replayed*: the first entry of each shape goes through the loop, opcode by opcode,
and what the loop did (the labels it appended to the memo, the label it pushed,
the opcodes it counted) is kept as a template: the entry's bytes, compared under
a mask that frees only what cannot change the outcome: the memo slots it stores
to (then checked to be the next free ones, the case in which the loop appends),
the values of its ints (all below 2**55, never floodable) and one string (the
storage key; strings are never decoded here). A later entry whose bytes fit, and
whose slots check, gets the same effect for a few big-int and struct operations
in C: about 2.5 µs an entry instead of 13. Everything else goes through the loop:
another shape, an entry that a FRAME splits, a fetch of another slot, a store out
of order; a store that rewrites a slot drops every template (their fetched labels
may have changed). A template is only made from opcodes that push and pop within
the entry, so an entry is only replayed where the loop would do exactly the same
again, and no rule is skipped; tests compare the two walks on real, mutated and
hostile pickles. Hand-written (a compiled ``re`` finds where an entry may end;
the rest is ours) because no library replays a pickle's opcodes.

The walk also yields the pickle's exact bytes, so the caller unpickles from
memory a stream it has already measured.
"""

from __future__ import annotations

import contextvars
import io
import pickletools
import re
import struct
from collections.abc import Callable, Iterable
from typing import BinaryIO

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


_MARK = -1  # a MARK on the simulated stack; an item is ``depth * 2 + floodable`` (never negative)
_NEED = -1  # a step needs bytes past the end of what was read so far
_UNSET = -2  # a memo slot nothing was stored in
_AHEAD = 9  # the longest fixed-size opcode with its argument (FRAME): inline steps read no further
_REPLAY = True  # replay tensor entries (tests turn it off to compare with the opcode loop alone)
_READ = 1 << 20  # a pickle read from a file (legacy format) is read in growing blocks from this size
_BY_CODE = {ord(op.code): op for op in pickletools.opcodes}
_FLOODABLE_BUDGET: contextvars.ContextVar[list[int]] = contextvars.ContextVar("tiesafe_floodable_budget")
_uint4 = struct.Struct("<I").unpack_from
_uint2 = struct.Struct("<H").unpack_from
_uint8 = struct.Struct("<Q").unpack_from


def _malformed(problem: str) -> CorruptFileError:
    return CorruptFileError(f"the pickle is malformed ({problem})")


def _small_int(value: object) -> bool:
    return type(value) is int and -_SAFE_INT < value < _SAFE_INT


def _tuple(depth: int) -> int:
    """The label of a tuple whose items nest ``depth`` deep."""
    if depth + 1 > MAX_TUPLE_DEPTH:
        raise CorruptFileError(f"the pickle nests tuples more than {MAX_TUPLE_DEPTH} deep")
    return (depth + 1) * 2 + 1


def _too_many_keys() -> CorruptFileError:
    return CorruptFileError(
        f"refused: the pickle inserts more than {MAX_FLOODABLE_KEYS} dict keys or set elements whose "
        "hash it can choose (numbers, tuples): a hash-flooding attack, not a weights file"
    )


# Replaying torch.save's tensor entries (see _Walk.run and the module docstring).
_MAX_TEMPLATES = 24  # entry shapes kept at once (a model has a few: weight, bias, norm, embedding... by dtype)
# Entries walked to learn a shape, and entries no template matched (past that), beyond the ones
# replayed: then the replay stops, so that a pickle of ever-new shapes costs what the loop costs.
_MAX_LESSONS = 64
_MAX_MISSES = 64

# Where a torch.save state-dict entry seems to end, after its key string: the key's store, then
# _rebuild_tensor_v2(persistent_load(('storage', type, key, location, numel[, None])), offset,
# shape, stride, requires_grad, OrderedDict()) with every result stored; each item of the
# persistent id fetched, a short string (stored), an int or None. Only a proposal: what is
# learnt from it is checked opcode by opcode (_Template), so a wrong guess costs time, not rules.
_PUT = rb"(?:q.|r.{4}|\x94)"
_GET = rb"(?:h.|j.{4})"
_INTEGER = rb"(?:K.|M.{2}|J.{4}|\x8a[\x00-\x07].{0,7})"
_TEXT = rb"(?:X[\x00-\x18]\x00\x00\x00|\x8c[\x00-\x18]).{0,24}"
_ATOM = b"(?:%s|%s%s|%s|N)" % (_GET, _TEXT, _PUT, _INTEGER)
_SIZES = b"(?:\\)|%s\\x85|%s{2}\\x86|%s{3}\\x87|\\(%s*t)%s?" % (_INTEGER, _INTEGER, _INTEGER, _INTEGER, _PUT)
_ENTRY = re.compile(
    b"".join(
        [
            _PUT + _GET + b"\\(\\(",
            _ATOM * 5 + _ATOM + b"?",
            b"t" + _PUT + b"Q" + _INTEGER + _SIZES + _SIZES + b"[\\x88\\x89]",
            _GET + b"\\)R" + _PUT + b"t" + _PUT + b"R" + _PUT,
        ]
    ),
    re.DOTALL,
)
_WIDTH = {0x71: 1, 0x72: 4, 0x94: 0, 0x68: 1, 0x6A: 4, 0x4B: 1, 0x4D: 2, 0x4A: 4}  # argument bytes
_PUTS = frozenset({0x71, 0x72, 0x94})  # BINPUT, LONG_BINPUT, MEMOIZE
_INT_OPS = frozenset({0x4B, 0x4D, 0x4A})  # BININT1, BININT2, BININT
# Opcodes that push one item and pop none: fetches, ints, strings, None, False, True, EMPTY_TUPLE.
_PUSH_OPS = frozenset({0x68, 0x6A, 0x4B, 0x4D, 0x4A, 0x8A, 0x58, 0x8C, 0x4E, 0x89, 0x88, 0x29})
_POP_OPS = {0x85: 1, 0x86: 2, 0x87: 3, 0x51: 1, 0x52: 2}  # TUPLE1-3, BINPERSID, REDUCE: pop n, push one


class _Template:
    """A tensor entry the opcode loop has walked, to replay on entries that differ only where it cannot matter.

    Compared literally: every opcode, the memo slots fetched, every string but the first, the
    kind of each int. Free: the slots of the stores (``fit`` checks them to be the next free
    ones, which is when the loop appends), the value of each int (all below 2**55: never
    floodable, always labelled 0), the first string's length and content (a string is labelled
    0). An entry that fits makes the loop do again what it did: append ``labels`` to the memo,
    push ``result``, count ``ops`` opcodes. The entry's opcodes are checked to touch nothing on
    the stack below its key string (every pop takes what the entry pushed, every MARK is
    closed), and an entry is only tried just after its key is pushed (labelled 0), so its effect
    does not depend on where it stands.
    """

    __slots__ = (
        "follower",
        "head_mask",
        "head_size",
        "head_slots",
        "head_value",
        "labels",
        "memoize",
        "ops",
        "result",
        "stores",
        "tail_mask",
        "tail_size",
        "tail_slots",
        "tail_value",
        "text",
    )

    def __init__(self, block: bytes, ops: int, labels: tuple[int, ...], result: int) -> None:
        values, masks = [bytearray(), bytearray()], [bytearray(), bytearray()]  # before, after the free string
        puts: list[list[tuple[int, int]]] = [[], []]  # (offset in its segment, opcode)
        segment = self.text = 0
        # Items on the stack from the key string on (the entry starts just after it, always labelled 0);
        # the depth at each open MARK, the key's own depth first: nothing pops below it.
        depth, marks, kinds = 1, [1], set()
        i = 0
        while i < len(block):
            op = block[i]
            width, free = _WIDTH.get(op, 0), 0  # argument bytes; how many of them (the last) are free
            if op in _PUTS:
                kinds.add(op)
                puts[segment].append((len(values[segment]) + 1, op))
                free = width
            elif op in _INT_OPS:
                free = width
            elif op == 0x8A:  # LONG1: 7 bytes at most, so below 2**55
                width = 1 + block[i + 1]
                free = width - 1
                if width > 8:
                    raise ValueError("a large int")
            elif op in (0x58, 0x8C):  # BINUNICODE, SHORT_BINUNICODE
                width = (4 if op == 0x58 else 1) + (_uint4(block, i + 1)[0] if op == 0x58 else block[i + 1])
                if segment == 0:  # the free string: its opcode ends the head, its length is read from the data
                    self.text = 5 if op == 0x58 else 2
                    values[0] += bytes(self.text)
                    values[0][-self.text] = op
                    masks[0] += b"\xff" + bytes(self.text - 1)
                    i += 1 + width
                    depth += 1
                    segment = 1
                    continue
            if op in _PUSH_OPS:
                depth += 1
            elif op in _POP_OPS:
                pops = _POP_OPS[op]
                if depth - marks[-1] < pops:
                    raise ValueError("pops what was on the stack before the entry")
                depth -= pops - 1
            elif op == 0x28:  # MARK
                marks.append(depth)
            elif op == 0x74:  # TUPLE
                if len(marks) == 1:
                    raise ValueError("no MARK of its own")
                depth = marks.pop() + 1
            elif op not in _PUTS:
                raise ValueError(f"opcode {op:#x} is not one of a tensor entry")
            values[segment] += block[i : i + 1 + width - free] + bytes(free)
            masks[segment] += b"\xff" * (1 + width - free) + bytes(free)
            i += 1 + width
        if len(kinds) != 1 or sum(map(len, puts)) != len(labels) or depth != 2 or len(marks) != 1:
            raise ValueError("not one way of numbering stores, or not the key and one item left")
        self.head_size, self.tail_size = len(values[0]), len(values[1])
        self.head_value, self.head_mask = int.from_bytes(values[0], "little"), int.from_bytes(masks[0], "little")
        self.tail_value, self.tail_mask = int.from_bytes(values[1], "little"), int.from_bytes(masks[1], "little")
        self.head_slots, self.tail_slots = self._unpack(puts[0]), self._unpack(puts[1])
        self.memoize = kinds == {0x94}
        self.stores, self.ops, self.labels, self.result = len(labels), ops, labels, result
        self.follower: _Template | None = None  # the template of the entry after the last one this fitted

    def fit(self, data: bytes, start: int, slots: int, stored: int) -> int:
        """Where the entry at ``start`` ends if it is this one, its stores going to the next free slots; else -1.

        ``slots``: the memo's length; ``stored``: how many slots were stored (as in _Walk).
        """
        mid = start + self.head_size
        if mid > len(data) or int.from_bytes(data[start:mid], "little") & self.head_mask != self.head_value:
            return -1
        tail = mid
        if self.text:  # the free string's length, then its bytes, then the tail
            tail += data[mid - 1] if self.text == 2 else _uint4(data, mid - 4)[0]
        stop = tail + self.tail_size
        if stop > len(data) or int.from_bytes(data[tail:stop], "little") & self.tail_mask != self.tail_value:
            return -1
        if self.memoize:  # MEMOIZE stores to slot ``stored``: the next free one when nothing was skipped
            return stop if slots == stored else -1
        if slots > stored + _MEMO_SLACK:
            return -1
        numbers = self.head_slots(data, start) + self.tail_slots(data, tail)
        return stop if numbers == tuple(range(slots, slots + self.stores)) else -1

    @staticmethod
    def _unpack(puts: list[tuple[int, int]]) -> Callable[[bytes, int], tuple[int, ...]]:
        """Reads the slot numbers of ``puts`` from a segment at once (pad bytes skip everything else)."""
        fmt, at = "<", 0
        for offset, op in puts:
            width = _WIDTH[op]
            if width:
                fmt += f"{offset - at}x{'B' if width == 1 else 'I'}"
                at = offset + width
        return struct.Struct(fmt).unpack_from


class _Walk:
    """The simulated stack and memo of one pickle, walked in as many pieces as it was read in."""

    def __init__(self, max_bytes: int, *, fast: bool = True) -> None:
        self.max_bytes = max_bytes
        self.fast = fast  # replay tensor entries seen before (off: every opcode through the loop, for tests)
        self.templates: list[_Template] = []  # oldest first
        self.last: _Template | None = None  # the template of the last entry replayed or learnt
        self.lessons = 0  # entries walked to learn a template from
        self.replayed = 0  # entries replayed from a template
        self.misses = 0  # entries no template matched, once lessons ran out
        self.rewritten = False  # a store went through _memoize (not the next free slot): templates are stale
        self.stack: list[int] = []
        self.marks: list[int] = []  # where the MARKs are in ``stack``, innermost last
        self.memo: list[int] = []  # slot -> label; _UNSET where nothing was stored (a list: 8 bytes a slot)
        self.stored = 0  # slots stored: the C unpickler's memo grows with the largest slot, bounded by this
        self.floodable_keys = 0
        self.opcodes = 0
        self.done = False
        self._reader: tuple[bytes, io.BytesIO] | None = None  # for pickletools' argument readers

    def run(self, data: bytes, pos: int, eof: bool, stop: int | None = None) -> int:
        """Walk ``data`` from ``pos`` until STOP or until more bytes are needed; return where it stopped.

        ``eof``: ``data`` ends where the stream does (nothing more can be read). ``stop``: walk
        no further than this position (an opcode boundary).
        """
        stack, marks, memo, push = self.stack, self.marks, self.memo, self.stack.append
        templates, fast = self.templates, self.fast
        size = len(data)
        safe = size if eof else size - _AHEAD
        if stop is not None and stop < safe:
            safe = stop
        stored = self.stored
        budget = MAX_OPCODES - self.opcodes
        count = 0
        try:
            while pos < safe:
                if count == budget:
                    raise CorruptFileError(f"the pickle has more than {MAX_OPCODES} opcodes: not a weights file")
                count += 1
                op = data[pos]
                # The opcodes of a torch.save state dict, most frequent first; same rules as _step.
                if op == 0x72 or op == 0x71 or op == 0x94:  # LONG_BINPUT, BINPUT, MEMOIZE
                    if op == 0x72:
                        index = _uint4(data, pos + 1)[0]
                        pos += 5
                    elif op == 0x71:
                        index = data[pos + 1]
                        pos += 2
                    else:
                        index = stored
                        pos += 1
                    if index == len(memo) and index <= stored + _MEMO_SLACK and stack and stack[-1] >= 0:
                        memo.append(stack[-1])  # the next slot, as picklers number them
                        stored += 1
                    else:
                        self.stored = stored
                        self._memoize(index)
                        stored = self.stored
                elif op == 0x4B:  # BININT1
                    push(0)
                    pos += 2
                elif op == 0x68 or op == 0x6A:  # BINGET, LONG_BINGET
                    if op == 0x68:
                        index = data[pos + 1]
                        pos += 2
                    else:
                        index = _uint4(data, pos + 1)[0]
                        pos += 5
                    label = memo[index] if index < len(memo) else _UNSET
                    if label == _UNSET:
                        raise _malformed(f"memo slot {index} was never stored")
                    push(label)
                elif op == 0x28:  # MARK
                    marks.append(len(stack))
                    push(_MARK)
                    pos += 1
                elif op == 0x58 or op == 0x8C:  # BINUNICODE, SHORT_BINUNICODE: skipped, never decoded here
                    end = pos + 5 + _uint4(data, pos + 1)[0] if op == 0x58 else pos + 2 + data[pos + 1]
                    if end > size:
                        if end > self.max_bytes:
                            raise CorruptFileError(
                                f"the pickle is larger than {self.max_bytes} bytes: not a weights file"
                            )
                        if not eof:
                            count -= 1
                            break
                        raise _malformed(f"a string at byte {pos} runs past the end")
                    push(0)
                    pos = end
                    if fast and end < size:  # a state-dict key: is a tensor entry seen before next?
                        # Entries come in runs and cycles (a layer's weights): try what followed last time first.
                        n, last, entry = len(memo), self.last, None
                        template = last.follower if last is not None else None
                        after = template.fit(data, end, n, stored) if template is not None else -1
                        if after < 0 and (entry := _ENTRY.match(data, end)) is not None:  # (else no template fits)
                            for template in templates:
                                if (after := template.fit(data, end, n, stored)) >= 0:
                                    break
                        if after >= 0 and template is not None:
                            if template.ops <= budget - count:
                                memo += template.labels
                                push(template.result)
                                stored += template.stores
                                count += template.ops
                                pos = after
                                self.replayed += 1
                                if last is not None:
                                    last.follower = template
                                self.last = template
                        elif entry is None:
                            pass  # not a tensor entry (a string in a list, a key of other data)
                        elif self.lessons < _MAX_LESSONS:
                            self.opcodes += count
                            self.stored, count = stored, 0
                            pos = self._learn(data, end, entry.end(), eof)
                            budget, stored = MAX_OPCODES - self.opcodes, self.stored
                            if self.done:  # a STOP inside what only looked like an entry
                                break
                        elif templates:
                            self.misses += 1
                            if self.misses > self.replayed + _MAX_MISSES:
                                fast = self.fast = False  # these entries are not alike: the loop alone
                elif op == 0x74:  # TUPLE
                    items = self._pop_to_mark()
                    push(_tuple(max(items) >> 1 if items else 0))
                    pos += 1
                elif op == 0x86:  # TUPLE2
                    a, b = stack.pop(), stack.pop()
                    if a < 0 or b < 0:
                        raise _malformed("stack underflow")
                    push(_tuple((a if a > b else b) >> 1))
                    pos += 1
                elif op == 0x52:  # REDUCE: the result of a call, its hash unknown
                    a, b = stack.pop(), stack.pop()
                    if a < 0 or b < 0:
                        raise _malformed("stack underflow")
                    push((a if a > b else b) | 1)
                    pos += 1
                elif op == 0x4D:  # BININT2
                    push(0)
                    pos += 3
                elif op == 0x51:  # BINPERSID
                    a = stack.pop()
                    if a < 0:
                        raise _malformed("stack underflow")
                    push(a & ~1)
                    pos += 1
                elif op == 0x89 or op == 0x88 or op == 0x4E:  # NEWFALSE, NEWTRUE, NONE
                    push(0)
                    pos += 1
                elif op == 0x29:  # EMPTY_TUPLE
                    push(3)  # a tuple one deep, hashable
                    pos += 1
                elif op == 0x85 or op == 0x87:  # TUPLE1, TUPLE3
                    a = stack.pop()
                    if op == 0x87:
                        b, c = stack.pop(), stack.pop()
                        a = max(a, b, c) if a >= 0 and b >= 0 and c >= 0 else _MARK
                    if a < 0:
                        raise _malformed("stack underflow")
                    push(_tuple(a >> 1))
                    pos += 1
                elif op == 0x4A:  # BININT
                    push(0)
                    pos += 5
                elif op == 0x75:  # SETITEMS
                    items = self._pop_to_mark()
                    self._count_keys(sum(k & 1 for k in items[0::2]))
                    target = stack.pop()
                    if target < 0:
                        raise _malformed("stack underflow")
                    push((max(target, max(items)) if items else target) & ~1)
                    pos += 1
                elif op == 0x7D or op == 0x5D:  # EMPTY_DICT, EMPTY_LIST
                    push(0)
                    pos += 1
                elif op == 0x2E:  # STOP
                    if stack.pop() < 0:
                        raise _malformed("stack underflow")
                    self.done = True
                    pos += 1
                    break
                elif op == 0x80:  # PROTO
                    pos += 2
                elif op == 0x95:  # FRAME
                    length = _uint8(data, pos + 1)[0]
                    if length > self.max_bytes:
                        raise CorruptFileError(
                            f"the pickle announces a frame of {length} bytes: too large for a weights file"
                        )
                    pos += 9
                else:
                    self.stored = stored
                    after = self._step(data, pos, eof)
                    stored = self.stored
                    if after == _NEED:
                        count -= 1
                        break
                    pos = after
        except (IndexError, struct.error):
            if pos + _AHEAD > size:
                raise _malformed(f"it ends inside the opcode at byte {pos}") from None
            raise _malformed("stack underflow") from None
        finally:
            self.opcodes += count
            self.stored = stored
        return pos

    def _pop_to_mark(self) -> list[int]:
        if not self.marks:
            raise _malformed("no MARK on the stack")
        at = self.marks.pop()
        items = self.stack[at + 1 :]
        del self.stack[at:]
        return items

    def _pop(self) -> int:
        if not self.stack or self.stack[-1] == _MARK:
            raise _malformed("stack underflow")
        return self.stack.pop()

    def _count_keys(self, floodable: int) -> None:
        self.floodable_keys += floodable
        if self.floodable_keys > MAX_FLOODABLE_KEYS:
            raise _too_many_keys()

    def _learn(self, data: bytes, start: int, stop: int, eof: bool) -> int:
        """Walk the tensor entry ``data[start:stop]`` through the opcode loop and keep what it did as a template."""
        memo, stack = self.memo, self.stack
        slots, depth, opcodes = len(memo), len(stack), self.opcodes
        self.fast, self.rewritten = False, False
        self.lessons += 1
        try:
            pos = self.run(data, start, eof, stop)
        finally:
            self.fast = True
        if pos == stop and not self.done and not self.rewritten and len(stack) == depth + 1:
            try:
                template = _Template(data[start:stop], self.opcodes - opcodes, tuple(memo[slots:]), stack[-1])
            except ValueError:  # not an entry after all, or stores numbered two ways (BINPUT up to 255, then LONG)
                return pos
            if len(self.templates) == _MAX_TEMPLATES:
                del self.templates[0]  # the oldest: BINPUT entries, once past 256 slots
            self.templates.append(template)
            if self.last is not None:
                self.last.follower = template
            self.last = template
        return pos

    def _memoize(self, index: object) -> None:
        self.rewritten = True
        self.templates.clear()  # a template's fetched slots may hold another label now
        self.last = None  # (and no follower leads back to one)
        if not isinstance(index, int) or index > self.stored + _MEMO_SLACK:
            raise CorruptFileError(f"the pickle stores memo slot {index} far out of order: a memory bomb")
        if index < 0:
            raise _malformed(f"negative memo slot {index}")
        if not self.stack or self.stack[-1] == _MARK:
            raise _malformed("nothing to store in the memo")
        if index >= len(self.memo):
            self.memo.extend([_UNSET] * (index + 1 - len(self.memo)))
        if self.memo[index] == _UNSET:
            self.stored += 1
        self.memo[index] = self.stack[-1]

    def _step(self, data: bytes, pos: int, eof: bool) -> int:
        """Any opcode, read by pickletools' own argument reader; its position after, or _NEED."""
        opcode = _BY_CODE.get(data[pos])
        if opcode is None:
            raise _malformed(f"unknown opcode {bytes([data[pos]])!r} at byte {pos}")
        arg: object = None
        after = pos + 1
        if opcode.arg is not None:
            if self._reader is None or self._reader[0] is not data:
                self._reader = (data, io.BytesIO(data))  # shares the bytes, no copy
            reader = self._reader[1]
            reader.seek(after)
            try:
                arg = opcode.arg.reader(reader)
            except UnicodeDecodeError as exc:
                raise _malformed(f"{type(exc).__name__}: {str(exc)[:120]}") from None
            except (ValueError, TypeError, EOFError, OverflowError) as exc:
                if not eof:
                    return _NEED  # the argument may go on past what was read so far
                raise _malformed(f"{type(exc).__name__}: {str(exc)[:120]}") from None
            after = reader.tell()
        self._apply(opcode, arg)
        if opcode.name == "STOP":
            self.done = True
        return after

    def _apply(self, opcode: pickletools.OpcodeInfo, arg: object) -> None:
        name, before = opcode.name, opcode.stack_before
        if name in ("EXT1", "EXT2", "EXT4"):
            raise UnsafeCheckpointError(
                f"refused: the pickle uses extension code {arg} ({name}), which a weights file does not need "
                "and which could resolve to any callable registered in this process"
            )
        if name == "FRAME" and isinstance(arg, int) and arg > self.max_bytes:
            raise CorruptFileError(f"the pickle announces a frame of {arg} bytes: too large for a weights file")
        if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            self._memoize(self.stored if name == "MEMOIZE" else arg)
            return
        if name in ("GET", "BINGET", "LONG_BINGET"):
            if not isinstance(arg, int) or not 0 <= arg < len(self.memo) or self.memo[arg] == _UNSET:
                raise _malformed(f"memo slot {arg} was never stored")
            self.stack.append(self.memo[arg])
            return
        if name == "POP" and self.stack and self.stack[-1] == _MARK:
            self.stack.pop()  # as the C unpickler does: POP on a MARK drops the MARK
            self.marks.pop()
            return

        # Take what the opcode consumes, as pickletools describes it.
        if pickletools.markobject in before:
            sliced = self._pop_to_mark()
            consumed = [self._pop() for _ in range(before.index(pickletools.markobject))] + sliced
            if name in ("SETITEMS", "DICT"):
                self._count_keys(sum(k & 1 for k in sliced[0::2]))
            elif name in ("ADDITEMS", "FROZENSET"):
                self._count_keys(sum(k & 1 for k in sliced))
        else:
            consumed = [self._pop() for _ in before]  # in pop order: the top of the stack first
            if name == "SETITEM":
                self._count_keys(consumed[1] & 1)  # value, key, dict

        # Push a label for what it produces.
        if not opcode.stack_after or name == "READONLY_BUFFER":
            if name == "READONLY_BUFFER":
                self.stack.append(consumed[0])
            return
        depth = max(consumed, default=0) >> 1
        if name == "MARK":
            self.marks.append(len(self.stack))
            self.stack.append(_MARK)
        elif name == "DUP":
            self.stack.extend([consumed[0], consumed[0]])
        elif name == "BUILD":
            self.stack.append(depth * 2 + (consumed[1] & 1))  # the object, with its new state
        elif name in _TUPLES:
            self.stack.append(_tuple(depth))
        elif name in _INTS:
            self.stack.append(0 if _small_int(arg) else 1)
        else:  # scalars, containers, and the results of calls (unknown, so floodable)
            self.stack.append(depth * 2 + (name not in _SAFE))


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
    start = stream.tell()
    walk = _Walk(max_bytes, fast=_REPLAY)
    if isinstance(stream, io.BytesIO):  # in memory (a zip member, already size-checked)
        data, eof = stream.getbuffer()[start:].tobytes(), True
    else:  # a file (the legacy format): read in growing blocks, at most max_bytes
        data = stream.read(min(_READ, max_bytes))
        eof = len(data) < min(_READ, max_bytes)
    pos = 0
    try:
        while True:
            pos = walk.run(data, pos, eof)
            if walk.done:
                break
            if eof:
                if len(data) >= max_bytes:
                    raise CorruptFileError(f"the pickle is larger than {max_bytes} bytes: not a weights file")
                raise _malformed("the stream ends before its STOP opcode")
            want = min(len(data), max_bytes - len(data))
            more = stream.read(want)
            data += more
            eof = len(more) < want or len(data) >= max_bytes
    except MemoryError:
        raise CorruptFileError("the pickle needs more memory than a weights file can") from None
    finally:
        stream.seek(start + pos)
    _FLOODABLE_BUDGET.set([MAX_FLOODABLE_KEYS - walk.floodable_keys])
    return data[:pos]


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
