"""What ComfyUI's own bookkeeping says about a model: whether it holds the model on its load
device, whether it would hold it whole, whether another patcher's patches are merged into its
weights, whether a layer is streamed. Read-only: everything here looks, nothing moves.

Two kinds of patcher keep this state differently. ComfyUI's classic ModelPatcher loads weights
onto the device (whole, or partially under lowvram) and merges patches into them. Under dynamic
VRAM (ModelPatcherDynamic with comfy-aimdo) every layer casts its weight per call from a virtual
VRAM region that comfy-aimdo fills and evicts on its own; patches are applied while casting and
the result is kept until the model's `patches_uuid` changes, which marks every layer dirty and
re-streams all weights. The cached path never changes `patches_uuid`, so under dynamic VRAM it
keeps every resident weight as it is.

The decision (decision.py) and the memory owner (memory.py) both read the load state here, so
"loaded" means one thing in the package.
"""
from __future__ import annotations

import comfy.model_management as mm
import torch

_MB = 1024 * 1024


def is_dynamic(patcher) -> bool:
    """ModelPatcherDynamic answers is_dynamic() with True (classic patchers: False or absent)."""
    fn = getattr(patcher, "is_dynamic", None)
    return bool(callable(fn) and fn())


def holds(model, device: torch.device) -> bool:
    """Whether ComfyUI still holds `model`'s weights on `device` (its load device).

    Read from the state ComfyUI keeps on the model itself: an unload (free_memory,
    unload_all_models, POST /free, after a prompt under --disable-smart-memory) sets its loaded
    weight memory to 0 and, for a classic patcher, leaves it on the offload device; under dynamic
    VRAM it also empties the model's virtual VRAM regions. A detach for another patcher of the
    same model leaves all of it as it is."""
    vbars = getattr(model, "dynamic_vbars", None)
    if vbars:
        return model.model_loaded_weight_memory > 0 or any(v.loaded_size() > 0 for v in vbars.values())
    return model.model_loaded_weight_memory > 0 and torch.device(model.device).type == torch.device(device).type


def placement_problem(patcher, extra_bytes: int = 0) -> str | None:
    """Why ComfyUI would not hold the whole model on its load device for sampling.

    At node time ComfyUI has not loaded the model for this sampling yet, so this reads what
    decides it: the current load state, the vram mode and the free memory (ComfyUI's own
    lowvram rules in load_models_gpu). ON_PRE_RUN re-checks after the real load. Under dynamic
    VRAM there is no partial load to avoid: comfy-aimdo streams whatever does not fit, per layer,
    and the cached factors are applied after each layer's own cast.
    """
    if is_dynamic(patcher):
        return None
    model = patcher.model
    if model.model_lowvram:
        return (f"model is partially loaded (lowvram): {model.model_loaded_weight_memory / _MB:.0f} of "
                f"{patcher.model_size() / _MB:.0f} MB on {patcher.load_device}")
    dev = patcher.load_device
    if mm.is_device_cpu(dev):
        return None  # ComfyUI never loads partially onto the CPU
    if mm.vram_state == mm.VRAMState.NO_VRAM:
        return "ComfyUI runs with --novram: weights are streamed per layer"
    if mm.vram_state == mm.VRAMState.LOW_VRAM:
        return "ComfyUI runs with --lowvram: weights may be streamed per layer"
    loaded = model.model_loaded_weight_memory if model.device == dev else 0
    need = patcher.model_size() - loaded + extra_bytes + mm.minimum_inference_memory()
    free = mm.get_free_memory(dev)
    if need > free:
        return (f"not enough free memory on {dev} to hold the whole model: "
                f"{need / _MB:.0f} MB needed, {free / _MB:.0f} MB free")
    return None


def merged_problem(patcher) -> str | None:
    """Layers whose weights hold patches merged for another patcher.

    ComfyUI records every merged weight in the patcher's shared `backup`; when those belong to a
    different `patches_uuid`, sampling this patcher makes ComfyUI restore and reload them, which
    is a weight transfer the fast path must not cause. Lowvram weight functions count too.
    """
    model = patcher.model
    current = model.current_weight_patches_uuid
    if is_dynamic(patcher):
        # Under dynamic VRAM `backup` holds the small weights ComfyUI loads whole; what another
        # patcher leaves behind is its patches applied into the resident weights.
        if current is not None and current != patcher.patches_uuid:
            return "the resident weights carry another patcher's patches; ComfyUI re-streams them at this load"
        return None
    if patcher.backup and current is not None and current != patcher.patches_uuid:
        keys = sorted(patcher.backup)
        return (f"{len(keys)} layer weights are merged for another patcher (e.g. {keys[0]}); "
                "ComfyUI restores them at load")
    if model.lowvram_patch_counter:
        return f"{model.lowvram_patch_counter} layers carry lowvram patches"
    return None


def unattached_problem(entry) -> str | None:
    """Why a cached entry's factors are not ready on its layers, or None.

    A sampling activates the factors on the layers from the entry itself (scope.py), so this is
    a check of the entry, not a walk over its layers: the fast path's cost does not grow with
    the model. Layers ComfyUI leaves offloaded are a model-level fact
    (`model_lowvram`, placement_problem); a layer that casts its weight per call is not one
    (text encoders with a compute dtype, every layer under dynamic VRAM)."""
    if entry.model_ref() is None:
        return "model was freed"
    if not entry.live:
        return "its cache entry was replaced"
    if not entry.resident:  # the memory owner moved them (memory.py)
        return f"its factors were moved to cpu ({entry.offload_reason}); moved back to {entry.home}"
    return None


def weight_patched_at_cast(patcher, entry) -> str | None:
    """A form that reads the weight before it (DoRA's norms, GLoRA, OFT/BOFT, ComfyUI's own merge)
    on a layer that this patcher patches too. Under dynamic VRAM ComfyUI applies its patches while
    casting, so the layer's weight does not hold them: the form would see the bare weight."""
    if not is_dynamic(patcher) or not patcher.patches:
        return None
    for path, factors in entry.layers.items():
        if path + ".weight" in patcher.patches and any(getattr(f, "order_sensitive", False) for f in factors):
            return (f"layer {path} carries ComfyUI patches applied while casting (dynamic VRAM), which a "
                    f"form that reads the weight before it would not see")
    return None
