"""Merged copies of adapted weights, kept on the model's device across samplings.

For an adapted layer, a merged copy is ComfyUI's merge of the layer's active chain (every
adapter on it, in order, at its strength), built once on the device from the base weight as
ComfyUI casts it for the layer's forward (`comfy.ops.cast_bias_weight`: the resident weight, the
weight comfy-aimdo streams under dynamic VRAM, or the weight cast to the compute dtype, with any
stock patches applied; a copy of the base weight alone is read straight from the model file
where that gives the same tensor faster, base_read.py). The layer's forward then multiplies by the copy (layers.py): the
adapter costs nothing per step. ComfyUI's weights, patches and `patches_uuid` are never touched,
so nothing reloads or re-streams, and every other branch runs ComfyUI's own forward on its own
weight.

A copy is keyed by what it holds (`CopyKey`): the adapters of the layer's chain and their
strengths in order, and the base weight it was built from. A sampling with the same chain on the
same base uses it as it is; any other builds it again from the base weight. Copies live on the
layers' slots, one per layer; `REGISTRY` counts them per device and model for the memory owner
(memory.py), which drops them first when memory is short. Which layers of a sampling get a copy
is copy_choice.py's business.
"""
from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import base_read, layers, weight_update
from .form_base import Chain, weight_of
from .low_rank import LayerFactors
from .store import STORE


class CopyKey(NamedTuple):
    """What a copy holds: (adapter entry id, strength) per adapter of the chain, in chain order,
    and the base weight it was built from: the sampling patcher's patches_uuid (ComfyUI gives
    every change of the patches it merges or casts in a new one), the weight tensor, its version
    where torch keeps one (not for the inference tensors ComfyUI's loaders make), the compute
    dtype. ComfyUI's hook patches rewrite weights in place under the same uuid: layers they
    touch get no copy (copy_choice)."""

    chain: tuple[tuple[int, float], ...]
    base: tuple


@dataclass(eq=False)
class MergedCopy:
    key: CopyKey
    weight: torch.Tensor
    bias: torch.Tensor | None
    from_file: bool = False  # its base weight was read from the model file (base_read.py)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.bias) if t is not None)


def base_key(patcher, module: torch.nn.Module, dtype: torch.dtype) -> tuple:
    w = module.weight
    assert isinstance(w, torch.Tensor), "layers with copies have tensor weights (copyable)"
    version = None if w.is_inference() else w._version
    return (patcher.patches_uuid, id(w), version, str(dtype))


def merged(weight: torch.Tensor, chain: Chain) -> torch.Tensor:
    """A new tensor: `weight` with every form of `chain` merged in, rounded once to its dtype, as
    ComfyUI's merge computes it (calculate_weight in fp32, then cast). `weight` is not written.
    Where each row gets at most one low-rank update (one adapter, or Flux's q/k/v slices of one
    fused weight) one addmm per factor writes the copy (fp32 accumulation, one rounding);
    otherwise an fp32 copy of the weight takes every form's merge in chain order. An empty chain
    gives a copy of the base weight (never the tensor itself: under dynamic VRAM comfy-aimdo
    hands its own memory to the cast, which it reuses for other layers)."""
    if not chain:
        return weight.detach().clone()
    wp = weight_update.weight_plan(chain, weight) if _addmm_ready(chain, weight) else None
    if wp is not None and (len(wp.steps) == wp.tiles or (len(wp.steps) == 1 and wp.steps[0].start is None)):
        return weight_update.merged_weight(weight, wp)
    w32 = weight.to(torch.float32, copy=True)
    for forms, strength in chain:
        for f in forms:
            f.merge_into(w32, strength)
    return w32.to(weight.dtype)


def _addmm_ready(chain: Chain, w: torch.Tensor) -> bool:
    return all(isinstance(f, LayerFactors) and f.kind == "linear" and f.down.dtype == w.dtype
               and f.down.device == w.device for fs, _ in chain for f in fs)


@torch.no_grad()
def build(module: torch.nn.Module, chain: Chain, key: CopyKey, dtype: torch.dtype,
          device: torch.device) -> MergedCopy:
    """The copy of `module`'s weight with `chain` merged, on `device` in `dtype`, from the weight
    ComfyUI's cast hands the layer's forward (base_read.py), and the bias beside it (the cast's
    is copied: under dynamic VRAM it is a view of memory comfy-aimdo may hand to another layer
    later)."""
    if not hasattr(module, "weight_function"):  # a torch layer, not one of ComfyUI's ops
        bias = getattr(module, "bias", None)
        return MergedCopy(key, merged(weight_of(module).detach().to(device, dtype), chain),
                          None if bias is None else bias.detach().to(device, dtype, copy=True))
    with base_read.base_of(module, dtype, device) as base:
        w = merged(base.weight, chain)
        b = None if base.bias is None else base.bias.detach().clone()
    return MergedCopy(key, w, b)


def of_base(key: CopyKey, base: base_read.Base) -> MergedCopy:
    """A copy of the base weight alone, kept as `base` read it from the model file."""
    assert base.from_file, "the cast's tensors are ComfyUI's, valid only inside base_of"
    return MergedCopy(key, base.weight, base.bias, True)


class _Held(NamedTuple):
    module_id: int
    module: weakref.ref
    model_id: int
    model: weakref.ref
    device: str
    nbytes: int
    entries: frozenset[int]


class Registry:
    """Every merged copy held on a layer: its bytes per device and model, for the memory owner."""

    def __init__(self, lock: threading.RLock) -> None:
        self._held: dict[int, _Held] = {}
        # (model id, device) -> how many copies; the node's sweep asks once per pair, not per copy
        self._pairs: dict[tuple[int, str], tuple[weakref.ref, int]] = {}
        # The cache map's lock, which the memory owner holds when it drops copies: one lock, in
        # one order, also for a garbage collection that frees a model while a copy is put.
        self._lock = lock

    def _count(self, held: _Held, n: int) -> None:
        key = (held.model_id, held.device)
        ref, count = self._pairs.get(key, (held.model, 0))
        if count + n:
            self._pairs[key] = (ref, count + n)
        else:
            del self._pairs[key]

    def put(self, module: torch.nn.Module, model: torch.nn.Module, copy: MergedCopy) -> None:
        with self._lock:
            self.drop(module)
            slot = layers.slot_of(module, create=True)
            slot.copy = copy
            mid = id(module)
            held = self._held[mid] = _Held(mid, weakref.ref(module, functools.partial(self._gone, mid)),
                                           id(model), weakref.ref(model), str(copy.weight.device), copy.nbytes,
                                           frozenset(uid for uid, _ in copy.key.chain))
            self._count(held, 1)

    def _pop(self, module_id: int) -> _Held | None:
        held = self._held.pop(module_id, None)
        if held is not None:
            self._count(held, -1)
        return held

    def _gone(self, module_id: int, _ref: weakref.ref) -> None:
        with self._lock:
            self._pop(module_id)

    def drop(self, module: torch.nn.Module) -> int:
        """Drops `module`'s copy (a layer whose copy serves the sampling now running keeps it:
        the forward holds its own reference until the sampling ends). Returns the bytes."""
        with self._lock:
            held = self._pop(id(module))
            slot = layers.slot_of(module)
            if slot is not None:
                slot.copy = None
            return held.nbytes if held is not None else 0

    def drop_where(self, pred: Callable[[_Held], bool]) -> int:
        with self._lock:
            freed = 0
            # a snapshot: a collection the predicate's allocations start may free a layer (_gone)
            for held in [h for h in list(self._held.values()) if pred(h)]:
                module = held.module()
                if module is not None:
                    freed += self.drop(module)
            return freed

    def drop_models(self, gone: Callable[[torch.nn.Module | None, str], bool]) -> int:
        """Drops the copies of each (model, device) for which `gone(model, device)` holds, asking
        once per pair: the node's sweep runs this at every execution, and a model holds hundreds
        of copies."""
        with self._lock:
            dead = {key for key, (ref, _) in list(self._pairs.items()) if gone(ref(), key[1])}
            return self.drop_where(lambda h: (h.model_id, h.device) in dead) if dead else 0

    def bytes(self, device: str | torch.device | None = None) -> int:
        with self._lock:
            return sum(h.nbytes for h in self._held.values() if device is None or h.device == str(device))

    def count(self, device: str | torch.device | None = None) -> int:
        with self._lock:
            return sum(1 for h in self._held.values() if device is None or h.device == str(device))

    def devices(self) -> set[str]:
        with self._lock:
            return {h.device for h in self._held.values()}


REGISTRY = Registry(STORE.lock)
