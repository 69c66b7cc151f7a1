#!/usr/bin/env bash
# Opt-in (not part of CI): runs our tests against a newer ComfyUI source tree.
#
#   COMFYUI_SRC=/path/to/ComfyUI bash scripts/test_current_comfy.sh [pytest args]
#
# No package on the index ships a current ComfyUI, so the tree must come from a checkout
# (COMFYUI_SRC: a folder with main.py, or a bare git directory whose HEAD is read). It is
# copied to .host-current/ComfyUI (git-ignored) with a venv of its requirements from the
# package index (CPU torch 2.13.0; torchvision with the import guard of setup_host.sh).
# docs/compat.md records what ran and what passed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOST="$ROOT/.host-current"
COMFY="$HOST/ComfyUI"
VENV="$HOST/venv"
PY="${PYTHON:-python3}"
log() { echo "[test_current_comfy] $*"; }

if [ ! -f "$COMFY/main.py" ]; then
  src="${COMFYUI_SRC:?set COMFYUI_SRC to a ComfyUI checkout or bare git directory}"
  mkdir -p "$COMFY.partial"
  if [ -f "$src/main.py" ]; then
    cp -a "$src/." "$COMFY.partial/"
  else
    # A bare mirror may lack its largest blobs (tokenizer files); copy what is there.
    "$PY" - "$src" "$COMFY.partial" <<'PYEOF'
import pathlib, subprocess, sys
git, dest = sys.argv[1], pathlib.Path(sys.argv[2])
tree = subprocess.run(["git", f"--git-dir={git}", "ls-tree", "-r", "-z", "HEAD"], capture_output=True, check=True).stdout
missing = []
for rec in filter(None, tree.split(b"\0")):
    meta, path = rec.split(b"\t", 1)
    _, kind, sha = meta.split()
    if kind != b"blob":
        continue
    blob = subprocess.run(["git", f"--git-dir={git}", "cat-file", "blob", sha.decode()], capture_output=True)
    if blob.returncode != 0:
        missing.append(path.decode())
        continue
    out = dest / path.decode()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(blob.stdout)
print("[test_current_comfy] blobs absent from the mirror:", ", ".join(missing) or "none")
PYEOF
  fi
  mv "$COMFY.partial" "$COMFY"
fi
log "ComfyUI $(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$COMFY/comfyui_version.py") at $COMFY"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
STAMP="$HOST/.installed-$(sha256sum "$COMFY/requirements.txt" | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  log "installing CPU torch and $COMFY/requirements.txt"
  reqs="$(mktemp)"
  grep -vE '^(torch|torchvision|torchaudio)\b' "$COMFY/requirements.txt" > "$reqs"
  "$VPY" -m pip install -q --disable-pip-version-check "torch==2.13.0" -r "$reqs" \
    -r "$ROOT/scripts/test-requirements.txt"
  rm -f "$reqs"
  touch "$STAMP"
fi
if ! "$VPY" -c "import torchvision" 2>/dev/null; then
  log "installing torchvision 0.28.0 (import guard for CPU torch, as in setup_host.sh)"
  "$VPY" -m pip install -q --disable-pip-version-check --no-deps "torchvision==0.28.0"
  meta="$("$VPY" -c "import importlib.util as u; print(u.find_spec('torchvision').submodule_search_locations[0])")/_meta_registrations.py"
  sed -i 's/^@torch.library.register_fake(\("torchvision::[a-z_]*"\))$/@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda f: f))/' "$meta"
  "$VPY" -c "import torchvision"
fi

# Current ComfyUI imports torchaudio at module level (comfy/sd.py -> the LTX audio VAE). The
# newest torchaudio on the index (2.11.0) is CUDA-linked: beside CPU torch 2.13 its extension
# fails to load. Treating that as "extension not built" (torchaudio's own path for a missing
# library file) makes it import; only its pure-Python parts are touched here.
if ! "$VPY" -c "import torchaudio" 2>/dev/null; then
  log "installing torchaudio 2.11.0 (extension-load guard for CPU torch)"
  "$VPY" -m pip install -q --disable-pip-version-check --no-deps "torchaudio==2.11.0"
  ext="$("$VPY" -c "import importlib.util as u; print(u.find_spec('torchaudio').submodule_search_locations[0])")/_extension/utils.py"
  sed -i 's/^    torch.ops.load_library(paths\[0\])$/    try:\n        torch.ops.load_library(paths[0])\n    except OSError:\n        return False/' "$ext"
  "$VPY" -c "import torchaudio"
fi

mkdir -p "$COMFY/custom_nodes"
ln -sfn "$ROOT" "$COMFY/custom_nodes/lora_cache_loader"

cd "$ROOT"
log "running tests with COMFYUI_DIR=$COMFY"
COMFYUI_DIR="$COMFY" exec "$VPY" -m pytest -q "${@:-tests}"
