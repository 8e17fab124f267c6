"""Save live tensors -- a state dict or an ``nn.Module`` -- to safetensors, ties kept.

The library front end of the pipeline that ``tiesafe convert`` runs on checkpoints.
Each live tensor is described the way the checkpoint reader describes a pickled one
(storage key, dtype, element offset, shape, stride), so the sharing analysis, the
layout, the tie record and the writer are the same ones, and the file is byte for
byte what ``tiesafe convert`` writes for ``torch.save`` of the same state dict.

Bytes stream from each tensor to the file in blocks (an accelerator tensor is copied
to the host one block at a time), so no second copy of the model is ever made.
Verification reads the written file back and compares every name with the live
tensor bit for bit, and checks every recorded tie against the tensors' addresses.
torch is imported lazily: ``import converter`` stays light for plain conversions.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeGuard, cast

from . import conventions, ties
from .convert import ConversionReport
from .descriptors import TensorRef
from .dtypes import BY_TORCH_NAME, DType
from .errors import TiesafeError, UnsupportedError, VerificationError
from .folder import parse_size, remove_stale_set
from .layout import SetPlan, StoredItem, TensorSource, plan_file, plan_shards
from .names import strip_prefixes
from .sharing import SharingPlan, plan_sharing
from .stfile import read_safetensors
from .verify import output_windows
from .windows import FileWindow, gather, read_exact
from .wrappers import unwrapped_names
from .writer import StagedWrites, pwrite_all

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_SHARD_SIZE = "5GB"  # what save_pretrained uses when writing into a folder
_BLOCK = 16 * 1024 * 1024  # bytes of one tensor staged on the host at a time
_VERIFY_BLOCK = 8 * 1024 * 1024  # bytes read back per comparison (two are alive at once)


def save_file(
    tensors: Mapping[str, torch.Tensor],
    filename: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
    *,
    verify: bool = True,
    materialize_views: bool = False,
    strip_prefix: Sequence[str] = (),
    keep_names: bool = False,
    parallel: bool = False,
) -> ConversionReport:
    """Save a state dict to one safetensors file, shared storage written once and tied.

    A drop-in for ``safetensors.torch.save_file`` (same arguments in the same order)
    that also takes what it refuses: aliases, views, overlapping slices, flat buffers,
    non-contiguous tensors. The file is, byte for byte, what ``tiesafe convert``
    writes for ``torch.save(tensors)``. With ``verify`` it is read back and compared
    bit for bit with the live tensors before it is renamed into place.

    Names: when every name carries ``torch.compile``'s ``_orig_mod.`` or DDP's
    ``module.``, it is removed (``report.prefixes_removed``); ``strip_prefix``
    removes other prefixes (Lightning's ``model.``); ``keep_names`` keeps every
    name as given. A rename that makes two names one is an error naming both.

    DTensors (FSDP2, tensor parallel): every rank calls ``save_file`` with its
    state dict; see ``save_model`` for the two modes (``parallel``).

    Example:
        >>> qkv = torch.randn(12, 4)
        >>> report = save_file({"qkv": qkv, "q": qkv[:4]}, "attn.safetensors")  # doctest: +SKIP
        >>> report.views, report.bytes_saved
        (['q'], 64)
    """
    started = time.perf_counter()
    dst = Path(filename)
    if dst.is_dir():
        raise TiesafeError("is a folder; give a file name (save_model writes into folders)", path=dst)
    live = {}
    for name, value in _items(tensors, dst):
        if not _is_tensor(value):
            raise TiesafeError(f"{name!r} is a {type(value).__name__}, not a tensor", path=dst)
        live[name] = value.detach()
    try:
        renamed, removed = strip_prefixes(list(live), strip_prefix, auto=not keep_names)
    except TiesafeError as exc:
        raise TiesafeError(exc.problem, path=dst) from None
    live = {renamed[name]: t for name, t in live.items()}
    options = _Options(metadata, verify, materialize_views, parallel)
    return _save(live, dst, None, options, "<state dict>", [], removed, started)


def save_model(
    model: torch.nn.Module,
    filename: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
    force_contiguous: bool = True,
    *,
    max_shard_size: int | str | None = None,
    verify: bool = True,
    materialize_views: bool = False,
    strip_prefix: Sequence[str] = (),
    keep_names: bool = False,
    parallel: bool = False,
) -> ConversionReport:
    """Save ``model.state_dict()`` with its ties: ``save_file`` for a module, or a sharded set.

    A drop-in for ``safetensors.torch.save_model`` (same arguments in the same order),
    except that no name is dropped: tied names are recorded in the header and
    ``converter.load_file`` gives them back sharing memory. ``force_contiguous`` is
    accepted for compatibility and changes nothing: stored tensors are always written
    row-major, and views keep their strides in the tie record.

    ``filename`` names the file; an existing folder gets ``model.safetensors`` inside.
    With ``max_shard_size`` (bytes, or ``"5GB"``, ``"500MB"``, ``"2GiB"``) or a folder,
    the output is what ``save_pretrained`` writes: one file when the tensors fit,
    else ``model-0000N-of-0000M.safetensors`` shards and ``model.safetensors.index.json``
    (older files of that set in the folder are removed). With ``max_shard_size`` a
    ``filename`` not ending in ``.safetensors`` is a folder (created if missing).
    Non-tensor entries of the state dict (extra state) are skipped and listed.

    Wrapped modules are saved under the names of the bare model: ``torch.compile``'s
    ``OptimizedModule`` (``_orig_mod.``, also on compiled submodules),
    ``DistributedDataParallel`` and ``DataParallel`` (``module.``) are unwrapped and
    the removed prefixes listed in ``report.prefixes_removed``; ``strip_prefix``
    removes other prefixes; ``keep_names`` keeps the state dict's names as they are.

    FSDP2 (``fully_shard``) and other DTensor models: every rank calls ``save_model``
    and one set of files appears, byte for byte what ``save_model`` writes for the
    same model unsharded. By default rank 0 writes: each tensor's pieces come to it
    one block at a time, are written and verified, so its memory stays flat. With
    ``parallel=True`` (``filename`` on a file system every rank sees) rank 0 writes
    the headers and every rank writes and verifies the pieces it holds, no gather.
    A failure on any rank makes every rank raise the same error; nothing is left.

    Example:
        >>> report = save_model(GPT2LMHeadModel(GPT2Config()), "gpt2", max_shard_size="200MB")  # doctest: +SKIP
        >>> report.output, report.aliases
        ('gpt2/model.safetensors.index.json', {'lm_head.weight': 'transformer.wte.weight'})
    """
    del force_contiguous  # every stored tensor is written contiguously anyway
    started = time.perf_counter()
    dst, limit = _output_target(Path(filename), max_shard_size)
    state = dict(_items(model.state_dict(), dst))
    try:
        bare, removed = ({n: n for n in state}, []) if keep_names else unwrapped_names(model, list(state))
        renamed, explicit = strip_prefixes(list(bare.values()), strip_prefix, auto=False)
    except TiesafeError as exc:
        raise TiesafeError(exc.problem, path=dst) from None
    live, skipped = {}, []
    for name, value in state.items():
        if _is_tensor(value):
            live[renamed[bare[name]]] = value.detach()
        else:
            skipped.append(renamed[bare[name]])
    options = _Options(metadata, verify, materialize_views, parallel)
    source = f"<{type(model).__name__}>"
    return _save(live, dst, limit, options, source, skipped, [*removed, *explicit], started)


# --------------------------------------------------------------------------- describing live tensors


def _is_tensor(value: object) -> TypeGuard[torch.Tensor]:
    import torch

    return isinstance(value, torch.Tensor)


def _items(tensors: Mapping[str, object], where: Path) -> Iterator[tuple[str, object]]:
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise TiesafeError(f"tensor names must be strings, not {type(name).__name__} ({name!r:.40})", path=where)
        yield name, value


def _unsupported(t: torch.Tensor, dtype: DType | None) -> str | None:
    """Why safetensors cannot hold ``t`` as plain bytes of its storage, or None."""
    import torch

    if t.is_nested:
        return "is a nested tensor; safetensors holds dense tensors only"
    if t.layout != torch.strided:
        return f"is {str(t.layout).removeprefix('torch.')}; safetensors holds dense tensors only (use .to_dense())"
    if dtype is None:
        return f"has dtype {str(t.dtype).removeprefix('torch.')}, which safetensors cannot hold"
    if t.is_conj() or t.is_neg():
        return "is a lazy conjugate/negative view; call .resolve_conj() / .resolve_neg() first"
    return None


def describe(
    live: Mapping[str, torch.Tensor], where: Path, given: Mapping[str, tuple[Hashable, TensorRef]]
) -> dict[str, TensorRef]:
    """Each tensor as the checkpoint reader would describe ``torch.save`` of it.

    Storages are keyed by identity and numbered in order of first appearance, as
    ``torch.save`` numbers them, so the analysis sees exactly what it sees for the
    pickle (and views of one storage in different dtypes stay apart, as there).
    ``given`` holds the identity and geometry of tensors described elsewhere
    (DTensors: their global geometry); their storage keys are numbered here too.
    """
    meta = [name for name, t in live.items() if t.device.type == "meta"]
    if meta:
        shown = ", ".join(repr(n) for n in meta[:5]) + (f" and {len(meta) - 5} more" if len(meta) > 5 else "")
        raise UnsupportedError(
            f"tensors on the meta device have no data to save: {shown}; load or initialise their weights first",
            path=where,
        )
    keys: dict[Hashable, str] = {}
    refs: dict[str, TensorRef] = {}
    for name, t in live.items():
        if name in given:
            identity, ref = given[name]
            refs[name] = replace(ref, storage=keys.setdefault(identity, str(len(keys))))
            continue
        dtype = BY_TORCH_NAME.get(str(t.dtype).removeprefix("torch."))
        problem = _unsupported(t, dtype)
        if problem is not None or dtype is None:
            raise UnsupportedError(f"tensor {name!r} {problem}", path=where)
        try:
            identity = int(t.untyped_storage()._cdata)
        except (RuntimeError, NotImplementedError, AttributeError) as exc:
            raise UnsupportedError(
                f"tensor {name!r} ({type(t).__name__}) has no storage to read: {str(exc)[:120]}", path=where
            ) from None
        storage = keys.setdefault(identity, str(len(keys)))
        refs[name] = TensorRef(storage, dtype, int(t.storage_offset()), tuple(t.shape), tuple(t.stride()))
    return refs


# --------------------------------------------------------------------------- bytes of live tensors


def _host_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without copying them."""
    import torch

    return memoryview(cast(bytes, t.reshape(-1).view(torch.uint8).numpy()))


def _byte_blocks(t: torch.Tensor, limit: int | None = None) -> Iterator[memoryview]:
    """The row-major bytes of ``t`` in blocks of at most ``limit`` bytes (or one element).

    A contiguous CPU tensor is read in place; anything else (strided, or on an
    accelerator) is copied to the host one block of rows at a time, so memory
    stays bounded by ``limit`` whatever the tensor's size.
    """
    limit = limit or _BLOCK
    if t.numel() == 0:
        return
    if t.device.type == "cpu" and t.is_contiguous():
        raw = _host_bytes(t)
        for start in range(0, len(raw), limit):
            yield raw[start : start + limit]
        return
    if t.dim() == 0 or t.numel() * t.element_size() <= limit:
        yield _host_bytes(t.contiguous().cpu())
        return
    row = t[0].numel() * t.element_size()
    if row > limit:
        for i in range(t.shape[0]):
            yield from _byte_blocks(t[i], limit)
    else:
        step = limit // row
        for i in range(0, t.shape[0], step):
            yield from _byte_blocks(t[i : i + step], limit)


@dataclass(frozen=True, eq=False)
class _LiveSource:
    """A stored tensor that writes its own bytes (layout.TensorSource)."""

    tensor: torch.Tensor

    def write_into(self, fd: int, offset: int) -> None:
        for block in _byte_blocks(self.tensor):
            pwrite_all(fd, block, offset)
            offset += len(block)
            del block  # a staged copy is freed before the next one is made


def _stored_items(
    live: Mapping[str, torch.Tensor],
    refs: dict[str, TensorRef],
    sharing: SharingPlan,
    sources: Mapping[str, TensorSource],
) -> list[StoredItem]:
    items = []
    for s in sharing.stored:
        if s.name in sources:
            items.append(StoredItem(s.name, s.ref.dtype, s.ref.shape, sources[s.name]))
            continue
        if s.reserved:
            # A span covering overlapping tensors: a window on their storage, in their dtype.
            anchor = next(live[n] for n, r in refs.items() if r.storage == s.ref.storage and r.dtype == s.ref.dtype)
            tensor = anchor.as_strided(s.ref.shape, s.ref.stride, s.ref.offset)
        else:
            tensor = live[s.name]
        items.append(StoredItem(s.name, s.ref.dtype, s.ref.shape, _LiveSource(tensor)))
    return items


# --------------------------------------------------------------------------- verification


def _same_bytes(fd: int, window: FileWindow, t: torch.Tensor) -> bool:
    """Whether the window of the written file holds exactly the bytes of ``t``."""
    span = window.contiguous_range  # None for a strided view: gathered whole, as the converter does
    gathered = None if span is not None else gather(fd, window.storage_offset, window.ref)
    position = 0
    for block in _byte_blocks(t, _VERIFY_BLOCK):
        if gathered is not None:
            written: bytes | memoryview = gathered[position : position + len(block)]
        else:
            assert span is not None
            written = read_exact(fd, span[0] + position, len(block))
        if not same_bytes(written, block):
            return False
        position += len(block)
        del block, written  # freed before the next pair is made
    return position == window.ref.nbytes


def same_bytes(written: bytes | memoryview, expected: memoryview) -> bool:
    """Byte equality by ``memcmp``.

    ``bytes != memoryview`` compares item by item (about 100 MB/s here);
    ``bytes.startswith`` of an equal-length buffer is one ``memcmp`` (GB/s).
    """
    if len(written) != len(expected):
        return False
    return (written if isinstance(written, bytes) else bytes(written)).startswith(expected)


def _storage_ptr(t: torch.Tensor) -> int:
    return int(t.untyped_storage().data_ptr())


def _check_ties_hold(live: Mapping[str, torch.Tensor], record: ties.TieRecord) -> None:
    """Every recorded tie is true of the live tensors, checked on their memory addresses.

    This does not trust the storage keys the analysis grouped by: an alias must
    start at its target's address with its geometry; a view must lie in its base's
    storage at the recorded element offset (for a hidden span, relative to the
    other views of that span).
    """
    recorded = {
        name: ties.View(target, 0, tuple(live[target].shape), tuple(live[target].stride()), "")
        for name, target in record.aliases.items()
        if target in live
    }
    recorded.update(record.views)
    anchors: dict[str, tuple[torch.Tensor, int]] = {}  # hidden base -> (a view on it, its offset)
    for name, view in recorded.items():
        t = live[name]
        anchor, anchor_offset = (
            (live[view.base], 0) if view.base in live else anchors.setdefault(view.base, (t, view.offset))
        )
        expected = anchor.data_ptr() + (view.offset - anchor_offset) * t.element_size()
        if (
            t.device != anchor.device
            or t.dtype != anchor.dtype
            or _storage_ptr(t) != _storage_ptr(anchor)
            or t.data_ptr() != expected
            or (tuple(t.shape), tuple(t.stride())) != (view.shape, view.stride)
        ):
            raise VerificationError(
                f"{name!r} is recorded as tied to {view.base!r}, but its memory is not where the record says"
            )
    stray = set(record.aliases) - set(recorded)
    if stray:
        raise VerificationError(f"alias {sorted(stray)[0]!r} points to a name that is no tensor of the source")


class Verifier:
    """Checks each written file (on its temporary name), then the set as a whole.

    The bytes of names in ``elsewhere`` are compared by whoever writes them (the
    pieces of a DTensor, on the rank that holds them); their place in the header
    and their ties are checked here like any other name.
    """

    def __init__(
        self,
        live: Mapping[str, torch.Tensor],
        refs: dict[str, TensorRef],
        planned: ties.TieRecord,
        elsewhere: frozenset[str] = frozenset(),
    ) -> None:
        self._live, self._refs, self._planned, self._elsewhere = live, refs, planned, elsewhere
        self._records: list[ties.TieRecord] = []
        self._seen: set[str] = set()

    def __call__(self, tmp: Path) -> None:
        windows, record = output_windows([read_safetensors(tmp)])
        self._records.append(record)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            for name, window in windows.items():
                ref = self._refs.get(name)
                if ref is None:
                    raise VerificationError(f"output has a tensor the source lacks: {name!r}")
                if name in self._seen:
                    raise VerificationError(f"tensor {name!r} is written more than once")
                self._seen.add(name)
                if (window.ref.dtype, window.ref.shape) != (ref.dtype, ref.shape):
                    raise VerificationError(
                        f"tensor {name!r} is {window.ref.dtype.code}{list(window.ref.shape)} in the output "
                        f"but {ref.dtype.code}{list(ref.shape)} in memory"
                    )
                # An alias reads its target's bytes, compared under the target's name; that
                # it is the same memory is proven on addresses in finish().
                checked = name in record.aliases or name in self._elsewhere
                if not checked and not _same_bytes(fd, window, self._live[name]):
                    raise VerificationError(f"tensor {name!r} differs from the tensor in memory")
        finally:
            os.close(fd)

    def finish(self) -> None:
        record = ties.merge(self._records)
        planned = self._planned
        if (record.aliases, record.views, record.copies) != (planned.aliases, planned.views, planned.copies):
            raise VerificationError("the tie record read back differs from the one planned")
        missing = [name for name in self._live if name not in self._seen]
        if missing:
            raise VerificationError(f"tensor {missing[0]!r} is missing from the output")
        _check_ties_hold(self._live, record)


# --------------------------------------------------------------------------- output


def _output_target(path: Path, max_shard_size: int | str | None) -> tuple[Path, int | None]:
    """The single-file path of the output, and the shard size limit (None: one file, no index)."""
    if path.is_dir() or (max_shard_size is not None and path.suffix != ".safetensors"):
        return path / conventions.safetensors_name("model"), parse_size(
            DEFAULT_MAX_SHARD_SIZE if max_shard_size is None else max_shard_size
        )
    return path, None if max_shard_size is None else parse_size(max_shard_size)


def _stem(dst: Path) -> str:
    return dst.name.removesuffix(".safetensors")


@dataclass(frozen=True)
class _Options:
    metadata: dict[str, str] | None
    verify: bool
    materialize_views: bool
    parallel: bool


@dataclass
class Prepared:
    """What to write for a state dict: descriptors, sharing, the planned files and the output path."""

    refs: dict[str, TensorRef]
    sharing: SharingPlan
    outputs: SetPlan
    output: Path  # the file, or the index of a sharded set


def prepare(
    live: Mapping[str, torch.Tensor],
    dst: Path,
    limit: int | None,
    metadata: dict[str, str] | None,
    materialize_views: bool,
    refs: dict[str, TensorRef],
    sources: Mapping[str, TensorSource],
) -> Prepared:
    """Plan the output of described tensors; ``sources`` gives the bytes of names not in ``live`` as plain tensors."""
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TiesafeError("metadata must map strings to strings", path=dst)
    sharing = plan_sharing(refs, materialize_views=materialize_views)
    items = _stored_items(live, refs, sharing, sources)
    stem = _stem(dst)
    if limit is None or not items:
        outputs = SetPlan({dst.name: plan_file(items, sharing.ties, metadata=metadata)}, None)
    else:
        outputs = plan_shards(items, sharing.ties, max_shard_size=limit, metadata=metadata, stem=stem)
    output = dst if outputs.index is None else dst.with_name(f"{stem}.safetensors.index.json")
    return Prepared(refs, sharing, outputs, output)


def report(
    prepared: Prepared, source: str, skipped: list[str], removed: list[str], verify: bool, started: float
) -> ConversionReport:
    sharing, outputs = prepared.sharing, prepared.outputs
    return ConversionReport(
        source=source,
        output=str(prepared.output),
        tensors=len(prepared.refs),
        stored=len(sharing.stored),
        aliases=dict(sharing.ties.aliases),
        views=sorted(sharing.ties.views),
        materialized=list(sharing.materialized),
        groups=list(sharing.groups),
        skipped=skipped,
        bytes_all_names=sum(r.nbytes for r in prepared.refs.values()),
        bytes_written=outputs.data_size,
        file_size=sum(p.file_size for p in outputs.files.values()),
        verified=verify,
        seconds=time.perf_counter() - started,
        prefixes_removed=removed,
    )


def _dtensor_names(live: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of DTensors; torch.distributed.tensor is never imported here (no DTensor exists without it)."""
    module = sys.modules.get("torch.distributed.tensor")
    if module is None:
        return []
    return [name for name, t in live.items() if isinstance(t, module.DTensor)]


def _save(
    live: dict[str, torch.Tensor],
    dst: Path,
    limit: int | None,
    options: _Options,
    source: str,
    skipped: list[str],
    removed: list[str],
    started: float,
) -> ConversionReport:
    distributed = _dtensor_names(live)
    if distributed:
        from .collective import save_collective

        return save_collective(live, set(distributed), dst, limit, options, source, skipped, removed, started)
    prepared = prepare(
        live, dst, limit, options.metadata, options.materialize_views, describe(live, dst, {}), sources={}
    )
    outputs, output = prepared.outputs, prepared.output
    check = Verifier(live, prepared.refs, prepared.sharing.ties) if options.verify else None
    try:
        with StagedWrites() as staged:
            for name, plan in outputs.files.items():
                staged.write_plan(plan, dst.parent / name, check)
            if outputs.index is not None:
                staged.write_bytes(outputs.index_json(), output)  # staged last: renamed last
            if check is not None:
                check.finish()
    except TiesafeError as exc:
        raise type(exc)(exc.problem, path=output) from None
    if limit is not None:
        remove_stale_set(dst.parent, _stem(dst), {*outputs.files, output.name})
    return report(prepared, source, skipped, removed, options.verify, started)
