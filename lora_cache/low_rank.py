"""The plain low-rank update of a layer (`LayerFactors`), and moving and copying a layer's forms.

A layer's Linear factors share one down projection (`share_down`), so one GEMM computes every
factor's `x @ down` (Flux's q/k/v slices of a fused qkv weight); a layer's forms move and copy
together (`move_layer`, `copy_layer`) so that a shared down projection stays one tensor.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeGuard

import torch
from torch.nn.modules.conv import _ConvNd

from .form_base import CONV, LayerForm, Op, Place, Prefix, to_input


@dataclass(eq=False)
class LayerFactors:
    """One low-rank update of one layer: y[..., out] += strength * scale * up(down(x)).

    Linear: `down_t` is down^T [in, r] and `up_t` is up^T [r, out], laid out for addmm_.
    Conv: `down` [r, in, *k] (or [r, in, 1..] with `mid` [r, r, *k]) and `up` [out, r, 1..].
    `out_slice` is (start, length) where the target is a slice of a fused weight (Flux qkv).
    Linear factors of one layer share one down projection (`share_down`): their `down`s are
    then column views of `shared_down`.
    """

    kind: str
    down: torch.Tensor
    up: torch.Tensor
    scale: float
    mid: torch.Tensor | None = None
    out_slice: tuple[int, int] | None = None
    order_sensitive = False  # its delta does not depend on the weight it is added to
    # Set by share_down(): the layer's factors' downs side by side, and this factor's columns.
    shared_down: torch.Tensor | None = field(default=None, repr=False)
    shared_cols: tuple[int, int] | None = field(default=None, repr=False)

    def tensors(self) -> list[torch.Tensor]:
        return [self.down, self.up] + ([self.mid] if self.mid is not None else [])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def device(self) -> torch.device:
        return self.down.device

    def delta_fn(self, module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """x -> up(down(x)) without the scale (the output slice's update per unit scale), its
        tensors bound now: for a form built on these factors (DoRA), called per forward."""
        down, mid, up = self.down, self.mid, self.up
        if self.kind == "linear":
            def delta(x):
                d, u = to_input(down, x), to_input(up, x)
                return (x.reshape(-1, x.shape[-1]) @ d @ u).view(*x.shape[:-1], -1)
            return delta
        assert isinstance(module, _ConvNd), "factors other than Linear ones target a convolution (adapters.resolve)"
        stride, padding, dilation = module.stride, module.padding, module.dilation

        def delta_conv(x: torch.Tensor) -> torch.Tensor:
            conv = CONV[x.ndim - 2]
            if mid is None:
                h = conv(x, to_input(down, x), None, stride, padding, dilation)
            else:
                h = conv(conv(x, to_input(down, x)), to_input(mid, x), None, stride, padding, dilation)
            return conv(h, to_input(up, x))
        return delta_conv

    def dense(self) -> torch.Tensor:
        """up @ down as a weight of the target's shape, fp32, without the scale."""
        if self.kind == "linear":
            return (self.down.float() @ self.up.float()).t()
        up = self.up.float().flatten(1)  # [out, r]
        if self.mid is None:
            return (up @ self.down.float().flatten(1)).reshape(up.shape[0], *self.down.shape[1:])
        # LoCon with a mid kernel: up[o, r] mid[r, s, *k] down[s, i]
        return torch.einsum("or,rs...,si->oi...", up, self.mid.float(), self.down.float().flatten(1))

    def merge_into(self, weight: torch.Tensor, strength: float) -> None:
        """Adds the update to `weight` (the layer's whole fp32 weight) in place."""
        target = weight if self.out_slice is None else weight.narrow(0, *self.out_slice)
        target.add_(self.dense().reshape(target.shape), alpha=float(strength) * self.scale)

    def move(self, place: Place) -> None:
        """Moves this factor's tensors in place (move_layer moves a layer's factors together, a
        shared down projection once)."""
        move_layer((self,), place)

    def bind(self, module: torch.nn.Module, strength: float, prefix: Prefix) -> Op:
        """y += strength * scale * up(down(x)), in place where autograd does not record y; the
        tensors bound now (they do not move while the layer is active)."""
        alpha = strength * self.scale
        if self.kind != "linear":
            delta = self.delta_fn(module)

            def post_conv(x, y):
                if torch.is_grad_enabled() and y.requires_grad:
                    return y + alpha * delta(x)
                return y.add_(delta(x), alpha=alpha)
            return Op(None, post_conv)
        # the output columns the update goes to; None: all of them
        start, stop = (None, None) if self.out_slice is None else (self.out_slice[0], sum(self.out_slice))
        return Op(None, _LinearPost(self.down, self.up, alpha, start, stop).post)


class _LinearPost:
    """y += alpha * (x @ down) @ up (a Linear factor's tensors, laid out for addmm_) into the
    output columns start:stop (None: all), in place where autograd does not record y. A slotted
    object whose bound method is the Op, not a closure: an activation keeps one per factor, and
    a closure tracks a cell per value."""

    __slots__ = ("down", "up", "alpha", "start", "stop")

    def __init__(self, down: torch.Tensor, up: torch.Tensor, alpha: float, start: int | None,
                 stop: int | None) -> None:
        self.down, self.up, self.alpha, self.start, self.stop = down, up, alpha, start, stop

    def post(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        start, stop, alpha = self.start, self.stop, self.alpha
        d, u = to_input(self.down, x), to_input(self.up, x)
        h = x.reshape(-1, x.shape[-1]) @ d
        if not y.is_contiguous() or (torch.is_grad_enabled() and y.requires_grad):
            delta = (h @ u).mul_(alpha).view(*y.shape[:-1], -1)
            if start is None:
                return y + delta
            y = y.clone()
            y[..., start:stop] += delta
            return y
        y2 = y.view(-1, y.shape[-1])
        if start is None:
            y2.addmm_(h, u, alpha=alpha)
        else:
            y2[:, start:stop].addmm_(h, u, alpha=alpha)
        return y


def layer_tensors(factors: tuple[LayerForm, ...]) -> list[torch.Tensor]:
    """Every tensor a layer's forms hold, a shared down projection included (the factors' downs
    are views of it): what a move of the layer copies."""
    shared = [f.shared_down for f in factors if isinstance(f, LayerFactors) and f.shared_down is not None]
    return [t for f in factors for t in f.tensors()] + shared


def tensors_of(layers: Iterable[tuple[LayerForm, ...]]) -> list[torch.Tensor]:
    """Every tensor of every layer's forms (`layer_tensors`): an entry's whole set of factors."""
    return [t for fs in layers for t in layer_tensors(fs)]


def move_layer(factors: tuple[LayerForm, ...], place: Place) -> None:
    """Moves one layer's factors to `place` in place: the LayerFactors objects (which the layer's
    chain holds) stay, their tensors change place. A shared down projection moves once and the
    factors' `down`s become views of the moved copy again, so nothing stays behind on the old
    device and nothing is held twice."""
    shared: dict[int, torch.Tensor] = {}
    for f in factors:
        if not isinstance(f, LayerFactors):
            f.move(place)  # forms.py: each moves its own tensors and drops derived state
            continue
        if f.shared_down is not None:
            key = id(f.shared_down)
            if key not in shared:
                shared[key] = place(f.shared_down)
            f.shared_down = shared[key]
            assert f.shared_cols is not None, "share_down sets both"
            lo, hi = f.shared_cols
            f.down = f.shared_down[:, lo:hi]
        else:
            f.down = place(f.down)
        f.up = place(f.up)
        if f.mid is not None:
            f.mid = place(f.mid)


def copy_layer(factors: tuple[LayerForm, ...], place: Place) -> tuple[LayerForm, ...]:
    """A layer's factors (and forms) copied as new objects whose tensors `place` copies (an
    `arena.Arena`, which makes new tensors on any device, the factors' own included). The objects
    are copied without their tensors: a deepcopy would copy each tensor's whole storage, and an
    entry's factors are views of one block (arena.py)."""
    memo = {id(t): t for t in layer_tensors(factors)}
    copies = copy.deepcopy(factors, memo)
    move_layer(copies, place)
    for f in copies:
        states = f.__dict__.get("states")
        if states is not None:
            states.clear()  # derived from the other model's weights
    return copies


def all_linear(forms: tuple[LayerForm, ...]) -> TypeGuard[tuple[LayerFactors, ...]]:
    """Whether every form is a Linear layer's low-rank factors."""
    return all(isinstance(f, LayerFactors) and f.kind == "linear" for f in forms)


def share_down(factors: tuple[LayerForm, ...]) -> torch.Tensor | None:
    """One down projection for all Linear factors of a layer (Flux's q/k/v slices of a fused
    qkv weight, or q/k/v/mlp of linear1): their downs side by side in one [in, R] matrix, each
    factor's `down` becoming a view of its columns. One GEMM then computes every factor's
    `x @ down`, and the memory is the same as before. Idempotent."""
    if len(factors) < 2 or not all_linear(factors):
        return None
    first = factors[0]
    if first.shared_down is not None and all(f.shared_down is first.shared_down for f in factors):
        return first.shared_down
    d0 = first.down
    if any(f.down.dtype != d0.dtype or f.down.device != d0.device or f.down.shape[0] != d0.shape[0]
           for f in factors):
        return None
    shared = torch.cat([f.down for f in factors], 1).contiguous()
    col = 0
    for f in factors:
        r = f.down.shape[1]
        f.down = shared[:, col:col + r]
        f.shared_down, f.shared_cols = shared, (col, col + r)
        col += r
    return shared
