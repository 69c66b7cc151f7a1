"""GPU check of the cached path on real ComfyUI code, for the device machine (no server).

Builds the tiny SD-type model on the GPU in its default dtype, toggles a LoRA through
lora_cache.apply and sampling (comfy.sample) next to the stock patch path, and reports paths,
the weight work ComfyUI did (counted), output differences to stock, and the novram fallback.
Prints a JSON report; docs/gpu-check.md holds a run. On a GPU machine, from the repository root:
COMFYUI_DIR=path/to/ComfyUI PYTHONPATH=testkit python3 scripts/gpu_smoke.py
"""
from __future__ import annotations

import json
import sys

from lora_cache_testkit import host

host.boot(cpu=False)

import torch

from lora_cache_testkit.sampling import apply_under_vram_state, stock_lora, tiny_fp16_model_and_lora, tiny_sd_sampler
from lora_cache_testkit.spies import count_weight_work


def main() -> int:
    lc = host.load_package().lora_cache
    base, lora_path = tiny_fp16_model_and_lora()
    sample = tiny_sd_sampler()
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "dtype": str(base.model_dtype()),
              **host.allocator_report(), "runs": []}
    stock = sample(stock_lora(base, lora_path))
    ref_base = sample(base)
    for label, enabled, mode in [("on", True, "auto"), ("off", False, "auto"), ("on again", True, "auto"),
                                 ("off", False, "auto"), ("on again", True, "auto"), ("merged", True, "merged"),
                                 ("unmerged", True, "unmerged")]:
        with count_weight_work() as counts:
            m, _, ev = lc.apply(base, None, "a.safetensors", 1.0, 0.0, enabled, mode)
            out = sample(m)
        ref = stock if enabled else ref_base
        report["runs"].append({"run": label, "path": ev.path, "reason": ev.reason, "node_ms": round(ev.ms, 3),
                               "weight_work": dict(counts), "max_abs_diff_vs_stock": float((out - ref).abs().max()),
                               "ref_max_abs": float(ref.abs().max())})
    entry = [e for e in lc.STORE.entries()][0]
    report["factor_device"] = entry.device
    report["factor_bytes"] = entry.nbytes
    report["novram"] = apply_under_vram_state(lc, base, sample, lora_path, "NO_VRAM")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
