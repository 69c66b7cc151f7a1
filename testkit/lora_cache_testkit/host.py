"""The real ComfyUI host for in-process use: which ComfyUI (COMFYUI_DIR, default the 0.3.75 tree
that scripts/setup_host.sh installs), booting it, and our package as ComfyUI loaded it.

Import this before anything from comfy."""
from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
COMFY_DIR = Path(os.environ.get("COMFYUI_DIR", ROOT / ".host" / "ComfyUI")).resolve()
# The name setup gives the repository in custom_nodes/, and the name tests import it by.
PACKAGE = "lora_cache_loader"

_booted = False


def boot(cpu: bool = True, extra_args: dict | None = None) -> Path:
    """Puts ComfyUI on sys.path and sets its CLI args without parsing argv.

    ComfyUI reads its settings from comfy.cli_args.args at import time of
    comfy.model_management, so they must be set first. On a GPU, torch's allocator is then
    chosen as ComfyUI's main.py chooses it (`cuda_malloc`), so torch must not be imported yet.
    """
    global _booted
    if _booted:
        return COMFY_DIR
    if not (COMFY_DIR / "main.py").is_file():
        raise SystemExit(f"ComfyUI not found at {COMFY_DIR}: run scripts/setup_host.sh first")
    sys.path.insert(0, str(COMFY_DIR))
    from comfy.cli_args import args

    args.cpu = cpu
    for k, v in (extra_args or {}).items():
        setattr(args, k, v)
    if not cpu:
        _allocator_as_main()
    # `nodes` puts comfy/ itself on sys.path; utils.extra_config must be imported before it.
    import utils.extra_config  # noqa: F401
    _booted = True
    return COMFY_DIR


def _allocator_as_main() -> None:
    """ComfyUI's main.py imports its `cuda_malloc` before torch: with a CUDA build of torch it
    sets PYTORCH_CUDA_ALLOC_CONF to cudaMallocAsync (unless --disable-cuda-malloc, or a GPU on its
    list), which torch reads once, when it is imported. A GPU script that skipped it would
    measure another allocator than a ComfyUI server's."""
    if "torch" in sys.modules:
        raise RuntimeError("torch is imported before ComfyUI chose its allocator: boot the host first")
    import cuda_malloc  # noqa: F401


def allocator() -> str | None:
    """The CUDA allocator torch runs (`native` or `cudaMallocAsync`); None without CUDA."""
    import torch
    return torch.cuda.get_allocator_backend() if torch.cuda.is_available() else None


def allocator_report() -> dict:
    """For a GPU script's report: the CUDA allocator torch runs, and the one
    PYTORCH_CUDA_ALLOC_CONF asks for (ComfyUI's `cuda_malloc` sets it), which tests/test_gpu.py
    compares."""
    asked = "cudaMallocAsync" if "cudaMallocAsync" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") else "native"
    return {"allocator": allocator(), "allocator_asked": asked}


def comfy_version() -> str:
    """The version of the selected ComfyUI, as its comfyui_version.py states it."""
    text = (COMFY_DIR / "comfyui_version.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def load_package(loaded_as: str | None = None) -> ModuleType:
    """Our package, importable as `lora_cache_loader` (so `from lora_cache_loader.lora_cache
    import layers` works), and returned.

    `loaded_as`: the name ComfyUI registered the package under when it loaded it from
    custom_nodes/ (a name made from the folder's path); that module and its submodules are
    entered under `lora_cache_loader` too, the same module objects, nothing imported twice.
    Without it (no ComfyUI node loading: the GPU checks, the benchmark) the package is loaded
    from the repository as ComfyUI would load it."""
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    if loaded_as is not None:
        for name, module in list(sys.modules.items()):
            if name == loaded_as or name.startswith(loaded_as + "."):
                sys.modules[PACKAGE + name[len(loaded_as):]] = module
        return sys.modules[loaded_as]
    spec = importlib.util.spec_from_file_location(PACKAGE, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    return module
