#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set up, lint, type-check, test, check the wheel.
# Extra arguments go to pytest (e.g. scripts/test.sh -k sharing -x); the wheel check
# (scripts/check_wheel.sh) runs only on a full run, i.e. without arguments.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
echo "== ruff"
ruff check converter tests scripts
ruff format --check converter tests scripts
echo "== mypy"
mypy
wheel_pid=""
if [ $# -eq 0 ]; then
  # pytest keeps about one core busy: the wheel check (mostly installing and importing
  # torch in a clean environment) runs beside it on the other, its output held until the end.
  wheel_log="$(mktemp "${TMPDIR:-/tmp}/tiesafe-wheel-log.XXXXXX")"
  bash "$ROOT/scripts/check_wheel.sh" >"$wheel_log" 2>&1 &
  wheel_pid=$!
  trap 'kill "$wheel_pid" 2>/dev/null || true; rm -f "$wheel_log"' EXIT
fi
echo "== pytest"
status=0
python -m pytest "$@" || status=$?
if [ -n "$wheel_pid" ]; then
  echo "== wheel (scripts/check_wheel.sh)"
  wheel_status=0
  wait "$wheel_pid" || wheel_status=$?
  cat "$wheel_log"
  if [ "$wheel_status" -ne 0 ]; then
    echo "scripts/check_wheel.sh failed (exit $wheel_status)" >&2
    status=1
  fi
fi
exit "$status"
