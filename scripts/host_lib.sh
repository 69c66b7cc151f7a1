# Shell functions shared by setup_host.sh (ComfyUI 0.3.75) and setup_current_host.sh (0.33.0).
# Sourced, not run; callers set LOG_TAG and `set -euo pipefail`.

log() { echo "[${LOG_TAG:-setup}] $*"; }

# The CPU torch both hosts run on. Installed with this pin as a constraint, so that no other
# requirement can pull a different (CUDA) torch.
TORCH_PIN="torch==2.13.0"

pip_q() { "$1" -m pip install -q --disable-pip-version-check "${@:2}"; }

# make_venv VENV: a venv with the interpreter in $PYTHON (default python3).
make_venv() {
  if [ ! -x "$1/bin/python" ]; then
    log "creating venv at $1"
    "${PYTHON:-python3}" -m venv "$1"
    pip_q "$1/bin/python" --upgrade pip >/dev/null
  fi
}

# site_packages VPY
site_packages() { "$1" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }

# guarded_install VPY MODULE PIN FILE SED: when MODULE does not import, installs PIN without
# dependencies and edits FILE (under site-packages) with the sed expression SED so it imports.
guarded_install() {
  if ! "$1" -c "import $2" 2>/dev/null; then
    log "installing $3 (import guard for CPU torch)"
    pip_q "$1" --no-deps "$3"
    sed -i "$5" "$(site_packages "$1")/$4"
    "$1" -c "import $2" || { echo "$2 still fails to import" >&2; exit 1; }
  fi
}

# guard_torchvision VPY: torchvision 0.28.0 on the index is CUDA-linked; beside CPU torch its
# import fails in the register_fake decorators of _meta_registrations.py. Guarding them with
# _has_ops() (as its own register_meta already does) makes it import; ComfyUI only needs it
# importable.
guard_torchvision() {
  guarded_install "$1" torchvision "torchvision==0.28.0" torchvision/_meta_registrations.py \
    's/^@torch.library.register_fake(\("torchvision::[a-z_]*"\))$/@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda f: f))/'
}

# guard_torchaudio VPY: current ComfyUI imports torchaudio at module level (comfy/sd.py -> the
# LTX audio VAE). The newest torchaudio on the index (2.11.0) is CUDA-linked: beside CPU torch
# its extension fails to load. Treating that as "extension not built" (torchaudio's own path
# for a missing library file) makes it import; only its pure-Python parts are touched here.
guard_torchaudio() {
  guarded_install "$1" torchaudio "torchaudio==2.11.0" torchaudio/_extension/utils.py \
    's/^    torch.ops.load_library(paths\[0\])$/    try:\n        torch.ops.load_library(paths[0])\n    except OSError:\n        return False/'
}

# link_package COMFY ROOT: this repository in ComfyUI's custom_nodes/, as a user clones it.
link_package() {
  mkdir -p "$1/custom_nodes"
  local link="$1/custom_nodes/lora_cache_loader"
  if [ ! -L "$link" ] || [ "$(readlink "$link")" != "$2" ]; then
    rm -rf "$link"
    ln -s "$2" "$link"
    log "linked $2 -> $link"
  fi
}

# link_testkit VPY ROOT: testkit/ (the package lora_cache_testkit) on the venv's sys.path.
link_testkit() {
  echo "$2/testkit" > "$(site_packages "$1")/lora_cache_testkit.pth"
}
