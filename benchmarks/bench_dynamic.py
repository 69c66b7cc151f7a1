"""The 8-event series on current ComfyUI: stock LoraLoaderModelOnly, ComfyUI's
LoraLoaderBypassModelOnly and the LoRA Cache Loader side by side in one process, in interleaved
rounds, under dynamic VRAM (ModelPatcherDynamic with comfy-aimdo, ComfyUI's default on NVIDIA)
and under its classic patcher, with the behaviour checks of the GPU check.

Events (each: the node call, then a full sampling of `--steps` steps at 1024x1024): LoRA on, off,
on, off, on, strength 0.6, the other LoRA, back to the first. A round is a plain base image, then
each loader's series (the cache purged and the model unloaded before each). The machine is shared
and noisy, so single series prove nothing: the report takes medians over rounds, and the ceiling,
7 x the median base image (a LoRA that costs nothing per step and nothing per change).

Per event: node ms, event seconds, the modules and bytes ComfyUI streamed to the device while
sampling (its gathered casts), whether `patches_uuid` changed, and for ours the sampling's
merged-copy choice (layers, bytes, how many built and in how long), torch's device memory after the
node call, and the blocks its allocator keeps cached after the node call, at the first model call
(after our setup) and after the sampling, with the part in segments that also hold live tensors
(which empty_cache cannot give back): comfy-aimdo cannot place weights in them. Then, for ours, 100 more
events (toggles, strengths, switches; 1 step each) with the device memory after each.

Checks (a failed check makes the exit status 1, the numbers are written either way):
- under dynamic VRAM our events 2-8 keep `patches_uuid` and stream no more than a repeat of the
  base image does (stock streams the whole model again at each change);
- a re-enable of the same adapter set builds no copy (the copies of its first run serve);
- every output is within the spread of ComfyUI's bypass loader around stock;
- device memory stays flat over the 100 events.

    python3 benchmarks/bench_dynamic.py --model sdxl --configs dynamic --rounds 3 --out DIR
    python3 benchmarks/bench_dynamic.py --tiny --model sdxl --configs classic --rounds 2 --out DIR  # CPU smoke

With `--sweep 0,0.5,0.8,1`, a round is instead a base image and a base batch of that size (the
sweep's ceiling), then one LoRA at each of those
strengths as separate queue runs with stock and with ours, then the LoRA Cache Sweep with the
same strengths as one sampling of a latent batch (image i at strength i); each run of stock and
ours gets the noise of batch position i, so image i of the sweep is checked against stock's run i.

    python3 benchmarks/bench_dynamic.py --model sdxl --configs dynamic --rounds 3 --sweep 0,0.5,0.8,1 --out DIR

`dynamic@14` leaves about 14 GiB of the card free before the model loads (the rest is taken by a
filler allocation), so a large model streams part of its weights every step.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import re
import statistics
import sys
import time
from pathlib import Path

from lora_cache_testkit import aimdo as aimdo_kit
from lora_cache_testkit import host
from lora_cache_testkit.scratch import scratch_dir

EVENTS = [("on", "a", 1.0), ("off", None, 0.0), ("on", "a", 1.0), ("off", None, 0.0), ("on", "a", 1.0),
          ("strength 0.6", "a", 0.6), ("other LoRA", "b", 1.0), ("back", "a", 0.6)]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sdxl", choices=("sdxl", "flux"))
    p.add_argument("--configs", default="dynamic")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--loaders", default="stock,bypass,ours",
                   help="comma list of stock, bypass, ours, ours-unmerged (ours with mode unmerged: no copies)")
    p.add_argument("--soak", type=int, default=100, help="extra events of ours for the memory check")
    p.add_argument("--adapter", default="lora", choices=("lora", "loha", "lokr"),
                   help="the adapter type of both files (LoHa and LoKr as benchmarks/models.py draws them)")
    p.add_argument("--rank", type=int, default=None, help="rank of the factors (default 32 for lora, 8 otherwise)")
    p.add_argument("--tiny", action="store_true", help="tiny model on the CPU (classic only): a smoke run")
    p.add_argument("--sweep", default=None, metavar="STRENGTHS",
                   help="the sweep rounds instead of the 8-event series: these strengths as separate runs "
                        "(stock, ours) and as one LoRA Cache Sweep")
    p.add_argument("--profile", default="", metavar="EVENTS",
                   help="events of ours to profile in the last round, numbers 1-8 comma-separated (e.g. '5,6': "
                        "the last 'on' and the strength change): cProfile over the node call, torch.profiler "
                        "over step 1 (ComfyUI's load and our setup with it) and over step 2, tables and the "
                        "step-1 trace written beside the report")
    p.add_argument("--disable-cuda-malloc", action="store_true",
                   help="torch's native CUDA allocator, as ComfyUI's flag of that name (by default ComfyUI's "
                        "main.py picks cudaMallocAsync on NVIDIA with a CUDA build of torch, and so does this)")
    p.add_argument("--out", default="benchmarks/out")
    return p.parse_args(argv)


class StepProfile:
    """torch.profiler over a sampling's step 1 (from the sampling's start: ComfyUI's load and our
    setup are in it) and over its step 2, each ended by a device sync; what the GPU and the host
    spent there written to `<stem>.txt`, the step-1 trace to `<stem>-step1.json.gz`."""

    def __init__(self, stem: Path, sync):
        self.stem, self.sync, self.part, self.prof, self.text = stem, sync, 0, None, []

    def _new(self):
        import torch
        acts = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        p = torch.profiler.profile(activities=acts)
        p.start()
        return p, time.perf_counter()

    def begin(self) -> None:
        self.part = 1
        self.prof = self._new()

    def step_end(self) -> None:
        if self.prof is None:
            return
        self.sync()
        p, t0 = self.prof
        wall = time.perf_counter() - t0
        p.stop()
        self.text.append(_profile_tables(p, f"step {self.part}", wall))
        if self.part == 1:
            import gzip
            import os
            trace = self.stem.with_name(self.stem.name + "-step1.json")
            p.export_chrome_trace(str(trace))
            with open(trace, "rb") as f, gzip.open(str(trace) + ".gz", "wb") as g:
                g.write(f.read())
            os.remove(trace)
        self.prof = None
        if self.part == 1:
            self.part = 2
            self.prof = self._new()
        else:
            self.stem.with_suffix(".txt").write_text("\n\n".join(self.text))


def _union(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _overlap(xs: list[tuple[int, int]], ys: list[tuple[int, int]]) -> int:
    """Length of the intersection of two unions of spans."""
    i = j = total = 0
    while i < len(xs) and j < len(ys):
        lo, hi = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        total += max(0, hi - lo)
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


def stream_summary(spans: list[tuple[int, int, int, bool]]) -> str:
    """What a profiled step's device streams did: `spans` are (stream, start ns, end ns, is a
    host-to-device copy). The compute stream is the one with the most other work; the time it
    sat idle while a weight was copying in is time that work queued before the layer's wait for
    its weight would not add to the step."""
    if not spans:
        return "-- streams: no device activity recorded"
    busy: dict[int, list[tuple[int, int]]] = {}
    for stream, a, b, copy in spans:
        if not copy:
            busy.setdefault(stream, []).append((a, b))
    copies = _union([(a, b) for _, a, b, copy in spans if copy])
    first, last = min(a for _, a, _, _ in spans), max(b for _, _, b, _ in spans)
    ms = 1e6
    if not busy:
        return f"-- streams: copies only, {sum(b - a for a, b in copies) / ms:.1f} ms"
    worked_by = {k: _union(v) for k, v in busy.items()}
    stream = max(worked_by, key=lambda k: sum(b - a for a, b in worked_by[k]))
    compute = worked_by[stream]
    worked = sum(b - a for a, b in compute)
    copying = sum(b - a for a, b in copies)
    idle_copying = copying - _overlap(copies, compute)
    return (f"-- streams: compute stream {stream} busy {worked / ms:.1f} ms of {(last - first) / ms:.1f} ms "
            f"(idle {(last - first - worked) / ms:.1f} ms); host-to-device copies {copying / ms:.1f} ms, "
            f"{idle_copying / ms:.1f} ms of them while the compute stream sat idle")


def _device_spans(p) -> list[tuple[int, int, int, bool]]:
    import torch
    try:
        events = p.profiler.kineto_results.events()
    except AttributeError:  # another torch's profiler
        return []
    return [(e.device_resource_id(), e.start_ns(), e.end_ns(), e.name().startswith("Memcpy HtoD"))
            for e in events if e.device_type() == torch.autograd.DeviceType.CUDA]


def _profile_tables(p, title: str, wall: float) -> str:
    avg = p.key_averages()
    dev = "self_device_time_total"
    try:
        by_dev = avg.table(sort_by=dev, row_limit=30)
    except Exception:
        dev = "self_cuda_time_total"
        by_dev = avg.table(sort_by=dev, row_limit=30)
    kernels = sum(getattr(e, dev, 0) for e in avg if getattr(e, "device_type", None) is not None
                  and str(e.device_type).endswith("CUDA"))
    return (f"== {title}: {wall * 1000:.1f} ms wall, {kernels / 1000:.1f} ms on the device (self, all ops)\n"
            f"{stream_summary(_device_spans(p))}\n"
            f"-- by self device time\n{by_dev}\n-- by self CPU time\n"
            f"{avg.table(sort_by='self_cpu_time_total', row_limit=40)}")


def main(argv=None) -> int:
    args = parse(argv)
    rank = args.rank or (32 if args.adapter == "lora" else 8)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    want_aimdo = not args.tiny and any(c.startswith("dynamic") for c in configs)
    # as ComfyUI's main.py: the allocator chosen (host.boot), then comfy-aimdo hooked, both
    # before torch touches the GPU
    host.boot(cpu=args.tiny, extra_args={"disable_cuda_malloc": True} if args.disable_cuda_malloc else None)
    if want_aimdo:
        aimdo_kit.hook()

    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sample
    import comfy.sd
    import comfy.utils
    import folder_paths
    import models  # benchmarks/models.py, beside this script
    import torch
    from gc_watch import GcWatch
    from report_dynamic import summarize
    from safetensors.torch import save_file

    lc = host.load_package().lora_cache
    cuda = not args.tiny
    aimdo = want_aimdo and aimdo_kit.devices()

    out_dir = Path(args.out)
    result_name = (("sweep-" if args.sweep else "dynamic-") + args.model
                   + ("" if args.adapter == "lora" else f"-{args.adapter}") + ".json")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = scratch_dir("lc_dyn_")
    folder_paths.add_model_folder_path("loras", str(work), is_default=True)
    from comfyui_version import __version__ as comfy_version

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def set_patcher(kind: str) -> None:
        aimdo_kit.use_dynamic(kind == "dynamic")

    # Weights ComfyUI moves to the device while casting (dynamic VRAM streams each module's
    # weight and bias in one cast_to_gathered call); counted by wrapping it, for this benchmark.
    streamed = {"bytes": 0, "modules": 0}
    gathered = getattr(mm, "cast_to_gathered", None)
    if gathered is not None:
        def counting(tensors, *a, **kw):
            streamed["modules"] += 1
            for t in tensors if isinstance(tensors, (list, tuple)) else [tensors]:
                if isinstance(t, torch.Tensor):
                    streamed["bytes"] += t.numel() * t.element_size()
            return gathered(tensors, *a, **kw)
        mm.cast_to_gathered = counting

    dtype = torch.float32 if args.tiny else (torch.float16 if args.model == "sdxl" else torch.bfloat16)
    spec = models.Spec(args.model, args.tiny, dtype)
    loaders = [x.strip() for x in args.loaders.split(",") if x.strip()]
    if not hasattr(comfy.sd, "load_bypass_lora_for_models") and "bypass" in loaders:
        loaders.remove("bypass")
        print("this ComfyUI has no bypass loader: its series is left out", flush=True)
    report = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
              **host.allocator_report(),
              "comfyui": comfy_version, "aimdo": aimdo, "model": spec.label, "dtype": str(dtype),
              "adapter": args.adapter, "rank": rank, "rounds": args.rounds, "loaders": loaders,
              "steps": args.steps, "events": [e[0] for e in EVENTS], "configs": {}, "checks": [],
              "command": "python3 benchmarks/bench_dynamic.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    try:
        import comfy_aimdo
        # The version of the module imported (its _version.py), not of whichever distribution's
        # metadata is found first on the path.
        report["aimdo_version"] = getattr(importlib.import_module("comfy_aimdo._version"), "__version__", None)
        report["aimdo_file"] = comfy_aimdo.__file__
    except Exception:
        report["aimdo_version"] = None
    print(f"{report['device']}, torch {report['torch']} (allocator {report['allocator']}), ComfyUI {comfy_version}, "
          f"comfy-aimdo {report['aimdo_version'] if aimdo else 'not active'}", flush=True)

    # The model goes through a file: under dynamic VRAM ComfyUI streams weights from the file it
    # loaded, so the model must come through its loader.
    set_patcher("classic")
    t0 = time.perf_counter()
    model_path = work / f"{args.model}.safetensors"
    names = {tag: f"{args.model}_{tag}.safetensors" for tag in "ab"}
    if args.tiny:
        # ComfyUI's model detection needs real SDXL / Flux sizes; the smoke run takes the tiny
        # SD2-type UNet that it does recognise.
        from lora_cache_testkit import tiny_models
        unet_sd = tiny_models.sd_unet_state_dict(seed=0)
        save_file(unet_sd, str(model_path))
        for tag, seed in (("a", 1), ("b", 2)):
            sd = (tiny_models.sd_lora_state_dict(unet_sd, seed=seed) if args.adapter == "lora" else
                  tiny_models.adapter_state_dict(args.adapter, tiny_models.sd_targets(unet_sd), seed=seed))
            tiny_models.write_lora(work / names[tag], sd)
        cond = [[torch.randn(1, 8, 1024, generator=torch.Generator().manual_seed(5)), {}]]
        latent, cfg = torch.zeros(1, 4, 8, 8), 1.5
    else:
        with torch.inference_mode():
            built = models.build(spec, seed=0)
            for tag, seed in (("a", 1), ("b", 2)):
                models.write(work / names[tag], models.adapter_state_dict(spec, built, args.adapter, rank, seed=seed))
            sd = {k: v.detach().to("cpu", copy=True) for k, v in built.model.diffusion_model.state_dict().items()}
        save_file(sd, str(model_path))
        del built, sd
        cond, latent, cfg = spec.conditioning(), torch.zeros(spec.latent), spec.cfg
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    report["build_s"] = time.perf_counter() - t0
    print(f"model and LoRA files written in {report['build_s']:.1f} s", flush=True)

    noise = comfy.sample.prepare_noise(latent, 42)
    lora_sd = {tag: comfy.utils.load_torch_file(str(work / n), safe_load=True) for tag, n in names.items()}

    # When each step of the last sampling ended (host clock, after the sampling's start): the first
    # step carries what a sampling does before its first model call (loading, our activation).
    step_ends: list[float] = []

    # Host times in the last sampling, after its start: ComfyUI's ON_PRE_RUN (after its load for
    # the sampling; ours runs at that point too), and the first model call's start and end.
    marks: dict = {}
    # torch's cached blocks and the part of them in split segments at the first model call (after
    # our setup, before the sampling's own work): what the node call and the setup left there
    cache_at_call: dict = {}
    from comfy.patcher_extension import CallbacksMP, WrappersMP

    def torch_cache() -> tuple[int, int]:
        if not cuda:
            return 0, 0
        return (torch.cuda.memory_reserved() - torch.cuda.memory_allocated(),
                torch.cuda.memory_stats().get("inactive_split_bytes.all.current", 0))

    def mark(m) -> None:
        def pre_run(patcher):
            marks.setdefault("pre_run", time.perf_counter() - marks["t0"])

        def model_call(executor, *a, **kw):
            if "call_start" not in marks:
                cache_at_call["cached"], cache_at_call["split"] = torch_cache()
            marks.setdefault("call_start", time.perf_counter() - marks["t0"])
            out = executor(*a, **kw)
            marks.setdefault("call_end", time.perf_counter() - marks["t0"])
            return out
        m.remove_callbacks_with_key(CallbacksMP.ON_PRE_RUN, "bench")
        m.add_callback_with_key(CallbacksMP.ON_PRE_RUN, "bench", pre_run)
        m.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, "bench")
        m.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "bench", model_call)

    # Python's garbage collections in each event (the node call and the sampling)
    collections = GcWatch()

    def sample(m, steps, noise=noise, latent=latent, profile: str | None = None):
        prof = StepProfile(out_dir / f"profile-{re.sub(r'[^A-Za-z0-9]+', '-', profile)}", sync) if profile else None
        mark(m)
        marks.clear()
        cache_at_call.clear()
        t0 = marks["t0"] = time.perf_counter()
        step_ends.clear()

        def step_end(*a):
            step_ends.append(time.perf_counter() - t0)
            if prof is not None:
                prof.step_end()
        if prof is not None:
            prof.begin()
        out = comfy.sample.sample(m, noise, steps, cfg, "euler", "simple", cond, cond, latent, seed=42,
                                  disable_pbar=True, callback=step_end)
        sync()
        return out.float().cpu()

    def loader_fn(loader, base):
        if loader in ("stock", "bypass"):
            load = comfy.sd.load_lora_for_models if loader == "stock" else comfy.sd.load_bypass_lora_for_models
            return lambda tag, s: base if tag is None else load(base, None, lora_sd[tag], s, 0)[0]
        mode = "unmerged" if loader == "ours-unmerged" else "auto"

        def ours(tag, s):
            if tag is None:
                return lc.apply(base, None, names["a"], 1.0, 0.0, False, mode, node_id="bench")[0]
            m, _, ev = lc.apply(base, None, names[tag], s, 0.0, True, mode, node_id="bench")
            ours.last = ev
            return m
        ours.last = None
        return ours

    base_outs: list = []  # the base images of the series rounds, for the "off" check

    def base_image(base, *batch) -> dict:
        streamed.update(bytes=0, modules=0)
        t = time.perf_counter()
        out = sample(base, args.steps, *batch)
        if not batch:
            base_outs.append(out)
        first = step_ends[0] if step_ends else 0.0
        return {"s": time.perf_counter() - t, **streamed, "first_step_s": first,
                "later_steps_s": (step_ends[-1] - first) if step_ends else 0.0}

    def profiled_call(name: str, fn, *args):
        """fn(*args) under cProfile: the node call's Python time by function, written beside the
        event's step profile (`profile-<name>-node.txt`)."""
        import cProfile
        import io
        import pstats
        pr = cProfile.Profile()
        pr.enable()
        try:
            return fn(*args)
        finally:
            pr.disable()
            sync()
            text = io.StringIO()
            pstats.Stats(pr, stream=text).sort_stats("cumulative").print_stats(40)
            stem = re.sub(r'[^A-Za-z0-9]+', '-', name)
            (out_dir / f"profile-{stem}-node.txt").write_text(text.getvalue())

    def series(loader, base, outs, last_round: bool = False) -> list[dict]:
        mm.unload_all_models()
        lc.purge()
        gc.collect()
        apply = loader_fn(loader, base)
        base_uuid = base.patches_uuid
        rows = []
        for label, tag, strength in EVENTS:
            streamed.update(bytes=0, modules=0)
            moves = dict(lc.stats()["memory"]["counters"])
            sync()
            collections.reset()
            name = f"{loader}-{len(rows) + 1}-{label}" if (
                last_round and loader.startswith("ours") and len(rows) + 1 in profiled) else None
            t = time.perf_counter()
            m = apply(tag, strength) if name is None else profiled_call(name, apply, tag, strength)
            t_node = time.perf_counter()
            held = torch.cuda.memory_allocated() if cuda else 0
            cached_at_node, split_at_node = torch_cache()
            out = sample(m, args.steps, profile=name)
            t_end = time.perf_counter()
            first = step_ends[0] if step_ends else 0.0
            row = {"event": label, "node_ms": (t_node - t) * 1000.0, "event_s": t_end - t, "first_step_s": first,
                   "later_steps_s": (step_ends[-1] - first) if step_ends else 0.0,
                   "streamed_bytes": streamed["bytes"], "streamed_modules": streamed["modules"],
                   "uuid_kept": m.patches_uuid == base_uuid,
                   # torch's tensors after the node call, and the blocks torch keeps beyond its
                   # tensors after the sampling: memory comfy-aimdo cannot hold weights in
                   "allocated_at_node": held,
                   "step1_marks_ms": {k: round(v * 1000, 1) for k, v in marks.items() if k != "t0"},
                   # Python's collections in the event: total ms, and each full one (ms after the
                   # sampling's start, negative: in the node call; ms it took)
                   "gc_ms": round(collections.ms, 1), "gc_full": collections.full_after(marks["t0"]),
                   # torch's cached blocks, and of those the free parts of segments that also hold
                   # live tensors (torch.cuda.empty_cache cannot give them back), after the node
                   # call, at the first model call and after the sampling
                   "torch_cache_at_node": cached_at_node, "torch_split_at_node": split_at_node,
                   "torch_cache_at_call": cache_at_call.get("cached", 0),
                   "torch_split_at_call": cache_at_call.get("split", 0)}
            row["torch_cache_after"], row["torch_split_after"] = torch_cache()
            if loader.startswith("ours"):
                now = lc.stats()["memory"]["counters"]
                row["factors_moved"] = {k: now.get(k, 0) - moves.get(k, 0) for k in ("moved_to_cpu", "moved_back")}
            if loader.startswith("ours") and tag is not None:
                row.update(path=apply.last.path, reason=apply.last.reason)
                s = lc.stats()["samplings"][-1]
                row.update(copies=s["copies"], layers=s["layers"], copy_bytes=s["bytes"], built=s["built"],
                           build_ms=s["build_ms"], setup_ms=s.get("setup_ms"), sampling=s["reason"])
            rows.append(row)
            outs.setdefault(loader, {})[(tag, strength)] = out
            print(f"  {loader:13s} {label:13s} node {row['node_ms']:8.2f} ms  event {row['event_s']:7.3f} s  "
                  f"(step 1 {first:6.3f} s, later {row['later_steps_s']:6.3f} s"
                  + (f", ours' setup {row['setup_ms']:.0f} ms" if row.get("setup_ms") is not None else "")
                  + ("".join(f", {k.replace('_', ' ')} {v}" for k, v in row.get("factors_moved", {}).items() if v))
                  + f", torch: {held / 2**20:.0f} MiB at the node, cached (split) MiB: "
                  + ", ".join(f"{where} {row['torch_cache_' + k] / 2**20:.0f} ({row['torch_split_' + k] / 2**20:.0f})"
                              for where, k in (("node", "at_node"), ("call 1", "at_call"), ("after", "after")))
                  + "; step 1 ms: "
                  + " ".join(f"{k} {v:.0f}" for k, v in row["step1_marks_ms"].items())
                  + f"; gc {row['gc_ms']:.0f} ms" + "".join(f", full at {a} ms: {d} ms" for a, d in row["gc_full"])
                  + ")  "
                  f"streamed {streamed['modules']:5d} modules {streamed['bytes'] / 2**20:9.1f} MiB  "
                  f"{row.get('sampling', '')}", flush=True)
        return rows

    profiled = {int(x) for x in args.profile.split(",") if x.strip()}
    failed = []

    def check(name: str, ok: bool, detail: str) -> None:
        report["checks"].append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"  check {'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
        if not ok:
            failed.append(name)

    def sweep_rounds(base, res: dict, config: str) -> None:
        """The --sweep rounds: a base image and a base batch, the strengths as separate runs of stock and of ours
        (run i with the noise of batch position i), then the sweep as one batched sampling."""
        sweep_service = importlib.import_module(lc.__name__ + ".sweep_service")
        strengths = [float(x) for x in args.sweep.split(",") if x.strip()]
        n = len(strengths)
        latent_n = torch.zeros((n, *latent.shape[1:]), dtype=latent.dtype)
        noise_n = comfy.sample.prepare_noise(latent_n, 42)
        outs: dict[str, list] = {}
        res["strengths"] = strengths

        def fresh():
            mm.unload_all_models()
            lc.purge()
            gc.collect()

        def runs(loader: str) -> dict:
            fresh()
            rows = []
            outs[loader] = []  # the last round's images are compared
            for i, s in enumerate(strengths):
                sync()
                t = time.perf_counter()
                if loader == "stock":
                    m = comfy.sd.load_lora_for_models(base, None, lora_sd["a"], s, 0)[0]
                else:
                    m = lc.apply(base, None, names["a"], s, 0.0, True, "auto", node_id="bench")[0]
                t_node = time.perf_counter()
                outs[loader].append(sample(m, args.steps, noise_n[i:i + 1], latent))
                rows.append({"strength": s, "node_ms": (t_node - t) * 1000.0, "run_s": time.perf_counter() - t})
            total = sum(r["run_s"] for r in rows)
            print(f"  {loader:6s} {n} runs {total:7.3f} s: " + ", ".join(f"{r['run_s']:.2f}" for r in rows), flush=True)
            return {"s": total, "runs": rows}

        def batched() -> dict:
            fresh()
            sync()
            t = time.perf_counter()
            r = sweep_service.apply_sweep(base, None, [names["a"]], args.sweep, node_id="bench-sweep")
            t_node = time.perf_counter()
            outs["sweep"] = list(sample(r.model, args.steps, noise_n, latent_n).split(1))
            total = time.perf_counter() - t
            s = lc.stats()["samplings"][-1]
            print(f"  sweep  batch of {r.batch_size} {total:7.3f} s (node {(t_node - t) * 1000:.2f} ms): "
                  f"{s['reason']}", flush=True)
            return {"s": total, "node_ms": (t_node - t) * 1000.0, "batch": r.batch_size, "labels": r.labels,
                    "sampling": s["reason"]}

        for r in range(args.rounds):
            print(f" round {r + 1}", flush=True)
            rnd = {"base": base_image(base), "base_batch": base_image(base, noise_n, latent_n),
                   "stock": runs("stock"), "ours": runs("ours"), "sweep": batched()}
            res["rounds"].append(rnd)
            report["configs"][config] = res
            (out_dir / result_name).write_text(json.dumps(report, indent=1))
        med = {k: statistics.median(rnd[k]["s"] for rnd in res["rounds"])
               for k in ("base", "base_batch", "stock", "ours", "sweep")}
        summary = res["summary"] = {**{f"{k}_s": v for k, v in med.items()},
                                    "stock_over_sweep": med["stock"] / med["sweep"],
                                    "ours_over_sweep": med["ours"] / med["sweep"],
                                    "sweep_over_base_batch": med["sweep"] / med["base_batch"]}
        print(f"  medians over {args.rounds} rounds: base image {med['base']:.2f} s, a base batch of {n} "
              f"{med['base_batch']:.2f} s; {n} runs stock "
              f"{med['stock']:.2f} s, ours {med['ours']:.2f} s; sweep {med['sweep']:.2f} s: "
              f"{summary['stock_over_sweep']:.2f}x faster than "
              f"stock's runs, {summary['ours_over_sweep']:.2f}x than ours", flush=True)
        diff = {k: max(float((a - b).abs().max()) for a, b in zip(outs[k], outs["stock"], strict=True))
                for k in ("ours", "sweep")}
        res["parity"] = {"max_abs_ours_vs_stock": diff["ours"], "max_abs_sweep_vs_stock": diff["sweep"]}
        if config.startswith("dynamic"):
            texts = [rnd["sweep"]["sampling"] for rnd in res["rounds"]]
            counts = [re.search(r"copies of the base weight.*?built (\d+) in [\d.]+ ms(?:, (\d+) read from the "
                                r"model file)?", t) for t in texts]
            check(f"{config}: every base copy of the sweep read from the model file",
                  all(c is not None and c.group(1) == c.group(2) for c in counts),
                  "; ".join(t.rpartition("copies of the base weight")[2] for t in texts))
        check(f"{config}: sweep image i within the rounding of stock's run i",
              diff["sweep"] <= max(2 * diff["ours"], 1e-3),
              f"sweep {diff['sweep']:.4g}, ours' runs {diff['ours']:.4g} (max |latent - stock|)")

    def series_rounds(base, res: dict, config: str) -> None:
        """The 8-event series rounds, their summary, parity and checks, then the memory soak."""
        kind = config.partition("@")[0]
        outs: dict[str, dict] = {}
        for r in range(args.rounds):
            print(f" round {r + 1}", flush=True)
            rnd = {"base": base_image(base), "loaders": {}}
            b = rnd["base"]
            print(f"  base image{'':27s}event {b['s']:7.3f} s  (step 1 {b['first_step_s']:6.3f} s, later "
                  f"{b['later_steps_s']:6.3f} s)  streamed {b['modules']:5d} modules {b['bytes'] / 2**20:9.1f} MiB",
                  flush=True)
            for loader in loaders:
                rnd["loaders"][loader] = series(loader, base, outs, last_round=r == args.rounds - 1)
            res["rounds"].append(rnd)
            report["configs"][config] = res  # written after every round: a run stopped at its limit keeps it
            (out_dir / result_name).write_text(json.dumps(report, indent=1))
        summary = res["summary"] = summarize(res, loaders, len(EVENTS))
        base_med = summary["base_image_s"]
        print(f"  medians over {args.rounds} rounds, events 2-8: ceiling {7 * base_med:.2f} s; " + "; ".join(
            f"{ld} {summary[ld]['median_s']:.2f} s ({summary[ld]['over_ceiling']:.3f} x ceiling"
            + (f", {summary[ld]['vs_stock']:.2f}x stock" if "vs_stock" in summary[ld] else "") + ")"
            for ld in loaders), flush=True)
        # parity: ours and bypass around stock, per state
        spread, ours_diff = 0.0, 0.0
        for state, ref in outs.get("stock", {}).items():
            if state[0] is None:
                continue
            if "bypass" in outs:
                spread = max(spread, float((outs["bypass"][state] - ref).abs().max()))
            for loader in ("ours", "ours-unmerged"):
                if loader in outs:
                    ours_diff = max(ours_diff, float((outs[loader][state] - ref).abs().max()))
        if "stock" in outs:
            res["parity"] = {"max_abs_ours_vs_stock": ours_diff, "max_abs_bypass_vs_stock": spread}
        if "bypass" in outs and "stock" in outs:
            check(f"{config}: outputs within the bypass loader's spread", ours_diff <= max(1.5 * spread, 1e-3),
                  f"ours {ours_diff:.4g} vs bypass {spread:.4g} (max |latent - stock|)")
        if "ours" in loaders and base_outs:
            # ours with the adapter off runs ComfyUI's forward on ComfyUI's own weights: the base
            # image again, however the adapter-on samplings before it computed their updates
            off = float((outs["ours"][(None, 0.0)] - base_outs[-1]).abs().max())
            res.setdefault("parity", {})["max_abs_ours_off_vs_base"] = off
            check(f"{config}: ours with the adapter off is the base image", off <= 1e-3,
                  f"max |latent - base image| {off:.3g} (last round)")
        if "ours" in loaders:
            ours_rows = [rnd["loaders"]["ours"] for rnd in res["rounds"]]
            reenable = [rws[2]["built"] for rws in ours_rows]
            first = [rws[0]["built"] for rws in ours_rows]
            check(f"{config}: a re-enable builds no copy", all(b == 0 for b in reenable),
                  f"copies built by event 3 per round: {reenable}; by event 1: {first}")
            if kind == "dynamic":
                steady = max(rnd["base"]["bytes"] for rnd in res["rounds"])
                worst = max(r["streamed_bytes"] for rws in ours_rows for r in rws[1:])
                check(f"{config}: toggles keep patches_uuid", all(r["uuid_kept"] for rws in ours_rows for r in rws),
                      "uuid unchanged on every event of ours")
                check(f"{config}: nothing re-streamed by a toggle", worst <= steady + (64 << 20),
                      f"events 2-8 stream at most {worst / 2**20:.1f} MiB vs {steady / 2**20:.1f} MiB for a "
                      f"base image")
        # memory over many events of ours (1 step each)
        if args.soak and "ours" in loaders:
            apply = loader_fn("ours", base)
            mem = []
            cycle = EVENTS[1:]
            for i in range(args.soak):
                _, tag, strength = cycle[i % len(cycle)]
                sample(apply(tag, strength), 1)
                mem.append(torch.cuda.memory_allocated() if cuda else 0)
                print(f"  soak {i + 1}: {tag or 'off'} {strength}: allocated {mem[-1] / 2**20:.0f} MiB", flush=True)
            settled = mem[len(mem) // 10:]
            res["soak"] = {"events": args.soak, "allocated": mem,
                           "allocated_min": min(settled), "allocated_max": max(settled),
                           "cache_bytes": sum(e.nbytes for e in lc.STORE.entries()),
                           "copies": lc.stats()["memory"]["copies"]}
            check(f"{config}: device memory flat over {args.soak} events",
                  max(settled) - min(settled) <= (64 << 20),
                  f"allocated {min(settled) / 2**20:.0f}-{max(settled) / 2**20:.0f} MiB after the first tenth")

    for config in configs:
        kind, _, free_gib = config.partition("@")
        if kind == "dynamic" and not aimdo:
            print(f"== {config}: skipped, comfy-aimdo is not active here", flush=True)
            continue
        set_patcher(kind)
        filler = None
        if free_gib and cuda:
            free, _ = torch.cuda.mem_get_info()
            filler = torch.empty(max(0, free - int(float(free_gib) * 2**30)), dtype=torch.uint8, device="cuda")
        base = comfy.sd.load_diffusion_model(str(model_path))
        res = {"patcher": type(base).__name__, "free_gib": float(free_gib) if free_gib else None,
               "rounds": []}
        print(f"== {spec.label} {config}: {res['patcher']}", flush=True)
        with torch.inference_mode():
            sample(base, args.steps)  # warm-up: kernels, the model's first load
            (sweep_rounds if args.sweep else series_rounds)(base, res, config)
        report["configs"][config] = res
        # written after every configuration: a run stopped at its time limit keeps what it measured
        (out_dir / result_name).write_text(json.dumps(report, indent=1))
        del base, filler
        mm.unload_all_models()
        lc.purge()
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    (out_dir / result_name).write_text(json.dumps(report, indent=1))
    print("checks failed: " + ", ".join(failed) if failed else "all checks passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
