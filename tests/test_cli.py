"""The tiesafe command as users run it: output, --json, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from converter import cli, convert


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "converter", *args], capture_output=True, text=True)


@pytest.fixture
def tied_checkpoint(tmp_path: Path) -> Path:
    w = torch.randn(16, 8)
    path = tmp_path / "pytorch_model.bin"
    torch.save({"wte.weight": w, "lm_head.weight": w, "bias": torch.zeros(8)}, path)
    return path


def test_convert_then_inspect_then_verify(tied_checkpoint: Path) -> None:
    result = _run("convert", str(tied_checkpoint))
    assert result.returncode == 0, result.stderr
    assert "tied: lm_head.weight = wte.weight" in result.stdout
    assert "512 B saved" in result.stdout
    output = tied_checkpoint.with_name("model.safetensors")
    inspected = _run("inspect", str(output), "--json")
    assert inspected.returncode == 0
    rows = {t["name"]: t["stored_as"] for t in json.loads(inspected.stdout)["tensors"]}
    assert rows == {"wte.weight": "stored", "bias": "stored", "lm_head.weight": "alias of wte.weight"}
    verified = _run("verify", str(tied_checkpoint), str(output), "--json")
    assert verified.returncode == 0 and json.loads(verified.stdout)["ok"] is True


def test_convert_json_report(tied_checkpoint: Path, tmp_path: Path) -> None:
    result = _run("convert", str(tied_checkpoint), str(tmp_path / "out.safetensors"), "--json")
    report = json.loads(result.stdout)
    assert report["aliases"] == {"lm_head.weight": "wte.weight"}
    assert report["bytes_saved"] == 512 and report["verified"] is True


def test_inspect_a_checkpoint(tied_checkpoint: Path) -> None:
    result = _run("inspect", str(tied_checkpoint))
    assert result.returncode == 0
    assert "alias of wte.weight" in result.stdout and "alias: wte.weight, lm_head.weight" in result.stdout


def test_bad_input_is_one_line_exit_2_and_no_output(tmp_path: Path) -> None:
    bad = tmp_path / "broken.bin"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    result = _run("convert", str(bad))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"tiesafe: error: {bad}: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.bin"]


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "broken.bin"
    bad.write_bytes(b"")
    result = _run("--debug", "convert", str(bad))
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_existing_output_needs_overwrite(tied_checkpoint: Path) -> None:
    assert _run("convert", str(tied_checkpoint)).returncode == 0
    again = _run("convert", str(tied_checkpoint))
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert _run("convert", str(tied_checkpoint), "--overwrite").returncode == 0


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert _run("convert").returncode == 2
    assert _run("frobnicate").returncode == 2


def test_verify_detects_a_flipped_byte(tied_checkpoint: Path) -> None:
    assert _run("convert", str(tied_checkpoint)).returncode == 0
    output = tied_checkpoint.with_name("model.safetensors")
    data = bytearray(output.read_bytes())
    data[-1] ^= 0x01
    output.write_bytes(bytes(data))
    result = _run("verify", str(tied_checkpoint), str(output))
    assert result.returncode == 2 and "differs from the source" in result.stderr


def test_internal_errors_exit_1_without_traceback(tied_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(convert, "convert_file", boom)  # the command imports it when it runs
    result = CliRunner().invoke(cli.main, ["convert", str(tied_checkpoint)])
    assert result.exit_code == 1
    assert "internal error: RuntimeError: simulated bug" in result.output and "Traceback" not in result.output


def test_console_script_is_installed() -> None:
    result = subprocess.run([Path(sys.executable).with_name("tiesafe"), "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and "tiesafe" in result.stdout


def test_hostile_names_cannot_drive_the_terminal(tmp_path: Path) -> None:
    """Names come from the file: escape sequences and markup are printed as text."""
    w = torch.randn(2, 2)
    hostile = "evil\x1b[2J[red]name[/]"
    path = tmp_path / "x.bin"
    torch.save({"w": w, hostile: w}, path)
    for args in (["convert", str(path)], ["inspect", str(path)]):
        result = _run(*args)
        assert result.returncode == 0, result.stderr
        assert "\x1b[2J" not in result.stdout and "\\x1b" in result.stdout
        assert "[red]name[/]" in result.stdout  # the markup is shown, not applied


def test_the_command_fixes_its_own_mmap_threshold(tied_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes

    from converter import libc

    calls: list[bool] = []
    monkeypatch.setattr(cli, "fix_mmap_threshold", lambda: calls.append(True) or True)
    assert CliRunner().invoke(cli.main, ["inspect", str(tied_checkpoint)]).exit_code == 0
    assert calls == [True]  # the command's process; importing the library sets nothing
    if sys.platform.startswith("linux") and libc.libc_function("gnu_get_libc_version", (), ctypes.c_char_p):
        assert libc.fix_mmap_threshold()  # glibc takes the setting
    assert libc.libc_function("no_such_function_in_libc", ()) is None
