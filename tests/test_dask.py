"""Batch conversion on a Dask LocalCluster (loopback): same outputs, same manifest, survives a dead worker."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from test_batch import _build_tree, _outputs

import converter
from converter.batch import MANIFEST, convert_tree, discover
from converter.cli import main
from converter.errors import TiesafeError
from converter.writer import TEMP_SUFFIX

pytest.importorskip("distributed")
import dask  # installed with distributed

from converter.dask_executor import DaskExecutor, check_workers, dask_client


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    """Two single-threaded worker processes on 127.0.0.1, shared by the tests of this module."""
    with dask_client("local:2") as client:
        yield client


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    _build_tree(tmp_path / "src")
    return tmp_path / "src"


def _manifest(out: Path) -> list[dict[str, Any]]:
    entries = [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]
    for entry in entries:
        entry.pop("finished")
    return sorted(entries, key=lambda e: e["item"])


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "converter", *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )


def test_cli_scheduler_local_writes_what_the_local_batch_writes(tree: Path, tmp_path: Path) -> None:
    list(convert_tree(tree, tmp_path / "local", workers=1))
    result = _cli("batch", str(tree), "--out", str(tmp_path / "dask"), "--scheduler", "local:2", "--json")
    assert result.returncode == 2, result.stderr  # loose/broken.bin fails, the rest converts
    report = json.loads(result.stdout)
    assert report["counts"] == {"converted": 4, "failed": 1}
    assert "Dask scheduler tcp://127.0.0.1:" in result.stderr and "2 workers" in result.stderr
    assert _outputs(tmp_path / "dask") == _outputs(tmp_path / "local")
    assert _manifest(tmp_path / "dask") == _manifest(tmp_path / "local")


def test_client_resumes_like_the_local_batch_and_force_reruns(client: Any, tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = {r.item: r.status for r in convert_tree(tree, out, client=client)}
    assert sorted(first.values()) == ["converted"] * 4 + ["failed"]
    again = {r.item: r.status for r in convert_tree(tree, out, client=client)}
    assert again == {**{k: "unchanged" for k in first}, "loose/broken.bin": "failed"}
    forced = {r.item: r.status for r in convert_tree(tree, out, client=client, force=True)}
    assert forced == first  # pure=False: a rerun converts again instead of reusing Dask's cached result
    assert len(_manifest(out)) == 8  # 4 items recorded by the first run and 4 by the forced one


def test_dry_run_on_the_cluster_writes_nothing(client: Any, tree: Path, tmp_path: Path) -> None:
    results = {r.item: r for r in convert_tree(tree, tmp_path / "out", client=client, dry_run=True)}
    assert results["zoo/llama"].status == "planned" and results["zoo/llama"].bytes_saved > 0
    assert not (tmp_path / "out").exists()


def test_executor_gives_the_largest_item_its_own_worker(client: Any) -> None:
    """Longest first, one call per free worker: the long call's worker takes nothing else."""

    def busy(seconds: float) -> int:  # a closure: Dask ships it by value, workers need not import this module
        time.sleep(seconds)
        return os.getpid()

    executor = DaskExecutor(client)
    futures = [executor.submit(busy, s) for s in (1.2, 0.2, 0.2, 0.2)]  # 0.6 s on one worker < 1.2 s
    pids = [f.result(timeout=30) for f in futures]
    executor.shutdown()
    assert len(set(pids)) == 2
    assert pids[0] not in pids[1:]  # the three short calls ran on the other worker, one after another


def _writer_of_a_temporary(pids: dict[str, int], out: Path) -> tuple[int, str] | None:
    """A worker process that holds an output's temporary file open right now."""
    for pid in pids.values():
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(str(out)) and target.endswith(TEMP_SUFFIX):
                    return pid, target
        except OSError:  # the fd closed while we looked
            continue
    return None


def _kill_a_writer(pids: dict[str, int], out: Path, killed: list[tuple[int, str]]) -> None:
    """SIGKILL the first worker seen writing an output; note its pid and temporary file."""
    deadline = time.monotonic() + 60
    while not killed and time.monotonic() < deadline:
        found = _writer_of_a_temporary(pids, out)
        if found:
            os.kill(found[0], signal.SIGKILL)
            killed.append(found)
        time.sleep(0.001)


def test_worker_killed_mid_item_the_item_is_converted_once_elsewhere(client: Any, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for i in range(6):  # large enough that a write takes tens of milliseconds
        weight = torch.randn(4_000_000 + i)
        torch.save({"embed": weight, "head": weight, "bias": torch.randn(16)}, source / f"run{i}.pt")
    list(convert_tree(source, tmp_path / "reference", workers=1))
    out = tmp_path / "out"
    pids: dict[str, int] = client.run(os.getpid)
    killed: list[tuple[int, str]] = []
    killer = threading.Thread(target=_kill_a_writer, args=(pids, out, killed))
    killer.start()
    results = list(convert_tree(source, out, client=client))
    killer.join()
    client.wait_for_workers(2)  # the nanny restarts the worker for the next tests

    assert killed, "no worker was caught writing"
    killed_pid, temporary = killed[0]
    assert killed_pid not in client.run(os.getpid).values()
    assert sorted(r.item for r in results) == [f"run{i}.pt" for i in range(6)]  # each item reported once
    assert all(r.status == "converted" for r in results), [r.error for r in results]
    assert [e["item"] for e in _manifest(out)] == [f"run{i}.pt" for i in range(6)]  # each recorded once
    assert not Path(temporary).exists() and not list(out.rglob(f"*{TEMP_SUFFIX}"))
    assert _outputs(out) == _outputs(tmp_path / "reference")
    item = Path(temporary).name.split(".")[1]  # .run3.safetensors.<random>.tiesafe-tmp -> run3
    loaded = converter.load_file(out / f"{item}.safetensors")
    assert loaded["head"] is loaded["embed"]


def test_an_item_whose_worker_keeps_dying_fails_alone_and_the_rerun_converts_it(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    for i in range(4):
        weight = torch.randn(4_000_000 + i)
        torch.save({"embed": weight, "head": weight}, source / f"run{i}.pt")
    out = tmp_path / "out"
    killed: list[tuple[int, str]] = []
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), dask_client("local:2") as client:
        pids: dict[str, int] = client.run(os.getpid)
        killer = threading.Thread(target=_kill_a_writer, args=(pids, out, killed))
        killer.start()
        results = {r.item: r for r in convert_tree(source, out, client=client)}
        killer.join()
    assert killed, "no worker was caught writing"
    temporary = Path(killed[0][1])
    item = temporary.name.split(".")[1] + ".pt"  # .run3.safetensors.<random>.tiesafe-tmp -> run3.pt
    assert results[item].status == "failed" and "KilledWorker" in (results[item].error or "")
    assert sorted(r.status for r in results.values()) == ["converted"] * 3 + ["failed"]
    assert not (out / item).with_suffix(".safetensors").exists()  # nothing under the final name
    again = {r.item: r.status for r in convert_tree(source, out, workers=1)}
    assert again[item] == "converted" and list(again.values()).count("unchanged") == 3
    assert not list(out.rglob(f"*{TEMP_SUFFIX}"))  # the dead worker's temporary file was cleaned up


def test_workers_must_see_the_tree(client: Any, tmp_path: Path) -> None:
    assert check_workers(client, tmp_path, tmp_path) == 2
    with pytest.raises(TiesafeError, match=r"Dask worker tcp://127\.0\.0\.1:\d+: .*missing is not a folder there"):
        check_workers(client, tmp_path / "missing")


def test_cli_without_dask_says_how_to_install_it(tree: Path, tmp_path: Path) -> None:
    # distributed made unimportable, as on a machine without the [dask] extra
    code = "import sys; sys.modules['distributed'] = None; from converter.cli import main; main()"
    args = ["batch", str(tree), "--out", str(tmp_path / "out"), "--scheduler", "local:2"]
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "pip install 'tiesafe[dask]'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_cli_unreachable_scheduler_and_bad_options(tree: Path, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nobody listens there
    args = ["batch", str(tree), "--out", str(tmp_path / "out")]
    result = _cli(
        *args, "--scheduler", f"tcp://127.0.0.1:{port}", env={"DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "1s"}
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port}" in result.stderr
    both = CliRunner().invoke(main, [*args, "--scheduler", "local:2", "--workers", "2"])
    assert both.exit_code == 2 and "--workers or --scheduler" in both.stderr
    bad = CliRunner().invoke(main, [*args, "--scheduler", "local:zero"])
    assert bad.exit_code == 2 and "local:N needs a number of workers" in bad.stderr
    assert not (tmp_path / "out").exists()
    assert discover(tree, tmp_path / "out")  # the tree itself was fine
