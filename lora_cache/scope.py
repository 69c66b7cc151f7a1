"""Which sampling or text encoding an adapter is active in.

The node returns a clone of the model patcher (or of the CLIP) that carries the adapters as an
attachment (cloned along by later nodes) and activates them only while ComfyUI runs that
clone:
- diffusion model: ON_PRE_RUN (after ComfyUI loaded the model for sampling) and ON_CLEANUP
  (in the `finally` after it), called on the sampling patcher only;
- text encoder: CLIP has no such callbacks, so a PatcherInjection: ComfyUI injects at the end
  of every load of that patcher (each encode loads it) and ejects when any patcher of the same
  text encoder loads next, is unloaded or is garbage collected.
So the layers run the adapter exactly for a patcher that carries it; any other patcher of the
same base model (another branch, another workflow) finds the layers bare. Nothing here changes
weights or patches, so `patches_uuid` stays the same and ComfyUI never reloads for us.

Activation has an owner (the patcher that activated): ComfyUI copies `is_injected` into
clones, so a clone that never injected may eject (e.g. when it is garbage collected while a
sibling runs); only the owner's eject or cleanup deactivates.
"""
from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass

import torch
from comfy.patcher_extension import CallbacksMP, PatcherInjection, WrappersMP

from . import events, files, layers, memory, merge
from .cost_model import COSTS
from .errors import LoraCacheError
from .store import STORE, Entry

KEY = "lora_cache"
log = logging.getLogger("lora_cache")


@dataclass
class _Activation:
    owner: weakref.ref
    modules: list  # modules whose forward carries factors
    merged: merge.Merged | None = None  # weights merged for this run, restored on release
    timing: tuple | None = None  # (cost key, form, start) of a measured sampling


# base module tree id -> what we activated and for whom, so deactivation undoes exactly that.
_active: dict[int, _Activation] = {}
# base model id -> cost key of the sampling about to start (set around it by OUTER_SAMPLE)
_planned: dict[int, tuple] = {}


@dataclass(frozen=True)
class AdapterStack:
    """The ordered adapters a patcher carries, with their strengths and modes (auto, dynamic,
    merged). Immutable: clones share it."""

    items: tuple[tuple[Entry, float, str], ...] = ()

    def with_adapter(self, entry: Entry, strength: float, mode: str = "dynamic") -> "AdapterStack":
        return AdapterStack(self.items + ((entry, strength, mode),))


def stack_of(patcher) -> AdapterStack:
    return patcher.get_attachment(KEY) or AdapterStack()


def carry(patcher, entry: Entry, strength: float, mode: str = "auto"):
    """A clone of the diffusion model's `patcher` that activates `entry` on top of what it
    carries: unmerged (dynamic), merged into the weights for each sampling (merged), or
    whichever the cost model measured faster for that sampling (auto)."""
    n = patcher.clone()
    n.set_attachments(KEY, stack_of(patcher).with_adapter(entry, strength, mode))
    for call_type, fn in ((CallbacksMP.ON_PRE_RUN, _on_pre_run), (CallbacksMP.ON_CLEANUP, _on_cleanup),
                          (CallbacksMP.ON_DETACH, memory.on_detach)):
        n.remove_callbacks_with_key(call_type, KEY)
        n.add_callback_with_key(call_type, KEY, fn)
    n.remove_wrappers_with_key(WrappersMP.OUTER_SAMPLE, KEY)
    n.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, _outer_sample)
    return n


def carry_clip(clip, entry: Entry, strength: float):
    """A clone of `clip` (comfy.sd.CLIP) whose patcher activates `entry` while it is loaded."""
    n = clip.clone()
    p = n.patcher
    p.set_attachments(KEY, stack_of(clip.patcher).with_adapter(entry, strength, "dynamic"))
    p.set_injections(KEY, [PatcherInjection(inject=_activate, eject=_release)])
    return n


def _check_current(stack: AdapterStack, model) -> None:
    for entry, _, _ in stack.items:
        if entry.live and entry.model_ref() is not model:
            raise LoraCacheError(f"LoRA '{entry.lora}': a node after the LoRA Cache Loader moved the model "
                                 f"onto another model object (a device-selection or multi-GPU clone); "
                                 f"place such nodes before the LoRA Cache Loader")
        if not entry.live:
            raise LoraCacheError(f"LoRA '{entry.lora}': its cache entry was purged or replaced after "
                                 f"the node ran; queue the prompt again")
        if not files.unchanged(entry.identity):
            raise LoraCacheError(f"LoRA file '{entry.lora}' changed on disk after the node ran; "
                                 f"queue the prompt again to load the new file")


def _activate(patcher, forms: dict[str, str] | None = None, timing: tuple | None = None) -> None:
    """Activates the patcher's adapters on its model: each item unmerged, or merged into the
    weights where `forms` maps its mode to "merged"."""
    stack = patcher.get_attachment(KEY)
    if not stack or not stack.items:
        return
    model = patcher.model
    _deactivate(id(model))  # a run that never reached cleanup must not stack up
    _check_current(stack, model)
    STORE.pin(id(model), [e for e, _, _ in stack.items])  # never evicted while active; moved back if needed
    act = _Activation(weakref.ref(patcher, lambda ref, mid=id(model): _owner_gone(mid, ref)), [], timing=timing)
    _active[id(model)] = act
    to_merge = []
    want = [(forms or {}).get(mode, "dynamic") == "merged" for _, _, mode in stack.items]
    merged_flags = merge.merged_items([entry.layers for entry, _, _ in stack.items], want)
    for (entry, strength, mode), merged in zip(stack.items, merged_flags):
        for _, module, factors in entry.modules():
            if merged:
                to_merge.append((module, factors, strength))
            else:
                layers.activate(module, factors, strength)
                act.modules.append(module)
    if to_merge:
        act.merged = merge.Merged(to_merge)
        try:
            act.merged.merge()
        except BaseException:
            act.merged.restore()  # the weights touched so far
            raise


def _release(patcher) -> None:
    act = _active.get(id(patcher.model))
    # A dead owner counts as the caller: when the garbage collector frees a cycle it clears
    # weak references before ModelPatcher.__del__ ejects, so the owner's own eject finds None.
    owner = act.owner() if act is not None else None
    if act is not None and (owner is None or owner is patcher):
        _deactivate(id(patcher.model))


def _owner_gone(model_id: int, ref: weakref.ref) -> None:
    """The patcher that activated adapters was freed without releasing them (e.g. a CLIP clone
    dropped from ComfyUI's cache): nothing can run it any more, so the layers go bare."""
    act = _active.get(model_id)
    if act is not None and act.owner is ref:
        _deactivate(model_id)


def _outer_sample(executor, *args, **kwargs):
    """Around one sampling: tells ON_PRE_RUN the latent shape and step count, which `auto`
    keys its measured costs on (ON_PRE_RUN itself gets only the patcher)."""
    patcher = executor.class_obj.model_patcher
    noise, sigmas = args[0], args[3]
    items = stack_of(patcher).items
    _planned[id(patcher.model)] = (tuple(id(e) for e, _, _ in items), tuple(noise.shape), len(sigmas) - 1)
    try:
        return executor(*args, **kwargs)
    finally:
        _planned.pop(id(patcher.model), None)


def _sync(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _on_pre_run(patcher) -> None:
    stack = stack_of(patcher)
    if not stack.items:
        return
    model = patcher.model
    forms = {"dynamic": "dynamic", "merged": "merged", "auto": "dynamic"}
    why = None
    key = _planned.get(id(model))
    if key is not None and any(mode == "auto" for _, _, mode in stack.items):
        forms["auto"], why = COSTS.choose(key)
    if model.model_lowvram and any(forms[mode] == "merged" for _, _, mode in stack.items):
        log.warning("[LoRA Cache] model was loaded partially for this sampling: merged adapters run "
                    "unmerged instead (weights not on the device cannot be merged in place)")
        forms = {m: "dynamic" for m in forms}
    timing = (key, forms["auto"], why, _sync(patcher.load_device)) if key is not None and why else None
    _activate(patcher, forms, timing)
    if model.model_lowvram:
        log.warning("[LoRA Cache] model was loaded partially for this sampling; the adapter runs "
                    "unmerged on top of ComfyUI's lowvram weights (correct, but slower)")


def _on_cleanup(patcher) -> None:
    act = _active.get(id(patcher.model))
    _release(patcher)
    if act is not None and act.owner() is patcher and act.timing is not None:
        key, form, why, start = act.timing
        seconds = _sync(patcher.load_device) - start
        COSTS.record(key, form, seconds)
        events.record_sampling({"form": form, "reason": why, "ms": seconds * 1000.0,
                                "adapters": [e.lora for e, _, _ in stack_of(patcher).items]})


def _deactivate(model_id: int) -> None:
    act = _active.pop(model_id, None)
    if act is None:
        return
    STORE.unpin(model_id)
    if act.merged is not None:
        act.merged.restore()
    for module in act.modules:
        layers.deactivate(module)

