#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the wheels that benchmarks/device/setup.sh installs on a GPU
# machine without a package index: what ComfyUI 0.33.0 imports that such a machine's python3
# (3.12, torch with CUDA) lacks, comfy-aimdo for dynamic VRAM, and comfy-kitchen with its compiled
# extension removed (58 MB with it; its pure-Python part falls back to the eager backend).
# .whl/extra/ holds what other runs pick with setup.sh's switches: the newest comfy-aimdo on the
# index (LORA_CACHE_AIMDO=0.6.0) and the ComfyUI 0.3.75 tree of .host/ (LORA_CACHE_COMFY=0.3.75).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEST="$ROOT/.whl"
mkdir -p "$DEST"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
fetch() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none "${PLATFORMS[@]}" --platform any -d "$DEST" "$@"
}
fetch comfy-aimdo==0.4.13 simpleeval blake3 torchsde trampoline "pydantic~=2.0" pydantic-core \
  "pydantic-settings~=2.0" annotated-types typing-inspection python-dotenv alembic "sqlalchemy>=2.0" mako \
  greenlet markupsafe typing-extensions
tmp="$(mktemp -d)"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$tmp" comfy-kitchen==0.2.31
python3 - "$tmp" "$DEST" <<'PY'
import pathlib, sys, zipfile
src, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
whl = next(src.glob("comfy_kitchen-*.whl"))
with zipfile.ZipFile(whl) as zin, zipfile.ZipFile(dest / whl.name, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if not item.filename.endswith(".so"):
            zout.writestr(item, zin.read(item))
PY
rm -rf "$tmp"
mkdir -p "$DEST/extra"
( DEST="$DEST/extra"; fetch comfy-aimdo==0.6.0 )
if [ -f "$ROOT/.host/ComfyUI/main.py" ]; then
  tar czf "$DEST/extra/ComfyUI-0.3.75.tar.gz" -C "$ROOT/.host" --exclude=__pycache__ --exclude='ComfyUI/models' \
    --exclude='ComfyUI/custom_nodes' --exclude='ComfyUI/output' --exclude='ComfyUI/input' --exclude='ComfyUI/user' \
    --exclude='ComfyUI/comfy_api_nodes' --exclude='ComfyUI/extra_model_paths.yaml' ComfyUI
else
  echo "no .host/ComfyUI (run scripts/setup_host.sh): LORA_CACHE_COMFY=0.3.75 will not be available"
fi
du -sh "$DEST"
