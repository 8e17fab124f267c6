"""Compare the built sdist and wheel with the source tree and pyproject.toml.

Usage: python scripts/check_dist.py SDIST WHEEL

The wheel must hold exactly the files under ``converter/`` (every module of every
sub-package, ``py.typed``) and its dist-info, nothing else: a file missing from the
wheel would pass every editable test and fail every user, a stale extra one ships code
nobody reviews. The metadata must say what pyproject.toml says (version, SPDX licence,
the licence file, the ``tiesafe`` command). The sdist must hold the package, the docs,
and the tests with the scripts they run.
"""

from __future__ import annotations

import configparser
import sys
import tarfile
import zipfile
from email.parser import BytesHeaderParser
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # build, in the dev extra, depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "SECURITY.md")


def source_files(*folders: str) -> set[str]:
    """Files under the folders, relative to the repository, without Python's caches."""
    return {
        path.relative_to(ROOT).as_posix()
        for folder in folders
        for path in (ROOT / folder).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def wheel_problems(wheel: Path, project: dict[str, object]) -> list[str]:
    """What is wrong with the wheel's file list and metadata (empty when nothing is)."""
    dist_info = f"{project['name']}-{project['version']}.dist-info"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = BytesHeaderParser().parsebytes(archive.read(f"{dist_info}/METADATA"))
        entry_points = configparser.ConfigParser()
        entry_points.read_string(archive.read(f"{dist_info}/entry_points.txt").decode())
        shipped_license = archive.read(f"{dist_info}/licenses/LICENSE")
    package = {name for name in names if not name.startswith(f"{dist_info}/")}
    expected = source_files("converter")
    problems = [f"missing from the wheel: {name}" for name in sorted(expected - package)]
    problems += [f"in the wheel but not in converter/: {name}" for name in sorted(package - expected)]
    if "converter/py.typed" not in expected:
        problems.append("converter/py.typed is missing from the source tree")
    wanted = {
        "Version": str(project["version"]),
        "License-Expression": str(project["license"]),
        "License-File": "LICENSE",
    }
    problems += [
        f"METADATA {field}: {metadata[field]!r}, pyproject.toml says {value!r}"
        for field, value in wanted.items()
        if metadata[field] != value
    ]
    if shipped_license != (ROOT / "LICENSE").read_bytes():
        problems.append(f"{dist_info}/licenses/LICENSE differs from LICENSE")
    scripts = dict(entry_points["console_scripts"]) if entry_points.has_section("console_scripts") else {}
    if scripts != project["scripts"]:
        problems.append(f"console scripts {scripts}, pyproject.toml says {project['scripts']}")
    return problems


def sdist_problems(sdist: Path, project: dict[str, object]) -> list[str]:
    """Source files the sdist lacks (empty when it has them all)."""
    top = f"{project['name']}-{project['version']}/"
    with tarfile.open(sdist) as archive:
        members = {member.name.removeprefix(top) for member in archive.getmembers() if member.isfile()}
    expected = source_files("converter", "tests", "scripts") | set(DOCS)
    return [f"missing from the sdist: {name}" for name in sorted(expected - members)]


def main(sdist: Path, wheel: Path) -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    problems = wheel_problems(wheel, project) + sdist_problems(sdist, project)
    for problem in problems:
        print(f"check_dist: {problem}", file=sys.stderr)
    if problems:
        return 1
    with zipfile.ZipFile(wheel) as archive:
        count = len(archive.namelist())
    print(
        f"check_dist: {wheel.name}: {count} files, {wheel.stat().st_size / 1024:.0f} KiB, every file of converter/ "
        f"and nothing else; {sdist.name}: {sdist.stat().st_size / 1024:.0f} KiB; metadata as pyproject.toml says"
    )
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__.splitlines()[2])
    raise SystemExit(main(Path(sys.argv[1]), Path(sys.argv[2])))
