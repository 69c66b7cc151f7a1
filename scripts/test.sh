#!/usr/bin/env bash
# The test command (README; .ci/run calls it): sets up both ComfyUI hosts and the browser
# (idempotent), lints (ruff) and type-checks lora_cache/ (mypy), runs the test suite on
# ComfyUI 0.3.75 (.host/) and on ComfyUI 0.33.0 (.host-current/), and prints the wall time of
# each test group per host. Arguments go to both pytest runs (a test file, -k EXPR, -m EXPR).
# Every step runs; the exit status is non-zero when any of them failed.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

failed=()
steps=()
step() {  # step NAME COMMAND...: runs it, notes its time, remembers a failure
  local name="$1" t0=$SECONDS
  shift
  echo "== $name"
  "$@" || failed+=("$name")
  steps+=("$(printf '%-26s %5ds' "$name" $((SECONDS - t0)))")
}

step "setup ComfyUI 0.3.75" bash scripts/setup_host.sh
step "setup ComfyUI 0.33.0" bash scripts/setup_current_host.sh
[ "${#failed[@]}" -eq 0 ] || { echo "setup failed: ${failed[*]}"; exit 1; }
step "setup browser" bash scripts/setup_browser.sh

OLD_PY="$ROOT/.host/venv/bin/python"
CUR_PY="$ROOT/.host-current/venv/bin/python"
REPORTS="$ROOT/.host/reports"
rm -rf "$REPORTS" && mkdir -p "$REPORTS"

# Lint every Python file of the repository; type-check lora_cache/ (settings in pyproject.toml).
step "ruff" "$OLD_PY" -m ruff check __init__.py lora_cache nodes tests scripts benchmarks testkit
step "mypy lora_cache/" "$OLD_PY" -m mypy
# The whole suite on both hosts: about two minutes of tests per host on an idle 2-core machine;
# with the setup that fits CI's 15 minutes. Were it to stop fitting, `-m "not slow"` on 0.33.0
# keeps its node, server, e2e and decision tests.
step "pytest on ComfyUI 0.3.75" env COMFYUI_DIR="$ROOT/.host/ComfyUI" \
  "$OLD_PY" -m pytest -q -rsxX --junitxml="$REPORTS/0.3.75.xml" "$@"
step "pytest on ComfyUI 0.33.0" env COMFYUI_DIR="$ROOT/.host-current/ComfyUI" \
  "$CUR_PY" -m pytest -q -rsxX --junitxml="$REPORTS/0.33.0.xml" "$@"

echo
echo "== wall time per test group and host"
"$OLD_PY" -m lora_cache_testkit.timings "0.3.75=$REPORTS/0.3.75.xml" "0.33.0=$REPORTS/0.33.0.xml"
echo
printf '%s\n' "${steps[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
  printf 'FAILED:'; printf ' [%s]' "${failed[@]}"; echo
  exit 1
fi
echo "all steps passed"
