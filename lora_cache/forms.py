"""Cached forms of the adapter types beyond plain low-rank LoRA, applied in a layer's forward.

Each form computes what ComfyUI's merge of the same adapter computes (its `calculate_weight`,
in fp32), up to floating-point rounding: no approximation. The update is applied to the
layer's output (or input) instead of its weight, so the weight is never touched.

Additive forms (their update does not depend on the weight; strength is a runtime scalar):
  KronFactors  LoKr: scale * kron(w1, w2), applied as two small products on the regrouped input
               (or the layer's rows of it, for a fused q/k/v adapter on separate q, k, v layers)
  DenseDelta   an update with no cheaper exact structure (LoHa with Tucker cores, LoKr whose
               factors do not line up with the layer): y += s * x @ dW^T, dW built once by the
               adapter's own calculate_weight
Forms whose update depends on the weight before them on the layer (`order_sensitive`):
  InputLowRank GLoRA's W @ A: the layer (and every form before it) sees x + s * x @ A^T
  DoRA         LoRA / LoHa / LoKr with a magnitude: an output- (or input-) channel scale and the
               scaled low-rank update, from the norms of the weight before it (cached per weight)
  BlockRotation OFT: the output's channel blocks rotated, y += s^2 * (R - I) (y - b)
  Butterfly    BOFT: the output's channels through the butterfly stages (rebuilt per strength)
  StockDelta   anything else that depends on the weight (DoRA on OFT/BOFT/GLoRA, a transformed
               or partial target): the adapter's own calculate_weight on the weight before it,
               kept as a dense update per (weight, strength) on the device

Every form counts its tensors in `nbytes`, reports `device`, moves with `move` (low_rank.move_layer),
can be merged into a weight (`merge_into`, merged mode and the weight before a later form), and
`bind`s to a strength as a form_base.Op for one activation.
"""
from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .form_base import CONV, LayerForm, Op, Place, to_input, weight_of
from .low_rank import LayerFactors

_STATES = 4  # derived states kept per form (weights and prefixes seen recently)


def _is_linear(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Linear)


def _channel_dim(module: torch.nn.Module) -> int:
    return -1 if _is_linear(module) else 1


def _per_channel(v: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """A vector over channels, shaped to broadcast over the layer's input or output."""
    if _is_linear(module):
        return v
    return v.view(-1, *([1] * (weight_of(module).ndim - 2)))


def _writable(y: torch.Tensor) -> torch.Tensor:
    # Forms update the output in place; where autograd records it or it is not contiguous,
    # they work on a copy (never in ComfyUI's sampling, which runs without grad).
    if (torch.is_grad_enabled() and y.requires_grad) or not y.is_contiguous():
        return y.clone(memory_format=torch.contiguous_format)
    return y


def _sliced(y: torch.Tensor, module: torch.nn.Module, out_slice) -> torch.Tensor:
    return y if out_slice is None else y.narrow(_channel_dim(module), out_slice[0], out_slice[1])


def _conv_args(module: torch.nn.Module) -> tuple:
    return module.stride, module.padding, module.dilation


def _bias(module: torch.nn.Module, out_slice, dtype, device) -> torch.Tensor | None:
    b = getattr(module, "bias", None)
    if b is None:
        return None
    b = b.detach()
    if out_slice is not None:
        b = b.narrow(0, *out_slice)
    return b.to(device=device, dtype=dtype)


def layer_weight(module: torch.nn.Module, device) -> torch.Tensor:
    """The layer's current weight as an fp32 copy on `device`, as ComfyUI reads it for a merge
    (model_patcher.get_key_weight: a layer with `convert_weight` gets it applied)."""
    w = weight_of(module).detach().to(device=device, dtype=torch.float32, copy=True)
    convert = getattr(module, "convert_weight", None)
    return convert(w, inplace=True) if convert is not None else w


def weight_before(module: torch.nn.Module, prefix, device) -> torch.Tensor:
    """The layer's weight as ComfyUI's merge would hold it before a form: the current weight
    with the forms before it (`prefix`: (form, strength) in chain order) merged."""
    w = layer_weight(module, device)
    for f, s in prefix:
        f.merge_into(w, s)
    return w


class _States:
    """What a form derives from the weight before it (DoRA's norms, a dense update), kept for
    the last few (weight, prefix, extra) it saw: a re-enable of the same stack on the same
    weights finds it again. The weight is identified by the tensor itself (weak reference) and
    its storage: ComfyUI patches and restores a weight by setting a new Parameter, plus its
    version counter where torch keeps one (not for inference tensors, which ComfyUI's loaders
    make)."""

    def __init__(self, limit: int = _STATES):
        self.items: list[tuple[tuple, tuple, object]] = []
        self.limit = limit

    @staticmethod
    def _key(module, prefix, extra) -> tuple:
        w = module.weight
        version = None if w.is_inference() else w._version
        return (id(w), w.data_ptr(), version, str(w.device), tuple((id(f), s) for f, s in prefix), extra)

    def get(self, module, prefix, extra, make: Callable[[], object]):
        key = self._key(module, prefix, extra)
        for i, (k, refs, value) in enumerate(self.items):
            if (k == key and refs[0]() is module.weight
                    and all(r() is f for r, (f, _) in zip(refs[1:], prefix, strict=True))):
                self.items.append(self.items.pop(i))
                return value
        value = make()
        refs = (weakref.ref(module.weight),) + tuple(weakref.ref(f) for f, _ in prefix)
        self.items.append((key, refs, value))
        del self.items[:-self.limit]
        return value

    def clear(self) -> None:
        self.items.clear()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, _, v in self.items for t in _tensors_in(v))


def _tensors_in(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors_in(v)]
    return []


class Form:
    """What every cached form has (see the module docstring)."""

    kind = "form"
    order_sensitive = False
    mid = None  # only low-rank LoCon factors have a mid kernel
    out_slice: tuple[int, int] | None = None
    _tensor_names: tuple[str, ...] = ()

    def tensors(self) -> list[torch.Tensor]:
        return [t for n in self._tensor_names for t in _tensors_in(getattr(self, n))]

    @property
    def nbytes(self) -> int:
        states = self.__dict__.get("states")
        return (sum(t.numel() * t.element_size() for t in self.tensors())
                + (states.nbytes if states is not None else 0))

    @property
    def device(self) -> torch.device:
        return self.tensors()[0].device

    def move(self, place: Place) -> None:
        for n in self._tensor_names:
            v = getattr(self, n)
            if isinstance(v, torch.Tensor):
                setattr(self, n, place(v))
            elif v is not None:  # a form inside this one (DoRA's core)
                v.move(place)
        states = self.__dict__.get("states")
        if states is not None:
            states.clear()  # derived again from the weight at the next activation

    def target(self, weight: torch.Tensor) -> torch.Tensor:
        return weight if self.out_slice is None else weight.narrow(0, *self.out_slice)


# -- additive forms --------------------------------------------------------------------------


class AdditiveCore(LayerForm, Protocol):
    """An additive form (LayerFactors, KronFactors, DenseDelta): what DoRA reads of its core."""

    scale: float

    def dense(self) -> torch.Tensor: ...

    def delta_fn(self, module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]: ...


@dataclass(eq=False)
class KronFactors(Form):
    """LoKr: update = scale * kron(w1, w2), w1 [a, b], w2 [c, d, *k]; the layer's input channels
    are b groups of d. Linear: `w2` is stored as w2^T [d, c] for the matmul. `rows` (first,
    count): the layer takes only those output rows of the product, where it is one of the q/k/v
    of a fused adapter (w1 is then already cut to the row blocks they fall in)."""

    w1: torch.Tensor
    w2: torch.Tensor
    scale: float
    out_slice: tuple[int, int] | None = None
    rows: tuple[int, int] | None = None
    kind = "kron"
    _tensor_names = ("w1", "w2")

    def delta_fn(self, module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """x -> kron(w1, w2) applied to x (its `rows`), without the scale, its tensors bound now."""
        w1_, w2_ = self.w1, self.w2
        a, b = w1_.shape
        rows = self.rows
        if _is_linear(module):
            d = w2_.shape[0]

            def delta(x):
                w1, w2 = to_input(w1_, x), to_input(w2_, x)
                h = torch.matmul(x.reshape(-1, b, d), w2)  # [N, b, c]: w2 on each group of inputs
                out = torch.matmul(w1, h).view(*x.shape[:-1], -1)  # [N, a, c]: w1 across groups
                return out if rows is None else out.narrow(-1, *rows)
            return delta
        stride, padding, dilation = _conv_args(module)

        def delta_conv(x):
            n = x.shape[0]
            h = CONV[x.ndim - 2](x.reshape(n * b, -1, *x.shape[2:]), to_input(w2_, x), None, stride, padding, dilation)
            out = torch.matmul(to_input(w1_, x), h.reshape(n, b, -1)).view(n, -1, *h.shape[2:])  # [n, a * c, ...]
            return out if rows is None else out.narrow(1, *rows)
        return delta_conv

    def bind(self, module, strength, prefix) -> Op:
        alpha = float(strength) * self.scale
        sl = self.out_slice
        delta = self.delta_fn(module)

        def post(x, y):
            y = _writable(y)
            _sliced(y, module, sl).add_(delta(x), alpha=alpha)
            return y
        return Op(None, post)

    def dense(self) -> torch.Tensor:
        w1 = self.w1.float()
        w2 = self.w2.float().t() if self.w2.ndim == 2 else self.w2.float()
        for _ in range(w2.ndim - w1.ndim):
            w1 = w1.unsqueeze(-1)
        d = torch.kron(w1.contiguous(), w2.contiguous())  # torch.kron needs contiguous inputs
        return d if self.rows is None else d.narrow(0, *self.rows)

    def merge_into(self, weight, strength) -> None:
        t = self.target(weight)
        t.add_(self.dense().reshape(t.shape), alpha=float(strength) * self.scale)


@dataclass(eq=False)
class DenseDelta(Form):
    """An update as a whole weight, built once: Linear `delta` is dW^T [in, out] (for addmm_),
    conv `delta` is dW [out, in, *k]."""

    delta_w: torch.Tensor
    scale: float
    out_slice: tuple[int, int] | None = None
    kind = "dense"
    _tensor_names = ("delta_w",)

    def delta_fn(self, module) -> Callable[[torch.Tensor], torch.Tensor]:
        dw = self.delta_w
        if _is_linear(module):
            return lambda x: (x.reshape(-1, x.shape[-1]) @ to_input(dw, x)).view(*x.shape[:-1], -1)
        stride, padding, dilation = _conv_args(module)
        return lambda x: CONV[x.ndim - 2](x, to_input(dw, x), None, stride, padding, dilation)

    def bind(self, module, strength, prefix) -> Op:
        alpha = float(strength) * self.scale
        sl = self.out_slice
        dw = self.delta_w
        if _is_linear(module):
            def post(x, y):
                y = _writable(y)
                y2 = y.view(-1, y.shape[-1])
                if sl is not None:
                    y2 = y2[:, sl[0]:sl[0] + sl[1]]
                y2.addmm_(x.reshape(-1, x.shape[-1]), to_input(dw, x), alpha=alpha)
                return y
            return Op(None, post)
        delta = self.delta_fn(module)
        return Op(None, lambda x, y: _writable(y).add_(delta(x), alpha=alpha))

    def dense(self) -> torch.Tensor:
        d = self.delta_w.float()
        return d.t() if d.ndim == 2 else d

    def merge_into(self, weight, strength) -> None:
        t = self.target(weight)
        t.add_(self.dense().reshape(t.shape), alpha=float(strength) * self.scale)


# -- forms that depend on the weight before them -------------------------------------------------


@dataclass(eq=False)
class InputLowRank(Form):
    """GLoRA's weight-dependent part, W' = W + scale * W @ (u @ d) with u [in, r], d [r, in]:
    the same as the layer seeing x + scale * (u @ d) x. Linear: stored as d^T [in, r] and
    u^T [r, in]; conv: as 1x1 kernels d [r, in, 1..] and u [in, r, 1..] over the channels."""

    d: torch.Tensor
    u: torch.Tensor
    scale: float
    kind = "input low-rank"
    order_sensitive = True
    _tensor_names = ("d", "u")

    def bind(self, module, strength, prefix) -> Op:
        alpha = float(strength) * self.scale
        d_, u_ = self.d, self.u
        if _is_linear(module):
            def pre(x):
                x2 = x.reshape(-1, x.shape[-1])
                return torch.addmm(x2, x2 @ to_input(d_, x), to_input(u_, x), alpha=alpha).view(x.shape)
        else:
            def pre(x):
                conv = CONV[x.ndim - 2]
                return torch.add(x, conv(conv(x, to_input(d_, x)), to_input(u_, x)), alpha=alpha)
        return Op(pre, None)

    def ud(self) -> torch.Tensor:
        if self.d.ndim == 2:  # linear: d^T, u^T stored
            return self.u.float().t() @ self.d.float().t()
        return self.u.float().flatten(1) @ self.d.float().flatten(1)

    def merge_into(self, weight, strength) -> None:
        p = self.ud()  # [in, in]
        if weight.ndim == 2:
            weight.add_(weight @ p, alpha=float(strength) * self.scale)
        else:
            weight.add_(torch.einsum("oj...,ji->oi...", weight, p), alpha=float(strength) * self.scale)


@dataclass(eq=False)
class DoRA(Form):
    """An additive core (low-rank or LoKr, its `scale` the adapter's alpha / rank) with ComfyUI's
    weight decomposition: with W the weight before it, V = W + scale * core, and c = magnitude /
    norm (per output channel of W, or per input channel of V), the merge is
    W' = W + s * (V * c - W). Unmerged, per output channel: y' = b + (1 + s(c - 1)) (y - b)
    + s * scale * c * core(x); per input channel: the layer sees x * (1 + s(c - 1)) and
    s * scale * core(x * c) is added. c is derived from the weight on the device at the first
    activation and kept per (weight, forms before it); a strength change only rescales it."""

    core: AdditiveCore
    magnitude: torch.Tensor
    axis: str  # "out" | "in"
    out_slice: tuple[int, int] | None = None
    states: _States = field(default_factory=_States, repr=False)
    kind = "dora"
    order_sensitive = True
    _tensor_names = ("core", "magnitude")

    def tensors(self) -> list[torch.Tensor]:
        return self.core.tensors() + [self.magnitude]

    def ratio(self, w_before: torch.Tensor) -> torch.Tensor:
        """c = magnitude / (norm + eps), as ComfyUI's weight_decompose computes it (fp32)."""
        w = self.target(w_before)
        m = self.magnitude.to(device=w.device, dtype=torch.float32)
        if self.axis == "out":
            norm = w.reshape(w.shape[0], -1).norm(dim=1, keepdim=True).reshape(w.shape[0], *[1] * (w.dim() - 1))
        else:
            v = w + self.core.scale * self.core.dense().reshape(w.shape)
            norm = (v.transpose(0, 1).reshape(v.shape[1], -1).norm(dim=1, keepdim=True)
                    .reshape(v.shape[1], *[1] * (v.dim() - 1)).transpose(0, 1))
        return m / (norm + torch.finfo(torch.float32).eps)

    def _c(self, module, prefix) -> torch.Tensor:
        dev = self.magnitude.device
        return self.states.get(module, prefix, None,
                               lambda: self.ratio(weight_before(module, prefix, dev)).flatten())

    def bind(self, module, strength, prefix) -> Op:
        s = float(strength)
        c = self._c(module, prefix)
        core, sl = self.core, self.out_slice
        dtype = core.tensors()[0].dtype
        keep = (1 + s * (c - 1)).to(dtype)  # what the weight before keeps, per channel
        gain = s * core.scale * c  # what the core's update gets, per channel (fp32)
        low_rank = core if isinstance(core, LayerFactors) and core.kind == "linear" else None
        if self.axis == "in":
            keep_in = _per_channel(keep, module)
            if low_rank is not None:  # the input scale folds into down: one addmm_ as for plain LoRA
                add = _low_rank_post((low_rank.down.float() * gain[:, None]).to(dtype), low_rank.up, sl, module)
            else:
                delta, gain_in = core.delta_fn(module), _per_channel(gain.to(dtype), module)

                def add(x, y):
                    return _writable(y).add_(delta(x * to_input(gain_in, x)))
            return Op(lambda x: x * to_input(keep_in, x), add)
        # y' = keep * y + (1 - keep) * b + gain * core(x): the bias passes through unchanged
        bias = _bias(module, sl, torch.float32, c.device)
        shift = None if bias is None else _per_channel(((1 - keep.float()) * bias).to(dtype), module)
        keep_out = _per_channel(keep, module)
        if low_rank is not None:  # the output scale folds into up
            add = _low_rank_post(low_rank.down, (low_rank.up.float() * gain[None, :]).to(dtype), sl, module)
        else:
            delta, gain_out = core.delta_fn(module), _per_channel(gain.to(dtype), module)

            def add(x, y):
                _sliced(y, module, sl).addcmul_(delta(x), to_input(gain_out, y))
                return y

        def post(x, y):
            y = _writable(y)
            ys = _sliced(y, module, sl).mul_(to_input(keep_out, y))
            if shift is not None:
                ys.add_(to_input(shift, y))
            return add(x, y)
        return Op(None, post)

    def merge_into(self, weight, strength) -> None:
        w = self.target(weight)
        c = self.ratio(weight)
        v = w + self.core.scale * self.core.dense().reshape(w.shape)
        w.add_(v * c - w, alpha=float(strength))


def _low_rank_post(down: torch.Tensor, up: torch.Tensor, out_slice: tuple[int, int] | None,
                   module: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """What low-rank Linear factors add to the output at unit scale and strength."""
    post = LayerFactors("linear", down, up, 1.0, out_slice=out_slice).bind(module, 1.0, ()).post
    assert post is not None, "a low-rank update adds to the output"
    return post


def _channels_last(y: torch.Tensor, module) -> torch.Tensor:
    return y if _is_linear(module) else y.movedim(1, -1)


def _output_op(module, out_slice, delta_of: Callable, alpha: float, shift: torch.Tensor | None) -> Op:
    """An output transform T applied to the weight before it: y_slice += alpha * (T y_slice -
    y_slice) - shift, where `delta_of(y)` = T y - y over the channels (last dim) and `shift` is
    the bias's part, alpha * (T b - b), so the bias passes through unchanged."""
    def post(x, y):
        y = _writable(y)
        ys = _channels_last(_sliced(y, module, out_slice), module)
        ys.add_(delta_of(ys), alpha=alpha)
        if shift is not None:
            ys.sub_(to_input(shift, y))
        return y
    return Op(None, post)


@dataclass(eq=False)
class BlockRotation(Form):
    """OFT: ComfyUI merges W' = W + s^2 * (R - I) W, R block-diagonal over the output channels
    (`rotation_minus_i` [blocks, n, n] = R - I). Unmerged: y += s^2 * (R - I)(y - b) per block."""

    rotation_minus_i: torch.Tensor
    out_slice: tuple[int, int] | None = None
    kind = "oft"
    order_sensitive = True
    _tensor_names = ("rotation_minus_i",)

    def bind(self, module, strength, prefix) -> Op:
        alpha = float(strength) ** 2
        a = self.rotation_minus_i
        k, n = a.shape[0], a.shape[1]
        sl = self.out_slice
        bias = _bias(module, sl, torch.float32, a.device)
        # (R - I)(y - b) = (R - I) y - (R - I) b: the bias part is a constant vector
        shift = None if bias is None else (alpha * torch.einsum("kn,knm->km", bias.view(k, n), a.float())
                                           ).flatten().to(a.dtype)

        def rotated_minus_y(ys):
            return torch.einsum("...kn,knm->...km", ys.unflatten(-1, (k, n)), to_input(a, ys)).flatten(-2)
        return _output_op(module, sl, rotated_minus_y, alpha, shift)

    def merge_into(self, weight, strength) -> None:
        w = self.target(weight)
        a = self.rotation_minus_i.float()
        d = torch.einsum("knm,kn...->km...", a, w.reshape(a.shape[0], a.shape[1], *w.shape[1:]))
        w.add_(d.reshape(w.shape), alpha=float(strength) ** 2)


@dataclass(eq=False)
class Butterfly(Form):
    """BOFT: ComfyUI merges W' = W + s * (B_s W - W), B_s the butterfly stages over the output
    channels (each stage s * R_i + (1 - s) I) and a per-channel `rescale`. Unmerged:
    y += s * (B_s (y - b) - (y - b)). The stages for a strength are rebuilt (tiny) on bind."""

    rotations: torch.Tensor  # [stages, blocks, b, b]
    rescale: torch.Tensor | None
    out_slice: tuple[int, int] | None = None
    kind = "boft"
    order_sensitive = True
    _tensor_names = ("rotations", "rescale")

    def stages(self, strength: float, dtype) -> torch.Tensor:
        r = self.rotations.float()
        if strength != 1:
            eye = torch.eye(r.shape[-1], device=r.device, dtype=r.dtype)
            r = r * strength + (1 - strength) * eye
        return r.to(dtype)

    @staticmethod
    def apply(stages: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The butterfly over the last dim of z, as ComfyUI's BOFT applies it to the weight's rows."""
        bsz = stages.shape[-1]
        half = bsz // 2
        for i in range(stages.shape[0]):
            k = 2 ** i * half
            z = z.unflatten(-1, (-1, 2, k)).transpose(-2, -1).flatten(-3).unflatten(-1, (-1, bsz))
            z = torch.einsum("bij,...bj->...bi", stages[i], z)
            z = z.flatten(-2).unflatten(-1, (-1, k, 2)).transpose(-2, -1).flatten(-3)
        return z

    def bind(self, module, strength, prefix) -> Op:
        s = float(strength)
        dtype = self.rotations.dtype
        stages = self.stages(s, dtype)
        rescale = None if self.rescale is None else self.rescale.flatten().to(dtype)
        sl = self.out_slice
        apply = self.apply
        bias = _bias(module, sl, torch.float32, stages.device)
        shift = None  # s * (B b - b): the bias part of s * (B (y - b) - (y - b)), a constant vector
        if bias is not None:
            t = apply(self.stages(s, torch.float32), bias)
            if self.rescale is not None:
                t = t * self.rescale.flatten().float()
            shift = (s * (t - bias)).to(dtype)

        def transformed_minus_y(ys):
            t = apply(to_input(stages, ys), ys)
            if rescale is not None:
                t.mul_(to_input(rescale, ys))
            return t.sub_(ys)
        return _output_op(module, sl, transformed_minus_y, s, shift)

    def merge_into(self, weight, strength) -> None:
        w = self.target(weight)
        st = self.stages(float(strength), torch.float32)
        t = self.apply(st, w.movedim(0, -1)).movedim(-1, 0)
        if self.rescale is not None:
            t = t * self.rescale.float().reshape(-1, *[1] * (w.ndim - 1))
        w.add_(t - w, alpha=float(strength))


def with_weights(adapter: Any, weights: tuple) -> Any:
    """A twin of a ComfyUI weight adapter that holds `weights`. A shallow copy, not the class's
    constructor: what else the adapter carries (a LoKr's `row_offset` into a fused q/k/v product,
    its `key`) stays, whichever fields this ComfyUI's adapter classes have."""
    twin = copy.copy(adapter)
    twin.weights = weights
    return twin


@dataclass(eq=False)
class StockDelta(Form):
    """The adapter's own calculate_weight on the weight before it: the exact update of any
    adapter ComfyUI can merge, kept as a dense update per (weight, forms before it, strength)
    on the device. A strength change recomputes it there (one merge of the layer)."""

    adapter: Any  # a comfy.weight_adapter adapter (ComfyUI's, untyped) whose tensors are on the device
    key: str
    offset: tuple | None
    function: Callable | None
    out_slice: tuple[int, int] | None = None
    compute_dtype: torch.dtype = torch.float32
    # one dense update (the size of the layer's weight): a strength change replaces it
    states: _States = field(default_factory=lambda: _States(limit=1), repr=False)
    kind = "stock delta"
    order_sensitive = True

    def tensors(self) -> list[torch.Tensor]:
        return _tensors_in(self.adapter.weights)

    def move(self, place: Place) -> None:
        w = tuple(place(t) if isinstance(t, torch.Tensor) else t for t in self.adapter.weights)
        self.adapter = with_weights(self.adapter, w)
        self.states.clear()

    def calculate(self, w: torch.Tensor, strength: float) -> torch.Tensor:
        """ComfyUI's merge of this adapter into `w` (fp32, the target's rows), as a new tensor."""
        fn = self.function if self.function is not None else (lambda a: a)
        return self.adapter.calculate_weight(w.clone(), self.key, float(strength), 1.0, self.offset, fn,
                                             torch.float32, None)

    def _delta(self, module, prefix, strength) -> torch.Tensor:
        dev = self.device

        def make():
            w = self.target(weight_before(module, prefix, dev))
            d = (self.calculate(w, strength) - w).to(self.compute_dtype)
            return d.t().contiguous() if d.ndim == 2 else d
        return self.states.get(module, prefix, float(strength), make)

    def bind(self, module, strength, prefix) -> Op:
        return DenseDelta(self._delta(module, prefix, strength), 1.0, self.out_slice).bind(module, 1.0, ())

    def merge_into(self, weight, strength) -> None:
        w = self.target(weight)
        w.copy_(self.calculate(w, strength))
