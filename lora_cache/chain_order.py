"""Where the cached adapters of a sampling stand in the chain of loaders: which of them must ride in
ComfyUI's own patches instead of the layers' forward, so that the chain computes exactly what the
stock loaders' chain would. That is the case where a node after one of ours patched its layers
with an update that reads the weight before it (or ours reads it), and where an earlier sampling
found a layer of theirs that ComfyUI computes without its forward and whose cast cannot carry it
(reach.py). Those adapters are spliced into the sampling patcher's patches at their place."""
from __future__ import annotations

from collections import Counter

from . import adapter_forms, events, load_state, reach
from .stack import SPLICED, StackItem, stack_of
from .store import Entry


def additive(patch: tuple) -> bool:
    """Whether a ComfyUI patch entry (strength, adapter, strength_model, offset, function) adds
    an update that does not depend on the weight it is applied to, so that ours before it may
    stay in the layers' forward: LoRA, LoHa, LoKr without DoRA, or a `diff`, at model strength 1."""
    _, adapter, strength_model, _offset, function = patch[:5]
    if strength_model != 1.0 or function is not None:
        return False
    if isinstance(adapter, tuple):  # ComfyUI's tuple patches: ("diff", (tensor,)), ("set", ...), ...
        return bool(adapter) and adapter[0] == "diff"
    return adapter_forms.plain_addition(adapter)


def late_patched(patcher, items: tuple[StackItem, ...], done: int) -> int:
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
            if later and (any(f.order_sensitive for f in factors) or not all(additive(p) for p in later)):
                n = i + 1
                break
    return n


def _patch_counts(entry: Entry) -> Counter[str]:
    """How many patches ComfyUI's add_patches appends per weight key for `entry` (fused-weight
    slices add one each)."""
    return Counter(k if isinstance(k, str) else k[0] for k in entry.patches)


def splice_late_patches(patcher) -> None:
    """Before the model loads for a sampling: where a node after an order-dependent adapter of
    ours patched the same layers, that adapter (and ours before it) goes into the sampling
    patcher's own patches at its place in the chain, through ComfyUI's add_patches, and our
    layers leave it alone. ComfyUI then patches the chain exactly as the stock loaders would.
    The patcher is the later node's output, which ComfyUI reuses while nothing before it
    changes: it keeps the splice and its patches_uuid, so a repeated run patches nothing again.
    Clones of it carry the splice on (SPLICED), and a later stock loader splices further."""
    items = stack_of(patcher).items
    done = patcher.get_attachment(SPLICED) or 0
    late = late_patched(patcher, items, done)
    stranded, paths = _stranded_items(patcher, items, done)
    n = max(late, stranded)
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
    cause = ("a later node's patches on its layers apply, in the stock chain, to a weight that holds it"
             if late == n else f"ComfyUI computes its layers {reach.named(paths)} without calling their forward, "
                               f"through a cast that cannot carry it")
    for item in items[done:n]:
        why = (cause if item.entry.lora == last else
               f"it comes before {last}, which " + ("a later node's patches send there" if late == n else
                                                    "goes there: ComfyUI computes its layers without their forward"))
        events.record(events.Event(lora=item.entry.lora, path="full", node=item.node, ms=0.0,
                                   reason=f"ComfyUI's patches for this sampling, in chain order: {why}"))


def _stranded_items(patcher, items: tuple[StackItem, ...], done: int) -> tuple[int, list[str]]:
    """How many leading items must ride in ComfyUI's patches (at least `done`) because an earlier
    sampling found some layer of theirs stranded (reach.py): up to the last such item, in chain
    order; and the last one's stranded layers."""
    stranded = reach.stranded_paths(patcher.model)
    n, paths = done, []
    if stranded:
        for i in range(done, len(items)):
            mine = stranded.intersection(items[i].entry.layers)
            if mine:
                n, paths = i + 1, sorted(mine)
    return n, paths
