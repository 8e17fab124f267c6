"""Prove an output reproduces its source: every name, bit for bit, ties included.

The output is read back the way a loader reads it (header parsed and validated,
ties decoded by :mod:`converter.ties`), each source name is resolved through the
tie record to a window of the output, and its bytes are compared with the
source's bytes. Bytes, not values: NaN payloads and -0.0 count. Contiguous
windows are compared by streaming both files in large blocks (no tensors built);
a window already covered by a compared one is not read again, so a tied
embedding costs one pass.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import ties
from .descriptors import Checkpoint, TensorRef
from .errors import VerificationError
from .gcpause import paused_gc
from .geometry import contiguous_strides
from .sharing import overlap_clusters
from .stfile import SafetensorsFile
from .windows import FileWindow, PieceWindow, WindowComparer, source_window


@dataclass
class VerifyReport:
    """What verification compared."""

    names: int
    bytes_compared: int
    tied_names: int


def output_windows(files: Iterable[SafetensorsFile]) -> tuple[dict[str, FileWindow], ties.TieRecord]:
    """Resolve every name an output set gives (stored names and ties) to a window.

    Hidden spans are not names of the source and are left out.
    """
    files = list(files)
    stored: dict[str, FileWindow] = {}
    strides: dict[tuple[int, ...], tuple[int, ...]] = {}  # a mixture of experts repeats a few shapes
    with paused_gc():  # one window per tensor, no cycles
        for f in files:
            for entry in f.entries.values():
                if entry.name in stored:
                    raise VerificationError(f"tensor {entry.name!r} is stored in two files", path=f.path)
                stride = strides.get(entry.shape)
                if stride is None:
                    stride = strides[entry.shape] = contiguous_strides(entry.shape)
                stored[entry.name] = FileWindow(
                    f.path, entry.start, TensorRef(entry.name, entry.dtype, 0, entry.shape, stride)
                )
    record = output_record(files)
    hidden = set(record.hidden)
    windows = {n: w for n, w in stored.items() if n not in hidden} if hidden else dict(stored)
    for name, target in (*record.aliases.items(), *record.copies.items()):
        windows[name] = stored[target]
    for name, view in record.views.items():
        base = stored[view.base]
        ref = TensorRef(view.base, base.ref.dtype, view.offset, view.shape, view.stride)
        windows[name] = FileWindow(base.path, base.storage_offset, ref)
    return windows, record


def output_record(files: Iterable[SafetensorsFile]) -> ties.TieRecord:
    """The tie record of an output set: its shards' records, validated and merged."""
    # Each shard's record was validated against that shard's own tensors when it was read.
    return ties.merge([f.record for f in files])


def verify_output(
    checkpoint: Checkpoint,
    files: list[SafetensorsFile],
    expected: ties.TieRecord,
    *,
    declared: Collection[str] = (),
    wait: Callable[[Path, int], None] | None = None,
) -> VerifyReport:
    """Check that ``files`` give every name of ``checkpoint`` bit for bit, tied as planned.

    ``declared`` names are tied across storages on purpose (ties a model's config
    declares, or copies of identical bytes): their bytes are still compared, but
    they are exempt from the check that output sharing mirrors source sharing.
    ``wait(path, end)``, when given, blocks until bytes ``[0, end)`` of an output
    file are written: verification then trails the writer (see ``WriteProgress``).

    Raises :class:`~converter.errors.VerificationError` naming the first difference.

    Example:
        >>> verify_output(ckpt, [read_safetensors("model.safetensors")], plan.ties)  # doctest: +SKIP
        VerifyReport(names=149, bytes_compared=995518464, tied_names=1)
    """
    where = files[0].path if len(files) == 1 else files[0].path.parent
    with paused_gc():  # a window, a pair and a batch entry per tensor: no cycles
        windows, record = output_windows(files)
        if record.aliases != expected.aliases or record.views != expected.views or record.copies != expected.copies:
            raise VerificationError("the tie record read back differs from the one planned", path=where)
        extra = windows.keys() - checkpoint.tensors.keys()
        if extra:
            raise VerificationError(f"output has a tensor the source lacks: {sorted(extra)[0]!r}", path=where)
        _check_no_false_sharing(checkpoint, record, set(declared), where)
        # In output order: the writer's order (verification trails it), and neighbours in
        # both files, compared in batches.
        files_order = {f.path: i for i, f in enumerate(files)}
        pairs = list(_pairs(checkpoint, windows, where))
        if len(files) == 1:
            pairs.sort(key=_output_offset)  # no Path hashed per tensor
        else:
            pairs.sort(key=lambda p: (files_order[p[1].path], p[1].storage_offset))
        comparer = WindowComparer(wait)
        try:
            different = comparer.first_difference(pairs)
        finally:
            comparer.close()
    if different is not None:
        raise VerificationError(f"tensor {different!r} differs from the source", path=where)
    return VerifyReport(len(checkpoint.tensors), comparer.bytes_compared, len(record.names()))


def _output_offset(pair: tuple[str, FileWindow, FileWindow | PieceWindow]) -> int:
    return pair[1].storage_offset


def _pairs(
    checkpoint: Checkpoint, windows: dict[str, FileWindow], where: Path
) -> Iterator[tuple[str, FileWindow, FileWindow | PieceWindow]]:
    """Each source name with its output window and its source window, checked for dtype and shape."""
    storages = checkpoint.storages
    for name, ref in checkpoint.tensors.items():
        window = windows.get(name)
        if window is None:
            raise VerificationError(f"tensor {name!r} is missing from the output", path=where)
        out = window.ref
        # dtypes come from one table: identity first (a dataclass == is a Python call per tensor)
        if (out.dtype is not ref.dtype and out.dtype != ref.dtype) or out.shape != ref.shape:
            raise VerificationError(
                f"tensor {name!r} is {out.dtype.code}{list(out.shape)} in the output "
                f"but {ref.dtype.code}{list(ref.shape)} in the source",
                path=where,
            )
        yield name, window, source_window(storages[ref.storage], ref)


def _check_no_false_sharing(checkpoint: Checkpoint, record: ties.TieRecord, declared: set[str], where: Path) -> None:
    """Names that share bytes in the output must have shared bytes in the source."""
    aliases_of: dict[str, list[str]] = {}  # target -> the names aliasing it, in record order
    for name, target in record.aliases.items():
        aliases_of.setdefault(target, []).append(name)
    # Only the storages of the names the ties involve are clustered: a file of 100,000
    # tensors with a tied embedding needs the embedding's storage, not every storage.
    involved = {*record.aliases, *record.aliases.values(), *record.views}
    involved.update(view.base for view in record.views.values())
    storages = {checkpoint.tensors[n].storage for n in involved if n in checkpoint.tensors}
    if not storages:
        return
    cluster_of: dict[str, int] = {}
    by_storage: dict[str, list[str]] = {}
    for name, ref in checkpoint.tensors.items():
        if ref.storage in storages:
            by_storage.setdefault(ref.storage, []).append(name)
    number = 0  # a number per cluster (an id() of a freed list could come back for another)
    for names in by_storage.values():
        clusters = [names] if len(names) == 1 else overlap_clusters(names, checkpoint.tensors)
        for cluster in clusters:
            number += 1
            for name in cluster:
                cluster_of[name] = number
    for name, view in record.views.items():
        if name in declared:
            continue
        for other in [*aliases_of.get(view.base, ()), view.base]:
            if other in cluster_of and cluster_of[other] != cluster_of.get(name):
                raise VerificationError(
                    f"{name!r} shares bytes with {other!r} in the output but not in the source", path=where
                )
    for name, target in record.aliases.items():
        if name not in declared and target in cluster_of and cluster_of.get(name) != cluster_of[target]:
            raise VerificationError(f"{name!r} is tied to {target!r} in the output but not in the source", path=where)
