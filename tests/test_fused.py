"""benchmarks/fused_kernel.py: the one-launch low-rank update (a measured candidate form) against
the torch form (the direct forward's own arithmetic), within the dtype's rounding.

The same cases run on a CUDA GPU (marker `gpu`: the compiled kernel and its direct launcher)
and, without a GPU, through Triton's interpreter on CPU tensors when Triton is installed. The
module is loaded from its file: it needs only torch (and Triton), so this file also runs where
ComfyUI is absent (a copy next to fused_kernel.py, on a GPU machine)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch


def _load_fused():
    here = Path(__file__).resolve().parent
    for path in (here / "fused_kernel.py", here.parent / "benchmarks" / "fused_kernel.py"):
        if path.exists():
            spec = importlib.util.spec_from_file_location("lora_cache_fused_under_test", path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod  # dataclasses and Triton's source lookup need it registered
            spec.loader.exec_module(mod)
            return mod
    raise FileNotFoundError("fused_kernel.py")


fused = _load_fused()

try:
    import triton  # noqa: F401
    TRITON = True
except Exception:  # noqa: BLE001 (not installed: the CPU host's requirements do not include it)
    TRITON = False

CUDA = torch.cuda.is_available()
GPU_SKIP = "needs a CUDA GPU and Triton" if not (CUDA and TRITON) else None
INTERP_SKIP = "Triton is not installed here (pip install triton==3.6.0 to run the interpreter cases)" \
    if not TRITON else None

EPS = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


@pytest.fixture
def interpreter(monkeypatch):
    """Two faults of Triton 3.6's interpreter, patched in the interpreter only (never in the
    kernel): it multiplies bf16 tiles as their raw 16-bit integers (it keeps bf16 as uint16 in
    numpy), so they are widened to fp32 first, which is what the GPU's bf16 MMA computes (exact
    products, fp32 sums); and it turns a scalar into a Python int with int() on a one-element
    array (a loop bound), which NumPy 2.4 refuses."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    original_dot = interp.InterpreterBuilder.create_dot

    def widened(self, a, b, d, input_precision, max_num_imprecise_acc):
        def f32(t):
            if t.dtype == tl.bfloat16:
                data = interp._convert_float(t.data, tl.bfloat16, tl.float32, None).view(np.float32)
                return interp.TensorHandle(data, tl.float32)
            return t
        return original_dot(self, f32(a), f32(b), d, input_precision, max_num_imprecise_acc)

    original_patch = interp._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    monkeypatch.setattr(interp.InterpreterBuilder, "create_dot", widened)
    monkeypatch.setattr(interp, "_patch_lang_tensor", patch_lang_tensor)


# --- building layers' plans -------------------------------------------------------------------

def make_plan(K, N, specs, dtype, device, shared=True, seed=0):
    """A plan entry as layers' `_plan` builds it for a layer [N, K]: specs are (rank, alpha,
    out_start, out_len) (out_start None: the whole output). Shared: the downs side by side in
    one [K, R] matrix and parts naming their columns; else one entry per factor, lo/hi None."""
    g = torch.Generator().manual_seed(seed)
    downs = [torch.randn(K, r, generator=g) / K ** 0.5 for r, *_ in specs]
    ups = [torch.randn(r, n if s is not None else N, generator=g) / r ** 0.5 for r, _, s, n in specs]
    downs = [d.to(device, dtype) for d in downs]
    ups = [u.to(device, dtype) for u in ups]
    if not shared:
        return tuple((d, ((None, None, u, a, s, n),)) for d, u, (r, a, s, n) in zip(downs, ups, specs, strict=True))
    shared_down = torch.cat(downs, 1).contiguous()
    parts, col = [], 0
    for u, (r, a, s, n) in zip(ups, specs, strict=True):
        parts.append((col, col + r, u, a, s, n))
        col += r
    return ((shared_down, tuple(parts)),)


def tolerance(x2, y2, plan, dtype):
    """Per element: the dtype's rounding of the result plus that of `x @ down` carried through
    `up` (both forms round h to the dtype, possibly summed in another order)."""
    xf = x2.double().abs()
    bound = y2.double().abs().clone()
    for down, parts in plan:
        hmag = xf @ down.double().abs()
        for lo, hi, up, alpha, start, length in parts:
            hh = hmag if lo is None else hmag[:, lo:hi]
            d = abs(alpha) * (hh @ up.double().abs())
            if start is None:
                bound += 2 * d
            else:
                bound[:, start:start + length] += 2 * d
    return 2 * EPS[dtype] * bound + 1e-30


def exact(x2, y2, plan):
    out = y2.double().clone()
    for down, parts in plan:
        h = x2.double() @ down.double()
        for lo, hi, up, alpha, start, length in parts:
            hh = h if lo is None else h[:, lo:hi]
            d = alpha * (hh @ up.double())
            if start is None:
                out += d
            else:
                out[:, start:start + length] += d
    return out


def check(M, K, N, specs, dtype, device, shared=True, interpret=False, calls=2, seed=0, x_offset=0):
    """The adder's output against the torch form's, both against exact arithmetic."""
    plan = make_plan(K, N, specs, dtype, device, shared, seed)
    g = torch.Generator().manual_seed(seed + 1)
    xbuf = torch.randn(M * K + x_offset, generator=g).to(device, dtype)
    x2 = xbuf[x_offset:].view(M, K)
    y0 = torch.randn(M, N, generator=g).to(device, dtype)
    want = y0.clone()
    fused.torch_adder(plan)(x2, want)
    add = fused.make_plan_adder(plan, device, dtype, backend="triton", interpret=interpret, out_features=N)
    for _ in range(calls):  # on a GPU the first call compiles, later ones take the direct launcher
        got = y0.clone()
        add(x2, got)
        tol = tolerance(x2, y0, plan, dtype)
        diff = (got.double() - want.double()).abs()
        assert torch.isfinite(got).all()
        worst = float((diff / tol).max()) if diff.numel() else 0.0
        assert worst <= 1.0, f"fused vs torch form off by {worst:.2f} of the rounding bound"
        err_fused = float((got.double() - exact(x2, y0, plan)).abs().max()) if diff.numel() else 0.0
        err_torch = float((want.double() - exact(x2, y0, plan)).abs().max()) if diff.numel() else 0.0
        assert err_fused <= 2 * err_torch + 4 * EPS[dtype] * float(tol.max()), (err_fused, err_torch)
    # The kernel computed it (not the torch form), except for an input view off a 16-byte
    # boundary, which the kernel was not built for.
    assert add.form == "triton"
    if getattr(add, "fallback_calls", None) is not None:
        assert (add.fallback_calls[0] > 0) == (x_offset * x2.element_size() % 16 != 0)
    return add


# --- the cases --------------------------------------------------------------------------------

DTYPES = [torch.float16, torch.bfloat16]

# (M, K, N, parts as (rank, alpha, out_start, out_len)), shared down
CASES = {
    "one_row": (1, 64, 96, [(8, 1.0, None, None)]),
    "odd_rows": (37, 96, 130, [(16, 0.8, None, None)]),
    "n_not_tile_multiple": (70, 64, 200, [(32, 1.0, None, None)]),
    "k_not_tile_multiple": (65, 100, 64, [(4, 1.0, None, None)]),
    "rank1": (33, 64, 48, [(1, 2.0, None, None)]),
    "rank128": (40, 128, 160, [(128, 0.5, None, None)]),
    "negative_strength": (50, 64, 64, [(16, -1.25, None, None)]),
    "zero_strength": (50, 64, 64, [(16, 0.0, None, None)]),
    "qkv_slices": (67, 64, 192, [(8, 1.0, 0, 64), (8, 0.5, 64, 64), (8, -1.0, 128, 64)]),
    "linear1_slices": (80, 64, 320, [(8, 1.0, 0, 64), (8, 1.0, 64, 64), (8, 1.0, 128, 64), (8, 0.7, 192, 128)]),
    "unaligned_slices": (45, 48, 150, [(4, 1.0, 3, 50), (12, 1.0, 53, 77), (4, 0.3, 130, 20)]),
    "partial_cover": (30, 64, 256, [(8, 1.0, 0, 64), (8, 1.0, 192, 64)]),
    "overlapping_parts": (30, 64, 128, [(8, 1.0, 0, 96), (16, -0.5, 32, 96)]),
    "mixed_ranks": (64, 64, 192, [(4, 1.0, 0, 64), (64, 1.0, 64, 64), (32, 1.0, 128, 64)]),
    "six_parts": (40, 32, 192, [(4, 1.0, 32 * i, 32) for i in range(6)]),
    "big_ranks_split": (40, 64, 128, [(128, 1.0, 0, 64), (128, 1.0, 64, 64), (64, 1.0, 0, 128)]),
    "wide_out_large_rows": (70, 64, 1000, [(8, 1.0, None, None)]),
    "wide_out_few_rows": (3, 32, 2000, [(8, 1.0, 0, 1000), (8, 0.5, 1000, 1000)]),
}


def _ids(d):
    return list(d)


@pytest.mark.skipif(INTERP_SKIP is not None, reason=INTERP_SKIP or "")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", _ids(CASES))
def test_interpreter_parity(case, dtype, interpreter):
    M, K, N, specs = CASES[case]
    check(M, K, N, specs, dtype, "cpu", interpret=True, calls=1)


@pytest.mark.skipif(INTERP_SKIP is not None, reason=INTERP_SKIP or "")
@pytest.mark.parametrize("case", ["qkv_slices", "unaligned_slices", "wide_out_large_rows", "wide_out_few_rows"])
def test_interpreter_one_program_per_row_tile(case, interpreter, monkeypatch):
    """With one program per row tile, each program walks all of the output's column tiles
    (the loop that loads the next tile's y ahead)."""
    monkeypatch.setattr(fused, "PROGRAMS_PER_SM", 0)
    M, K, N, specs = CASES[case]
    check(M, K, N, specs, torch.float16, "cpu", interpret=True, calls=1)


@pytest.mark.skipif(INTERP_SKIP is not None, reason=INTERP_SKIP or "")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_interpreter_two_adapters_on_one_layer(dtype, interpreter):
    """Two plan entries (two active adapters, each its own down projection) in one adder."""
    a = make_plan(64, 96, [(8, 1.0, 0, 48), (8, 1.0, 48, 48)], dtype, "cpu", seed=3)
    b = make_plan(64, 96, [(16, -0.6, None, None)], dtype, "cpu", seed=4)
    plan = a + b
    x2 = torch.randn(21, 64).to(dtype)
    y0 = torch.randn(21, 96).to(dtype)
    want, got = y0.clone(), y0.clone()
    fused.torch_adder(plan)(x2, want)
    add = fused.make_plan_adder(plan, "cpu", dtype, backend="triton", interpret=True, out_features=96)
    add(x2, got)
    assert ((got.double() - want.double()).abs() <= tolerance(x2, y0, plan, dtype)).all()
    assert add.fallback_calls[0] == 0


@pytest.mark.skipif(INTERP_SKIP is not None, reason=INTERP_SKIP or "")
def test_interpreter_unshared_downs(interpreter):
    """Factors that do not share a down projection (lo/hi None in the plan)."""
    check(19, 64, 128, [(8, 1.0, 0, 64), (4, 1.0, 64, 64)], torch.float16, "cpu", shared=False,
          interpret=True, calls=1)


@pytest.mark.skipif(INTERP_SKIP is not None, reason=INTERP_SKIP or "")
def test_interpreter_batch_rows(interpreter):
    """A [B, T, in] input flattened to rows, as the direct forward hands it over."""
    for b in (1, 2, 3):
        check(b * 29, 64, 64, [(8, 1.0, None, None)], torch.float16, "cpu", interpret=True, calls=1, seed=b)


def test_strength_zero_adds_nothing():
    """Every part at strength 0: the adder leaves y as it was (bit-equal), whatever the form."""
    plan = make_plan(32, 64, [(8, 0.0, None, None)], torch.float16, "cpu")
    add = fused.make_plan_adder(plan, "cpu", torch.float16, backend="triton")
    y = torch.randn(5, 64).half()
    before = y.clone()
    add(torch.randn(5, 32).half(), y)
    assert torch.equal(y, before)


def test_cpu_and_rank_fallbacks_say_why():
    """The choice is made once, with a reason: CPU factors, fp32 factors and ranks above the
    kernel's limit get the torch form."""
    plan = make_plan(32, 64, [(8, 1.0, None, None)], torch.float16, "cpu")
    add = fused.make_plan_adder(plan, "cpu", torch.float16)
    assert add.form == "torch" and "cpu" in add.reason
    plan32 = make_plan(32, 64, [(8, 1.0, None, None)], torch.float32, "cpu")
    add = fused.make_plan_adder(plan32, "cpu", torch.float32)
    assert add.form == "torch" and "float32" in add.reason
    big = make_plan(256, 64, [(fused.MAX_RANK + 1, 1.0, None, None)], torch.float16, "cpu")
    add = fused.make_plan_adder(big, "cpu", torch.float16, backend="triton")
    assert add.form == "torch" and "rank" in add.reason
    x = torch.randn(3, 256).half()
    y = torch.randn(3, 64).half()
    want = y.clone()
    fused.torch_adder(big)(x, want)
    add(x, y)
    assert torch.equal(y, want)


def test_auto_takes_the_torch_form_on_wide_inputs_and_few_rows():
    """"auto" serves with the kernel only the layers it was measured faster on: on a CUDA
    device, inputs up to AUTO_MAX_IN wide and calls of more than SMALL_M rows."""
    if not (CUDA and TRITON):
        plan = make_plan(fused.AUTO_MAX_IN + 16, 64, [(8, 1.0, None, None)], torch.float16, "cpu")
        assert fused.make_plan_adder(plan, "cpu", torch.float16, out_features=64).form == "torch"
        return
    wide = make_plan(fused.AUTO_MAX_IN + 16, 64, [(8, 1.0, None, None)], torch.float16, "cuda")
    add = fused.make_plan_adder(wide, "cuda", torch.float16, out_features=64)
    assert add.form == "torch" and str(fused.AUTO_MAX_IN) in add.reason
    plan = make_plan(64, 64, [(8, 1.0, None, None)], torch.float16, "cuda")
    add = fused.make_plan_adder(plan, "cuda", torch.float16, out_features=64)
    assert add.form == "triton"
    x, y = torch.randn(3, 64, device="cuda").half(), torch.randn(3, 64, device="cuda").half()
    want = y.clone()
    fused.torch_adder(plan)(x, want)
    add(x, y)  # three rows: the torch form, the same arithmetic
    assert torch.equal(y, want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_adder_holds_its_factors_weakly(backend):
    """An adder kept between runs holds no factor in memory: once the plan's tensors are gone
    it says so (`alive()` false) and the caller makes a new one."""
    if backend == "triton" and INTERP_SKIP is not None:
        pytest.skip(INTERP_SKIP)
    import gc
    import weakref

    plan = make_plan(32, 64, [(8, 1.0, 0, 32), (8, 1.0, 32, 32)], torch.float16, "cpu")
    add = fused.make_plan_adder(plan, "cpu", torch.float16, backend=backend, out_features=64)
    assert add.alive()
    down = plan[0][0]
    ref = weakref.ref(down)
    del plan, down
    gc.collect()
    assert ref() is None and not add.alive()


def test_launch_hooks_are_seen_in_triton_chains():
    """Triton 3.6 keeps its launch hooks as chains that are never None: the direct launch is
    taken when the chains are empty and left to Triton's JIT when a profiler added a hook."""
    if not TRITON:
        pytest.skip(INTERP_SKIP)
    from triton import knobs
    fused._define(True)
    assert not fused._launch_hooks_set()
    hook = knobs.runtime.launch_enter_hook
    if not hasattr(hook, "add"):
        pytest.skip("this Triton has no hook chains")
    def probe(*a):
        return None

    hook.add(probe)
    try:
        assert fused._launch_hooks_set()
    finally:
        hook.remove(probe)
    assert not fused._launch_hooks_set()


def test_torch_form_is_layers_arithmetic():
    """The torch form computes exactly what the direct forward's loop computes (bit-equal)."""
    plan = make_plan(32, 96, [(4, 1.0, 0, 32), (4, 0.5, 32, 64)], torch.float32, "cpu")
    x2, y = torch.randn(7, 32), torch.randn(7, 96)
    want = y.clone()
    for down, parts in plan:
        h = x2 @ down
        for lo, hi, up, alpha, start, length in parts:
            want[:, start:start + length].addmm_(h[:, lo:hi], up, alpha=alpha)
    fused.torch_adder(plan)(x2, y)
    assert torch.equal(y, want)


# --- GPU --------------------------------------------------------------------------------------

GPU_CASES = dict(CASES)
GPU_CASES.update({
    "sdxl_attn": (8192, 640, 640, [(32, 1.0, None, None)]),
    "sdxl_ff": (2048, 1280, 10240, [(32, 1.0, None, None)]),
    "sdxl_context_kv": (154, 2048, 1280, [(32, 1.0, None, None)]),
    "flux_qkv": (4096, 3072, 9216, [(32, 1.0, 0, 3072), (32, 1.0, 3072, 3072), (32, 1.0, 6144, 3072)]),
    "flux_linear1": (4608, 3072, 21504, [(32, 1.0, 0, 3072), (32, 1.0, 3072, 3072), (32, 1.0, 6144, 3072),
                                         (32, 1.0, 9216, 12288)]),
    "flux_linear2": (4608, 15360, 3072, [(32, 1.0, None, None)]),
    "big_rank_odd": (333, 1000, 1030, [(128, 0.9, None, None)]),
})


@pytest.mark.gpu
@pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", _ids(GPU_CASES))
def test_gpu_parity(case, dtype):
    M, K, N, specs = GPU_CASES[case]
    check(M, K, N, specs, dtype, "cuda", calls=3)


@pytest.mark.gpu
@pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_gpu_one_adder_many_row_counts(dtype):
    """One layer's adder sees several row counts (batch and resolution change between runs;
    a text encoder's single row): the kernel is not specialised on them."""
    plan = make_plan(320, 640, [(16, 1.0, 0, 320), (16, 0.5, 320, 320)], dtype, "cuda")
    add = fused.make_plan_adder(plan, "cuda", dtype, out_features=640)
    assert add.form == "triton"
    for M in (4096, 1, 77, 4096, 16, 65, 1000, 2):
        x2 = torch.randn(M, 320, device="cuda", dtype=dtype)
        y0 = torch.randn(M, 640, device="cuda", dtype=dtype)
        want, got = y0.clone(), y0.clone()
        fused.torch_adder(plan)(x2, want)
        add(x2, got)
        assert ((got.double() - want.double()).abs() <= tolerance(x2, y0, plan, dtype)).all(), M
    assert add.fallback_calls[0] == 0


@pytest.mark.gpu
@pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")
def test_gpu_later_calls_take_the_direct_launch():
    """After the first call (Triton's JIT), calls go to the compiled kernel's launcher, and a
    second layer of the same specialisation starts there."""
    plans = [make_plan(640, 640, [(32, 1.0, None, None)], torch.float16, "cuda", seed=s) for s in (1, 2)]
    adds = [fused.make_plan_adder(p, "cuda", torch.float16, out_features=640) for p in plans]
    x2 = torch.randn(4096, 640, device="cuda", dtype=torch.float16)
    y = torch.randn(4096, 640, device="cuda", dtype=torch.float16)
    for add in adds:
        add(x2, y)
        add(x2, y)
    launches = [c.cell_contents for add in adds for c in add.__closure__
                if isinstance(c.cell_contents, list) and len(c.cell_contents) == 2]
    assert all(ls[False] and all(launch.direct is not None for launch in ls[False]) for ls in launches)


@pytest.mark.gpu
@pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")
def test_gpu_misaligned_input_takes_torch_form():
    """An input view that starts off a 16-byte boundary is computed by the torch form."""
    check(100, 64, 128, [(8, 1.0, None, None)], torch.float16, "cuda", x_offset=3, calls=2)


@pytest.mark.gpu
@pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")
def test_gpu_cuda_graph_replay():
    """Captured in a CUDA graph, the launch replays on new input data."""
    dtype = torch.bfloat16
    plan = make_plan(256, 384, [(32, 1.0, 0, 128), (32, 1.0, 128, 128), (32, 1.0, 256, 128)], dtype, "cuda")
    add = fused.make_plan_adder(plan, "cuda", dtype, out_features=384)
    x2 = torch.randn(500, 256, device="cuda", dtype=dtype)
    y = torch.randn(500, 384, device="cuda", dtype=dtype)
    add(x2, y.clone())  # compile outside the capture
    y0 = y.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        add(x2, y.clone())
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        add(x2, y)
    for seed in range(3):
        torch.manual_seed(seed)
        x2.copy_(torch.randn_like(x2))
        y.copy_(y0)
        graph.replay()
        want = y0.clone()
        fused.torch_adder(plan)(x2, want)
        torch.cuda.synchronize()
        assert ((y.double() - want.double()).abs() <= tolerance(x2, y0, plan, dtype)).all()


# --- the update folded into the base GEMM (measured, not used by the direct forward) ----------

LINEAR_CASES = {
    "bare_gemm": (37, 96, 200, []),
    "one_factor": (130, 64, 192, [(8, 1.0, None, None)]),
    "qkv_slices": (67, 64, 192, [(8, 1.0, 0, 64), (8, 0.5, 64, 64), (8, -1.0, 128, 64)]),
    "k_not_tile_multiple": (20, 100, 150, [(16, 0.7, None, None)]),
}


def check_linear(M, K, N, specs, dtype, device, hcomp, bias=True, interpret=False, calls=2, cfg=None):
    g = torch.Generator().manual_seed(5)
    plan = make_plan(K, N, specs, dtype, device) if specs else ()
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(device, dtype)
    b = torch.randn(N, generator=g).to(device, dtype) if bias else None
    x2 = torch.randn(M, K, generator=g).to(device, dtype)
    want = torch.nn.functional.linear(x2, w, b)
    base = want.clone()
    fused.torch_adder(plan)(x2, want)
    kw = {} if cfg is None else {"cfg": cfg}
    linear = fused.make_linear(w, b, plan, hcomp=hcomp, interpret=interpret, **kw)
    base_bound = x2.double().abs() @ w.double().abs().t() + (b.double().abs() if bias else 0)
    tol = tolerance(x2, base, plan, dtype) + 2 * EPS[dtype] * base_bound
    for _ in range(calls):
        got = linear(x2)
        assert ((got.double() - want.double()).abs() <= tol).all()


@pytest.mark.skipif(INTERP_SKIP is not None, reason=INTERP_SKIP or "")
@pytest.mark.parametrize("hcomp", [False, True], ids=["h_from_cublas", "h_in_k_loop"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", list(LINEAR_CASES))
def test_interpreter_linear_with_update(case, dtype, hcomp, interpreter):
    M, K, N, specs = LINEAR_CASES[case]
    check_linear(M, K, N, specs, dtype, "cpu", hcomp, bias=case != "one_factor", interpret=True, calls=1,
                 cfg=fused.TileConfig(bm=32, bn=64, bk=32, warps=4, stages=2))


@pytest.mark.gpu
@pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")
@pytest.mark.parametrize("hcomp", [False, True], ids=["h_from_cublas", "h_in_k_loop"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", list(LINEAR_CASES) + ["sdxl_attn", "flux_qkv"])
def test_gpu_linear_with_update(case, dtype, hcomp):
    M, K, N, specs = {**LINEAR_CASES, "sdxl_attn": GPU_CASES["sdxl_attn"], "flux_qkv": GPU_CASES["flux_qkv"]}[case]
    check_linear(M, K, N, specs, dtype, "cuda", hcomp, bias=True, calls=3)
