"""The hostile-input corpus through the CLI, the API and, as a control, torch.load.

For every case: nothing from the file runs (a sentinel file stays absent), the
CLI refuses with exactly one line naming the file and the problem and exit code 2
(or converts, when the input is sound), no traceback, no output and nothing new
in either folder, and the source is left byte for byte as it was.
"""

from __future__ import annotations

import copyreg
import hashlib
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from corpus import CASES, Case
from corpus import craft as c
from corpus.cli import run_cli
from helpers import same_bits

import converter
from converter import errors
from converter.readers import unpickler


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _build(case: Case, tmp_path: Path) -> tuple[list[Path], Path, Path]:
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    out.mkdir()
    sentinel = tmp_path / "sentinel"
    return case.build(folder, sentinel), out, sentinel


def _cli_args(case: Case, inputs: list[Path], out: Path) -> list[object]:
    if case.command == "convert":
        return ["convert", inputs[0], out / "model.safetensors"]
    return [case.command, *inputs]


def _api(case: Case, inputs: list[Path], out: Path) -> object:
    if case.command == "convert":
        return converter.convert_file(inputs[0], out / "model.safetensors")
    if case.command == "inspect":
        return converter.inspect(inputs[0])
    return converter.verify_file(inputs[0], inputs[1])


def test_the_corpus_is_large_and_varied() -> None:
    assert len(CASES) >= 40
    refused = [case for case in CASES if case.error]
    assert len(refused) >= 40 and len(CASES) - len(refused) >= 5
    assert sum(case.live for case in CASES) >= 15


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_cli(case: Case, tmp_path: Path) -> None:
    inputs, out, sentinel = _build(case, tmp_path)
    before = _snapshot(inputs[0].parent)
    result = run_cli(*_cli_args(case, inputs, out))
    assert not sentinel.exists(), "code from the file ran"
    assert _snapshot(inputs[0].parent) == before, "the input folder changed"
    assert "Traceback" not in result.stderr
    if case.error is None:
        assert result.returncode == 0, result.stderr
        output = out / "model.safetensors"
        assert converter.verify_file(inputs[0], output).names >= 1
        assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
        return
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and result.stderr.endswith("\n"), result.stderr[:2000]
    line = lines[0]
    assert line.startswith("tiesafe: error: "), line
    assert any(line.startswith(f"tiesafe: error: {p}: ") for p in [*inputs, out / "model.safetensors"]), line
    assert re.search(case.message, line), line
    assert len(line) < 600, "one short line"
    assert list(out.iterdir()) == [], "output folder not empty"


@pytest.mark.parametrize("case", [k for k in CASES if k.error], ids=[k.id for k in CASES if k.error])
def test_api_raises_the_specific_class(case: Case, tmp_path: Path) -> None:
    inputs, out, sentinel = _build(case, tmp_path)
    expected = getattr(errors, str(case.error))
    with pytest.raises(errors.TiesafeError) as caught:
        _api(case, inputs, out)
    assert type(caught.value) is expected, f"{type(caught.value).__name__}: {caught.value}"
    assert re.search(case.message, str(caught.value))
    assert not sentinel.exists()
    assert list(out.iterdir()) == []


_SAFETENSORS_CASES = [k for k in CASES if k.command == "inspect"]


@pytest.mark.parametrize("case", _SAFETENSORS_CASES, ids=[k.id for k in _SAFETENSORS_CASES])
def test_loader_refuses_bad_safetensors(case: Case, tmp_path: Path) -> None:
    inputs, _, _ = _build(case, tmp_path)
    with pytest.raises(getattr(errors, str(case.error)), match=case.message):
        converter.load_file(inputs[0])


def test_live_payloads_really_run_under_torch_load(tmp_path: Path) -> None:
    """The control: each 'live' payload does run when torch.load trusts the file, so its sentinel means something."""
    jobs = []
    for case in (k for k in CASES if k.live):
        root = tmp_path / case.id
        root.mkdir()
        inputs, _, sentinel = _build(case, root)
        jobs.append((case.id, str(inputs[0]), str(sentinel)))
    script = (
        "import json, sys, torch\n"
        "for _, path, _ in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        torch.load(path, weights_only=False)\n"
        "    except BaseException:\n"
        "        pass\n"
    )
    subprocess.run([sys.executable, "-c", script, json.dumps(jobs)], capture_output=True, timeout=300, cwd=tmp_path)
    ran = [case_id for case_id, _, sentinel in jobs if Path(sentinel).exists()]
    assert ran == [case_id for case_id, _, _ in jobs]


def _builder_state() -> list[object]:
    """Everything BUILD could change on the objects our unpickler hands out."""
    state = []
    for obj in unpickler._ALLOWED.values():
        for target in (obj, getattr(obj, "func", None)):  # a builder and the function it wraps
            state.append(repr(getattr(target, "__dict__", None)))
            state.append(repr(getattr(target, "__defaults__", None)))
            state.append(repr(getattr(target, "__kwdefaults__", None)))
    return state


def test_no_case_changes_the_unpickler_for_the_next_file(tmp_path: Path) -> None:
    before = _builder_state()
    for case in CASES:
        if case.command != "convert" or case.error is None:
            continue
        root = tmp_path / case.id
        root.mkdir()
        inputs, out, _ = _build(case, root)
        with pytest.raises(errors.TiesafeError):
            _api(case, inputs, out)
    assert _builder_state() == before


def test_extension_codes_are_refused_even_when_registered_and_cached(tmp_path: Path) -> None:
    """copyreg's extension cache is process-wide: a code another unpickler resolved must not reach us."""
    sentinel = tmp_path / "sentinel"
    code = 0x7FFF_FFF0
    copyreg.add_extension("os", "system", code)
    try:
        pickle.loads(b"\x80\x02\x84" + code.to_bytes(4, "little") + b".")  # another unpickler fills the cache
        payload = b"\x84" + code.to_bytes(4, "little") + c.tup(c.text(f"touch {sentinel}")) + c.REDUCE
        path = c.torch_zip(tmp_path / "ext.bin", c.program(c.state_dict(("evil", payload), ("w", c.simple_tensor()))))
        legacy = c.legacy(tmp_path / "ext-legacy.bin", c.program(c.state_dict(("evil", payload))))
        for source in (path, legacy):
            with pytest.raises(errors.UnsafeCheckpointError, match="extension code"):
                converter.convert_file(source, tmp_path / "out.safetensors")
        assert not sentinel.exists()
    finally:
        copyreg.remove_extension("os", "system", code)


def test_our_unpickler_does_not_fill_the_extension_cache(tmp_path: Path) -> None:
    code = 0x7FFF_FFF1
    copyreg.add_extension("torch._utils", "_rebuild_tensor_v2", code)
    try:
        body = c.state_dict(
            (
                "w",
                b"\x84"
                + code.to_bytes(4, "little")
                + c.simple_tensor()[len(c.glob("torch._utils", "_rebuild_tensor_v2")) :],
            )
        )
        path = c.torch_zip(tmp_path / "ext.bin", c.program(body))
        with pytest.raises(errors.UnsafeCheckpointError):
            converter.convert_file(path, tmp_path / "out.safetensors")
        assert code not in copyreg._extension_cache  # type: ignore[attr-defined]
    finally:
        copyreg.remove_extension("torch._utils", "_rebuild_tensor_v2", code)


def test_clean_cases_load_back_bit_for_bit(tmp_path: Path) -> None:
    """The sound members of the corpus are not merely accepted: they round-trip."""
    for case in (k for k in CASES if k.error is None):
        root = tmp_path / case.id
        root.mkdir()
        inputs, out, _ = _build(case, root)
        report = converter.convert_file(inputs[0], out / "model.safetensors")
        loaded = converter.load_file(report.output)
        try:
            source = torch.load(inputs[0], weights_only=False)  # our own benign files; protocol 1 is not weights-only
        except RuntimeError:  # a crafted pickle inside a real archive: torch sizes its storages differently
            source = {"w": torch.arange(8, dtype=torch.float32)[: len(loaded["w"])]} if "w" in loaded else {}
        source = {k: v for k, v in source.items() if isinstance(v, torch.Tensor)}
        assert set(loaded) == set(source), case.id
        assert all(same_bits(loaded[n], source[n]) for n in source), case.id


def test_the_opcode_walk_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pickle of millions of one-byte opcodes (cheap for the C unpickler) must not make the scan the bomb."""
    import io

    from converter.readers import pickle_guard

    monkeypatch.setattr(pickle_guard, "MAX_OPCODES", 1_000)
    small = c.program(b"N0" * 400 + c.NONE)
    assert pickle_guard.scan(io.BytesIO(small), max_bytes=len(small)) == small
    with pytest.raises(errors.CorruptFileError, match="more than 1000 opcodes"):
        pickle_guard.scan(io.BytesIO(c.program(b"N0" * 600 + c.NONE)), max_bytes=10_000)
