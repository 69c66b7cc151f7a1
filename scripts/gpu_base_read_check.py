"""GPU check of where copies get their base weight (lora_cache/base_read.py) under ComfyUI's
dynamic VRAM with real comfy-aimdo: layers comfy-aimdo does not hold on the device are read from
the model file, in spans of adjacent layers, and equal bit for bit what ComfyUI's cast hands the
layers; a layer it holds resident, and a layer a stock LoRA patches, come through the cast. After
an unload, the copy choice reads copies of the base weight from the file and builds merged copies
through the cast (which leaves the weight resident for the layer's "off" runs); each equals the
copy built from the cast's weight.

An SDXL-shaped UNet in fp16 with random weights (benchmarks/models.py) comes through ComfyUI's
loader from a file. Prints a JSON report; on a GPU machine, from
the repository root (benchmarks/device/setup.sh prepares one for ComfyUI 0.33.0):
COMFYUI_DIR=path/to/ComfyUI PYTHONPATH=testkit python3 scripts/gpu_base_read_check.py
"""
from __future__ import annotations

import importlib
import json
import sys

from lora_cache_testkit import aimdo, host
from lora_cache_testkit.scratch import scratch_dir

aimdo.boot_on_gpu()  # before torch is imported: comfy-aimdo hooks the CUDA allocator

import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.sd
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(host.ROOT / "benchmarks"))
import models  # noqa: E402  (benchmarks/models.py: an SDXL-shaped UNet from ComfyUI's classes)


def main() -> int:
    pkg = host.load_package().lora_cache
    base_read = importlib.import_module(pkg.__name__ + ".base_read")
    copies = importlib.import_module(pkg.__name__ + ".copies")
    copy_choice = importlib.import_module(pkg.__name__ + ".copy_choice")
    report: dict = aimdo.gpu_report()
    if not report["aimdo"]:
        print(json.dumps(report, indent=1))
        return 0
    work = scratch_dir("lc_base_read_")
    dtype = torch.float16
    # built and written before dynamic VRAM is on: its ops would leave the weights to the loader
    with torch.inference_mode():
        built = models.build(models.Spec("sdxl", False, dtype), seed=0)
        sd = {k: v.detach().to("cpu", copy=True) for k, v in built.model.diffusion_model.state_dict().items()}
    save_file(sd, str(work / "unet.safetensors"))
    del built, sd
    aimdo.use_dynamic(True)
    base = comfy.sd.load_diffusion_model(str(work / "unet.safetensors"), model_options={"dtype": dtype})
    device = mm.get_torch_device()
    report["patcher"] = type(base).__name__

    def linears(patcher) -> list[tuple[str, torch.nn.Module]]:
        return [(n, m) for n, m in patcher.model.diffusion_model.named_modules()
                if isinstance(m, torch.nn.Linear) and getattr(m, "_v", None) is not None]

    def cast(m) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b, stream = comfy.ops.cast_bias_weight(m, dtype=dtype, device=device, bias_dtype=dtype, offloadable=True)
        out = (w.clone(), None if b is None else b.clone())
        comfy.ops.uncast_bias_weight(m, w, b, stream)
        return out

    def same(a, b) -> bool:
        if a[1] is None or b[1] is None:
            return torch.equal(a[0], b[0]) and a[1] is None and b[1] is None
        return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    def reads(patcher) -> dict:
        """For every managed Linear: whether base_read reads it from the file, and whether what it
        reads equals the cast's."""
        layers = [m for _, m in linears(patcher)]
        read = base_read.read_from_file(layers, dtype, device)
        # the casts after the read: every layer is resident from here on
        equal = sum(same((b.weight, b.bias), cast(m)) for m in layers if (b := read.get(id(m))) is not None)
        return {"layers": len(layers), "from_file": len(read), "equal_to_cast": equal}

    with torch.inference_mode():
        mm.unload_all_models()
        mm.load_models_gpu([base])
        report["after_load"] = reads(base)
        report["resident"] = reads(base)  # every layer was just cast into comfy-aimdo's memory
        mm.unload_all_models()
        mm.load_models_gpu([base])
        layers = linears(base)
        # copies of the base weight on every other layer, then copies with a LoRA-shaped update on
        # the rest, through the copy choice, in the order its for_sampling builds them (a merged
        # copy's cast faults in comfy-aimdo's pages, which neighbouring layers share)
        rows = {"base_copies": [], "merged_copies": []}
        for i, (_, m) in enumerate(layers):
            chain: tuple = ()
            if i % 2:
                w = m.weight
                up = torch.randn(w.shape[0], 4, dtype=dtype, device=device) * 0.01
                down = torch.randn(4, w.shape[1], dtype=dtype, device=device) * 0.01
                chain = ((up, down),)
            rows["merged_copies" if chain else "base_copies"].append(
                copy_choice.Layer(m, _Forms(chain), copies.CopyKey((), (i,)), False))
        for kind, chosen in rows.items():
            choice = copy_choice.build_chosen(chosen, {id(ly.module) for ly in chosen}, device, dtype, base.model, "")
            made = [(ly.module, ly.chain, choice.copies[id(ly.module)]) for ly in chosen]
            # each copy equals the one the same chain gives on the cast's weight
            report[kind] = {"layers": len(made), "built": choice.built, "from_file": choice.from_file,
                            "equal_to_merge_of_cast": sum(torch.equal(c.weight, copies.merged(cast(m)[0], ch))
                                                          for m, ch, c in made)}
        # a LoRA on every managed Linear, in the generic key format ComfyUI's key map accepts
        g = torch.Generator().manual_seed(1)
        lora_sd = {}
        for name, m in linears(base):
            out_f, in_f = m.weight.shape
            lora_sd[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(out_f, 4, generator=g).half() * 0.01
            lora_sd[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(4, in_f, generator=g).half() * 0.01
        stock = comfy.sd.load_lora_for_models(base, None, lora_sd, 1.0, 0)[0]
        mm.unload_all_models()
        mm.load_models_gpu([stock])
        patched = [m for _, m in linears(stock) if getattr(m, "weight_lowvram_function", None) is not None]
        report["stock_patched"] = {"layers": len(patched),
                                   "from_file": len(base_read.read_from_file(patched, dtype, device))}
    print(json.dumps(report, indent=1))
    return 0


class _Forms:
    """A chain of one LoRA-shaped product per entry (copies.merged merges forms that are not
    LayerFactors in fp32 with one rounding, in chain order)."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __bool__(self):
        return bool(self.pairs)

    def __iter__(self):
        return iter([((_Product(up, down),), 1.0) for up, down in self.pairs])


class _Product:
    def __init__(self, up, down):
        self.up, self.down = up, down

    def merge_into(self, w32: torch.Tensor, strength: float) -> None:
        w32 += strength * (self.up.float() @ self.down.float())


if __name__ == "__main__":
    sys.exit(main())
