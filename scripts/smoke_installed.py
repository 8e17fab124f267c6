"""Smoke test of an installed tiesafe, run by the Python of a clean environment holding the wheel.

Usage: VENV/bin/python scripts/smoke_installed.py WORKDIR [--mypy PATH]

Checks that ``converter`` comes from that environment (not this source tree), that
its version is the installed metadata's and ``tiesafe --version`` says the same, that
every module of the source tree is installed and imports, and that the README's
commands work: the demo (a small tied GPT-2: convert, load back tied), then
``tiesafe inspect``, ``verify``, a model folder and a batch through the installed
``tiesafe`` command. With ``--mypy``, a strict mypy run against this environment
must see converter's annotations (py.typed).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the source tree: read for names, never imported
BIN = Path(sys.executable).parent


class SmokeError(Exception):
    """A check failed; the message says which."""


def run(*args: str | Path, cwd: Path) -> str:
    """Run a command from the environment; its stdout, or SmokeError with its output."""
    start = time.perf_counter()
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True)
    shown = " ".join(str(a) for a in args).replace(str(cwd) + "/", "")
    if result.returncode != 0:
        raise SmokeError(f"{shown} exited {result.returncode}:\n{result.stdout}{result.stderr}")
    print(f"  ok {time.perf_counter() - start:5.1f} s  {shown}")
    return result.stdout


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
    for converted in (work / "folder-out", work / "runs-st" / "gpt2"):
        run(tiesafe, "verify", source, converted / "model.safetensors", cwd=work)


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
    try:
        version = check_package()
        check_commands(work, version)
        if mypy:
            check_typing(mypy, work)
    except SmokeError as error:
        print(f"smoke_installed: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
