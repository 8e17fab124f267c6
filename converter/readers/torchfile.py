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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..descriptors import Checkpoint, StorageRecord, TensorRef, file_stamp
from ..errors import CorruptFileError, TiesafeError, UnsupportedError, quoted, read_error
from ..geometry import MAX_EXPANDED_BYTES
from ..names import strip_prefixes
from .containers import read_legacy, read_zip, sniff_foreign
from .state_dict import choose_weights
from .unpickler import TensorNode, UnpickleContext


def _tensor_name(name: object) -> str:
    if not isinstance(name, str):
        raise CorruptFileError(f"tensor name {quoted(name)} is not a string")
    try:
        name.isascii() or name.encode("utf-8")  # ASCII, the common case, needs no encoding
    except UnicodeEncodeError:
        raise CorruptFileError(f"tensor name {quoted(name)} is not valid Unicode (a lone surrogate)") from None
    if name == "__metadata__":
        raise UnsupportedError("a tensor is named '__metadata__', a name the safetensors header reserves")
    return name


def _collect(weights: dict[Any, Any]) -> dict[str, TensorRef]:
    tensors: dict[str, TensorRef] = {}
    for name, value in weights.items():
        if not isinstance(value, TensorNode):
            continue
        name = _tensor_name(name)
        if value.ref is None:
            raise UnsupportedError(
                f"tensor {quoted(name)} is {value.unsupported}, which safetensors cannot store; "
                "convert it to a supported dtype/layout before saving"
            )
        tensors[name] = value.ref
    return tensors


@dataclass
class Tree:
    """A pickle file's whole object tree: plain values, tensor descriptors, inert objects.

    For readers that need more than the state dict (DeepSpeed's model states list
    parameter shapes and partitions). ``globals`` maps every global the file names to
    its group (:data:`~converter.readers.unpickler.GROUPS`).
    """

    path: Path
    format: str  # "zip" or "legacy"
    root: Any
    records: dict[str, StorageRecord]
    stamp: tuple[int, ...]
    globals: dict[str, str]


def read_tree(path: str | Path, *, strict: bool = False, survey: bool = False) -> Tree:
    """Unpickle ``path`` with the restricted unpickler; no tensor data is read.

    ``strict`` refuses any global that is not tensor machinery; ``survey`` lists
    dangerous globals instead of refusing them (for ``inspect``; still never called).

    Example:
        >>> tree = read_tree("zero_pp_rank_0_mp_rank_00_model_states.pt")  # doctest: +SKIP
        >>> sorted(tree.root)[:2]
        ['buffer_names', 'ds_config']
    """
    path = Path(path)
    context = UnpickleContext(strict=strict, survey=survey)
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
                root, records = read_zip(path, raw, file_size, context)
                fmt = "zip"
            else:
                root, records = read_legacy(path, raw, file_size, context)
                fmt = "legacy"
    except TiesafeError as exc:
        raise exc.at(path) from None
    except RecursionError:
        raise CorruptFileError("the checkpoint nests too deeply", path=path) from None
    except MemoryError:
        raise CorruptFileError("the checkpoint needs more memory than a weights file can", path=path) from None
    except OSError as exc:
        raise read_error(exc, path, "checkpoint file") from None
    return Tree(path, fmt, root, records, stamp, dict(context.globals_seen))


def read_checkpoint(
    path: str | Path,
    *,
    key: str | None = None,
    strict: bool = False,
    strip_prefix: Sequence[str] = (),
    keep_names: bool = False,
) -> Checkpoint:
    """Parse a torch checkpoint's structure without reading tensor data.

    The weights are the state dict with the most tensor bytes (a training checkpoint's
    ``model``, ``state_dict``, ``module``, ...); ``key`` names one explicitly
    (``"model/ema"``). Other entries are listed in ``skipped``. Names lose a
    ``_orig_mod.``/``module.`` prefix that every one of them carries (``keep_names``
    keeps it) and any ``strip_prefix``. ``strict`` refuses a file naming any global
    that is not tensor machinery; by default such globals become inert placeholders.

    Example:
        >>> ckpt = read_checkpoint("pytorch_model.bin")  # doctest: +SKIP
        >>> ckpt.tensors["lm_head.weight"].storage == ckpt.tensors["transformer.wte.weight"].storage
        True
    """
    return checkpoint_from_tree(
        read_tree(path, strict=strict), key=key, strip_prefix=strip_prefix, keep_names=keep_names
    )


def checkpoint_from_tree(
    tree: Tree, *, key: str | None = None, strip_prefix: Sequence[str] = (), keep_names: bool = False
) -> Checkpoint:
    """The weights of an already read :class:`Tree` (see :func:`read_checkpoint`)."""
    path = tree.path
    try:
        choice = choose_weights(tree.root, key)
        tensors = _collect(choice.weights)
        renamed, notes = strip_prefixes(list(tensors), strip_prefix, auto=not keep_names)
        if notes:
            tensors = {renamed[name]: ref for name, ref in tensors.items()}
        _check_bounds(tensors, tree.records)
    except TiesafeError as exc:
        raise exc.at(path) from None
    return Checkpoint(
        path,
        tree.format,
        tensors,
        tree.records,
        choice.skipped,
        choice.key,
        {path: tree.stamp},
        prefixes_removed=notes,
        globals=tree.globals,
    )


def _check_bounds(tensors: dict[str, TensorRef], records: dict[str, StorageRecord]) -> None:
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
