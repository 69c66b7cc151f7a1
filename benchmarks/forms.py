"""Candidate forms of the dynamic forward, timed on the whole diffusion model.

Each form installs a per-instance forward on every layer the cached adapter targets (as
lora_cache.layers does), runs the diffusion model's forward eagerly and replayed as a CUDA
graph, and is compared with the model whose weights hold the merged update (fp32 merge, cast
to the model dtype, as ComfyUI merges). "base" has no wrapper at all; merged weights have the
same shapes and kernels as base, so base is the merged model's cost.

Forms:
- shipped: lora_cache.layers as it is in this checkout (activate / deactivate).
- noop: a wrapper that only calls ComfyUI's forward (the cost of a Python wrapper alone).
- per_factor: the previous shipped form: ComfyUI's forward, then per factor
  `x @ down_t` and `y.addmm_(h, up_t)` into the output (or its slice).
- combined: ComfyUI's forward, then one `x @ D` and one `y.addmm_(h, U)` per layer: the
  factors of one layer (Flux's q/k/v slices) share one down projection, their ups placed
  in one [R, out] matrix with the scale folded in.
- combined_direct: as combined, but the base product is `F.linear(x, W, b)` called
  directly (ComfyUI's forward only adds its cast checks, which are settled at load).
- augk: where out > in, one GEMM over an augmented K: `[x | x @ D] @ [W | U^T]^T`, with
  [W | U^T] stored contiguously (a copy of W: memory); combined_direct elsewhere.
"""
from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F


def _inputs(spec, model, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(7)
    lat = spec.latent
    if spec.kind == "sdxl":
        b = 2 if spec.cfg > 1 else 1
        x = torch.randn(b, *lat[1:], generator=g)
        kw = {"timesteps": torch.full((b,), 500.0), "context": torch.randn(b, *spec.context[1:], generator=g),
              "y": torch.randn(b, spec.unet["adm_in_channels"], generator=g)}
    else:
        x = torch.randn(1, *lat[1:], generator=g)
        kw = {"timestep": torch.full((1,), 0.5), "context": torch.randn(1, *spec.context[1:], generator=g),
              "y": torch.randn(1, spec.unet["vec_in_dim"], generator=g), "guidance": torch.full((1,), 3.5)}
    x = x.to(device, dtype)
    kw = {k: v.to(device, dtype) for k, v in kw.items()}
    return x, kw


def _combined(factors, device, dtype, out_features):
    """One (D [in, R], U [R, out]) per layer, scale folded into U, zeros outside each slice."""
    downs, ups = [], []
    for f in factors:
        u = torch.zeros(f.up.shape[0], out_features, device=device, dtype=torch.float32)
        start, length = f.out_slice if f.out_slice is not None else (0, out_features)
        u[:, start:start + length] = f.up.float() * f.scale
        downs.append(f.down)
        ups.append(u)
    return torch.cat(downs, 1).contiguous(), torch.cat(ups, 0).to(dtype).contiguous()


AUGK_BYTES = [0]  # memory the augk form's [W | U^T] copies take


def _install_forms(form, items, strength):
    """Installs `form` on each (module, factors); returns an undo function."""
    from lora_cache_loader.lora_cache import layers

    if form == "shipped":
        for m, fs in items:
            layers.activate(m, fs, strength)
        return lambda: [layers.deactivate(m) for m, _ in items]

    installed = []
    for m, fs in items:
        base = type(m).forward.__get__(m)
        W = m.weight
        out_f, in_f = W.shape
        if form == "noop":
            def fwd(x, *a, _b=base, **k):
                return _b(x, *a, **k)
        elif form == "per_factor":
            def fwd(x, *a, _b=base, _fs=fs, **k):
                y = _b(x, *a, **k)
                x2 = x.reshape(-1, x.shape[-1])
                y2 = y.view(-1, y.shape[-1])
                for f in _fs:
                    h = x2 @ f.down
                    if f.out_slice is None:
                        y2.addmm_(h, f.up, alpha=strength * f.scale)
                    else:
                        s, n = f.out_slice
                        y2[:, s:s + n].addmm_(h, f.up, alpha=strength * f.scale)
                return y
        else:
            D, U = _combined(fs, W.device, W.dtype, out_f)
            if form == "combined":
                def fwd(x, *a, _b=base, _D=D, _U=U, **k):
                    y = _b(x, *a, **k)
                    y.view(-1, y.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]) @ _D, _U, alpha=strength)
                    return y
            elif form == "combined_direct" or (form == "augk" and out_f <= in_f):
                def fwd(x, _m=m, _D=D, _U=U):
                    y = F.linear(x, _m.weight, _m.bias)
                    y.view(-1, y.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]) @ _D, _U, alpha=strength)
                    return y
            elif form == "augk":
                Waug = torch.cat([W, (U.float() * strength).to(W.dtype).t()], 1).contiguous()
                AUGK_BYTES[0] += Waug.numel() * Waug.element_size()

                def fwd(x, _m=m, _D=D, _Wa=Waug):
                    x2 = x.reshape(-1, x.shape[-1])
                    y = F.linear(torch.cat([x2, x2 @ _D], 1), _Wa, _m.bias)
                    return y.view(*x.shape[:-1], -1)
            else:
                raise ValueError(form)
        m.__dict__["forward"] = fwd
        installed.append(m)

    def undo():
        for m in installed:
            m.__dict__.pop("forward", None)
    return undo


def _time_eager(fn, iters, cuda):
    for _ in range(2):
        fn()
    ts = []
    for _ in range(iters):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        else:
            import time
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(ts)


def _time_graph(fn, iters):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
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


@torch.inference_mode()
def run(spec, patcher, entry, tiny=False, strength=1.0, rounds=2, forms=("noop", "shipped", "per_factor", "combined",
                                                               "combined_direct", "augk")):
    from lora_cache_loader.lora_cache import merge

    model = patcher.model
    dm = model.diffusion_model
    device, dtype = patcher.load_device, model.get_dtype()
    cuda = device.type == "cuda"
    x, kw = _inputs(spec, model, device, dtype)
    items = [(m, fs) for _, m, fs in entry.modules()]
    rounds = 1 if tiny else rounds
    AUGK_BYTES[0] = 0
    iters_e = 2 if tiny else (10 if spec.kind == "sdxl" else 4)
    iters_g = 2 if tiny else (20 if spec.kind == "sdxl" else 10)

    def fwd():
        return dm(x, **kw)

    out: dict = {"layers": len(items), "factors": sum(len(fs) for _, fs in items), "eager_iters": iters_e,
                 "graph_iters": iters_g, "rows": {}}
    base_out = fwd().float()
    merged = merge.Merged([(m, fs, strength) for m, fs in items])
    t_merge = merged.merge()
    out["backup_where"], out["backup_bytes"] = merged.where, merged.backup_bytes
    ref = fwd().float()
    out["merge_ms_first"], out["restore_ms_first"] = t_merge, merged.restore()
    out["restore_output_bit_equal"] = bool(torch.equal(fwd().float(), base_out))
    toggles = [(merged.merge(), merged.restore()) for _ in range(3)]
    out["merge_ms"] = statistics.median(t[0] for t in toggles)
    out["restore_ms"] = statistics.median(t[1] for t in toggles)
    out["restore_output_bit_equal"] &= bool(torch.equal(fwd().float(), base_out))
    if cuda and merged.backup_bytes_last <= (8 << 30):  # the same, with the copies in pinned host memory
        host = merged.__class__(merged.items, keep_on_device=False)
        out["merge_ms_host_copy"] = host.merge()
        out["backup_bytes_host"] = host.backup_bytes
        out["restore_ms_host_copy"] = host.restore()
        out["restore_host_output_bit_equal"] = bool(torch.equal(fwd().float(), base_out))
    del merged

    # Eager time on a CPU-launch-bound model follows the host's speed, which drifts: each form's
    # eager time is taken in interleaved rounds (base, each form, base, ...) and the median kept.
    eager: dict[str, list[float]] = {}
    for _ in range(rounds):
        eager.setdefault("base", []).append(_time_eager(fwd, iters_e, cuda))
        for form in forms:
            undo = _install_forms(form, items, strength)
            eager.setdefault(form, []).append(_time_eager(fwd, iters_e, cuda))
            undo()
    out["eager_rounds"] = rounds

    def row(name, undo=None):
        key = "base" if name.startswith("base") else name
        r = {"eager_ms": statistics.median(eager[key]), "eager_ms_rounds": eager[key]}
        if cuda:
            try:
                r["graph_ms"] = _time_graph(fwd, iters_g)
            except Exception as e:  # a form that cannot be captured is reported, not fatal
                r["graph_error"] = f"{type(e).__name__}: {e}"[:300]
                torch.cuda.synchronize()
        o = fwd().float()
        r["rel_err_vs_merged"] = float((o - ref).norm() / ref.norm().clamp_min(1e-30))
        r["rel_err_base_vs_merged"] = float((base_out - ref).norm() / ref.norm().clamp_min(1e-30))
        r["finite"] = bool(torch.isfinite(o).all())
        if undo is not None:
            undo()
        out["rows"][name] = r
        print(f"    form {name:16s} eager {r['eager_ms']:8.2f} ms  graph {r.get('graph_ms', float('nan')):8.2f} ms"
              f"  rel err {r['rel_err_vs_merged']:.2e}", flush=True)
        if cuda:
            torch.cuda.empty_cache()

    row("base")
    for form in forms:
        undo = _install_forms(form, items, strength)
        row(form, undo)
    row("base (again)")
    out["augk_extra_bytes"] = AUGK_BYTES[0] // max(1, rounds + 1)
    return out
