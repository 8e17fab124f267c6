"""Convert a training run's checkpoint (DeepSpeed ZeRO, torch.distributed.checkpoint) to release weights.

The readers give a :class:`~converter.descriptors.Checkpoint` whose storages are pieces of
the rank files; from there the pipeline is a model folder's: ties (recorded by the
checkpoint, declared by ``config.json``), the layout ``save_pretrained`` writes (one
file, or shards and an index), the writer and verification. ``dtype`` casts floating
tensors while they stream. Shards are independent units of work: with an executor
each shard is written and verified by one task, and the index and side files appear
only once every shard verified.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cast import cast_target, is_float
from .declared import declared_ties
from .descriptors import Checkpoint, TensorRef
from .errors import TiesafeError, VerificationError
from .folder import (
    FolderPlan,
    FolderReport,
    SetOutput,
    Tie,
    WeightSet,
    _apply_declared,
    _refuse_existing,
    parse_size,
    write_plan,
)
from .layout import FilePlan, StoredItem, plan_shards, stored_items
from .readers.dcp import is_dcp_folder, read_dcp
from .sharing import SharingPlan, plan_sharing
from .stfile import read_safetensors
from .ties import TieRecord, restrict
from .verify import verify_output
from .windows import FileWindow, PieceWindow, same_bytes
from .writer import StagedWrites, _fsync_dir, write_file

# Files of a run folder that belong with the weights (what save_pretrained and a tokenizer write).
SIDE_FILES = re.compile(
    r"^(config\.json|generation_config\.json|tokenizer(_config)?\.json|special_tokens_map\.json|added_tokens\.json"
    r"|vocab\.(json|txt)|merges\.txt|tokenizer\.model|spiece\.model|sentencepiece\.bpe\.model|chat_template\.(jinja|json)"
    r"|preprocessor_config\.json|processor_config\.json)$"
)


def find_run(src: Path) -> tuple[str, Path, Path]:
    """What kind of training checkpoint ``src`` is: ``("dcp" | "deepspeed", checkpoint folder, run folder)``.

    The run folder is where side files (``config.json``, tokenizer) are looked for:
    the folder itself, or for a DeepSpeed ``global_stepN`` folder its parent.

    Example:
        >>> find_run(Path("checkpoint-500"))  # doctest: +SKIP
        ('deepspeed', PosixPath('checkpoint-500/global_step500'), PosixPath('checkpoint-500'))
    """
    from .readers.deepspeed import find_deepspeed

    if is_dcp_folder(src):
        return "dcp", src, src
    found = find_deepspeed(src)
    if found is not None:
        step, run = found
        return "deepspeed", step, run
    raise TiesafeError("is not a training checkpoint (no DCP .metadata, no DeepSpeed latest/global_step)", path=src)


def is_training_run(src: Path) -> bool:
    """Whether ``src`` is a DCP folder or a DeepSpeed run or step folder (cheap: names only).

    Example:
        >>> is_training_run(Path("checkpoint-500"))  # doctest: +SKIP
        True
    """
    from .readers.deepspeed import looks_like_deepspeed

    return src.is_dir() and (is_dcp_folder(src) or looks_like_deepspeed(src))


def read_run(src: str | Path, *, key: str | None = None) -> Checkpoint:
    """The weights of a training checkpoint as a :class:`Checkpoint` of file pieces (no data read).

    Example:
        >>> ckpt = read_run("checkpoint-500")  # doctest: +SKIP
        >>> ckpt.format
        'deepspeed-zero3'
    """
    kind, folder, _ = find_run(Path(src))
    if kind == "dcp":
        return read_dcp(folder, key=key)
    from .readers.deepspeed import read_deepspeed

    if key is not None:
        raise TiesafeError("--key applies to DCP checkpoints; a DeepSpeed checkpoint holds one model", path=src)
    return read_deepspeed(folder)


def cast_checkpoint(ckpt: Checkpoint, dtype: str) -> Checkpoint:
    """``ckpt`` with every floating tensor read as ``dtype`` (``"bf16"``, ``"fp16"``, ``"fp32"``).

    Integer tensors keep their dtype, as ``model.to(dtype)`` keeps them. The bytes
    are converted while they stream (round to nearest even, as ``tensor.to``).

    Example:
        >>> cast_checkpoint(read_run("run"), "bf16").tensors["lm_head.weight"].dtype.code  # doctest: +SKIP
        'BF16'
    """
    target = cast_target(dtype)
    storages = dict(ckpt.storages)
    tensors: dict[str, TensorRef] = {}
    for name, ref in ckpt.tensors.items():
        if is_float(ref.dtype) and ref.dtype != target:
            record = storages[ref.storage]
            if record.cast_from is None:
                storages[ref.storage] = dataclasses.replace(record, cast_from=ref.dtype)
            ref = dataclasses.replace(ref, dtype=target)
        tensors[name] = ref
    return dataclasses.replace(ckpt, tensors=tensors, storages=storages)


def plan_run(
    src: str | Path,
    *,
    max_shard_size: int | str = "5GB",
    dtype: str | None = None,
    key: str | None = None,
    config: str | Path | None = None,
    allow_untied: bool = False,
) -> FolderPlan:
    """Read a training checkpoint and decide its output, without writing anything.

    Example:
        >>> plan = plan_run("checkpoint-500", dtype="bf16")  # doctest: +SKIP
        >>> list(plan.output.files)
        ['model.safetensors']
    """
    src = Path(src)
    _, folder, run = find_run(src)
    ckpt = read_run(src, key=key)
    if not ckpt.tensors:
        raise TiesafeError("the checkpoint holds no tensors to write", path=folder)
    if not any(ref.numel for ref in ckpt.tensors.values()):
        raise TiesafeError("every tensor of the checkpoint is empty: no weights to write", path=folder)
    notes = list(ckpt.notes)
    if dtype is not None:
        ckpt = cast_checkpoint(ckpt, dtype)
    sharing = plan_sharing(ckpt.tensors)  # DeepSpeed's shared_params are one storage: aliases
    ties = [Tie(n, t, "alias", "checkpoint") for n, t in sharing.ties.aliases.items()]
    config_path = Path(config) if config is not None else run / "config.json"
    declared: set[str] = set()
    warnings: list[str] = notes
    if config_path.is_file():
        with _config_folder(config_path) as config_folder:
            groups = declared_ties(config_folder)
            identical = _declared_identical(groups, ckpt, sharing)
            found, declared_warnings, moved = _apply_declared(
                config_folder, groups, ckpt, sharing, identical, allow_untied
            )
        warnings += declared_warnings
        ties += found
        declared |= moved
    elif config is not None:
        raise TiesafeError("no such config file", path=config_path)
    output = plan_shards(stored_items(ckpt, sharing), sharing.ties, max_shard_size=parse_size(max_shard_size))
    others = sorted(p.name for p in run.iterdir() if p.is_file() and SIDE_FILES.match(p.name))
    if config is not None:  # the config given replaces the run folder's (copied by convert_run)
        others = [name for name in others if name != "config.json"]
    weights = WeightSet(folder, "pytorch_model", None, [], None, None)
    output_set = SetOutput("", weights, ckpt, sharing, ties, [], warnings, declared, output, "model")
    return FolderPlan(run, "transformers" if config_path.is_file() else "torch", [output_set], others, False)


def _declared_identical(declared: list[list[str]], ckpt: Checkpoint, sharing: SharingPlan) -> list[list[str]]:
    """Among the names the model class ties, those whose bytes equal the first one's (checked, not assumed)."""
    items = {item.name: item for item in stored_items(ckpt, sharing)}
    groups = []
    for group in declared:
        present = [n for n in group if n in items]
        if len(present) < 2:
            continue
        keeper = present[0]
        same = [keeper] + [
            n
            for n in present[1:]
            if _comparable(items[n]) and same_bytes(items[keeper].source, items[n].source)  # type: ignore[arg-type]
        ]
        if len(same) > 1:
            groups.append(same)
    return groups


def _comparable(item: StoredItem) -> bool:
    return isinstance(item.source, (FileWindow, PieceWindow))


@contextlib.contextmanager
def _config_folder(config: Path) -> Iterator[Path]:
    """A folder whose ``config.json`` is ``config`` (declared ties are read from a folder)."""
    if config.name == "config.json":
        yield config.parent
        return
    with tempfile.TemporaryDirectory(prefix="tiesafe-config-") as tmp:
        shutil.copyfile(config, Path(tmp) / "config.json")
        yield Path(tmp)


def convert_run(
    src: str | Path,
    dst: str | Path | None = None,
    *,
    max_shard_size: int | str = "5GB",
    dtype: str | None = None,
    key: str | None = None,
    config: str | Path | None = None,
    verify: bool = True,
    allow_untied: bool = False,
    overwrite: bool = False,
    workers: int | None = None,
    executor: concurrent.futures.Executor | None = None,
) -> FolderReport:
    """Convert a DeepSpeed ZeRO or DCP checkpoint to what ``save_pretrained`` writes, streaming.

    Without ``dst`` the output goes into the run folder (beside ``latest`` or the
    ``.metadata``). With ``workers`` > 1 or an ``executor`` (a Dask client's), each
    output shard is written and verified by a task of its own; the index and the side
    files follow once every shard verified.

    Example:
        >>> report = convert_run("checkpoint-500", "release", dtype="bf16")  # doctest: +SKIP
        >>> report.files
        ['model.safetensors']
    """
    started = time.perf_counter()
    plan = plan_run(src, max_shard_size=max_shard_size, dtype=dtype, key=key, config=config, allow_untied=allow_untied)
    out = plan.source if dst is None else Path(dst)
    if out.exists() and not out.is_dir():
        raise TiesafeError("output must be a folder", path=out)
    _refuse_existing(out, plan, overwrite)
    weights = plan.sets[0]
    assert isinstance(weights, SetOutput)  # a run's weights are gathered, never a flat file's columns
    parallel = executor is not None or (workers or 1) > 1
    if parallel and len(weights.output.files) > 1:
        written = _write_shards_parallel(plan, weights, out, verify=verify, workers=workers or 1, executor=executor)
    else:
        written = write_plan(plan, out, verify=verify)
    copied_config = config is not None and Path(config).resolve() != (out / "config.json").resolve()
    if copied_config:  # after the weights verified: it is not a file of the run folder
        with StagedWrites() as staged:
            staged.copy_file(Path(str(config)), out / "config.json")
    report = plan.report(out, written, verified=verify, seconds=time.perf_counter() - started)
    if copied_config:
        report.copied.append("config.json")
    # The step folders are the source, not files to carry: no "subfolders not carried over" warning.
    report.warnings = [w for w in report.warnings if not w.startswith("subfolders not carried over")]
    return report


# --------------------------------------------------------------------------- shards in parallel


@dataclass
class ShardTask:
    """One output shard as a unit of work: its plan, the source names it must give, its ties."""

    plan: FilePlan
    checkpoint: Checkpoint  # the names the shard gives (stored and tied), with their sources
    ties: TieRecord
    declared: set[str]
    staging: Path  # where the shard is written (a hidden folder inside the output)
    name: str
    verify: bool


def write_shard(task: ShardTask) -> str:
    """Write and verify one shard into the staging folder; a module-level function for process pools and Dask.

    Example:
        >>> write_shard(task)  # doctest: +SKIP
        'model-00001-of-00004.safetensors'
    """

    def check(tmp: Path, progress: Any) -> None:
        verify_output(task.checkpoint, [read_safetensors(tmp)], task.ties, declared=task.declared, wait=progress.wait)
        task.checkpoint.check_unchanged()

    write_file(task.plan, task.staging / task.name, check=check if task.verify else None)
    return task.name


def _shard_tasks(weights: SetOutput, staging: Path, verify: bool) -> list[ShardTask]:
    tasks = []
    record = weights.sharing.ties
    for name, file_plan in weights.output.files.items():
        stored = {t.name for t in file_plan.tensors}
        ties = restrict(record, stored)
        names = stored | set(ties.names())
        tensors = {n: r for n, r in weights.checkpoint.tensors.items() if n in names}
        storages = {r.storage: weights.checkpoint.storages[r.storage] for r in tensors.values()}
        sub = dataclasses.replace(weights.checkpoint, tensors=tensors, storages=storages, skipped=[])
        tasks.append(ShardTask(file_plan, sub, ties, weights.declared & names, staging, name, verify))
    return tasks


def _write_shards_parallel(
    plan: FolderPlan,
    weights: SetOutput,
    out: Path,
    *,
    verify: bool,
    workers: int,
    executor: concurrent.futures.Executor | None,
) -> list[str]:
    """Each shard by a task into a hidden staging folder of ``out``; then all renamed, then the index."""
    import multiprocessing

    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiesafe-shards-", dir=out))
    own = executor is None
    pool = executor or concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = [pool.submit(write_shard, task) for task in _shard_tasks(weights, staging, verify)]
        for future in concurrent.futures.as_completed(futures):
            try:
                future.result()
            except TiesafeError as exc:
                raise VerificationError(exc.problem, path=out) from None
        with StagedWrites() as staged:  # side files and index: atomic, after every shard verified
            if out != plan.source:
                for name in plan.others:
                    staged.copy_file(plan.source / name, out / name)
            for name in weights.output.files:
                os.replace(staging / name, out / name)
            if weights.index_name is not None:
                staged.write_bytes(weights.output.index_json(), out / weights.index_name)
        _fsync_dir(out)
    finally:
        if own:
            pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(staging, ignore_errors=True)
    return plan.written_names
