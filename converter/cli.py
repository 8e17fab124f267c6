"""The ``tiesafe`` command: parse, call the public API, print. Nothing else.

Exit codes: 0 success, 2 the input or the usage is at fault (one line on
stderr), 1 an internal error (a bug: ``--debug`` shows the traceback).
"""

from __future__ import annotations

import json
import re
import sys
from typing import TYPE_CHECKING, Any

import click

from . import __version__, convert_file, inspect, verify_file
from .convert import ConversionReport, InspectReport
from .errors import TiesafeError

if TYPE_CHECKING:
    from rich.console import Console

EXIT_INTERNAL = 1
EXIT_USER = 2


def human_bytes(n: int) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


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

        click.echo(self._MARKUP.sub(styled, text))


def _rich_console() -> Console:
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def _print_json(data: dict[str, Any]) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _render_conversion(report: ConversionReport, console: Console | _Lines) -> None:
    console.print(f"[bold]{report.source}[/] -> [bold]{report.output}[/]")
    console.print(
        f"  {report.tensors} tensors, {report.stored} stored; "
        f"{len(report.aliases)} aliases, {len(report.views)} views"
        + (f", {len(report.materialized)} views written as tensors" if report.materialized else "")
    )
    for alias, stored in report.aliases.items():
        console.print(f"  tied: {alias} = {stored}")
    if report.views:
        console.print(
            "  restored only by tiesafe (plain loaders skip them; --materialize-views writes them): "
            + ", ".join(report.views)
        )
    if report.skipped:
        console.print(f"  skipped non-tensor entries: {', '.join(report.skipped)}")
    console.print(
        f"  {human_bytes(report.bytes_written)} written for {human_bytes(report.bytes_all_names)} of tensors: "
        f"[green]{human_bytes(report.bytes_saved)} saved[/]"
        + ("; verified bit for bit" if report.verified else "; not verified (--no-verify)")
        + f" in {report.seconds:.2f} s"
    )


def _render_inspect(report: InspectReport, console: Console) -> None:
    from rich.table import Table

    table = Table(title=f"{report.path} ({report.format})")
    for column in ("name", "dtype", "shape", "bytes", "stored as"):
        table.add_column(column)
    for t in report.tensors:
        table.add_row(t.name, t.dtype, str(t.shape), human_bytes(t.nbytes), t.stored_as)
    console.print(table)
    for group in report.groups:
        console.print(f"  {group.kind}: {', '.join(group.names)}")
    if report.skipped:
        console.print(f"  skipped non-tensor entries: {', '.join(report.skipped)}")
    console.print(
        f"  {len(report.tensors)} names, {human_bytes(report.bytes_stored)} stored for "
        f"{human_bytes(report.bytes_all_names)}: {human_bytes(report.bytes_saved)} saved by ties"
    )


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(__version__, prog_name="tiesafe")
def main(debug: bool) -> None:
    """Convert PyTorch checkpoints to safetensors, keeping tied weights tied.

    No code from a checkpoint is ever run.
    """


@main.command("convert")
@click.argument("src", type=click.Path(dir_okay=False, path_type=str))
@click.argument("dst", required=False, type=click.Path(path_type=str))
@click.option("--no-verify", is_flag=True, help="Skip the bit-for-bit check of the output.")
@click.option(
    "--materialize-views",
    is_flag=True,
    help="Write views (q/k/v slices, transposes) as ordinary tensors so every loader sees them.",
)
@click.option("--key", help="Entry holding the weights in a training checkpoint, e.g. 'model/ema'.")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def convert_command(
    src: str, dst: str | None, no_verify: bool, materialize_views: bool, key: str | None, overwrite: bool, as_json: bool
) -> None:
    """Convert checkpoint SRC (.bin/.pt/.pth/.ckpt) to safetensors DST.

    DST defaults to SRC's folder: pytorch_model.bin -> model.safetensors, x.pt -> x.safetensors.
    """
    report = convert_file(
        src, dst, verify=not no_verify, materialize_views=materialize_views, key=key, overwrite=overwrite
    )
    if as_json:
        _print_json(report.to_dict())
    else:
        _render_conversion(report, _Lines())


@main.command("inspect")
@click.argument("path", type=click.Path(dir_okay=False, path_type=str))
@click.option("--key", help="Entry holding the weights in a training checkpoint.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect_command(path: str, key: str | None, as_json: bool) -> None:
    """List the tensors of PATH (.bin/.pt or .safetensors), their ties and bytes."""
    report = inspect(path, key=key)
    if as_json:
        _print_json(report.to_dict())
    else:
        _render_inspect(report, _rich_console())


@main.command("verify")
@click.argument("src", type=click.Path(dir_okay=False, path_type=str))
@click.argument("dst", type=click.Path(dir_okay=False, path_type=str))
@click.option("--key", help="Entry holding the weights in a training checkpoint.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify_command(src: str, dst: str, key: str | None, as_json: bool) -> None:
    """Check that safetensors DST gives every tensor of SRC bit for bit, ties included."""
    report = verify_file(src, dst, key=key)
    if as_json:
        _print_json({"ok": True, **report.__dict__})
    else:
        click.echo(
            f"OK: {report.names} names match bit for bit ({report.tied_names} tied), "
            f"{human_bytes(report.bytes_compared)} compared"
        )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
