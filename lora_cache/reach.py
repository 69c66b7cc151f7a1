"""Whether ComfyUI reaches each adapted layer through its forward, and the net for those it does not.

The adapters ride on the layers' forwards (layers.py). ComfyUI may compute a layer without
calling its forward: `comfy.ops.linear_input_act` hands some MLP down-projections (Wan, LTX,
MiniMax) to fused kernels with the weight from `comfy.ops.cast_bias_weight`, in some versions
only under some settings (fp16 accumulation, fp16 activations, CUDA). Rather than follow each
version's rules, a sampling's first model call shows it: each layer notes the calls of its
forward and the casts of its weight outside that forward (`layers.probe`). A layer computed
outside its forward is served through ComfyUI's cast for the rest of the sampling: its chain
becomes a weight function, which every way ComfyUI computes such a layer applies (its forward
takes the cast path while one is set; the fused kernels call the cast). The first model call
then runs again (scope), so its output carries the adapter too; a call that reached every layer
through its forward runs once. A layer whose cast cannot carry its chain is stranded: scope
hands its adapters to ComfyUI's patches. The slot and the model remember the finding, so later
samplings serve such layers that way from their start and probe only the others.
"""
from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch

from . import copies, layers
from .form_base import Chain

# model -> paths of its layers that ComfyUI computes without their forward through a cast that
# cannot carry a chain: their adapters go to ComfyUI's patches before the model loads.
_stranded: weakref.WeakKeyDictionary[torch.nn.Module, set[str]] = weakref.WeakKeyDictionary()


class Probed(NamedTuple):
    path: str
    module: torch.nn.Module
    chain: Chain


class Start(NamedTuple):
    probing: list[Probed]
    served: int  # layers served through the cast from the start: found in an earlier sampling


class Finding(NamedTuple):
    # paths of the layers ComfyUI computed outside their forward, through their cast: served
    # through it from now on; the call's output lacks their adapter
    served: list[str]
    stranded: list[str]  # computed outside their forward, through a cast that cannot carry a chain
    idle: list[str]  # not computed in the call: served through the cast from now on where it can


def start(adapted: Iterable[Probed]) -> Start:
    """At a sampling's start, once the layers are activated: layers found bypassed before go
    through the cast now; every other layer is probed on the first model call."""
    probing, served = [], 0
    for p in adapted:
        slot = layers.slot_of(p.module)
        if slot is not None and slot.bypassed and layers.cast_carries(p.module):
            layers.serve_through_cast(p.module, cast_fn(p.module, p.chain))
            served += 1
        else:
            layers.probe(p.module)
            probing.append(p)
    return Start(probing, served)


def finish(model: torch.nn.Module, probing: list[Probed]) -> Finding:
    """After the first model call: the serving forwards replace the noting ones, and each layer
    ComfyUI computed outside its forward is served through its cast, or found stranded. A layer
    the call did not compute at all (a branch this conditioning does not take) goes through its
    cast too where it can: that serves it whichever way ComfyUI computes it later."""
    served: list[str] = []
    stranded: list[str] = []
    idle: list[str] = []
    for p in probing:
        reached = layers.end_probe(p.module)
        if reached.forward and not reached.cast:
            continue
        carries = layers.cast_carries(p.module)
        if carries:
            layers.serve_through_cast(p.module, cast_fn(p.module, p.chain))
        if not reached.cast:
            if carries:
                idle.append(p.path)
            continue
        layers.slot_of(p.module, create=True).bypassed = True
        (served if carries else stranded).append(p.path)
    if stranded:
        _stranded.setdefault(model, set()).update(stranded)
    return Finding(served, stranded, idle)


def cast_fn(module: torch.nn.Module, chain: Chain) -> Callable[[torch.Tensor], torch.Tensor]:
    """The weight function that carries `chain` in ComfyUI's cast: the layer's merged copy where
    the sampling has one (built from the weight as that cast hands it over), else ComfyUI's merge
    of the chain into the weight cast for this call (the weight update)."""
    slot = layers.slot_of(module)
    if slot is not None and slot.merged is not None:
        return layers.handing_over(slot.merged.weight)
    return functools.partial(copies.merged, chain=tuple(chain))


def stranded_paths(model: torch.nn.Module) -> set[str]:
    return _stranded.get(model, set())


def named(paths: list[str], shown: int = 3) -> str:
    """Layer paths for a message: the first few, then how many more."""
    return ", ".join(paths[:shown]) + (f" and {len(paths) - shown} more" if len(paths) > shown else "")
