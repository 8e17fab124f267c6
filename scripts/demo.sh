#!/usr/bin/env bash
# Build a small tied GPT-2 checkpoint (no download), convert it, load it back tied.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
python "$ROOT/scripts/demo.py" "$@"
