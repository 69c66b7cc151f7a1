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
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from comfy.patcher_extension import CallbacksMP, PatcherInjection, WrappersMP

from . import adapter_forms, build, events, files, layers, load_state, memory, merge
from .cost_model import COSTS, CostKey
from .errors import LoraCacheError
from .memory import MEMORY
from .store import Entry

KEY = "lora_cache"
# On a sampling patcher: how many leading items of its stack ride in ComfyUI's own patches
# (see _splice_late_patches).
SPLICED = "lora_cache_spliced"
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
    # ComfyUI patches per weight key on the patcher the node carried the adapter onto; more at
    # sampling time means a later node patched the same layer.
    seen: Mapping[str, int] = {}
    seen_spliced: int = 0  # how many items before it were in those patches already (SPLICED)
    node: str | None = None  # the node that carried it, for the badge


@dataclass(frozen=True)
class AdapterStack:
    """The ordered adapters a patcher carries. Immutable: clones share it."""

    items: tuple[StackItem, ...] = ()

    def with_adapter(self, item: StackItem) -> AdapterStack:
        return AdapterStack(self.items + (item,))


def stack_of(patcher) -> AdapterStack:
    return patcher.get_attachment(KEY) or AdapterStack()


def active_items(patcher) -> tuple[StackItem, ...]:
    """The stack items that our layers run for `patcher` (those before are in its patches)."""
    return stack_of(patcher).items[patcher.get_attachment(SPLICED) or 0:]


def carry(patcher, entry: Entry, strength: float, mode: str = "auto", node: str | None = None):
    """A clone of the diffusion model's `patcher` that activates `entry` on top of what it
    carries: unmerged (dynamic), merged into the weights for each sampling (merged), or
    whichever the cost model measured faster for that sampling (auto)."""
    n = patcher.clone()
    seen = {k: len(v) for k, v in patcher.patches.items()}
    item = StackItem(entry, strength, mode, seen, patcher.get_attachment(SPLICED) or 0, node)
    n.set_attachments(KEY, stack_of(patcher).with_adapter(item))
    for call_type, fn in ((CallbacksMP.ON_PRE_RUN, _on_pre_run), (CallbacksMP.ON_CLEANUP, _on_cleanup),
                          (CallbacksMP.ON_DETACH, memory.on_detach)):
        n.remove_callbacks_with_key(call_type, KEY)
        n.add_callback_with_key(call_type, KEY, fn)
    n.remove_wrappers_with_key(WrappersMP.OUTER_SAMPLE, KEY)
    n.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, KEY, _outer_sample)
    return n


def carry_clip(clip, entry: Entry, strength: float, node: str | None = None):
    """A clone of `clip` (comfy.sd.CLIP) whose patcher activates `entry` while it is loaded."""
    n = clip.clone()
    p = n.patcher
    seen = {k: len(v) for k, v in clip.patcher.patches.items()}
    p.set_attachments(KEY, stack_of(clip.patcher).with_adapter(StackItem(entry, strength, "dynamic", seen, 0, node)))
    p.set_injections(KEY, [PatcherInjection(inject=_activate_text_encoder, eject=_release)])
    return n


def _activate_text_encoder(patcher) -> None:
    # The diffusion model's chain is spliced into its patches before it loads
    # (_splice_late_patches); the text encoder has no hook before its load, so the order is
    # not kept there: the log says so.
    items = stack_of(patcher).items
    late = _late_patched(patcher, items, 0)
    if late:
        log.warning("[LoRA Cache] %s: a node after it adds patches to the same text encoder layers that, in "
                    "the stock chain, apply to a weight holding it; the encoding differs from the stock chain. "
                    "Place stock LoRA loaders before this node", items[late - 1].entry.lora)
    _activate(patcher)


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
    stack = active_items(patcher)
    if not stack:
        return
    model = patcher.model
    _deactivate(id(model))  # a run that never reached cleanup must not stack up
    items = [_current(item, patcher) for item in stack]
    MEMORY.pin(id(model), [item.entry for item in items])  # never evicted while active; moved back if needed
    act = _Activation(weakref.ref(patcher, functools.partial(_owner_gone, id(model))), [], timing=timing)
    _active[id(model)] = act
    to_merge = []
    want = [(forms or {}).get(item.mode, "dynamic") == "merged" for item in items]
    merged_flags = merge.merged_items([item.entry.layers for item in items], want)
    for item, merged in zip(items, merged_flags, strict=True):
        for _, module, factors in item.entry.modules():
            if merged:
                to_merge.append((module, factors, item.strength))
            else:
                layers.activate(module, factors, item.strength)
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
    _splice_late_patches(patcher)
    items = active_items(patcher)
    _planned[id(patcher.model)] = CostKey(tuple(id(item.entry) for item in items), tuple(noise.shape),
                                          len(sigmas) - 1)
    try:
        try:
            return executor(*args, **kwargs)
        except torch.OutOfMemoryError:
            freed = MEMORY.give_way(patcher.load_device, "the device ran out of memory while sampling",
                                    keep=[item.entry for item in items])
            if not freed:
                raise
            log.warning("[LoRA Cache] out of memory while sampling: %d bytes of cached factors not used by "
                        "this sampling moved off %s; sampling again", freed, patcher.load_device)
            return executor(*args, **kwargs)
    finally:
        _planned.pop(id(patcher.model), None)


def _additive(patch: tuple) -> bool:
    """Whether a ComfyUI patch entry (strength, adapter, strength_model, offset, function) adds
    an update that does not depend on the weight it is applied to, so that ours before it may
    stay in the layers' forward: LoRA, LoHa, LoKr without DoRA, or a `diff`, at model strength 1."""
    _, adapter, strength_model, _offset, function = patch[:5]
    if strength_model != 1.0 or function is not None:
        return False
    if isinstance(adapter, tuple):  # ComfyUI's tuple form: ("diff", (tensor,)), ("set", ...), ...
        return bool(adapter) and adapter[0] == "diff"
    return adapter_forms.plain_addition(adapter)


def _late_patched(patcher, items: tuple[StackItem, ...], done: int) -> int:
    """How many leading items must ride in ComfyUI's patches (at least `done`, those that do):
    up to the last one on whose layer a node after it added a patch that, in the stock chain,
    applies to a weight that holds ours. Our forms run on the weight as ComfyUI loads it, so
    that is exact only where our form does not read the weight before it (DoRA, OFT, ...) and
    the later patch is a plain addition."""
    n = done
    if not patcher.patches:  # nothing patched after ours (nor before): the usual case
        return n
    for i in range(done, len(items)):
        item = items[i]
        # ours before it that the patcher it was carried onto did not hold in its patches yet,
        # but this one does now (spliced): they come before the later patches too
        ours_since = [_patch_counts(items[j].entry) for j in range(item.seen_spliced, done)]
        for path, factors in item.entry.layers.items():
            key = path + ".weight"
            patches = patcher.patches.get(key)
            if not patches:
                continue
            later = patches[item.seen.get(key, 0) + sum(c[key] for c in ours_since):]
            if later and (any(f.order_sensitive for f in factors) or not all(_additive(p) for p in later)):
                n = i + 1
                break
    return n


def _patch_counts(entry: Entry) -> Counter[str]:
    """How many patches ComfyUI's add_patches appends per weight key for `entry` (fused-weight
    slices add one each)."""
    return Counter(k if isinstance(k, str) else k[0] for k in entry.patches)


def _splice_late_patches(patcher) -> None:
    """Before the model loads for a sampling: where a node after an order-dependent adapter of
    ours patched the same layers, that adapter (and ours before it) goes into the sampling
    patcher's own patches at its place in the chain, through ComfyUI's add_patches, and our
    layers leave it alone. ComfyUI then patches the chain exactly as the stock loaders would.
    The patcher is the later node's output, which ComfyUI reuses while nothing before it
    changes: it keeps the splice and its patches_uuid, so a repeated run patches nothing again.
    Clones of it carry the splice on (SPLICED), and a later stock loader splices further."""
    items = stack_of(patcher).items
    done = patcher.get_attachment(SPLICED) or 0
    n = _late_patched(patcher, items, done)
    if n <= done:
        return
    if load_state.is_dynamic(patcher):
        # comfy-aimdo applies patches while casting, so a form of ours that reads the weight
        # before it would see the bare weight on a layer that now carries spliced patches
        # (load_state.weight_patched_at_cast): those go into the patches too.
        grown = True
        while grown:
            grown = False
            keys = {k for item in items[:n] for k in _patch_counts(item.entry)}
            for i in range(n, len(items)):
                if any(path + ".weight" in keys and any(f.order_sensitive for f in fs)
                       for path, fs in items[i].entry.layers.items()):
                    n, grown = i + 1, True
    counts = [_patch_counts(item.entry) for item in items[:n]]
    for j in range(done, n):
        item = items[j]
        patcher.add_patches(item.entry.patches, item.strength)
        for key, added in counts[j].items():
            patches = patcher.patches.get(key)
            if not patches or len(patches) < added:
                continue  # a key this model does not have: add_patches skipped it
            new = patches[-added:]
            del patches[-added:]
            # after the ComfyUI patches the node saw, and ours before it that those did not hold
            at = item.seen.get(key, 0) + sum(c[key] for c in counts[item.seen_spliced:j])
            patches[at:at] = new
    patcher.set_attachments(SPLICED, n)
    last = items[n - 1].entry.lora
    for item in items[done:n]:
        why = ("a later node's patches on its layers apply, in the stock chain, to a weight that holds it"
               if item.entry.lora == last else
               f"it comes before {last}, which a later node's patches send there")
        events.record(events.Event(lora=item.entry.lora, path="full", node=item.node, ms=0.0,
                                   reason=f"ComfyUI's patches for this sampling, in chain order: {why}"))


def _sync(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _forms(patcher, items: tuple[StackItem, ...]) -> tuple[dict[str, str], str | None]:
    """Which form each mode takes in this sampling, and why `auto` chose its form."""
    forms = {"dynamic": "dynamic", "merged": "merged", "auto": "dynamic"}
    uses_auto = any(item.mode == "auto" for item in items)
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
    items = active_items(patcher)
    if not items:
        return
    model = patcher.model
    forms, why = _forms(patcher, items)
    if model.model_lowvram and any(forms[item.mode] == "merged" for item in items):
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
                                "adapters": [item.entry.lora for item in active_items(patcher)]})


def _deactivate(model_id: int) -> None:
    act = _active.pop(model_id, None)
    if act is None:
        return
    MEMORY.unpin(model_id)
    if act.merged is not None:
        act.merged.restore()
    for module in act.modules:
        layers.deactivate(module)

