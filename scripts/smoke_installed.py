"""Smoke test of an installed tiesafe, run by the Python of a clean environment holding the wheel.

Usage: VENV/bin/python scripts/smoke_installed.py WORKDIR [--mypy PATH]

Checks that ``converter`` comes from that environment (not this source tree), that
its version is the installed metadata's and ``tiesafe --version`` says the same, that
every module of the source tree is installed and imports, and that the README's
commands work: the Python API on a tied module, the demo (a small tied GPT-2:
convert, load back tied), then ``tiesafe inspect``, ``verify``, a model folder, a batch
and ``prepare-upload`` through the installed ``tiesafe`` command, and a missing extra
(dask) refused in one line. With ``--mypy``, a strict mypy run against this environment
must see converter's annotations (py.typed).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import pkgutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the source tree: read for names, never imported
BIN = Path(sys.executable).parent


class SmokeError(Exception):
    """A check failed; the message says which."""


def run(*args: str | Path, cwd: Path, exit_code: int = 0) -> str:
    """Run a command from the environment; its stdout and stderr, or SmokeError when it exits otherwise."""
    start = time.perf_counter()
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True)
    shown = " ".join(str(a) for a in args).replace(str(cwd) + "/", "").replace(str(BIN) + "/", "")
    if result.returncode != exit_code:
        raise SmokeError(f"{shown} exited {result.returncode}, not {exit_code}:\n{result.stdout}{result.stderr}")
    print(f"  ok {time.perf_counter() - start:5.1f} s  {shown}" + (f"  (exit {exit_code})" if exit_code else ""))
    return result.stdout + result.stderr


def source_modules() -> set[str]:
    """converter's module names as the source tree has them (converter/readers/x.py -> converter.readers.x)."""
    names = set()
    for path in (ROOT / "converter").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def check_package() -> str:
    """The installed package: where it is, its version, every module importable. Returns the version."""
    import converter

    location = Path(converter.__file__).resolve().parent
    if not location.is_relative_to(Path(sys.prefix).resolve()):
        raise SmokeError(f"converter was imported from {location}, not from the environment {sys.prefix}")
    version = importlib.metadata.version("tiesafe")
    if converter.__version__ != version:
        raise SmokeError(f"converter.__version__ is {converter.__version__!r}, the metadata says {version!r}")
    if not (location / "py.typed").is_file():
        raise SmokeError(f"{location} has no py.typed")

    def refuse(name: str) -> None:
        raise SmokeError(f"{name} cannot be imported while walking the package")

    installed = {module.name for module in pkgutil.walk_packages(converter.__path__, "converter.", onerror=refuse)}
    installed.add("converter")
    missing = source_modules() - installed
    if missing:
        raise SmokeError(f"modules of the source tree not installed: {', '.join(sorted(missing))}")
    for name in sorted(installed - {"converter.__main__"}):  # __main__ would run the command
        importlib.import_module(name)
    print(f"  ok {len(installed)} modules of converter import from {location}; version {version}")
    return version


def check_commands(work: Path, version: str) -> None:
    """The README's commands through the installed ``tiesafe`` on the demo's tied GPT-2."""
    tiesafe = BIN / "tiesafe"
    said = run(tiesafe, "--version", cwd=work).strip()
    if said != f"tiesafe, version {version}":
        raise SmokeError(f"tiesafe --version says {said!r}, the metadata says {version!r}")
    model = work / "runs" / "gpt2"
    run(sys.executable, ROOT / "scripts" / "demo.py", model, cwd=work)  # convert, load_file, load_model
    source, output = model / "pytorch_model.bin", model / "model.safetensors"
    for shown in (run(tiesafe, "inspect", source, cwd=work), run(tiesafe, "inspect", output, cwd=work)):
        if "lm_head.weight" not in shown:
            raise SmokeError(f"tiesafe inspect shows no lm_head.weight:\n{shown}")
    run(tiesafe, "verify", source, output, cwd=work)
    output.unlink()  # the folder and the batch convert from the pickle alone
    run(tiesafe, "convert", model, work / "folder-out", cwd=work)
    run(tiesafe, "batch", work / "runs", "--out", work / "runs-st", "--workers", "1", cwd=work)
    run(tiesafe, "prepare-upload", model, "--out", work / "upload", cwd=work)
    for converted in (work / "folder-out", work / "runs-st" / "gpt2", work / "upload"):
        run(tiesafe, "verify", source, converted / "model.safetensors", cwd=work)
    # An extra that is not installed is one line naming it, exit 2 (dask is not a dependency).
    dask = ("--scheduler", "local:1")
    said = run(tiesafe, "batch", work / "runs", "--out", work / "dask-st", *dask, cwd=work, exit_code=2)
    if "pip install 'tiesafe[dask]'" not in said or "Traceback" in said:
        raise SmokeError(f"tiesafe batch --scheduler without dask does not name the extra:\n{said}")


def check_api(work: Path) -> None:
    """The README's Python API on a tiny tied module: export, read, convert, inspect, verify, load."""
    import torch

    import converter

    folder = work / "api"
    folder.mkdir()
    model = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16, bias=False))
    model[1].weight = model[0].weight
    exported = converter.save_model(model, folder / "exported.safetensors")
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    read = converter.read_checkpoint(folder / "pytorch_model.bin")
    converted = converter.convert_file(folder / "pytorch_model.bin")
    inspected = converter.inspect(converted.output)
    verified = converter.verify_file(folder / "pytorch_model.bin", converted.output)
    for path in (exported.output, converted.output):
        state = converter.load_file(path)
        if state["1.weight"] is not state["0.weight"] or not torch.equal(state["0.weight"], model[0].weight):
            raise SmokeError(f"converter.load_file({path}) does not give the tied weight back")
    expected = {"1.weight": "0.weight"}
    if (exported.aliases, converted.aliases, set(read.tensors), verified.names, inspected.bytes_saved) != (
        expected,
        expected,
        {"0.weight", "1.weight"},
        2,
        16 * 8 * 4,
    ):
        raise SmokeError(f"the Python API disagrees on a tied pair: {exported}, {converted}, {inspected}, {verified}")
    print("  ok  save_model, read_checkpoint, convert_file, inspect, verify_file, load_file on a tied module")


def check_typing(mypy: str, work: Path) -> None:
    """A strict mypy run against this environment sees converter's types (py.typed shipped)."""
    probe = work / "probe_types.py"
    probe.write_text(
        "import converter\nfrom converter import convert_file\n\n"
        "reveal_type(converter.__version__)\nreveal_type(convert_file)\n"
    )
    # Other libraries' types are not under test: skipping them keeps this run to seconds.
    config = work / "mypy.ini"
    others = "torch.*,transformers.*,safetensors.*,huggingface_hub.*"
    config.write_text(f"[mypy]\nstrict = True\n\n[mypy-{others}]\nfollow_imports = skip\n")
    python = sys.executable
    shown = run(mypy, "--config-file", config, "--python-executable", python, "--no-incremental", probe, cwd=work)
    # mypy exits 1 on "missing library stubs or py.typed marker"; Any would mean it saw no types.
    if "converter.convert.ConversionReport" not in shown or 'Revealed type is "Any"' in shown:
        raise SmokeError(f"mypy does not see converter's annotations through the installed package:\n{shown}")


def main() -> int:
    args = sys.argv[1:]
    mypy = None
    if "--mypy" in args:
        index = args.index("--mypy")
        mypy = args[index + 1]
        del args[index : index + 2]
    if len(args) != 1:
        raise SystemExit(__doc__.splitlines()[2])
    work = Path(args[0]).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach the network
    try:
        version = check_package()
        check_api(work)
        check_commands(work, version)
        if mypy:
            check_typing(mypy, work)
    except SmokeError as error:
        print(f"smoke_installed: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
