"""GPU check of the unmerged weight update where ComfyUI's dynamic VRAM streams the weights, with
real comfy-aimdo (lora_cache/layers.py, weight_update.py): with the device filled so that
comfy-aimdo cannot keep every weight resident, a layer whose weight streams through ComfyUI's cast
buffer takes the update in place in that buffer, a resident one into a new tensor, and no
resident weight is written: a base sampling after ours equals the one before it to the bit, and
ours equals stock within fp16 rounding. (The first sampling after a load, while comfy-aimdo
places the weights, differs from later ones in fp16 rounding on the H200, with or without ours:
the base is compared from the second sampling on.)

The tiny SD-type UNet in fp16 comes through ComfyUI's loader from a file; the LoRA runs in mode
unmerged (no merged copies), at a latent where the weight update moves less memory than the
output update. The device is filled in steps, leaving less room each time, until some weight
update went in place (or none of the steps made comfy-aimdo stream). Prints a JSON report; on a
GPU machine, from the repository root (benchmarks/device/setup.sh prepares one for ComfyUI
0.33.0): COMFYUI_DIR=path/to/ComfyUI PYTHONPATH=testkit python3 scripts/gpu_streamed_update_check.py
"""
from __future__ import annotations

import json
import sys

from lora_cache_testkit import aimdo, host

aimdo.boot_on_gpu()  # before torch is imported: comfy-aimdo hooks the CUDA allocator

import comfy.model_management as mm
import comfy.sd
import torch

from lora_cache_testkit.sampling import stock_lora, tiny_fp16_model_from_file, tiny_sd_sampler


def main() -> int:
    lc = host.load_package().lora_cache
    report: dict = {**aimdo.gpu_report(), "runs": []}
    if not report["aimdo"]:
        print(json.dumps(report, indent=1))
        return 0
    base, tmp = tiny_fp16_model_from_file("lc_streamed_", {"a": 1})
    report["patcher"] = type(base).__name__

    sample = tiny_sd_sampler(steps=3, size=32)  # 1024 rows a call at the top: the weight update wins there

    # which way each weight update went: in place (ComfyUI's copy for the call) or a new tensor
    wu = lc.weight_update
    ways = {"in_place": 0, "new_tensor": 0}
    real_in_place, real_new = wu.add_in_place, wu.merged_weight

    def counted_in_place(w, wp):
        ways["in_place"] += 1
        return real_in_place(w, wp)

    def counted_new(w, wp):
        ways["new_tensor"] += 1
        return real_new(w, wp)
    wu.add_in_place, wu.merged_weight = counted_in_place, counted_new

    # comfy-aimdo places weights at the model's load: the device is filled before each load, so
    # that the room left decides which weights stream. The tiny model's sampling needs a few MiB
    # (ComfyUI's inference reserve, over a GiB, would hold every weight of it).
    model_bytes = base.model_size()
    # CUDA loads kernels on first use, into device memory: the runs' kernels load before any fill
    sample(base)
    sample(stock_lora(base, tmp / "a.safetensors"))
    sample(lc.apply(base, None, "a.safetensors", 1.0, 0.0, True, "unmerged")[0])
    del base
    margin = 64 << 20
    for share in (2, 8, 0):  # room left for the weights: half of them, an eighth, none
        mm.unload_all_models()
        lc.purge()
        mm.soft_empty_cache()
        free, _ = torch.cuda.mem_get_info()
        room = model_bytes // share if share else 0
        filler = torch.empty(max(0, free - margin - room), dtype=torch.uint8, device="cuda")
        run: dict = {"room": f"1/{share} of the weights" if share else "none"}
        try:
            base = comfy.sd.load_diffusion_model(str(tmp / "unet.safetensors"))
            before = sample(base)  # the first sampling after a load: comfy-aimdo places the weights
            again = sample(base)
            stock = sample(stock_lora(base, tmp / "a.safetensors"))
            ways.update(in_place=0, new_tensor=0)
            m, _, ev = lc.apply(base, None, "a.safetensors", 1.0, 0.0, True, "unmerged")
            out = sample(m)
            took = dict(ways)
            after = sample(base)
            del m, base
        except RuntimeError as e:  # torch's OutOfMemoryError, or CUDA's own at a kernel launch
            if "out of memory" not in str(e):
                raise
            run["out_of_memory"] = str(e).splitlines()[0]
            report["runs"].append(run)
            continue
        finally:
            del filler
        run.update({"path": ev.path, "reason": ev.reason, "weight_updates": took,
                    "max_abs_diff_vs_stock": float((out - stock).abs().max()),
                    "ref_max_abs": float(stock.abs().max()),
                    "base_first_vs_again": float((before - again).abs().max()),
                    "base_after_vs_again": float((after - again).abs().max())})
        report["runs"].append(run)
        if took["in_place"]:
            break
    wu.add_in_place, wu.merged_weight = real_in_place, real_new
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
