"""The ``tiesafe`` command: parse, call the public API, print. Nothing else.

Exit codes: 0 success, 2 the input or the usage is at fault (one line on
stderr), 1 an internal error (a bug: ``--debug`` shows the traceback).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .errors import TiesafeError
from .libc import fix_mmap_threshold
from .reports import human_bytes
from .reports import shown as _shown

# Each command imports what it runs when it runs: start-up is part of every
# conversion's wall time, and `convert` must not pay for batch, Hub or Dask code.
if TYPE_CHECKING:
    from rich.console import Console

    from .batch import BatchReport
    from .convert import ConversionReport, InspectReport
    from .folder import FolderReport
    from .hub import UploadReport

EXIT_INTERNAL = 1
EXIT_USER = 2
EXIT_PIPE = 141  # what a shell reports for a command that SIGPIPE ended (128 + 13)
LONG_LISTING = 40  # inspect groups names by pattern beyond this many (--all lists each)
SHOWN_TIES = 10  # tie lines a report prints before "and N more"
SHOWN_ENTRIES = 20  # a training checkpoint's entries left out, listed before "and N more"


def _silence_stdout() -> None:
    """Point stdout at /dev/null: the flush at exit must not fail again on the closed pipe."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


class _Group(click.Group):
    """Turns tiesafe errors into one line and an exit code; tracebacks only with --debug."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TiesafeError as exc:
            if ctx.params.get("debug"):
                raise
            click.echo(f"tiesafe: error: {exc}", err=True)
            ctx.exit(EXIT_USER)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except BrokenPipeError:  # the reader went away (`tiesafe ... | head`): end quietly, as on SIGPIPE
            _silence_stdout()
            ctx.exit(EXIT_PIPE)
        except KeyboardInterrupt:
            click.echo("tiesafe: interrupted; no partial output was left", err=True)
            ctx.exit(130)
        except Exception as exc:
            if ctx.params.get("debug"):
                raise
            click.echo(
                f"tiesafe: internal error: {type(exc).__name__}: {exc} (please report it; --debug shows the traceback)",
                err=True,
            )
            ctx.exit(EXIT_INTERNAL)


def _is_training_run(folder: Path) -> bool:
    # Imported only for folders: the run machinery (folder, layout, verify) costs ~0.1 s to
    # import, a tenth of converting a file of 46,848 small tensors.
    from .run import is_training_run

    return is_training_run(folder)


def _print_json(data: dict[str, Any]) -> None:
    from .report_json import dumps  # json.dumps(indent=2), fast for a long tensor list

    click.echo(dumps(data))


def _saved_line(report: ConversionReport | FolderReport) -> str:
    return (
        f"  {human_bytes(report.bytes_written)} written for {human_bytes(report.bytes_all_names)} of tensors: "
        f"[green]{human_bytes(report.bytes_saved)} saved[/]"
        + ("; verified bit for bit" if report.verified else "; not verified (--no-verify)")
        + f" in {report.seconds:.2f} s"
    )


class _Lines:
    """Prints lines written in rich's markup (``[bold]x[/]``) through click, without importing rich.

    Importing rich costs about 30 ms of CPU, half of the CLI's own start-up:
    on a small checkpoint that is several percent of a conversion
    (scripts/bench.py). Only tables (inspect) need rich.
    """

    _MARKUP = re.compile(r"\[(bold|green|yellow|red)\](.*?)\[/\]")

    def print(self, text: str) -> None:
        def styled(match: re.Match[str]) -> str:
            style = match.group(1)
            return click.style(match.group(2), bold=True) if style == "bold" else click.style(match.group(2), fg=style)

        protected = text.replace("\\[", "\x00")  # an escaped bracket is text, not markup
        click.echo(self._MARKUP.sub(styled, protected).replace("\x00", "["))


def _names(names: Any, shown_at_most: int | None = None) -> str:
    """A list of names for a report line: the first few, then "and N more" (``--json`` has them all)."""
    from .listing import SHOWN, cut

    shown, more = cut(list(names), shown_at_most or SHOWN)
    return ", ".join(_shown(n) for n in shown) + (f" and {more} more" if more else "")


def _more_lines(total: int, shown: int, what: str) -> str | None:
    return f"  ... and {total - shown} more {what} (--json lists them all)" if total > shown else None


def _console(**options: Any) -> Console:
    """A rich console, imported only when something is printed (rich costs ~30 ms to import)."""
    from rich.console import Console

    return Console(**{"highlight": False, "soft_wrap": True, **options})


def _render_conversion(report: ConversionReport, console: Console | _Lines) -> None:
    console.print(f"[bold]{_shown(report.source)}[/] -> [bold]{_shown(report.output)}[/]")
    console.print(
        f"  {report.tensors} tensors, {report.stored} stored; "
        f"{len(report.aliases)} aliases, {len(report.views)} views"
        + (f", {len(report.materialized)} views written as tensors" if report.materialized else "")
    )
    for alias, stored in list(report.aliases.items())[:SHOWN_TIES]:
        console.print(f"  tied: {_shown(alias)} = {_shown(stored)}")
    if more := _more_lines(len(report.aliases), SHOWN_TIES, "ties"):
        console.print(more)
    if report.views:
        console.print(
            "  restored only by tiesafe (plain loaders skip them; --materialize-views writes them): "
            + _names(report.views)
        )
    _render_reading(report.wrapper, report.prefixes_removed, report.skipped, console)
    console.print(_saved_line(report))


def _render_reading(
    wrapper: str | None, prefixes_removed: list[str], skipped: list[str], console: Console | _Lines
) -> None:
    """Where the weights came from, how their names changed, and what was left out."""
    if wrapper:
        console.print(f"  weights: the state dict under {_shown(wrapper)}")
    for line in prefixes_removed:
        console.print(f"  names: removed prefix {_shown(line)}")
    if skipped:  # a training checkpoint's other entries, each described: a longer list is useful
        console.print(f"  not converted: {_names(skipped, SHOWN_ENTRIES)}")


def _render_folder(report: FolderReport, console: Console | _Lines) -> None:
    console.print(f"[bold]{_shown(report.source)}[/] -> [bold]{_shown(report.output)}[/]: {_names(report.files)}")
    by_origin: dict[str, int] = {}
    for tie in report.ties:
        by_origin[f"{tie.kind} ({tie.origin})"] = by_origin.get(f"{tie.kind} ({tie.origin})", 0) + 1
    found = ", ".join(f"{n} {what}" for what, n in by_origin.items()) or "none"
    console.print(f"  {report.tensors} tensors, {report.stored} stored; ties: {found}")
    if report.library not in ("", "transformers", "other"):
        console.print(f"  layout: {report.library}")
    for note in report.notes:
        console.print(f"  note: {_shown(note)}")
    listed = [tie for tie in report.ties if tie.origin != "storage" or tie.kind == "alias"]
    for tie in listed[:SHOWN_TIES]:
        where = f" in {_shown(tie.where)}" if tie.where else ""
        console.print(f"  {tie.kind}: {_shown(tie.name)} = {_shown(tie.target)} ({tie.origin}){where}")
    if more := _more_lines(len(listed), SHOWN_TIES, "ties"):
        console.print(more)
    for group in report.identical[:SHOWN_TIES]:
        console.print(f"  identical bytes, not tied (--dedup-identical stores them once): {_names(group)}")
    if more := _more_lines(len(report.identical), SHOWN_TIES, "groups of identical tensors"):
        console.print(more)
    for warning in report.warnings:
        console.print(f"  [yellow]warning[/]: {_shown(warning)}")
    if report.copied:
        console.print(f"  copied: {_names(report.copied)}")
    if report.deleted:
        console.print(f"  deleted source files: {_names(report.deleted)}")
    _render_reading(None, report.prefixes_removed, report.skipped, console)
    console.print(_saved_line(report))


def _render_batch_summary(report: BatchReport, console: Console) -> None:
    data = report.to_dict()
    counts = ", ".join(f"{n} {status}" for status, n in sorted(data["counts"].items())) or "nothing to do"
    console.print(
        f"{len(report.items)} items: {counts}; {human_bytes(data['bytes_written'])} written, "
        f"[green]{human_bytes(data['bytes_saved'])} saved[/] in {report.seconds:.1f} s"
    )
    workers = report.peak_rss_by_worker
    if workers:
        several = f"the largest of {len(workers)} worker processes" if len(workers) > 1 else "the worker process"
        if set(workers) == {report.pid}:
            several = "one process"
        elif report.peak_rss is not None:
            several += f", {human_bytes(report.peak_rss)} in the coordinating one"
        console.print(f"  peak memory: {human_bytes(max(workers.values()))} in {several}")
    for failure in report.failed:
        console.print(f"  [red]failed[/]: {_shown(failure.error)}")


_STATUS_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red"}


def _render_upload(report: UploadReport, console: Console) -> None:
    from rich.markup import escape

    source = report.source + (f" @ {report.commit[:7]} (local cache)" if report.commit else "")
    console.print(f"[bold]{escape(source)}[/] -> [bold]{escape(report.output or 'nothing written')}[/]")
    width = max((len(c.name) for c in report.checks), default=0)
    for check in report.checks:
        style = _STATUS_STYLE[check.status]
        console.print(f"  [{style}]{check.status}[/]  {check.name:<{width}}  {escape(check.summary)}")
        for detail in check.details:
            console.print(f"  {'':4}  {'':<{width}}  - {escape(detail)}")
    if report.plan is not None:
        added = ", ".join(f.path for f in report.plan.add)
        size = human_bytes(report.plan.bytes_to_upload)
        console.print(f"upload plan: add {len(report.plan.add)} files ({size}): {escape(added)}")
        if report.plan.delete:
            console.print(f"  delete on the Hub, where present: {escape(', '.join(report.plan.delete))}")
    if report.push is not None:
        pushed = report.push
        console.print(f"pushed to {pushed.repo_id}: {pushed.pr_url or pushed.commit_url}")
        if pushed.deleted:
            console.print(f"  deleted on the Hub: {escape(', '.join(pushed.deleted))}")
    elif not report.ok:
        failed = ", ".join(c.name for c in report.failed)
        console.print(f"[bold red]not ready to upload[/]: {failed} failed; nothing was written or pushed")


def _render_inspect(report: InspectReport, *, show_all: bool) -> None:
    """The tensors as a table on a terminal, as plain columns elsewhere; grouped by name pattern when long."""
    from .listing import Row, group_rows

    lines = _Lines()
    if "refused" in report.globals:  # nothing of the file was read past its globals
        lines.print(f"[bold]{_shown(report.path)}[/] ({report.format})")
        for kind, names in report.globals.items():
            lines.print(f"  globals, {kind}: {_names(names)}")
        lines.print("  [red]convert refuses this file[/]: it names globals that run code (none of them ran)")
        return
    grouped = not show_all and len(report.tensors) > LONG_LISTING
    if grouped:
        rows = group_rows((t.name, t.dtype, t.shape, t.nbytes, t.stored_as) for t in report.tensors)
    else:
        rows = [Row(t.name, t.dtype, t.shape, t.nbytes, t.stored_as) for t in report.tensors]
    header = ["name", "dtype", "shape", "bytes", "stored as", *(["names"] if grouped else [])]
    cells = [
        [_shown(r.name), r.dtype, str(r.shape), human_bytes(r.nbytes), _shown(r.stored_as)]
        + ([f"× {r.count:,}"] if grouped else [])
        for r in rows
    ]
    title = f"{_shown(report.path)} ({report.format})"
    if sys.stdout.isatty():
        from rich.table import Table

        table = Table(title=title)
        for column in header:
            table.add_column(column, justify="right" if column == "names" else "left")
        for row in cells:
            table.add_row(*row)
        _console(highlight=False, soft_wrap=True).print(table)
    else:  # plain columns for pipes and files: no box drawing, no markup
        widths = [max(len(c) for c in column) for column in zip(header, *cells, strict=True)]
        text = [title] + [
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *cells]
        ]
        click.echo("\n".join(text).replace("\\[", "["))
    for group in report.groups[:SHOWN_TIES]:
        lines.print(f"  {group.kind}: {_names(group.names)}")
    if more := _more_lines(len(report.groups), SHOWN_TIES, "groups of names that share bytes"):
        lines.print(more)
    _render_reading(report.wrapper, report.prefixes_removed, report.skipped, lines)
    for kind, names in report.globals.items():
        lines.print(f"  globals, {kind}: {_names(names)}")
    summary = (
        f"  {len(report.tensors)} names, {human_bytes(report.bytes_stored)} stored for "
        f"{human_bytes(report.bytes_all_names)}: {human_bytes(report.bytes_saved)} saved by ties"
    )
    if grouped:
        summary += f"; names that differ only in their numbers are grouped ({len(rows)} rows; --all lists each)"
    lines.print(summary)


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """``--version``: converter.__version__, read from the installed metadata only when asked."""
    if not value or ctx.resilient_parsing:
        return
    from . import __version__

    click.echo(f"tiesafe, version {__version__}")
    ctx.exit()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the version and exit.",
)
def main(debug: bool) -> None:
    """Convert PyTorch checkpoints to safetensors, keeping tied weights tied.

    No code from a checkpoint is ever run.
    """
    fix_mmap_threshold()  # this process is the command's own: see libc.fix_mmap_threshold


_Decorator = Callable[[Callable[..., None]], Callable[..., None]]


def _reading_options() -> list[_Decorator]:
    """How a checkpoint's names are read: shared by convert, batch, inspect and verify."""
    return [
        click.option(
            "--strip-prefix",
            multiple=True,
            metavar="PREFIX",
            help="Remove PREFIX from the tensor names that carry it (repeatable), e.g. Lightning's 'model.'.",
        ),
        click.option(
            "--keep-names",
            is_flag=True,
            help="Keep a '_orig_mod.' (torch.compile) or 'module.' (DDP) prefix that every name carries.",
        ),
    ]


def _with_reading_options(command: Callable[..., None]) -> Callable[..., None]:
    for option in reversed(_reading_options()):
        command = option(command)
    return command


def _conversion_options(command: Callable[..., None]) -> Callable[..., None]:
    """The options ``convert`` and ``batch`` share (folder options apply to model folders)."""
    options: list[_Decorator] = [
        click.option("--no-verify", is_flag=True, help="Skip the bit-for-bit check of the output."),
        click.option(
            "--materialize-views",
            is_flag=True,
            help="Write views (q/k/v slices, transposes) as ordinary tensors so every loader sees them.",
        ),
        click.option(
            "--max-shard-size",
            default="5GB",
            show_default=True,
            help="Folders: largest shard, e.g. 500MB, 2GiB or a number of bytes.",
        ),
        click.option("--dedup-identical", is_flag=True, help="Folders: store bit-identical tensors once, as copies."),
        click.option("--allow-untied", is_flag=True, help="Folders: keep both when tensors the config ties differ."),
        *_reading_options(),
        click.option(
            "--strict",
            is_flag=True,
            help="Refuse a pickle that names any global beyond tensor machinery (default: such objects are "
            "read as inert placeholders and skipped; globals that run code are always refused).",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command("convert")
@click.argument("src", type=click.Path(path_type=str))
@click.argument("dst", required=False, type=click.Path(path_type=str))
@_conversion_options
@click.option(
    "--key", help="Entry holding the weights in a training checkpoint, e.g. 'model/ema' (files, DCP folders)."
)
@click.option("--delete-source", is_flag=True, help="Folders: remove the pickles once the output verified.")
@click.option(
    "--dtype",
    type=click.Choice(["bf16", "fp16", "fp32"]),
    help="Training runs: cast floating tensors while streaming (as tensor.to(dtype) rounds). Default: as saved.",
)
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=str),
    help="Training runs: the model's config.json (ties it declares; copied to DST). Default: the run folder's.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Training runs: output shards written in parallel by N processes (each shard one task).",
)
@click.option(
    "--scheduler",
    metavar="ADDRESS",
    help="Training runs: write the shards on a Dask cluster (tcp://host:8786, or local:N). Needs tiesafe[dask].",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def convert_command(
    src: str,
    dst: str | None,
    no_verify: bool,
    materialize_views: bool,
    key: str | None,
    max_shard_size: str,
    dedup_identical: bool,
    allow_untied: bool,
    strip_prefix: tuple[str, ...],
    keep_names: bool,
    strict: bool,
    delete_source: bool,
    dtype: str | None,
    config: str | None,
    workers: int | None,
    scheduler: str | None,
    overwrite: bool,
    as_json: bool,
) -> None:
    """Convert checkpoint SRC (a .bin/.pt/.pth/.ckpt file, a model folder or a training run) to safetensors.

    \b
    A file: DST defaults to SRC's folder, pytorch_model.bin -> model.safetensors, x.pt -> x.safetensors.
    A folder: the names its library loads (model[.VARIANT].safetensors, diffusion_pytorch_model...,
    adapter_model..., shards + index), written in DST (default: SRC itself), with every other file
    of SRC copied; a diffusers pipeline or sentence-transformers model is converted whole.
    A training run (DeepSpeed ZeRO folder with 'latest' or a global_stepN folder; a
    torch.distributed.checkpoint folder): the gathered weights, laid out as a folder (default:
    the run folder), with config.json and tokenizer files carried over.
    """
    run_only = {"--dtype": dtype, "--config": config, "--workers": workers, "--scheduler": scheduler}
    if Path(src).is_dir() and _is_training_run(Path(src)):
        if delete_source:
            raise click.UsageError("--delete-source does not apply to training runs (their files are not weights only)")
        if strip_prefix or keep_names or strict:
            raise click.UsageError(
                "--strip-prefix, --keep-names and --strict apply to pickle checkpoints and folders, "
                "not to training runs (their names are the model's own)"
            )
        if workers is not None and scheduler is not None:
            raise click.UsageError("give --workers or --scheduler, not both")
        _convert_run(
            src,
            dst,
            no_verify,
            key,
            max_shard_size,
            allow_untied,
            dtype,
            config,
            workers,
            scheduler,
            overwrite,
            as_json,
        )
        return
    given = [name for name, value in run_only.items() if value is not None]
    if given:
        raise click.UsageError(f"{given[0]} applies to training runs (DeepSpeed or DCP folders) only")
    if Path(src).is_dir():
        from .folder import convert_folder

        folder_report = convert_folder(
            src,
            dst,
            max_shard_size=max_shard_size,
            verify=not no_verify,
            materialize_views=materialize_views,
            dedup_identical=dedup_identical,
            allow_untied=allow_untied,
            delete_source=delete_source,
            overwrite=overwrite,
            strict=strict,
            strip_prefix=strip_prefix,
            keep_names=keep_names,
        )
        if as_json:
            _print_json(folder_report.to_dict())
        else:
            _render_folder(folder_report, _Lines())
        return
    from .convert import convert_file

    report = convert_file(
        src,
        dst,
        verify=not no_verify,
        materialize_views=materialize_views,
        key=key,
        overwrite=overwrite,
        strict=strict,
        strip_prefix=strip_prefix,
        keep_names=keep_names,
    )
    if as_json:
        _print_json(report.to_dict())
    else:
        _render_conversion(report, _Lines())


def _convert_run(
    src: str,
    dst: str | None,
    no_verify: bool,
    key: str | None,
    max_shard_size: str,
    allow_untied: bool,
    dtype: str | None,
    config: str | None,
    workers: int | None,
    scheduler: str | None,
    overwrite: bool,
    as_json: bool,
) -> None:
    from .run import convert_run

    with contextlib.ExitStack() as stack:
        executor = None
        if scheduler is not None:
            from .dask_executor import DaskExecutor, dask_client

            executor = DaskExecutor(stack.enter_context(dask_client(scheduler)))
        report = convert_run(
            src,
            dst,
            max_shard_size=max_shard_size,
            dtype=dtype,
            key=key,
            config=config,
            verify=not no_verify,
            allow_untied=allow_untied,
            overwrite=overwrite,
            workers=workers,
            executor=executor,
        )
    if as_json:
        _print_json(report.to_dict())
    else:
        _render_folder(report, _Lines())


@main.command("inspect")
@click.argument("path", type=click.Path(dir_okay=False, path_type=str))
@click.option("--key", help="Entry holding the weights in a training checkpoint.")
@_with_reading_options
@click.option(
    "--all",
    "show_all",
    is_flag=True,
    help=f"One row per name (beyond {LONG_LISTING} names they are grouped by pattern).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (every name).")
def inspect_command(
    path: str, key: str | None, strip_prefix: tuple[str, ...], keep_names: bool, show_all: bool, as_json: bool
) -> None:
    """List the tensors of PATH (.bin/.pt or .safetensors), their ties and bytes.

    For a pickle, also what is not converted and the globals it names: tensor
    machinery, inert objects, and refused globals (then convert refuses the file).

    \b
    A long listing groups names that differ only in their numbers:
    model.layers.{0..60}.mlp.experts.{0..255}.gate_proj.weight  BF16  [32, 32]  ...  × 15,616
    On a terminal it is a table; piped or redirected, plain columns.
    """
    from .convert import inspect

    report = inspect(path, key=key, strip_prefix=strip_prefix, keep_names=keep_names)
    if as_json:
        _print_json(report.to_dict())
    else:
        _render_inspect(report, show_all=show_all)


@main.command("verify")
@click.argument("src", type=click.Path(dir_okay=False, path_type=str))
@click.argument("dst", type=click.Path(dir_okay=False, path_type=str))
@click.option("--key", help="Entry holding the weights in a training checkpoint.")
@_with_reading_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify_command(
    src: str, dst: str, key: str | None, strip_prefix: tuple[str, ...], keep_names: bool, as_json: bool
) -> None:
    """Check that safetensors DST gives every tensor of SRC bit for bit, ties included."""
    from .convert import verify_file

    report = verify_file(src, dst, key=key, strip_prefix=strip_prefix, keep_names=keep_names)
    if as_json:
        _print_json({"ok": True, **report.__dict__})
    else:
        click.echo(
            f"OK: {report.names} names match bit for bit ({report.tied_names} tied), "
            f"{human_bytes(report.bytes_compared)} compared"
        )


@main.command("batch")
@click.argument("root", type=click.Path(file_okay=False, path_type=str))
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=str), help="Mirror the tree here.")
@click.option("--in-place", is_flag=True, help="Write each output beside its source instead of under --out.")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="Items converted in parallel (default: one per core, at most 2; see README).",
)
@click.option(
    "--scheduler",
    metavar="ADDRESS",
    help="Run the items on a Dask cluster: its scheduler (tcp://host:8786), or local:N to start N worker "
    "processes here. Workers must see ROOT and OUTROOT at the same paths. Needs tiesafe[dask].",
)
@click.option("--force", is_flag=True, help="Convert again what the manifest says is done and unchanged.")
@click.option(
    "--dry-run", is_flag=True, help="List what would be converted and the bytes it would save; write nothing."
)
@_conversion_options
@click.option("--quiet", is_flag=True, help="Print only the summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
def batch_command(
    root: str,
    out: str | None,
    in_place: bool,
    workers: int | None,
    scheduler: str | None,
    force: bool,
    dry_run: bool,
    no_verify: bool,
    materialize_views: bool,
    max_shard_size: str,
    dedup_identical: bool,
    allow_untied: bool,
    strip_prefix: tuple[str, ...],
    keep_names: bool,
    strict: bool,
    quiet: bool,
    as_json: bool,
) -> None:
    """Convert every model folder and loose checkpoint under ROOT.

    Resumable: a manifest under the output root records finished items; a rerun
    skips what is done and unchanged. Exits 2 if any item failed.
    """
    if (out is None) == (not in_place):
        raise click.UsageError("give exactly one of --out OUTROOT and --in-place")
    if workers is not None and scheduler is not None:
        raise click.UsageError("give --workers or --scheduler, not both (local:N starts N workers)")
    from .batch import BatchReport, convert_tree, discover, process_peak_rss
    from .dask_executor import dask_client

    options: dict[str, Any] = {
        "max_shard_size": max_shard_size,
        "verify": not no_verify,
        "materialize_views": materialize_views,
        "dedup_identical": dedup_identical,
        "allow_untied": allow_untied,
        "strict": strict,
        "strip_prefix": list(strip_prefix),
        "keep_names": keep_names,
    }
    started = time.perf_counter()
    console = _console(highlight=False, soft_wrap=True, stderr=as_json, quiet=quiet)
    results = []
    items = discover(root, out, in_place=in_place)  # a bad ROOT fails before a cluster starts
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(dask_client(scheduler)) if scheduler else None
        if client is not None:
            threads = client.nthreads()
            console.print(
                f"Dask scheduler {client.scheduler.address}: {len(threads)} workers, {sum(threads.values())} threads"
            )
        from .progress import BatchProgress

        progress = stack.enter_context(BatchProgress(items, console))
        for result in convert_tree(
            root,
            out,
            in_place=in_place,
            workers=workers,
            client=client,
            force=force,
            dry_run=dry_run,
            on_start=progress.start,
            **options,
        ):
            progress.finish(result)
            results.append(result)
    report = BatchReport(root, out or root, results, time.perf_counter() - started, process_peak_rss())
    if as_json:
        _print_json(report.to_dict())
    else:
        _render_batch_summary(report, _console(highlight=False, soft_wrap=True))
    if report.failed:
        sys.exit(EXIT_USER)


@main.command("prepare-upload")
@click.argument("source", metavar="FOLDER_OR_REPO_ID")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=str),
    help="The upload-ready folder to create (default: NAME-upload beside FOLDER, or in the current folder).",
)
@click.option("--revision", help="Repo ids: the branch, tag or commit of the cached snapshot (default: main).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest shard, e.g. 500MB, 2GiB or bytes.")
@click.option("--keep-pickles", is_flag=True, help="Upload the pickles too (each is checked for imports).")
@click.option("--materialize-views", is_flag=True, help="Store views as tensors so that every loader sees them.")
@click.option("--dedup-identical", is_flag=True, help="Store bit-identical tensors once, as copies.")
@click.option("--allow-untied", is_flag=True, help="Keep both when tensors the config ties differ.")
@click.option("--push", "push_to", metavar="REPO_ID", help="Once every check passed, upload to REPO_ID in one commit.")
@click.option("--pr", is_flag=True, help="With --push: open a pull request instead of committing to main.")
@click.option("--message", help="With --push: the commit title.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def prepare_upload_command(
    source: str,
    out: str | None,
    revision: str | None,
    max_shard_size: str,
    keep_pickles: bool,
    materialize_views: bool,
    dedup_identical: bool,
    allow_untied: bool,
    push_to: str | None,
    pr: bool,
    message: str | None,
    as_json: bool,
) -> None:
    """Check a model folder, or a repo in the local Hugging Face cache, and build an upload-ready folder.

    \b
    Pickled weights are converted and verified, every other file carried over, and each check
    reported as pass / warn / fail: pickles, conversion, config, from_pretrained, shards and
    names only tiesafe restores. The folder appears only when no check failed. Exits 2 if one did.
    With --push, the folder is then uploaded through huggingface_hub (token: HF_TOKEN or hf auth login).
    """
    if (pr or message) and not push_to:
        raise click.UsageError("--pr and --message go with --push REPO_ID")
    from .hub import prepare_upload, push

    report = prepare_upload(
        source,
        out,
        revision=revision,
        max_shard_size=max_shard_size,
        keep_pickles=keep_pickles,
        materialize_views=materialize_views,
        dedup_identical=dedup_identical,
        allow_untied=allow_untied,
    )
    console = _console(highlight=False, soft_wrap=True)
    try:
        if push_to and report.ok:
            report.push = push(report, push_to, pr=pr, message=message)
    finally:  # the report is shown even when the push fails (the error line follows it)
        if as_json:
            _print_json(report.to_dict())
        else:
            _render_upload(report, console)
    if not report.ok:
        sys.exit(EXIT_USER)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
