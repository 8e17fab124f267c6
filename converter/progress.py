"""Show a batch run as it goes: a live display on a terminal, plain lines elsewhere."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from .batch import BatchItem, ItemResult
from .reports import shown

_SHOWN_IN_FLIGHT = 4  # names in the live line; a large cluster's others are counted


def _line(result: ItemResult) -> str:
    if result.status == "failed":
        return f"[red]failed[/]     {shown(result.item)}: {shown(result.error)}"
    saved = f", {result.bytes_saved / 2**20:.1f} MiB saved" if result.bytes_saved else ""
    return f"{result.status:<10} {shown(result.item)} ({result.seconds:.1f} s{saved})"


class BatchProgress:
    """Items done/total, bytes, throughput, ETA and the items in flight; a line per finished item.

    On a terminal the live line names the items being converted ("current: a, b");
    elsewhere (a log, a pipe) a ``started`` line says which items are in flight.

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
        self._in_flight: dict[str, None] = {}  # keys of started, unfinished items, in start order
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

    @property
    def in_flight(self) -> list[str]:
        """The items started and not finished yet, oldest first."""
        return list(self._in_flight)

    def status(self) -> str:
        """The live line's text: ``"3/15 items  current: a, b"``."""
        names = [shown(key) for key in self._in_flight]
        more = len(names) - _SHOWN_IN_FLIGHT
        current = ", ".join(names[:_SHOWN_IN_FLIGHT]) + (f" and {more} more" if more > 0 else "")
        return f"{self._done}/{self._count} items" + (f"  current: {current}" if current else "")

    def _describe(self) -> None:
        if self._live is not None:
            self._live.update(self._task, description=self.status())

    def start(self, item: BatchItem) -> None:
        """An item went to a worker (``convert_tree``'s ``on_start``)."""
        self._in_flight[item.key] = None
        if self._live is None:
            others = ", ".join(shown(key) for key in self._in_flight if key != item.key)
            self._console.print(f"{'started':<10} {shown(item.key)}" + (f" (also running: {others})" if others else ""))
        self._describe()

    def finish(self, result: ItemResult) -> None:
        """An item ended: converted, unchanged, failed or planned."""
        self._in_flight.pop(result.item, None)
        self._done += 1
        self._console.print(_line(result))
        if self._live is not None:
            self._live.advance(self._task, self._sizes.get(result.item, 0))
            self._describe()
