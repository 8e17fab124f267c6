"""The pickle ``torch.save`` writes for a flat state dict, read without the general machinery.

A sharded checkpoint of a mixture-of-experts model (what ``save_pretrained`` writes as
``pytorch_model-0000N-of-0000M.bin``) is one dict of tens of thousands of tensors, and
its pickle repeats one template per tensor: about 32 opcodes that build the storage's
persistent id, the shape and stride tuples and a ``_rebuild_tensor_v2`` call. The general
path walks every opcode twice (:mod:`.pickle_guard`, then the C unpickler with our
callbacks, keeping every intermediate object in its memo until the end): at 46,848 tensors,
0.2–0.6 s more CPU and about half a KiB more memory a tensor than reading it here.

Here one compiled regular expression matches a whole tensor entry in C, and the tensor is
built from its groups by the same builders the unpickler calls (``on_storage`` and
``_tensor``), in the same order. Only a pickle that is *entirely* this template (protocol
2, a dict or an ``OrderedDict`` of names to plain tensors, then at most the ``_metadata``
of ``model.state_dict()``) is read here; anything else, including anything this reader does not expect or any error
a builder raises, makes it answer ``None`` and the general path reads the file, with all
its checks, as if this module did not exist. Hand-written because no library parses a
pickle without running it; the tests hold both paths to the same trees.

:func:`read_flat_columns` reads the same template into columns (names in one buffer, dtypes,
shapes, storage numbers) when every tensor is a whole storage of its own: a tight loop over
one regular expression an entry, no object per tensor (see :mod:`.flat_file`), and the pickle
read a block at a time.

What the template admits is safe by construction: its only globals are the tensor
machinery (``_rebuild_tensor_v2``, storage classes, ``OrderedDict``) and they are called
only in the template's positions; its memo slots are numbered in order (no memo bomb);
tuples nest one deep; dict keys are strings (no hash flooding).
"""

from __future__ import annotations

import re
import sys
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple, TypeVar

from ..dtypes import BYTE, DType
from ..errors import TiesafeError
from ..geometry import contiguous_strides
from .name_column import NameColumn, distinct_hashes
from .unpickler import (
    _ALLOWED,
    GROUPS,
    StorageNode,
    StorageType,
    TensorNode,
    UnpickleContext,
    _tensor,
    distinct_numbers,
    is_storage_number,
    storage_fields,
)

# Pieces of the template. A memo slot is written after each new object (BINPUT q / LONG_BINPUT r)
# and read back for a repeated one (BINGET h / LONG_BINGET j); ints are BININT1/2/4 or LONG1.
_ANY_INT = rb"(?:K.|M..|J....|\x8a[\x01-\x08].{1,8}?)"
_TUPLE = rb"\)|" + _ANY_INT + rb"\x85|" + _ANY_INT * 2 + rb"\x86|" + _ANY_INT * 3 + rb"\x87|\((?:" + _ANY_INT + rb")*t"


def _put(name: str) -> bytes:
    return f"(?P<{name}_put>q.|r....)".encode()


def _get(name: str) -> bytes:
    return f"(?P<{name}_get>h.|j....)".encode()


def _new_or_got(name: str, new: bytes) -> bytes:
    """A new object (``new``, then a memo write) or one read back from the memo."""
    return b"(?:" + new + _put(name) + b"|" + _get(name) + b")"


_ENTRY = re.compile(
    b"".join(
        [
            _new_or_got("rebuild", rb"ctorch\._utils\n_rebuild_tensor_v2\n"),
            rb"\(\(",  # MARK (its arguments), MARK (the persistent id)
            _new_or_got("tag", rb"X\x07\x00\x00\x00storage"),
            _new_or_got("type", rb"ctorch\n(?P<type_name>[A-Za-z0-9]{1,40})\n"),  # the storage class
            _new_or_got("key", rb"X(?P<key_size>[\x01-\x14])\x00\x00\x00(?P<key_text>[0-9]{1,20})"),
            _new_or_got("location", rb"X(?P<location_size>[\x01-\x20])\x00\x00\x00(?P<location_text>[a-z0-9:_]{1,32})"),
            rb"(?P<numel>" + _ANY_INT + rb")",  # the storage's element count
            rb"t" + _put("pid") + rb"Q",  # TUPLE, BINPERSID
            rb"(?P<offset>" + _ANY_INT + rb")",
            rb"(?P<shape>" + _TUPLE + rb")(?:" + _put("shape") + rb")?",  # an empty tuple is not memoized
            rb"(?P<stride>" + _TUPLE + rb")(?:" + _put("stride") + rb")?",
            rb"[\x88\x89]",  # requires_grad
            _new_or_got("hooks_type", rb"ccollections\nOrderedDict\n"),
            rb"\)R" + _put("hooks"),  # backward hooks: OrderedDict()
            rb"t" + _put("args") + rb"R" + _put("tensor"),  # the arguments' TUPLE, REDUCE
        ]
    ),
    re.DOTALL,
)
_GROUP = {name: index - 1 for name, index in _ENTRY.groupindex.items()}  # positions in match.groups()

# The same entry once every global and the location were seen: what all entries but the first
# few look like, matched with one group a token and read with dict look-ups (below).
_READ_BACK = rb"(h.|j....)"
_WRITE = rb"(q.|r....)"
_STEADY = re.compile(
    b"".join(
        [
            _READ_BACK + rb"\(\(",  # the function, MARK, MARK
            _READ_BACK + _READ_BACK,  # "storage", the storage class
            rb"X([\x01-\x14])\x00\x00\x00([0-9]{1,20})" + _WRITE,  # a new storage key
            _READ_BACK,  # its location
            rb"(" + _ANY_INT + rb")t" + _WRITE + rb"Q",  # element count, TUPLE, BINPERSID
            rb"(" + _ANY_INT + rb")",  # storage offset
            rb"(" + _TUPLE + rb")" + _WRITE + rb"?",  # shape
            rb"(" + _TUPLE + rb")" + _WRITE + rb"?",  # stride
            rb"[\x88\x89]" + _READ_BACK + rb"\)R" + _WRITE,  # requires_grad, OrderedDict()
            rb"t" + _WRITE + rb"R" + _WRITE,  # the arguments' TUPLE, REDUCE
        ]
    ),
    re.DOTALL,
)
# One whole entry once the globals and the location are known, for :func:`read_flat_columns`:
# a new name (its memo write first: the BINUNICODE is read by hand, it has a length prefix),
# then the tensor of a storage of its own, offset 0. One group a token; the optional memo
# writes of the shape and stride match an empty string rather than nothing, so that an
# entry's memo writes join into one byte string.
_ROW = re.compile(
    b"".join(
        [
            _WRITE,  # 0: the name's memo write
            _READ_BACK + rb"\(\(",  # 1: the function, MARK, MARK
            _READ_BACK + _READ_BACK,  # 2, 3: "storage", the storage class
            rb"X([\x01-\x14])\x00\x00\x00([0-9]{1,20})" + _WRITE,  # 4, 5, 6: a new storage key
            _READ_BACK,  # 7: its location
            rb"(" + _ANY_INT + rb")t" + _WRITE + rb"Q",  # 8, 9: element count, TUPLE, BINPERSID
            rb"K\x00",  # storage offset 0
            rb"(" + _TUPLE + rb")((?:q.|r....)?)",  # 10, 11: shape
            rb"(" + _TUPLE + rb")((?:q.|r....)?)",  # 12, 13: stride
            rb"[\x88\x89]" + _READ_BACK + rb"\)R" + _WRITE,  # 14, 15: requires_grad, OrderedDict()
            rb"t" + _WRITE + rb"R" + _WRITE,  # 16, 17: the arguments' TUPLE, REDUCE
        ]
    ),
    re.DOTALL,
)
_NAME_START = (0x58, 0x68, 0x6A)  # BINUNICODE, or a memo read (BINGET, LONG_BINGET) of a string
_METADATA = b"X\t\x00\x00\x00_metadata"
# One module's entry of _metadata: {"version": N}, the key new or read back.
_VERSION = re.compile(rb"\}(q.|r....)(?:X\x07\x00\x00\x00(version)(q.|r....)|(h.|j....))(K.|M..|J....)s", re.DOTALL)
_CACHED = 4096  # distinct int and tuple tokens kept decoded (shapes repeat across experts)
_ONE_INT = re.compile(_ANY_INT, re.DOTALL)
_OPEN_DICT = b"\x80\x02}"
_OPEN_ORDERED = b"\x80\x02ccollections\nOrderedDict\n"


class _Marker:
    """What a memo slot holds that a later entry may read back (never equal to a string)."""


_REBUILD, _STORAGE_TAG, _ORDERED_DICT, _ABSENT = _Marker(), _Marker(), _Marker(), _Marker()


class _ReadBack(dict[bytes, object]):
    """Memo reads by their token: the same few (``h\x02``, ``h\x04``) in every entry, so each is
    decoded once. Slots are written once each (in order), so a decoded read never goes stale."""

    def __init__(self, memo: dict[int, object]) -> None:
        super().__init__()
        self.memo = memo

    def __missing__(self, token: bytes) -> object:
        value = self.memo.get(_token_slot(token), _ABSENT)
        if value is not _ABSENT:
            self[token] = value
        return value


class _NotTemplate(Exception):
    """The pickle is not the template: the general path reads it."""


def _int(token: bytes) -> int:
    op = token[0]
    if op == 0x4B:  # BININT1
        return token[1]
    if op == 0x4D:  # BININT2
        return int.from_bytes(token[1:3], "little")
    if op == 0x4A:  # BININT, signed
        return int.from_bytes(token[1:5], "little", signed=True)
    if token[1] != len(token) - 2:  # LONG1: its length byte, then that many bytes
        raise _NotTemplate
    return int.from_bytes(token[2:], "little", signed=True)


def _ints(token: bytes) -> tuple[int, ...]:
    if token == b")":
        return ()
    body = token[1:-1] if token[0] == 0x28 else token[:-1]  # MARK ... TUPLE, or ints then TUPLEn
    values, pos = [], 0
    while pos < len(body):
        match = _ONE_INT.match(body, pos)
        if match is None:
            raise _NotTemplate
        values.append(_int(match.group()))
        pos = match.end()
    if token[0] != 0x28 and len(values) != token[-1] - 0x84:  # TUPLE1/2/3 take 1/2/3 items
        raise _NotTemplate
    return tuple(values)


def _token_slot(token: bytes) -> int:
    """The memo slot of a memo write or read: ``q``/``h`` and one byte, or ``r``/``j`` and four."""
    return token[1] if len(token) == 2 else int.from_bytes(token[1:], "little")


def _token_at(data: bytes, pos: int, short: int, long: int) -> bytes:
    """The memo token at ``pos``: opcode ``short`` and one byte, or ``long`` and four."""
    size = 2 if data[pos] == short else 5 if data[pos] == long else 0
    token = data[pos : pos + size]
    if not size or len(token) != size:
        raise _NotTemplate
    return token


_T = TypeVar("_T")


def _decoded(cache: dict[bytes, _T], token: bytes, decode: Callable[[bytes], _T]) -> _T:
    """``decode(token)``, kept for the next equal token while the cache holds fewer than _CACHED."""
    value = cache.get(token)
    if value is None:
        value = decode(token)
        if len(cache) < _CACHED:
            cache[token] = value
    return value


class _Reader:
    def __init__(
        self, data: bytes | Iterable[bytes], context: UnpickleContext, on_storage: Callable[..., StorageNode]
    ) -> None:
        # The pickle whole, or in blocks: then ``data`` is a window of it from ``base`` on, moved
        # on (:meth:`ahead`) between entries, so that at least _MARGIN bytes lie ahead of each.
        self.data, self.base = b"", 0
        self.rest: Iterator[bytes] | None = None
        if isinstance(data, bytes):
            self.data = data
        else:
            self.rest = iter(data)
            self.ahead(0)
        self.context = context
        self.on_storage = on_storage
        self.slots = 0  # memo slots written so far: every write must be the next one
        self.memo: dict[int, object] = {}  # slot -> what a later entry may read back from it
        self.back = _ReadBack(self.memo)  # a memo read's token (b"h\x02") -> what it reads
        self.numbers: dict[bytes, int] = {}
        self.tuples: dict[bytes, tuple[int, ...]] = {}

    def ahead(self, pos: int) -> int:
        """``pos`` in the window once _MARGIN bytes lie ahead of it, or the rest of the pickle."""
        if self.rest is None or len(self.data) - pos >= _MARGIN:
            return pos
        parts, have = [self.data[pos:]], len(self.data) - pos
        while have < _MARGIN:
            block = next(self.rest, None)
            if block is None:
                self.rest = None
                break
            parts.append(block)
            have += len(block)
        self.data = b"".join(parts)
        self.base += pos
        return 0

    def put(self, slot: int, value: object = None) -> None:
        if slot != self.slots:
            raise _NotTemplate
        self.slots += 1
        if value is not None:
            self.memo[slot] = value

    def put_at(self, pos: int, value: object = None) -> int:
        """The memo write at ``pos`` (BINPUT, LONG_BINPUT); where it ends."""
        token = _token_at(self.data, pos, 0x71, 0x72)
        self.put(_token_slot(token), value)
        return pos + len(token)

    def read_at(self, pos: int) -> tuple[object, int]:
        """What the memo read at ``pos`` (BINGET, LONG_BINGET) returns (``_ABSENT`` if nothing), and where it ends."""
        token = _token_at(self.data, pos, 0x68, 0x6A)
        return self.back[token], pos + len(token)

    def got(self, groups: tuple[Any, ...], name: str) -> object:
        """What the entry's memo read ``name`` returns (``_ABSENT`` if nothing)."""
        return self.back[groups[_GROUP[f"{name}_get"]]]

    def new(self, groups: tuple[Any, ...], name: str, value: object = None) -> bool:
        """Record the entry's memo write ``name`` if it has one; whether it has."""
        token = groups[_GROUP[f"{name}_put"]]
        if token is None:
            return False
        self.put(_token_slot(token), value)
        return True

    def machinery(self, module: str, name: str) -> None:
        """Record a global of the tensor machinery, as ``find_class`` does for the inspect report."""
        self.context.globals_seen.setdefault(f"{module}.{name}", GROUPS[0])

    def read(self) -> dict[str, TensorNode]:
        root, pos = self.open()
        pos = self.items(pos, lambda at: self.entry(at, root))
        self.close(pos, isinstance(root, OrderedDict))
        return root

    def open(self) -> tuple[dict[str, TensorNode], int]:
        """The root dict (plain or ``OrderedDict``) and where its items start."""
        data = self.data
        if data.startswith(_OPEN_DICT):
            return {}, self.put_at(len(_OPEN_DICT))
        if data.startswith(_OPEN_ORDERED):
            self.machinery("collections", "OrderedDict")
            pos = self.put_at(len(_OPEN_ORDERED), _ORDERED_DICT)
            if data[pos : pos + 2] != b")R":
                raise _NotTemplate
            return OrderedDict(), self.put_at(pos + 2)
        raise _NotTemplate

    def close(self, pos: int, ordered: bool) -> None:
        """After the items: ``model.state_dict()``'s ``_metadata`` (an ``OrderedDict`` only), then STOP."""
        pos = self.ahead(pos)
        if ordered and self.data[pos] == 0x7D:  # EMPTY_DICT: the state BUILD sets
            pos = self.ahead(self.metadata(pos))
        data = self.data
        if self.rest is not None or pos != len(data) - 1 or data[pos] != 0x2E:  # STOP, and nothing after it
            raise _NotTemplate

    def items(self, pos: int, entry: Callable[[int], int]) -> int:
        """A dict's items as the pickler batches them: MARK ... SETITEMS, or one item and SETITEM."""
        while True:  # (the window may move on before each entry and in one: ``data`` is read again after)
            pos = self.ahead(pos)
            data = self.data
            if data[pos] == 0x28:  # MARK: a batch of up to 1,000 items, closed by SETITEMS
                pos += 1
                while True:
                    pos = self.ahead(pos)
                    if self.data[pos] not in _NAME_START:
                        break
                    pos = entry(pos)
                if self.data[pos] != 0x75:
                    raise _NotTemplate
                pos += 1
            elif data[pos] in _NAME_START:  # one item alone, closed by SETITEM
                pos = entry(pos)
                if self.data[pos] != 0x73:
                    raise _NotTemplate
                pos += 1
            else:
                return pos

    def metadata(self, pos: int) -> int:
        """``model.state_dict()``'s ``_metadata`` (each module's version), set by BUILD: checked, dropped.

        ``{"_metadata": OrderedDict(prefix -> {"version": int})}``: nothing reads it, but it is
        read to the end so that the whole pickle is the template.
        """
        data = self.data
        pos = self.put_at(pos + 1)  # the state dict
        if data[pos : pos + len(_METADATA)] != _METADATA:
            raise _NotTemplate
        ordered_dict, pos = self.read_at(self.put_at(pos + len(_METADATA)))
        if ordered_dict is not _ORDERED_DICT or data[pos : pos + 2] != b")R":
            raise _NotTemplate
        pos = self.put_at(pos + 2)
        pos = self.ahead(self.items(pos, self.module_version))
        if self.data[pos : pos + 2] != b"sb":  # SETITEM into the state, BUILD
            raise _NotTemplate
        return pos + 2

    def module_version(self, pos: int) -> int:
        pos = self.name(pos)[1]
        match = _VERSION.match(self.data, pos)
        if match is None:
            raise _NotTemplate
        dict_slot, new_key, key_slot, known_key, _ = match.groups()
        self.put(_token_slot(dict_slot))
        if new_key is not None:
            self.put(_token_slot(key_slot), new_key.decode("ascii"))
        elif type(self.back[known_key]) is not str:
            raise _NotTemplate
        return match.end()

    def name(self, pos: int) -> tuple[str, int]:
        """A dict key: a new string (BINUNICODE, then its memo write) or one read back; and where it ends."""
        data = self.data
        if data[pos] == 0x58:
            size = int.from_bytes(data[pos + 1 : pos + 5], "little")
            start = pos + 5
            if start + size > len(data):
                raise _NotTemplate
            name = data[start : start + size].decode("utf-8", "surrogatepass")  # as BINUNICODE decodes
            return name, self.put_at(start + size, name)
        known, pos = self.read_at(pos)  # a string seen before: a storage key "0", the location "cpu"
        if type(known) is not str:
            raise _NotTemplate
        return known, pos

    def template_reads(
        self, rebuild: bytes, tag: bytes, kind: bytes, location: bytes, hooks_type: bytes
    ) -> tuple[StorageType, str] | None:
        """The storage class and location an entry's memo reads give, if each reads what the
        template needs there (the function, "storage", a storage class, a string, OrderedDict)."""
        back = self.back
        storage_type, where = back[kind], back[location]
        if (
            back[rebuild] is not _REBUILD
            or back[tag] is not _STORAGE_TAG
            or back[hooks_type] is not _ORDERED_DICT
            or not isinstance(storage_type, StorageType)
            or type(where) is not str
        ):
            return None
        return storage_type, where

    def steady(self, match: re.Match[bytes], root: dict[str, TensorNode], name: str) -> bool:
        """An entry of the steady template; False when what it reads back is not what it needs."""
        (rebuild, tag, kind, key_size, key_text, key_slot, where, numel, pid, offset, shape, shape_slot, stride,
         stride_slot, hooks_type, hooks, args, tensor) = match.groups()  # fmt: skip
        reads = self.template_reads(rebuild, tag, kind, where, hooks_type)
        if reads is None or key_size[0] != len(key_text):
            return False
        storage_type, location = reads
        shape_value, stride_value = self.ints(shape), self.ints(stride)
        if (shape_slot is None) == bool(shape_value) or (stride_slot is None) == bool(stride_value):
            raise _NotTemplate  # a non-empty tuple is memoized, the empty one not
        first = slot = self.slots
        for token in (key_slot, pid, shape_slot, stride_slot, hooks, args, tensor):  # each the next slot
            if token is not None:
                if _token_slot(token) != slot:
                    raise _NotTemplate
                slot += 1
        self.slots = slot
        key = key_text.decode("ascii")
        self.memo[first] = key
        storage = self.on_storage((storage_type, key, location, self.number(numel)))
        node = _tensor(storage, self.number(offset), shape_value, stride_value)
        self.memo[slot - 1] = node
        root[name] = node
        return True

    def number(self, token: bytes) -> int:
        return _decoded(self.numbers, token, _int)

    def ints(self, token: bytes) -> tuple[int, ...]:
        return _decoded(self.tuples, token, _ints)  # one tuple object for every tensor of that shape

    def entry(self, pos: int, root: dict[str, TensorNode]) -> int:
        data = self.data
        name, pos = self.name(pos)
        match = _STEADY.match(data, pos)
        if match is not None and self.steady(match, root, name):  # steady changes nothing when it says no
            return match.end()
        match = _ENTRY.match(data, pos)
        if match is None:
            return self.repeated(pos, root, name)
        g = match.groups()
        if self.new(g, "rebuild", _REBUILD):
            self.machinery("torch._utils", "_rebuild_tensor_v2")
        elif self.got(g, "rebuild") is not _REBUILD:
            raise _NotTemplate
        if not self.new(g, "tag", _STORAGE_TAG) and self.got(g, "tag") is not _STORAGE_TAG:
            raise _NotTemplate
        type_name = g[_GROUP["type_name"]]
        if type_name is not None:
            storage_type = _ALLOWED.get(("torch", type_name.decode("ascii")))
            if not isinstance(storage_type, StorageType):
                raise _NotTemplate
            self.machinery("torch", type_name.decode("ascii"))  # what find_class records
            self.new(g, "type", storage_type)
        else:
            storage_type = self.got(g, "type")
            if not isinstance(storage_type, StorageType):
                raise _NotTemplate
        key = self.text(g, "key")
        location = self.text(g, "location")
        numel = _int(g[_GROUP["numel"]])
        self.new(g, "pid")
        storage = self.on_storage((storage_type, key, location, numel))
        offset = _int(g[_GROUP["offset"]])
        shape = _ints(g[_GROUP["shape"]])
        if self.new(g, "shape") != bool(shape):  # a non-empty tuple is memoized, the empty one not
            raise _NotTemplate
        stride = _ints(g[_GROUP["stride"]])
        if self.new(g, "stride") != bool(stride):
            raise _NotTemplate
        if self.new(g, "hooks_type", _ORDERED_DICT):
            self.machinery("collections", "OrderedDict")
        elif self.got(g, "hooks_type") is not _ORDERED_DICT:
            raise _NotTemplate
        self.new(g, "hooks")
        self.new(g, "args")
        node = _tensor(storage, offset, shape, stride)
        self.new(g, "tensor", node)
        root[name] = node
        return match.end()

    def repeated(self, pos: int, root: dict[str, TensorNode], name: str) -> int:
        """The same tensor object under a second name: a memo read of the first one."""
        node, after = self.read_at(pos)
        if not isinstance(node, TensorNode):
            raise _NotTemplate
        root[name] = node
        return after

    def text(self, groups: tuple[Any, ...], name: str) -> str:
        """A short ASCII string (a storage key, a location), new or read back."""
        size, text = groups[_GROUP[f"{name}_size"]], groups[_GROUP[f"{name}_text"]]
        if text is None:
            known = self.got(groups, name)
            if not isinstance(known, str):
                raise _NotTemplate
            return known
        if size[0] != len(text):
            raise _NotTemplate
        value: str = text.decode("ascii")
        self.new(groups, name, value)
        return value


def read_flat_state_dict(
    data: bytes, context: UnpickleContext, on_storage: Callable[[tuple[object, ...]], StorageNode]
) -> dict[str, TensorNode] | None:
    """The state dict of a pickle that is exactly torch.save's flat template, else ``None``.

    ``None`` also when a builder raises: the general path then reads the file and reports
    its own verdict, so this reader never decides an error. The builders' side effects
    (storages recorded by ``on_storage``) are those the general path makes first anyway.

    Example:
        >>> read_flat_state_dict(b"\\x80\\x02}q\\x00.", UnpickleContext(), on_storage)  # doctest: +SKIP
        {}
    """
    try:
        return _Reader(data, context, on_storage).read()
    except (_NotTemplate, TiesafeError, IndexError, UnicodeDecodeError, ValueError):
        return None


class FlatColumns(NamedTuple):
    """A flat state dict whose every tensor is a whole storage of its own, as columns.

    Row ``i`` is the tensor ``names[i]``: all of storage ``keys[i]``, contiguous, of
    ``dtypes[i]`` and ``shapes[i]``, ``nbytes[i]`` bytes. No object per tensor beyond its name
    (shapes are shared between tensors of one shape): what a mixture-of-experts file of
    100,000 experts' matrices is, read at a few microseconds a tensor.
    """

    names: NameColumn
    keys: array[int]  # each storage's number (torch names them 0, 1, ...)
    dtypes: list[DType]
    shapes: list[tuple[int, ...]]
    nbytes: list[int]
    locations: list[str]  # the device each storage was saved from ("cpu"): recorded, never needed
    name_hashes: array[int]  # each name's hash: for names_distinct

    def names_distinct(self) -> bool:
        """Whether no name repeats (a name set twice): sorted hashes, then any two alike compared
        exactly. Left to the caller, to run once it has released what it held for the reading
        (the sort takes 4 MB at 100,000 names; a set of the names would take 14).

        Example:
            >>> read_flat_columns(pickle_bytes, UnpickleContext()).names_distinct()  # doctest: +SKIP
            True
        """
        return distinct_hashes(self.names, self.name_hashes)


def _memo_writes(first: int, stop: int) -> bytes:
    """The memo writes of slots ``first .. stop-1`` back to back, as the pickler writes them:
    BINPUT and one byte below 256, LONG_BINPUT and four bytes from there on."""
    short = bytes(b for slot in range(first, min(stop, 256)) for b in (0x71, slot))
    first = max(first, 256)
    if stop <= first:
        return short
    long = bytearray(5 * (stop - first))
    numbers = array("I", range(first, stop))
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        numbers.byteswap()
    raw = numbers.tobytes()
    long[0::5] = b"r" * (stop - first)
    for i in range(4):
        long[1 + i :: 5] = raw[i::4]
    return short + bytes(long)


def _memo_write_position(slot: int) -> int:
    """Where slot ``slot``'s write starts in the memo writes from slot 0 on (:func:`_memo_writes`)."""
    return 2 * slot if slot <= 256 else 5 * slot - 768


_MARGIN = 1 << 18  # bytes of pickle held ahead of each entry read from blocks: an entry is far shorter
_NAMES_AT_ONCE = 4096  # names read before they join the column
_WRITES_AHEAD = 1 << 14  # memo slots whose writes are made at a time (80 KiB): not all 800,000 at once


class _Columns(_Reader):
    """The template read into :class:`FlatColumns`: runs of :data:`_ROW` entries in a tight
    loop, any other entry by :meth:`_Reader.entry` (the first of each storage class, say).

    The loop checks per entry what the reader checks: every memo write takes the next slot
    (the entry's writes, joined, equal the expected run of :func:`_memo_writes`), and every
    memo read returns what the template needs there (checked once for each distinct tuple
    of read tokens: slots are written once, so a token read means the same thing from then
    on). Slots written by the loop keep no value: a later read of one (a name that repeats
    a storage key, a tensor under two names) finds nothing and ends this reading.
    """

    def __init__(self, data: bytes | Iterable[bytes], context: UnpickleContext) -> None:
        self.records: dict[str, tuple[DType, int, str]] = {}  # storage key -> dtype, element count, location
        super().__init__(data, context, self.storage)
        self.columns = FlatColumns(NameColumn(), array("q"), [], [], [], [], array("q"))
        self.writes = b""  # the memo writes expected from slot ``written_from`` on, made a window at a time
        self.written_from = 0
        # memo reads -> dtype (None: not the template), location
        self.readbacks: dict[tuple[bytes, ...], tuple[DType | None, str]] = {}
        self.geometry: dict[tuple[bytes, bytes], tuple[tuple[int, ...], int] | None] = {}  # shape, stride tokens

    def storage(self, data: tuple[object, ...]) -> StorageNode:
        storage_type, key, location, count = storage_fields(data)
        if storage_type.dtype is None or key in self.records:
            raise _NotTemplate  # not a storage tiesafe writes, or one shared: the general path says
        self.records[key] = (storage_type.dtype, count, location)
        return StorageNode(key, storage_type.dtype, 0, None)

    def read_columns(self) -> FlatColumns:
        root, pos = self.open()
        pos = self.items(pos, self.rows)
        self.close(pos, isinstance(root, OrderedDict))
        columns = self.columns
        if not columns.names:
            raise _NotTemplate  # no tensor: nothing to read as columns
        if not distinct_numbers(columns.keys):
            raise _NotTemplate  # a storage under two names (names set twice: names_distinct, the caller's)
        return columns

    def rows(self, pos: int) -> int:
        """Entries from ``pos``: a run of :data:`_ROW` ones, or else one by the reader."""
        start = self.base + pos
        end = self.run(pos)
        if self.base + end != start:  # (the run may have moved the window on)
            return end
        scratch: dict[str, TensorNode] = {}
        end = self.entry(pos, scratch)
        ((name, node),) = scratch.items()
        ref = node.ref
        if ref is None or ref.offset or not ref.is_contiguous or ref.storage not in self.records:
            raise _NotTemplate
        dtype, count, location = self.records[ref.storage]
        if ref.numel != count or ref.stride != contiguous_strides(ref.shape) or ref.dtype is not dtype:
            raise _NotTemplate
        columns = self.columns
        columns.names.append(name)
        columns.name_hashes.append(hash(name.encode("utf-8", "surrogatepass")))
        if not is_storage_number(ref.storage):
            raise _NotTemplate  # torch numbers its storages 0, 1, ...: any other key, the general path reads
        columns.keys.append(int(ref.storage))
        columns.dtypes.append(dtype)
        columns.shapes.append(ref.shape)
        columns.nbytes.append(ref.nbytes)
        columns.locations.append(location)
        return end

    def run(self, pos: int) -> int:
        """Read :data:`_ROW` entries from ``pos`` while they come; where the run ends."""
        data, match = self.data, _ROW.match
        readbacks, geometry, numbers = self.readbacks, self.geometry, self.numbers
        names, keys, dtypes, shapes, sizes, locations, hashes = self.columns
        add_hash = hashes.append
        pending: list[bytes] = []  # names read, added to the column a chunk at a time (in C)
        slot, writes, written_from = self.slots, self.writes, self.written_from
        byte_counts: dict[int, int] = {}  # experts repeat a few sizes: one int object each
        limit = len(data) - _MARGIN if self.rest is not None else len(data)  # past it, the window moves on
        while True:
            if pos > limit:
                pos = self.ahead(pos)
                data = self.data
                limit = len(data) - _MARGIN if self.rest is not None else len(data)
            if data[pos] != 0x58:  # BINUNICODE: a new name
                break
            at = (2 * slot if slot <= 256 else 5 * slot - 768) - written_from  # the slot's write in ``writes``
            if at + 40 > len(writes):  # an entry writes at most 8 slots of 5 bytes
                writes = self.writes = _memo_writes(slot, slot + _WRITES_AHEAD)
                written_from = self.written_from = _memo_write_position(slot)
                at = 0
            start = pos + 5
            end = start + int.from_bytes(data[pos + 1 : start], "little")
            found = match(data, end)
            if found is None:
                break
            (name_write, rebuild, tag, kind, key_size, key, key_write, location, count, pid, shape, shape_write,
             stride, stride_write, hooks_type, hooks, args, tensor) = found.groups()  # fmt: skip
            reads = (rebuild, tag, kind, location, hooks_type)
            try:
                dtype, where = readbacks[reads]
            except KeyError:
                dtype, where = readbacks[reads] = self.readback(*reads)
            took = b"".join((name_write, key_write, pid, shape_write, stride_write, hooks, args, tensor))
            try:
                layout = geometry[shape, stride]
            except KeyError:
                layout = geometry[shape, stride] = self.layout(shape, stride)
            if (
                dtype is None
                or layout is None
                or not writes.startswith(took, at)
                or key_size[0] != len(key)
                or (key[0] == 0x30 and len(key) > 1)  # a leading zero: not a number torch names a storage
                or len(key) > 18
                or layout[1] != (numbers.get(count) or self.number(count))
                or (shape_write == b"") == bool(layout[0])  # a non-empty tuple is memoized, the empty one not
                or (stride_write == b"") == bool(layout[0])
            ):
                break
            name = data[start:end]
            name.decode("utf-8", "surrogatepass")  # as BINUNICODE decodes it (checked: kept as bytes)
            pending.append(name)
            if len(pending) == _NAMES_AT_ONCE:
                names.extend_encoded(pending)
                pending.clear()
            add_hash(hash(name))
            keys.append(int(key))
            dtypes.append(dtype)
            shapes.append(layout[0])
            size = layout[1] * dtype.itemsize
            sizes.append(byte_counts.setdefault(size, size))
            locations.append(where)
            slot += 6 + (shape_write != b"") + (stride_write != b"")
            pos = found.end()
        names.extend_encoded(pending)
        self.slots = slot
        return pos

    def readback(
        self, rebuild: bytes, tag: bytes, kind: bytes, location: bytes, hooks_type: bytes
    ) -> tuple[DType | None, str]:
        """The dtype of a :data:`_ROW` entry's storage class (None if its memo reads are not the
        template's) and its location."""
        reads = self.template_reads(rebuild, tag, kind, location, hooks_type)
        return (None, "") if reads is None else (reads[0].dtype, reads[1])

    def layout(self, shape_token: bytes, stride_token: bytes) -> tuple[tuple[int, ...], int] | None:
        """A dense shape and its element count; None for any other geometry (the reader's then)."""
        try:
            shape, stride = _ints(shape_token), _ints(stride_token)
            node = _tensor(StorageNode("", BYTE, 0, None), 0, shape, stride)  # its checks of sizes
        except (_NotTemplate, TiesafeError):
            return None
        if node.ref is None or stride != contiguous_strides(shape):
            return None
        return node.ref.shape, node.ref.numel


def _no_storage(data: tuple[object, ...]) -> StorageNode:
    raise _NotTemplate


def read_flat_columns(data: bytes | Iterable[bytes], context: UnpickleContext) -> FlatColumns | None:
    """The state dict of a pickle that is exactly torch.save's flat template, as columns, when
    every tensor is a whole storage of its own (no shared storage, no views); else ``None``.

    As :func:`read_flat_state_dict`, ``None`` is never a verdict: the caller reads the
    file by another path, which decides. ``data`` is the pickle whole or in blocks (then
    read as it goes: a window of it is held). Whether a name is set twice is left to the
    caller (:meth:`FlatColumns.names_distinct`), which reads the file by another path if so.

    Example:
        >>> read_flat_columns(pickle_bytes, UnpickleContext()).names[:1]  # doctest: +SKIP
        ['model.layers.0.mlp.experts.0.gate_proj.weight']
    """
    reader = None
    try:
        reader = _Columns(data, context)  # (a pickle in blocks: the first read here)
        return reader.read_columns()
    except (_NotTemplate, TiesafeError, IndexError, UnicodeDecodeError, ValueError):
        return None
    finally:
        if reader is not None:
            reader.on_storage = _no_storage  # its own bound method: a cycle that would keep the pickle
            # (and the reader's tables) alive until the next collection, paused during a conversion
