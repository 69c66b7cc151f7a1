"""Merging cached factors into the layers' weights for one sampling, and restoring them exactly.

ComfyUI's own merged path gives the patcher a new `patches_uuid`, so the next load restores
every weight, moves the model to the host and uploads it again (seconds to tens of seconds).
Here the weights are merged in place on the device where they are loaded, from the factors
already there, with ComfyUI's own arithmetic (`comfy.lora.calculate_weight` in fp32, rounded
by `comfy.float.stochastic_rounding` seeded per key, as `patch_weight_to_device` does), so
the merged weights equal stock's. Before a weight is touched a copy of it is kept (on the
device while memory allows, else in pinned host memory) and written back after the sampling:
the restore is a copy, bit-exact, never a subtraction that would drift in fp16/bf16.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import comfy.float
import comfy.lora
import comfy.model_management as mm
from comfy.model_patcher import string_to_seed
from comfy.weight_adapter.lora import LoRAAdapter

from .layers import LayerFactors

# Kept free on the device besides the copies, so sampling itself never runs short.
_DEVICE_RESERVE = 1024 * 1024 * 1024


def _patch(f: LayerFactors, strength: float) -> tuple:
    """The factors as one ComfyUI patch (strength, adapter, strength_model, offset, function),
    built on the cached device tensors: no copy, no host transfer."""
    if f.kind == "linear":
        up, down, mid = f.up.t(), f.down.t(), None
    else:
        up, down, mid = f.up, f.down, f.mid
    rank = down.shape[0]
    adapter = LoRAAdapter(set(), (up, down, f.scale * rank, mid, None, None))
    offset = None if f.out_slice is None else (0, f.out_slice[0], f.out_slice[1])
    return (strength, adapter, 1.0, offset, None)


@dataclass
class Merged:
    """Weights merged for one sampling and the copies that restore them."""

    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.saved)

    def restore(self) -> None:
        for weight, copy in reversed(self.saved):
            weight.data.copy_(copy, non_blocking=copy.is_pinned())
        if self.saved and self.saved[0][0].device.type == "cuda":
            torch.cuda.current_stream(self.saved[0][0].device).synchronize()  # pinned copies are read
        self.saved.clear()


def _keep_copy(weight: torch.Tensor, on_device: bool) -> torch.Tensor:
    if on_device or weight.device.type == "cpu":
        return weight.detach().clone()
    copy = torch.empty(weight.shape, dtype=weight.dtype, device="cpu", pin_memory=True)
    copy.copy_(weight.detach())
    return copy


def merge(layers: list[tuple[str, torch.nn.Module, list[tuple[LayerFactors, float]]]]) -> Merged:
    """Merges into each (weight key, module, [(factors, strength), ...]) the listed updates in
    place, all of one key at once in fp32 and rounded once, as stock does for a chain of LoRAs.
    On an exception the weights merged so far are restored before it propagates."""
    done = Merged()
    if not layers:
        return done
    device = layers[0][1].weight.device
    need = sum(m.weight.numel() * m.weight.element_size() for _, m, _ in layers)
    on_device = device.type == "cpu" or mm.get_free_memory(device) > need + _DEVICE_RESERVE
    try:
        for key, module, updates in layers:
            weight = module.weight
            done.saved.append((weight, _keep_copy(weight, on_device)))
            work = weight.detach().to(torch.float32, copy=True)
            work = comfy.lora.calculate_weight([_patch(f, s) for f, s in updates], work, key)
            weight.data.copy_(comfy.float.stochastic_rounding(work, weight.dtype, seed=string_to_seed(key)))
    except BaseException:
        done.restore()
        raise
    return done
