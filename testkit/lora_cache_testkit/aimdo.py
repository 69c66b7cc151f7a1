"""comfy-aimdo for the GPU checks and the benchmarks, started the way ComfyUI's main.py starts it:
`hook()` before torch touches the GPU (it hooks the CUDA allocator), `devices()` once ComfyUI is
booted; `boot_on_gpu()` starts a GPU script. Imports nothing else at its top, so a script can call
it first."""
from __future__ import annotations


def hook() -> bool:
    """Whether comfy-aimdo is installed and hooked the allocator."""
    try:
        import comfy_aimdo.control
    except ImportError:
        return False
    return bool(comfy_aimdo.control.init())


def boot_on_gpu() -> None:
    """The start of a dynamic-VRAM GPU script, in main.py's order: the ComfyUI host booted on the
    GPU (its allocator chosen), then `hook()`, both before torch touches the GPU."""
    from . import host
    host.boot(cpu=False)
    hook()


def gpu_report() -> dict:
    """The head of a GPU script's JSON report: the device, torch's allocator, and whether
    comfy-aimdo manages the device (`devices()`: where not, the script reports only this)."""
    import torch

    from . import host
    return {"device": torch.cuda.get_device_name(0), **host.allocator_report(), "aimdo": devices()}


def devices() -> bool:
    """Whether comfy-aimdo manages ComfyUI's devices (dynamic VRAM can run): False where it is
    not installed or this ComfyUI has no dynamic VRAM (0.3.75)."""
    try:
        import comfy_aimdo.control
    except ImportError:
        return False
    import comfy.model_management as mm
    import comfy.model_patcher
    if not hasattr(comfy.model_patcher, "ModelPatcherDynamic") or not hasattr(mm, "get_all_torch_devices"):
        return False
    found = [d for d in mm.get_all_torch_devices() if d.type == "cuda"]
    if not found:
        return False
    try:  # newer comfy-aimdo takes (index, reserved bytes) pairs
        return bool(comfy_aimdo.control.init_devices((d.index, 0) for d in found))
    except TypeError:
        return bool(comfy_aimdo.control.init_devices(d.index for d in found))


def use_dynamic(on: bool) -> None:
    """Models loaded from now on get ComfyUI's dynamic VRAM (ModelPatcherDynamic, weights mapped
    from their file) or its classic patcher, as its --disable-dynamic-vram chooses at start-up.
    Nothing on a ComfyUI without dynamic VRAM (0.3.75)."""
    import importlib

    import comfy.model_patcher
    if not hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
        return
    comfy.model_patcher.CoreModelPatcher = (comfy.model_patcher.ModelPatcherDynamic if on
                                            else comfy.model_patcher.ModelPatcher)
    importlib.import_module("comfy.memory_management").aimdo_enabled = on
