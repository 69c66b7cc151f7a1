"""Low-rank factors on a layer, applied in its forward without touching its weight.

Each targeted module gets a `LayerSlot` (PEFT's per-adapter state on a layer): the factors
registered per cached adapter, and the list active for the sampling now running. A forward
of our own is installed on the module only while something is active, so a layer with no
active adapter runs ComfyUI's forward with no wrapper in the call path.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

SLOT_ATTR = "lora_cache_slot"

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


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
    # Set by share_down(): the layer's factors' downs side by side, and this factor's columns.
    shared_down: torch.Tensor | None = field(default=None, repr=False)
    shared_cols: tuple[int, int] | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        ts = [self.down, self.up] + ([self.mid] if self.mid is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)

    @property
    def device(self) -> torch.device:
        return self.down.device

    def _cast(self, x: torch.Tensor):
        # The factors are stored in the model's compute dtype on its load device; an input in
        # another dtype or place (lowvram casts, a text encoder in fp32) gets a transient copy.
        if x.dtype == self.down.dtype and x.device == self.down.device:
            return self.down, self.mid, self.up
        cast = lambda t: None if t is None else t.to(device=x.device, dtype=x.dtype)  # noqa: E731
        return cast(self.down), cast(self.mid), cast(self.up)

    def add_to(self, module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, strength: float) -> torch.Tensor:
        down, mid, up = self._cast(x)
        alpha = strength * self.scale
        if self.kind == "linear":
            h = x.reshape(-1, x.shape[-1]) @ down
            y2 = y.view(-1, y.shape[-1]) if y.is_contiguous() else None
            if y2 is None or (torch.is_grad_enabled() and y.requires_grad):
                delta = (h @ up).mul_(alpha).view(*y.shape[:-1], -1)
                if self.out_slice is None:
                    return y + delta
                start, length = self.out_slice
                y = y.clone()
                y[..., start:start + length] += delta
                return y
            if self.out_slice is None:
                y2.addmm_(h, up, alpha=alpha)
            else:
                start, length = self.out_slice
                y2[:, start:start + length].addmm_(h, up, alpha=alpha)
            return y
        conv = _CONV[x.ndim - 2]
        if mid is None:
            h = conv(x, down, None, module.stride, module.padding, module.dilation)
        else:
            h = conv(conv(x, down), mid, None, module.stride, module.padding, module.dilation)
        delta = conv(h, up)
        if torch.is_grad_enabled() and y.requires_grad:
            return y + alpha * delta
        return y.add_(delta, alpha=alpha)


def _moved(t: torch.Tensor, device: torch.device, pin: bool, copy: bool = False) -> torch.Tensor:
    if device.type != "cpu":
        return t.to(device, non_blocking=True, copy=copy)
    out = t.detach().to(device, copy=True)
    if pin:
        try:
            out = out.pin_memory()  # the copy back to the device is then asynchronous-capable
        except RuntimeError:
            pass
    return out


def move_layer(factors: tuple[LayerFactors, ...], device: torch.device, pin: bool = False,
               copy: bool = False) -> None:
    """Moves one layer's factors to `device` in place: the LayerFactors objects (which the layer's
    slot holds) stay, their tensors change place. A shared down projection moves once and the
    factors' `down`s become views of the moved copy again, so nothing stays behind on the old
    device and nothing is held twice. `copy`: new tensors even where they are already there."""
    shared: dict[int, torch.Tensor] = {}
    for f in factors:
        if f.shared_down is not None:
            key = id(f.shared_down)
            if key not in shared:
                shared[key] = _moved(f.shared_down, device, pin, copy)
            f.shared_down = shared[key]
            lo, hi = f.shared_cols
            f.down = f.shared_down[:, lo:hi]
        else:
            f.down = _moved(f.down, device, pin, copy)
        f.up = _moved(f.up, device, pin, copy)
        if f.mid is not None:
            f.mid = _moved(f.mid, device, pin, copy)


def copy_layer(factors: tuple[LayerFactors, ...], device: torch.device) -> tuple[LayerFactors, ...]:
    """A layer's factors copied to `device` as new objects owning their own tensors."""
    copies = tuple(dataclasses.replace(f) for f in factors)
    move_layer(copies, device, copy=True)
    return copies


def share_down(factors: tuple[LayerFactors, ...]) -> torch.Tensor | None:
    """One down projection for all Linear factors of a layer (Flux's q/k/v slices of a fused
    qkv weight, or q/k/v/mlp of linear1): their downs side by side in one [in, R] matrix, each
    factor's `down` becoming a view of its columns. One GEMM then computes every factor's
    `x @ down`, and the memory is the same as before. Idempotent."""
    if len(factors) < 2 or any(f.kind != "linear" for f in factors):
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


class LayerSlot:
    __slots__ = ("adapters", "active", "installed", "prev_forward", "plan")

    def __init__(self):
        self.adapters: dict[object, tuple[LayerFactors, ...]] = {}
        self.active: list[tuple[tuple[LayerFactors, ...], float]] = []
        self.installed: Callable | None = None
        self.prev_forward: Callable | None = None
        # What the direct forward computes, rebuilt on activate: per active adapter
        # (down [in, R], ((col_lo, col_hi, up, alpha, out_start, out_len), ...)).
        self.plan: tuple | None = None


def slot_of(module: torch.nn.Module, create: bool = False) -> LayerSlot | None:
    slot = module.__dict__.get(SLOT_ATTR)
    if slot is None and create:
        slot = LayerSlot()
        # A plain attribute (not a Parameter or submodule) keeps ComfyUI's load list and
        # state_dict unchanged.
        module.__dict__[SLOT_ATTR] = slot
    return slot


def register(module: torch.nn.Module, key: object, factors: tuple[LayerFactors, ...]) -> None:
    slot_of(module, create=True).adapters[key] = factors


def unregister(module: torch.nn.Module, key: object) -> None:
    slot = slot_of(module)
    if slot is not None:
        slot.adapters.pop(key, None)


def holds(module: torch.nn.Module, key: object, factors: tuple[LayerFactors, ...]) -> bool:
    slot = slot_of(module)
    return slot is not None and slot.adapters.get(key) is factors


def activate(module: torch.nn.Module, factors: tuple[LayerFactors, ...], strength: float) -> None:
    slot = slot_of(module, create=True)
    slot.active.append((factors, strength))
    slot.plan = _plan(slot.active)
    if slot.installed is None:
        _install(module, slot)


def deactivate(module: torch.nn.Module) -> None:
    slot = slot_of(module)
    if slot is None:
        return
    slot.active.clear()
    slot.plan = None
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


def _plan(active) -> tuple | None:
    """The direct forward's work for the active adapters, or None if some factor is not a
    Linear one (then the generic path serves the layer)."""
    plan = []
    for factors, strength in active:
        if any(f.kind != "linear" for f in factors):
            return None
        shared = share_down(factors)
        if shared is None:
            for f in factors:
                plan.append((f.down, ((None, None, f.up, strength * f.scale) + (f.out_slice or (None, None)),)))
        else:
            parts = tuple(f.shared_cols + (f.up, strength * f.scale) + (f.out_slice or (None, None))
                          for f in factors)
            plan.append((shared, parts))
    return tuple(plan)


def _direct_capable(module: torch.nn.Module, prev) -> bool:
    # The direct forward computes the base product itself with F.linear. Only for layers whose
    # forward is ComfyUI's (or torch's) plain Linear forward and nothing of another party's.
    if prev is not None or not isinstance(module, torch.nn.Linear):
        return False
    fwd = type(module).forward
    return fwd is torch.nn.Linear.forward or fwd in _comfy_linear_forwards()


_COMFY_FORWARDS: tuple | None = None


def _no_op() -> None:
    return None


_EVERY_OP: Callable = _no_op


def _comfy_linear_forwards() -> tuple:
    global _COMFY_FORWARDS, _EVERY_OP
    if _COMFY_FORWARDS is None:
        try:
            import comfy.ops
            _COMFY_FORWARDS = (comfy.ops.disable_weight_init.Linear.forward,)
            # ComfyUI's Linear forward checks for an interrupt on every call; so does ours.
            _EVERY_OP = getattr(comfy.ops, "run_every_op", _no_op)
        except Exception:  # outside ComfyUI (a bare torch module in a test)
            _COMFY_FORWARDS = ()
    return _COMFY_FORWARDS


def _install(module: torch.nn.Module, slot: LayerSlot) -> None:
    prev = module.__dict__.get("forward")
    base = prev if prev is not None else type(module).forward.__get__(module)
    direct = _direct_capable(module, prev)
    linear = F.linear
    every_op = _EVERY_OP

    def generic(x, y):
        for factors, strength in slot.active:
            for f in factors:
                y = f.add_to(module, x, y, strength)
        return y

    def forward(x, *args, **kwargs):
        plan = slot.plan
        # Direct path: ComfyUI's Linear forward would only check the cast settings (fixed once
        # the model is loaded for sampling) and call F.linear; with the check done here, the
        # base product and the low-rank updates run without ComfyUI's Python frames. The
        # updates go into the output in place: one `x @ down` per adapter (shared by q/k/v
        # slices) and one addmm_ per factor.
        if (direct and plan is not None and not args and not kwargs
                and not (getattr(module, "comfy_cast_weights", False) or getattr(module, "weight_function", None)
                         or getattr(module, "bias_function", None))
                and x.dtype == module.weight.dtype):
            every_op()
            y = linear(x, module.weight, module.bias)
            if y.requires_grad or not plan or x.dtype != plan[0][0].dtype or x.device != plan[0][0].device:
                return generic(x, y)
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
        return generic(x, base(x, *args, **kwargs))

    slot.prev_forward = prev
    slot.installed = forward
    module.__dict__["forward"] = forward
