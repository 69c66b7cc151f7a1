#!/usr/bin/env bash
# The main job: sets up the host (idempotent), then starts a real ComfyUI server with this
# package and queues a series of runs toggling and switching adapters.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_host.sh"
exec "$ROOT/.host/venv/bin/python" "$ROOT/scripts/demo.py" "$@"
