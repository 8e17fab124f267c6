"""Find which tensors share storage, and decide what is stored and what is a tie.

Pure functions on descriptors (:class:`~converter.descriptors.TensorRef`): no I/O, no
torch. Tensors of one storage whose byte spans overlap form a *cluster*; each
cluster is stored once and its other members become ties:

- an **alias** has exactly the geometry of the stored tensor (GPT-2's ``lm_head``);
- a **view** is a window inside it (``q`` inside a fused ``qkv``, ``w.t()``).

When no member of a cluster is a dense tensor covering the whole cluster (two
overlapping slices), the covering span is stored under a reserved name so that a
checkpoint name is never stored with bytes other than its own. Slices of one
storage that do not overlap (FSDP/DeepSpeed flat parameters) are independent
tensors and no tie is recorded.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from operator import itemgetter
from typing import NamedTuple

from .descriptors import TensorRef
from .ties import RESERVED_PREFIX, TieRecord, View


class StoredTensor(NamedTuple):
    """A tensor that gets its own bytes in the output, with its source geometry.

    A named tuple: one per stored tensor (tens of thousands in a mixture-of-experts
    file), built several times faster than a frozen dataclass.
    """

    name: str
    ref: TensorRef
    reserved: bool = False  # a span that is no tensor of the checkpoint


@dataclass(frozen=True)
class SharedGroup:
    """Names that share bytes, for the report."""

    kind: str  # "alias", "view", "overlap" or "disjoint"
    stored: str | None  # the name stored for the group (None for disjoint slices)
    names: tuple[str, ...]


@dataclass
class SharingPlan:
    """What to store, which names are ties, and what sharing was found."""

    stored: list[StoredTensor]
    ties: TieRecord
    groups: list[SharedGroup] = field(default_factory=list)
    materialized: list[str] = field(default_factory=list)  # views written as own tensors


def _geometry(ref: TensorRef) -> tuple[object, ...]:
    return (ref.dtype, ref.offset, ref.shape, ref.stride)


def overlap_clusters(names: list[str], tensors: dict[str, TensorRef]) -> list[list[str]]:
    """Split one storage's names into groups whose byte spans overlap (sweep line).

    Zero-size tensors touch no bytes and stand alone. Clusters and their members
    come back in checkpoint order.
    """
    order = {name: i for i, name in enumerate(names)}
    clusters: list[list[str]] = [[n] for n in names if not tensors[n].numel]
    touching = sorted((n for n in names if tensors[n].numel), key=lambda n: (tensors[n].span, order[n]))
    overlapping: list[list[str]] = []
    end = -1
    for name in touching:
        start, stop = tensors[name].span
        if overlapping and start < end:
            overlapping[-1].append(name)
            end = max(end, stop)
        else:
            overlapping.append([name])
            end = stop
    clusters += overlapping
    for cluster in clusters:
        cluster.sort(key=order.__getitem__)
    return sorted(clusters, key=lambda c: order[c[0]])


def _span_ref(members: list[TensorRef]) -> TensorRef:
    start = min(r.span[0] for r in members)
    stop = max(r.span[1] for r in members)
    dtype = members[0].dtype
    return TensorRef(members[0].storage, dtype, start // dtype.itemsize, ((stop - start) // dtype.itemsize,), (1,))


def plan_sharing(tensors: dict[str, TensorRef], *, materialize_views: bool = False) -> SharingPlan:
    """Decide, for every name, whether it is stored, an alias or a view.

    The stored name of an alias group is the first in checkpoint order, which is
    what ``save_pretrained`` keeps (``transformer.wte.weight``, not ``lm_head.weight``).
    With ``materialize_views`` every view is stored as an ordinary tensor (its bytes
    repeated), so loaders that ignore tie metadata still see every name.

    Example:
        >>> from converter.dtypes import BY_CODE
        >>> w = TensorRef("0", BY_CODE["F32"], 0, (4, 4), (4, 1))
        >>> plan = plan_sharing({"wte": w, "lm_head": w})
        >>> [s.name for s in plan.stored], plan.ties.aliases
        (['wte'], {'lm_head': 'wte'})
    """
    counts = Counter(ref.storage for ref in tensors.values())
    if len(counts) == len(tensors):  # the common case: every storage its own, nothing shared
        return SharingPlan(list(map(StoredTensor, tensors, tensors.values())), TieRecord())
    position: dict[str, int] = {}
    by_storage: dict[str, list[str]] = {}  # the storages of several names, in order of appearance
    placed: list[tuple[int, StoredTensor]] = []  # sorted by checkpoint position at the end
    for i, (name, ref) in enumerate(tensors.items()):
        if counts[ref.storage] == 1:
            placed.append((i, StoredTensor(name, ref)))
        else:
            position[name] = i
            by_storage.setdefault(ref.storage, []).append(name)

    plan = SharingPlan([], TieRecord())
    taken = set(tensors)
    for names in by_storage.values():
        clusters = overlap_clusters(names, tensors)
        if sum(1 for c in clusters if tensors[c[0]].numel) > 1:
            plan.groups.append(SharedGroup("disjoint", None, tuple(c[0] for c in clusters)))
        for cluster in clusters:
            first = position[cluster[0]]
            refs = [tensors[n] for n in cluster]
            if len(cluster) == 1 or len({r.dtype for r in refs}) > 1:
                # Alone, or the same bytes seen as different dtypes: no tie can describe that.
                placed.extend((position[n], StoredTensor(n, tensors[n])) for n in cluster)
                continue
            span = _span_ref(refs)
            covering = [n for n in cluster if tensors[n].is_contiguous and tensors[n].span == span.span]
            if len({_geometry(r) for r in refs}) == 1:
                covering = cluster[:1]  # pure aliases: store the first even if it is not dense
            if covering:
                base: str | None = covering[0]
                base_ref = tensors[covering[0]]
                placed.append((first, StoredTensor(covering[0], base_ref)))
            elif materialize_views:
                base, base_ref = None, span  # every member is stored on its own below
            else:
                base = _reserved_name(taken)
                base_ref = span
                placed.append((first, StoredTensor(base, span, reserved=True)))
                plan.ties.hidden.append(base)
            _tie_cluster(plan, cluster, tensors, base, base_ref, materialize_views, placed, position)
            kind = "overlap" if not covering else "view" if any(n in plan.ties.views for n in cluster) else "alias"
            plan.groups.append(SharedGroup(kind, base, tuple(cluster)))
    placed.sort(key=itemgetter(0))  # stable: a cluster's members keep their order
    plan.stored = [s for _, s in placed]
    return plan


def _reserved_name(taken: set[str]) -> str:
    index = 0
    while f"{RESERVED_PREFIX}{index}" in taken:
        index += 1
    taken.add(f"{RESERVED_PREFIX}{index}")
    return f"{RESERVED_PREFIX}{index}"


def _tie_cluster(
    plan: SharingPlan,
    cluster: list[str],
    tensors: dict[str, TensorRef],
    base: str | None,
    base_ref: TensorRef,
    materialize_views: bool,
    placed: list[tuple[int, StoredTensor]],
    position: dict[str, int],
) -> None:
    """Record every member of a cluster other than its base as an alias or a view."""
    stored_as: dict[tuple[object, ...], str] = {}  # geometry -> the stored name with it
    if base is not None:
        stored_as[_geometry(base_ref)] = base
    for name in cluster:
        if name == base:
            continue
        ref = tensors[name]
        same = stored_as.get(_geometry(ref))
        if same is not None:
            plan.ties.aliases[name] = same
        elif materialize_views:
            stored_as[_geometry(ref)] = name
            placed.append((position[name], StoredTensor(name, ref)))
            plan.materialized.append(name)
        else:
            assert base is not None
            plan.ties.views[name] = View(base, ref.offset - base_ref.offset, ref.shape, ref.stride, ref.dtype.code)


def retie(plan: SharingPlan, keeper: str, duplicate: str, *, kind: str) -> list[str]:
    """Store ``duplicate`` no more: it holds the same bytes as the stored ``keeper``.

    ``kind="alias"`` (a tie the model declares) makes it, and every name tied to
    it, point at ``keeper``; ``kind="copy"`` (merely equal bytes) records it as a
    copy, loaded as an independent tensor. Returns the names now resolved through
    ``keeper``. The caller has checked the bytes are identical.

    Example:
        >>> retie(plan, "model.embed_tokens.weight", "lm_head.weight", kind="alias")  # doctest: +SKIP
        ['lm_head.weight']
    """
    ties = plan.ties
    if kind == "copy" and duplicate in {*ties.aliases.values(), *(v.base for v in ties.views.values())}:
        raise ValueError(f"{duplicate!r} has ties of its own and cannot become a copy")
    plan.stored = [s for s in plan.stored if s.name != duplicate]
    (ties.aliases if kind == "alias" else ties.copies)[duplicate] = keeper
    moved = [duplicate]
    for name, target in list(ties.aliases.items()):
        if target == duplicate:
            ties.aliases[name] = keeper
            moved.append(name)
    for name, view in list(ties.views.items()):
        if view.base == duplicate:
            ties.views[name] = View(keeper, view.offset, view.shape, view.stride, view.dtype)
            moved.append(name)
    plan.groups.append(SharedGroup("declared" if kind == "alias" else "identical", keeper, (keeper, *moved)))
    return moved
