"""Convert one checkpoint file, and inspect one file: the public operations.

Each function strings the pipeline together (read -> analyse -> plan -> write ->
verify) and returns a plain report dataclass; the CLI only renders it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, overload

from .conventions import WEIGHT_SUFFIXES, converted_name
from .descriptors import Checkpoint
from .dtypes import DType
from .errors import TiesafeError
from .flat_convert import FlatPlan, verify_as_planned, verify_flat, write_flat
from .gcpause import paused_gc
from .geometry import numel
from .layout import plan_file, stored_items
from .readers.flat_file import FlatFile, NotFlat, read_flat_file
from .readers.name_column import names_in_order
from .readers.torchfile import checkpoint_from_tree, read_checkpoint, read_tree
from .readers.unpickler import GROUPS
from .reports import SavedBytesReport
from .sharing import SharedGroup, SharingPlan, plan_sharing
from .stcolumns import read_header_columns
from .stfile import read_safetensors
from .ties import TieRecord
from .verify import VerifyReport, output_record, verify_output
from .writer import WriteProgress, write_file

PICKLE_SUFFIXES = WEIGHT_SUFFIXES


@dataclass
class ConversionReport(SavedBytesReport):
    """What one conversion did: names, ties, bytes, verification."""

    source: str
    output: str
    tensors: int  # names in the source
    stored: int  # tensors with bytes of their own in the output
    aliases: dict[str, str]
    views: list[str]  # names only tiesafe restores (plain loaders do not see them)
    materialized: list[str]
    groups: list[SharedGroup]
    skipped: list[str]  # non-tensor entries of the checkpoint
    bytes_all_names: int  # what writing every name separately would take
    bytes_written: int  # tensor data in the output
    file_size: int
    verified: bool
    seconds: float = 0.0
    wrapper: str | None = None  # the entry the weights were read from ("model", "state_dict", ...)
    prefixes_removed: list[str] = field(default_factory=list)  # e.g. "'_orig_mod.' (torch.compile)"


def default_output(src: Path) -> Path:
    """The name the file's library loads (conventions table): ``pytorch_model.fp16.bin`` ->
    ``model.fp16.safetensors``, ``open_clip_pytorch_model.bin`` -> ``open_clip_model.safetensors``,
    ``x.pt`` -> ``x.safetensors``.

    Example:
        >>> default_output(Path("run/pytorch_model-00001-of-00002.bin")).name
        'model-00001-of-00002.safetensors'
    """
    return src.with_name(converted_name(src.name))


def _report(
    ckpt: Checkpoint, sharing: SharingPlan, dst: Path, file_size: int, data_size: int, verified: bool
) -> ConversionReport:
    return ConversionReport(
        source=str(ckpt.path),
        output=str(dst),
        tensors=len(ckpt.tensors),
        stored=len(sharing.stored),
        aliases=dict(sharing.ties.aliases),
        views=sorted(sharing.ties.views),
        materialized=list(sharing.materialized),
        groups=list(sharing.groups),
        skipped=list(ckpt.skipped),
        bytes_all_names=sum(t.nbytes for t in ckpt.tensors.values()),
        bytes_written=data_size,
        file_size=file_size,
        verified=verified,
        wrapper=ckpt.wrapper,
        prefixes_removed=list(ckpt.prefixes_removed),
    )


def _resolve_output(src: Path, dst: str | Path | None, overwrite: bool) -> Path:
    out = default_output(src) if dst is None else Path(dst)
    if out.is_dir():
        out = out / default_output(src).name
    if out.resolve() == src.resolve():
        raise TiesafeError("output would replace the source; choose another output path", path=src)
    if out.exists() and not overwrite:
        raise TiesafeError("output exists already; pass --overwrite to replace it", path=out)
    if out.suffix != ".safetensors":
        raise TiesafeError("output name must end in .safetensors", path=out)
    return out


def convert_file(
    src: str | Path,
    dst: str | Path | None = None,
    *,
    verify: bool = True,
    materialize_views: bool = False,
    key: str | None = None,
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
    strict: bool = False,
    strip_prefix: Sequence[str] = (),
    keep_names: bool = False,
) -> ConversionReport:
    """Convert one torch checkpoint to a deduplicated safetensors file with ties.

    No code from ``src`` runs. Shared storage is written once and recorded in the
    header; by default the output is verified bit for bit before it is renamed
    into place, so a failure leaves nothing behind.

    In a training checkpoint the weights are the largest state dict (``key`` names
    one); foreign objects beside them (arguments, configs, numpy values) are read as
    inert placeholders and listed in ``skipped`` — ``strict`` refuses them instead.
    A ``_orig_mod.``/``module.`` prefix on every name is removed unless
    ``keep_names``; ``strip_prefix`` removes others (Lightning's ``"model."``).

    Example:
        >>> report = convert_file("gpt2/pytorch_model.bin")  # doctest: +SKIP
        >>> report.output, report.aliases
        ('gpt2/model.safetensors', {'lm_head.weight': 'transformer.wte.weight'})
    """
    started = time.perf_counter()
    src = Path(src)
    if key is None:
        with paused_gc():  # a list entry or two per tensor, no cycles
            # Its local headers are read as the copy reaches them: one pass over the file, in order.
            flat = read_flat_file(src, strip_prefix=strip_prefix, keep_names=keep_names, read_starts=False)
            if flat is not None:  # the common shape, at mixture-of-experts scale: no objects per tensor
                out = _resolve_output(src, dst, overwrite)
                with contextlib.suppress(NotFlat):  # not flat after all: the general path's verdict
                    report = _convert_flat(flat, out, verify=verify, metadata=metadata)
                    report.seconds = time.perf_counter() - started
                    return report

    def check(tmp: Path, progress: WriteProgress) -> None:
        verify_output(ckpt, [read_safetensors(tmp)], sharing.ties, wait=progress.wait)
        ckpt.check_unchanged()  # the bytes just verified are those of the file that was read

    with paused_gc():  # per-tensor bookkeeping of a large checkpoint: see gcpause
        ckpt = read_checkpoint(src, key=key, strict=strict, strip_prefix=strip_prefix, keep_names=keep_names)
        out = _resolve_output(src, dst, overwrite)
        sharing = plan_sharing(ckpt.tensors, materialize_views=materialize_views)
        plan = plan_file(stored_items(ckpt, sharing), sharing.ties, metadata=metadata)
        try:
            write_file(plan, out, check=check if verify else None)
        except TiesafeError as exc:
            raise type(exc)(exc.problem, path=out) from None
    report = _report(ckpt, sharing, out, plan.file_size, plan.data_size, verify)
    report.seconds = time.perf_counter() - started
    return report


def _convert_flat(flat: FlatFile, out: Path, *, verify: bool, metadata: dict[str, str] | None) -> ConversionReport:
    """:func:`convert_file` for a flat checkpoint of unshared tensors: the same output, as columns."""
    plan = FlatPlan(flat, metadata)
    write_flat(flat, plan, out, verify=verify)
    return ConversionReport(
        source=str(flat.path),
        output=str(out),
        tensors=len(flat),
        stored=len(flat),
        aliases={},
        views=[],
        materialized=[],
        groups=[],
        skipped=[],
        bytes_all_names=sum(flat.nbytes),
        bytes_written=plan.data_size,
        file_size=plan.file_size,
        verified=verify,
        prefixes_removed=list(flat.prefixes_removed),
    )


def verify_file(
    src: str | Path,
    dst: str | Path,
    *,
    materialize_views: bool | None = None,
    key: str | None = None,
    strict: bool = False,
    strip_prefix: Sequence[str] = (),
    keep_names: bool = False,
) -> VerifyReport:
    """Check that ``dst`` reproduces every tensor of checkpoint ``src``, ties included.

    ``materialize_views`` is detected from ``dst`` when not given; the other options
    read ``src`` as :func:`convert_file` does.

    Example:
        >>> verify_file("pytorch_model.bin", "model.safetensors").names  # doctest: +SKIP
        149
    """
    with paused_gc():  # per-tensor bookkeeping of a large checkpoint: see gcpause
        flat = read_flat_file(src, strip_prefix=strip_prefix, keep_names=keep_names) if key is None else None
        if flat is not None:  # no sharing in the source: nothing to detect about views
            compared = verify_as_planned(flat, Path(dst))  # tiesafe's own layout, read as it goes
            if compared is None:
                compared = verify_flat(flat, read_safetensors(dst))
            return VerifyReport(len(flat), compared, 0)
        ckpt = read_checkpoint(src, key=key, strict=strict, strip_prefix=strip_prefix, keep_names=keep_names)
        out = read_safetensors(dst)
        sharing = plan_sharing(ckpt.tensors, materialize_views=bool(materialize_views))
        if materialize_views is None and sharing.ties.views and not output_record([out]).views:
            sharing = plan_sharing(ckpt.tensors, materialize_views=True)  # the output was written so
        return verify_output(ckpt, [out], sharing.ties)


@dataclass(slots=True)  # one per name: 100,000 in a mixture-of-experts file
class TensorInfo:
    name: str
    dtype: str
    shape: list[int]
    nbytes: int
    stored_as: str  # "stored", "alias of X", "view of X", "copy of X"


@dataclass
class InspectReport:
    """The tensors of a file, their ties and their bytes."""

    path: str
    format: str  # "safetensors", "zip" or "legacy"
    tensors: Sequence[TensorInfo]  # a list, or rows made as they are read (a flat checkpoint's)
    groups: list[SharedGroup] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_all_names: int = 0
    bytes_stored: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    wrapper: str | None = None
    prefixes_removed: list[str] = field(default_factory=list)
    # The globals a pickle names, by group: tensor machinery, inert, refused (convert refuses the file).
    globals: dict[str, list[str]] = field(default_factory=dict)

    @property
    def bytes_saved(self) -> int:
        return self.bytes_all_names - self.bytes_stored

    def to_dict(self) -> dict[str, Any]:
        data = asdict(replace(self, tensors=[]))  # asdict deep-copies: slow over 100,000 tensors
        data["tensors"] = [
            {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes, "stored_as": t.stored_as}
            for t in self.tensors
        ]
        data["bytes_saved"] = self.bytes_saved
        return data


def _how_stored(name: str, record: TieRecord) -> str:
    if name in record.aliases:
        return f"alias of {record.aliases[name]}"
    if name in record.views:
        return f"view of {record.views[name].base}"
    if name in record.copies:
        return f"copy of {record.copies[name]}"
    return "stored"


def inspect(
    path: str | Path,
    *,
    key: str | None = None,
    strip_prefix: Sequence[str] = (),
    keep_names: bool = False,
) -> InspectReport:
    """Describe a ``.bin``/``.pt`` checkpoint or a ``.safetensors`` file.

    For a checkpoint: every tensor and how tiesafe would store it, what is not
    converted, and the globals its pickle names in three groups (tensor machinery,
    inert, refused). A file naming a refused global is still described — nothing of
    it runs — so that the report can show why ``convert`` refuses it. For a
    safetensors file: every name it gives (stored and tied) as the loader sees it.

    Example:
        >>> [t.stored_as for t in inspect("model.safetensors").tensors][-1]  # doctest: +SKIP
        'alias of transformer.wte.weight'
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        with paused_gc():  # a row per tensor, no cycles
            return _inspect_safetensors(path)
    with paused_gc():  # a list entry or two per tensor, then a row each: no cycles
        flat = read_flat_file(path, strip_prefix=strip_prefix, keep_names=keep_names) if key is None else None
        if flat is not None:
            return _inspect_flat(flat)
    tree = read_tree(path, survey=True)
    globals_by_group = _globals_by_group(tree.globals)
    if globals_by_group.get(GROUPS[2]):
        return InspectReport(str(path), tree.format, [], globals=globals_by_group)
    ckpt = checkpoint_from_tree(tree, key=key, strip_prefix=strip_prefix, keep_names=keep_names)
    sharing = plan_sharing(ckpt.tensors)
    tensors = [
        TensorInfo(n, r.dtype.code, list(r.shape), r.nbytes, _how_stored(n, sharing.ties))
        for n, r in ckpt.tensors.items()
    ]
    return InspectReport(
        str(path),
        ckpt.format,
        tensors,
        groups=list(sharing.groups),
        skipped=list(ckpt.skipped),
        bytes_all_names=sum(t.nbytes for t in tensors),
        bytes_stored=sum(s.ref.nbytes for s in sharing.stored),
        wrapper=ckpt.wrapper,
        prefixes_removed=list(ckpt.prefixes_removed),
        globals=globals_by_group,
    )


class _StoredRows(Sequence[TensorInfo]):
    """Columns (names, dtypes, shapes, sizes) as :class:`TensorInfo` rows of stored tensors, in
    ``order``, each made as it is read: 100,000 of them held at once would take 25 MB, where
    a listing reads them once."""

    def __init__(
        self,
        names: Sequence[str],
        dtypes: Sequence[DType],
        shapes: Sequence[tuple[int, ...]],
        nbytes: Sequence[int],
        order: Sequence[int],
    ) -> None:
        self._columns = names, dtypes, shapes, nbytes
        self._order = order

    def __len__(self) -> int:
        return len(self._order)

    @overload
    def __getitem__(self, index: int) -> TensorInfo: ...

    @overload
    def __getitem__(self, index: slice) -> list[TensorInfo]: ...

    def __getitem__(self, index: int | slice) -> TensorInfo | list[TensorInfo]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        names, dtypes, shapes, nbytes = self._columns
        row = self._order[index]
        return TensorInfo(names[row], dtypes[row].code, list(shapes[row]), nbytes[row], "stored")

    def __iter__(self) -> Iterator[TensorInfo]:
        names, dtypes, shapes, nbytes = self._columns
        for row, name in zip(self._order, names_in_order(names, self._order), strict=True):
            yield TensorInfo(name, dtypes[row].code, list(shapes[row]), nbytes[row], "stored")


def _inspect_flat(flat: FlatFile) -> InspectReport:
    """A flat checkpoint of unshared tensors: every tensor stored, nothing skipped."""
    total = sum(flat.nbytes)
    return InspectReport(
        str(flat.path),
        "zip",
        _StoredRows(flat.names, flat.dtypes, flat.shapes, flat.nbytes, range(len(flat))),
        bytes_all_names=total,
        bytes_stored=total,
        prefixes_removed=list(flat.prefixes_removed),
        globals=_globals_by_group(flat.globals),
    )


def _inspect_safetensors(path: Path) -> InspectReport:
    """Every name a safetensors file gives, stored and tied, as a loader sees them."""
    columns = read_header_columns(path)  # a file with no ties: read as columns, a block at a time
    if columns is not None:
        total = sum(columns.nbytes)
        rows = _StoredRows(columns.names, columns.dtypes, columns.shapes, columns.nbytes, columns.order)
        return InspectReport(
            str(path), "safetensors", rows, bytes_all_names=total, bytes_stored=total, metadata=columns.metadata
        )
    st = read_safetensors(path)
    info, record = st.entries, st.record
    hidden = set(record.hidden)
    tensors = [
        TensorInfo(e.name, e.dtype.code, list(e.shape), e.nbytes, "stored")
        for e in info.values()
        if not hidden or e.name not in hidden
    ]
    for name in record.names():
        target = record.aliases.get(name) or record.copies.get(name)
        if target is not None:
            e = info[target]
            tensors.append(TensorInfo(name, e.dtype.code, list(e.shape), e.nbytes, _how_stored(name, record)))
        else:
            v = record.views[name]
            size = numel(v.shape) * info[v.base].dtype.itemsize
            tensors.append(TensorInfo(name, v.dtype, list(v.shape), size, _how_stored(name, record)))
    return InspectReport(
        str(path),
        "safetensors",
        tensors,
        bytes_all_names=sum(t.nbytes for t in tensors),
        bytes_stored=sum(e.nbytes for e in info.values()),
        metadata=dict(st.metadata),
    )


def _globals_by_group(seen: dict[str, str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {group: [] for group in GROUPS}
    for name, group in seen.items():
        grouped[group].append(name)
    return {group: sorted(names) for group, names in grouped.items() if names}
