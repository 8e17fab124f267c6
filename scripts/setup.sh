#!/usr/bin/env bash
# Create the project's virtual environment (.venv) if missing and install tiesafe
# into it. Sourced by demo.sh and test.sh; safe to run again (does nothing when
# pyproject.toml has not changed since the last install).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TIESAFE_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.tiesafe-installed"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing torch (CPU build) and tiesafe into $VENV" >&2
  # torch first, pinned: a bare 'torch' requirement would pull a multi-GB CUDA build.
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -c "$ROOT/scripts/constraints.txt" torch
  # The same pin as a constraint: no other package (lightning, deepspeed, ...) may upgrade torch.
  # DS_BUILD_OPS=0: DeepSpeed (a test dependency) builds no C++ ops at install; they are JIT-built if used.
  DS_BUILD_OPS="${DS_BUILD_OPS:-0}" "$VENV/bin/pip" install --quiet --disable-pip-version-check \
    -c "$ROOT/scripts/constraints.txt" -e "$ROOT[dev]"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
