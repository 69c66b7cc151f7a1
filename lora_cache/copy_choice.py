"""Which layers of a sampling run merged copies (copies.py).

At a sampling's start every adapted layer whose adapters' modes allow a copy (auto, merged), whose
layer can take one and whose weights ComfyUI's hook patches leave alone is a candidate. The
cost model (cost_model.py) picks the copies that save the most time per byte within the bytes the
memory owner allows them (memory.py); a layer whose mode is merged asks for one whatever it saves.
A layer's copy that still holds what is asked is kept, the others are built; every other layer
runs its chain unmerged and gives its copy up.
"""
from __future__ import annotations

import time
from typing import NamedTuple

import torch

from . import base_read, build, copies, cost_model, events, layers, weight_update
from .copies import CopyKey, MergedCopy
from .form_base import Chain, weight_of
from .memory import MEMORY
from .stack import LayerChain, StackItem

_MIB = 1024 ** 2
_GIB = 1024 ** 3
# Modes whose adapters a merged copy may serve (the text encoder runs unmerged).
_COPY_MODES = {"auto": False, "merged": True}  # mode -> whether it asks for a copy whatever it saves


class Layer(NamedTuple):
    """One adapted layer of a sampling, as the copy choice sees it."""

    module: torch.nn.Module
    chain: Chain
    key: CopyKey
    required: bool  # merged mode asked for it


class Choice(NamedTuple):
    """What a sampling runs merged: the copies per module id, and the numbers the event shows."""

    copies: dict[int, MergedCopy]
    layers: int
    bytes: int
    built: int
    build_ms: float
    short: str | None  # why some layers that could have a copy run unmerged
    from_file: int = 0  # of those built, how many read their base weight from the model file
    read_ms: float = 0.0  # the file reads' part of build_ms

    def describe(self, what: str = "merged copies", rest: str = "unmerged") -> str:
        n = len(self.copies)
        read = f", {self.from_file} read from the model file in {self.read_ms:.0f} ms" if self.from_file else ""
        built = f"built {self.built} in {self.build_ms:.0f} ms{read}" if self.built else "none built"
        size = f"{self.bytes / _GIB:.2f} GiB" if self.bytes >= _GIB else f"{self.bytes / _MIB:.1f} MiB"
        text = f"{what}: {n} of {self.layers} layers, {size} ({built}); {rest}: {self.layers - n}"
        return text + (f" ({self.short})" if self.short else "")


def saving(layer: Layer, costs: cost_model.DeviceCosts, element: int) -> float:
    """Seconds per call the unmerged forms cost on `layer` over its own product (`element`: the
    bytes of one value in the compute dtype)."""
    if not layer.chain:  # a base copy (a swept layer's): it saves only ComfyUI's cast per call
        return 0.0
    w = weight_of(layer.module)
    wp = weight_update.weight_plan(layer.chain, w)  # None unless every form is a Linear's low-rank factors
    if wp is None:
        return cost_model.chain_saving(w.numel() * element, sum(len(fs) for fs, _ in layer.chain), costs)
    out_f, in_f = w.shape
    covered = sum(out_f if s.start is None or s.stop is None else s.stop - s.start for s in wp.steps)
    slot = layers.slot_of(layer.module)
    return cost_model.unmerged_saving(out_f, in_f, slot.rows if slot is not None else None, len(wp.steps),
                                      len(layer.chain), covered, element, costs)


def wanted(layer_list: list[Layer], budget: int, device: torch.device, dtype: torch.dtype) -> tuple[set[int], int]:
    """The layers (module ids) that get a copy within `budget` bytes, where the cost model says
    they save the most per byte, and the bytes they take."""
    costs = cost_model.device_costs(device)
    element = dtype.itemsize
    return cost_model.choose(
        [cost_model.LayerCost(id(ly.module), weight_of(ly.module).numel() * element,
                              saving(ly, costs, element), ly.required)
         for ly in layer_list], budget)


def drop_stale(layer_list: list[Layer], keep: set[int]) -> None:
    """Copies that hold something else than asked, and copies of layers not in `keep`, go before
    anything is built."""
    for ly in layer_list:
        slot = layers.slot_of(ly.module)
        current = slot.copy if slot is not None else None
        if current is not None and (current.key != ly.key or id(ly.module) not in keep):
            copies.REGISTRY.drop(ly.module)


def build_chosen(layer_list: list[Layer], keep: set[int], device: torch.device, dtype: torch.dtype,
                 model: torch.nn.Module, why_short: str) -> Choice:
    """The copies for a sampling: the layers' current copies where they hold what is asked, new
    ones built for the other layers in `keep`; every other layer runs unmerged. A copy that
    cannot be built (the device ran out of memory) leaves its layer unmerged."""
    out: dict[int, MergedCopy] = {}
    built, from_file, t0, short = 0, 0, time.perf_counter(), None
    chosen = [ly for ly in layer_list if id(ly.module) in keep]
    # copies of base weights read from the model file in a few large reads, before any cast
    read = base_read.read_from_file([ly.module for ly in chosen if not ly.chain
                                     and layers.slot_of(ly.module, create=True).copy is None], dtype, device)
    if read and device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()  # for read_ms only: the builds sync below anyway
    read_ms = (time.perf_counter() - t0) * 1000.0 if read else 0.0
    for ly in chosen:
        copy = layers.slot_of(ly.module, create=True).copy
        if copy is None:
            base = read.pop(id(ly.module), None)
            try:
                copy = (copies.of_base(ly.key, base) if base is not None
                        else copies.build(ly.module, ly.chain, ly.key, dtype, device))
            except torch.OutOfMemoryError:
                short = f"{device} ran out of memory building copies"
                break
            copies.REGISTRY.put(ly.module, model, copy)
            built += 1
            from_file += copy.from_file
        out[id(ly.module)] = copy
    if built and device.type == "cuda":
        # the builds' own stream: a device-wide sync would also wait for comfy-aimdo's streams
        torch.cuda.current_stream(device).synchronize()
    ms = (time.perf_counter() - t0) * 1000.0
    if short is None and len(out) < len(layer_list):
        short = why_short
    return Choice(out, len(layer_list), sum(c.nbytes for c in out.values()), built, ms if built else 0.0, short,
                  from_file, read_ms)


def _hooked_keys(patcher) -> set[str]:
    """The weight keys ComfyUI's hook patches (hook LoRAs on the conditioning) rewrite in place
    while the sampling runs: a copy built at its start would not see them."""
    return {key for patches in (getattr(patcher, "hook_patches", None) or {}).values() for key in patches}


def for_sampling(patcher, chains: list[LayerChain], items: list[StackItem], base: list[LayerChain],
                 shape: tuple[int, ...] | None) -> tuple[dict[int, MergedCopy], events.Sampling]:
    """The merged copies the sampling of `patcher` runs on `chains` (module id -> copy), and the
    sampling's event; `shape`: its latent's, which the memory it needs depends on. Layers that run
    unmerged give their copies up: they do not need them, and memory is better spent. `base`:
    swept layers without adapters of their own, which get copies of their base weight with what
    memory is left after the merged copies."""
    candidates = []
    choice = base_choice = None
    hooked = 0
    copy_modes = any(item.mode in _COPY_MODES for item in items)
    if copy_modes or base:
        device, dtype = build.device_dtype(patcher)
        device = torch.device(device)
        hook_keys = _hooked_keys(patcher)

        def rewritten(lc: LayerChain) -> bool:
            return lc.path + ".weight" in hook_keys or lc.path + ".bias" in hook_keys
        for lc in chains:
            if not all(m in _COPY_MODES for m in lc.modes) or not layers.copyable(lc.module):
                continue
            if rewritten(lc):
                hooked += 1
                continue
            key = CopyKey(tuple(zip(lc.entries, (s for _, s in lc.chain), strict=True)),
                          copies.base_key(patcher, lc.module, dtype))
            candidates.append(Layer(lc.module, tuple(lc.chain), key, any(_COPY_MODES[m] for m in lc.modes)))
        base_layers = [Layer(lc.module, (), CopyKey((), copies.base_key(patcher, lc.module, dtype)), False)
                       for lc in base if layers.copyable(lc.module) and not rewritten(lc)]
        held = sum(c.nbytes for ly in candidates + base_layers
                   if (c := layers.slot_of(ly.module, create=True).copy) is not None)
        budget, why = MEMORY.copy_budget(patcher, shape, held)
        keep, used = wanted(candidates, budget, device, dtype)
        keep_base, _ = wanted(base_layers, budget - used, device, dtype)
        drop_stale(candidates, keep)
        drop_stale(base_layers, keep_base)
        # Copies of base weights first: they read the model file where comfy-aimdo does not hold
        # the weight (base_read.py), and a merged copy's cast brings back comfy-aimdo's pages,
        # which neighbouring layers share.
        if base_layers:
            base_choice = build_chosen(base_layers, keep_base, device, dtype, patcher.model, why)
        choice = build_chosen(candidates, keep, device, dtype, patcher.model, why)
    chosen = [c for c in (choice, base_choice) if c is not None]
    served = {mid: copy for c in chosen for mid, copy in c.copies.items()}
    for lc in [*chains, *base]:
        if id(lc.module) not in served:
            copies.REGISTRY.drop(lc.module)
    parts = []
    if choice is None or (chains and not copy_modes):
        parts.append(f"unmerged: {len(chains)} layers (mode unmerged)")
    elif chains:
        others = len(chains) - len(candidates) - hooked
        parts.append(choice.describe() + "".join(
            f"; {n} layers unmerged ({why})" for n, why in ((others, "their mode or layer type"),
                                                            (hooked, "hook patches rewrite their weights while "
                                                                     "sampling")) if n))
    if base_choice is not None:
        parts.append(base_choice.describe("copies of the base weight on swept layers", "through ComfyUI's cast"))
    return served, events.sampling("; ".join(parts), (item.entry.lora for item in items),
                                   (item.node for item in items if item.node is not None),
                                   copies=len(served), layers=len(chains) + len(base),
                                   nbytes=sum(c.bytes for c in chosen), built=sum(c.built for c in chosen),
                                   build_ms=sum(c.build_ms for c in chosen))
