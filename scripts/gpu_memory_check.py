"""GPU check of the memory budget and of following ComfyUI's unloads (device machine, no server).

The tiny SD-type model on the GPU, three LoRAs, a device budget that holds one: the least
recently used factors must leave the GPU for pinned host memory and come back before use;
comfy.model_management.unload_all_models / free_memory must take the factors off the GPU;
--lowvram / --novram states must take the full path. Every output is compared with stock.
Prints a JSON report; docs/gpu-check.md holds a run. On a GPU machine, from the repository root:
COMFYUI_DIR=path/to/ComfyUI PYTHONPATH=testkit python3 scripts/gpu_memory_check.py
"""
from __future__ import annotations

import json
import sys

from lora_cache_testkit import host
from lora_cache_testkit.scratch import scratch_dir

host.boot(cpu=False)

import comfy.model_management as mm
import comfy.sd
import folder_paths
import torch

from lora_cache_testkit import tiny_models
from lora_cache_testkit.sampling import apply_under_vram_state, stock_lora, tiny_sd_sampler


def main() -> int:
    lc = host.load_package().lora_cache
    store = lc.STORE
    owner = lc.MEMORY
    tmp = scratch_dir("lc_memory_")
    folder_paths.add_model_folder_path("loras", str(tmp), is_default=True)
    unet_sd16 = {k: v.half() for k, v in tiny_models.sd_unet_state_dict(seed=0).items()}
    ref_sd = {k: v.float() for k, v in unet_sd16.items()}
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        tiny_models.write_lora(tmp / f"{name}.safetensors", tiny_models.sd_lora_state_dict(ref_sd, seed=seed))
    base = comfy.sd.load_diffusion_model_state_dict(dict(unet_sd16))
    sample = tiny_sd_sampler()
    stock = {n: sample(stock_lora(base, tmp / f"{n}.safetensors")) for n in "abc"}
    dev = mm.get_torch_device()
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, **host.allocator_report(),
              "runs": []}

    def run(label, n, **kw):
        m, _, ev = lc.apply(base, None, f"{n}.safetensors", 1.0, 0.0, True, "auto")
        out = sample(m)
        ents = {e.lora[0]: e for e in store.entries()}
        report["runs"].append({
            "run": label, "path": ev.path, "reason": ev.reason,
            "max_abs_diff_vs_stock": float((out - stock[n]).abs().max()), "ref_max_abs": float(stock[n].abs().max()),
            "factors": {k: {"device": e.device, "resident": e.resident,
                            "pinned": bool(next(iter(e.layers.values()))[0].down.is_pinned()) if e.layers else None}
                        for k, e in sorted(ents.items())},
            "cuda_allocated": torch.cuda.memory_allocated(dev), **kw})

    run("a first use", "a")
    one = store.entries()[0].nbytes
    owner.budget.overrides[str(dev)] = one + 1
    run("b first use (budget holds one)", "b")
    run("a again", "a")
    run("c first use", "c")
    owner.budget.overrides.clear()
    run("b again (no budget)", "b")
    mm.unload_all_models()
    report["after_unload_all_models"] = {e.lora: {"device": e.device, "resident": e.resident}
                                         for e in store.entries()}
    report["after_unload_cuda_allocated"] = torch.cuda.memory_allocated(dev)
    run("b after unload_all_models", "b")
    mm.free_memory(1e30, dev)
    report["after_free_memory"] = {e.lora: {"device": e.device, "resident": e.resident} for e in store.entries()}
    run("b after free_memory", "b")
    report["memory"] = lc.stats()["memory"]
    for state in ("LOW_VRAM", "NO_VRAM"):
        report[state] = apply_under_vram_state(lc, base, sample, tmp / "a.safetensors", state)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
