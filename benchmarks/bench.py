"""Side-by-side benchmark of the stock LoRA path and the LoRA Cache Loader on real ComfyUI code.

For SDXL- and Flux-shaped models built from ComfyUI's own classes (random weights on the GPU,
fp16 / bf16) and rank-32 LoRA files on every Linear of the transformer blocks, it measures in
one process:

- a sequence of node executions, each followed by a 1-step sample (`comfy.sample.sample`,
  which loads the model through `load_models_gpu` as a queue run does): first apply (cache
  miss), off, re-enable, strength change, switch to a second cached adapter; the node's time
  and the run's time, with ComfyUI's weight work counted and the output compared with stock;
- per-step and per-image (20 steps) time at 1024x1024 for base, off, dynamic, auto, merged;
- the memory the cache holds;
- with --forms, the dynamic forward's candidate forms on the whole diffusion model, eager and
  replayed as a CUDA graph (benchmarks/forms.py).

The stock node is ComfyUI's `LoraLoaderModelOnly` logic (read the file once per node instance,
then `comfy.sd.load_lora_for_models`), called without importing ComfyUI's `nodes` module.

    python3 benchmarks/bench.py --out DIR            # GPU: SDXL and Flux
    python3 benchmarks/bench.py --tiny --out DIR     # CPU smoke: tiny models, few iterations

Writes DIR/results.json; benchmarks/report.py turns it into RESULTS.md and a chart.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lora_cache_testkit import host


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU, few iterations (test smoke)")
    p.add_argument("--models", default="sdxl,flux")
    p.add_argument("--out", default="benchmarks/out")
    p.add_argument("--repeats", type=int, default=5, help="rounds of the toggle sequence for our node")
    p.add_argument("--stock-repeats", default="sdxl=3,flux=1", help="rounds for the stock node, per model")
    p.add_argument("--steps", type=int, default=20, help="steps of one image")
    p.add_argument("--image-rounds", type=int, default=2, help="interleaved rounds of the per-image timing")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--forms", action="store_true", help="also time the dynamic forward's candidate forms")
    p.add_argument("--ours-merged", action="store_true", help="also time an image in our node's merged mode")
    return p.parse_args(argv)


def med(xs):
    return statistics.median(xs) if xs else None


def main(argv=None) -> int:
    args = parse(argv)
    host.boot(cpu=args.tiny)
    import comfy.model_management as mm
    import comfy.sample
    import comfy.sd
    import comfy.utils
    import folder_paths
    import models
    import torch

    from lora_cache_testkit.spies import count_weight_work

    lc = host.load_package().lora_cache
    from lora_cache_loader.lora_cache.store import STORE

    cuda = torch.cuda.is_available() and not args.tiny
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    lora_dir = Path(tempfile.mkdtemp(prefix="lc_bench_"))
    folder_paths.add_model_folder_path("loras", str(lora_dir), is_default=True)
    stock_repeats = dict(kv.split("=") for kv in args.stock_repeats.split(",") if kv)
    comfy_version = host.comfy_version()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    report = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
        "comfyui": comfy_version, "tiny": args.tiny,
        "command": "python3 benchmarks/bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "vram_state": str(mm.vram_state), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "models": {},
    }

    class StockLoader:
        """ComfyUI's LoraLoaderModelOnly.load_lora_model_only: the file is read once per node
        instance and kept while the same file is asked for again."""

        def __init__(self):
            self.loaded = None

        def __call__(self, model, lora_name, strength):
            path = folder_paths.get_full_path_or_raise("loras", lora_name)
            if self.loaded is None or self.loaded[0] != path:
                self.loaded = (path, comfy.utils.load_torch_file(path, safe_load=True))
            return comfy.sd.load_lora_for_models(model, None, self.loaded[1], strength, 0)[0]

    # Queue runs execute under inference mode (ComfyUI's execution.py); so does this.
    with torch.inference_mode():
        for kind in [m.strip() for m in args.models.split(",") if m.strip()]:
            dtype = torch.float32 if args.tiny else (torch.float16 if kind == "sdxl" else torch.bfloat16)
            spec = models.Spec(kind, args.tiny, dtype)
            print(f"== {spec.label} ({dtype})", flush=True)
            t0 = time.perf_counter()
            base = models.build(spec, seed=0)
            sync()
            res: dict = {"label": spec.label, "dtype": str(dtype).replace("torch.", ""),
                         "params": sum(p.numel() for p in base.model.diffusion_model.parameters()),
                         "build_s": time.perf_counter() - t0}
            names = {}
            for tag, seed in (("a", 1), ("b", 2)):
                sd = models.lora_state_dict(spec, base, rank=args.rank, seed=seed)
                names[tag] = f"{kind}_{tag}.safetensors"
                models.write(lora_dir / names[tag], sd)
            res["lora_tensors"] = len(sd)
            res["lora_file_mb"] = (lora_dir / names["a"]).stat().st_size / 2**20
            block_paths = models.block_linears(spec, base.model)
            res["block_linears"] = len(block_paths)
            block_modules = [base.model.get_submodule(p) for p in block_paths]
            cond = spec.conditioning()
            latent = torch.zeros(spec.latent)
            noise = comfy.sample.prepare_noise(latent, 42)
            batch = 2 if spec.cfg > 1 else 1
            res["latent"] = list(spec.latent)
            res["batch"] = batch

            def sample(m, steps=1, callback=None):
                out = comfy.sample.sample(m, noise, steps, spec.cfg, "euler", "simple", cond, cond, latent,
                                          seed=42, callback=callback, disable_pbar=True)
                sync()
                return out.float()

            sample(base)  # load once, warm kernels (untimed)

            # ---- toggle sequences: stock, then ours, each starting from the loaded base model
            initial = [("first apply", "a", 1.0), ("first apply (2nd adapter)", "b", 1.0)]
            cycle = [("off", None, 0.0), ("re-enable", "a", 1.0), ("strength change", "a", 0.6), ("switch", "b", 1.0)]

            def sequence(n_rounds, stock=False):
                # Stock keeps no adapter between executions: its second "first apply" is a switch.
                return (initial[:1] if stock else initial) + cycle * n_rounds

            refs: dict = {}

            def run_seq(label, apply_fn, n_rounds):
                rows = []
                sample(base)  # base weights loaded before the first measured run
                for op, tag, strength in sequence(n_rounds, stock=label == "stock"):
                    with count_weight_work() as counts:
                        sync()
                        t0 = time.perf_counter()
                        m, info = apply_fn(tag, strength)
                        t1 = time.perf_counter()
                        out = sample(m)
                        t2 = time.perf_counter()
                    state = (tag, strength) if tag else None
                    row = {"op": op, "state": f"{tag}@{strength:g}" if tag else "off",
                           "node_ms": (t1 - t0) * 1000.0, "run_s": t2 - t0, "weight_work": dict(counts), **info}
                    if label == "stock":
                        refs.setdefault(state, out)
                    elif state in refs:
                        ref = refs[state]
                        row["max_abs_diff_vs_stock"] = float((out - ref).abs().max())
                        row["rel_err_vs_stock"] = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
                        row["bit_equal_stock"] = bool(torch.equal(out, ref))
                        row["finite"] = bool(torch.isfinite(out).all())
                    rows.append(row)
                    print(f"  {label:5s} {op:28s} node {row['node_ms']:9.3f} ms  run {row['run_s']:7.3f} s "
                          f"{info.get('path', '')} {dict(counts)}", flush=True)
                return rows

            stock = StockLoader()
            res["stock"] = run_seq("stock", lambda tag, s: ((stock(base, names[tag], s) if tag else base), {}),
                                   int(stock_repeats.get(kind, 1)))
            del stock
            gc.collect()

            lc.purge()
            mem0 = torch.cuda.memory_allocated() if cuda else 0

            def ours(tag, s, mode="auto"):
                if tag is None:
                    m, _, ev = lc.apply(base, None, names["a"], 1.0, 0.0, False, mode)
                else:
                    m, _, ev = lc.apply(base, None, names[tag], s, 0.0, True, mode)
                return m, {"path": ev.path, "reason": ev.reason, "event_ms": ev.ms}

            res["ours"] = run_seq("ours", ours, args.repeats)
            # Merged mode through the node: the cached factors merged in place at each sampling
            # and restored after it (lora_cache/merge.py via the sampling scope), no reload.
            res["ours_merged"] = run_seq("ours-merged", lambda tag, s: ours(tag, s, "merged"), args.repeats)
            res["cache"] = {
                "gpu_bytes_allocated_delta": (torch.cuda.memory_allocated() - mem0) if cuda else None,
                "factor_bytes": sum(e.nbytes for e in STORE.entries()),
                "pinned_host_bytes": 0,
                "entries": [{"lora": e.lora, "layers": len(e.layers), "bytes": e.nbytes, "device": e.device,
                             "factors": sum(len(f) for f in e.layers.values())} for e in STORE.entries()],
            }

            # ---- per step and per image
            def timed_image(m, steps):
                stamps = []
                seen = {}

                def cb(step, x0, x, total):
                    if step == 0:
                        seen["wrappers"] = sum(1 for mod in block_modules if "forward" in mod.__dict__)
                    sync()
                    stamps.append(time.perf_counter())

                sync()
                t0 = time.perf_counter()
                out = sample(m, steps, cb)
                t1 = time.perf_counter()
                diffs = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
                return {"image_s": t1 - t0, "step_ms": (med(diffs) or 0.0) * 1000.0,
                        "step_ms_all": [d * 1000.0 for d in diffs], "wrappers_in_call_path": seen.get("wrappers"),
                        "finite": bool(torch.isfinite(out).all())}

            steps = args.steps
            per: dict = {}
            # auto keys its measurements on (adapter set, latent, steps): a warm-up sampling and one
            # of each form come first (untimed here), then it serves the faster form.
            lc.events.clear()  # this model's samplings only
            m_auto, _ = ours("a", 1.0, "auto")
            for _ in range(3):
                sample(m_auto, steps)
            # Eager SDXL is bound by the host launching kernels, whose speed drifts: the modes
            # that need no reload are timed in interleaved rounds and the medians kept.
            for _ in range(args.image_rounds):
                for mode in ("base", "off", "dynamic", "auto"):
                    info = {}
                    if mode == "base":
                        m = base
                    elif mode == "off":
                        m, _ = ours(None, 0.0)
                        info["same_patcher_as_base"] = m is base
                    else:
                        m, info = ours("a", 1.0, mode)
                    sample(m)
                    r = timed_image(m, steps)
                    agg = per.setdefault(mode, {"image_s_rounds": [], "step_ms_all": [], **info})
                    agg["image_s_rounds"].append(r["image_s"])
                    agg["step_ms_all"] += r["step_ms_all"]
                    agg["wrappers_in_call_path"] = r["wrappers_in_call_path"]
                    agg["finite"] = r["finite"] and agg.get("finite", True)
            for agg in per.values():
                agg["image_s"] = med(agg["image_s_rounds"])
                agg["step_ms"] = med(agg["step_ms_all"])
            # Merged from the cached factors in place on the GPU (lora_cache.merge), no reload:
            # the cost a merged mode built on the cache pays per toggle, and its image time.
            from lora_cache_loader.lora_cache import merge as lc_merge
            entry_a = next(e for e in STORE.entries() if e.lora == names["a"])
            sample(base)
            mg = lc_merge.Merged([(mod, fs, 1.0) for _, mod, fs in entry_a.modules()])
            t_m = mg.merge()
            r = timed_image(base, steps)
            t_r = mg.restore()
            r.update({"merge_ms": t_m, "restore_ms": t_r, "backup_where": mg.where})
            r["image_with_toggle_s"] = r["image_s"] + (t_m + t_r) / 1000.0
            per["merged (cache, in place)"] = r
            stock = StockLoader()
            m_merged = stock(base, names["a"], 1.0)
            sample(m_merged)  # ComfyUI reloads and merges here (untimed: the toggle rows time it)
            per["merged"] = timed_image(m_merged, steps)
            if args.ours_merged:
                m, info = ours("a", 1.0, "merged")
                sample(m)
                per["merged (ours, mode merged)"] = timed_image(m, steps)
                per["merged (ours, mode merged)"].update(info)
            sample(base)
            res["per_step"] = per
            res["auto_samplings"] = [dict(x) for x in lc.stats()["samplings"]]
            res["auto_costs"] = lc.stats()["auto_costs"]
            print("  per step ms: " + ", ".join(f"{k} {v['step_ms']:.2f}" for k, v in per.items()), flush=True)

            if args.forms:
                import forms
                sample(base)  # base weights in place, nothing merged
                entry = STORE.get(base.model, str((lora_dir / names["a"]).resolve()))
                if entry is None:
                    entry = next(e for e in STORE.entries() if e.lora == names["a"])
                res["forms"] = forms.run(spec, base, entry, tiny=args.tiny)

            res["total_s"] = time.perf_counter() - t0
            report["models"][kind] = res
            lc.purge()
            mm.unload_all_models()
            base = block_modules = None  # the model's memory goes before the next model is built
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            (out_dir / "results.json").write_text(json.dumps(report, indent=1))

    (out_dir / "results.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
