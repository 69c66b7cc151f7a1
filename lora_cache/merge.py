"""Merging cached factors into the layers' weights in place, and restoring them exactly.

For merged mode without ComfyUI's reload: the factors already sit on the model's device, so
the merge is one small GEMM per layer on the GPU. The original weights must come back bit-exact
after the sampling (subtracting the delta again drifts in fp16 / bf16), in one of two ways:

- where the device has room for the merged weights: each touched layer gets a new weight
  parameter holding the merged values, and `restore` puts the layer's original parameter back.
  The original is never written, so nothing is copied and the restore moves no data;
- else the original is copied to pinned host memory, merged in place, and copied back.

A layer whose forms are all low-rank Linear factors is merged with one `addmm` per factor on the
weight (or its output slice, `layers.merged_weight`): the GEMM accumulates W + alpha * up @ down
in fp32 and rounds once to the weight's dtype, as ComfyUI's `calculate_weight` (fp32, then cast)
does, without an fp32 copy of W. Any other layer (LoCon, LoHa, LoKr, DoRA, OFT, BOFT, GLoRA) is
merged as ComfyUI merges it: an fp32 copy of the weight, every form's `merge_into` in the stack's
order, one rounding back.
"""
from __future__ import annotations

import time

import torch

from .layers import LayerFactors, add_steps, merged_weight, order_sensitive, weight_of, weight_plan


def merged_items(stack_layers: list[dict], want: list[bool]) -> list[bool]:
    """Which adapters of a stack are merged for a sampling, given which want to be (`want`, in
    stack order; `stack_layers` their layers' forms). Merged weights come before every unmerged
    form on a layer, which changes nothing for additive forms; a form that depends on the weight
    before it (DoRA, OFT, BOFT, GLoRA) must see ComfyUI's chain order, so a stack with one merges
    all its adapters or none (then none)."""
    if any(want) and not all(want) and any(order_sensitive(layers) for layers in stack_layers):
        return [False] * len(want)
    return list(want)


def _addmm_ready(items, w: torch.Tensor) -> bool:
    return all(isinstance(f, LayerFactors) and f.kind == "linear" and f.down.dtype == w.dtype
               and f.down.device == w.device for fs, _ in items for f in fs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Merged:
    """One merge of a set of (module, factors, strength) into the modules' weights.

    `merge()` saves the touched weights and adds the deltas; `restore()` puts the saved weights
    back bit for bit and drops the copies. `where` says where the copies were kept.
    """

    def __init__(self, items, keep_on_device: bool | None = None, headroom: int = 1 << 30):
        self.items = [(m, tuple(fs), float(s)) for m, fs, s in items]
        # per touched module: (module, its original weight, whether the original is the module's
        # own parameter, swapped back on restore; else a host copy to copy back)
        self.backup: dict[int, tuple[torch.nn.Module, torch.Tensor, bool]] = {}
        self.keep_on_device = keep_on_device
        self.headroom = headroom
        self.where: str | None = None
        self.backup_bytes = 0
        self.backup_bytes_last = 0  # what the last merge copied (kept after restore)
        self.merged = False

    def _modules(self) -> list:
        # Each module once, in the order it first appears; its items in stack order.
        self._per_module: dict[int, list] = {}
        mods = []
        for m, fs, strength in self.items:
            if id(m) not in self._per_module:
                self._per_module[id(m)] = []
                mods.append(m)
            self._per_module[id(m)].append((fs, strength))
        return mods

    def _choose(self) -> bool:
        if self.keep_on_device is not None:
            return self.keep_on_device
        weights = {id(m): m.weight for m, _, _ in self.items}
        need = sum(w.numel() * w.element_size() for w in weights.values())
        dev = next(iter(weights.values())).device if weights else torch.device("cpu")
        if dev.type != "cuda":
            return True  # a copy in host memory is where the weight already is
        free, _ = torch.cuda.mem_get_info(dev)
        return need + self.headroom < free

    @torch.no_grad()
    def merge(self) -> float:
        """Merges; returns the time taken in ms (device work included)."""
        if self.merged:
            raise RuntimeError("already merged")
        on_device = self._choose()
        t0 = time.perf_counter()
        device = None
        for m in self._modules():
            w = weight_of(m)
            device = w.device
            items = self._per_module[id(m)]
            if (on_device or w.device.type != "cuda") and isinstance(w, torch.nn.Parameter):
                # A new parameter with the merged values; the original stays as it is.
                new = self._merged(w.detach(), items)
                self.backup[id(m)] = (m, w, True)
                self.backup_bytes += new.numel() * new.element_size()
                m.weight = torch.nn.Parameter(new, requires_grad=False)
                continue
            if w.device.type == "cuda":
                copy = torch.empty(w.shape, dtype=w.dtype, pin_memory=True)
                copy.copy_(w.detach(), non_blocking=True)
            else:
                copy = w.detach().clone()
            self.backup[id(m)] = (m, copy, False)
            self.backup_bytes += copy.numel() * copy.element_size()
            wd = w.detach()
            wp = weight_plan(items, wd) if _addmm_ready(items, wd) else None
            if wp is not None:  # in place: no transient copy of the weight
                add_steps(wd, wp.steps)
            else:
                wd.copy_(self._merged(wd, items))
        if device is not None:
            _sync(device)
        self.where = "device" if on_device else "pinned host"
        self.backup_bytes_last = self.backup_bytes
        self.merged = True
        return (time.perf_counter() - t0) * 1000.0

    @staticmethod
    def _merged(w: torch.Tensor, items) -> torch.Tensor:
        """A new tensor: `w` with every item's forms merged in, in stack order."""
        if not any(factors for factors, _ in items):
            return w.clone()
        wp = weight_plan(items, w) if _addmm_ready(items, w) else None
        if wp is not None:  # W + alpha * up^T @ down^T per factor, as the weight form computes it
            return merged_weight(w, wp)
        w32 = w.to(torch.float32, copy=True)  # `w` may be the original, which stays untouched
        for factors, strength in items:
            for f in factors:
                f.merge_into(w32, strength)
        return w32.to(w.dtype)

    @torch.no_grad()
    def restore(self) -> float:
        """Puts the original weights back (bit-exact) and frees the merged ones; returns ms."""
        t0 = time.perf_counter()
        device = None
        for m, original, swapped in self.backup.values():
            if swapped:
                m.weight = original
                continue
            w = weight_of(m)
            w.detach().copy_(original, non_blocking=True)
            device = w.device
        if device is not None:
            _sync(device)
        self.backup.clear()
        self.backup_bytes = 0
        self.merged = False
        return (time.perf_counter() - t0) * 1000.0
