"""What every cached form on a layer has, and the tensor helpers the forms share.

A form is one adapter's update of one layer: `LayerFactors` (low_rank.py) or a form of forms.py
(LoKr, dense, DoRA, OFT, BOFT, GLoRA). Each meets `LayerForm`: it counts and moves its tensors,
merges into a weight, and binds to a strength as an `Op`, the piece of a layer's forward that
applies it (layers.py runs a layer's `Op`s in chain order).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class Op(NamedTuple):
    """One active form on one layer, bound to its strength for this activation.

    `pre(x)`: the input that the forms before it (and the layer's own product) see, where the
    form changes the layer's input side (GLoRA, input-axis DoRA); None: unchanged.
    `post(x, y)`: the output with this form applied, given its own input and the output of
    everything before it; None: nothing to add."""

    pre: Callable | None
    post: Callable | None


class LayerForm(Protocol):
    """What every form on a layer has: `LayerFactors` (low_rank.py) and the forms of forms.py. The
    layer's slot, the memory owner and the merge use a layer's forms only through these."""

    kind: str
    order_sensitive: bool  # its update depends on the weight before it (DoRA, OFT, BOFT, GLoRA): order matters
    out_slice: tuple[int, int] | None

    def tensors(self) -> list[torch.Tensor]: ...

    @property
    def nbytes(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def move(self, place: Place) -> None: ...

    def bind(self, module: torch.nn.Module, strength: float, prefix: Prefix) -> Op: ...

    def merge_into(self, weight: torch.Tensor, strength: float) -> None: ...


class Place(Protocol):
    """Where a move puts a form's tensors: `place(t)` is `t`'s copy there, on `device`.
    An `arena.Arena` copies them into one allocation for all."""

    device: torch.device

    def __call__(self, t: torch.Tensor) -> torch.Tensor: ...


# The forms before one on its layer, in chain order, with their strengths.
Prefix = tuple[tuple[LayerForm, float], ...]
# A layer's active adapters in chain order: each adapter's forms on the layer and its strength.
Chain = tuple[tuple[tuple[LayerForm, ...], float], ...]


def weight_of(module: torch.nn.Module) -> torch.Tensor:
    """A targeted layer's weight (a Linear's or a convolution's, adapters.resolve): torch types
    any module attribute as Tensor | Module."""
    w = module.weight
    assert isinstance(w, torch.Tensor), f"{type(module).__name__}.weight is not a tensor"
    return w


def to_input(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # Stored in the model's compute dtype on its load device; an input in another dtype or
    # place (lowvram casts, a text encoder in fp32) gets a transient copy.
    return t if t.dtype == x.dtype and t.device == x.device else t.to(device=x.device, dtype=x.dtype)
