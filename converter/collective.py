"""Save DTensors (FSDP2, tensor parallel) collectively: every rank calls, one set of files appears.

Imported by ``export`` only when a state dict holds a DTensor, so nothing else
imports ``torch.distributed.tensor``. Each DTensor is described by its global
geometry, so the sharing analysis, layout and tie record are the ones a local
module gets: the output is byte for byte what ``save_model`` writes for the same
model unsharded (a tied embedding is one DTensor under two names: an alias).

Every rank plans the same files from metadata alone. Then, by default, rank 0
writes: for each stored DTensor in file order, every rank holding a piece of it
sends the piece in blocks of at most 16 MiB, which rank 0 writes at their offsets
and reads back, so rank 0 never holds a tensor, let alone the model. With
``parallel``, rank 0 stages the files with their headers, every rank writes and
verifies the pieces it holds with ``pwrite`` at their offsets, and rank 0 renames
the set into place once every rank has synced: no byte crosses the network.

``DTensor.full_tensor()`` is not used: it gathers the whole tensor on every rank
(and, for uneven or column shards, copies it again), where rank 0 needs only one
block at a time. Ranks agree at each step (``gather_object`` to rank 0, its
verdict broadcast): an error on any rank is raised, identical, on every rank, and
the staged files are removed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from . import errors
from .convert import ConversionReport
from .descriptors import TensorRef
from .dtypes import BY_TORCH_NAME
from .errors import TiesafeError, UnsupportedError, VerificationError
from .export import Prepared, Verifier, _host_bytes, _unsupported, describe, prepare, report, same_bytes
from .folder import remove_stale_set
from .geometry import contiguous_strides
from .pieces import Chunk, Piece, chunks, run_shape, tiling_problem
from .windows import FileWindow, PieceWindow, read_exact
from .writer import StagedWrites, _write_error, pwrite_all

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from .export import _Options

BLOCK = 16 * 1024 * 1024  # bytes of a piece in flight or staged at a time (a multiple of every itemsize)


# --------------------------------------------------------------------------- where each piece is


@dataclass
class _Layout:
    """A DTensor as this rank sees it: its piece, whether it writes it, how to get it."""

    name: str
    tensor: DTensor
    target: tuple[Any, ...]  # placements once partial sums are reduced (Shard / Replicate only)
    piece: Piece
    writes: bool  # this rank's piece goes to the output (replicas: only the first copy)

    @property
    def redistribute(self) -> bool:
        return tuple(self.tensor.placements) != self.target

    def local(self) -> torch.Tensor:
        """This rank's piece (a collective when partial sums must be reduced first)."""
        t = self.tensor
        if self.redistribute:
            t = t.redistribute(t.device_mesh, self.target)
        return t.to_local()


def _layout(name: str, t: DTensor, where: Path) -> _Layout:
    mesh: DeviceMesh = t.device_mesh
    placements = tuple(t.placements)
    if all(type(p) is Shard or p.is_replicate() or p.is_partial() for p in placements):
        # Partial sums are reduced to replicas (an all-reduce of this piece's size, on every rank).
        target = tuple(Replicate() if p.is_partial() else p for p in placements)
    else:
        # _StridedShard (FSDP2 over tensor parallel) and custom placements: the whole tensor on
        # every rank, then written from rank 0's copy. Correct, but not memory-bounded.
        target = tuple(Replicate() for _ in placements)
    shape, offset = compute_local_shape_and_global_offset(t.shape, mesh, list(target))
    local = t.to_local()
    if local.device.type == "meta":
        raise UnsupportedError(f"DTensor {name!r} is on the meta device and has no data to save", path=where)
    if target == placements and tuple(local.shape) != tuple(shape):
        shown = ", ".join(repr(p) for p in placements)
        raise UnsupportedError(
            f"DTensor {name!r} ({shown}) holds a {list(local.shape)} piece where its placement gives "
            f"{list(shape)}; its layout cannot be told, so it is not saved",
            path=where,
        )
    coordinate = mesh.get_coordinate()
    ranks = mesh.mesh.flatten().tolist()
    writes = (
        coordinate is not None
        and 0 in ranks  # a mesh without rank 0 holds replicas of what rank 0's mesh holds
        and all(c == 0 for c, p in zip(coordinate, target, strict=True) if not isinstance(p, Shard))
    )
    return _Layout(name, t, target, Piece(tuple(offset), tuple(shape)), writes)


def _identity(t: DTensor) -> tuple[object, ...]:
    """Two names are one tensor when they hold one local piece with one placement (tied parameters)."""
    local = t.to_local()
    return (
        "dtensor",
        int(local.untyped_storage()._cdata),
        local.storage_offset(),
        tuple(local.shape),
        tuple(local.stride()),
        str(local.dtype),
        tuple(str(p) for p in t.placements),
        tuple(t.shape),
        id(t.device_mesh),
    )


def _global_ref(name: str, t: DTensor, where: Path) -> TensorRef:
    dtype = BY_TORCH_NAME.get(str(t.dtype).removeprefix("torch."))
    problem = _unsupported(t.to_local(), dtype)
    if problem is not None or dtype is None:
        raise UnsupportedError(f"tensor {name!r} {problem}", path=where)
    shape = tuple(t.shape)
    return TensorRef("", dtype, 0, shape, contiguous_strides(shape))


@dataclass(eq=False)
class _DistSource:
    """A stored DTensor in the plan; rank 0's writer asks the gather for its bytes (default mode)."""

    index: int
    gather: _Gather | None = None

    def write_into(self, fd: int, offset: int) -> None:
        if self.gather is None:
            raise AssertionError("a DTensor's bytes are written by the ranks that hold them")
        self.gather.receive(self.index, fd, offset)


@dataclass
class _Job:
    """What every rank plans: the files, and each stored DTensor's layout in file order."""

    prepared: Prepared
    layouts: list[_Layout]  # stored DTensors in the order they are written
    offsets: list[tuple[str, int]]  # file name and byte offset of each one
    sources: list[_DistSource]  # the same, as the plan's tensor sources
    distributed: frozenset[str]  # every name that is a DTensor
    digest: str  # of every header and the index: ranks must plan the same bytes


def _plan(
    live: Mapping[str, torch.Tensor], distributed: set[str], dst: Path, limit: int | None, options: _Options
) -> _Job:
    given = {}
    layouts: dict[str, _Layout] = {}
    for name in live:
        if name in distributed:
            t = cast(DTensor, live[name])
            layouts[name] = _layout(name, t, dst)
            given[name] = (_identity(t), _global_ref(name, t, dst))
    refs = describe(live, dst, given)
    sources = {name: _DistSource(-1) for name in layouts}
    prepared = prepare(live, dst, limit, options.metadata, options.materialize_views, refs, sources)
    ordered: list[_Layout] = []
    offsets: list[tuple[str, int]] = []
    used: list[_DistSource] = []
    digest = hashlib.sha256()
    for fname, plan in prepared.outputs.files.items():
        digest.update(fname.encode() + b"\0" + plan.header)
        for planned in plan.tensors:
            if isinstance(planned.source, _DistSource):
                planned.source.index = len(used)  # numbered in write order (the plan orders by itemsize)
                used.append(planned.source)
                ordered.append(layouts[planned.name])
                offsets.append((fname, len(plan.header) + planned.begin))
    if prepared.outputs.index is not None:
        digest.update(prepared.outputs.index_json())
    return _Job(prepared, ordered, offsets, used, frozenset(distributed), digest.hexdigest())


# --------------------------------------------------------------------------- agreeing on errors


@dataclass(frozen=True)
class _Failure:
    """An error as it travels between ranks (exception objects need not pickle)."""

    kind: str
    problem: str
    path: str | None
    rank: int  # -1: found by comparing the ranks, no one rank's
    stopped: bool = False  # only saw that another rank failed

    def error(self, world: int) -> TiesafeError:
        found = getattr(errors, self.kind, TiesafeError)
        cls = found if isinstance(found, type) and issubclass(found, TiesafeError) else TiesafeError
        problem = f"rank {self.rank}: {self.problem}" if world > 1 and self.rank >= 0 else self.problem
        return cls(problem, path=self.path)


class _Stopped(Exception):
    """Another rank failed; this one stops at the next step."""


def _failure(exc: BaseException, rank: int, path: Path) -> _Failure:
    if isinstance(exc, _Stopped):
        return _Failure("TiesafeError", "stopped: another rank failed", str(path), rank, stopped=True)
    if isinstance(exc, OSError):
        exc = _write_error(exc, path)
    if isinstance(exc, TiesafeError):
        return _Failure(type(exc).__name__, exc.problem, exc.path or str(path), rank)
    return _Failure("TiesafeError", f"failed: {type(exc).__name__}: {exc}", str(path), rank)


class _Group:
    """The ranks' collectives for one save: agreement, status, and the pieces' traffic."""

    def __init__(self, device: torch.device) -> None:
        self.rank, self.world, self.device = dist.get_rank(), dist.get_world_size(), device

    def gather(self, obj: object) -> list[Any] | None:
        out: list[Any] | None = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: object) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, mine: _Failure | None, verdict_of: Callable[[], _Failure | None] | None = None) -> None:
        """Raise on every rank the first failure of any rank (none: return on every rank).

        ``verdict_of`` runs on rank 0 when no rank failed (the commit), and its failure is raised everywhere.
        """
        gathered = self.gather(mine)
        verdict = _first(gathered) if gathered is not None else None
        if verdict_of is not None and verdict is None and self.rank == 0:
            verdict = verdict_of()
        self.raise_if(self.broadcast(verdict))

    def raise_if(self, verdict: _Failure | None) -> None:
        if verdict is not None:
            raise verdict.error(self.world) from None

    def any_failed(self, failed: bool) -> bool:
        flag = torch.tensor([int(failed)], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def _first(gathered: list[Any]) -> _Failure | None:
    """The failure to report: the first rank's that failed on its own (not one that only stopped)."""
    failures: list[_Failure] = [f for f in gathered if f is not None]
    real = [f for f in failures if not f.stopped]
    return (real or failures)[0] if failures else None


# --------------------------------------------------------------------------- moving bytes


def _local_rows(local: torch.Tensor, piece: Piece, global_shape: tuple[int, ...]) -> torch.Tensor:
    """The piece as (runs, elements per run); a view of a contiguous local piece."""
    runs, per_run = run_shape(piece, global_shape)
    return local.reshape(runs, per_run)


def _chunk_tensor(rows: torch.Tensor, chunk: Chunk) -> torch.Tensor:
    """The bytes of one chunk as a flat uint8 tensor on the piece's device (contiguous)."""
    part = rows[chunk.first : chunk.last].contiguous().reshape(-1).view(torch.uint8)
    return part[chunk.start : chunk.stop]


def _write_chunk(fd: int, base: int, data: memoryview, chunk: Chunk) -> None:
    for where, position, n in chunk.runs:
        pwrite_all(fd, data[position : position + n], base + where)


def _check_chunk(fd: int, base: int, data: memoryview, chunk: Chunk, name: str) -> None:
    for where, position, n in chunk.runs:
        if not same_bytes(read_exact(fd, base + where, n), data[position : position + n]):
            raise VerificationError(f"tensor {name!r} differs from the DTensor's piece in memory")


def _pieces(layout: _Layout, local: torch.Tensor) -> Iterator[tuple[Chunk, torch.Tensor]]:
    shape = tuple(layout.tensor.shape)
    rows = _local_rows(local, layout.piece, shape)
    for chunk in chunks(layout.piece, shape, local.element_size(), BLOCK):
        yield chunk, _chunk_tensor(rows, chunk)


def _write_own(fd: int, base: int, layout: _Layout, local: torch.Tensor, verify: bool) -> None:
    """Write (and read back) this rank's own piece at its offsets."""
    for chunk, part in _pieces(layout, local):
        data = _host_bytes(part.cpu())
        _write_chunk(fd, base, data, chunk)
        if verify:
            _check_chunk(fd, base, data, chunk, layout.name)


class _Gather:
    """Default mode: the stored DTensors come to rank 0 piece by piece, block by block, in file order.

    Before each tensor every rank says whether it has failed (an all-reduce of one
    integer), so a failure stops all ranks at the same step instead of leaving one
    waiting for bytes that never come.
    """

    def __init__(self, group: _Group, job: _Job, pieces: list[list[Piece | None]] | None, verify: bool) -> None:
        self.group, self.job, self.verify = group, job, verify
        self.pieces = pieces  # rank 0: [rank][tensor] -> the piece that rank sends, or None
        self.next = 0
        self.failed = False
        self.stopped = False
        self._buffers: list[torch.Tensor] = []  # two blocks, reused for every block of every tensor
        self._turn = 0

    def _step(self) -> torch.Tensor:
        """Start tensor ``next`` on every rank: agree that all are well, reduce partial sums."""
        if self.group.any_failed(self.failed):
            self.stopped = True
            raise _Stopped
        layout = self.job.layouts[self.next]
        self.next += 1
        return layout.local()

    def abort(self) -> None:
        """This rank failed: tell the others at the next step (if one is left)."""
        self.failed = True
        if not self.stopped and self.next < len(self.job.layouts):
            self.group.any_failed(True)
            self.stopped = True

    def serve(self) -> None:
        """Every rank but 0: send this rank's pieces, tensor by tensor, as rank 0 asks for them.

        A piece that cannot be prepared is sent as zeros of its size (rank 0 waits
        for exactly those bytes and discards them); the failure is raised after it,
        and told to every rank at the next step.
        """
        while self.next < len(self.job.layouts):
            layout = self.job.layouts[self.next]
            local = self._step()
            if not layout.writes:
                continue
            shape = tuple(layout.tensor.shape)
            problem: BaseException | None = None
            rows = None
            try:
                rows = _local_rows(local, layout.piece, shape)
            except Exception as exc:
                problem = exc
            for chunk in chunks(layout.piece, shape, local.element_size(), BLOCK):
                part = None
                if rows is not None and problem is None:
                    try:
                        part = _chunk_tensor(rows, chunk)
                    except Exception as exc:
                        problem = exc
                if part is None:
                    part = torch.zeros(chunk.nbytes, dtype=torch.uint8)
                # Blocks travel on the mesh's device: a CPU-offloaded piece over NCCL is staged there.
                dist.send(part.to(self.group.device), dst=0)
            if problem is not None:
                self.failed = True
                raise problem

    def receive(self, index: int, fd: int, base: int) -> None:
        """Rank 0: write tensor ``index`` at ``base``: its own piece, then each other rank's as it arrives.

        Two block buffers alternate: the next block is on its way (``irecv``) while
        this one is written and read back, and the first while rank 0 writes its own
        piece. After a failure the other ranks' blocks are still received (and
        dropped), so no rank is left waiting; the failure is raised once the tensor
        is drained.
        """
        if index != self.next:
            raise AssertionError(f"tensor {index} written out of order (expected {self.next})")
        layout = self.job.layouts[index]
        local = self._step()
        assert self.pieces is not None
        shape = tuple(layout.tensor.shape)
        incoming = [
            (sender, chunk)
            for sender in range(1, self.group.world)
            if (piece := self.pieces[sender][index]) is not None
            for chunk in chunks(piece, shape, local.element_size(), BLOCK)
        ]
        pending = self._post(incoming, 0)
        problem: BaseException | None = None
        if layout.writes:
            try:
                _write_own(fd, base, layout, local, self.verify)
            except Exception as exc:
                problem = exc
        for i, (_, chunk) in enumerate(incoming):
            assert pending is not None
            work, part = pending
            work.wait()
            pending = self._post(incoming, i + 1)
            if problem is None:
                try:
                    data = _host_bytes(part.cpu())
                    _write_chunk(fd, base, data, chunk)
                    if self.verify:
                        _check_chunk(fd, base, data, chunk, layout.name)
                except Exception as exc:
                    problem = exc
        if problem is not None:
            raise problem

    def _post(self, incoming: list[tuple[int, Chunk]], i: int) -> tuple[Any, torch.Tensor] | None:
        """Start receiving block ``i`` of ``incoming`` into the buffer block ``i - 1`` does not use."""
        if i >= len(incoming):
            return None
        if not self._buffers:
            self._buffers = [torch.empty(BLOCK, dtype=torch.uint8, device=self.group.device) for _ in range(2)]
        sender, chunk = incoming[i]
        self._turn ^= 1
        part = self._buffers[self._turn][: chunk.nbytes]
        return dist.irecv(part, src=sender), part


# --------------------------------------------------------------------------- the two modes


def save_collective(
    live: dict[str, torch.Tensor],
    distributed: set[str],
    dst: Path,
    limit: int | None,
    options: _Options,
    source: str,
    skipped: list[str],
    removed: list[str],
    started: float,
) -> ConversionReport:
    """Every rank: write ``live`` (some of whose tensors are DTensors) as one set of files.

    Example:
        >>> save_model(fsdp_model, "out", max_shard_size="2GB")  # doctest: +SKIP  (on every rank)
    """
    if not dist.is_available() or not dist.is_initialized():
        raise TiesafeError("the state dict holds DTensors but no process group is initialised", path=dst)
    first = cast(DTensor, live[next(n for n in live if n in distributed)])
    group = _Group(torch.device(first.device_mesh.device_type))
    mine: _Failure | None = None
    job: _Job | None = None
    try:
        job = _plan(live, distributed, dst, limit, options)
    except Exception as exc:
        mine = _failure(exc, group.rank, dst)
    output = job.prepared.output if job is not None else dst
    # Agree on the plan: every rank planned the same bytes, and the pieces cover every tensor.
    held = None if job is None else [lay.piece if lay.writes else None for lay in job.layouts]
    gathered = group.gather((mine, None if job is None else job.digest, held))
    verdict = None
    if gathered is not None:
        verdict = _first([g[0] for g in gathered]) or _check_plans(gathered, job, output)
    group.raise_if(group.broadcast(verdict))
    assert job is not None
    pieces = [g[2] for g in gathered] if gathered is not None else None
    if options.parallel:
        _parallel(group, job, live, dst, options.verify)
    else:
        _gathered(group, job, live, dst, pieces, options.verify)
    if limit is not None and group.rank == 0:
        remove_stale_set(dst.parent, dst.name.removesuffix(".safetensors"), {*job.prepared.outputs.files, output.name})
    return report(job.prepared, source, skipped, removed, options.verify, started)


def _check_plans(gathered: list[Any], job: _Job | None, output: Path) -> _Failure | None:
    assert job is not None
    digests = {g[1] for g in gathered}
    if len(digests) > 1:
        return _Failure(
            "TiesafeError", "the ranks hold different tensors (names, dtypes or shapes differ)", str(output), -1
        )
    for i, layout in enumerate(job.layouts):
        boxes = [g[2][i] for g in gathered if g[2][i] is not None]
        problem = tiling_problem(tuple(layout.tensor.shape), boxes)
        if problem is not None:
            shown = ", ".join(repr(p) for p in layout.tensor.placements)
            return _Failure("UnsupportedError", f"DTensor {layout.name!r} ({shown}): {problem}", str(output), -1)
    return None


def _gathered(
    group: _Group,
    job: _Job,
    live: dict[str, torch.Tensor],
    dst: Path,
    pieces: list[list[Piece | None]] | None,
    verify: bool,
) -> None:
    """Default mode: rank 0 writes; the others send their pieces when asked."""
    gather = _Gather(group, job, pieces, verify)
    prepared = job.prepared
    mine: _Failure | None = None
    if group.rank != 0:
        try:
            gather.serve()
        except Exception as exc:
            gather.abort()
            mine = _failure(exc, group.rank, prepared.output)
        group.agree(mine)
        return
    for source in job.sources:
        source.gather = gather
    check = _verifier(job, live) if verify else None
    staged = StagedWrites()
    try:
        try:
            for fname, plan in prepared.outputs.files.items():
                staged.write_plan(plan, dst.parent / fname, check)
            if prepared.outputs.index is not None:
                staged.write_bytes(prepared.outputs.index_json(), prepared.output)
            if check is not None:
                check.finish()
        except Exception as exc:
            gather.abort()
            mine = _failure(exc, 0, prepared.output)
        group.agree(mine, verdict_of=lambda: _commit(staged, prepared.output))
    finally:
        staged.discard()  # after a commit there is nothing left to remove


def _verifier(job: _Job, live: Mapping[str, torch.Tensor]) -> Verifier:
    """Checks headers, tie records and plain tensors; DTensor pieces are checked where they are written.

    Ties are checked on the local pieces: tied names hold one piece.
    """
    local = {n: (cast(DTensor, t).to_local() if n in job.distributed else t) for n, t in live.items()}
    return Verifier(local, job.prepared.refs, job.prepared.sharing.ties, job.distributed)


def _commit(staged: StagedWrites, output: Path) -> _Failure | None:
    try:
        staged.commit()
    except Exception as exc:
        return _failure(exc, 0, output)
    return None


def _open_staged(temps: dict[str, str], job: _Job) -> dict[str, int]:
    """Open rank 0's staged files; they must be there with the planned header (a file system all ranks see)."""
    fds: dict[str, int] = {}
    try:
        for fname, tmp in temps.items():
            try:
                fds[fname] = os.open(tmp, os.O_RDWR)
            except FileNotFoundError:
                raise TiesafeError(
                    "parallel=True needs a folder every rank sees (a shared file system); this rank does not see "
                    "rank 0's files there: use the default mode (parallel=False)",
                    path=job.prepared.output,
                ) from None
            header = job.prepared.outputs.files[fname].header
            if read_exact(fds[fname], 0, len(header)) != header:
                raise TiesafeError("rank 0's staged file differs from this rank's plan", path=tmp)
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


def _parallel(group: _Group, job: _Job, live: dict[str, torch.Tensor], dst: Path, verify: bool) -> None:
    """Parallel mode: rank 0 stages the files; every rank writes and verifies its pieces in place."""
    prepared = job.prepared
    staged = StagedWrites() if group.rank == 0 else None
    fds: dict[str, int] = {}
    mine: _Failure | None = None
    try:
        # 1. rank 0 stages every file with its header and tells the others their temporary names.
        temps: dict[str, str] = {}
        if staged is not None:
            try:
                for fname, plan in prepared.outputs.files.items():
                    fd, tmp = staged.start_plan(plan, dst.parent / fname)
                    fds[fname], temps[fname] = fd, str(tmp)
            except Exception as exc:
                mine = _failure(exc, 0, prepared.output)
        verdict, temps = group.broadcast((mine, temps))
        group.raise_if(verdict)
        # 2. every rank finds them.
        if staged is None:
            try:
                fds = _open_staged(temps, job)
            except Exception as exc:
                mine = _failure(exc, group.rank, prepared.output)
        group.agree(mine)
        # 3. every rank writes its pieces; partial sums are reduced on the way, so no rank skips a tensor.
        for layout, (fname, base) in zip(job.layouts, job.offsets, strict=True):
            local = layout.local()
            if layout.writes and mine is None:
                try:
                    _write_own(fds[fname], base, layout, local, verify)  # read back while in the page cache
                except Exception as exc:
                    mine = _failure(exc, group.rank, prepared.output)
            del local
        # 4. rank 0 writes the plain tensors; every rank syncs what it wrote.
        if mine is None:
            try:
                if staged is not None:
                    _write_plain(fds, job)
                for fd in fds.values():
                    os.fsync(fd)  # on a shared file system each writer flushes its own pages
                if staged is not None:
                    if verify:
                        check = _verifier(job, live)
                        for fname in prepared.outputs.files:
                            check(Path(temps[fname]))
                        check.finish()
                    if prepared.outputs.index is not None:
                        staged.write_bytes(prepared.outputs.index_json(), prepared.output)
            except Exception as exc:
                mine = _failure(exc, group.rank, prepared.output)
        # 5. rank 0 renames the set into place once every rank is done.
        group.agree(mine, verdict_of=(lambda: _commit(staged, prepared.output)) if staged is not None else None)
    finally:
        if staged is not None:
            staged.discard()  # after a commit there is nothing left to remove
        else:
            for fd in fds.values():
                os.close(fd)


def _write_plain(fds: dict[str, int], job: _Job) -> None:
    """Rank 0: the tensors that are no DTensor (buffers, replicated state), from its own copy."""
    for fname, plan in job.prepared.outputs.files.items():
        for planned in plan.tensors:
            if not isinstance(planned.source, (_DistSource, FileWindow, PieceWindow)):
                planned.source.write_into(fds[fname], len(plan.header) + planned.begin)
