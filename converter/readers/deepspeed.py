"""Read a DeepSpeed ZeRO checkpoint (stages 1, 2 and 3) as one checkpoint of file pieces.

A ZeRO checkpoint (``latest`` naming a ``global_stepN`` folder) keeps the fp32 master
weights in each data-parallel rank's optimizer file, flattened and partitioned; the
model states file holds the parameter shapes, the frozen parameters, the buffers and
the tied names. DeepSpeed's ``utils/zero_to_fp32.py`` gathers them by loading every
file into memory; this reader computes the same gather as byte ranges, so that each
parameter becomes a storage made of :class:`~converter.descriptors.Piece` s of the
rank files and the writer copies them without holding the model:

- stages 1 and 2: each parameter group's partitions, rank after rank, form one flat
  vector; parameters follow each other in it (``param_shapes`` order, plus any
  ``param_alignment_paddings``), and the group is padded to a multiple of 2 x world size;
- stage 3: each rank holds ``ceil(numel / world size)`` elements of every parameter,
  at the same offset of its (concatenated) flat groups; the parameter is the ranks'
  slices one after another, cut to its size;
- frozen parameters come from ``frozen_param_fragments`` (whole in rank 0's model file
  for stages 1/2, partitioned like stage 3 parameters in every rank's model file);
- buffers from rank 0's ``module`` (floating ones read as fp32, as ``zero_to_fp32``
  does), and ``shared_params`` name the same storage (a tie).

The files are read with the restricted unpickler: nothing in them runs. Tensor- and
pipeline-parallel checkpoints (``mp_rank_01``, ``layer_*`` files) are refused.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..descriptors import Checkpoint, Piece, StorageRecord, TensorRef
from ..dtypes import BY_CODE
from ..errors import CorruptFileError, UnsupportedError, quoted, read_error
from ..geometry import contiguous_strides, numel
from .torchfile import read_tree
from .unpickler import TensorNode

LATEST = "latest"
_OPTIM = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_ZERO3_MODEL = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_MODEL = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_LAYER = re.compile(r"^layer_\d+-model_\d+-model_states\.pt$")
_STEP = re.compile(r"^global_step\d+$")
F32 = BY_CODE["F32"]


# --------------------------------------------------------------------------- finding the files


def _is_step_folder(folder: Path) -> bool:
    return any(_OPTIM.match(p.name) or _MODEL.match(p.name) or _ZERO3_MODEL.match(p.name) for p in folder.iterdir())


def looks_like_deepspeed(folder: Path) -> bool:
    """Whether ``folder`` is a DeepSpeed run (a ``latest`` file) or step folder (rank files), by names only.

    Example:
        >>> looks_like_deepspeed(Path("checkpoint-500"))  # doctest: +SKIP
        True
    """
    return (folder / LATEST).is_file() or _is_step_folder(folder)


def find_deepspeed(folder: Path) -> tuple[Path, Path] | None:
    """``(step folder, run folder)`` of a DeepSpeed checkpoint: ``latest`` is followed, a step folder taken as is.

    Example:
        >>> find_deepspeed(Path("checkpoint-500"))  # doctest: +SKIP
        (PosixPath('checkpoint-500/global_step500'), PosixPath('checkpoint-500'))
    """
    latest = folder / LATEST
    if latest.is_file():
        try:
            tag = latest.read_text(encoding="utf-8", errors="replace").strip()
        except OSError as exc:
            raise read_error(exc, latest, "DeepSpeed 'latest' file") from None
        if not tag or Path(tag).name != tag or tag in (".", ".."):
            raise CorruptFileError(f"names {quoted(tag)}, not a checkpoint folder beside it", path=latest)
        step = folder / tag
        if not step.is_dir():
            raise CorruptFileError(f"names {quoted(tag)}, which is missing", path=latest)
        return step, folder
    if _is_step_folder(folder):
        return folder, folder.parent
    return None


def _natural(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


@dataclass
class _Files:
    optim: list[Path]  # rank order
    model: list[Path]  # mp_rank_00_model_states.pt, or every rank's zero_pp_rank_R_mp_rank_00_model_states.pt


def _files(step: Path) -> _Files:
    names = sorted((p.name for p in step.iterdir() if p.is_file()), key=_natural)
    if any(_LAYER.match(n) for n in names):
        raise UnsupportedError(
            "this is a pipeline-parallel checkpoint (layer_* files); tiesafe gathers data-parallel ZeRO "
            "checkpoints only: convert it with DeepSpeed's ds_to_universal.py first",
            path=step,
        )
    mp_ranks = {int(m.group(2)) for n in names if (m := _OPTIM.match(n) or _ZERO3_MODEL.match(n))}
    mp_ranks |= {int(m.group(1)) for n in names if (m := _MODEL.match(n))}
    if mp_ranks - {0}:
        raise UnsupportedError(
            f"this is a tensor-parallel checkpoint (mp_rank_{max(mp_ranks):02d} files); tiesafe gathers "
            "data-parallel ZeRO checkpoints only: convert it with DeepSpeed's ds_to_universal.py first",
            path=step,
        )
    optim = {int(m.group(1)): step / n for n in names if (m := _OPTIM.match(n))}
    if not optim:
        raise CorruptFileError("no *_optim_states.pt files: not a ZeRO checkpoint (or an incomplete one)", path=step)
    for rank in range(max(optim) + 1):
        if rank not in optim:
            raise CorruptFileError(
                f"the optimizer states of rank {rank} are missing (zero_pp_rank_{rank}_...)", path=step
            )
    zero3 = {int(m.group(1)): step / n for n in names if (m := _ZERO3_MODEL.match(n))}
    model = [zero3[r] for r in sorted(zero3)] if zero3 else [step / n for n in names if _MODEL.match(n)]
    if not model:
        raise CorruptFileError("no *_model_states.pt file: the parameter shapes are missing", path=step)
    return _Files([optim[r] for r in sorted(optim)], model)


# --------------------------------------------------------------------------- reading one file


@dataclass
class _Tree:
    path: Path
    obj: Any
    records: dict[str, StorageRecord]
    stamp: tuple[int, ...]


def _read_tree(path: Path) -> _Tree:
    """A torch.save file's whole object tree, storages as records (no tensor data read).

    DeepSpeed's files name its own classes (``ZeroStageEnum``, ``LossScaler``,
    ``fragment_address``): the restricted unpickler makes them inert objects, never imported.
    """
    tree = read_tree(path)
    return _Tree(tree.path, tree.root, tree.records, tree.stamp)


def _entry(tree: _Tree, obj: Any, key: str, kind: type | tuple[type, ...], *, optional: bool = False) -> Any:
    value = obj.get(key) if isinstance(obj, dict) else None
    if value is None and optional:
        return None
    if not isinstance(value, kind):
        raise CorruptFileError(
            f"entry {quoted(key)} is missing or malformed: not a DeepSpeed ZeRO checkpoint", path=tree.path
        )
    return value


def _tensor(tree: _Tree, value: object, what: str) -> tuple[TensorRef, StorageRecord]:
    if not isinstance(value, TensorNode) or value.ref is None:
        raise CorruptFileError(f"{what} is not a tensor", path=tree.path)
    ref = value.ref
    record = tree.records.get(ref.storage)
    if record is None or ref.span[1] > record.nbytes:
        raise CorruptFileError(f"{what} reaches past its storage", path=tree.path)
    return ref, record


def _flat_range(tree: _Tree, value: object, what: str) -> tuple[Path, int, int]:
    """``(path, file offset, elements)`` of a 1-D fp32 partition; refuses anything else."""
    ref, record = _tensor(tree, value, what)
    if ref.dtype != F32 or len(ref.shape) != 1 or not ref.is_contiguous:
        raise CorruptFileError(
            f"{what} is {ref.dtype.code}{list(ref.shape)}, not a flat fp32 partition", path=tree.path
        )
    return tree.path, record.offset + ref.span[0], ref.numel


def _shape(tree: _Tree, value: object, name: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(type(v) is int and v >= 0 for v in value):
        raise CorruptFileError(f"the shape of {quoted(name)} is malformed: {quoted(value)}", path=tree.path)
    return value


def _shapes(tree: _Tree, value: object, what: str) -> dict[str, tuple[int, ...]]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise CorruptFileError(f"{what} is not a mapping of names to shapes", path=tree.path)
    return {name: _shape(tree, shape, name) for name, shape in value.items()}


# --------------------------------------------------------------------------- the gather


class _Builder:
    """Names -> tensor refs and storage key -> records, as the gather goes."""

    def __init__(self) -> None:
        self.tensors: dict[str, TensorRef] = {}
        self.storages: dict[str, StorageRecord] = {}

    def file_tensor(self, name: str, tree: _Tree, value: object, *, as_f32: bool = False) -> None:
        ref, record = _tensor(tree, value, f"tensor {quoted(name)}")
        key = f"{tree.path.name}/{ref.storage}"
        if as_f32 and ref.dtype.code in ("F16", "BF16"):  # zero_to_fp32 returns floating buffers as fp32
            cast_key = f"{key}@F32"
            self.storages[cast_key] = StorageRecord(
                cast_key, record.path, record.offset, record.nbytes, "cpu", cast_from=ref.dtype
            )
            ref = TensorRef(cast_key, F32, ref.offset, ref.shape, ref.stride)
            self.tensors[name] = ref
            return
        self.storages.setdefault(key, StorageRecord(key, record.path, record.offset, record.nbytes, record.location))
        self.tensors[name] = TensorRef(key, ref.dtype, ref.offset, ref.shape, ref.stride)

    def pieced(
        self, name: str, key: str, dtype: Any, shape: tuple[int, ...], pieces: list[Piece], folder: Path
    ) -> None:
        nbytes = numel(shape) * dtype.itemsize
        self.storages[key] = StorageRecord(key, folder, 0, nbytes, "cpu", tuple(pieces))
        self.tensors[name] = TensorRef(key, dtype, 0, shape, contiguous_strides(shape))


def _rank_slice(ranges: list[tuple[Path, int, int]], start: int, count: int, itemsize: int, at: int) -> list[Piece]:
    """Pieces for elements ``[start, start + count)`` of a rank's flat groups laid end to end."""
    pieces = []
    base = 0
    for path, offset, elements in ranges:
        lo, hi = max(start, base), min(start + count, base + elements)
        if lo < hi:
            pieces.append(
                Piece(path, offset + (lo - base) * itemsize, (hi - lo) * itemsize, at + (lo - start) * itemsize)
            )
        base += elements
    return pieces


def _zero3_pieces(
    ranks: list[list[tuple[Path, int, int]]], offset: int, size: int, world: int, itemsize: int
) -> list[Piece]:
    """A stage-3 parameter of ``size`` elements at ``offset`` of every rank: the ranks' slices in order, cut to size."""
    part = math.ceil(size / world)
    pieces = []
    for rank, ranges in enumerate(ranks):
        take = min(part, size - rank * part)
        if take <= 0:
            break
        pieces += _rank_slice(ranges, offset, take, itemsize, rank * part * itemsize)
    return pieces


def _world_size(tree: _Tree, state: dict[Any, Any]) -> int:
    count = state.get("partition_count")
    if isinstance(count, list) and count and all(type(c) is int for c in count):
        return int(max(count))
    if type(count) is int and count > 0:
        return count
    raise CorruptFileError("partition_count is missing or malformed", path=tree.path)


def read_deepspeed(step: str | Path) -> Checkpoint:
    """The fp32 weights of a ZeRO checkpoint folder (``global_stepN``), as ``zero_to_fp32`` gathers them.

    Names come in ``zero_to_fp32``'s order: buffers, frozen parameters, trainable
    parameters, then the ``shared_params`` (each the same storage as its target: a tie).

    Example:
        >>> ckpt = read_deepspeed("checkpoint-500/global_step500")  # doctest: +SKIP
        >>> ckpt.format, ckpt.tensors["lm_head.weight"] == ckpt.tensors["model.embed_tokens.weight"]
        ('deepspeed-zero3', True)
    """
    step = Path(step)
    files = _files(step)
    optim = [_read_tree(p) for p in files.optim]
    states = []
    for tree in optim:
        state = _entry(tree, tree.obj, "optimizer_state_dict", dict)
        states.append(state)
    first = optim[0]
    zero3 = "fp32_flat_groups" in states[0]
    if not zero3 and "single_partition_of_fp32_groups" not in states[0]:
        raise CorruptFileError(
            "holds neither fp32_flat_groups nor single_partition_of_fp32_groups: not a ZeRO checkpoint", path=first.path
        )
    world = _world_size(first, states[0])
    if world != len(optim):
        raise CorruptFileError(
            f"the checkpoint was saved by {world} ranks but {len(optim)} *_optim_states.pt files are here "
            "(a rank's file is missing, or files of another run were mixed in)",
            path=step,
        )
    for tree, state in zip(optim[1:], states[1:], strict=True):
        if _world_size(tree, state) != world:
            raise CorruptFileError(
                f"saved by {_world_size(tree, state)} ranks, rank 0's file says {world}", path=tree.path
            )
    models = [_read_tree(p) for p in files.model]
    if zero3 and len(models) != world:
        raise CorruptFileError(
            f"{len(models)} *_model_states.pt files for {world} ranks (a rank's file is missing)", path=step
        )
    main = models[0]
    module = _entry(main, main.obj, "module", dict)
    buffer_names = _entry(main, main.obj, "buffer_names", list)
    param_shapes = _entry(main, main.obj, "param_shapes", list)
    groups_shapes = [_shapes(main, g, "param_shapes") for g in param_shapes]
    frozen_shapes = _shapes(
        main, _entry(main, main.obj, "frozen_param_shapes", dict, optional=True) or {}, "frozen_param_shapes"
    )
    shared = _entry(main, main.obj, "shared_params", dict, optional=True) or {}

    out = _Builder()
    notes: list[str] = []
    for name in module:
        if isinstance(name, str) and name in buffer_names:
            out.file_tensor(name, main, module[name], as_f32=True)
    if zero3:
        _zero3_frozen(out, models, frozen_shapes, world, step)
        _zero3_trainable(out, optim, states, groups_shapes, world, step)
    else:
        _zero2_frozen(out, main, frozen_shapes)
        notes += _zero2_unlisted_frozen(out, main, module, groups_shapes, frozen_shapes, shared)
        _zero2_trainable(out, optim, states, groups_shapes, world, step)
    for name, target in shared.items():
        if isinstance(name, str) and isinstance(target, str) and target in out.tensors:
            out.tensors[name] = out.tensors[target]
    stamps = {t.path: t.stamp for t in (*optim, *models)}
    kind = "deepspeed-zero3" if zero3 else "deepspeed-zero1/2"
    return Checkpoint(step, kind, out.tensors, out.storages, [], stamps=stamps, notes=notes)


def _zero2_frozen(out: _Builder, main: _Tree, shapes: dict[str, tuple[int, ...]]) -> None:
    fragments = _entry(main, main.obj, "frozen_param_fragments", dict, optional=True) or {}
    for name, shape in shapes.items():
        if name not in fragments:
            raise CorruptFileError(f"frozen parameter {quoted(name)} has no fragment", path=main.path)
        out.file_tensor(name, main, fragments[name])
        if out.tensors[name].shape != shape:
            raise CorruptFileError(
                f"frozen parameter {quoted(name)} is {list(out.tensors[name].shape)}, "
                f"frozen_param_shapes says {list(shape)}",
                path=main.path,
            )


def _zero2_unlisted_frozen(
    out: _Builder,
    main: _Tree,
    module: dict[Any, Any],
    groups_shapes: list[dict[str, tuple[int, ...]]],
    frozen_shapes: dict[str, tuple[int, ...]],
    shared: dict[Any, Any],
) -> list[str]:
    """Parameters of ``module`` that no list names: frozen ones of a checkpoint without ``frozen_param_shapes``.

    ZeRO stage 1 saves no ``frozen_param_shapes`` (``zero_to_fp32`` then drops the frozen
    parameters without a word); the engine's ``module`` state dict still holds them whole.
    """
    listed = {n for group in groups_shapes for n in group} | set(frozen_shapes) | set(out.tensors) | set(shared)
    found = []
    for name, value in module.items():
        listed_or_empty = not isinstance(value, TensorNode) or value.ref is None or not value.ref.numel
        if isinstance(name, str) and name not in listed and not listed_or_empty:
            out.file_tensor(name, main, value)
            found.append(name)
    if not found:
        return []
    shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
    return [
        f"{len(found)} frozen parameters ({shown}) taken from the saved module: the checkpoint lists no "
        "frozen_param_shapes (ZeRO stage 1), and zero_to_fp32 leaves them out"
    ]


def _zero3_frozen(
    out: _Builder, models: list[_Tree], shapes: dict[str, tuple[int, ...]], world: int, step: Path
) -> None:
    for name, shape in shapes.items():
        size = numel(shape)
        part = math.ceil(size / world)
        pieces, dtype = [], None
        for rank, tree in enumerate(models):
            fragments = _entry(tree, tree.obj, "frozen_param_fragments", dict)
            if name not in fragments:
                raise CorruptFileError(f"frozen parameter {quoted(name)} has no fragment", path=tree.path)
            ref, record = _tensor(tree, fragments[name], f"the fragment of {quoted(name)}")
            if (
                not ref.is_contiguous
                or ref.numel < min(part, max(0, size - rank * part))
                or (dtype and ref.dtype != dtype)
            ):
                raise CorruptFileError(
                    f"the fragment of frozen parameter {quoted(name)} is shorter than its shape says", path=tree.path
                )
            dtype = ref.dtype
            take = min(part, size - rank * part)
            if take > 0:
                pieces.append(
                    Piece(
                        tree.path,
                        record.offset + ref.span[0],
                        take * ref.dtype.itemsize,
                        rank * part * ref.dtype.itemsize,
                    )
                )
        assert dtype is not None
        out.pieced(name, f"frozen/{name}", dtype, shape, pieces, step)


def _groups(tree: _Tree, state: dict[Any, Any], key: str) -> list[tuple[Path, int, int]]:
    groups = _entry(tree, state, key, list)
    return [_flat_range(tree, g, f"{key}[{i}]") for i, g in enumerate(groups)]


def _zero2_trainable(
    out: _Builder,
    optim: list[_Tree],
    states: list[dict[Any, Any]],
    groups_shapes: list[dict[str, tuple[int, ...]]],
    world: int,
    step: Path,
) -> None:
    ranks = [_groups(t, s, "single_partition_of_fp32_groups") for t, s in zip(optim, states, strict=True)]
    if any(len(r) != len(groups_shapes) for r in ranks):
        raise CorruptFileError(
            f"{len(ranks[0])} parameter groups in the optimizer states, {len(groups_shapes)} in param_shapes", path=step
        )
    paddings = states[0].get("param_alignment_paddings")
    align = 2 * world
    for index, shapes in enumerate(groups_shapes):
        key = f"group{index}"
        pieces, at = [], 0
        for path, offset, elements in (r[index] for r in ranks):
            pieces.append(Piece(path, offset, elements * 4, at))
            at += elements * 4
        available = at // 4
        group_paddings = paddings[index] if isinstance(paddings, list) and index < len(paddings) else None
        if group_paddings is not None and (not isinstance(group_paddings, list) or len(group_paddings) != len(shapes)):
            raise CorruptFileError(
                f"param_alignment_paddings of group {index} do not match its parameters", path=optim[0].path
            )
        position = 0
        for j, (name, shape) in enumerate(shapes.items()):
            size = numel(shape)
            if position + size > available:
                raise CorruptFileError(
                    f"the partitions of group {index} hold {available} elements; parameter {quoted(name)} needs "
                    f"elements up to {position + size} (a partition is shorter than param_shapes says)",
                    path=step,
                )
            out.tensors[name] = TensorRef(key, F32, position, shape, contiguous_strides(shape))
            position += size
            if group_paddings is not None:
                pad = group_paddings[j]
                if type(pad) is not int or pad < 0:
                    raise CorruptFileError(
                        f"a parameter alignment padding is malformed: {quoted(pad)}", path=optim[0].path
                    )
                position += pad
        if align * math.ceil(position / align) != align * math.ceil(available / align):
            raise CorruptFileError(
                f"param_shapes of group {index} account for {position} elements, its partitions hold {available}",
                path=step,
            )
        out.storages[key] = StorageRecord(key, step, 0, available * 4, "cpu", tuple(pieces))


def _zero3_trainable(
    out: _Builder,
    optim: list[_Tree],
    states: list[dict[Any, Any]],
    groups_shapes: list[dict[str, tuple[int, ...]]],
    world: int,
    step: Path,
) -> None:
    ranks = [_groups(t, s, "fp32_flat_groups") for t, s in zip(optim, states, strict=True)]
    sizes = [e for _, _, e in ranks[0]]
    for tree, r in zip(optim[1:], ranks[1:], strict=True):
        if [e for _, _, e in r] != sizes:
            raise CorruptFileError(
                f"its flat groups hold {[e for _, _, e in r]} elements, rank 0's {sizes}", path=tree.path
            )
    per_rank = sum(sizes)
    shapes = {name: shape for group in groups_shapes for name, shape in group.items()}
    offset = 0
    for name, shape in shapes.items():
        size = numel(shape)
        part = math.ceil(size / world)
        if offset + part > per_rank:
            raise CorruptFileError(
                f"each rank's partition holds {per_rank} elements; parameter {quoted(name)} needs elements up to "
                f"{offset + part} (a partition is shorter than param_shapes says)",
                path=step,
            )
        out.pieced(name, f"param/{name}", F32, shape, _zero3_pieces(ranks, offset, size, world, 4), step)
        offset += part
    if offset != per_rank:
        raise CorruptFileError(
            f"param_shapes account for {offset} elements per rank, the partitions hold {per_rank}", path=step
        )
