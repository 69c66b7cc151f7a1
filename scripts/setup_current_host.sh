#!/usr/bin/env bash
# Installs current ComfyUI (0.33.0, from hosts/ComfyUI-0.33.0.tar.gz; see hosts/README.md) and
# CPU torch into .host-current/ (git-ignored), idempotently, links this package into its
# custom_nodes/ and testkit/ into the venv. scripts/test.sh runs the tests on it with
# COMFYUI_DIR=.host-current/ComfyUI.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOST="${LORA_CACHE_CURRENT_HOST:-$ROOT/.host-current}"
TARBALL="$ROOT/hosts/ComfyUI-0.33.0.tar.gz"
VENV="$HOST/venv"
COMFY="$HOST/ComfyUI"
LOG_TAG=setup_current_host
# shellcheck source=host_lib.sh
source "$ROOT/scripts/host_lib.sh"

mkdir -p "$HOST"
# The tree is unpacked again when the tarball changes.
tar_sum="$(sha256sum "$TARBALL" | cut -c1-16)"
if [ ! -f "$COMFY/main.py" ] || [ "$(cat "$COMFY/.tarball" 2>/dev/null)" != "$tar_sum" ]; then
  log "unpacking $(basename "$TARBALL")"
  rm -rf "$COMFY" "$HOST/unpack"
  mkdir -p "$HOST/unpack"
  tar -xzf "$TARBALL" -C "$HOST/unpack"
  echo "$tar_sum" > "$HOST/unpack/ComfyUI/.tarball"
  mv "$HOST/unpack/ComfyUI" "$COMFY"
  rmdir "$HOST/unpack"
fi

make_venv "$VENV"
VPY="$VENV/bin/python"
# The stamp names the requirement files' content: a new tree or test tools re-run the install.
STAMP="$HOST/.installed-$(cat "$COMFY/requirements.txt" "$ROOT/scripts/test-requirements.txt" | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  log "installing torch (CPU), ComfyUI's requirements.txt and the test tools"
  # torch, torchvision and torchaudio from ComfyUI's list would resolve to CUDA builds:
  # torch is pinned to the CPU build, the other two come with import guards below.
  reqs="$HOST/requirements-cpu.txt"
  grep -vE '^(torch|torchvision|torchaudio)([^A-Za-z0-9_.-]|$)' "$COMFY/requirements.txt" > "$reqs"
  pip_q "$VPY" "$TORCH_PIN" -c <(echo "$TORCH_PIN") -r "$reqs" -r "$ROOT/scripts/test-requirements.txt"
fi

guard_torchvision "$VPY"
guard_torchaudio "$VPY"
link_package "$COMFY" "$ROOT"
link_testkit "$VPY" "$ROOT"
touch "$STAMP"
log "ready: python=$VPY comfyui=$COMFY ($(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$COMFY/comfyui_version.py"))"
