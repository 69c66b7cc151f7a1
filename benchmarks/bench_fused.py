"""Per-layer cost of the dynamic forward's low-rank update on SDXL- and Flux-shaped Linear layers.

For every distinct layer shape of the two models (rank-32 factors on every Linear of the
transformer blocks: SDXL 722 layers, batch 2 at 1024x1024, fp16; Flux 304 layers, 4096 image +
512 text tokens, bf16) it times, eagerly and replayed as a CUDA graph:

- base:        F.linear(x, W, b) alone (the merged model's cost)
- torch:       base + the direct forward's current update (`fused.torch_adder`: one `x @ down`
               per adapter, one addmm_ per factor), as lora_cache.layers computes it
- fused:       base + the one-launch Triton update (`fused.make_plan_adder`)
- fused[...]:  the same kernel with other tile sizes / programs per SM (the sweep)
- gemm_bare:   a Triton GEMM with no update (how far Triton's GEMM is from cuBLAS)
- gemm_fold:   the update folded into a Triton GEMM (h = x @ down from cuBLAS, read in the
               GEMM's epilogue; W and the factors read in place, nothing copied)
- gemm_hcomp:  the same with h accumulated in the GEMM's own K loop (one launch per layer)
- wmerge:      the package's weight form (lora_cache/layers.py `merged_weight`): the update
               in a transient copy of the weight per call, then F.linear(x, W', b)
- pick:        per call, wmerge or torch by the package's own rule (`WeightPlan.merge_numel`)

then the whole model's layer sequence (each layer its own weights and factors) per form, and
the host cost per layer (the sequence at 16 rows, where the GPU work is small and the host's
launches decide). Outputs are compared with the torch form within the dtype's rounding.

    python3 benchmarks/bench_fused.py --out DIR [--models sdxl,flux] [--budget SECONDS]

Needs torch and Triton on a CUDA GPU, not ComfyUI; fused_kernel.py is taken from next to this
file, lora_cache/layers.py from the repository. Writes DIR/fused_bench.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent


def load_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_fused():
    path = HERE / "fused_kernel.py"
    if not path.exists():
        raise FileNotFoundError("fused_kernel.py")
    return load_file("lora_cache_fused_bench", path)


fused = load_fused()
# The package's layer forms, from their file (they import only torch): the weight form and its
# per-call rule are the shipped ones.
layer_forms = load_file("lora_cache_layers_bench", HERE.parent / "lora_cache" / "layers.py")

RANK = 32
DEVICE = "cuda"


def sync():
    torch.cuda.synchronize()


def layers(model: str):
    """(name, in, out, rows, count, bias, parts) per distinct layer shape; parts are
    (rank, out_start, out_len) or None for one factor over the whole output."""
    if model == "sdxl":
        out = []
        for dim, rows, blocks, transformers in ((640, 8192, 10, 5), (1280, 2048, 60, 6)):
            out += [
                (f"attn_qkv_q2_{dim}", dim, dim, rows, 4 * blocks, False, None),  # attn1 q/k/v, attn2 q
                (f"attn_out_proj_{dim}", dim, dim, rows, 2 * blocks + 2 * transformers, True, None),
                (f"attn2_kv_{dim}", 2048, dim, 154, 2 * blocks, False, None),  # on the 77-token context
                (f"ff_geglu_{dim}", dim, 8 * dim, rows, blocks, True, None),
                (f"ff_out_{dim}", 4 * dim, dim, rows, blocks, True, None),
            ]
        return out
    h = 3072
    qkv = [(RANK, 0, h), (RANK, h, h), (RANK, 2 * h, h)]
    return [
        ("img_qkv", h, 3 * h, 4096, 19, True, qkv),
        ("img_proj", h, h, 4096, 19, True, None),
        ("img_mlp0", h, 4 * h, 4096, 19, True, None),
        ("img_mlp2", 4 * h, h, 4096, 19, True, None),
        ("txt_qkv", h, 3 * h, 512, 19, True, qkv),
        ("txt_proj", h, h, 512, 19, True, None),
        ("txt_mlp0", h, 4 * h, 512, 19, True, None),
        ("txt_mlp2", 4 * h, h, 512, 19, True, None),
        ("double_mod", h, 6 * h, 1, 38, True, None),
        ("linear1", h, 7 * h, 4608, 38, True, qkv + [(RANK, 3 * h, 4 * h)]),
        ("linear2", 5 * h, h, 4608, 38, True, None),
        ("single_mod", h, 3 * h, 1, 38, True, None),
    ]


MODEL_DTYPE = {"sdxl": torch.float16, "flux": torch.bfloat16}
EPS = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}

# The sweep: (label, module attributes of fused set while the adder is built). "fused" is the
# kernel with its default tiles on every layer; "auto" is what make_plan_adder chooses.
ADDER_VARIANTS = [
    ("fused", {}),
    ("fused[bm64,bn128,w8]", {"CONFIG_LARGE": fused.TileConfig(64, 128, 64, 8, 3),
                              "CONFIG_LARGE_WIDE": fused.TileConfig(64, 128, 64, 8, 3)}),
    ("fused[bm32,no-prefetch]", {"CONFIG_LARGE": fused.TileConfig(32, 128, 64, 4, 3, False),
                                 "CONFIG_LARGE_WIDE": fused.TileConfig(32, 128, 64, 8, 3, False)}),
    ("fused[bm32,bk128,s4]", {"CONFIG_LARGE": fused.TileConfig(32, 128, 128, 4, 4),
                              "CONFIG_LARGE_WIDE": fused.TileConfig(32, 128, 128, 8, 4)}),
    ("fused[bm16,w4]", {"CONFIG_LARGE": fused.TileConfig(16, 128, 64, 4, 3),
                        "CONFIG_LARGE_WIDE": fused.TileConfig(16, 128, 64, 4, 3)}),
    ("fused[pps1]", {"PROGRAMS_PER_SM": 1}),
    ("fused[pps4]", {"PROGRAMS_PER_SM": 4}),
]
GEMM_CONFIGS = {
    "g128x128": fused.TileConfig(128, 128, 64, 8, 4),
    "g128x256": fused.TileConfig(128, 256, 64, 8, 3),
    "g64x128": fused.TileConfig(64, 128, 64, 4, 4),
}


def gemm_configs_for(rows: int):
    if rows <= 16:
        return []  # a GEMV: not a case for a tiled GEMM
    return ["g64x128"] if rows <= 512 else ["g128x128", "g128x256"]


def with_attrs(attrs, fn):
    old = {k: getattr(fused, k) for k in attrs}
    try:
        for k, v in attrs.items():
            setattr(fused, k, v)
        return fn()
    finally:
        for k, v in old.items():
            setattr(fused, k, v)


class Layer:
    """One layer instance: its weight, bias, factors (as layers' plan holds them) and forms."""

    def __init__(self, spec, dtype, dev, gen, variants=(), gemms=()):
        _, K, N, _, _, bias, parts = spec
        self.K, self.N = K, N
        self.W = (torch.randn(N, K, device=dev, dtype=torch.float32, generator=gen) * K ** -0.5).to(dtype)
        self.b = (torch.randn(N, device=dev, generator=gen) * 0.1).to(dtype) if bias else None
        if parts is None:
            down = (torch.randn(K, RANK, device=dev, generator=gen) * K ** -0.5).to(dtype)
            up = (torch.randn(RANK, N, device=dev, generator=gen) * RANK ** -0.5).to(dtype)
            self.plan = ((down, ((None, None, up, 1.0, None, None),)),)
        else:
            R = sum(r for r, _, _ in parts)
            shared = (torch.randn(K, R, device=dev, generator=gen) * K ** -0.5).to(dtype)
            ps, col = [], 0
            for r, s, n in parts:
                up = (torch.randn(r, n, device=dev, generator=gen) * r ** -0.5).to(dtype)
                ps.append((col, col + r, up, 1.0, s, n))
                col += r
            self.plan = ((shared, tuple(ps)),)
        self.torch_add = fused.torch_adder(self.plan)
        self.adders = {}
        for label, attrs in variants:
            self.adders[label] = with_attrs(attrs, lambda: fused.make_plan_adder(self.plan, dev, dtype,
                                                                                   backend="triton",
                                                                                   out_features=N))
        self.adders["auto"] = fused.make_plan_adder(self.plan, dev, dtype, out_features=N)
        self.gemms = {}
        for label in gemms:
            cfg = GEMM_CONFIGS[label]
            self.gemms["gemm_bare" + f"[{label}]"] = fused.make_linear(self.W, self.b, (), cfg=cfg)
            self.gemms["gemm_fold" + f"[{label}]"] = fused.make_linear(self.W, self.b, self.plan, cfg=cfg)
            self.gemms["gemm_hcomp" + f"[{label}]"] = fused.make_linear(self.W, self.b, self.plan, hcomp=True,
                                                                        cfg=cfg)

    def form(self, name):
        W, b = self.W, self.b
        if name == "base":
            return lambda x: F.linear(x, W, b)
        wp = layer_forms._weight_plan(self.plan, W)
        if name == "wmerge":
            return lambda x: F.linear(x, layer_forms.merged_weight(W, wp), b)
        if name == "pick":
            add = self.torch_add

            def picked(x):
                if x.numel() >= wp.merge_numel:
                    return F.linear(x, layer_forms.merged_weight(W, wp), b)
                y = F.linear(x, W, b)
                add(x, y)
                return y
            return picked
        if name == "torch":
            add = self.torch_add
        elif name in self.adders:
            add = self.adders[name]
        else:
            return self.gemms[name]

        def run(x):
            y = F.linear(x, W, b)
            add(x, y)
            return y
        return run


def direct_launch(add):
    """Whether the adder's launches after the first go to the compiled kernel's launcher (None
    where the adder is not the kernel or has not launched)."""
    for cell in getattr(add, "__closure__", None) or ():
        v = cell.cell_contents
        if isinstance(v, list) and len(v) == 2 and any(isinstance(x, tuple) for x in v):
            launches = [launch for group in v if group for launch in group]
            return all(launch.direct is not None for launch in launches) if launches else None
    return None


def forms_of(layer):
    return ["base", "torch", "wmerge", "pick", *layer.adders, *layer.gemms]


def tolerance(x, y_base, layer, dtype, with_base):
    xf = x.double().abs()
    bound = y_base.double().abs().clone()
    for down, parts in layer.plan:
        hm = xf @ down.double().abs()
        for lo, hi, up, alpha, start, length in parts:
            hh = hm if lo is None else hm[:, lo:hi]
            d = 2 * abs(alpha) * (hh @ up.double().abs())
            if start is None:
                bound += d
            else:
                bound[:, start:start + length] += d
    if with_base:
        bound += xf @ layer.W.double().abs().t()
    return 2 * EPS[dtype] * bound + 1e-30


def time_graph(fn, iters=10):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    sync()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    del g
    return statistics.median(ts)


def time_eager(fn, iters=5):
    fn()
    sync()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def shape_bench(model, spec, dev, gen, deadline, log):
    dtype = MODEL_DTYPE[model]
    name, K, N, rows, count, bias, parts = spec
    n_inst = min(count, 4)
    variants = ADDER_VARIANTS if rows > fused.SMALL_M else ADDER_VARIANTS[:1]
    insts = [Layer(spec, dtype, dev, gen, variants, gemm_configs_for(rows)) for _ in range(n_inst)]
    x = torch.randn(rows, K, device=dev, generator=gen).to(dtype)
    per_call_flop = 2 * rows * K * N
    reps = max(1, min(16, int(4e11 / max(per_call_flop, 1) / n_inst) or 1))
    rec = {"name": name, "in": K, "out": N, "rows": rows, "count": count, "bias": bias,
           "parts": None if parts is None else [list(p) for p in parts], "instances": n_inst, "reps": reps,
           "forms": {}}
    # Parity on instance 0 (first calls compile; the second goes through the direct launcher).
    L = insts[0]
    y_base = F.linear(x, L.W, L.b)
    want = y_base.clone()
    L.torch_add(x, want)
    for f in forms_of(L):
        if f == "base":
            continue
        fn = L.form(f)
        t0 = time.perf_counter()
        fn(x)
        sync()
        first_s = time.perf_counter() - t0
        got = fn(x)
        tol = tolerance(x, y_base, L, dtype, with_base=f.startswith("gemm") or f in ("wmerge", "pick"))
        if f.startswith("gemm_bare"):
            ratio = float(((got.double() - y_base.double()).abs() / tol).max())
        else:
            ratio = float(((got.double() - want.double()).abs() / tol).max())
        rec["forms"][f] = {"parity_ratio": ratio, "parity_ok": bool(ratio <= 1.0 and torch.isfinite(got).all()),
                           "first_call_s": first_s}
        if f in L.adders:
            a = L.adders[f]
            rec["forms"][f]["fallback_calls"] = getattr(a, "fallback_calls", [None])[0]
            rec["forms"][f]["form"] = a.form
            rec["forms"][f]["reason"] = a.reason
            rec["forms"][f]["direct_launch"] = direct_launch(a)
    for f in forms_of(L):
        if time.time() > deadline:
            rec["truncated"] = True
            break
        fns = [i.form(f) for i in insts]

        def loop(fns=fns):
            for _ in range(reps):
                for fn in fns:
                    fn(x)
        calls = reps * n_inst
        r = rec["forms"].setdefault(f, {})
        r["graph_us"] = time_graph(loop) * 1e3 / calls
        r["eager_us"] = time_eager(loop) * 1e3 / calls
    base = rec["forms"]["base"]
    for f, r in rec["forms"].items():
        if "graph_us" in r and f != "base":
            r["graph_over_base_pct"] = 100 * (r["graph_us"] / base["graph_us"] - 1)
            r["eager_over_base_pct"] = 100 * (r["eager_us"] / base["eager_us"] - 1)
    log(f"  {model}/{name} [{rows}x{K}->{N}] x{count}: base graph {base['graph_us']:.1f} us eager "
        f"{base['eager_us']:.1f} us; " + ", ".join(
            f"{f} {r.get('graph_over_base_pct', float('nan')):+.1f}%/{r.get('eager_over_base_pct', float('nan')):+.1f}%"
            for f, r in rec["forms"].items() if f in ("torch", "fused") or f.startswith("gemm_fold[g128x128")))
    del insts
    torch.cuda.empty_cache()
    return rec


def model_bench(model, dev, gen, forms, deadline, log, host_rows=16):
    """The whole model's layer sequence (every layer its own weights and factors) per form."""
    dtype = MODEL_DTYPE[model]
    specs = layers(model)
    seq = []
    xs, xs_small = {}, {}
    for spec in specs:
        name, K, _, rows, count, _, _ = spec
        xs[name] = torch.randn(rows, K, device=dev, generator=gen).to(dtype)
        xs_small[name] = torch.randn(min(rows, host_rows), K, device=dev, generator=gen).to(dtype)
        gem = gemm_configs_for(rows)[:1] if any(f.startswith("gemm") for f in forms) else []
        for _ in range(count):
            seq.append((name, Layer(spec, dtype, dev, gen, ADDER_VARIANTS[:1], gem)))
    out = {"layers": len(seq), "forms": {}}
    fns = small = None

    def pick(layer, f):
        if f.startswith("gemm") and not layer.gemms:
            return layer.form("fused")  # GEMV layers (one row): the adder
        if f.startswith("gemm"):
            return next(v for k, v in layer.gemms.items() if k.startswith(f + "["))
        return layer.form(f)

    for f in forms:
        if time.time() > deadline:
            out["truncated"] = True
            break
        fns = [(xs[n], pick(L, f)) for n, L in seq]
        small = [(xs_small[n], pick(L, f)) for n, L in seq]

        def run(fns=fns):
            for x, fn in fns:
                fn(x)

        def run_small(small=small):
            for x, fn in small:
                fn(x)
        run()
        run_small()
        sync()
        out["forms"][f] = {"eager_ms": time_eager(run, 5), "graph_ms": time_graph(run, 10),
                           f"host_ms_at_{host_rows}_rows": time_eager(run_small, 7)}
        log(f"  {model} sequence {f:12s} eager {out['forms'][f]['eager_ms']:8.2f} ms  graph "
            f"{out['forms'][f]['graph_ms']:8.2f} ms  at {host_rows} rows "
            f"{out['forms'][f][f'host_ms_at_{host_rows}_rows']:.2f} ms")
    b = out["forms"].get("base")
    if b:
        for f, r in out["forms"].items():
            if f != "base":
                r["eager_over_base_pct"] = 100 * (r["eager_ms"] / b["eager_ms"] - 1)
                r["graph_over_base_pct"] = 100 * (r["graph_ms"] / b["graph_ms"] - 1)
                k = f"host_ms_at_{host_rows}_rows"
                r["host_us_per_layer_over_base"] = 1e3 * (r[k] - b[k]) / len(seq)
    seq = fns = small = None
    torch.cuda.empty_cache()
    return out


def ceilings(dev):
    src = torch.empty(2 ** 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = time_graph(lambda s=src, d=dst: d.copy_(s), 10)
    m = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    mm = time_graph(lambda m=m: m @ m, 5)
    src = dst = m = None
    torch.cuda.empty_cache()
    return {"copy_TBps_read_plus_write": 2 * 2 ** 30 / ms / 1e9, "bf16_matmul_TFLOPs": 2 * 8192 ** 3 / mm / 1e9}


def warm(models, shard, shards):
    """Compiles the kernels the benchmark needs (one call of every form on every distinct
    shape of this shard), so that several processes fill Triton's cache in parallel."""
    dev = torch.device(DEVICE)
    gen = torch.Generator(device=dev).manual_seed(0)
    i = 0
    for model in models:
        for spec in layers(model):
            i += 1
            if i % shards != shard:
                continue
            rows = spec[3]
            variants = ADDER_VARIANTS if rows > fused.SMALL_M else ADDER_VARIANTS[:1]
            L = Layer(spec, MODEL_DTYPE[model], dev, gen, variants, gemm_configs_for(rows))
            x = torch.randn(rows, spec[1], device=dev, generator=gen).to(MODEL_DTYPE[model])
            xs = x[:16].contiguous()
            for f in forms_of(L):
                L.form(f)(x)
                if rows > 16 and f in ("torch", "fused"):
                    L.form(f)(xs)
            sync()
            del L


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    p.add_argument("--models", default="sdxl,flux")
    p.add_argument("--budget", type=float, default=300.0, help="seconds; later sections are cut short after it")
    p.add_argument("--warm-shard", type=int, default=None)
    p.add_argument("--warm-shards", type=int, default=1)
    p.add_argument("--no-sweep", action="store_true", help="time only the default adder per shape")
    p.add_argument("--sections", default="models,shapes", help="whole-model sequences, per-shape timings")
    p.add_argument("--forms", default="base,torch,wmerge,pick,fused,auto,gemm_bare,gemm_fold,gemm_hcomp",
                   help="forms of the whole-model sequences")
    args = p.parse_args(argv)
    models = args.models.split(",")
    if args.warm_shard is not None:
        warm(models, args.warm_shard, args.warm_shards)
        return
    start = time.time()
    deadline = start + args.budget
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "fused_bench.json"
    dev = torch.device(DEVICE)
    gen = torch.Generator(device=dev).manual_seed(0)
    import triton
    res = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
           "triton": triton.__version__,
           "rank": RANK, "configs": {"small": str(fused.CONFIG_SMALL), "large": str(fused.CONFIG_LARGE),
                                     "large_wide": str(fused.CONFIG_LARGE_WIDE), "small_m": fused.SMALL_M,
                                     "programs_per_sm": fused.PROGRAMS_PER_SM},
           "shapes": {}, "models": {}}
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    def save():
        res["elapsed_s"] = time.time() - start
        path.write_text(json.dumps(res, indent=1))

    if args.no_sweep:
        ADDER_VARIANTS[1:] = []
    res["ceilings"] = ceilings(dev)
    log(f"ceilings: {res['ceilings']}")
    save()
    # The whole sequence first (the headline numbers), then the per-shape sweep.
    sections = args.sections.split(",")
    for model in models if "models" in sections else ():
        res["models"][model] = model_bench(model, dev, gen, args.forms.split(","), deadline, log)
        save()
    for model in models if "shapes" in sections else ():
        res["shapes"][model] = []
        for spec in layers(model):
            if time.time() > deadline:
                res["shapes_truncated"] = True
                break
            res["shapes"][model].append(shape_bench(model, spec, dev, gen, deadline, log))
            save()
    bad = [(m, s["name"], f) for m, ss in res["shapes"].items() for s in ss for f, r in s["forms"].items()
           if "parity_ok" in r and not r["parity_ok"]]
    res["parity_failures"] = bad
    log(f"parity failures: {bad}")
    save()


if __name__ == "__main__":
    main()
