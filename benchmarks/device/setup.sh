#!/usr/bin/env bash
# Prepares a bare GPU machine (python3 with torch, no package index) to run current ComfyUI with
# dynamic VRAM: wheels carried in .whl/ (comfy-aimdo, comfy-kitchen without its compiled part,
# and what ComfyUI imports that the machine lacks) go into /tmp/site, ComfyUI 0.33.0 is unpacked
# from hosts/, and stand-ins answer the imports of PyAV (video nodes) and, where the machine's
# own does not import, torchaudio. Source it: it exports PYTHONPATH and COMFYUI_DIR.
# Switches: LORA_CACHE_AIMDO=0.6.0 installs that comfy-aimdo instead of the pinned one;
# LORA_CACHE_COMFY=0.3.75 unpacks ComfyUI 0.3.75 (no dynamic VRAM) instead of 0.33.0.
set -e
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
wheels=("$ROOT"/.whl/*.whl)
if [ -n "${LORA_CACHE_AIMDO:-}" ]; then
  wheels=($(printf '%s\n' "${wheels[@]}" | grep -v /comfy_aimdo-) "$ROOT"/.whl/extra/comfy_aimdo-"$LORA_CACHE_AIMDO"-*.whl)
fi
# A warm machine keeps /tmp/site between calls: pip --target replaces a package's folder but keeps
# the other version's metadata, so the switch starts from no comfy-aimdo at all.
rm -rf /tmp/site/comfy_aimdo /tmp/site/comfy_aimdo-*.dist-info
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}"
tree="$ROOT/hosts/ComfyUI-0.33.0.tar.gz"
[ "${LORA_CACHE_COMFY:-}" = "0.3.75" ] && tree="$ROOT/.whl/extra/ComfyUI-0.3.75.tar.gz"
rm -rf /tmp/comfyui && mkdir -p /tmp/comfyui /tmp/standins
tar xzf "$tree" -C /tmp/comfyui
export COMFYUI_DIR="$(dirname "$(find /tmp/comfyui -maxdepth 2 -name main.py | head -1)")"
cat > /tmp/standins/_standin.py <<'PY'
"""A module that answers any attribute and any submodule with a dummy class."""
import importlib.abc, importlib.machinery, sys, types

class _Any(type):
    def __getattr__(cls, name):
        return _Any(name, (), {})
    def __call__(cls, *a, **k):
        return cls

class _Module(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Any(name, (), {})

class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots):
        self.roots = roots
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
    def create_module(self, spec):
        m = _Module(spec.name)
        m.__path__ = []
        return m
    def exec_module(self, module):
        pass

def install(*roots):
    sys.meta_path.insert(0, _Finder(set(roots)))
PY
roots='"av"'
python3 -c "import torchaudio" 2>/dev/null || roots="$roots, \"torchaudio\""
cat > /tmp/standins/sitecustomize.py <<PY
import _standin
_standin.install($roots)
PY
export PYTHONPATH="/tmp/standins:/tmp/site:$ROOT/testkit${PYTHONPATH:+:$PYTHONPATH}"
aimdo="$(python3 -c 'import comfy_aimdo._version as v, comfy_aimdo; print(v.__version__, "from", comfy_aimdo.__file__)' 2>&1 | tail -1)"
echo "[device setup] ComfyUI at $COMFYUI_DIR ($(sed -n "s/^__version__ = //p" "$COMFYUI_DIR/comfyui_version.py")), comfy-aimdo $aimdo; stand-ins for $roots"
