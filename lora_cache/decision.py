"""The fast / build / full / off decision. Each check returns a reason string or None, and
every Decision carries the reason that the log line, the stats route and the badge show."""
from __future__ import annotations

import torch

import comfy.model_management as mm
import comfy.utils

from . import layers
from .adapters import target_key
from .events import Decision
from .store import Entry

MODES = ("auto", "dynamic", "merged")
_MB = 1024 * 1024


def placement_problem(patcher, extra_bytes: int = 0) -> str | None:
    """Why ComfyUI would not hold the whole model on its load device for sampling.

    At node time ComfyUI has not loaded the model for this sampling yet, so this reads what
    decides it: the current load state, the vram mode and the free memory (ComfyUI's own
    lowvram rules in load_models_gpu). ON_PRE_RUN re-checks after the real load.
    """
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
    if patcher.backup and current is not None and current != patcher.patches_uuid:
        keys = sorted(patcher.backup)
        return f"{len(keys)} layer weights are merged for another patcher (e.g. {keys[0]}); ComfyUI restores them at load"
    if model.lowvram_patch_counter:
        return f"{model.lowvram_patch_counter} layers carry lowvram patches"
    return None


def unattached_layers(entry: Entry) -> str | None:
    model = entry.model_ref()
    if model is None:
        return "model was freed"
    if not entry.resident:  # memory budget or a ComfyUI unload moved them (store.py)
        return f"its factors were moved to cpu ({entry.offload_reason}); moved back to {entry.home}"
    for path, module, factors in entry.modules():
        if not layers.holds(module, entry, factors):
            return f"layer {path} no longer holds the cached factors"
        # ComfyUI marks the modules it leaves offloaded with `prev_comfy_cast_weights` (manual_cast
        # models cast every layer, so comfy_cast_weights alone says nothing) and gives patched
        # ones a weight_function.
        if hasattr(module, "prev_comfy_cast_weights") or getattr(module, "weight_function", None):
            return f"layer {path} is offloaded (weights cast per call)"
    return None


def fast_or_not(patcher, entry: Entry) -> Decision:
    """Fast only if nothing but flags changes: the entry is current and attached on every
    targeted layer, no layer is merged for another patcher, and the model is not partial."""
    for check in (lambda: unattached_layers(entry), lambda: merged_problem(patcher)):
        problem = check()
        if problem is not None:
            return Decision("build", f"cached factors reused, but {problem}")
    return Decision("fast", "cached adapter, layers flagged only")


def device_dtype(patcher, patches: dict | None = None) -> tuple[torch.device, torch.dtype]:
    """Where and in which dtype the layers compute: the factors are stored that way.

    A diffusion model says its compute dtype; a text encoder (manual_cast ops) computes in the
    dtype its layers hold, so the first patched layer's weight dtype is taken there."""
    model = patcher.model
    dtype = getattr(model, "manual_cast_dtype", None)
    if dtype is None and hasattr(model, "get_dtype"):
        dtype = model.get_dtype()
    if dtype is None:
        for target in patches or ():
            try:
                dtype = comfy.utils.get_attr(model, target_key(target)).dtype
                break
            except AttributeError:
                continue
    return patcher.load_device, dtype or torch.float32
