"""Read a torch checkpoint's structure without running any code from it.

The container (:mod:`.containers`) and the restricted unpickler (:mod:`.unpickler`)
give a tree of plain values and tensor descriptors; this module finds the state dict
in it and checks every tensor against its storage. The result is a :class:`Checkpoint`
of names -> :class:`TensorRef` and storage keys -> byte ranges of the file, which the
writer copies without ever holding them in memory.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from ..descriptors import Checkpoint, TensorRef, file_stamp
from ..errors import CorruptFileError, TiesafeError, UnsupportedError, quoted, read_error
from ..geometry import MAX_EXPANDED_BYTES
from .containers import read_legacy, read_zip, sniff_foreign
from .unpickler import TensorNode

# Keys under which training frameworks wrap the weights, most specific first.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "network", "ema", "net")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and any(isinstance(v, TensorNode) for v in obj.values())


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
    if isinstance(obj, TensorNode):
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
        if not isinstance(value, TensorNode):
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
            stamp = file_stamp(os.fstat(raw.fileno()))
            file_size = raw.seek(0, io.SEEK_END)
            raw.seek(0)
            head = raw.read(512)
            foreign = sniff_foreign(head)
            if foreign:
                raise CorruptFileError(foreign)
            raw.seek(0)
            if head.startswith(b"PK"):
                obj, records = read_zip(path, raw, file_size)
                fmt = "zip"
            else:
                obj, records = read_legacy(path, raw, file_size)
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
