"""Build the sdist, then the wheel from that sdist, with every build-backend warning an error.

Usage: python scripts/build_dist.py OUTDIR  (prints the two paths, sdist first)

This is ``python -m build`` (an isolated environment with the declared build
requirements, the wheel built from the unpacked sdist as pip builds it from PyPI)
through build's API, for one reason: ``-W``/``PYTHONWARNINGS`` given to ``python -m
build`` reach either only the frontend or every process it starts, pip included,
whose own deprecations are not ours to fix. Here ``PYTHONWARNINGS=error`` is given
to the backend hooks alone, so a deprecation in our build configuration (setuptools'
``SetuptoolsDeprecationWarning`` is a ``UserWarning``, not a ``DeprecationWarning``)
fails the build instead of scrolling by.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from build import ProjectBuilder
from build.env import DefaultIsolatedEnv

ROOT = Path(__file__).resolve().parent.parent


def _strict_backend(cmd: Sequence[str], cwd: str | None = None, extra_environ: Mapping[str, str] | None = None) -> None:
    """Run a backend hook with all warnings as errors; show its output only when it fails."""
    env = {**os.environ, **(extra_environ or {}), "PYTHONWARNINGS": "error"}
    result = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        sys.stderr.write(result.stdout)
        raise SystemExit(f"build_dist: the build backend failed in {cwd} (warnings are errors here; see above)")


def _build(env: DefaultIsolatedEnv, source: Path, distribution: str, outdir: Path) -> Path:
    builder = ProjectBuilder.from_isolated_env(env, source, runner=_strict_backend)
    env.install(builder.build_system_requires)
    env.install(builder.get_requires_for_build(distribution))
    return Path(builder.build(distribution, outdir))


def main(outdir: Path) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    with DefaultIsolatedEnv() as env, tempfile.TemporaryDirectory(prefix="tiesafe-sdist-") as unpacked:
        sdist = _build(env, ROOT, "sdist", outdir)
        with tarfile.open(sdist) as archive:
            archive.extractall(unpacked, filter="data")
        (tree,) = Path(unpacked).iterdir()
        wheel = _build(env, tree, "wheel", outdir)
    print(sdist)
    print(wheel)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__.splitlines()[2])
    main(Path(sys.argv[1]))
