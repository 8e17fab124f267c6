"""Run a batch on a Dask cluster: connect to it (or start one here) and feed it.

``convert_tree`` plans, resumes, records and reports; this module only gives it
an executor whose workers are Dask's. Workers read and write through the paths
the client sees, so they need a shared filesystem mounted at the same place.

Why not ``client.get_executor()``: it sends every item to the scheduler at
once, and a small batch is placed on workers before the scheduler knows how
long anything takes (it learns durations per kind of task, never the bytes of
an item): calls of 0.9, 0.2, 0.2 and 0.2 s on two workers often end as 1.1 s
on one and 0.4 s on the other. And when a worker dies, every call queued on it
counts as a suspect, not only the one it was running. :class:`DaskExecutor`
keeps the queue here and sends the next call, largest first, only when a
worker thread is free: greedy longest-first scheduling, the classic balance by
size. It costs one client round trip per item (6 ms on the 2-core test
machine, against 2 ms), nothing next to converting a checkpoint. Dask still
does what it does well: it reruns elsewhere a task whose worker died (up to
``distributed.scheduler.allowed-failures`` times), and the writer is atomic,
so a death leaves no partial file under a final name.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import TiesafeError

INSTALL_HINT = "pip install 'tiesafe[dask]'"
LOCAL_PREFIX = "local"
_POLL_SECONDS = 1.0  # how often a waiting queue looks for workers that joined


def _distributed() -> Any:
    """The ``distributed`` package, or a one-line error saying how to install it."""
    try:
        import distributed
    except ImportError as exc:
        raise TiesafeError(
            f"running on a Dask cluster needs dask[distributed], which is not installed ({exc}): {INSTALL_HINT}"
        ) from None
    return distributed


def _local_workers(address: str) -> int | None:
    """``local:N`` -> N; ``local`` -> the default worker count; anything else -> None."""
    name, _, count = address.partition(":")
    if name != LOCAL_PREFIX:
        return None
    if not count:
        from .batch import default_workers

        return default_workers()
    if not count.isdigit() or int(count) < 1:
        raise TiesafeError(f"bad scheduler {address!r}: local:N needs a number of workers N >= 1")
    return int(count)


@contextlib.contextmanager
def dask_client(address: str, *, timeout: float | None = None) -> Iterator[Any]:
    """A Dask client on the scheduler at ``address``, or on a new local cluster for ``local:N``.

    ``local:N`` starts N single-threaded worker processes on 127.0.0.1 (the
    dashboard, if bokeh is installed, on a free port of 127.0.0.1) and stops
    them on exit; any other address (``tcp://host:8786``) is an existing
    scheduler, which is left running.

    Example:
        >>> with dask_client("local:2") as client:  # doctest: +SKIP
        ...     results = list(convert_tree("runs", "runs-st", client=client))
    """
    distributed = _distributed()
    workers = _local_workers(address)
    with contextlib.ExitStack() as stack:
        if workers is not None:
            cluster = distributed.LocalCluster(
                n_workers=workers,
                threads_per_worker=1,  # one item per process, as the local pool runs them
                processes=True,
                host="127.0.0.1",
                # None would still open the scheduler's HTTP server on every interface, port 8787
                dashboard_address="127.0.0.1:0",
                # tiesafe reports what happens to each item; Dask's own warnings (a slow worker
                # killed at close, a worker restarted) would only repeat it less clearly
                silence_logs=logging.ERROR,
            )
            stack.enter_context(cluster)
            address = cluster.scheduler_address
        try:
            timeouts = {} if timeout is None else {"timeout": timeout}
            client = distributed.Client(address, set_as_default=False, **timeouts)
        except (OSError, ValueError) as exc:  # a timeout is an OSError too
            raise TiesafeError(f"cannot reach the Dask scheduler at {address}: {exc}") from None
        stack.enter_context(client)
        yield client


def _probe(paths: list[tuple[str, bool]]) -> tuple[str, list[str]]:
    """Run on each worker: its tiesafe version and the problems it has with ``paths``."""
    from . import __version__

    problems = []
    for path, writable in paths:
        if not os.path.isdir(path):
            problems.append(f"{path} is not a folder there")
        elif writable and not os.access(path, os.W_OK | os.X_OK):
            problems.append(f"{path} is not writable there")
    return __version__, problems


def check_workers(client: Any, root: str | Path, out: str | Path | None = None) -> int:
    """Check that every worker runs this tiesafe and sees ``root`` (and can write ``out``).

    Workers open the paths the client gives them, so the trees must be on a
    filesystem they share, mounted at the same place. Returns the number of
    workers checked (workers that join later are not).

    Example:
        >>> check_workers(client, "/shared/runs", "/shared/runs-st")  # doctest: +SKIP
        8
    """
    paths = [(str(Path(root).absolute()), False)]
    if out is not None:
        paths.append((str(Path(out).absolute()), True))
    try:
        answers: dict[str, tuple[str, list[str]]] = client.run(_probe, paths)
    except (ImportError, AttributeError) as exc:  # the worker could not unpickle _probe
        raise TiesafeError(f"Dask workers cannot import tiesafe ({exc}): install it on every worker") from None
    from . import __version__

    for worker, (version, problems) in sorted(answers.items()):
        if version != __version__:
            raise TiesafeError(
                f"Dask worker {worker} runs tiesafe {version}, this client {__version__}: install the same on all"
            )
        if problems:
            raise TiesafeError(
                f"Dask worker {worker}: {'; '.join(problems)} "
                "(workers need the trees on a shared filesystem, at the same path)"
            )
    return len(answers)


_Call = tuple["concurrent.futures.Future[Any]", Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class DaskExecutor(concurrent.futures.Executor):
    """A ``concurrent.futures`` executor on a Dask cluster that runs calls in the order they
    were submitted and sends a call only when a worker thread is free.

    Submit the largest item first and each worker, when it frees up, takes the
    largest one left. A call whose worker dies is rerun by Dask on another
    worker; the returned future then resolves as usual. A call Dask gives up on
    (its workers died ``allowed-failures + 1`` times) fails with ``KilledWorker``.

    ``convert_tree(..., client=client)`` uses it, after checking the workers and
    making the paths absolute (workers do not share the client's working directory).

    Example:
        >>> executor = DaskExecutor(client)  # doctest: +SKIP
        >>> [f.result() for f in [executor.submit(pow, 2, n) for n in range(4)]]  # doctest: +SKIP
        [1, 2, 4, 8]
    """

    def __init__(self, client: Any) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._queue: deque[_Call] = deque()
        self._running: dict[Any, concurrent.futures.Future[Any]] = {}  # Dask future -> ours
        self._order = itertools.count()
        self._shutdown = False
        self._poller: threading.Thread | None = None
        self._threads_known = 1
        self._threads_asked = -_POLL_SECONDS

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._queue.append((future, fn, args, kwargs))
            self._send()
            if self._queue and self._poller is None:  # none, or it left when the queue emptied
                self._poller = threading.Thread(target=self._poll, name="tiesafe-dask-poller", daemon=True)
                self._poller.start()
        return future

    def _threads(self) -> int:
        """Worker threads in the cluster (at least one, so that a call waits there for workers).

        Asked of the scheduler at most once per poll: a round trip per item would
        leave workers idle between items for as long.
        """
        now = time.monotonic()
        if now - self._threads_asked >= _POLL_SECONDS:
            self._threads_asked = now
            try:
                self._threads_known = max(1, int(sum(self._client.nthreads().values())))
            except Exception:  # the scheduler is unreachable: keep one call there, its future reports it
                self._threads_known = 1
        return self._threads_known

    def _send(self) -> None:
        """Send waiting calls, first in first, while worker threads are free (holding the lock)."""
        free = self._threads() - len(self._running) if self._queue else 0
        while free > 0 and self._queue:
            future, fn, args, kwargs = self._queue.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                # pure=False: a rerun with --force must run again, not reuse a result.
                # priority: should calls wait on the scheduler (a worker died), first in runs first.
                task = self._client.submit(fn, *args, pure=False, priority=-next(self._order), **kwargs)
            except Exception as exc:
                future.set_exception(exc)
                continue
            self._running[task] = future
            task.add_done_callback(self._done)
            free -= 1

    def _poll(self) -> None:
        """While calls wait, look for workers that joined; leave when none waits."""
        while True:
            time.sleep(_POLL_SECONDS)
            with self._lock:
                if not self._queue:
                    self._poller = None
                    return
                self._send()

    def _done(self, task: Any) -> None:
        """Send the next call, then hand the task's outcome to our future (on Dask's callback thread)."""
        with self._lock:
            future = self._running.pop(task, None)
            self._send()  # here rather than in another thread: every hand-over costs the worker idle time
        if future is None or future.done():
            return
        try:
            if task.status == "finished":
                future.set_result(task.result())
            elif task.status == "cancelled":
                future.set_exception(concurrent.futures.CancelledError(f"Dask cancelled task {task.key}"))
            else:
                future.set_exception(task.exception())
        except Exception as exc:  # e.g. the result could not be fetched: the caller sees why
            if not future.done():
                future.set_exception(exc)
        finally:
            task.release()  # the worker may drop the result now

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking calls; ``cancel_futures`` drops the waiting ones and cancels those on the cluster."""
        with self._lock:
            self._shutdown = True
            futures = [call[0] for call in self._queue] + list(self._running.values())
            if cancel_futures:
                for future, *_ in self._queue:
                    future.cancel()
                self._queue.clear()
                tasks, self._running = list(self._running.items()), {}
                for task, future in tasks:
                    task.cancel()
                    future.set_exception(concurrent.futures.CancelledError("the executor was shut down"))
        if wait:
            concurrent.futures.wait(futures)
