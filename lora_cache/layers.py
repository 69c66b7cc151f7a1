"""Cached forms on a layer, applied in its forward without touching its weight.

Each targeted module gets a `LayerSlot` (PEFT's per-adapter state on a layer): the chain of
forms active for the sampling now running and what runs it. A forward
of our own is installed on the module only while something is active, so a layer with no
active adapter runs ComfyUI's forward with no wrapper in the call path.

A layer's forms are `LayerFactors` (low-rank, this module) or the forms of forms.py (LoKr,
dense, DoRA, OFT, BOFT, GLoRA). When every active form is a low-rank Linear one, the forward
computes the update in one of two ways, chosen per call by which moves less memory:

- output form: one `x @ down` per adapter and one addmm_ per factor into the output, which
  reads the input again and reads and writes the output again;
- weight form: a transient weight `W + alpha * up down` (one addmm per factor), used by the
  layer's own product in place of W, which reads and writes the weight once. It wins wherever
  the weight is smaller than the activations (SDXL's layers at 1024x1024, Flux's image-token
  layers) and is one launch fewer per layer. The weight it reads is ComfyUI's: the layer's own
  where the weight is resident and not cast, else the one ComfyUI casts or streams for this
  call, through ComfyUI's per-call weight functions (the mechanism of its own lowvram patches).

Otherwise the forward runs `chain`: each active form bound to its strength as an `Op`, in the
order ComfyUI's chain of loaders would apply them, so forms that depend on the weight before
them (DoRA, OFT, BOFT, GLoRA) see exactly that weight.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol, TypeGuard, cast, overload

import torch
import torch.nn.functional as F
from torch.nn.modules.conv import _ConvNd

if TYPE_CHECKING:
    from .copies import MergedCopy

SLOT_ATTR = "lora_cache_slot"

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
    """What every form on a layer has: `LayerFactors` (below) and the forms of forms.py. The
    layer's slot, the memory owner and the merge use a layer's forms only through these."""

    kind: str
    order_sensitive: bool  # its update depends on the weight before it (see order_sensitive())
    out_slice: tuple[int, int] | None

    def tensors(self) -> list[torch.Tensor]: ...

    @property
    def nbytes(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def move(self, device: torch.device, pin: bool) -> None: ...

    def bind(self, module: torch.nn.Module, strength: float, prefix: Prefix) -> Op: ...

    def merge_into(self, weight: torch.Tensor, strength: float) -> None: ...


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

    def move(self, device: torch.device, pin: bool = False) -> None:
        """Moves this factor's tensors in place (move_layer moves a layer's factors together, a
        shared down projection once)."""
        move_layer((self,), device, pin)

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
        down, up = self.down, self.up
        # the output columns the update goes to; None: all of them
        start, stop = (None, None) if self.out_slice is None else (self.out_slice[0], sum(self.out_slice))

        def post(x, y):
            d, u = to_input(down, x), to_input(up, x)
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
        return Op(None, post)


def moved(t: torch.Tensor, device: torch.device, pin: bool) -> torch.Tensor:
    if device.type != "cpu":
        return t.to(device, non_blocking=True)
    out = t.detach().to(device, copy=True)
    if pin:
        try:
            out = out.pin_memory()  # the copy back to the device is then asynchronous-capable
        except RuntimeError:
            pass
    return out


def move_layer(factors: tuple[LayerForm, ...], device: torch.device, pin: bool = False) -> None:
    """Moves one layer's factors to `device` in place: the LayerFactors objects (which the layer's
    chain holds) stay, their tensors change place. A shared down projection moves once and the
    factors' `down`s become views of the moved copy again, so nothing stays behind on the old
    device and nothing is held twice."""
    shared: dict[int, torch.Tensor] = {}
    for f in factors:
        if not isinstance(f, LayerFactors):
            f.move(device, pin)  # forms.py: each moves its own tensors and drops derived state
            continue
        if f.shared_down is not None:
            key = id(f.shared_down)
            if key not in shared:
                shared[key] = moved(f.shared_down, device, pin)
            f.shared_down = shared[key]
            assert f.shared_cols is not None, "share_down sets both"
            lo, hi = f.shared_cols
            f.down = f.shared_down[:, lo:hi]
        else:
            f.down = moved(f.down, device, pin)
        f.up = moved(f.up, device, pin)
        if f.mid is not None:
            f.mid = moved(f.mid, device, pin)


def copy_layer(factors: tuple[LayerForm, ...], device: torch.device) -> tuple[LayerForm, ...]:
    """A layer's factors (and forms) copied to `device` as new objects owning their own tensors;
    views stay views of the copy of what they viewed (one deepcopy keeps storages shared)."""
    copies = copy.deepcopy(factors)
    move_layer(copies, device)
    for f in copies:
        states = f.__dict__.get("states")
        if states is not None:
            states.clear()  # derived from the other model's weights
    return copies


def _all_linear(forms: tuple[LayerForm, ...]) -> TypeGuard[tuple[LayerFactors, ...]]:
    return all(isinstance(f, LayerFactors) and f.kind == "linear" for f in forms)


def share_down(factors: tuple[LayerForm, ...]) -> torch.Tensor | None:
    """One down projection for all Linear factors of a layer (Flux's q/k/v slices of a fused
    qkv weight, or q/k/v/mlp of linear1): their downs side by side in one [in, R] matrix, each
    factor's `down` becoming a view of its columns. One GEMM then computes every factor's
    `x @ down`, and the memory is the same as before. Idempotent."""
    if len(factors) < 2 or not _all_linear(factors):
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


def order_sensitive(layers: dict[str, tuple[LayerForm, ...]]) -> bool:
    """Whether some form's update depends on the weight before it (DoRA, OFT, BOFT, GLoRA,
    ComfyUI's own merge): then the order of the adapters on a layer matters."""
    return any(f.order_sensitive for fs in layers.values() for f in fs)


class WeightPlan(NamedTuple):
    """The plan's updates as additions to the weight [out, in] (the weight form).

    Each step is (up^T [length, r], down^T [r, in], alpha, start, stop): rows start:stop of the
    weight get `alpha * up^T @ down^T`; start None: all rows. `tiles` steps come first and cover
    every row exactly once between them (Flux's q/k/v/mlp slices of one fused weight); then
    the transient weight is written by them, each from its rows of W, with no copy of W first.
    `merge_numel`: the input size (rows x in) from which the weight form moves less memory
    than the output form, where the weight is read in place (slices and stacked adapters
    counted); a weight that ComfyUI copies before its weight functions costs twice that."""

    tiles: int
    steps: tuple[tuple[torch.Tensor, torch.Tensor, float, int | None, int | None], ...]
    merge_numel: float


def _weight_plan(plan: tuple, weight: torch.Tensor) -> WeightPlan | None:
    if weight.ndim != 2 or not plan:
        return None
    out_f, in_f = weight.shape
    steps = []
    for down, parts in plan:
        for lo, hi, up, alpha, start, length in parts:
            d = down if lo is None else down[:, lo:hi]
            steps.append((up.t(), d.t(), float(alpha), start, None if start is None else start + length))
    first = plan[0][1]
    covered = sorted((p[4], p[4] + p[5]) for p in first if p[4] is not None)
    tiles = 0
    if len(covered) == len(first) and covered and covered[0][0] == 0 and covered[-1][1] == out_f and all(
            a[1] == b[0] for a, b in pairwise(covered)):
        tiles = len(first)
    # Memory each form moves per call. Output form: x [rows, in] read again per adapter, each
    # factor's output columns read and written. Weight form: W read and the new weight written
    # once, plus a read and write of its rows for every step after the first pass (all steps
    # where W is copied first).
    lengths = [out_f if start is None else stop - start for _, _, _, start, stop in steps]
    per_row = len(plan) * in_f + 2 * sum(lengths)
    first_pass = tiles or (1 if steps[0][3] is None else 0)
    weight_cost = 2 * out_f * in_f + 2 * in_f * sum(lengths[first_pass:])
    return WeightPlan(tiles, tuple(steps), weight_cost / per_row * in_f)


def merged_weight(weight: torch.Tensor, wp: WeightPlan) -> torch.Tensor:
    """A new tensor `weight + every step's update`; `weight` itself is left as it is (it is the
    layer's parameter, or a tensor comfy-aimdo keeps resident)."""
    steps = wp.steps
    if wp.tiles:
        out = torch.empty_like(weight)
        for ut, dt, alpha, start, stop in steps[:wp.tiles]:
            torch.addmm(weight[start:stop], ut, dt, alpha=alpha, out=out[start:stop])
        rest = steps[wp.tiles:]
    elif steps[0][3] is None:
        ut, dt, alpha, _, _ = steps[0]
        out = torch.addmm(weight, ut, dt, alpha=alpha)
        rest = steps[1:]
    else:
        out = weight.clone()
        rest = steps
    add_steps(out, rest)
    return out


def add_steps(weight: torch.Tensor, steps) -> None:
    """Adds each step's update to `weight` (or its rows) in place."""
    for ut, dt, alpha, start, stop in steps:
        (weight if start is None else weight[start:stop]).addmm_(ut, dt, alpha=alpha)


def weight_plan(active: Chain, weight: torch.Tensor) -> WeightPlan | None:
    """The weight form of (factors, strength) pairs on a layer with this weight; None where some
    form is not a low-rank Linear one."""
    plan = _plan(active)
    return None if plan is None else _weight_plan(plan, weight)


class LayerSlot:
    __slots__ = ("active", "installed", "prev_forward", "plan", "chain", "chain_pre", "weight_plan",
                 "weight_fn", "copy", "merged", "rows", "probed", "cast", "bypassed", "post")

    def __init__(self) -> None:
        self.active: Chain = ()
        self.installed: Callable | None = None
        self.prev_forward: Callable | None = None
        # What the direct forward computes, built on activate: per active adapter
        # (down [in, R], ((col_lo, col_hi, up, alpha, out_start, out_len), ...)).
        # None when some active form is not a low-rank Linear one.
        self.plan: tuple | None = None
        # The same updates as additions to the weight (the weight form), and the weight
        # function that ComfyUI's cast applies them through; None where `plan` is.
        self.weight_plan: WeightPlan | None = None
        self.weight_fn: Callable | None = None
        # Every active form as an Op, in chain order (see run_chain); chain_pre: some Op
        # changes the input side.
        self.chain: tuple[Op, ...] = ()
        self.chain_pre = False
        # The merged copy kept for this layer (copies.py owns it), and the one the running
        # sampling multiplies by (None: the active chain runs unmerged).
        self.copy: MergedCopy | None = None
        self.merged: MergedCopy | None = None
        # Input rows of the last unmerged call (the cost model's estimate of what a copy saves).
        self.rows: int | None = None
        # While a sampling's first model call probes the layer (probe).
        self.probed: _Probe | None = None
        # A weight function of ours on the module (the probe's note, or the chain riding on
        # ComfyUI's cast: serve_through_cast): the list put on the module, and the one it
        # replaced (None: the class's).
        self.cast: tuple[list, list | None] | None = None
        # ComfyUI computed this layer without calling its forward in an earlier sampling.
        self.bypassed = False
        # (x, y) -> y applied after everything above: a sweep's per-image update (sweep.py),
        # which no merged copy can hold.
        self.post: Callable | None = None


@overload
def slot_of(module: torch.nn.Module, create: Literal[True]) -> LayerSlot: ...


@overload
def slot_of(module: torch.nn.Module, create: bool = False) -> LayerSlot | None: ...


def slot_of(module: torch.nn.Module, create: bool = False) -> LayerSlot | None:
    slot = module.__dict__.get(SLOT_ATTR)
    if slot is None and create:
        slot = LayerSlot()
        # A plain attribute (not a Parameter or submodule) keeps ComfyUI's load list and
        # state_dict unchanged.
        module.__dict__[SLOT_ATTR] = slot
    return slot


def activate(module: torch.nn.Module, chain: Chain | list, merged: MergedCopy | None = None,
             post: Callable | None = None) -> None:
    """Activates `chain` (every adapter on the layer, in chain order) for one sampling or text
    encoding: the forward multiplies by `merged` (a copies.MergedCopy of this layer's weight with
    the chain merged in), or else runs the chain unmerged. What the forward needs is worked out
    here, once: ComfyUI's load for the sampling has set how the layer casts its weight."""
    slot = slot_of(module, create=True)
    if slot.installed is not None or slot.cast is not None:
        deactivate(module)
    slot.active = tuple(chain)
    slot.merged = merged
    slot.post = post
    if merged is None:
        slot.plan = _plan(slot.active)
        weight = getattr(module, "weight", None)
        wp = slot.weight_plan = (_weight_plan(slot.plan, weight)
                                 if slot.plan is not None and isinstance(weight, torch.Tensor) else None)
        slot.weight_fn = None if wp is None else (lambda w: merged_weight(w, wp))
        slot.chain = _chain(module, slot.active)
        slot.chain_pre = any(op.pre is not None for op in slot.chain)
    _install(module, slot)


def deactivate(module: torch.nn.Module) -> None:
    slot = slot_of(module)
    if slot is None:
        return
    slot.active = ()
    slot.merged = None
    slot.post = None
    slot.plan = None
    slot.weight_plan = None
    slot.weight_fn = None
    slot.chain = ()
    slot.chain_pre = False
    _uninstall(module, slot)
    _leave_cast(module, slot)


def _uninstall(module: torch.nn.Module, slot: LayerSlot) -> None:
    slot.probed = None
    if slot.installed is not None:
        # Only undo our own forward; if something replaced it after us, leave theirs alone.
        if module.__dict__.get("forward") is slot.installed:
            if slot.prev_forward is None:
                del module.__dict__["forward"]
            else:
                module.__dict__["forward"] = slot.prev_forward
        slot.installed = None
        slot.prev_forward = None


def is_installed(module: torch.nn.Module) -> bool:
    slot = slot_of(module)
    return slot is not None and slot.installed is not None


class Reached(NamedTuple):
    """How ComfyUI computed a layer in the probed model call."""

    forward: bool  # it called the layer's forward
    cast: bool  # it cast the layer's weight outside that forward, for a product of its own


@dataclass
class _Probe:
    serve: Callable  # the forward that serves the layer once the probe ends
    forward: bool = False
    cast: bool = False
    depth: int = 0  # inside the layer's forward: a cast there is the forward's own


def probe(module: torch.nn.Module) -> None:
    """Until `end_probe`, the layer notes how ComfyUI computes it: a forward in front of the
    installed one notes each call, and a weight function after the layer's own notes each cast
    of its weight outside that forward (a fused kernel fed from `comfy.ops.cast_bias_weight`, as
    `comfy.ops.linear_input_act` does). Both leave again with the probe, so the forward that
    serves the rest of the sampling does nothing more per call."""
    slot = slot_of(module)
    if slot is None or slot.installed is None or module.__dict__.get("forward") is not slot.installed:
        return
    state = slot.probed = _Probe(cast(Callable, slot.installed))
    serve = state.serve

    def noting(*args, **kwargs):
        state.forward = True
        state.depth += 1
        try:
            return serve(*args, **kwargs)
        finally:
            state.depth -= 1

    def noting_cast(weight: torch.Tensor) -> torch.Tensor:
        if not state.depth:
            state.cast = True
        return weight
    slot.installed = noting
    module.__dict__["forward"] = noting
    if hasattr(module, "weight_function"):
        _put_weight_function(module, slot, noting_cast)


def end_probe(module: torch.nn.Module) -> Reached:
    """Puts the serving forward back in place of the noting one and takes the noting weight
    function away; how ComfyUI computed the layer meanwhile (a layer not probed counts as
    reached through its forward)."""
    slot = slot_of(module)
    state = slot.probed if slot is not None else None
    if slot is None or state is None:
        return Reached(True, False)
    if module.__dict__.get("forward") is slot.installed:
        module.__dict__["forward"] = state.serve
        slot.installed = state.serve
    slot.probed = None
    _leave_cast(module, slot)
    return Reached(state.forward, state.cast)


def cast_carries(module: torch.nn.Module) -> bool:
    """Whether ComfyUI's cast can carry a layer's chain as a weight function: the layer is one of
    ComfyUI's ops with its stock cast, which hands weight functions the weight in the compute
    dtype (the mechanism of ComfyUI's own lowvram patches); every way ComfyUI computes such a
    layer goes through that cast (its forward takes the cast path while a weight function is
    set, and the fused kernels call `cast_bias_weight`)."""
    return hasattr(module, "weight_function") and copyable(module)


def serve_through_cast(module: torch.nn.Module, fn: Callable) -> None:
    """For the rest of the activation the layer's chain rides on ComfyUI's cast instead of its
    forward: our forward goes and `fn` (weight -> the weight with the chain in it) follows the
    layer's own weight functions (stock loaders' lowvram patches first, as in the chain of
    loaders) in a new list, so the class's shared list is never written. ComfyUI applies weight
    functions to the weight it casts or streams for one call and keeps none of their results,
    so nothing resident changes and nothing is re-streamed."""
    slot = slot_of(module, create=True)
    _uninstall(module, slot)
    _leave_cast(module, slot)
    _put_weight_function(module, slot, fn)


def _put_weight_function(module: torch.nn.Module, slot: LayerSlot, fn: Callable) -> None:
    d = module.__dict__
    prev = d.get("weight_function")
    current = prev if prev is not None else cast(list, module.weight_function)
    ours = d["weight_function"] = [*current, fn]
    slot.cast = (ours, prev)


def handing_over(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A weight function that hands over `weight` (a merged copy) in place of the one cast."""
    return lambda cast_weight: to_input(weight, cast_weight)


def _leave_cast(module: torch.nn.Module, slot: LayerSlot) -> None:
    if slot.cast is None:
        return
    ours, prev = slot.cast
    slot.cast = None
    d = module.__dict__
    # A load of the model since (ComfyUI sets each layer's list at load) already dropped ours.
    if d.get("weight_function") is ours:
        if prev is None:
            del d["weight_function"]
        else:
            d["weight_function"] = prev


def _plan(active: Chain) -> tuple | None:
    """The direct forward's work for the active adapters, or None if some factor is not a
    Linear one (then `chain` serves the layer)."""
    plan: list[tuple] = []
    for factors, strength in active:
        if not _all_linear(factors):
            return None
        shared = share_down(factors)
        if shared is None:
            for f in factors:
                plan.append((f.down, ((None, None, f.up, strength * f.scale) + (f.out_slice or (None, None)),)))
        else:
            parts = tuple(cast(tuple, f.shared_cols) + (f.up, strength * f.scale) + (f.out_slice or (None, None))
                          for f in factors)
            plan.append((shared, parts))
    return tuple(plan)


def _chain(module: torch.nn.Module, active: Chain) -> tuple[Op, ...]:
    """Every active form bound to its strength, in chain order. A form that depends on the
    weight before it gets the forms before it on this layer (`prefix`) to compute that weight
    from (forms.py caches what it derives, per weight and prefix)."""
    ops = []
    prefix: list[tuple[LayerForm, float]] = []
    for factors, strength in active:
        for f in factors:
            ops.append(f.bind(module, strength, tuple(prefix) if f.order_sensitive else ()))
            prefix.append((f, strength))
    return tuple(ops)


def run_chain(chain: tuple[Op, ...], has_pre: bool, x: torch.Tensor, base: Callable) -> torch.Tensor:
    """The layer's output with every Op of `chain` applied, as ComfyUI's chain of loaders would
    apply them to the weight: an Op that changes the input side changes what the layer's own
    product and every Op before it see; an Op's post sees the output of everything before it."""
    if not has_pre:
        y = base(x)
        for op in chain:
            if op.post is not None:
                y = op.post(x, y)
        return y
    inputs = []
    cur = x
    for op in reversed(chain):
        inputs.append(cur)
        if op.pre is not None:
            cur = op.pre(cur)
    y = base(cur)
    for op, xi in zip(chain, reversed(inputs), strict=True):
        if op.post is not None:
            y = op.post(xi, y)
    return y


def _posts(chain: tuple[Op, ...], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    for op in chain:
        if op.post is not None:
            y = op.post(x, y)
    return y


def own_forward(module: torch.nn.Module, fwd: Callable | None) -> bool:
    """Whether an instance-level `forward` is only the module's own class forward, bound to it:
    what ComfyUI's bypass loader leaves on every layer it injected into once it ejects."""
    return getattr(fwd, "__self__", None) is module and getattr(fwd, "__func__", None) is type(module).forward


def _stock_forward(module: torch.nn.Module) -> bool:
    """Whether the layer computes with ComfyUI's (or torch's) own Linear or convolution forward
    and nothing of another party's: its output is then its weight's product, which the direct
    forward and a merged copy compute themselves."""
    prev = module.__dict__.get("forward")
    slot = slot_of(module)
    ours = slot is not None and prev is slot.installed
    if prev is not None and not ours and not own_forward(module, prev):
        return False
    fwd = type(module).forward
    return fwd in _TORCH_FORWARDS or fwd in _comfy_forwards()[0]


def copyable(module: torch.nn.Module) -> bool:
    """Whether a merged copy can serve the layer: its forward is the stock one and its cast is
    ComfyUI's stock cast (other ops classes, scaled fp8 or fp8 matmul, hand their cast weight
    over in another scale or dtype), and its weight is a plain tensor."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or type(weight) not in (torch.Tensor, torch.nn.Parameter):
        return False
    if not isinstance(module, (torch.nn.Linear, _ConvNd)) or not _stock_forward(module):
        return False
    cast = getattr(type(module), "forward_comfy_cast_weights", None)
    return cast is None or cast in _comfy_forwards()[1]


_TORCH_FORWARDS = (torch.nn.Linear.forward, torch.nn.Conv1d.forward, torch.nn.Conv2d.forward,
                   torch.nn.Conv3d.forward)
_COMFY_FORWARDS: tuple[tuple, tuple] | None = None


def _no_op() -> None:
    return None


_EVERY_OP: Callable = _no_op


def _comfy_forwards() -> tuple[tuple, tuple]:
    """ComfyUI's stock layer forwards and cast forwards (Linear and convolutions)."""
    global _COMFY_FORWARDS, _EVERY_OP
    if _COMFY_FORWARDS is None:
        try:
            import comfy.ops
            ops = comfy.ops.disable_weight_init
            classes = [ops.Linear, ops.Conv1d, ops.Conv2d, ops.Conv3d]
            _COMFY_FORWARDS = (tuple(c.forward for c in classes), tuple(c.forward_comfy_cast_weights for c in classes))
            # ComfyUI's layer forward checks for an interrupt on every call; so does ours.
            _EVERY_OP = getattr(comfy.ops, "run_every_op", _no_op)
        except Exception:  # outside ComfyUI (a bare torch module in a test)
            _COMFY_FORWARDS = ((), ())
    return _COMFY_FORWARDS


def _through_weight_function(module: torch.nn.Module, fn: Callable, base: Callable, x: torch.Tensor,
                             *args, **kwargs) -> torch.Tensor:
    """ComfyUI's forward with `fn` after the layer's own weight functions for this one call: its
    cast hands the weight it casts or streams to them in the compute dtype and uses what they
    return (stock loaders' lowvram patches come first, as in the chain of loaders)."""
    d = module.__dict__
    had = "weight_function" in d
    prev = cast(list, d["weight_function"] if had else module.weight_function)
    ours = d["weight_function"] = [*prev, fn]
    try:
        return base(x, *args, **kwargs)
    finally:
        if d.get("weight_function") is ours:
            if had:
                d["weight_function"] = prev
            else:
                del d["weight_function"]


def _install(module: torch.nn.Module, slot: LayerSlot) -> None:
    prev = module.__dict__.get("forward")
    base = prev if prev is not None else type(module).forward.__get__(module)
    every_op = _EVERY_OP
    copy = slot.merged
    if copy is None:
        # Fixed for the sampling once ComfyUI loaded the model: whether the layer casts its weight
        # per call (dynamic VRAM, lowvram, a compute dtype other than the stored one) and how.
        casts = bool(getattr(module, "comfy_cast_weights", False) or getattr(module, "weight_function", None)
                     or getattr(module, "bias_function", None))
        forward = _unmerged_forward(module, slot, base, _stock_forward(module), casts)
    else:
        w, b = copy.weight, copy.bias
        run = F.linear if isinstance(module, torch.nn.Linear) else cast(_ConvNd, module)._conv_forward
        swap = handing_over(w)

        def forward(x, *args, **kwargs):
            # The adapted layer is its own product on the merged copy: nothing else per call.
            if args or kwargs:
                # arguments only ComfyUI's forward knows: its forward, handed the copy as weight
                return _through_weight_function(module, swap, base, x, *args, **kwargs)
            every_op()
            if x.dtype != w.dtype or x.device != w.device:
                return run(x, to_input(w, x), None if b is None else to_input(b, x))
            return run(x, w, b)
    if slot.post is not None:
        forward = _then(forward, slot.post)
    slot.prev_forward = prev
    slot.installed = forward
    module.__dict__["forward"] = forward


def _then(forward: Callable, post: Callable) -> Callable:
    def with_post(x, *args, **kwargs):
        return post(x, forward(x, *args, **kwargs))
    return with_post


def _unmerged_forward(module: torch.nn.Module, slot: LayerSlot, base: Callable, stock: bool,
                      casts: bool) -> Callable:
    linear, every_op = F.linear, _EVERY_OP
    # The direct path: ComfyUI's Linear forward would only check the cast settings and call
    # F.linear; with the check done here, the base product and the updates run without
    # ComfyUI's Python frames. Where the layer casts its weight per call, ComfyUI's own forward
    # computes the base product.
    direct_ok = stock and isinstance(module, torch.nn.Linear) and not casts
    # The weight form goes through ComfyUI's weight functions only where its cast is the stock
    # one: other ops classes (scaled fp8, fp8 matmul) hand them a weight in another scale or
    # dtype, or skip their fast path when any is set. comfy-aimdo hands its resident weight to
    # them as it is; ComfyUI's other casts copy it first.
    through_fn = casts and copyable(module)
    fn_numel_factor = 1 if hasattr(module, "_v") else 2

    def direct(x):
        every_op()
        return linear(x, cast(torch.Tensor, module.weight), cast(torch.Tensor | None, module.bias))

    def forward(x, *args, **kwargs):
        plan = slot.plan
        plain = not args and not kwargs
        use_direct = direct_ok and plain and x.dtype == module.weight.dtype
        if plan is not None:
            down0 = plan[0][0] if plan else None
            if down0 is None or x.dtype != down0.dtype or x.device != down0.device:
                y = direct(x) if use_direct else base(x, *args, **kwargs)
                return _posts(slot.chain, x, y)
            n = x.numel()
            slot.rows = n // x.shape[-1]
            wp = slot.weight_plan
            if wp is not None and not torch.is_grad_enabled():
                if use_direct and n >= wp.merge_numel:
                    every_op()
                    return linear(x, merged_weight(cast(torch.Tensor, module.weight), wp),
                                  cast(torch.Tensor | None, module.bias))
                fn = slot.weight_fn
                if (through_fn and plain and fn is not None and module.weight.dtype == x.dtype
                        and n >= wp.merge_numel * fn_numel_factor):
                    return _through_weight_function(module, fn, base, x)
            # Output form: the updates go into the output in place, one `x @ down` per adapter
            # (shared by q/k/v slices) and one addmm_ per factor.
            y = direct(x) if use_direct else base(x, *args, **kwargs)
            if y.requires_grad or not y.is_contiguous() or y.dtype != down0.dtype:
                return _posts(slot.chain, x, y)
            x2 = x.reshape(-1, x.shape[-1])
            y2 = y.view(-1, y.shape[-1])
            for down, parts in plan:
                h = x2 @ down
                for lo, hi, up, alpha, start, length in parts:
                    hh = h if lo is None else h[:, lo:hi]
                    if start is None:
                        y2.addmm_(hh, up, alpha=alpha)
                    else:
                        y2[:, start:start + length].addmm_(hh, up, alpha=alpha)
            return y
        if use_direct:
            return run_chain(slot.chain, slot.chain_pre, x, direct)
        return run_chain(slot.chain, slot.chain_pre, x, lambda xi: base(xi, *args, **kwargs))
    return forward
