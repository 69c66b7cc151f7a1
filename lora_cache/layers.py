"""A layer's slot and the forward that applies its active forms without touching its weight.

Each targeted module gets a `LayerSlot` (PEFT's per-adapter state on a layer): the chain of
forms active for the sampling now running and what runs it. A forward
of our own is installed on the module only while something is active, so a layer with no
active adapter runs ComfyUI's forward with no wrapper in the call path.

A layer's forms are `LayerFactors` (low-rank, low_rank.py) or the forms of forms.py (LoKr,
dense, DoRA, OFT, BOFT, GLoRA). The forward multiplies by a merged copy of the layer's weight
where copy_choice.py chose one. Otherwise, when every active form is a low-rank Linear one, it
computes an output update or a weight update (weight_update.py), chosen per call by which
moves less memory; the weight update reads ComfyUI's weight: the layer's own where the
weight is resident and not cast, else the one ComfyUI casts or streams for this call, through
ComfyUI's per-call weight functions (the mechanism of its own lowvram patches).

Otherwise the forward runs `chain`: each active form bound to its strength as an `Op`, in the
order ComfyUI's chain of loaders would apply them, so forms that depend on the weight before
them (DoRA, OFT, BOFT, GLoRA) see exactly that weight.

A layer that ComfyUI computes without calling its forward (`probe` finds it) is served through
ComfyUI's cast instead (`serve_through_cast`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple, cast, overload

import torch
import torch.nn.functional as F
from torch.nn.modules.conv import _ConvNd

from . import weight_update
from .form_base import Chain, LayerForm, Op, to_input

if TYPE_CHECKING:
    from .copies import MergedCopy

SLOT_ATTR = "lora_cache_slot"


class LayerSlot:
    __slots__ = ("active", "installed", "prev_forward", "plan", "chain", "chain_pre", "weight_plan",
                 "weight_fn", "in_weight", "copy", "merged", "rows", "probed", "cast", "bypassed", "post")

    def __init__(self) -> None:
        self.active: Chain = ()
        self.installed: Callable | None = None
        self.prev_forward: Callable | None = None
        # What the direct forward computes (the output update), built on activate.
        # None when some active form is not a low-rank Linear one.
        self.plan: weight_update.Plan | None = None
        # The same updates as additions to the weight (the weight update), and the weight
        # function that carries it in ComfyUI's cast (_CastUpdate.update); None where `plan` is.
        # in_weight: the last call's update went into the weight.
        self.weight_plan: weight_update.WeightPlan | None = None
        self.weight_fn: Callable | None = None
        self.in_weight = False
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
        slot.plan = weight_update.plan_of(slot.active)
        weight = getattr(module, "weight", None)
        wp = slot.weight_plan = (weight_update.as_weight_plan(slot.plan, weight)
                                 if slot.plan is not None and isinstance(weight, torch.Tensor) else None)
        slot.weight_fn = None if wp is None else _CastUpdate(module, slot, wp).update
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


@dataclass(slots=True)
class _Probe:
    serve: Callable  # the forward that serves the layer once the probe ends
    forward: bool = False
    cast: bool = False
    depth: int = 0  # inside the layer's forward: a cast there is the forward's own

    # Bound methods rather than closures: fewer objects per layer for the garbage collector.
    def noting(self, *args, **kwargs):
        """In front of the installed forward: notes the call."""
        self.forward = True
        self.depth += 1
        try:
            return self.serve(*args, **kwargs)
        finally:
            self.depth -= 1

    def noting_cast(self, weight: torch.Tensor) -> torch.Tensor:
        """After the layer's own weight functions: notes a cast outside the forward."""
        if not self.depth:
            self.cast = True
        return weight


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
    noting = state.noting  # one bound method, kept: the installed forward is compared by identity
    slot.installed = noting
    module.__dict__["forward"] = noting
    if hasattr(module, "weight_function"):
        _put_weight_function(module, slot, state.noting_cast)


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


def _append_weight_function(module: torch.nn.Module, fn: Callable) -> tuple[list, list | None]:
    """Puts a new list on the module: its weight functions, then `fn` (the class's shared list is
    never written). Returns that list and the module's own list it replaced (None: the class's)."""
    d = module.__dict__
    prev = d.get("weight_function")
    current = prev if prev is not None else cast(list, module.weight_function)
    ours = d["weight_function"] = [*current, fn]
    return ours, prev


def _restore_weight_function(module: torch.nn.Module, ours: list, prev: list | None) -> None:
    d = module.__dict__
    # A load of the model since (ComfyUI sets each layer's list at load) already dropped ours.
    if d.get("weight_function") is ours:
        if prev is None:
            del d["weight_function"]
        else:
            d["weight_function"] = prev


def _put_weight_function(module: torch.nn.Module, slot: LayerSlot, fn: Callable) -> None:
    slot.cast = _append_weight_function(module, fn)


def handing_over(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A weight function that hands over `weight` (a merged copy) in place of the one cast."""
    return lambda cast_weight: to_input(weight, cast_weight)


def _leave_cast(module: torch.nn.Module, slot: LayerSlot) -> None:
    if slot.cast is None:
        return
    ours, prev = slot.cast
    slot.cast = None
    _restore_weight_function(module, ours, prev)


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


def casts_per_call(module: torch.nn.Module) -> bool:
    """Whether ComfyUI's forward casts the layer's weight on every call (dynamic VRAM, lowvram, a
    compute dtype other than the stored one, weight functions): fixed for a sampling once
    ComfyUI loaded the model."""
    return bool(getattr(module, "comfy_cast_weights", False) or getattr(module, "weight_function", None)
                or getattr(module, "bias_function", None))


def _own_copy(module: torch.nn.Module, weight: torch.Tensor) -> bool:
    """Whether the weight ComfyUI's cast hands its weight functions is its copy for this one call,
    which the update may go into in place: under dynamic VRAM (the layer has comfy-aimdo's `_v`)
    a weight streamed through the cast buffer (comfy-aimdo gave it no place of its own: no
    signature), never the resident one it hands over as it is and keeps; on ComfyUI's other casts
    always (it copies the weight for weight functions, or moves it to the device for this call).
    Never the layer's own parameter, whatever the cast."""
    own = module.weight
    if (isinstance(own, torch.Tensor) and own.device == weight.device
            and own.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()):
        return False
    if getattr(module, "_v", None) is None:
        return True
    return getattr(module, "_v_signature", False) is None and weight is not getattr(module, "_v_weight", None)


class _CastUpdate:
    """The weight function that carries the layer's weight update in ComfyUI's cast for a
    sampling (`update`, kept as `slot.weight_fn`): in place where ComfyUI hands over its own copy
    and no weight function of another party's comes before it (one may hand on a tensor it
    keeps), into a new tensor where the weight stays; each only where it moves less memory than
    the output update for the call's input (`slot.rows` rows), else the weight as it is (then the
    forward adds the output update). Sets `slot.in_weight` where the update went in."""

    __slots__ = ("module", "slot", "wp", "in_f")

    def __init__(self, module: torch.nn.Module, slot: LayerSlot, wp: weight_update.WeightPlan) -> None:
        self.module, self.slot, self.wp = module, slot, wp
        self.in_f = wp.steps[0].down_t.shape[1]

    def update(self, w: torch.Tensor) -> torch.Tensor:
        slot, wp, module = self.slot, self.wp, self.module
        numel = cast(int, slot.rows) * self.in_f
        fns = cast(list, module.weight_function)
        # the slot holds the one bound method handed to ComfyUI (each attribute access makes a
        # new one)
        if fns and fns[0] is slot.weight_fn and _own_copy(module, w):
            if numel >= wp.in_place_numel:
                slot.in_weight = True
                return weight_update.add_in_place(w, wp)
        elif numel >= wp.merge_numel:
            slot.in_weight = True
            return weight_update.merged_weight(w, wp)
        return w


def _through_weight_function(module: torch.nn.Module, fn: Callable, base: Callable, x: torch.Tensor,
                             *args, **kwargs) -> torch.Tensor:
    """ComfyUI's forward with `fn` after the layer's own weight functions for this one call: its
    cast hands the weight it casts or streams to them in the compute dtype and uses what they
    return (stock loaders' lowvram patches come first, as in the chain of loaders)."""
    ours, prev = _append_weight_function(module, fn)
    try:
        return base(x, *args, **kwargs)
    finally:
        _restore_weight_function(module, ours, prev)


def _install(module: torch.nn.Module, slot: LayerSlot) -> None:
    prev = module.__dict__.get("forward")
    base = prev if prev is not None else type(module).forward.__get__(module)
    copy = slot.merged
    if copy is None:
        forward = _Unmerged(module, slot, base, _stock_forward(module), casts_per_call(module)).forward
    else:
        forward = _OnCopy(module, copy, base).forward
    if slot.post is not None:
        forward = _then(forward, slot.post)
    slot.prev_forward = prev
    slot.installed = forward
    module.__dict__["forward"] = forward


class _OnCopy:
    """A layer's forward on its merged copy: the layer's own product on the copy, nothing else
    per call. An object with slots, installed as its bound method, rather than a closure: a
    sampling keeps one for every adapted layer, and each closure cell would be one more object
    that survives into the collector's oldest generation (a bound method calls as fast)."""

    __slots__ = ("module", "weight", "bias", "run", "base", "every_op")

    def __init__(self, module: torch.nn.Module, copy: MergedCopy, base: Callable) -> None:
        self.module, self.weight, self.bias, self.base = module, copy.weight, copy.bias, base
        self.run = F.linear if isinstance(module, torch.nn.Linear) else cast(_ConvNd, module)._conv_forward
        self.every_op = _EVERY_OP

    def forward(self, x, *args, **kwargs):
        w, b = self.weight, self.bias
        if args or kwargs:
            # arguments only ComfyUI's forward knows: its forward, handed the copy as weight
            return _through_weight_function(self.module, handing_over(w), self.base, x, *args, **kwargs)
        self.every_op()
        if x.dtype != w.dtype or x.device != w.device:
            return self.run(x, to_input(w, x), None if b is None else to_input(b, x))
        return self.run(x, w, b)


def _then(forward: Callable, post: Callable) -> Callable:
    def with_post(x, *args, **kwargs):
        return post(x, forward(x, *args, **kwargs))
    return with_post


class _Unmerged:
    """A layer's forward with its chain unmerged (`forward`, installed as the bound method; an
    object with slots rather than closures for the same reason as `_OnCopy`): the output update
    or the weight update for a chain of low-rank Linear factors (`slot.plan`), each form's Op in
    chain order for any other chain."""

    __slots__ = ("module", "slot", "base", "every_op", "direct_ok", "through_fn", "fn_numel_factor")

    def __init__(self, module: torch.nn.Module, slot: LayerSlot, base: Callable, stock: bool, casts: bool) -> None:
        self.module, self.slot, self.base, self.every_op = module, slot, base, _EVERY_OP
        # The direct path: ComfyUI's Linear forward would only check the cast settings and call
        # F.linear; with the check done here, the base product and the updates run without
        # ComfyUI's Python frames. Where the layer casts its weight per call, ComfyUI's own forward
        # computes the base product.
        self.direct_ok = stock and isinstance(module, torch.nn.Linear) and not casts
        # The weight update goes through ComfyUI's weight functions only where its cast is the
        # stock one: other ops classes (scaled fp8, fp8 matmul) hand them a weight in another scale
        # or dtype, or skip their fast path when any is set. comfy-aimdo hands its resident weight
        # to them as it is; ComfyUI's other casts copy it first.
        self.through_fn = casts and copyable(module)
        # ComfyUI's stock cast copies a weight on the device for weight functions (none under
        # dynamic VRAM: newer ComfyUI gives every layer `_v`, None unless comfy-aimdo manages it):
        # with ours there only for the update, that copy is part of its cost.
        self.fn_numel_factor = 1 if getattr(module, "_v", None) is not None else 2

    def direct(self, x):
        self.every_op()
        module = self.module
        return F.linear(x, cast(torch.Tensor, module.weight), cast(torch.Tensor | None, module.bias))

    def forward(self, x, *args, **kwargs):
        module, slot, base = self.module, self.slot, self.base
        plan = slot.plan
        plain = not args and not kwargs
        use_direct = self.direct_ok and plain and x.dtype == module.weight.dtype
        if plan is not None:
            down0 = plan[0][0] if plan else None
            if down0 is None or x.dtype != down0.dtype or x.device != down0.device:
                y = self.direct(x) if use_direct else base(x, *args, **kwargs)
                return _posts(slot.chain, x, y)
            n = x.numel()
            slot.rows = n // x.shape[-1]
            wp = slot.weight_plan
            y = None
            if wp is not None and not torch.is_grad_enabled():
                if use_direct and n >= wp.merge_numel:
                    self.every_op()
                    return F.linear(x, weight_update.merged_weight(cast(torch.Tensor, module.weight), wp),
                                    cast(torch.Tensor | None, module.bias))
                if (self.through_fn and plain and module.weight.dtype == x.dtype
                        and n >= wp.in_place_numel * self.fn_numel_factor):
                    # whether the update goes into the weight is known only once the cast hands
                    # it over (streamed or resident); where it does not, the output update follows
                    slot.in_weight = False
                    y = _through_weight_function(module, cast(Callable, slot.weight_fn), base, x)
                    if slot.in_weight:
                        return y
            # Output update: the updates go into the output in place, one `x @ down` per adapter
            # (shared by q/k/v slices) and one addmm_ per factor.
            if y is None:
                y = self.direct(x) if use_direct else base(x, *args, **kwargs)
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
                    else:  # length is set wherever start is (weight_update.FactorPart)
                        y2[:, start:start + length].addmm_(hh, up, alpha=alpha)  # type: ignore[operator]
            return y
        if use_direct:
            return run_chain(slot.chain, slot.chain_pre, x, self.direct)
        return run_chain(slot.chain, slot.chain_pre, x, lambda xi: base(xi, *args, **kwargs))
