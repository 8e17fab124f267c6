#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set up, lint, type-check, test.
# Extra arguments go to pytest (e.g. scripts/test.sh -k sharing -x).
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
