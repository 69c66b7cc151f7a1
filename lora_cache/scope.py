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

import functools
import logging
import time
import weakref
from dataclasses import dataclass
from typing import NamedTuple

import torch
from comfy.patcher_extension import CallbacksMP, PatcherInjection, WrappersMP

from . import build, events, files, layers, load_state, memory, merge
from .cost_model import COSTS, CostKey
from .errors import LoraCacheError
from .memory import MEMORY
from .store import Entry

KEY = "lora_cache"
log = logging.getLogger("lora_cache")


class Timing(NamedTuple):
    """A sampling measured for `auto`: its cost key, the form it ran, why, and when it began."""

    key: CostKey
    form: str
    why: str
    start: float


@dataclass
class _Activation:
    owner: weakref.ref
    modules: list  # modules whose forward carries factors
    merged: merge.Merged | None = None  # weights merged for this run, restored on release
    timing: Timing | None = None

    def owned_by(self, patcher) -> bool:
        return self.owner() is patcher


# base module tree id -> what we activated and for whom, so deactivation undoes exactly that.
_active: dict[int, _Activation] = {}
# base model id -> cost key of the sampling about to start (set around it by OUTER_SAMPLE)
_planned: dict[int, CostKey] = {}


class StackItem(NamedTuple):
    entry: Entry
    strength: float
    mode: str  # auto, dynamic, merged


@dataclass(frozen=True)
class AdapterStack:
    """The ordered adapters a patcher carries. Immutable: clones share it."""

    items: tuple[StackItem, ...] = ()

    def with_adapter(self, entry: Entry, strength: float, mode: str = "dynamic") -> AdapterStack:
        return AdapterStack(self.items + (StackItem(entry, strength, mode),))


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


def _current(item: StackItem, patcher) -> StackItem:
    """The item with the entry that serves `patcher`'s model: the node's own, or its twin on the
    copy of the model that a later node handed to sampling (build.twin)."""
    entry = item.entry
    if not entry.live:
        raise LoraCacheError(f"LoRA '{entry.lora}': its cache entry was purged or replaced after "
                             f"the node ran; queue the prompt again")
    if not files.unchanged(entry.identity):
        raise LoraCacheError(f"LoRA file '{entry.lora}' changed on disk after the node ran; "
                             f"queue the prompt again to load the new file")
    if entry.model_ref() is patcher.model:
        return item
    return item._replace(entry=build.twin(entry, patcher))


def _activate(patcher, forms: dict[str, str] | None = None, timing: Timing | None = None) -> None:
    """Activates the patcher's adapters on its model: each item unmerged, or merged into the
    weights where `forms` maps its mode to "merged"."""
    stack = patcher.get_attachment(KEY)
    if not stack or not stack.items:
        return
    model = patcher.model
    _deactivate(id(model))  # a run that never reached cleanup must not stack up
    items = [_current(item, patcher) for item in stack.items]
    MEMORY.pin(id(model), [e for e, _, _ in items])  # never evicted while active; moved back if needed
    act = _Activation(weakref.ref(patcher, functools.partial(_owner_gone, id(model))), [], timing=timing)
    _active[id(model)] = act
    to_merge = []
    want = [(forms or {}).get(mode, "dynamic") == "merged" for _, _, mode in items]
    merged_flags = merge.merged_items([entry.layers for entry, _, _ in items], want)
    for (entry, strength, _mode), merged in zip(items, merged_flags, strict=True):
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
    keys its measured costs on (ON_PRE_RUN itself gets only the patcher). When the device runs
    out of memory, cached factors that this sampling does not use leave it first, and the
    sampling runs once more."""
    patcher = executor.class_obj.model_patcher
    noise, sigmas = args[0], args[3]
    items = stack_of(patcher).items
    _planned[id(patcher.model)] = CostKey(tuple(id(e) for e, _, _ in items), tuple(noise.shape), len(sigmas) - 1)
    try:
        try:
            return executor(*args, **kwargs)
        except torch.OutOfMemoryError:
            freed = MEMORY.give_way(patcher.load_device, "the device ran out of memory while sampling",
                                    keep=[e for e, _, _ in items])
            if not freed:
                raise
            log.warning("[LoRA Cache] out of memory while sampling: %d bytes of cached factors not used by "
                        "this sampling moved off %s; sampling again", freed, patcher.load_device)
            return executor(*args, **kwargs)
    finally:
        _planned.pop(id(patcher.model), None)


def _sync(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _forms(patcher, stack: AdapterStack) -> tuple[dict[str, str], str | None]:
    """Which form each mode takes in this sampling, and why `auto` chose its form."""
    forms = {"dynamic": "dynamic", "merged": "merged", "auto": "dynamic"}
    uses_auto = any(mode == "auto" for _, _, mode in stack.items)
    if load_state.is_dynamic(patcher):
        # comfy-aimdo may evict a weight and fault it in again from the file at any cast: a
        # merge in place would be lost silently. The node sends merged mode to ComfyUI's patch
        # path there; whatever still asks for it runs unmerged.
        return {m: "dynamic" for m in forms}, ("auto: dynamic VRAM streams the weights; unmerged is the one "
                                               "cached form that keeps them untouched" if uses_auto else None)
    key = _planned.get(id(patcher.model))
    if key is None or not uses_auto:
        return forms, None
    forms["auto"], why = COSTS.choose(key)
    return forms, why


def _on_pre_run(patcher) -> None:
    stack = stack_of(patcher)
    if not stack.items:
        return
    model = patcher.model
    forms, why = _forms(patcher, stack)
    if model.model_lowvram and any(forms[mode] == "merged" for _, _, mode in stack.items):
        log.warning("[LoRA Cache] model was loaded partially for this sampling: merged adapters run "
                    "unmerged instead (weights not on the device cannot be merged in place)")
        forms = {m: "dynamic" for m in forms}
    key = _planned.get(id(model))
    timing = Timing(key, forms["auto"], why, _sync(patcher.load_device)) if key is not None and why else None
    _activate(patcher, forms, timing)
    MEMORY.leave_room(patcher, key.shape if key is not None else None)
    if model.model_lowvram:
        log.warning("[LoRA Cache] model was loaded partially for this sampling; the adapter runs "
                    "unmerged on top of ComfyUI's lowvram weights (correct, but slower)")


def _on_cleanup(patcher) -> None:
    act = _active.get(id(patcher.model))
    _release(patcher)
    if act is not None and act.owned_by(patcher) and act.timing is not None:
        t = act.timing
        seconds = _sync(patcher.load_device) - t.start
        COSTS.record(t.key, t.form, seconds)
        events.record_sampling({"form": t.form, "reason": t.why, "ms": seconds * 1000.0,
                                "adapters": [e.lora for e, _, _ in stack_of(patcher).items]})


def _deactivate(model_id: int) -> None:
    act = _active.pop(model_id, None)
    if act is None:
        return
    MEMORY.unpin(model_id)
    if act.merged is not None:
        act.merged.restore()
    for module in act.modules:
        layers.deactivate(module)

