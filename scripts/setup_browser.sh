#!/usr/bin/env bash
# What the browser test needs, installed when missing and possible (idempotent, quiet):
# Debian's chromium (apt-get, as root) and the Python package playwright in the host venv.
# Playwright only drives the system chromium: never `playwright install` (no browser download).
# Failing here is not fatal: the browser test then skips and prints why.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VPY="${LORA_CACHE_HOST:-$ROOT/.host}/venv/bin/python"
LOG="${LORA_CACHE_HOST:-$ROOT/.host}/setup_browser.log"
log() { echo "[setup_browser] $*"; }

if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing Debian's chromium (apt-get; log: $LOG)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } >"$LOG" 2>&1; then
      log "could not install chromium; see $LOG (the browser test will skip)"
    fi
  else
    log "chromium missing and not installable here (needs root and apt-get); the browser test will skip"
  fi
fi

if ! "$VPY" -c "import playwright.sync_api" >/dev/null 2>&1; then
  log "installing playwright (Python driver only) into the host venv"
  "$VPY" -m pip install -q --disable-pip-version-check -r "$ROOT/scripts/browser-requirements.txt" >>"$LOG" 2>&1 \
    || log "could not install playwright; see $LOG (the browser test will skip)"
fi
exit 0
