"""The cached form each of ComfyUI's weight adapters takes on its layer.

One builder per `comfy.weight_adapter` class (LoRA, LoHa, LoKr, GLoRA, OFT, BOFT), each reading
the adapter's `weights` tuple in the layout that class defines and ComfyUI's `calculate_weight`
reads, and choosing the cheapest exact form (forms.py, low_rank.LayerFactors):

  lora   low-rank factors (LoCon: with its mid kernel)                 strength: runtime scalar
  loha   low-rank of rank r1*r2: (A1 B1) * (A2 B2) = (A1 . A2)(B1 . B2)
         (row-wise / column-wise products), or a dense update where that
         rank is not cheaper than the weight, or with Tucker cores      strength: runtime scalar
  lokr   kron factors applied without forming kron(w1, w2) (on one of
         separate q/k/v layers, the layer's rows of a fused product at
         the adapter's row_offset); a dense update where the factors do
         not line up with the layer                                    strength: runtime scalar
  glora  the layer's input through (I + s * A), plus low-rank B        strength: runtime scalar
  oft    block rotation of the output                                  strength: runtime s^2
  boft   butterfly over the output                                     strength: stages rebuilt (tiny)
  dora   (any of lora/loha/lokr with a magnitude) channel scale from
         the weight's norms, cached per weight                         strength: rescales cached norms
  other  the adapter's own calculate_weight on the weight before it, a
         dense update per strength on the device                       strength: recomputed on the device

Shapes that cannot belong to the layer, and malformed factors, raise a LoraCacheError naming the
file, the key and the problem; forms ComfyUI has no merge for raise NoForm (ComfyUI's patch path).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.nn.modules.conv import _ConvNd

from .errors import LoraCacheError
from .form_base import weight_of
from .forms import (
    BlockRotation,
    Butterfly,
    DenseDelta,
    DoRA,
    InputLowRank,
    KronFactors,
    StockDelta,
    layer_weight,
    with_weights,
)
from .low_rank import LayerFactors


class NoForm(Exception):
    """The adapter has no cached form on this layer: it takes ComfyUI's patch path, for `reason`."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class BuildContext:
    lora_name: str
    device: torch.device
    dtype: torch.dtype


class Target(NamedTuple):
    """One patch of the file, resolved onto its layer."""

    key: str  # the layer weight's key, e.g. diffusion_model.x.weight
    module: torch.nn.Module  # Linear or plain convolution
    offset: tuple | None  # ComfyUI's (dim, start, length): a slice of a fused weight
    function: Callable | None  # ComfyUI's patch function (e.g. Flux's swap_scale_shift)
    source: str  # the file's key prefix (for messages)
    adapter: Any  # a comfy.weight_adapter adapter (ComfyUI's, untyped)

    @property
    def out_slice(self) -> tuple[int, int] | None:
        return None if self.offset is None else (self.offset[1], self.offset[2])

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the weight (slice) the adapter patches."""
        w = weight_of(self.module).shape
        return (self.offset[2] if self.offset is not None else w[0], *w[1:])

    @property
    def linear(self) -> bool:
        return isinstance(self.module, torch.nn.Linear)


class Built(NamedTuple):
    forms: tuple
    how: str  # which form, for the build reason ("lokr: kron factors")


def _fail(ctx: BuildContext, t: Target, problem: str) -> LoraCacheError:
    return LoraCacheError(f"LoRA file '{ctx.lora_name}': '{t.source}' ({_name(t.adapter)}) for layer "
                          f"'{t.key}': {problem}")


def _name(adapter) -> str:
    return getattr(adapter, "name", type(adapter).__name__)


def _shape(x) -> str:
    return "x".join(str(d) for d in x) if x else "scalar"


def _weights(ctx: BuildContext, t: Target, n: int) -> tuple:
    w = tuple(t.adapter.weights)
    if len(w) != n:
        raise NoForm(f"this ComfyUI's {_name(t.adapter)} adapter holds {len(w)} weights, not the {n} read here")
    return w


def _put(ctx: BuildContext, x: torch.Tensor) -> torch.Tensor:
    # A file's (transposed) tensor goes to the device as its bytes are and takes its layout there:
    # laid out on the host first, every factor would be written to new host memory and read
    # again for the copy. The device's transient blocks go with the build's gather (memory.py).
    return x.to(ctx.device, ctx.dtype).contiguous()


def _f32(ctx: BuildContext, x: torch.Tensor) -> torch.Tensor:
    return x.to(device=ctx.device, dtype=torch.float32)


def _scale(alpha, rank: int) -> float:
    return (alpha / rank) if alpha is not None else 1.0


def row_linear(function, up: torch.Tensor) -> bool:
    """Whether a patch function (e.g. Flux's swap_scale_shift) may move onto `up`:
    function(up @ R) == function(up) @ R for a random R."""
    probe = torch.randn(up.shape[1], 3, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    u = up.float().cpu().reshape(up.shape[0], -1)
    try:
        return torch.allclose(function(u @ probe), function(u) @ probe, rtol=1e-4, atol=1e-5)
    except Exception:
        return False


def _flat_factors(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Some trainers store Linear factors as 1x1 conv kernels; ComfyUI flattens them.
    if up.ndim > 2 and all(d == 1 for d in up.shape[2:]):
        up = up.flatten(1)
    if down.ndim > 2 and all(d == 1 for d in down.shape[2:]):
        down = down.flatten(1)
    return up, down


# -- ComfyUI's own merge of one adapter ----------------------------------------------------------


@contextmanager
def _comfy_errors(adapter, key: str):
    """ComfyUI's calculate_weight logs a failure ("ERROR <type> <key> <exception>") and leaves the
    weight unchanged; this collects those messages so a failure becomes our node error."""
    found: list[str] = []
    prefix = f"ERROR {_name(adapter)} {key}"

    class Catch(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if msg.startswith(prefix):
                found.append(msg[len(prefix):].strip())

    handler = Catch(level=logging.ERROR)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield found
    finally:
        root.removeHandler(handler)


def stock_merge(ctx: BuildContext, t: Target, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """The adapter's own calculate_weight on `weight` (fp32, the target's rows) at `strength`."""
    fn = t.function if t.function is not None else (lambda a: a)
    with _comfy_errors(t.adapter, t.key) as errors:
        out = t.adapter.calculate_weight(weight.clone(), t.key, strength, 1.0, t.offset, fn, torch.float32, None)
    if errors or out is None:
        raise _fail(ctx, t, f"ComfyUI cannot merge it: {errors[0] if errors else 'no weight returned'}")
    return out


def _homogeneous(function, shape) -> bool:
    if function is None:
        return True
    a = torch.randn(shape, generator=torch.Generator().manual_seed(0))  # not ComfyUI's global RNG
    try:
        return torch.allclose(function(2.5 * a), 2.5 * function(a), rtol=1e-5, atol=1e-6)
    except Exception:
        return False


def dense_form(ctx: BuildContext, t: Target) -> DenseDelta:
    """An additive adapter's exact update per unit strength: its calculate_weight on zeros."""
    if not _homogeneous(t.function, t.shape):
        raise NoForm(f"patch function on '{t.key}' is not linear in the strength")
    d = stock_merge(ctx, t, torch.zeros(t.shape, dtype=torch.float32, device=ctx.device))
    return DenseDelta(_put(ctx, d.t() if t.linear else d), 1.0, t.out_slice)


def stock_form(ctx: BuildContext, t: Target) -> StockDelta:
    """The adapter itself, its tensors on the device, merged by its own calculate_weight onto the
    weight before it at each activation. Tried once on the current weight, so a malformed adapter
    fails here."""
    a = t.adapter
    adapter = with_weights(a, tuple(x.to(ctx.device) if isinstance(x, torch.Tensor) else x for x in a.weights))
    t2 = t._replace(adapter=adapter)
    w = layer_weight(t.module, ctx.device)
    stock_merge(ctx, t2, w if t.offset is None else w.narrow(0, t.offset[1], t.offset[2]))
    return StockDelta(adapter, t.key, t.offset, t.function, t.out_slice, ctx.dtype)


# -- LoRA (and LoCon) ------------------------------------------------------------------------------


def low_rank(ctx: BuildContext, t: Target, up, down, scale: float, mid=None) -> LayerFactors:
    """Low-rank factors for the layer; raises on factors that cannot belong to it."""
    lora_name, key, module = ctx.lora_name, t.key, t.module
    rank = down.shape[0]
    if isinstance(module, torch.nn.Linear):
        up, down = _flat_factors(up, down)
        out_dim = t.shape[0]
        if mid is not None or up.ndim != 2 or down.ndim != 2 or up.shape[1] != rank:
            raise LoraCacheError(f"LoRA file '{lora_name}': '{key}' has factors {tuple(up.shape)} x "
                                 f"{tuple(down.shape)}, not a low-rank pair for a Linear layer")
        if up.shape[0] != out_dim or down.shape[1] != module.in_features:
            raise LoraCacheError(
                f"LoRA file '{lora_name}': '{key}' expects a {out_dim}x{module.in_features} weight but "
                f"the factors make {up.shape[0]}x{down.shape[1]} (a LoRA for another model?)")
        if rank > min(out_dim, module.in_features):
            raise LoraCacheError(
                f"LoRA file '{lora_name}': '{key}' has rank {rank}, more than the layer's "
                f"{out_dim}x{module.in_features} weight can use (not a low-rank adapter)")
        if t.function is not None:
            if not row_linear(t.function, up):
                raise NoForm(f"patch function on '{key}' does not commute with the factors")
            up = t.function(up.float())
        return LayerFactors("linear", _put(ctx, down.t()), _put(ctx, up.t()), scale, out_slice=t.out_slice)
    assert isinstance(module, _ConvNd), "a target is a Linear or a plain convolution (adapters.resolve)"
    nd = len(module.kernel_size)
    kernel = tuple(module.kernel_size)
    ok = (up.ndim == nd + 2 and down.ndim == nd + 2 and up.shape[0] == module.out_channels
          and up.shape[1] == rank and tuple(up.shape[2:]) == (1,) * nd and down.shape[1] == module.in_channels)
    if ok and mid is None:
        ok = tuple(down.shape[2:]) == kernel
    elif ok:
        ok = (tuple(down.shape[2:]) == (1,) * nd and mid.ndim == nd + 2
              and tuple(mid.shape[2:]) == kernel and mid.shape[1] == rank)
    if not ok:
        raise LoraCacheError(
            f"LoRA file '{lora_name}': '{key}' factors {tuple(up.shape)} x {tuple(down.shape)} "
            f"do not fit the {type(module).__name__} {module.out_channels}x{module.in_channels}x{kernel}")
    if rank > min(module.out_channels, module.in_channels * math.prod(kernel)):
        raise LoraCacheError(
            f"LoRA file '{lora_name}': '{key}' has rank {rank}, more than the "
            f"{type(module).__name__} {module.out_channels}x{module.in_channels}x{kernel} can use")
    return LayerFactors("conv", _put(ctx, down), _put(ctx, up), scale,
                        mid=None if mid is None else _put(ctx, mid))


def _lora(ctx: BuildContext, t: Target) -> Built:
    # LoRAAdapter.weights: (up, down, alpha, mid, dora_scale, reshape); scale alpha / down's rank
    up, down, alpha, mid, dora_scale, reshape = _weights(ctx, t, 6)
    if reshape is not None:
        raise NoForm("lora with reshape (ComfyUI pads the weight to a new shape)")
    if dora_scale is not None and t.function is not None:
        return Built((stock_form(ctx, t),), "dora on a transformed target: ComfyUI's merge per strength")
    core = low_rank(ctx, t, up, down, _scale(alpha, down.shape[0]), mid)
    if dora_scale is not None:
        return with_dora(ctx, t, core, dora_scale)
    return Built((core,), "lora")


# -- DoRA ---------------------------------------------------------------------------------------


def with_dora(ctx: BuildContext, t: Target, core: LayerFactors | KronFactors | DenseDelta,
              magnitude: torch.Tensor) -> Built:
    """ComfyUI's weight decomposition over an additive core. The magnitude's first dim decides the
    axis as in ComfyUI; shapes whose ratio would not be one value per output row (or per input
    column) keep ComfyUI's own merge (exact, dense)."""
    rows = t.shape[0]
    axis = "out" if magnitude.shape[0] == rows else "in"
    ndim = len(t.shape)
    norm_shape = (rows,) + (1,) * (ndim - 1) if axis == "out" else (1, t.shape[1]) + (1,) * (ndim - 2)
    try:
        fits = torch.broadcast_shapes(tuple(magnitude.shape), norm_shape) == norm_shape
    except RuntimeError:
        fits = False
    if not fits or (axis == "in" and t.offset is not None):
        return Built((stock_form(ctx, t),), f"dora ({'magnitude ' + _shape(magnitude.shape)}): "
                                            "ComfyUI's merge per strength")
    core.out_slice = None  # the DoRA form places the update
    form = DoRA(core, _f32(ctx, magnitude).contiguous(), axis, t.out_slice)
    return Built((form,), f"dora ({'output' if axis == 'out' else 'input'} channels)")


# -- LoHa ---------------------------------------------------------------------------------------


def _loha(ctx: BuildContext, t: Target) -> Built:
    # LoHaAdapter.weights: (w1a, w1b, alpha, w2a, w2b, t1, t2, dora_scale); scale alpha / w1b's rank
    w1a, w1b, alpha, w2a, w2b, t1, t2, dora_scale = _weights(ctx, t, 8)
    if t1 is not None or t2 is not None:  # Tucker cores: the product has no low-rank shortcut
        if dora_scale is not None:
            return Built((stock_form(ctx, t),), "loha (tucker) with dora: ComfyUI's merge per strength")
        return Built((dense_form(ctx, t),), "loha (tucker): dense update")
    rows, k = t.shape[0], math.prod(t.shape[1:])
    mats = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b}
    for name, m in mats.items():
        if m.ndim != 2:
            raise _fail(ctx, t, f"{name} is {_shape(m.shape)}, not a matrix")
    if not (w1a.shape[1] == w1b.shape[0] and w2a.shape[1] == w2b.shape[0]):
        raise _fail(ctx, t, f"hada_w1_a {_shape(w1a.shape)} x hada_w1_b {_shape(w1b.shape)} and hada_w2_a "
                            f"{_shape(w2a.shape)} x hada_w2_b {_shape(w2b.shape)} do not chain")
    if not (w1a.shape[0] == w2a.shape[0] == rows and w1b.shape[1] == w2b.shape[1] == k):
        raise _fail(ctx, t, f"the factors make {w1a.shape[0]}x{w1b.shape[1]} and {w2a.shape[0]}x{w2b.shape[1]} "
                            f"but the layer's weight is {_shape(t.shape)}")
    scale = _scale(alpha, w1b.shape[0])
    r = w1a.shape[1] * w2a.shape[1]
    if t.function is not None:  # e.g. Flux's swap_scale_shift on the final modulation
        if dora_scale is not None:
            return Built((stock_form(ctx, t),), "dora on a transformed target: ComfyUI's merge per strength")
        return Built((dense_form(ctx, t),), "loha on a transformed target: dense update")
    core: DenseDelta | LayerFactors
    if r * (rows + k) >= rows * k:
        # (A1 B1) * (A2 B2) has rank r1*r2; here that is not smaller than the weight
        d = (_f32(ctx, w1a) @ _f32(ctx, w1b)) * (_f32(ctx, w2a) @ _f32(ctx, w2b))
        core = DenseDelta(_put(ctx, d.t() if t.linear else d.reshape(t.shape)), scale, t.out_slice)
        how = "loha: dense update"
    else:
        a1, a2, b1, b2 = (_f32(ctx, m) for m in (w1a, w2a, w1b, w2b))
        up = (a1[:, :, None] * a2[:, None, :]).reshape(rows, r)  # row-wise products
        down = (b1[:, None, :] * b2[None, :, :]).reshape(r, k)  # column-wise products
        if t.linear:
            core = LayerFactors("linear", _put(ctx, down.t()), _put(ctx, up.t()), scale, out_slice=t.out_slice)
        else:
            nd = len(t.shape) - 2
            core = LayerFactors("conv", _put(ctx, down.reshape(r, *t.shape[1:])),
                                _put(ctx, up.reshape(rows, r, *([1] * nd))), scale)
        how = f"loha: low-rank (rank {r})"
    if dora_scale is not None:
        return with_dora(ctx, t, core, dora_scale)
    return Built((core,), how)


# -- LoKr ---------------------------------------------------------------------------------------


def _lokr(ctx: BuildContext, t: Target) -> Built:
    # LoKrAdapter.weights: (w1, w2, alpha, w1_a, w1_b, w2_a, w2_b, t2, dora_scale); as in its
    # calculate_weight, a factor given as a product sets the rank that alpha is divided by
    # (w2's when both are), and without one the scale is 1
    w1, w2, alpha, w1_a, w1_b, w2_a, w2_b, t2, dora_scale = _weights(ctx, t, 9)
    if t2 is not None:  # Tucker core: exactly as ComfyUI merges it (or its error, if it cannot)
        if dora_scale is not None:
            return Built((stock_form(ctx, t),), "lokr (tucker) with dora: ComfyUI's merge per strength")
        return Built((dense_form(ctx, t),), "lokr (tucker): dense update")
    dim = None
    try:
        if w1 is None:
            if w1_a is None or w1_b is None:
                raise _fail(ctx, t, "has neither lokr_w1 nor both lokr_w1_a and lokr_w1_b")
            dim = w1_b.shape[0]
            w1 = _f32(ctx, w1_a) @ _f32(ctx, w1_b)
        if w2 is None:
            if w2_a is None or w2_b is None:
                raise _fail(ctx, t, "has neither lokr_w2 nor both lokr_w2_a and lokr_w2_b")
            dim = w2_b.shape[0]
            w2 = _f32(ctx, w2_a) @ _f32(ctx, w2_b)
    except RuntimeError as e:
        raise _fail(ctx, t, f"its factors do not multiply: {e}") from e
    w1, w2 = _f32(ctx, w1), _f32(ctx, w2)
    scale = (alpha / dim) if alpha is not None and dim is not None else 1.0
    # a fused q/k/v adapter on one of the separate q, k, v layers: ComfyUI's merge narrows the
    # product to the layer's rows from here (ComfyUI versions without the field never set it)
    row_offset = getattr(t.adapter, "row_offset", None)
    problem = (_lokr_size_problem(w1, w2, t) if row_offset is None
               else _fused_lokr_size_problem(w1, w2, t, int(row_offset)))
    if problem is not None:
        raise _fail(ctx, t, problem)
    if (not t.linear and w1.ndim == 2 and w2.ndim == 2 and w1.shape[1] and t.shape[1] % w1.shape[1] == 0
            and w2.shape[1] == t.shape[1] // w1.shape[1] * math.prod(t.shape[2:])):
        # a conv's w2 as one matrix [c, d * kernel]: ComfyUI's kron then reshape is the kron of
        # w1 with that matrix as a kernel [c, d, *kernel], row by row
        w2 = w2.reshape(w2.shape[0], t.shape[1] // w1.shape[1], *t.shape[2:])
    kron_shape = (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1], *w2.shape[2:]) if w1.ndim == 2 else None
    lines_up = kron_shape is not None and kron_shape[1:] == tuple(t.shape[1:]) and (
        row_offset is not None or kron_shape[0] == t.shape[0])
    if lines_up and t.function is None and (w2.ndim == 2) == t.linear:
        if row_offset is not None and dora_scale is not None:
            return Built((stock_form(ctx, t),), "lokr with dora on rows of a fused product: "
                                                "ComfyUI's merge per strength")
        rows = None
        if row_offset is not None:
            w1, rows = _row_blocks(w1, w2.shape[0], row_offset, t.shape[0])
        core = KronFactors(_put(ctx, w1), _put(ctx, w2.t() if t.linear else w2), scale, t.out_slice, rows)
        if dora_scale is not None:
            return with_dora(ctx, t, core, dora_scale)
        return Built((core,), "lokr: kron factors" if row_offset is None else
                     "lokr: kron factors, the layer's rows of a fused product")
    if dora_scale is not None:
        return Built((stock_form(ctx, t),), "lokr with dora (factors not laid out as the layer): "
                                            "ComfyUI's merge per strength")
    return Built((dense_form(ctx, t),), "lokr (factors not laid out as the layer): dense update")


def _lokr_size_problem(w1: torch.Tensor, w2: torch.Tensor, t: Target) -> str | None:
    numel = w1.numel() * w2.numel()
    if numel != math.prod(t.shape):
        return (f"kron(w1 {_shape(w1.shape)}, w2 {_shape(w2.shape)}) has {numel} values but the layer's weight "
                f"is {_shape(t.shape)}")
    return None


def _comfy_kron_shape(w1: torch.Tensor, w2: torch.Tensor) -> tuple[int, ...]:
    """The shape of kron(w1, w2) as ComfyUI's LoKr merge forms it: w1 gets two trailing dims
    against a 4-dim w2, and torch.kron pads the shorter of the two with leading ones."""
    s1 = tuple(w1.shape) + ((1, 1) if w2.ndim == 4 else ())
    s2 = tuple(w2.shape)
    n = max(len(s1), len(s2))
    s1, s2 = (1,) * (n - len(s1)) + s1, (1,) * (n - len(s2)) + s2
    return tuple(x * y for x, y in zip(s1, s2, strict=True))


def _fused_lokr_size_problem(w1: torch.Tensor, w2: torch.Tensor, t: Target, row_offset: int) -> str | None:
    """ComfyUI narrows the product's rows to the layer's from `row_offset`, then shapes them as
    the layer's weight: the rows must be there and each must hold one row of the weight."""
    shape = _comfy_kron_shape(w1, w2)
    rows, per_row = shape[0], math.prod(shape[1:])
    if row_offset < 0 or row_offset + t.shape[0] > rows or per_row != math.prod(t.shape[1:]):
        return (f"kron(w1 {_shape(w1.shape)}, w2 {_shape(w2.shape)}) is {_shape(shape)}; its rows "
                f"{row_offset}..{row_offset + t.shape[0] - 1} (row_offset {row_offset}) do not make the layer's "
                f"weight {_shape(t.shape)}")
    return None


def _row_blocks(w1: torch.Tensor, c: int, first: int, count: int) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """Rows [first, first + count) of kron(w1, w2), w2 with `c` rows, lie in the row blocks of
    w1's rows first // c .. (first + count - 1) // c: w1 cut to those, and where the rows start
    in the cut product (None where they are all of it)."""
    lo, hi = first // c, -(-(first + count) // c)
    skip = first - lo * c
    return w1[lo:hi], (None if skip == 0 and (hi - lo) * c == count else (skip, count))


# -- GLoRA --------------------------------------------------------------------------------------


def _glora(ctx: BuildContext, t: Target) -> Built:
    # GLoRAAdapter.weights: (a1, a2, b1, b2, alpha, dora_scale). Its calculate_weight tells the
    # old LyCORIS layout (W @ a2 @ a1 + b2 @ b1) from the new one (W @ a1 @ a2 + b1 @ b2) by the
    # shapes and the weight's; the same test here.
    a1, a2, b1, b2, alpha, dora_scale = _weights(ctx, t, 6)
    if dora_scale is not None or t.function is not None or t.offset is not None:
        return Built((stock_form(ctx, t),), "glora (with dora, transformed or partial target): "
                                            "ComfyUI's merge per strength")
    shape = t.shape
    old, rank = False, None
    if b2.shape[1] == b1.shape[0] == a1.shape[0] == a2.shape[1]:
        rank, old = a1.shape[0], True
    if (b2.shape[0] == b1.shape[1] == a1.shape[1] == a2.shape[0]
            and not (old and a2.shape[0] == shape[0] and shape[0] == shape[1])):
        rank, old = a2.shape[0], False
    if rank is None:
        raise _fail(ctx, t, f"a1 {_shape(a1.shape)}, a2 {_shape(a2.shape)}, b1 {_shape(b1.shape)}, "
                            f"b2 {_shape(b2.shape)} do not share a rank")
    if old and not t.linear:
        return Built((stock_form(ctx, t),), "glora (old layout) on a convolution: ComfyUI's merge per strength")
    scale = _scale(alpha, rank)
    a1, a2, b1, b2 = (_f32(ctx, m.flatten(start_dim=1)) for m in (a1, a2, b1, b2))
    # W' = W + scale * (W @ u @ d + up @ down)
    u, d, up, down = (a2, a1, b2, b1) if old else (a1, a2, b1, b2)
    cin, k = shape[1], math.prod(shape[1:])
    if u.shape != (cin, rank) or d.shape != (rank, cin):
        raise _fail(ctx, t, f"its weight-side factors make {u.shape[0]}x{d.shape[1]}, not the layer's "
                            f"{cin} input channels")
    if up.shape != (shape[0], rank) or down.shape != (rank, k):
        raise _fail(ctx, t, f"its additive factors make {up.shape[0]}x{down.shape[1]} but the layer's weight "
                            f"is {_shape(shape)}")
    if t.linear:
        forms = (InputLowRank(_put(ctx, d.t()), _put(ctx, u.t()), scale),
                 LayerFactors("linear", _put(ctx, down.t()), _put(ctx, up.t()), scale))
    else:
        ones = [1] * (len(shape) - 2)
        forms = (InputLowRank(_put(ctx, d.reshape(rank, cin, *ones)), _put(ctx, u.reshape(cin, rank, *ones)), scale),
                 LayerFactors("conv", _put(ctx, down.reshape(rank, *shape[1:])),
                              _put(ctx, up.reshape(shape[0], rank, *ones)), scale))
    return Built(forms, "glora: low-rank on the input and the output")


# -- OFT / BOFT ---------------------------------------------------------------------------------


def cayley(ctx: BuildContext, blocks: torch.Tensor, alpha) -> torch.Tensor:
    """R = (I + Q)(I - Q)^-1 from skew Q = blocks - blocks^T, Q scaled to norm alpha where larger,
    as ComfyUI's OFT/BOFT compute it (fp32)."""
    b = _f32(ctx, blocks)
    eye = torch.eye(b.shape[-1], device=b.device, dtype=b.dtype)
    q = b - b.transpose(-1, -2)
    if alpha > 0:
        q_norm = torch.norm(q) + 1e-8
        if q_norm > alpha:
            q = q * alpha / q_norm
    return (eye + q) @ (eye - q).float().inverse()


def _oft(ctx: BuildContext, t: Target) -> Built:
    # OFTAdapter.weights: (blocks [k, n, n], rescale, alpha, dora_scale); its merge ignores rescale
    # and applies the strength twice: W + s * ((s R - s I) W)
    blocks, _rescale, alpha, dora_scale = _weights(ctx, t, 4)
    if dora_scale is not None or t.function is not None:
        return Built((stock_form(ctx, t),), "oft (with dora or transformed target): ComfyUI's merge per strength")
    k, n = blocks.shape[0], blocks.shape[1]
    if blocks.ndim != 3 or blocks.shape[2] != n or k * n != t.shape[0]:
        raise _fail(ctx, t, f"oft_blocks {_shape(blocks.shape)} do not cover the layer's {t.shape[0]} output channels")
    r = cayley(ctx, blocks, alpha if alpha is not None else 0)
    eye = torch.eye(n, device=r.device, dtype=r.dtype)
    return Built((BlockRotation(_put(ctx, r - eye), t.out_slice),), "oft: block rotation of the output")


def _boft(ctx: BuildContext, t: Target) -> Built:
    # BOFTAdapter.weights: (blocks [stages, k, b, b], rescale, alpha, dora_scale)
    blocks, rescale, alpha, dora_scale = _weights(ctx, t, 4)
    if alpha is None:
        raise _fail(ctx, t, "has no alpha, which ComfyUI's BOFT merge needs (it skips the layer with an error)")
    if dora_scale is not None or t.function is not None:
        return Built((stock_form(ctx, t),), "boft (with dora or transformed target): ComfyUI's merge per strength")
    rows = t.shape[0]
    m, k, b = blocks.shape[0], blocks.shape[1], blocks.shape[2]
    # stage i regroups the channels in pairs of 2**i * b / 2: the rows must split that way
    fits = (blocks.ndim == 4 and m >= 1 and blocks.shape[3] == b and b % 2 == 0 and k * b == rows
            and rows % (2 ** max(m - 1, 0) * b) == 0)
    if not fits:
        raise _fail(ctx, t, f"oft_blocks {_shape(blocks.shape)} do not make a butterfly over the layer's "
                            f"{rows} output channels")
    if rescale is not None and not (rescale.numel() == rows and rescale.shape[0] == rows):
        return Built((stock_form(ctx, t),), f"boft (rescale {_shape(rescale.shape)}): ComfyUI's merge per strength")
    r = cayley(ctx, blocks, alpha)
    form = Butterfly(_put(ctx, r), None if rescale is None else _put(ctx, rescale.flatten()), t.out_slice)
    return Built((form,), "boft: butterfly over the output")


BUILDERS: dict[str, Callable[[BuildContext, Target], Built]] = {
    "lora": _lora, "loha": _loha, "lokr": _lokr, "glora": _glora, "oft": _oft, "boft": _boft,
}


# Where the LoRA, LoHa and LoKr layouts read above keep the DoRA scale (and LoRA its reshape):
# with either set, the update depends on the weight it is applied to.
_WEIGHT_READ_AT = {"lora": (4, 5), "loha": (7,), "lokr": (8,)}


def plain_addition(adapter) -> bool:
    """Whether a ComfyUI weight adapter adds an update that does not depend on the weight it is
    applied to: LoRA, LoHa or LoKr without DoRA (or LoRA's reshape)."""
    at = _WEIGHT_READ_AT.get(_name(adapter))
    weights = tuple(getattr(adapter, "weights", ()))
    return at is not None and len(weights) > max(at) and all(weights[i] is None for i in at)


def forms_for(ctx: BuildContext, t: Target) -> Built:
    builder = BUILDERS.get(_name(t.adapter))
    if builder is None:  # a weight adapter this package has no form for: its own merge
        return Built((stock_form(ctx, t),), f"{_name(t.adapter)}: ComfyUI's merge per strength")
    return builder(ctx, t)
