#!/usr/bin/env bash
# What a user gets from `pip install tiesafe`, checked (called by scripts/test.sh):
# build the sdist and the wheel from it (build-backend warnings are errors), twine check,
# compare both with the source tree, install the wheel (not editable) into a clean
# environment holding only torch and tiesafe's dependencies, and run the smoke test there:
# tiesafe --version, the demo, inspect/verify/folder/batch, an import of every module,
# and a strict mypy run that must see converter's annotations.
# TIESAFE_KEEP_WHEEL_CHECK=1 keeps the temporary folder for a look afterwards.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
DEV="$(dirname "$(command -v python)")"
# The clean environment is ~1 GB (torch): in memory (/dev/shm, when it has room) it is
# written and removed without waiting for a disk other jobs share.
base="${TMPDIR:-/tmp}"
if [ -w /dev/shm ] && [ "$(df --output=avail -k /dev/shm | tail -1)" -gt $((4 * 1024 * 1024)) ]; then
  base=/dev/shm
fi
WORK="$(mktemp -d "$base/tiesafe-wheel.XXXXXX")"
if [ "${TIESAFE_KEEP_WHEEL_CHECK:-0}" = 1 ]; then
  echo "check_wheel: keeping $WORK" >&2
else
  trap 'rm -rf "$WORK"' EXIT
  trap 'exit 143' TERM  # still removes WORK (after the running command returns)
fi
start=$SECONDS

python "$ROOT/scripts/build_dist.py" "$WORK/dist" >/dev/null
sdist=("$WORK"/dist/*.tar.gz) wheel=("$WORK"/dist/*.whl)
twine check --strict "${sdist[0]}" "${wheel[0]}"
python "$ROOT/scripts/check_dist.py" "${sdist[0]}" "${wheel[0]}"
built=$SECONDS

# No pip inside: the dev environment's pip installs into it (saves ensurepip's seconds),
# torch first and pinned, as scripts/setup.sh does; --no-compile because only what the
# smoke test imports needs bytecode; -qq shows errors only.
python -m venv --without-pip "$WORK/venv"
pip_install=(pip --python "$WORK/venv/bin/python" install -qq --disable-pip-version-check --no-compile)
"${pip_install[@]}" -c "$ROOT/scripts/constraints.txt" torch
"${pip_install[@]}" -c "$ROOT/scripts/constraints.txt" "${wheel[0]}"
installed=$SECONDS

# From an empty folder with no PYTHONPATH: nothing of the source tree can be imported.
# Bytecode is written (into the throw-away environment) even where PYTHONDONTWRITEBYTECODE
# is set: the first import of torch compiles it once instead of in every process.
mkdir "$WORK/smoke"
(cd "$WORK/smoke" && env -u PYTHONPATH -u PYTHONDONTWRITEBYTECODE "$WORK/venv/bin/python" "$ROOT/scripts/smoke_installed.py" "$WORK/smoke" --mypy "$DEV/mypy")
echo "check_wheel: the wheel installs and runs in a clean environment: $((SECONDS - start)) s" \
  "(build and compare $((built - start)) s, install $((installed - built)) s, smoke test $((SECONDS - installed)) s)"
