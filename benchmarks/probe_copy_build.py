"""How fast base-weight copies of a model's linear layers reach the device under dynamic VRAM,
by each way of reading them: ComfyUI's cast per layer (what merged copies take), comfy-aimdo's
file reader straight into a device tensor per layer, the same reader over spans of adjacent
layers with each weight cloned out, base_read.read_from_file (what base copies take: the spans
after its residency checks), and a plain copy from the mmap'd host tensor. Each way
starts from an unloaded model. Also the model's own first load (one step after an unload, less a
warm step).

    python3 benchmarks/probe_copy_build.py --model sdxl --out DIR
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

from lora_cache_testkit import aimdo, host
from lora_cache_testkit.scratch import scratch_dir


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="sdxl", choices=("sdxl", "flux"))
    p.add_argument("--order", default="cast,file,spans,lib,host,file,spans,lib,cast")
    p.add_argument("--out", default="benchmarks/out")
    p.add_argument("--empty-cache", action="store_true",
                   help="hand torch's cached blocks back before each way, as the memory owner does under streaming")
    args = p.parse_args()
    host.boot(cpu=False)  # as ComfyUI's main.py: the allocator chosen, then comfy-aimdo hooked
    aimdo.hook()
    import importlib

    import comfy.memory_management as cmm
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.ops
    import comfy.sample
    import comfy.sd
    import models
    import torch
    from safetensors.torch import save_file
    aimdo.devices()
    lc = host.load_package().lora_cache
    base_read = importlib.import_module(lc.__name__ + ".base_read")
    import comfy_aimdo.host_buffer

    def read_spans(layers, held) -> int:
        """Every layer's weight in the library's spans of adjacent file slices (base_read._spans),
        without its residency checks: each span read into a device buffer, each weight cloned out
        of it. Returns the reads."""
        slices = [s for m in layers for s in base_read._slices_of(m, dtype) if s.name == "weight"]
        out: dict[int, torch.Tensor] = {}
        stream = torch.cuda.current_stream().cuda_stream
        spans = base_read._spans(slices)
        for span in spans:
            start = span[0].offset
            size = max(x.offset + x.size for x in span) - start
            buf = torch.empty(size, dtype=torch.uint8, device=dev)
            comfy_aimdo.host_buffer.read_file_to_device(span[0].file_ref, start, size, stream, buf.data_ptr(),
                                                        dev.index, mark_cold=False)
            for x in span:
                out[x.module_id] = buf[x.offset - start:x.offset - start + x.size].view(x.tensor.dtype).view(
                    x.tensor.shape).clone()
        held.extend(out[id(m)] for m in layers)
        return len(spans)

    dtype = torch.float16 if args.model == "sdxl" else torch.bfloat16
    spec = models.Spec(args.model, False, dtype)
    work = scratch_dir("lc_probe_")
    path = work / "m.safetensors"
    with torch.inference_mode():
        built = models.build(spec, seed=0)
        sd = {k: v.detach().to("cpu", copy=True) for k, v in built.model.diffusion_model.state_dict().items()}
    save_file(sd, str(path))
    del built, sd
    gc.collect()
    torch.cuda.empty_cache()
    aimdo.use_dynamic(True)
    base = comfy.sd.load_diffusion_model(str(path))
    cond, latent = spec.conditioning(), torch.zeros(spec.latent)
    noise = comfy.sample.prepare_noise(latent, 42)
    dev = mm.get_torch_device()
    report: dict = {"model": args.model, "patcher": type(base).__name__, "device": torch.cuda.get_device_name(0),
                    "ways": []}

    def sample(steps):
        comfy.sample.sample(base, noise, steps, spec.cfg, "euler", "simple", cond, cond, latent, seed=42,
                            disable_pbar=True)
        torch.cuda.synchronize()

    def fresh():
        mm.unload_all_models()
        lc.purge()
        gc.collect()
        torch.cuda.synchronize()
        if args.empty_cache:
            torch.cuda.empty_cache()

    with torch.inference_mode():
        sample(1)
        t = time.perf_counter()
        sample(1)
        warm = time.perf_counter() - t
        fresh()
        t = time.perf_counter()
        sample(1)
        cold = time.perf_counter() - t
        report.update(warm_step_s=warm, cold_step_s=cold)
        print(f"one step warm {warm:.3f} s, after an unload {cold:.3f} s: the model's load about {cold - warm:.3f} s",
              flush=True)
        for way in args.order.split(","):
            fresh()
            mm.load_models_gpu([base])
            layers = [m for m in base.model.diffusion_model.modules()
                      if isinstance(m, torch.nn.Linear) and hasattr(m, "weight_function")]
            nbytes = sum(m.weight.numel() * m.weight.element_size() for m in layers)
            held, direct = [], 0
            torch.cuda.synchronize()
            t = time.perf_counter()
            if way == "spans":
                direct = read_spans(layers, held)
            elif way == "lib":  # the library's read, with its residency checks
                got = base_read.read_from_file(layers, dtype, dev)
                direct = len(got)
                for m in layers:
                    if id(m) in got:
                        held.append(got[id(m)].weight)
                        continue
                    with base_read.base_of(m, dtype, dev) as b:  # what the library does with the rest
                        held.append(b.weight.clone())
            for m in layers if way not in ("spans", "lib") else ():
                if way == "cast":
                    with base_read.base_of(m, dtype, dev) as b:
                        held.append(b.weight.clone())
                elif way == "file":
                    dest = torch.empty(m.weight.shape, dtype=m.weight.dtype, device=dev)
                    if cmm.read_tensor_file_slice_into(m.weight, dest, stream=torch.cuda.current_stream()):
                        direct += 1
                    else:
                        dest.copy_(m.weight)
                    held.append(dest)
                else:
                    held.append(m.weight.to(dev, copy=True))
            torch.cuda.synchronize()
            s = time.perf_counter() - t
            same = all(torch.equal(h.cpu(), m.weight.cpu()) for h, m in zip(held, layers, strict=True))
            row = {"way": way, "layers": len(layers), "gib": nbytes / 2**30, "s": s, "gb_s": nbytes / s / 1e9,
                   "file_reads": direct, "all_equal": same}
            report["ways"].append(row)
            print(f"{way:5s} {len(layers)} layers {nbytes / 2**30:.2f} GiB in {s:.3f} s = {nbytes / s / 1e9:.2f} GB/s "
                  f"(file reads {direct}; every one equals the host weight: {same})", flush=True)
            del held
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"probe-{args.model}.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
