"""Which sampling or text encoding an adapter is active in.

The node returns a clone of the model patcher (or of the CLIP) that carries the adapters as an
attachment (cloned along by later nodes) and activates them only while ComfyUI runs that
clone:
- diffusion model: ON_PRE_RUN (after ComfyUI loaded the model for sampling) and ON_CLEANUP
  (in the `finally` after it), called on the sampling patcher only; the first model call in
  between (APPLY_MODEL) checks that each adapted layer's forward was reached (reach.py);
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

import contextlib
import functools
import gc
import logging
import time
import weakref
from dataclasses import dataclass, field

import torch
from comfy.patcher_extension import CallbacksMP, PatcherInjection, WrappersMP

from . import build, chain_order, copy_choice, events, files, layers, memory, reach, sweep
from .errors import LoraCacheError
from .memory import MEMORY
from .stack import KEY, SPLICED, LayerChain, StackItem, active_items, layer_chains, stack_of
from .store import Entry

log = logging.getLogger("lora_cache")


@dataclass
class _Activation:
    owner: weakref.ref
    modules: list  # modules whose forward carries the adapters
    # A sampling's layers to probe on its first model call (reach.py), and its event.
    probing: list = field(default_factory=list)
    sampling: events.Sampling | None = None


# base module tree id -> what we activated and for whom, so deactivation undoes exactly that.
_active: dict[int, _Activation] = {}
# base model id -> the latent shape of the sampling about to start (set around it by OUTER_SAMPLE)
_shapes: dict[int, tuple[int, ...]] = {}


def carry(patcher, entry: Entry, strength: float, mode: str = "auto", node: str | None = None):
    """A clone of the diffusion model's `patcher` that activates `entry` on top of what it
    carries for each sampling: unmerged (dynamic), in merged copies of its layers wherever they
    fit (merged), or in merged copies where the cost model finds they save time (auto)."""
    n = patcher.clone()
    seen = {k: len(v) for k, v in patcher.patches.items()}
    item = StackItem(entry, strength, mode, seen, patcher.get_attachment(SPLICED) or 0, node)
    n.set_attachments(KEY, stack_of(patcher).with_adapter(item))
    _hook(n)
    return n


def carry_sweep(patcher, sw: sweep.Sweep):
    """A clone of the diffusion model's `patcher` that runs `sw`: image i of the latent batch
    gets setting i (sweep.py), on top of the ordinary adapters it carries."""
    if patcher.get_attachment(sweep.KEY) is not None:
        raise LoraCacheError("LoRA Cache Sweep: the model already carries a sweep; one sweep per sampling")
    n = patcher.clone()
    n.set_attachments(sweep.KEY, sw)
    _hook(n)
    n.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, sweep.KEY)
    n.add_wrapper_with_key(WrappersMP.APPLY_MODEL, sweep.KEY, sweep.apply_model_wrapper)
    return n


def _hook(n) -> None:
    for call_type, fn in ((CallbacksMP.ON_PRE_RUN, _on_pre_run), (CallbacksMP.ON_CLEANUP, _on_cleanup),
                          (CallbacksMP.ON_DETACH, memory.on_detach)):
        n.remove_callbacks_with_key(call_type, KEY)
        n.add_callback_with_key(call_type, KEY, fn)
    for wrapper_type, wrapper in ((WrappersMP.OUTER_SAMPLE, _outer_sample), (WrappersMP.APPLY_MODEL, _model_call)):
        n.remove_wrappers_with_key(wrapper_type, KEY)
        n.add_wrapper_with_key(wrapper_type, KEY, wrapper)


def carry_clip(clip, entry: Entry, strength: float, node: str | None = None):
    """A clone of `clip` (comfy.sd.CLIP) whose patcher activates `entry` while it is loaded."""
    n = clip.clone()
    p = n.patcher
    seen = {k: len(v) for k, v in clip.patcher.patches.items()}
    p.set_attachments(KEY, stack_of(clip.patcher).with_adapter(StackItem(entry, strength, "unmerged", seen, 0, node)))
    p.set_injections(KEY, [PatcherInjection(inject=_activate_text_encoder, eject=_release)])
    return n


def _activate_text_encoder(patcher) -> None:
    # The diffusion model's chain is spliced into its patches before it loads
    # (chain_order.splice_late_patches); the text encoder has no hook before its load, so the
    # order is not kept there: the log says so.
    items = stack_of(patcher).items
    late = chain_order.late_patched(patcher, items, 0)
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


@contextlib.contextmanager
def _uncollected():
    """No garbage collection while an activation sets up: the many small objects it makes for
    every layer and drops at its end are freed by their reference counts. A collection in between
    would move the ones still alive to the oldest generation, which only a full collection frees,
    and a full collection traces every object of the process (a quarter of a second under
    ComfyUI); it runs once enough such objects have come together."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _activate(patcher, sampling: bool = False) -> None:
    """Activates the patcher's adapters on its model. For a sampling, layers get merged copies
    where their modes allow them and memory and the cost model say so (copy_choice.py); every other
    layer runs its chain unmerged. A sweep's layers add each image's update after their output
    (sweep.py). The sampling records one event."""
    with _uncollected():
        _set_up(patcher, sampling)


def _set_up(patcher, sampling: bool) -> None:
    stack = active_items(patcher)
    sw = patcher.get_attachment(sweep.KEY) if sampling else None
    if not stack and sw is None:
        return
    t0 = time.perf_counter()
    model = patcher.model
    _deactivate(id(model))  # a run that never reached cleanup must not stack up
    items = [_current(item, patcher) for item in stack]
    swept_entries = [_current(StackItem(e, 1.0, "unmerged"), patcher).entry for e in sw.entries] if sw else []
    used = [item.entry for item in items] + swept_entries
    MEMORY.pin(id(model), used)  # never moved off or evicted while active
    act = _Activation(weakref.ref(patcher, functools.partial(_owner_gone, id(model))), [])
    _active[id(model)] = act
    chains = layer_chains(items)
    adapted = {id(lc.module) for lc in chains}
    if sampling:
        # What the sampling needs comes before cached factors and copies it does not use (copies
        # on its adapted and swept layers stay).
        swept_ids = {id(module) for e in swept_entries for _, module, _ in e.modules()}
        MEMORY.leave_room(patcher, _shapes.get(id(model)), keep=adapted | swept_ids)
    # Factors moved off come back after the unused ones left (under dynamic VRAM comfy-aimdo
    # evicts weights for whatever is on the device beside them), and before anything binds them.
    MEMORY.bring_back(used)
    swept = (sweep.posts(patcher, sw, swept_entries, {id(lc.module): lc.chain for lc in chains}, chain_order.additive)
             if sw else {})
    n_swept, n_layers = len(swept), len(adapted | swept.keys())
    # A swept layer without adapters of its own runs its base weight: where ComfyUI casts that per
    # call (dynamic VRAM), a copy of it kept on the device spares the cast, as a merged copy does.
    base = [LayerChain(s.path, s.module) for mid, s in swept.items()
            if mid not in adapted and layers.casts_per_call(s.module)]
    merged, info = (copy_choice.for_sampling(patcher, chains, items, base, _shapes.get(id(model)))
                    if sampling and (chains or base) else ({}, None))
    for lc in chains:
        post = swept.pop(id(lc.module), None)
        layers.activate(lc.module, lc.chain, merged.get(id(lc.module)), None if post is None else post.post)
        act.modules.append(lc.module)
    for mid, s in swept.items():
        layers.activate(s.module, (), merged.get(mid), s.post)
        act.modules.append(s.module)
    if sw is not None:
        info = _with_sweep(info, sw, swept_entries, n_swept, n_layers)
    if info is not None:
        began = reach.start(reach.Probed(lc.path, lc.module, tuple(lc.chain)) for lc in chains)
        act.probing = began.probing
        if began.served:
            info["net"] = began.served
            info["reason"] += (f"; {began.served} layers served through ComfyUI's cast (weight update): ComfyUI "
                               f"computes them without calling their forward")
        info["setup_ms"] = (time.perf_counter() - t0) * 1000.0  # ours before the sampling's first step
        act.sampling = events.record_sampling(info)


def _with_sweep(info: events.Sampling | None, sw: sweep.Sweep, entries: list[Entry], layers_swept: int,
                layers_adapted: int) -> events.Sampling:
    """The sampling's event with the sweep's part: its adapters, its node, what it runs, and every
    layer the sampling adapts (the swept ones and those with adapters of their own)."""
    note = sweep.note(sw, layers_swept)
    if info is None:
        info = events.sampling(note)
    else:
        info["reason"] = f"{note}; {info['reason']}"
    info["adapters"] = [*info["adapters"], *(e.lora for e in entries)]
    info["nodes"] = [*info["nodes"], *([sw.node] if sw.node else [])]
    info["layers"] = layers_adapted
    return info


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


class _Stranded(Exception):
    """Raised out of a sampling's first model call: some adapted layer is computed without its
    forward, through a cast that cannot carry its chain (reach.py)."""


def _model_call(executor, *args, **kwargs):
    """Around each model call of a sampling that carries adapters (APPLY_MODEL). The first one
    probes whether ComfyUI reaches every adapted layer through its forward (reach.py); where it
    did not, those layers are served through ComfyUI's cast and the call runs again, so no
    output lacks the adapter. Every later call, and a first call that reached every layer, runs
    as it is."""
    act = _active.get(id(executor.class_obj))
    if act is None or not act.probing:
        return executor(*args, **kwargs)
    probing, act.probing = act.probing, []
    out = executor(*args, **kwargs)
    found = reach.finish(executor.class_obj, probing)
    if found.stranded:
        raise _Stranded(", ".join(found.stranded))
    notes = [f"{len(paths)} layers {what} ({reach.named(paths)}): served through ComfyUI's cast (weight update){then}"
             for paths, what, then in ((found.served, "not reached through their forward",
                                        "; the first model call ran again"),
                                       (found.idle, "not computed in the first model call", "")) if paths]
    if notes and act.sampling is not None:
        events.amend_sampling(act.sampling, "; ".join(notes),
                              net=act.sampling["net"] + len(found.served) + len(found.idle))
    if not found.served:
        return out
    del out
    return executor(*args, **kwargs)


def _outer_sample(executor, *args, **kwargs):
    """Around one sampling: tells ON_PRE_RUN the latent shape, which the memory the sampling
    needs depends on (ON_PRE_RUN itself gets only the patcher). When the device runs out of
    memory, merged copies give way first (the sampling runs with fewer), then cached factors that
    this sampling does not use, and the sampling runs once more."""
    patcher = executor.class_obj.model_patcher
    noise = args[0]
    sw = patcher.get_attachment(sweep.KEY)
    if sw is not None:
        sweep.check_batch(sw, noise.shape[0])
    chain_order.splice_late_patches(patcher)
    items = active_items(patcher)
    _shapes[id(patcher.model)] = tuple(noise.shape)
    try:
        try:
            return _sampled(executor, patcher, *args, **kwargs)
        except torch.OutOfMemoryError:
            if not MEMORY.free_after_oom(patcher, keep=[item.entry for item in items]):
                raise
            return _sampled(executor, patcher, *args, **kwargs)
    finally:
        _shapes.pop(id(patcher.model), None)


def _sampled(executor, patcher, *args, **kwargs):
    """The sampling; once more with ComfyUI's patches where its first model call found layers
    stranded. ComfyUI's cleanup ran in its `finally`, so the layers are bare again and the model
    loads anew with the patches."""
    try:
        return executor(*args, **kwargs)
    except _Stranded:
        chain_order.splice_late_patches(patcher)
        return executor(*args, **kwargs)


def _on_pre_run(patcher) -> None:
    if not active_items(patcher) and patcher.get_attachment(sweep.KEY) is None:
        return
    _activate(patcher, sampling=True)
    if patcher.model.model_lowvram:
        log.warning("[LoRA Cache] model was loaded partially for this sampling; layers without a merged copy "
                    "run the adapter unmerged on top of ComfyUI's lowvram weights (correct, but slower)")


def _on_cleanup(patcher) -> None:
    _release(patcher)


def _deactivate(model_id: int) -> None:
    act = _active.pop(model_id, None)
    if act is None:
        return
    MEMORY.unpin(model_id)
    sweep.stop(model_id)
    for module in act.modules:
        layers.deactivate(module)
