"""GPU check of the net for layers ComfyUI computes without their forward (lora_cache/reach.py),
under ComfyUI's dynamic VRAM (ModelPatcherDynamic, comfy-aimdo) where it is active, and under the
classic patcher.

The tiny SD-type UNet in fp16 comes through ComfyUI's loader from a file (dynamic VRAM streams
from it); one feed-forward computes its down-projection as newer `comfy.ops.linear_input_act`
does under fp16 accumulation (lora_cache_testkit.fused). For the stock loader and ours (auto:
merged copies, dynamic: unmerged) it reports the output's difference to stock and to the stock
output without that layer's adapter, the sampling's event, the model calls, whether
`patches_uuid` changed, the modules ComfyUI streamed while sampling and whether a base image
after ours equals the one before it bit for bit (nothing of ours left behind). Prints a JSON
report; docs/gpu-check.md holds a run. On a GPU machine, from the repository root
(benchmarks/device/setup.sh prepares one for ComfyUI 0.33.0):
COMFYUI_DIR=path/to/ComfyUI PYTHONPATH=testkit python3 scripts/gpu_reach_check.py
"""
from __future__ import annotations

import json
import sys

from lora_cache_testkit import aimdo, host
from lora_cache_testkit.scratch import scratch_dir

aimdo.boot_on_gpu()  # before torch is imported: comfy-aimdo hooks the CUDA allocator

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.utils
import folder_paths
import torch
from safetensors.torch import save_file

from lora_cache_testkit import fused, tiny_models
from lora_cache_testkit.sampling import tiny_sd_sampler
from lora_cache_testkit.spies import count_model_calls


def main() -> int:
    lc = host.load_package().lora_cache
    dynamic_vram = aimdo.devices()
    work = scratch_dir("lc_reach_")
    folder_paths.add_model_folder_path("loras", str(work), is_default=True)
    unet_sd = {k: v.half() for k, v in tiny_models.sd_unet_state_dict(seed=0).items()}
    save_file(unet_sd, str(work / "unet.safetensors"))
    lora_sd = tiny_models.sd_lora_state_dict({k: v.float() for k, v in unet_sd.items()}, seed=1)
    tiny_models.write_lora(work / "a.safetensors", lora_sd)
    stock_sd = comfy.utils.load_torch_file(str(work / "a.safetensors"), safe_load=True)
    missing_sd = fused.without_layer(stock_sd)

    # Weights ComfyUI moves to the device while casting (dynamic VRAM streams each module in one
    # cast_to_gathered call).
    streamed = {"modules": 0}
    gathered = getattr(mm, "cast_to_gathered", None)
    if gathered is not None:
        def counting(tensors, *a, **kw):
            streamed["modules"] += 1
            return gathered(tensors, *a, **kw)
        mm.cast_to_gathered = counting

    sample_once = tiny_sd_sampler()

    def sample(m) -> tuple[torch.Tensor, int, int]:
        streamed["modules"] = 0
        with count_model_calls() as calls:
            out = sample_once(m)
        torch.cuda.synchronize()
        return out.cpu(), calls["model_calls"], streamed["modules"]

    report: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, **host.allocator_report(),
                    "aimdo": dynamic_vram, "layer": fused.DOWN, "configs": {}}
    for config in (["dynamic"] if dynamic_vram else []) + ["classic"]:
        aimdo.use_dynamic(config == "dynamic")
        mm.unload_all_models()
        lc.purge()
        base = comfy.sd.load_diffusion_model(str(work / "unet.safetensors"))
        fused.fuse(base.model.diffusion_model)
        uuid = base.patches_uuid
        base_out, base_calls, _ = sample(base)
        stock, stock_calls, _ = sample(comfy.sd.load_lora_for_models(base, None, stock_sd, 1.0, 0)[0])
        missing, _, _ = sample(comfy.sd.load_lora_for_models(base, None, missing_sd, 1.0, 0)[0])
        sample(base)  # the base weights resident again, as a base image leaves them
        base_again, _, base_streamed = sample(base)
        # Under dynamic VRAM a base image after a stock LoRA's differs from the first one (the
        # weights come back another way); the one after ours is compared with both.
        rows = {"patcher": type(base).__name__, "base_calls": base_calls, "stock_calls": stock_calls,
                "base_resample_streamed": base_streamed,
                "base_again_vs_first": float((base_again - base_out).abs().max()),
                "ref_max_abs": float(stock.abs().max()),
                "missing_vs_stock": float((missing - stock).abs().max()), "runs": []}
        for mode in ("auto", "unmerged"):
            m, _, ev = lc.apply(base, None, "a.safetensors", 1.0, 0.0, True, mode)
            for attempt in ("first", "again"):
                out, calls, n_streamed = sample(m)
                s = lc.stats()["samplings"][-1]
                rows["runs"].append({"mode": mode, "sampling": attempt, "path": ev.path, "net": s["net"],
                                     "reason": s["reason"], "model_calls": calls, "streamed": n_streamed,
                                     "uuid_kept": m.patches_uuid == uuid,
                                     "max_abs_diff_vs_stock": float((out - stock).abs().max())})
            after, _, after_streamed = sample(base)
            rows["runs"][-1].update(base_after_equal=bool(torch.equal(after, base_again)),
                                    base_after_vs_first=float((after - base_out).abs().max()),
                                    base_after_streamed=after_streamed)
        report["configs"][config] = rows
        del base
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
