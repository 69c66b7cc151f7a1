"""A sweep: each image of the latent batch gets its own setting (LoRAs and their strengths) in one
batched sampling.

A merged copy holds one strength for the whole batch, so a sweep's adapters always run unmerged:
a swept layer adds, after its own output (bare, a merged copy of its ordinary adapters, or their
unmerged forms),

    y[row] += sum over sweep adapters a of s_a[image(row)] * delta_a(x[row])

where delta_a is the adapter's additive update on the layer. Its forms must be additive (LoRA,
LoCon, LoHa, LoKr, a dense difference): a form that reads the weight before it (DoRA, OFT, BOFT,
GLoRA) would need one weight per image.

Rows to images. ComfyUI's `_calc_cond_batch` runs the model on chunks of conds: each chunk is the
whole latent batch (cropped to the cond's area, never split along the batch), and one model call
concatenates the chunks of the conds it batches, listed in `transformer_options["cond_or_uncond"]`.
Memory limits only change how many chunks a call holds. So a call's input has
len(cond_or_uncond) * N rows and row r is image r % N. The APPLY_MODEL wrapper works that out once
per model call and sets the per-row strengths the layers read; a call whose rows do not fit that
layout, or a layer whose input's first dimension is not the call's rows, is an error, not a guess.
"""
from __future__ import annotations

import functools
import math
import re
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch

from .errors import LoraCacheError
from .form_base import to_input
from .low_rank import LayerFactors

if TYPE_CHECKING:
    from .form_base import LayerForm
    from .store import Entry

# The patcher attachment that carries a Sweep (cloned along by later nodes).
KEY = "lora_cache_sweep"
MAX_IMAGES = 64


@dataclass(frozen=True)
class Setting:
    """One image's setting: the strength of each sweep adapter (in `Sweep.entries` order)."""

    label: str
    strengths: tuple[float, ...]


@dataclass(frozen=True)
class Sweep:
    """What a sweep node carries: its adapters and one setting per image of the latent batch.

    `seen`: ComfyUI's patches per weight key when the sweep was added. A stock loader after the
    sweep must not patch a swept layer with an update that reads the weight before it, which per
    image would hold the sweep (`posts`)."""

    entries: tuple[Entry, ...]
    settings: tuple[Setting, ...]
    seen: dict[str, int] = field(default_factory=dict, compare=False)
    node: str | None = None

    @property
    def size(self) -> int:
        return len(self.settings)

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.settings]

    def strengths(self) -> torch.Tensor:
        """[adapters, images] float32: row a holds adapter a's strength for each image."""
        return torch.tensor([[s.strengths[a] for s in self.settings] for a in range(len(self.entries))],
                            dtype=torch.float32)


def parse_strengths(text: str) -> list[float]:
    """'0, 0.5, 0.8, 1.0' (commas, semicolons or spaces between numbers) -> the strengths."""
    tokens = [t for t in re.split(r"[,;\s]+", text.strip()) if t]
    if not tokens:
        raise LoraCacheError("LoRA Cache Sweep: no strengths given (e.g. '0, 0.5, 0.8, 1.0')")
    out = []
    for t in tokens:
        try:
            v = float(t)
        except ValueError:
            raise LoraCacheError(f"LoRA Cache Sweep: strength '{t}' is not a number (in '{text}')") from None
        if not math.isfinite(v):
            raise LoraCacheError(f"LoRA Cache Sweep: strength '{t}' must be a finite number")
        out.append(v)
    return out


def _num(v: float) -> str:
    return f"{v:g}"


def settings(names: Sequence[str], strengths: Sequence[float]) -> tuple[Setting, ...]:
    """The grid of LoRAs x strengths, LoRA-major: one LoRA -> a strength sweep, one strength ->
    a LoRA comparison. Each image's label names what differs between images."""
    n = len(names) * len(strengths)
    if n > MAX_IMAGES:
        raise LoraCacheError(f"LoRA Cache Sweep: {len(names)} LoRAs x {len(strengths)} strengths = {n} images; "
                             f"at most {MAX_IMAGES} in one batch")
    out = []
    for a, name in enumerate(names):
        stem = name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        for s in strengths:
            label = stem if len(names) > 1 and len(strengths) == 1 else f"{stem} {_num(s)}"
            out.append(Setting(label, tuple(s if b == a else 0.0 for b in range(len(names)))))
    return tuple(out)


def form_problem(forms: tuple[LayerForm, ...]) -> str | None:
    """Why a layer's forms cannot take a per-image strength, or None."""
    for f in forms:
        if f.order_sensitive or not hasattr(f, "delta_fn"):
            return f"its {f.kind} form reads the weight before it, which would need one weight per image"
    return None


# -- per model call ----------------------------------------------------------------------------


class Rows:
    """The per-row strengths of the model call now running, read by every swept layer."""

    def __init__(self, sweep: Sweep, device: torch.device):
        self.sweep = sweep
        self.table = sweep.strengths().to(device)  # [adapters, images]
        self.per_row: torch.Tensor | None = None  # [adapters, rows] for the call now running
        # per adapter: the rows it changes, where it changes at most half of them (None: every row)
        self.active: list[torch.Tensor | None] = []
        # (adapter, scale, dtype, device) -> the strengths times the scale on the adapter's rows,
        # shaped to scale a [rows, tokens, rank] tensor: one lookup per layer call, no launch
        self._scaled: dict[tuple, torch.Tensor] = {}
        # rows of a call -> its per-row strengths and active rows: a sampling has one or two layouts
        self._layouts: dict[int, tuple[torch.Tensor, list[torch.Tensor | None]]] = {}

    def begin(self, rows: int, chunks: int | None) -> None:
        n = self.sweep.size
        if chunks is None:
            if rows != n:
                raise LoraCacheError(
                    f"LoRA Cache Sweep: a model call has {rows} rows and no cond layout (cond_or_uncond), so its "
                    f"rows cannot be mapped to the sweep's {n} images")
        elif rows != chunks * n:
            raise LoraCacheError(
                f"LoRA Cache Sweep: a model call has {rows} rows for {chunks} conds; the sweep's {n} settings "
                f"need {chunks} x {n} (one row per image of the latent batch per cond)")
        layout = self._layouts.get(rows)
        if layout is None:
            # Row r is image r % n: each cond's chunk is the whole latent batch, in order.
            reps = rows // n
            active: list[torch.Tensor | None] = []
            host = self.sweep.strengths()
            for a in range(host.shape[0]):
                nz = (host[a] != 0).nonzero().flatten()
                # Picking the rows an adapter changes copies them in and out; where it changes
                # most of them, its update on every row, times 0 where it is off, moves less.
                active.append(None if 2 * len(nz) > n else
                              torch.cat([nz + k * n for k in range(reps)]).to(self.table.device))
            layout = self._layouts[rows] = (self.table.repeat(1, reps), active)
        self.per_row, self.active = layout

    def end(self) -> None:
        self.per_row = None

    def of(self, x: torch.Tensor) -> torch.Tensor:
        """The per-row strengths of the call now running, or an error where none is."""
        if self.per_row is None:
            raise LoraCacheError("LoRA Cache Sweep: a swept layer ran outside a model call of the sampling, so "
                                 "its rows cannot be mapped to images")
        return self.per_row

    def scaled(self, adapter: int, scale: float, like: torch.Tensor) -> torch.Tensor:
        """Adapter `adapter`'s strength times `scale` for each row it changes, in the dtype and place
        of `like` and shaped [rows, 1, ..., 1] to scale it."""
        per_row = self.of(like)
        key = (per_row.shape[1], adapter, scale, like.dtype, like.device, like.ndim)
        t = self._scaled.get(key)
        if t is None:
            s = per_row[adapter]
            idx = self.active[adapter]
            if idx is not None:
                s = s.index_select(0, idx)
            t = self._scaled[key] = (s * scale).to(device=like.device, dtype=like.dtype).view(
                -1, *([1] * (like.ndim - 1)))
        return t


# base model id -> the Rows of the sweep active on it
_runs: dict[int, Rows] = {}


def start(model: torch.nn.Module, sweep: Sweep, device: torch.device) -> Rows:
    rows = _runs[id(model)] = Rows(sweep, torch.device(device))
    return rows


def stop(model_id: int) -> None:
    _runs.pop(model_id, None)


def apply_model_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                        **kwargs):
    """ComfyUI's APPLY_MODEL wrapper: sets the rows' strengths once per model call."""
    rows = _runs.get(id(executor.class_obj))
    if rows is None:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    layout = (transformer_options or {}).get("cond_or_uncond")
    rows.begin(x.shape[0], None if layout is None else len(layout))
    try:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    finally:
        rows.end()


def check_batch(sweep: Sweep, latent_batch: int) -> None:
    if latent_batch != sweep.size:
        raise LoraCacheError(
            f"LoRA Cache Sweep: the latent batch has {latent_batch} image(s) but the sweep has {sweep.size} settings "
            f"({', '.join(sweep.labels)}); set the latent's batch_size to {sweep.size} (the sweep's batch_size output)")


# -- the layer's update ------------------------------------------------------------------------


@dataclass
class _Adapter:
    index: int  # the adapter's row in Rows.table
    forms: tuple  # its additive forms on the layer
    deltas: tuple[Callable, ...]  # per form: x -> its update, delta_fn(module) bound


def _low_rank_update(f: LayerFactors, channel_cols: Callable) -> Callable:
    """(rows, x, y, scaled) -> y with a Linear's low-rank update added per row in place: the row
    strengths scale the rank-wide `x @ down`, and one addmm_ adds `@ up` into y's columns, so no
    output-sized update is made, scaled and added."""
    down, up = f.down, f.up

    def add(idx: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor, scaled: Callable) -> None:
        xs = x if idx is None else x.index_select(0, idx)
        d, u = to_input(down, xs), to_input(up, xs)
        h = xs.reshape(-1, xs.shape[-1]) @ d
        h3 = h.view(xs.shape[0], -1, h.shape[-1])
        h3.mul_(scaled(h3))
        if idx is None:
            channel_cols(y.view(-1, y.shape[-1])).addmm_(h, u)
        else:
            channel_cols(y).index_add_(0, idx, (h @ u).view(*xs.shape[:-1], -1))
    return add


def layer_post(module: torch.nn.Module, rows: Rows, adapters: list[tuple[int, tuple[LayerForm, ...]]]) -> Callable:
    """(x, y) -> y with every sweep adapter's update of this layer at each row's strength."""
    linear = isinstance(module, torch.nn.Linear)
    channel = -1 if linear else 1
    bound = [_Adapter(a, forms, tuple(f.delta_fn(module) for f in forms)) for a, forms in adapters]  # type: ignore[attr-defined]
    name = weakref.ref(module)

    def cols(f) -> Callable[[torch.Tensor], torch.Tensor]:
        sl = f.out_slice
        return (lambda t: t) if sl is None else (lambda t: t.narrow(channel, sl[0], sl[1]))

    # Per form: its in-place low-rank update (Linear factors), or None (the generic update below).
    low_rank = [[_low_rank_update(f, cols(f)) if linear and isinstance(f, LayerFactors) and f.kind == "linear"
                 else None for f in ad.forms] for ad in bound]
    where = [[cols(f) for f in ad.forms] for ad in bound]

    def post(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        per_row = rows.of(x)
        if x.shape[0] != per_row.shape[1]:
            m = name()
            raise LoraCacheError(
                f"LoRA Cache Sweep: a {type(m).__name__} layer got an input whose first dimension is {x.shape[0]}, "
                f"not the model call's {per_row.shape[1]} rows; its rows cannot be mapped to images")
        if (torch.is_grad_enabled() and y.requires_grad) or not y.is_contiguous():
            y = y.clone(memory_format=torch.contiguous_format)
        for ad, fast, target_of in zip(bound, low_rank, where, strict=True):
            idx = rows.active[ad.index]
            if idx is not None and idx.numel() == 0:
                continue
            xs = x if idx is None or all(fast) else x.index_select(0, idx)
            for f, delta, add, target_cols in zip(ad.forms, ad.deltas, fast, target_of, strict=True):
                scaled = functools.partial(rows.scaled, ad.index, f.scale)
                if add is not None:
                    add(idx, x, y, scaled)
                    continue
                d = delta(xs)
                d.mul_(scaled(d))
                if idx is None:
                    target_cols(y).add_(d)
                else:
                    target_cols(y).index_add_(0, idx, d)
        return y
    return post


class SweptLayer(NamedTuple):
    """A layer a sweep adapter targets, and its update per image (run after the layer's output)."""

    path: str
    module: torch.nn.Module
    post: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def note(sw: Sweep, layers: int) -> str:
    """What a sweep's sampling runs, for its event."""
    return (f"sweep of {sw.size} images: {layers} layers add each image's update unmerged (a merged copy holds "
            f"one strength for the whole batch)")


def posts(patcher, sw: Sweep, entries: list[Entry], ordinary: dict[int, list],
          additive: Callable[[tuple], bool]) -> dict[int, SweptLayer]:
    """For the sampling starting on `patcher`: module id -> the swept layer, for every layer a
    sweep adapter targets (`entries`: the sweep's entries serving this model). `ordinary`:
    module id -> the chain of ordinary adapters the layer runs too; `additive(patch)`: whether a
    ComfyUI patch that a node after the sweep added adds an update independent of the weight (then
    the sweep's update commutes with it)."""
    rows = start(patcher.model, sw, patcher.load_device)
    per_module: dict[int, tuple[str, torch.nn.Module, list]] = {}
    for a, entry in enumerate(entries):
        for path, module, forms in entry.modules():
            problem = form_problem(forms)
            if problem is not None:
                raise LoraCacheError(f"LoRA Cache Sweep: '{entry.lora}' on {path}: {problem}; sweep LoRA, LoCon, "
                                     f"LoHa or LoKr files")
            key = path + ".weight"
            later = patcher.patches.get(key, [])[sw.seen.get(key, 0):]
            if not all(additive(p) for p in later):
                raise LoraCacheError(f"LoRA Cache Sweep: a loader after the sweep patches {path} with an update that "
                                     f"reads the weight before it (per image, the sweep's); place it before the sweep")
            per_module.setdefault(id(module), (path, module, []))[2].append((a, forms))
    for mid in per_module:
        for forms, _strength in ordinary.get(mid, ()):
            for f in forms:
                if f.order_sensitive:
                    raise LoraCacheError(
                        f"LoRA Cache Sweep: a LoRA Cache adapter on a swept layer has a {f.kind} form, which reads "
                        f"the weight before it (per image, the sweep's); apply it with a stock loader before the "
                        f"sweep, or leave it out")
    return {mid: SweptLayer(path, module, layer_post(module, rows, ads))
            for mid, (path, module, ads) in per_module.items()}
