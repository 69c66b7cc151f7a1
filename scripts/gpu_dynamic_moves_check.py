"""GPU check of cached factors moving off and back under ComfyUI's dynamic VRAM with real
comfy-aimdo (lora_cache/memory.py): with a device budget that holds one adapter's factors, a
switch moves the other's to pinned host memory; a switch back moves nothing at the node call
(under dynamic VRAM the factors come back at the sampling's start, after the unused ones left,
since comfy-aimdo keeps fewer weights resident for whatever else is on the device), and the
sampling then runs on them on the device, equal to stock within fp16 rounding. The same for a
LoRA Cache Sweep of an adapter moved off, whose per-image update binds its factors at the
sampling's start: they are back on the device by then (the sampling copies no factors to it).
Each adapter's factors are one allocation on the device and one page-locked one on the host
(lora_cache/arena.py).

The tiny SD-type UNet in fp16 comes through ComfyUI's loader from a file. Prints a JSON report;
on a GPU machine, from the repository root (benchmarks/device/setup.sh prepares one for ComfyUI
0.33.0): COMFYUI_DIR=path/to/ComfyUI PYTHONPATH=testkit python3 scripts/gpu_dynamic_moves_check.py
"""
from __future__ import annotations

import importlib
import json
import sys

from lora_cache_testkit import aimdo, host

aimdo.boot_on_gpu()  # before torch is imported: comfy-aimdo hooks the CUDA allocator

import comfy.model_management as mm
import torch

from lora_cache_testkit.sampling import stock_lora, tiny_fp16_model_from_file, tiny_sd_sampler


def main() -> int:
    lc = host.load_package().lora_cache
    low_rank = importlib.import_module(lc.__name__ + ".low_rank")
    report: dict = {**aimdo.gpu_report(), "runs": []}
    if not report["aimdo"]:
        print(json.dumps(report, indent=1))
        return 0
    base, tmp = tiny_fp16_model_from_file("lc_moves_", {"a": 1, "b": 2})
    report["patcher"] = type(base).__name__
    sample = tiny_sd_sampler()
    stock = {n: sample(stock_lora(base, tmp / f"{n}.safetensors")) for n in "ab"}
    owner, counters = lc.MEMORY, lc.MEMORY.policy.counters

    def moved(before: dict) -> dict:
        return {k: counters[k] - before.get(k, 0) for k in ("moved_to_cpu", "moved_back")}

    def residency() -> dict:
        return {e.lora[0]: e.resident for e in lc.STORE.entries()}

    def blocks() -> dict:
        """Per adapter: how many allocations its factors are in (lora_cache/arena.py: one on the
        device, page-locked pieces on the host), their bytes against the factors' own, and
        whether those on the host are page-locked."""
        out = {}
        for e in lc.STORE.entries():
            ts = low_rank.tensors_of(e.layers.values())
            storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ts}
            out[e.lora[0]] = {"allocations": len(storages), "allocated": sum(storages.values()), "nbytes": e.nbytes,
                              "pinned": all(t.is_pinned() for t in ts) if ts[0].device.type == "cpu" else None}
        return out

    def after(before: dict, out: torch.Tensor, n: str) -> dict:
        """What the sampling moved since `before` (the counters before the node call), where the
        factors are now, and the output against stock's for LoRA `n`."""
        return {"moved_in_run": moved(before), "resident_after": residency(), "blocks_after": blocks(),
                "device_after": {e.lora[0]: e.device for e in lc.STORE.entries()},
                "max_abs_diff_vs_stock": float((out - stock[n]).abs().max()),
                "ref_max_abs": float(stock[n].abs().max())}

    def run(label: str, n: str) -> None:
        before = dict(counters)
        m, _, ev = lc.apply(base, None, f"{n}.safetensors", 1.0, 0.0, True, "auto")
        at_node, resident_at_node = moved(before), residency()
        report["runs"].append({"run": label, "path": ev.path, "reason": ev.reason, "node_ms": ev.ms,
                               "moved_at_node": at_node, "resident_at_node": resident_at_node,
                               **after(before, sample(m), n)})

    run("a first use", "a")
    owner.budget.overrides[str(mm.get_torch_device())] = lc.STORE.entries()[0].nbytes + 1
    run("b first use (budget holds one)", "b")
    run("a again", "a")
    run("b again", "b")
    # The sweep of a (moved off by b): its per-image update binds the factors at the sampling's
    # start, so they must be back on the device by then; bound on the host, every swept layer
    # would copy them to the device at every call (page-locked to device copies, counted here;
    # the move back itself copies each layer's down and up once).
    sweep_service = importlib.import_module(lc.__name__ + ".sweep_service")
    before = dict(counters)
    res = sweep_service.apply_sweep(base, None, ["a.safetensors"], "1")
    at_node = moved(before)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = sample(res.model)
        torch.cuda.synchronize()
    copies = [e.name for e in prof.events() if "Memcpy" in e.name]
    swept = next(len(e.layers) for e in lc.STORE.entries() if e.lora[0] == "a")
    report["sweep"] = {"reason": res.event.reason, "moved_at_node": at_node, **after(before, out, "a"),
                       "swept_layers": swept, "memcpy": len(copies),
                       "memcpy_pinned_to_device": sum("HtoD" in n and "Pinned" in n for n in copies)}
    owner.budget.overrides.clear()
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
