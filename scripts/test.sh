#!/usr/bin/env bash
# The whole test suite: sets up the host (idempotent) and runs pytest on the real ComfyUI.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_host.sh"
bash "$ROOT/scripts/setup_browser.sh"
cd "$ROOT"
exec "$ROOT/.host/venv/bin/python" -m pytest -q -rs "$@"
