"""The work of a layer's low-rank Linear updates, as an output update or a weight update.

When every active form on a layer is a low-rank Linear one (`LayerFactors`), its forward
(layers.py) computes the update in one of two ways, chosen per call by which moves less memory:

- output update (`Plan`): one `x @ down` per adapter and one addmm_ per factor into the output,
  which reads the input again and reads and writes the output again;
- weight update (`WeightPlan`): the weight `W + alpha * up down` (one addmm per factor), used by
  the layer's own product in place of W. Where W is one that stays (the layer's own, or one
  comfy-aimdo keeps resident) the update writes a new tensor: torch's addmm copies W into it
  before the product adds to it, so W is read twice and the new weight written twice. Where W
  is ComfyUI's own copy for this one call (a weight it streams through its cast buffer), the
  update goes into it in place: W read and written once. Either wins wherever the weight is
  small beside the activations (SDXL's layers at 1024x1024; in place, Flux's image-token
  layers). The weight it reads is ComfyUI's: the layer's own where the weight is resident and
  not cast, else the one ComfyUI casts or streams for this call, through ComfyUI's per-call
  weight functions (the mechanism of its own lowvram patches).

A merged copy of such a layer (copies.py) is the weight update's weight, built once.
"""
from __future__ import annotations

from itertools import pairwise
from typing import NamedTuple, cast

import torch

from .form_base import Chain
from .low_rank import all_linear, share_down


class FactorPart(NamedTuple):
    """One factor's part of the output update: columns lo:hi of its adapter's `x @ down` (lo
    None: all of them) times `up` [r, length] times `alpha`, added to the output columns
    start:start + length (start None: all of them)."""

    lo: int | None
    hi: int | None
    up: torch.Tensor
    alpha: float
    start: int | None
    length: int | None


class AdapterPlan(NamedTuple):
    """One adapter's factors on a layer in the output update: the down projection [in, R] they
    share (one factor's own where they do not share one) and each factor's part of it."""

    down: torch.Tensor
    parts: tuple[FactorPart, ...]


# The output update's work for a layer's active adapters, in chain order.
Plan = tuple[AdapterPlan, ...]


def plan_of(active: Chain) -> Plan | None:
    """The direct forward's work for the active adapters, or None if some factor is not a
    Linear one (then `chain` serves the layer)."""
    plan: list[AdapterPlan] = []
    for factors, strength in active:
        if not all_linear(factors):
            return None
        shared = share_down(factors)
        if shared is None:
            for f in factors:
                start, length = f.out_slice or (None, None)
                plan.append(AdapterPlan(f.down, (FactorPart(None, None, f.up, strength * f.scale, start, length),)))
        else:
            parts = []
            for f in factors:
                lo, hi = cast(tuple, f.shared_cols)
                start, length = f.out_slice or (None, None)
                parts.append(FactorPart(lo, hi, f.up, strength * f.scale, start, length))
            plan.append(AdapterPlan(shared, tuple(parts)))
    return tuple(plan)


class WeightStep(NamedTuple):
    """Rows start:stop of the weight get `alpha * up_t @ down_t`; start None: all rows."""

    up_t: torch.Tensor  # up^T [length, r]
    down_t: torch.Tensor  # down^T [r, in]
    alpha: float
    start: int | None
    stop: int | None


class WeightPlan(NamedTuple):
    """The plan's updates as additions to the weight [out, in] (the weight update).

    `tiles` steps come first and cover every row exactly once between them (Flux's q/k/v/mlp
    slices of one fused weight); then the new weight is written by them, each from its rows of W,
    with no copy of W first.
    `merge_numel`: the input size (rows x in) from which the weight update into a new tensor
    moves less memory than the output update (slices and stacked adapters counted);
    `in_place_numel`: the same for the update in place, into a weight that is ComfyUI's copy for
    this call. A weight that ComfyUI copies for its weight functions only because ours is there
    costs twice `in_place_numel`."""

    tiles: int
    steps: tuple[WeightStep, ...]
    merge_numel: float
    in_place_numel: float


def as_weight_plan(plan: Plan, weight: torch.Tensor) -> WeightPlan | None:
    """The weight update of `plan` on a layer with this weight; None where the weight is not a
    Linear's or the plan is empty."""
    if weight.ndim != 2 or not plan:
        return None
    out_f, in_f = weight.shape
    steps = []
    for down, parts in plan:
        for lo, hi, up, alpha, start, length in parts:
            d = down if lo is None else down[:, lo:hi]
            steps.append(WeightStep(up.t(), d.t(), float(alpha), start,
                                    None if start is None else start + cast(int, length)))
    first = plan[0].parts
    covered = sorted((p.start, p.start + cast(int, p.length)) for p in first if p.start is not None)
    tiles = 0
    if len(covered) == len(first) and covered and covered[0][0] == 0 and covered[-1][1] == out_f and all(
            a[1] == b[0] for a, b in pairwise(covered)):
        tiles = len(first)
    # Memory each update moves per call. Output update: x [rows, in] read again per adapter, each
    # factor's output columns read and written. Weight update in place: each step's rows read and
    # written. Into a new tensor: W copied first as well (addmm's own copy of its input, or a clone).
    lengths = [out_f if s.start is None else cast(int, s.stop) - s.start for s in steps]
    per_row = len(plan) * in_f + 2 * sum(lengths)
    in_place = 2 * in_f * sum(lengths)
    return WeightPlan(tiles, tuple(steps), (2 * out_f * in_f + in_place) / per_row * in_f,
                      in_place / per_row * in_f)


def merged_weight(weight: torch.Tensor, wp: WeightPlan) -> torch.Tensor:
    """A new tensor `weight + every step's update`; `weight` itself is left as it is (it is the
    layer's parameter, or a tensor comfy-aimdo keeps resident)."""
    steps = wp.steps
    if wp.tiles:
        out = torch.empty_like(weight)
        for ut, dt, alpha, start, stop in steps[:wp.tiles]:
            torch.addmm(weight[start:stop], ut, dt, alpha=alpha, out=out[start:stop])
        rest = steps[wp.tiles:]
    elif steps[0].start is None:
        ut, dt, alpha, _, _ = steps[0]
        out = torch.addmm(weight, ut, dt, alpha=alpha)
        rest = steps[1:]
    else:
        out = weight.clone()
        rest = steps
    add_steps(out, rest)
    return out


def add_in_place(weight: torch.Tensor, wp: WeightPlan) -> torch.Tensor:
    """`weight` with every step's update added in place: for a weight that is ComfyUI's copy for
    one call and no one else's."""
    add_steps(weight, wp.steps)
    return weight


def add_steps(weight: torch.Tensor, steps: tuple[WeightStep, ...]) -> None:
    """Adds each step's update to `weight` (or its rows) in place."""
    for ut, dt, alpha, start, stop in steps:
        (weight if start is None else weight[start:stop]).addmm_(ut, dt, alpha=alpha)


def weight_plan(active: Chain, weight: torch.Tensor) -> WeightPlan | None:
    """The weight update of (factors, strength) pairs on a layer with this weight; None where some
    form is not a low-rank Linear one."""
    plan = plan_of(active)
    return None if plan is None else as_weight_plan(plan, weight)
