"""The restricted unpickler: a pickle's globals become inert descriptor builders of ours.

A ``.bin``/``.pt`` file is a pickle, and a pickle is a program: ``torch.load`` (even
with ``weights_only``) executes it. We never do. ``find_class`` maps the handful of
globals a weights file names (the tensor rebuild functions, storage classes, dtypes,
``OrderedDict``) to *our own* builders that record geometry, and refuses every other
global by name. Every stream is first walked by :mod:`.pickle_guard`, which refuses
what ``find_class`` cannot see (extension codes, deep nesting, memo and hash abuse).
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import islice, repeat
from math import prod
from operator import lt
from typing import Any, BinaryIO

from ..descriptors import TensorRef
from ..dtypes import (
    BY_STORAGE_CLASS,
    BY_TORCH_NAME,
    BYTE,
    UNSUPPORTED_STORAGE_CLASSES,
    UNSUPPORTED_TORCH_DTYPES,
    DType,
)
from ..errors import CorruptFileError, TiesafeError, UnsafeCheckpointError, UnsupportedError, quoted
from ..geometry import MAX_DIMS
from .inert import InertObject, inert_class
from .pickle_guard import charge_floodable, scan
from .policy import dangerous_reason

# data.pkl holds structure only; a real one is kilobytes to a few MB. Anything
# far beyond is a decompression bomb or not a checkpoint.
MAX_PICKLE_BYTES = 256 * 1024 * 1024
# No real tensor has more elements than this; it also keeps byte arithmetic sane.
MAX_ELEMENTS = 1 << 56


# --------------------------------------------------------------------------- markers
# The objects our unpickler hands out instead of torch's. None of them runs code.


class _Sealed:
    """Refuses ``BUILD`` (``__setstate__``), the one hook a pickle has on our descriptor objects.

    Subclasses are slotted dataclasses (no ``__dict__``: one is made a tensor) and repeat
    ``__setstate__ = _Sealed.__setstate__`` in their own body: a frozen slotted dataclass
    otherwise gets a ``__setstate__`` of its own that *accepts* state.
    """

    __slots__ = ()

    def __setstate__(self, state: object) -> None:
        raise UnsafeCheckpointError(f"refused: the pickle tries to set the state of {self._what()}")

    def _what(self) -> str:
        return "a tensor descriptor"


@dataclass(frozen=True, eq=False, slots=True)
class _Builder(_Sealed):
    """One of our functions, as the pickle sees it: callable, and nothing else.

    A bare Python function would let ``BUILD`` set its ``__defaults__`` or
    ``__dict__`` for every later file read in the process.
    """

    __setstate__ = _Sealed.__setstate__

    name: str
    func: Callable[..., object]

    def __call__(self, *args: object) -> object:
        return self.func(*args)

    def _what(self) -> str:
        return self.name


@dataclass(frozen=True, eq=False, slots=True)
class StorageType(_Sealed):
    __setstate__ = _Sealed.__setstate__
    name: str
    dtype: DType | None  # None: unsupported (see ``unsupported``)
    unsupported: str | None = None


@dataclass(frozen=True, eq=False, slots=True)
class _DTypeMarker(_Sealed):
    __setstate__ = _Sealed.__setstate__
    dtype: DType | None
    name: str


@dataclass(frozen=True, eq=False, slots=True)
class StorageNode(_Sealed):
    __setstate__ = _Sealed.__setstate__
    key: str
    dtype: DType
    element_offset: int  # legacy storage views start inside their root storage
    unsupported: str | None


@dataclass(frozen=True, eq=False, slots=True)
class TensorNode(_Sealed):
    __setstate__ = _Sealed.__setstate__
    ref: TensorRef | None
    unsupported: str | None = None


@dataclass(frozen=True, eq=False, slots=True)
class _TypeMarker(_Sealed):
    __setstate__ = _Sealed.__setstate__
    name: str


def _ints(value: object, what: str) -> tuple[int, ...]:
    # A loop rather than all(genexpr): this runs twice a tensor, 100,000 times in an MoE file.
    if type(value) is tuple and len(value) <= MAX_DIMS:
        for v in value:
            if type(v) is not int:  # bool is not a size
                break
        else:
            return value
    elif isinstance(value, (tuple, list)) and len(value) <= MAX_DIMS and all(type(v) is int for v in value):
        return tuple(value)
    raise CorruptFileError(f"tensor {what} is not a tuple of at most {MAX_DIMS} integers: {quoted(value)}")


def _tensor(storage: object, offset: object, size: object, stride: object, dtype: DType | None = None) -> TensorNode:
    if not isinstance(storage, StorageNode):
        raise CorruptFileError("a tensor's storage is not a storage record")
    if storage.unsupported:
        return TensorNode(None, storage.unsupported)
    if dtype is None:
        dtype = storage.dtype
    shape, strides = _ints(size, "shape"), _ints(stride, "stride")
    if type(offset) is not int or offset < 0:
        raise CorruptFileError(f"tensor storage offset is invalid: {quoted(offset)}")
    if len(shape) != len(strides):
        raise CorruptFileError(f"tensor shape {quoted(shape)} and stride {quoted(strides)} differ in length")
    if shape and (min(shape) < 0 or min(strides) < 0):
        raise CorruptFileError(f"tensor shape {quoted(shape)} or stride {quoted(strides)} is negative")
    # Each number first: a product of a thousand 1000-digit numbers is slow to compute.
    if (shape and (max(shape) > MAX_ELEMENTS or max(strides) > MAX_ELEMENTS or prod(shape) > MAX_ELEMENTS)) or (
        offset > MAX_ELEMENTS
    ):
        raise CorruptFileError(
            f"tensor shape {quoted(shape)} / stride {quoted(strides)} / offset {quoted(offset)} is implausibly large"
        )
    # Untyped storages count bytes; the tensor's offset counts its own elements.
    base = storage.element_offset * storage.dtype.itemsize
    if base % dtype.itemsize:
        raise CorruptFileError("a storage view is not aligned to its tensor's dtype")
    ref = TensorRef(storage.key, dtype, base // dtype.itemsize + offset, shape, strides)
    return TensorNode(ref)


def _rebuild_tensor(storage: object, offset: object, size: object, stride: object) -> TensorNode:
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v2(storage: object, offset: object, size: object, stride: object, *_ignored: object) -> TensorNode:
    # requires_grad, backward_hooks and metadata do not change the bytes.
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(
    storage: object,
    offset: object,
    size: object,
    stride: object,
    requires_grad: object,
    hooks: object,
    dtype: object,
    *_ignored: object,
) -> TensorNode:
    if isinstance(dtype, type) and issubclass(dtype, InertObject):
        raise UnsupportedError(f"dtype {quoted(dtype.global_name, 120)} is not one tiesafe knows")
    if not isinstance(dtype, _DTypeMarker):
        raise CorruptFileError("a tensor's dtype is not a torch dtype")
    if dtype.dtype is None:
        return TensorNode(None, dtype.name)
    return _tensor(storage, offset, size, stride, dtype.dtype)


def _rebuild_parameter(data: object, *_ignored: object) -> object:
    return data


def _rebuild_from_type_v2(func: object, new_type: object, args: object, state: object) -> object:
    # A tensor with Python attributes: the attributes are dropped, the data kept.
    if not isinstance(func, _Builder) or func.func not in (
        _rebuild_tensor,
        _rebuild_tensor_v2,
        _rebuild_tensor_v3,
        _rebuild_parameter,
    ):
        raise UnsafeCheckpointError("the pickle rebuilds a tensor through an unexpected function")
    if isinstance(new_type, type) and issubclass(new_type, InertObject):
        # A subclass of another library (a quantized or sharded parameter type) may not mean
        # what its bytes say as a plain tensor: refused rather than guessed.
        raise UnsupportedError(
            f"a tensor is of type {quoted(new_type.global_name, 120)}, a tensor subclass tiesafe does not know; "
            "save plain tensors (e.g. {k: v.detach().clone() for k, v in state_dict.items()})"
        )
    if not isinstance(new_type, _TypeMarker) or not isinstance(args, tuple):
        raise UnsafeCheckpointError("the pickle rebuilds a tensor of an unexpected type")
    return func(*args)


def _unsupported_tensor(kind: str) -> Callable[..., TensorNode]:
    def build(*_args: object) -> TensorNode:
        return TensorNode(None, kind)

    return build


def _hashed(kind: type[Any]) -> Callable[..., object]:
    """``set``/``frozenset``/``OrderedDict`` whose arguments are charged to the hash-flooding budget."""

    def build(*args: object) -> object:
        if len(args) > 1:
            raise UnsafeCheckpointError(f"the pickle calls {kind.__name__} with unexpected arguments")
        if args:
            items = args[0]
            if not isinstance(items, (list, tuple, set, frozenset, dict)):
                raise UnsafeCheckpointError(f"the pickle builds a {kind.__name__} from a {type(items).__name__}")
            if kind is collections.OrderedDict and not isinstance(items, dict):
                # Python 2 pickled OrderedDicts as a list of [key, value] pairs.
                items = [pair[0] if isinstance(pair, (list, tuple)) and pair else pair for pair in items]
            charge_floodable(items, safe=(_Sealed, InertObject, type))
        return kind(*args)

    return build


def _plain(kind: type[Any], *, allowed: tuple[type, ...], most: int) -> Callable[..., object]:
    """A builtin a training checkpoint's plain values need (``bytes()``, ``complex(1, 2)``, ``range(3)``).

    Only with arguments of ``allowed`` types: ``bytes(2**40)`` would allocate a terabyte.
    """

    def build(*args: object) -> object:
        if len(args) > most or not all(isinstance(a, allowed) and not isinstance(a, bool) for a in args):
            raise UnsafeCheckpointError(f"the pickle calls {kind.__name__} with unexpected arguments")
        if kind in (bytes, bytearray) and len(args) == 2 and args[1] not in ("latin1", "latin-1"):
            raise UnsafeCheckpointError(f"the pickle calls {kind.__name__} with an unexpected encoding")
        return kind(*args)

    return build


def _codecs_encode(text: object, encoding: object = "utf-8") -> bytes:
    # Protocol-2 pickles spell bytes as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise UnsafeCheckpointError("the pickle calls _codecs.encode with unexpected arguments")
    return text.encode(str(encoding))


def _torch_size(*args: object) -> tuple[int, ...]:
    return _ints(args[0] if args else (), "size")


def _layout_name(name: object) -> str:
    # Sparse tensors name their layout by string; only the name is kept.
    if not isinstance(name, str):
        raise UnsafeCheckpointError("the pickle asks for a layout by a non-string name")
    return name


def _torch_device(*args: object) -> str:
    if not all(isinstance(a, (str, int)) for a in args):
        raise UnsafeCheckpointError("the pickle builds a torch.device from unexpected arguments")
    return ":".join(str(a) for a in args)


def _allowed_globals() -> dict[tuple[str, str], object]:
    functions: dict[tuple[str, str], Callable[..., object]] = {
        ("collections", "OrderedDict"): _hashed(collections.OrderedDict),
        ("builtins", "set"): _hashed(set),
        ("builtins", "frozenset"): _hashed(frozenset),
        # Plain values as protocols 0-4 spell them: b"" is bytes(), bytearray(b"x"), 1+2j, range(3).
        ("builtins", "bytes"): _plain(bytes, allowed=(bytes, bytearray, str), most=2),
        ("builtins", "bytearray"): _plain(bytearray, allowed=(bytes, bytearray, str), most=2),
        ("builtins", "complex"): _plain(complex, allowed=(int, float), most=2),
        ("builtins", "range"): _plain(range, allowed=(int,), most=3),
        ("builtins", "slice"): _plain(slice, allowed=(int, type(None)), most=3),
        ("_codecs", "encode"): _codecs_encode,
        ("torch", "Size"): _torch_size,
        ("torch", "device"): _torch_device,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch.serialization", "_get_layout"): _layout_name,
        ("torch._utils", "_rebuild_sparse_tensor"): _unsupported_tensor("sparse"),
        ("torch._utils", "_rebuild_sparse_csr_tensor"): _unsupported_tensor("sparse"),
        ("torch._utils", "_rebuild_qtensor"): _unsupported_tensor("quantized"),
        ("torch._utils", "_rebuild_nested_tensor"): _unsupported_tensor("nested"),
        ("torch._utils", "_rebuild_meta_tensor_no_storage"): _unsupported_tensor("meta (no data)"),
        ("torch._utils", "_rebuild_wrapper_subclass"): _unsupported_tensor("tensor subclass"),
        ("torch._utils", "_rebuild_device_tensor_from_numpy"): _unsupported_tensor("numpy-backed"),
        ("torch._utils", "_rebuild_device_tensor_from_cpu_tensor"): _unsupported_tensor("device"),
    }
    allowed: dict[tuple[str, str], object] = {
        key: _Builder(f"{key[0]}.{key[1]}", func) for key, func in functions.items()
    }
    allowed[("torch", "Tensor")] = _TypeMarker("torch.Tensor")
    allowed[("torch.nn.parameter", "Parameter")] = _TypeMarker("torch.nn.Parameter")
    allowed[("torch.nn.parameter", "Buffer")] = _TypeMarker("torch.nn.Buffer")
    allowed[("torch.storage", "UntypedStorage")] = StorageType("UntypedStorage", BYTE)
    for name, dtype in BY_STORAGE_CLASS.items():
        allowed[("torch", name)] = StorageType(name, dtype)
    for name, kind in UNSUPPORTED_STORAGE_CLASSES.items():
        allowed[("torch", name)] = StorageType(name, None, kind)
    for name, dtype in BY_TORCH_NAME.items():
        allowed[("torch", name)] = _DTypeMarker(dtype, name)
    for name in UNSUPPORTED_TORCH_DTYPES:
        allowed[("torch", name)] = _DTypeMarker(None, name)
    # Layouts and quantization schemes only travel as arguments of unsupported tensors.
    for marker in (
        "strided",
        "sparse_coo",
        "sparse_csr",
        "sparse_csc",
        "sparse_bsr",
        "sparse_bsc",
        "per_tensor_affine",
        "per_channel_affine",
        "per_tensor_symmetric",
        "per_channel_symmetric",
        "per_channel_affine_float_qparams",
    ):
        allowed[("torch", marker)] = _TypeMarker(f"torch.{marker}")
    return allowed


_ALLOWED = _allowed_globals()


@dataclass
class UnpickleContext:
    """What one file's pickles may name, and what they named (shared by a file's several pickles).

    ``strict`` refuses every global that is not tensor machinery (tiesafe before inert
    objects); ``survey`` (``inspect``) records dangerous globals instead of refusing, so
    a report can list them — they are still never imported or called.
    """

    strict: bool = False
    survey: bool = False
    globals_seen: dict[str, str] = field(default_factory=dict)  # "module.name" -> GROUPS member
    _classes: dict[str, type[InertObject]] = field(default_factory=dict)

    def inert(self, qualified: str) -> type[InertObject]:
        if qualified not in self._classes:
            self._classes[qualified] = inert_class(qualified)
        return self._classes[qualified]

    @property
    def refused(self) -> list[str]:
        return [name for name, group in self.globals_seen.items() if group == "refused"]


GROUPS = ("tensor machinery", "inert", "refused")


class _RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose every global resolves to an object of ours.

    ``find_class`` is the only door from a pickle to a callable (``GLOBAL``,
    ``STACK_GLOBAL``, ``INST``, ``OBJ``, ``EXT*`` all go through it), so closing it
    is what the Python docs prescribe for restricting unpickling. Tensor machinery maps
    to our descriptor builders; a global known to run code is refused by name
    (:mod:`.policy`); any other becomes an inert class of ours (:mod:`.inert`).
    """

    def __init__(
        self,
        file: BinaryIO,
        on_storage: Callable[[tuple[object, ...]], StorageNode] | None,
        context: UnpickleContext,
    ) -> None:
        super().__init__(file)
        self._on_storage = on_storage
        self._context = context

    def find_class(self, module: str, name: str) -> Any:
        # Protocol < 3 pickles use Python 2 names (__builtin__.set, commands.call):
        # translate them as pickle itself does, for lookup and for the message.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        qualified = f"{module}.{name}"
        seen = self._context.globals_seen
        machinery = _ALLOWED.get((module, name))
        if machinery is not None:
            seen.setdefault(qualified, GROUPS[0])
            return machinery
        reason = dangerous_reason(module, name)
        if reason is not None:
            seen[qualified] = GROUPS[2]
            if not self._context.survey:
                raise UnsafeCheckpointError(
                    f"refused: the pickle calls {quoted(qualified, 120)} ({reason}) — this file tries to run code"
                )
        elif self._context.strict:
            raise UnsafeCheckpointError(
                f"refused: the pickle asks for {quoted(qualified, 120)}, which a weights file does not "
                "need (--strict refuses every global that is not tensor machinery)"
            )
        else:
            seen.setdefault(qualified, GROUPS[1])
        return self._context.inert(qualified)

    def persistent_load(self, pid: Any) -> Any:
        if type(pid) is tuple and pid and pid[0] == "storage" and self._on_storage is not None:
            return self._on_storage(pid[1:])  # what torch.save writes, checked in one test
        if self._on_storage is None or not isinstance(pid, tuple) or not pid:
            raise CorruptFileError(f"unexpected persistent id {quoted(pid)}")
        tag = pid[0].decode("ascii", "replace") if isinstance(pid[0], bytes) else pid[0]
        if tag != "storage":
            raise UnsafeCheckpointError(f"refused: persistent id of kind {quoted(tag, 40)} (only storages are allowed)")
        return self._on_storage(pid[1:])


def unpickle(
    stream: BinaryIO,
    context: UnpickleContext,
    on_storage: Callable[[tuple[object, ...]], StorageNode] | None = None,
) -> Any:
    """Scan the next pickle of ``stream`` (see :mod:`.pickle_guard`), then load it from memory."""
    data = scan(stream, max_bytes=MAX_PICKLE_BYTES)
    try:
        return _RestrictedUnpickler(io.BytesIO(data), on_storage, context).load()
    except TiesafeError:
        raise
    except RecursionError:
        raise CorruptFileError("the pickle nests too deeply") from None
    except MemoryError:
        raise CorruptFileError("the pickle needs more memory than a weights file can") from None
    except Exception as exc:  # any malformed pickle: one line, no traceback
        raise CorruptFileError(f"the pickle is malformed ({type(exc).__name__}: {exc})"[:300]) from None


def is_storage_number(key: str) -> bool:
    """``0``, ``1``, ``12``, ...: how torch names its storages (no sign, no leading zero, 18 digits at most)."""
    return key.isdigit() and key.isascii() and len(key) <= 18 and (key[0] != "0" or key == "0")


def distinct_numbers(numbers: Sequence[int]) -> bool:
    """Whether no number repeats, told in C when they lie close to 0 (as torch numbers storages):
    ascending, or each marked in a bytearray, where a set of 100,000 numbers would take 7 MB.

    Example:
        >>> distinct_numbers([0, 2, 1]), distinct_numbers([3, 1, 3])
        (True, False)
    """
    if not numbers or all(map(lt, numbers, islice(numbers, 1, None))):
        return True
    top = max(numbers)
    if min(numbers) < 0 or top >= 2 * len(numbers) + 65536:
        return len(set(numbers)) == len(numbers)
    marks = bytearray(top + 1)
    any(map(marks.__setitem__, numbers, repeat(1)))
    return marks.count(1) == len(numbers)


def storage_fields(data: tuple[object, ...]) -> tuple[StorageType, str, str, int]:
    if len(data) < 4:
        raise CorruptFileError("a storage record has too few fields")
    storage_type, key, location, numel = data[:4]
    if (  # the common case first, in one test: this runs once a storage (100,000 in an MoE file)
        type(storage_type) is StorageType
        and type(key) is str
        and type(location) is str
        and type(numel) is int
        and 0 <= numel <= MAX_ELEMENTS
    ):
        return storage_type, key, location, numel
    if isinstance(key, bytes):
        key = key.decode("ascii", "replace")
    if isinstance(location, bytes):
        location = location.decode("ascii", "replace")
    if isinstance(storage_type, type) and issubclass(storage_type, InertObject):
        raise UnsupportedError(f"storage type {quoted(storage_type.global_name, 120)} is not one tiesafe knows")
    if not isinstance(storage_type, StorageType):
        raise CorruptFileError("a storage record does not name a storage type")
    if not isinstance(key, str) or not isinstance(location, str):
        raise CorruptFileError("a storage record has a non-string key or location")
    if type(numel) is not int or numel < 0 or numel > MAX_ELEMENTS:
        raise CorruptFileError(f"storage {quoted(key)} has an invalid size {quoted(numel, 40)}")
    return storage_type, key, location, numel
