#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set up, lint, type-check, test, check the wheel.
# Extra arguments go to pytest (e.g. scripts/test.sh -k sharing -x); the wheel check
# (scripts/check_wheel.sh) runs on a full run, i.e. without arguments.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
echo "== ruff"
ruff check converter tests scripts
ruff format --check converter tests scripts
echo "== mypy"
mypy
echo "== pytest"
python -m pytest "$@"
if [ $# -eq 0 ]; then
  # After pytest, not beside it: on two cores a parallel install starves the fuzz
  # harness's per-input watchdog (tests/test_fuzz.py) into false "hang" findings.
  echo "== wheel"
  bash "$ROOT/scripts/check_wheel.sh"
fi
