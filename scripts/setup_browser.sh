#!/usr/bin/env bash
# What the browser test needs, installed when missing and possible (idempotent, quiet):
# Debian's chromium (apt-get, as root) and the Python package playwright in each host venv
# given as argument (default: the venvs of both hosts that exist).
# Playwright only drives the system chromium: never `playwright install` (no browser download).
# Failing here is not fatal: the browser test then fails under CI and skips elsewhere, saying why.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOG="$ROOT/.host/setup_browser.log"
log() { echo "[setup_browser] $*"; }
mkdir -p "$(dirname "$LOG")"

if [ "$#" -eq 0 ]; then
  for vpy in "${LORA_CACHE_HOST:-$ROOT/.host}/venv/bin/python" "${LORA_CACHE_CURRENT_HOST:-$ROOT/.host-current}/venv/bin/python"; do
    [ -x "$vpy" ] && set -- "$@" "$vpy"
  done
fi

if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing Debian's chromium (apt-get; log: $LOG)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } >"$LOG" 2>&1; then
      log "could not install chromium:"
      tail -n 20 "$LOG" | sed 's/^/  /'
    fi
  else
    log "chromium missing and not installable here (needs root and apt-get)"
  fi
fi

for vpy in "$@"; do
  if ! "$vpy" -c "import playwright.sync_api" >/dev/null 2>&1; then
    log "installing playwright (Python driver only) into $(dirname "$(dirname "$vpy")")"
    "$vpy" -m pip install -q --disable-pip-version-check -r "$ROOT/scripts/browser-requirements.txt" >>"$LOG" 2>&1 \
      || { log "could not install playwright:"; tail -n 20 "$LOG" | sed 's/^/  /'; }
  fi
done
exit 0
