"""Read the structure of a torch checkpoint without running any code from it.

A ``.bin``/``.pt`` file is a pickle, and a pickle is a program: ``torch.load`` (even
with ``weights_only``) executes it. We never do. A restricted unpickler maps the
handful of globals a weights file names (the tensor rebuild functions, storage
classes, dtypes, ``OrderedDict``) to *our own* descriptor builders and refuses
every other global by name. Tensor data is never read here: the result is a
:class:`Checkpoint` of names -> :class:`TensorRef` and storage keys -> byte ranges
of the file, which the writer copies without ever holding them in memory.

Two layouts exist: torch's zip archive (``torch.save`` since 1.6) and the legacy
stream of pickles followed by raw storages. Both are handled here by hand because
torch's own reader must materialise every tensor, and no other library reads
the format without torch.
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .dtypes import (
    BY_STORAGE_CLASS,
    BY_TORCH_NAME,
    BYTE,
    UNSUPPORTED_STORAGE_CLASSES,
    UNSUPPORTED_TORCH_DTYPES,
    DType,
)
from .errors import CorruptFileError, TiesafeError, UnsafeCheckpointError, UnsupportedError, quoted, read_error
from .geometry import MAX_DIMS, MAX_EXPANDED_BYTES, extent, is_contiguous, numel
from .pickle_guard import charge_floodable, scan

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
# data.pkl holds structure only; a real one is kilobytes to a few MB. Anything
# far beyond is a decompression bomb or not a checkpoint.
MAX_PICKLE_BYTES = 256 * 1024 * 1024
# No real tensor has more elements than this; it also keeps byte arithmetic sane.
MAX_ELEMENTS = 1 << 56

# Keys under which training frameworks wrap the weights, most specific first.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "network", "ema", "net")


@dataclass(frozen=True)
class StorageRecord:
    """Where one storage's bytes lie in the checkpoint file."""

    key: str
    path: Path  # the file holding the bytes (a sharded set has several)
    offset: int  # byte offset of the first byte in the file
    nbytes: int
    location: str  # device it was saved from ("cpu", "cuda:0", ...): recorded, never needed


@dataclass(frozen=True)
class TensorRef:
    """A tensor as a window on a storage: no data, only geometry."""

    storage: str
    dtype: DType
    offset: int  # in elements of ``dtype``
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def span(self) -> tuple[int, int]:
        """Byte range ``[start, end)`` of the storage that the tensor touches."""
        size = self.dtype.itemsize
        return self.offset * size, extent(self.offset, self.shape, self.stride) * size

    @property
    def is_contiguous(self) -> bool:
        return is_contiguous(self.shape, self.stride)


@dataclass
class Checkpoint:
    """A parsed checkpoint: tensor names in file order, storages, what was skipped."""

    path: Path
    format: str  # "zip" or "legacy"
    tensors: dict[str, TensorRef]
    storages: dict[str, StorageRecord]
    skipped: list[str] = field(default_factory=list)
    wrapper: str | None = None  # key path the weights were found under, if any
    stamps: dict[Path, tuple[int, ...]] = field(default_factory=dict)  # each file as it was read

    def check_unchanged(self) -> None:
        """Raise if a file this checkpoint was read from has changed since (size, mtime, inode).

        Called before an output is renamed into place: bytes copied from a file being
        rewritten (a download still running, a training job saving) are not the
        checkpoint that was read and verified.

        Example:
            >>> read_checkpoint("pytorch_model.bin").check_unchanged()  # doctest: +SKIP
        """
        for path, stamp in self.stamps.items():
            try:
                now = _stamp(os.stat(path))
            except OSError:
                now = ()
            if now != stamp:
                raise TiesafeError(
                    "the file changed while it was being converted (size, modification time or inode differ); "
                    "nothing was written: convert it again once it is complete",
                    path=path,
                )


def _stamp(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


# --------------------------------------------------------------------------- markers
# The objects our unpickler hands out instead of torch's. None of them runs code.


class _Inert:
    """Refuses ``BUILD`` (``__setstate__``), the one hook a pickle has on our objects."""

    def __setstate__(self, state: object) -> None:
        raise UnsafeCheckpointError(f"refused: the pickle tries to set the state of {self._what()}")

    def _what(self) -> str:
        return "a tensor descriptor"


@dataclass(frozen=True, eq=False)
class _Builder(_Inert):
    """One of our functions, as the pickle sees it: callable, and nothing else.

    A bare Python function would let ``BUILD`` set its ``__defaults__`` or
    ``__dict__`` for every later file read in the process.
    """

    name: str
    func: Callable[..., object]

    def __call__(self, *args: object) -> object:
        return self.func(*args)

    def _what(self) -> str:
        return self.name


@dataclass(frozen=True, eq=False)
class _StorageType(_Inert):
    name: str
    dtype: DType | None  # None: unsupported (see ``unsupported``)
    unsupported: str | None = None


@dataclass(frozen=True, eq=False)
class _DTypeMarker(_Inert):
    dtype: DType | None
    name: str


@dataclass(frozen=True, eq=False)
class _StorageNode(_Inert):
    key: str
    dtype: DType
    element_offset: int  # legacy storage views start inside their root storage
    unsupported: str | None


@dataclass(frozen=True, eq=False)
class _TensorNode(_Inert):
    ref: TensorRef | None
    unsupported: str | None = None


@dataclass(frozen=True, eq=False)
class _TypeMarker(_Inert):
    name: str


def _ints(value: object, what: str) -> tuple[int, ...]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) > MAX_DIMS
        or not all(type(v) is int for v in value)  # bool is not a size
    ):
        raise CorruptFileError(f"tensor {what} is not a tuple of at most {MAX_DIMS} integers: {quoted(value)}")
    return tuple(value)


def _tensor(storage: object, offset: object, size: object, stride: object, dtype: DType | None = None) -> _TensorNode:
    if not isinstance(storage, _StorageNode):
        raise CorruptFileError("a tensor's storage is not a storage record")
    if storage.unsupported:
        return _TensorNode(None, storage.unsupported)
    if dtype is None:
        dtype = storage.dtype
    shape, strides = _ints(size, "shape"), _ints(stride, "stride")
    if type(offset) is not int or offset < 0:
        raise CorruptFileError(f"tensor storage offset is invalid: {quoted(offset)}")
    if len(shape) != len(strides):
        raise CorruptFileError(f"tensor shape {quoted(shape)} and stride {quoted(strides)} differ in length")
    if any(n < 0 for n in shape) or any(s < 0 for s in strides):
        raise CorruptFileError(f"tensor shape {quoted(shape)} or stride {quoted(strides)} is negative")
    # Each number first: a product of a thousand 1000-digit numbers is slow to compute.
    if max((*shape, *strides, offset)) > MAX_ELEMENTS or numel(shape) > MAX_ELEMENTS:
        raise CorruptFileError(
            f"tensor shape {quoted(shape)} / stride {quoted(strides)} / offset {quoted(offset)} is implausibly large"
        )
    # Untyped storages count bytes; the tensor's offset counts its own elements.
    base = storage.element_offset * storage.dtype.itemsize
    if base % dtype.itemsize:
        raise CorruptFileError("a storage view is not aligned to its tensor's dtype")
    ref = TensorRef(storage.key, dtype, base // dtype.itemsize + offset, shape, strides)
    return _TensorNode(ref)


def _rebuild_tensor(storage: object, offset: object, size: object, stride: object) -> _TensorNode:
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v2(storage: object, offset: object, size: object, stride: object, *_ignored: object) -> _TensorNode:
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
) -> _TensorNode:
    if not isinstance(dtype, _DTypeMarker):
        raise CorruptFileError("a tensor's dtype is not a torch dtype")
    if dtype.dtype is None:
        return _TensorNode(None, dtype.name)
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
    if not isinstance(new_type, _TypeMarker) or not isinstance(args, tuple):
        raise UnsafeCheckpointError("the pickle rebuilds a tensor of an unexpected type")
    return func(*args)


def _unsupported_tensor(kind: str) -> Callable[..., _TensorNode]:
    def build(*_args: object) -> _TensorNode:
        return _TensorNode(None, kind)

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
            charge_floodable(items, safe=(_Inert,))
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
    allowed[("torch.storage", "UntypedStorage")] = _StorageType("UntypedStorage", BYTE)
    for name, dtype in BY_STORAGE_CLASS.items():
        allowed[("torch", name)] = _StorageType(name, dtype)
    for name, kind in UNSUPPORTED_STORAGE_CLASSES.items():
        allowed[("torch", name)] = _StorageType(name, None, kind)
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


class _RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose every global resolves to an inert builder of ours.

    ``find_class`` is the only door from a pickle to a callable (``GLOBAL``,
    ``STACK_GLOBAL``, ``INST``, ``OBJ``, ``EXT*`` all go through it), so closing it
    is what the Python docs prescribe for restricting unpickling.
    """

    def __init__(self, file: BinaryIO, on_storage: Callable[[tuple[object, ...]], _StorageNode] | None) -> None:
        super().__init__(file)
        self._on_storage = on_storage

    def find_class(self, module: str, name: str) -> Any:
        # Protocol < 3 pickles use Python 2 names (__builtin__.set, commands.call):
        # translate them as pickle itself does, for lookup and for the message.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise UnsafeCheckpointError(
                f"refused: the pickle asks for {quoted(f'{module}.{name}', 120)}, which a weights file does not "
                "need (tiesafe never runs code from a checkpoint)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if self._on_storage is None or not isinstance(pid, tuple) or not pid:
            raise CorruptFileError(f"unexpected persistent id {quoted(pid)}")
        tag = pid[0].decode("ascii", "replace") if isinstance(pid[0], bytes) else pid[0]
        if tag != "storage":
            raise UnsafeCheckpointError(f"refused: persistent id of kind {quoted(tag, 40)} (only storages are allowed)")
        return self._on_storage(pid[1:])


def _unpickle(stream: BinaryIO, on_storage: Callable[[tuple[object, ...]], _StorageNode] | None = None) -> Any:
    """Scan the next pickle of ``stream`` (see :mod:`converter.pickle_guard`), then load it from memory."""
    data = scan(stream, max_bytes=MAX_PICKLE_BYTES)
    try:
        return _RestrictedUnpickler(io.BytesIO(data), on_storage).load()
    except TiesafeError:
        raise
    except RecursionError:
        raise CorruptFileError("the pickle nests too deeply") from None
    except MemoryError:
        raise CorruptFileError("the pickle needs more memory than a weights file can") from None
    except Exception as exc:  # any malformed pickle: one line, no traceback
        raise CorruptFileError(f"the pickle is malformed ({type(exc).__name__}: {exc})"[:300]) from None


def _storage_fields(data: tuple[object, ...]) -> tuple[_StorageType, str, str, int]:
    if len(data) < 4:
        raise CorruptFileError("a storage record has too few fields")
    storage_type, key, location, numel = data[:4]
    if isinstance(key, bytes):
        key = key.decode("ascii", "replace")
    if isinstance(location, bytes):
        location = location.decode("ascii", "replace")
    if not isinstance(storage_type, _StorageType):
        raise CorruptFileError("a storage record does not name a storage type")
    if not isinstance(key, str) or not isinstance(location, str):
        raise CorruptFileError("a storage record has a non-string key or location")
    if type(numel) is not int or numel < 0 or numel > MAX_ELEMENTS:
        raise CorruptFileError(f"storage {quoted(key)} has an invalid size {quoted(numel, 40)}")
    return storage_type, key, location, numel


# --------------------------------------------------------------------------- zip format


def _local_data_offset(raw: BinaryIO, info: zipfile.ZipInfo, file_size: int) -> int:
    # The central directory does not give where data starts: the local header's
    # extra field (torch pads it to align storages) may differ, so read it.
    raw.seek(info.header_offset)
    header = raw.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise CorruptFileError(f"zip member {quoted(info.filename)} has no valid local header")
    (method,) = struct.unpack("<H", header[8:10])
    if method != zipfile.ZIP_STORED:  # the central directory said stored: the two disagree
        raise CorruptFileError(f"zip member {quoted(info.filename)} is compressed; torch writes storages uncompressed")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > file_size:
        raise CorruptFileError(f"zip member {quoted(info.filename)} claims more bytes than the file holds")
    return int(start)


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    try:
        return archive.read(info)
    except Exception as exc:  # zipfile's decoders raise zlib.error, RuntimeError, NotImplementedError, ...
        raise CorruptFileError(f"cannot read {quoted(info.filename)} ({str(exc)[:120]})") from None


def _read_zip(path: Path, raw: BinaryIO, file_size: int) -> tuple[Any, dict[str, StorageRecord]]:
    try:
        archive = zipfile.ZipFile(raw)
        infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, struct.error, NotImplementedError) as exc:
        raise CorruptFileError(f"damaged zip archive ({str(exc)[:120]})") from None
    if not infos:
        raise CorruptFileError("empty zip archive")
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        raise CorruptFileError("zip archive holds duplicate member names")
    prefix = names[0].split("/", 1)[0]
    pickle_name = f"{prefix}/data.pkl"
    # TorchScript archives hold a data.pkl too, whose globals are the model's classes.
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise CorruptFileError("this is a TorchScript archive (torch.jit.save), not a checkpoint")
    if pickle_name not in names:
        if any(n.endswith(".npy") for n in names):
            raise CorruptFileError("this is a NumPy .npz archive, not a torch checkpoint")
        raise CorruptFileError("zip archive without data.pkl: not a torch checkpoint")
    for name in names:
        if not name.startswith(prefix + "/") or ".." in name.split("/") or name.startswith("/"):
            raise CorruptFileError(f"zip member {quoted(name)} lies outside the archive folder {quoted(prefix)}")
    by_name = {i.filename: i for i in infos}
    byteorder = by_name.get(f"{prefix}/byteorder")
    if byteorder is not None and byteorder.file_size > 16:
        raise CorruptFileError(f"the byteorder record claims {byteorder.file_size} bytes")
    if byteorder is not None and _read_member(archive, byteorder).strip() not in (b"little", b""):
        raise UnsupportedError("big-endian checkpoints are not supported; re-save on a little-endian machine")
    pickle_info = by_name[pickle_name]
    if pickle_info.file_size > MAX_PICKLE_BYTES:
        raise CorruptFileError(f"data.pkl claims {pickle_info.file_size} bytes: too large for a weights file")
    pickle_bytes = _read_member(archive, pickle_info)

    records: dict[str, StorageRecord] = {}
    nodes: dict[str, _StorageNode] = {}

    def on_storage(data: tuple[object, ...]) -> _StorageNode:
        storage_type, key, location, numel = _storage_fields(data)
        if key in nodes:
            return nodes[key]
        member = by_name.get(f"{prefix}/data/{key}")
        if member is None:
            raise CorruptFileError(f"storage {quoted(key)} has no record in the archive")
        if member.compress_type != zipfile.ZIP_STORED or member.compress_size != member.file_size:
            raise CorruptFileError(f"storage {quoted(key)} is compressed; torch writes storages uncompressed")
        dtype = storage_type.dtype or BYTE
        if numel * dtype.itemsize > member.file_size:
            raise CorruptFileError(
                f"storage {quoted(key)} should hold {numel * dtype.itemsize} bytes "
                f"but its record has {member.file_size}"
            )
        offset = _local_data_offset(raw, member, file_size)
        records[key] = StorageRecord(key, path, offset, numel * dtype.itemsize, location)
        nodes[key] = _StorageNode(key, dtype, 0, storage_type.unsupported)
        return nodes[key]

    return _unpickle(io.BytesIO(pickle_bytes), on_storage), records


# --------------------------------------------------------------------------- legacy format


def _read_legacy(path: Path, raw: BinaryIO, file_size: int) -> tuple[Any, dict[str, StorageRecord]]:
    if _unpickle(raw) != LEGACY_MAGIC:
        raise CorruptFileError("not a torch checkpoint (no zip archive and no legacy magic number)")
    if _unpickle(raw) != LEGACY_PROTOCOL:
        raise CorruptFileError("unknown legacy torch protocol version")
    sys_info = _unpickle(raw)
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        raise UnsupportedError("big-endian checkpoints are not supported; re-save on a little-endian machine")

    roots: dict[str, tuple[DType, int, str, str | None]] = {}  # key -> dtype, numel, location, unsupported
    nodes: dict[tuple[str, str], _StorageNode] = {}

    def on_storage(data: tuple[object, ...]) -> _StorageNode:
        storage_type, key, location, numel = _storage_fields(data)
        view = data[4] if len(data) > 4 else None
        dtype = storage_type.dtype or BYTE
        roots.setdefault(key, (dtype, numel, location, storage_type.unsupported))
        view_key, element_offset = key, 0
        if view is not None:
            if (
                not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[0], str) and type(view[1]) is int)
                or not 0 <= view[1] <= MAX_ELEMENTS
            ):
                raise CorruptFileError(f"storage {quoted(key)} has a malformed view record")
            view_key, element_offset = view[0], view[1]
        if (key, view_key) not in nodes:
            nodes[(key, view_key)] = _StorageNode(key, dtype, element_offset, storage_type.unsupported)
        return nodes[(key, view_key)]

    result = _unpickle(raw, on_storage)
    keys = _unpickle(raw)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise CorruptFileError("the legacy storage key list is malformed")
    records: dict[str, StorageRecord] = {}
    position = raw.tell()
    for key in keys:
        if key not in roots:
            raise CorruptFileError(f"storage {quoted(key)} is listed but never used")
        if key in records:
            raise CorruptFileError(f"storage {quoted(key)} is listed twice")
        dtype, numel, location, _ = roots[key]
        raw.seek(position)
        header = raw.read(8)
        if len(header) != 8:
            raise CorruptFileError(f"storage {quoted(key)} is cut off (file ends at byte {file_size})")
        (stored_numel,) = struct.unpack("<q", header)
        if stored_numel != numel:
            raise CorruptFileError(f"storage {quoted(key)} holds {stored_numel} elements but is described with {numel}")
        start, nbytes = position + 8, numel * dtype.itemsize
        if start + nbytes > file_size:
            raise CorruptFileError(
                f"storage {quoted(key)} is cut off (needs {nbytes} bytes at {start}, file has {file_size})"
            )
        records[key] = StorageRecord(key, path, start, nbytes, location)
        position = start + nbytes
    missing = set(roots) - set(records)
    if missing:
        raise CorruptFileError(f"storage {quoted(sorted(missing)[0])} is used but has no data")
    return result, records


# --------------------------------------------------------------------------- top level


def _sniff_foreign(head: bytes) -> str | None:
    """Name the format of a file that is clearly not a torch checkpoint."""
    if not head:
        return "the file is empty"
    if head.startswith(b"GGUF"):
        return "this is a GGUF file, not a torch checkpoint"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "this is an HDF5 (.h5) file, not a torch checkpoint"
    if head.startswith(b"\x93NUMPY"):
        return "this is a NumPy .npy file, not a torch checkpoint"
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if n < (1 << 27):
            return "this is a safetensors file already (use 'tiesafe inspect' on it)"
    if len(head) > 262 and head[257:262] == b"ustar":
        return "this is a tar archive (torch < 0.4 checkpoint format), which tiesafe does not read"
    if head[:1] != b"\x80" and not head.startswith(b"PK"):
        if all(32 <= b < 127 or b in (9, 10, 13) for b in head[:512]):
            return "this is a text file, not a torch checkpoint"
        return "not a torch checkpoint (neither a zip archive nor a pickle)"
    return None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and any(isinstance(v, _TensorNode) for v in obj.values())


def _find_weights(obj: Any, key: str | None, seen: frozenset[int] = frozenset()) -> tuple[dict[Any, Any], str | None]:
    if key is not None:
        node = obj
        for part in key.split("/"):
            if not isinstance(node, dict) or part not in node:
                raise TiesafeError(f"no entry {quoted(key)} in the checkpoint (looked up by --key)")
            node = node[part]
        if not isinstance(node, dict):
            raise TiesafeError(f"entry {quoted(key)} is not a dict of tensors")
        return node, key
    if _is_state_dict(obj):
        return obj, None
    if isinstance(obj, _TensorNode):
        raise TiesafeError("the checkpoint is a single tensor, not a state dict")
    if isinstance(obj, dict):
        seen = seen | {id(obj)}  # a pickle can make a dict contain itself
        for wrapper in WRAPPER_KEYS:
            inner = obj.get(wrapper)
            if isinstance(inner, dict) and id(inner) not in seen:
                try:
                    found, path = _find_weights(inner, None, seen)
                except TiesafeError:
                    continue
                return found, wrapper if path is None else f"{wrapper}/{path}"
        dicts = [_display(k) for k, v in obj.items() if isinstance(v, dict)]
        hint = f" (entries holding dicts: {', '.join(dicts[:8])}; pick one with --key)" if dicts else ""
        raise TiesafeError(f"no tensors found at the top level of the checkpoint{hint}")
    raise TiesafeError(f"the checkpoint holds a {type(obj).__name__}, not a state dict")


def _display(name: object) -> str:
    """A key as the report shows it: plain when it is a short printable string, else quoted."""
    if isinstance(name, str) and name.isprintable() and len(name) <= 200:
        return name
    return quoted(name)


def _tensor_name(name: object) -> str:
    if not isinstance(name, str):
        raise CorruptFileError(f"tensor name {quoted(name)} is not a string")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise CorruptFileError(f"tensor name {quoted(name)} is not valid Unicode (a lone surrogate)") from None
    if name == "__metadata__":
        raise UnsupportedError("a tensor is named '__metadata__', a name the safetensors header reserves")
    return name


def _collect(weights: dict[Any, Any], everything: Any, wrapper: str | None) -> tuple[dict[str, TensorRef], list[str]]:
    tensors: dict[str, TensorRef] = {}
    skipped: list[str] = []
    for name, value in weights.items():
        if not isinstance(value, _TensorNode):
            skipped.append(_display(name))
            continue
        name = _tensor_name(name)
        if value.ref is None:
            raise UnsupportedError(
                f"tensor {quoted(name)} is {value.unsupported}, which safetensors cannot store; "
                "convert it to a supported dtype/layout before saving"
            )
        tensors[name] = value.ref
    if wrapper is not None and isinstance(everything, dict):
        top = wrapper.split("/", 1)[0]
        skipped = [f"{wrapper}/{s}" for s in skipped] + [_display(k) for k in everything if k != top]
    return tensors, skipped


def read_checkpoint(path: str | Path, *, key: str | None = None) -> Checkpoint:
    """Parse a torch checkpoint's structure without reading tensor data.

    ``key`` picks the state dict inside a training checkpoint explicitly
    (``"model/ema"`` for nested dicts); by default the weights are found at the top
    level or under a usual wrapper key (``state_dict``, ``model``, ``module``, ...).

    Example:
        >>> ckpt = read_checkpoint("pytorch_model.bin")  # doctest: +SKIP
        >>> ckpt.tensors["lm_head.weight"].storage == ckpt.tensors["transformer.wte.weight"].storage
        True
    """
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            stamp = _stamp(os.fstat(raw.fileno()))
            file_size = raw.seek(0, io.SEEK_END)
            raw.seek(0)
            head = raw.read(512)
            foreign = _sniff_foreign(head)
            if foreign:
                raise CorruptFileError(foreign)
            raw.seek(0)
            if head.startswith(b"PK"):
                obj, records = _read_zip(path, raw, file_size)
                fmt = "zip"
            else:
                obj, records = _read_legacy(path, raw, file_size)
                fmt = "legacy"
        weights, wrapper = _find_weights(obj, key)
        tensors, skipped = _collect(weights, obj, wrapper)
        for name, ref in tensors.items():
            record = records.get(ref.storage)
            if record is None:
                raise CorruptFileError(f"tensor {quoted(name)} uses storage {quoted(ref.storage)}, which has no data")
            if ref.span[1] > record.nbytes:
                raise CorruptFileError(
                    f"tensor {quoted(name)} reaches byte {ref.span[1]} of storage {quoted(ref.storage)}, "
                    f"which holds {record.nbytes}"
                )
            touched = ref.span[1] - ref.span[0]
            if ref.nbytes > max(touched, MAX_EXPANDED_BYTES):
                raise UnsupportedError(
                    f"tensor {quoted(name)} repeats {touched} bytes as {ref.nbytes} (an expanded tensor, stride 0): "
                    f"safetensors stores every repeat, and tiesafe writes at most {MAX_EXPANDED_BYTES} such bytes; "
                    "save it with .contiguous() or .clone() if it is meant to be that large"
                )
    except TiesafeError as exc:
        if exc.path is None:
            exc = type(exc)(exc.problem, path=path)
        raise exc from None
    except RecursionError:
        raise CorruptFileError("the checkpoint nests too deeply", path=path) from None
    except MemoryError:
        raise CorruptFileError("the checkpoint needs more memory than a weights file can", path=path) from None
    except OSError as exc:
        raise read_error(exc, path, "checkpoint file") from None
    return Checkpoint(path, fmt, tensors, records, skipped, wrapper, {path: stamp})
