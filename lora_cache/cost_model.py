"""Which adapted layers get a merged copy for a sampling, from costs known before it starts.

A merged copy (copies.py) makes an adapted layer's forward its own product on another tensor:
nothing per step, at the price of the layer's weight in device memory. Running its forms unmerged
costs per call a launch or two plus a read and write of the weight or of the output (benchmarks/
RESULTS.md section 4). So where every copy fits, every layer gets one; where not, copies go
first where they save the most time per byte.

A layer's saving per call is worked out from its shape and two numbers of its device, measured
once per device and kept: the time of one small kernel launch and the memory bandwidth. No
sampling of the user's is spent trying either way.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import NamedTuple

import torch


class DeviceCosts(NamedTuple):
    """What one launch and one byte moved cost on a device, measured once."""

    launch_s: float
    bytes_per_s: float


class LayerCost(NamedTuple):
    """One adapted layer's case for a merged copy."""

    key: object  # whatever the caller names the layer by
    copy_bytes: int
    saving_s: float  # per call: the time its forms take unmerged over the layer's own product
    required: bool = False  # merged mode: a copy wherever one fits, whatever it saves


_measured: dict[str, DeviceCosts] = {}
_lock = threading.Lock()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn, repeat: int) -> float:
    fn()  # kernels loaded, buffers allocated
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / repeat


@torch.no_grad()
def device_costs(device: torch.device | str) -> DeviceCosts:
    """The launch time and bandwidth of `device`, measured on first use (a few milliseconds)."""
    device = torch.device(device)
    name = str(device)
    with _lock:
        if name not in _measured:
            small = torch.zeros(16, device=device)
            launch = _timed(device, lambda: small.add_(1.0), 64)
            n = (64 << 20) if device.type == "cuda" else (8 << 20)
            src = torch.empty(n, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            copy_s = _timed(device, lambda: dst.copy_(src), 4)
            _measured[name] = DeviceCosts(launch, 2 * n / max(copy_s, 1e-9))
        return _measured[name]


def unmerged_saving(out_f: int, in_f: int, rows: int | None, steps: int, adapters: int, covered: int,
                    element_size: int, costs: DeviceCosts) -> float:
    """Seconds per call that a copy saves over the cheaper of the two unmerged ways of a
    Linear's low-rank update (weight_update.py): the weight update copies the weight into a new
    one, then reads and writes the rows each step covers (a launch per factor step); the output
    update reads the input again per adapter and reads and writes the output columns each step
    covers (a launch per adapter and per step). `covered`: the output rows the steps cover
    together; `rows`: the input rows of this layer's last call, None where not known yet (then
    the weight update's cost, its bound)."""
    weight_update = (2 * (out_f + covered) * in_f * element_size / costs.bytes_per_s
                     + steps * costs.launch_s)
    if rows is None:
        return weight_update
    output_update = (rows * (adapters * in_f + 2 * covered) * element_size / costs.bytes_per_s
                   + (adapters + steps) * costs.launch_s)
    return min(weight_update, output_update)


def chain_saving(weight_bytes: int, forms: int, costs: DeviceCosts) -> float:
    """Seconds per call a copy saves on a layer whose forms run one by one (LoKr, LoHa, DoRA,
    OFT, ...): at least a launch and a read and write of the output per form; taken as one
    pass over the weight per form, which is what the cheapest of them costs on a large input."""
    return forms * (costs.launch_s + 2 * weight_bytes / costs.bytes_per_s)


def choose(layers: Iterable[LayerCost], budget: int) -> tuple[set, int]:
    """The layers that get a copy within `budget` bytes, and the bytes they take: required
    ones first, then by saving per byte. A layer that does not fit is passed over for smaller
    ones after it."""
    chosen: set = set()
    used = 0
    order = sorted(layers, key=lambda c: (not c.required, -c.saving_s / max(c.copy_bytes, 1)))
    for c in order:
        if used + c.copy_bytes <= budget:
            chosen.add(c.key)
            used += c.copy_bytes
    return chosen, used
