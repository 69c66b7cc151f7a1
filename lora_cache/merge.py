"""Merging cached factors into the layers' weights in place, and restoring them exactly.

For merged mode without ComfyUI's reload: the factors already sit on the model's device, so
the merge is one small GEMM per layer on the GPU. Before a layer's weight is changed, a copy
of it is kept (on the same device when the memory allows, else in pinned host memory), and
`restore` copies it back: bit-exact, unlike subtracting the delta again, which drifts in
fp16 / bf16. Only the touched weights are copied.

A Linear factor is merged with one in-place `W.addmm_(up, down, alpha)` on the weight (or its
output slice): the GEMM accumulates W + alpha * up @ down in fp32 and rounds once to the weight's
dtype, as ComfyUI's `calculate_weight` (fp32, then cast) does, without an fp32 copy of W.
"""
from __future__ import annotations

import time

import torch

from .layers import LayerFactors


def _delta(f: LayerFactors, weight: torch.Tensor, strength: float) -> torch.Tensor:
    alpha = float(strength) * f.scale
    if f.kind == "linear":
        # linear factors are stored transposed: down [in, r], up [r, out]
        return (f.down.float() @ f.up.float()).t().mul_(alpha)
    if f.mid is not None:
        raise ValueError("merge: convolution factors with a mid kernel are not supported")
    up = f.up.float().flatten(1)        # [out, r]
    down = f.down.float().flatten(1)    # [r, in * k]
    return (up @ down).reshape(weight.shape).mul_(alpha)


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
        self.backup: dict[int, tuple[torch.nn.Module, torch.Tensor]] = {}
        self.keep_on_device = keep_on_device
        self.headroom = headroom
        self.where: str | None = None
        self.backup_bytes = 0
        self.backup_bytes_last = 0  # what the last merge copied (kept after restore)
        self.merged = False

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
        """Merges in place; returns the time taken in ms (device work included)."""
        if self.merged:
            raise RuntimeError("already merged")
        on_device = self._choose()
        t0 = time.perf_counter()
        device = None
        for m, fs, strength in self.items:
            w = m.weight
            device = w.device
            if id(m) not in self.backup:
                if on_device or w.device.type != "cuda":
                    copy = w.detach().clone()
                else:
                    copy = torch.empty(w.shape, dtype=w.dtype, pin_memory=True)
                    copy.copy_(w.detach(), non_blocking=True)
                self.backup[id(m)] = (m, copy)
                self.backup_bytes += copy.numel() * copy.element_size()
            wd = w.detach()
            for f in fs:
                target = wd if f.out_slice is None else wd[f.out_slice[0]:f.out_slice[0] + f.out_slice[1]]
                if f.kind == "linear" and f.down.dtype == wd.dtype and f.down.device == wd.device:
                    # down [in, r], up [r, out]: W[out, in] += alpha * up^T @ down^T
                    target.addmm_(f.up.t(), f.down.t(), alpha=float(strength) * f.scale)
                else:
                    target.copy_(target.float() + _delta(f, w, strength).to(target.device))
        if device is not None:
            _sync(device)
        self.where = "device" if on_device else "pinned host"
        self.backup_bytes_last = self.backup_bytes
        self.merged = True
        return (time.perf_counter() - t0) * 1000.0

    @torch.no_grad()
    def restore(self) -> float:
        """Copies the saved weights back (bit-exact) and frees the copies; returns ms."""
        t0 = time.perf_counter()
        device = None
        for m, copy in self.backup.values():
            m.weight.detach().copy_(copy, non_blocking=True)
            device = m.weight.device
        if device is not None:
            _sync(device)
        self.backup.clear()
        self.backup_bytes = 0
        self.merged = False
        return (time.perf_counter() - t0) * 1000.0
