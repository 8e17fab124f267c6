"""One version: pyproject.toml's, read from the installed metadata by the package and the command."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

import converter

ROOT = Path(__file__).resolve().parent.parent


def test_the_version_is_pyprojects_through_the_metadata() -> None:
    line = re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert line is not None, "pyproject.toml has no version line"
    declared = line[1]
    assert importlib.metadata.version("tiesafe") == declared
    assert converter.__version__ == declared
    assert "__version__" in dir(converter)
    # Written once: no literal in the package to fall out of step with pyproject.toml.
    assert not re.search(r"^__version__\s*=", (ROOT / "converter" / "__init__.py").read_text(), re.MULTILINE)


def test_the_command_says_the_same_version() -> None:
    result = subprocess.run([sys.executable, "-m", "converter", "--version"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"tiesafe, version {converter.__version__}\n"


def test_a_source_tree_that_was_never_installed_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    monkeypatch.delitem(vars(converter), "__version__", raising=False)  # restored after the test
    assert converter.__version__ == "0+unknown"
