"""Python's garbage collections in the 8-event series on a full-size model, on the CPU host.

A full (oldest-generation) collection traces every object of the process, a quarter of a second
with ComfyUI loaded, and runs once enough objects have survived into that generation. This probe
runs stock LoraLoaderModelOnly's series and ours (mode auto) on ComfyUI's SDXL class with random
weights in bf16, one step on a 16x16 latent per event (the collections depend on the objects
made, not on the device or the image size), and prints per event: the node call, the event, our
setup, the collections' total and each full one (ms after the node call started, ms it took).

    python3 benchmarks/probe_gc.py --rounds 3   # with COMFYUI_DIR set, about 1.5 min a round
"""
from __future__ import annotations

import argparse
import gc
import sys
import time

from lora_cache_testkit import host
from lora_cache_testkit.scratch import scratch_dir

EVENTS = [("on", "a", 1.0), ("off", None, 0.0), ("on", "a", 1.0), ("off", None, 0.0), ("on", "a", 1.0),
          ("strength 0.6", "a", 0.6), ("other LoRA", "b", 1.0), ("back", "a", 0.6)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    host.boot(cpu=True)

    import comfy.model_management as mm
    import comfy.sample
    import comfy.sd
    import comfy.utils
    import folder_paths
    import models  # benchmarks/models.py, beside this script
    import torch
    from gc_watch import GcWatch
    from safetensors.torch import save_file

    lc = host.load_package().lora_cache
    work = scratch_dir("lc_gc_")
    folder_paths.add_model_folder_path("loras", str(work), is_default=True)
    spec = models.Spec("sdxl", False, torch.bfloat16)
    with torch.inference_mode():
        built = models.build(spec, seed=0)
        for tag, seed in (("a", 1), ("b", 2)):
            models.write(work / f"{tag}.safetensors", models.adapter_state_dict(spec, built, "lora", 32, seed=seed))
        sd = {k: v.detach().to("cpu", copy=True) for k, v in built.model.diffusion_model.state_dict().items()}
    save_file(sd, str(work / "model.safetensors"))
    del built, sd
    gc.collect()
    base = comfy.sd.load_diffusion_model(str(work / "model.safetensors"))
    cond, latent = spec.conditioning(), torch.zeros(1, 4, 16, 16)
    noise = comfy.sample.prepare_noise(latent, 42)
    lora_sd = {tag: comfy.utils.load_torch_file(str(work / f"{tag}.safetensors"), safe_load=True) for tag in "ab"}

    collections = GcWatch()

    def apply(loader, tag, strength):
        if loader == "stock":
            return base if tag is None else comfy.sd.load_lora_for_models(base, None, lora_sd[tag], strength, 0)[0]
        name = f"{tag or 'a'}.safetensors"
        return lc.apply(base, None, name, strength or 1.0, 0.0, tag is not None, "auto")[0]

    def sample(m):
        comfy.sample.sample(m, noise, 1, spec.cfg, "euler", "simple", cond, cond, latent, seed=42,
                            disable_pbar=True)

    print(f"tracked objects: {len(gc.get_objects())}; thresholds {gc.get_threshold()}", flush=True)
    totals: dict = {"stock": [0.0, 0], "ours": [0.0, 0]}
    with torch.inference_mode():
        sample(base)
        for r in range(args.rounds):
            for loader in ("stock", "ours"):
                mm.unload_all_models()
                lc.purge()
                gc.collect()
                for label, tag, strength in EVENTS:
                    collections.reset()
                    t0 = time.perf_counter()
                    m = apply(loader, tag, strength)
                    t_node = time.perf_counter()
                    sample(m)
                    t_end = time.perf_counter()
                    setup = lc.stats()["samplings"][-1].get("setup_ms") if loader == "ours" and tag else None
                    full = collections.full_after(t0)
                    totals[loader][0] += collections.ms
                    totals[loader][1] += len(full)
                    print(f"round {r + 1} {loader:5s} {label:12s} node {(t_node - t0) * 1000:7.1f} ms  "
                          f"event {t_end - t0:6.2f} s  "
                          + (f"setup {setup:6.0f} ms  " if setup is not None else "")
                          + f"gc {collections.ms:6.1f} ms"
                          + "".join(f", full at {a} ms: {d} ms" for a, d in full), flush=True)
    print("; ".join(f"{k}: {v[1]} full collections, {v[0]:.0f} ms of collections over {args.rounds * len(EVENTS)} "
                    f"events" for k, v in totals.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
