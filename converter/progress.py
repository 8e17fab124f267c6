"""Show a batch run as it goes: a live display on a terminal, plain lines elsewhere."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from .batch import BatchItem, ItemResult


def _line(result: ItemResult) -> str:
    if result.status == "failed":
        return f"[red]failed[/]     {result.item}: {result.error}"
    saved = f", {result.bytes_saved / 2**20:.1f} MiB saved" if result.bytes_saved else ""
    return f"{result.status:<10} {result.item} ({result.seconds:.1f} s{saved})"


class BatchProgress:
    """Items done/total, bytes, throughput, ETA and the current item; one line per finished item.

    Example:
        >>> with BatchProgress(items, console) as progress:  # doctest: +SKIP
        ...     for result in convert_tree(root, out, on_start=progress.start):
        ...         progress.finish(result)
    """

    def __init__(self, items: list[BatchItem], console: Console) -> None:
        self._console = console
        self._sizes = {item.key: item.size for item in items}
        self._count = len(items)
        self._done = 0
        self._current = ""
        self._live: Progress | None = None
        if console.is_terminal:
            self._live = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(binary_units=True),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
            self._task = self._live.add_task("", total=sum(self._sizes.values()) or 1)

    def __enter__(self) -> BatchProgress:
        if self._live is not None:
            self._live.start()
            self._describe()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._live is not None:
            self._live.stop()

    def _describe(self) -> None:
        if self._live is not None:
            self._live.update(self._task, description=f"{self._done}/{self._count} items  {self._current}")

    def start(self, item: BatchItem) -> None:
        self._current = item.key
        self._describe()

    def finish(self, result: ItemResult) -> None:
        self._done += 1
        self._console.print(_line(result))
        if self._live is not None:
            self._live.advance(self._task, self._sizes.get(result.item, 0))
            self._describe()
