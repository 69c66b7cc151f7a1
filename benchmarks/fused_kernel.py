"""A candidate form of the low-rank update, measured and not used by the package: the update of
a Linear layer's output in one Triton kernel launch. On an H200 it is slower than the direct
forward's torch form on most SDXL and Flux layer shapes (benchmarks/RESULTS.md), so layers.py
keeps the torch form; this file, its parity tests (tests/test_fused.py) and its benchmark
(bench_fused.py) stay for the next attempt.

The direct forward adds `alpha * (x @ down) @ up` into the base product `y` for every active
factor. In torch that is one `x @ down` GEMM per adapter and one `addmm_` per factor: each
reads `x` or `y` again and each is a launch, which a launch-bound model (eager SDXL, 722
adapted layers) pays on the host every step. Here one Triton kernel does the whole update
in place: a program takes a tile of rows, computes `h = x_tile @ down` for every part in
registers (one pass over the tile's `x`), then walks its share of the output's column tiles,
reading `y` once and writing it once with every part's `alpha * h @ up` added.

`make_adder` (one plan entry: a shared down projection and its parts) and `make_plan_adder`
(all of a layer's plan entries) choose the form once, when the layer's plan is built: the
Triton kernel on a CUDA device with Triton, fp16/bf16 factors, ranks up to 128 and an input
width the kernel was measured faster on, else the torch form, which is the direct forward's
own arithmetic. The returned adder `add(x2, y2)` takes the 2-D input [M, in] and the 2-D
output [M, out] (contiguous, in the factors' dtype and place, as the direct forward hands
them over) and updates `y2` in place. Everything fixed for the layer (pointers, strides,
ranks, slices, strengths, tile sizes, the compiled kernel) is kept in the adder; a call reads
the row count and the two tensors' addresses and launches.

Tile sizes and the input-width limit come from an H200 sweep over SDXL- and Flux-shaped
layers (`benchmarks/bench_fused.py`, data in benchmarks/data/h200-fused/): the kernel's
programs each walk the whole K of their rows before their first output tile, which cuBLAS's
`x @ down` (spread over K) beats on wide inputs.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

Adder = Callable[[torch.Tensor, torch.Tensor], None]

MAX_RANK = 128  # the kernel keeps each part's `x @ down` tile in registers: [rows, rank] fp32
MAX_PARTS = 4  # parts per launch; more are split over several launches
_MAX_RANK_SUM = 256  # padded ranks per launch (register budget of one program)


class Part(NamedTuple):
    """One factor of a layer as the kernel reads it.

    `down` [in, r]: the factor's down projection (a column view of the layer's shared down
    projection where the factors share one). `up` [r, length]: its up projection. `alpha`:
    strength times scale. The update goes to output columns [start, start + length)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    start: int
    length: int
    # The plan's own tensor `down` is a view of (the shared down projection) and its columns:
    # what an adder keeps a weak reference to (a view made here would die at once).
    source: torch.Tensor | None = None
    cols: tuple[int, int] | None = None


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes of one launch: rows per program, output columns per inner step, the K step
    of `x @ down`, warps, pipeline stages, and whether the next tile's y is loaded ahead."""

    bm: int
    bn: int
    bk: int
    warps: int
    stages: int
    prefetch: bool = True


def parts_of(down: torch.Tensor, parts: Sequence[tuple]) -> list[Part]:
    """Parts of one plan entry of `layers` (down, ((lo, hi, up, alpha, start, length), ...)):
    lo/hi None means the part uses all of `down`, start/length None the whole output."""
    out = []
    for lo, hi, up, alpha, start, length in parts:
        d = down if lo is None else down[:, lo:hi]
        if start is None:
            start, length = 0, up.shape[1]
        out.append(Part(d, up, float(alpha), int(start), int(length), down, None if lo is None else (lo, hi)))
    return out


# ---------------------------------------------------------------------------------------------
# The torch form: the direct forward's arithmetic, kept as the fallback and the reference.


def torch_adder(plan: Sequence[tuple]) -> Adder:
    """One `x @ down` per plan entry (shared by its parts) and one in-place addmm_ per part."""
    entries = tuple((down, tuple(parts)) for down, parts in plan)

    def add(x2: torch.Tensor, y2: torch.Tensor) -> None:
        for down, parts in entries:
            h = x2 @ down
            for lo, hi, up, alpha, start, length in parts:
                hh = h if lo is None else h[:, lo:hi]
                if start is None:
                    y2.addmm_(hh, up, alpha=alpha)
                else:
                    y2[:, start:start + length].addmm_(hh, up, alpha=alpha)

    add.form = "torch"
    return add


def _weak_torch_adder(plan: Sequence[tuple]) -> Adder:
    """The torch form over weak references to the plan's tensors: an adder kept between runs
    holds no factor in memory (while a run is active, the layer's plan holds them)."""
    weak = tuple((weakref.ref(down), tuple((lo, hi, weakref.ref(up), alpha, start, length)
                                           for lo, hi, up, alpha, start, length in parts))
                 for down, parts in plan)

    def add(x2: torch.Tensor, y2: torch.Tensor) -> None:
        for down, parts in weak:
            h = x2 @ down()
            for lo, hi, up, alpha, start, length in parts:
                hh = h if lo is None else h[:, lo:hi]
                if start is None:
                    y2.addmm_(hh, up(), alpha=alpha)
                else:
                    y2[:, start:start + length].addmm_(hh, up(), alpha=alpha)

    return add


# ---------------------------------------------------------------------------------------------
# Triton kernels, defined on first use (Triton is optional: CPU hosts run the torch form).

_KERNELS: dict[bool, object] = {}
triton = tl = None  # imported by _define; module globals, where Triton's interpreter looks for them


def _define(interpret: bool):
    """The kernels, compiled for the GPU or (interpret=True) run by Triton's interpreter on
    CPU tensors, which is how the parity tests run without a GPU."""
    global triton, tl
    cached = _KERNELS.get(interpret)
    if cached is not None:
        return cached
    import triton
    import triton.language as tl
    from triton import knobs

    previous = knobs.runtime.interpret
    knobs.runtime.interpret = interpret
    try:
        kernels = _kernel_source()
    finally:
        knobs.runtime.interpret = previous
    _KERNELS[interpret] = kernels
    return kernels


class _Kernels(NamedTuple):
    lora_add: object
    linear_lora: object


def _kernel_source() -> _Kernels:
    # Up to four parts per launch, written out: each part keeps its own `x @ down` tile in
    # registers (no slicing of a register tile is possible), and a part's code is compiled
    # only where NP says it exists. Each output column tile takes the parts that overlap it,
    # so overlapping parts of one launch add up correctly and a tile is written once.

    @triton.jit(do_not_specialize=["M", "split"])
    def lora_add(x_ptr, y_ptr, M, split, K, ldx, ldy, c_lo, c_hi,
                 d0, sdk0, sdr0, u0, sur0, sun0, r0, s0, n0, a0,
                 d1, sdk1, sdr1, u1, sur1, sun1, r1, s1, n1, a1,
                 d2, sdk2, sdr2, u2, sur2, sun2, r2, s2, n2, a2,
                 d3, sdk3, sdr3, u3, sur3, sun3, r3, s3, n3, a3,
                 NP: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr, EVEN_K: tl.constexpr, PREFETCH: tl.constexpr):
        pid = tl.program_id(0)
        tile_m = pid // split
        first_n = pid % split
        rm = tile_m * BM + tl.arange(0, BM)
        row_ok = rm < M
        rm64 = rm.to(tl.int64)
        rk = tl.arange(0, BK)
        rr = tl.arange(0, BR)

        # h_p = x_tile @ down_p for every part, one pass over the tile's x.
        h0 = tl.full((BM, BR), 0.0, tl.float32)
        h1 = tl.full((BM, BR), 0.0, tl.float32)
        h2 = tl.full((BM, BR), 0.0, tl.float32)
        h3 = tl.full((BM, BR), 0.0, tl.float32)
        x_rows = x_ptr + rm64[:, None] * ldx
        for k0 in range(0, K, BK):
            kk = k0 + rk
            if EVEN_K:
                xt = tl.load(x_rows + kk[None, :], mask=row_ok[:, None], other=0.0)
                kmask = kk[:, None] >= 0
            else:
                xt = tl.load(x_rows + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < K), other=0.0)
                kmask = kk[:, None] < K
            dt = tl.load(d0 + kk[:, None] * sdk0 + rr[None, :] * sdr0, mask=kmask & (rr[None, :] < r0), other=0.0)
            h0 = tl.dot(xt, dt, h0)
            if NP > 1:
                dt = tl.load(d1 + kk[:, None] * sdk1 + rr[None, :] * sdr1, mask=kmask & (rr[None, :] < r1),
                             other=0.0)
                h1 = tl.dot(xt, dt, h1)
            if NP > 2:
                dt = tl.load(d2 + kk[:, None] * sdk2 + rr[None, :] * sdr2, mask=kmask & (rr[None, :] < r2),
                             other=0.0)
                h2 = tl.dot(xt, dt, h2)
            if NP > 3:
                dt = tl.load(d3 + kk[:, None] * sdk3 + rr[None, :] * sdr3, mask=kmask & (rr[None, :] < r3),
                             other=0.0)
                h3 = tl.dot(xt, dt, h3)
        # Rounded to the input dtype, as the torch form's `x @ down` is.
        dtype = x_ptr.dtype.element_ty
        g0 = h0.to(dtype)
        g1 = h1.to(dtype)
        g2 = h2.to(dtype)
        g3 = h3.to(dtype)

        # This program's output column tiles: every split-th tile of [c_lo, c_hi). With
        # PREFETCH the next tile's y is loaded before this tile's update is computed, so one
        # y load is always in flight (the loop's loads are not pipelined by Triton otherwise).
        y_rows = y_ptr + rm64[:, None] * ldy
        n_tiles = (c_hi - c_lo + BN - 1) // BN
        step = split * BN
        rn = c_lo + first_n * BN + tl.arange(0, BN)
        if PREFETCH:
            y_next = tl.load(y_rows + rn[None, :], mask=row_ok[:, None] & (rn[None, :] < c_hi), other=0.0)
        for t in range(first_n, n_tiles, split):
            c0 = c_lo + t * BN
            rn = c0 + tl.arange(0, BN)
            ymask = row_ok[:, None] & (rn[None, :] < c_hi)
            if PREFETCH:
                yt = y_next
                y_next = tl.load(y_rows + (rn + step)[None, :], mask=row_ok[:, None] & ((rn + step)[None, :] < c_hi),
                                 other=0.0)
            else:
                yt = tl.load(y_rows + rn[None, :], mask=ymask, other=0.0)
            acc = tl.full((BM, BN), 0.0, tl.float32)
            if NP == 1:
                cn = rn - s0
                ut = tl.load(u0 + rr[:, None] * sur0 + cn[None, :] * sun0,
                             mask=(rr[:, None] < r0) & (cn[None, :] < n0), other=0.0)
                acc += a0 * tl.dot(g0, ut)
            else:
                if (c0 < s0 + n0) & (c0 + BN > s0):
                    cn = rn - s0
                    ut = tl.load(u0 + rr[:, None] * sur0 + cn[None, :] * sun0,
                                 mask=(rr[:, None] < r0) & (cn[None, :] >= 0) & (cn[None, :] < n0), other=0.0)
                    acc += a0 * tl.dot(g0, ut)
                if (c0 < s1 + n1) & (c0 + BN > s1):
                    cn = rn - s1
                    ut = tl.load(u1 + rr[:, None] * sur1 + cn[None, :] * sun1,
                                 mask=(rr[:, None] < r1) & (cn[None, :] >= 0) & (cn[None, :] < n1), other=0.0)
                    acc += a1 * tl.dot(g1, ut)
                if NP > 2:  # noqa: SIM102 (compile-time part count, then a run-time overlap test)
                    if (c0 < s2 + n2) & (c0 + BN > s2):
                        cn = rn - s2
                        ut = tl.load(u2 + rr[:, None] * sur2 + cn[None, :] * sun2,
                                     mask=(rr[:, None] < r2) & (cn[None, :] >= 0) & (cn[None, :] < n2), other=0.0)
                        acc += a2 * tl.dot(g2, ut)
                if NP > 3:  # noqa: SIM102 (compile-time part count, then a run-time overlap test)
                    if (c0 < s3 + n3) & (c0 + BN > s3):
                        cn = rn - s3
                        ut = tl.load(u3 + rr[:, None] * sur3 + cn[None, :] * sun3,
                                     mask=(rr[:, None] < r3) & (cn[None, :] >= 0) & (cn[None, :] < n3), other=0.0)
                        acc += a3 * tl.dot(g3, ut)
            tl.store(y_rows + rn[None, :], (yt.to(tl.float32) + acc).to(dtype), mask=ymask)

    # The base product with the update folded into it, without copying any weight: the K loop
    # reads W [N, K] and the epilogue reads each part's h [M, r] (precomputed, HCOMP=False, or
    # accumulated in the same K loop from the x tile already loaded, HCOMP=True) and its up.
    # The strength is folded into h (rounded to the dtype) so that the update accumulates into
    # the base product's registers: a separate [BM, BN] product would spill.
    @triton.jit(do_not_specialize=["M"])
    def linear_lora(x_ptr, w_ptr, b_ptr, h_ptr, y_ptr, M, N, K, ldx, ldw, ldh, ldy,
                    d0, sdk0, u0, sur0, lo0, r0, s0, n0, a0,
                    d1, sdk1, u1, sur1, lo1, r1, s1, n1, a1,
                    d2, sdk2, u2, sur2, lo2, r2, s2, n2, a2,
                    d3, sdk3, u3, sur3, lo3, r3, s3, n3, a3,
                    NP: tl.constexpr, BR: tl.constexpr, HAS_BIAS: tl.constexpr, HCOMP: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                    EVEN_K: tl.constexpr):
        pid = tl.program_id(0)
        num_m = (M + BM - 1) // BM
        num_n = (N + BN - 1) // BN
        group = GROUP_M * num_n
        first_m = (pid // group) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        tile_m = first_m + (pid % group) % size_m
        tile_n = (pid % group) // size_m
        rm = tile_m * BM + tl.arange(0, BM)
        rn = tile_n * BN + tl.arange(0, BN)
        row_ok = rm < M
        col_ok = rn < N
        rm64 = rm.to(tl.int64)
        rn64 = rn.to(tl.int64)
        rk = tl.arange(0, BK)
        rr = tl.arange(0, BR)
        acc = tl.full((BM, BN), 0.0, tl.float32)
        h0 = tl.full((BM, BR), 0.0, tl.float32)
        h1 = tl.full((BM, BR), 0.0, tl.float32)
        h2 = tl.full((BM, BR), 0.0, tl.float32)
        h3 = tl.full((BM, BR), 0.0, tl.float32)
        x_rows = x_ptr + rm64[:, None] * ldx
        w_cols = w_ptr + rn64[None, :] * ldw
        for k0 in range(0, K, BK):
            kk = k0 + rk
            if EVEN_K:
                xt = tl.load(x_rows + kk[None, :], mask=row_ok[:, None], other=0.0)
                wt = tl.load(w_cols + kk[:, None], mask=col_ok[None, :], other=0.0)
            else:
                xt = tl.load(x_rows + kk[None, :], mask=row_ok[:, None] & (kk[None, :] < K), other=0.0)
                wt = tl.load(w_cols + kk[:, None], mask=col_ok[None, :] & (kk[:, None] < K), other=0.0)
            acc = tl.dot(xt, wt, acc)
            if HCOMP:
                kmask = kk[:, None] < K
                if NP > 0:
                    h0 = tl.dot(xt, tl.load(d0 + kk[:, None] * sdk0 + rr[None, :],
                                            mask=kmask & (rr[None, :] < r0), other=0.0), h0)
                if NP > 1:
                    h1 = tl.dot(xt, tl.load(d1 + kk[:, None] * sdk1 + rr[None, :],
                                            mask=kmask & (rr[None, :] < r1), other=0.0), h1)
                if NP > 2:
                    h2 = tl.dot(xt, tl.load(d2 + kk[:, None] * sdk2 + rr[None, :],
                                            mask=kmask & (rr[None, :] < r2), other=0.0), h2)
                if NP > 3:
                    h3 = tl.dot(xt, tl.load(d3 + kk[:, None] * sdk3 + rr[None, :],
                                            mask=kmask & (rr[None, :] < r3), other=0.0), h3)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        dtype = y_ptr.dtype.element_ty
        c0 = tile_n * BN
        h_rows = h_ptr + rm64[:, None] * ldh
        if NP > 0:  # noqa: SIM102 (compile-time part count, then a run-time overlap test)
            if (c0 < s0 + n0) & (c0 + BN > s0):
                if HCOMP:
                    g = h0.to(dtype)
                else:
                    g = tl.load(h_rows + (lo0 + rr)[None, :], mask=row_ok[:, None] & (rr[None, :] < r0), other=0.0)
                cn = rn - s0
                ut = tl.load(u0 + rr[:, None] * sur0 + cn[None, :],
                             mask=(rr[:, None] < r0) & (cn[None, :] >= 0) & (cn[None, :] < n0), other=0.0)
                acc = tl.dot((g.to(tl.float32) * a0).to(dtype), ut, acc)
        if NP > 1:  # noqa: SIM102 (compile-time part count, then a run-time overlap test)
            if (c0 < s1 + n1) & (c0 + BN > s1):
                if HCOMP:
                    g = h1.to(dtype)
                else:
                    g = tl.load(h_rows + (lo1 + rr)[None, :], mask=row_ok[:, None] & (rr[None, :] < r1), other=0.0)
                cn = rn - s1
                ut = tl.load(u1 + rr[:, None] * sur1 + cn[None, :],
                             mask=(rr[:, None] < r1) & (cn[None, :] >= 0) & (cn[None, :] < n1), other=0.0)
                acc = tl.dot((g.to(tl.float32) * a1).to(dtype), ut, acc)
        if NP > 2:  # noqa: SIM102 (compile-time part count, then a run-time overlap test)
            if (c0 < s2 + n2) & (c0 + BN > s2):
                if HCOMP:
                    g = h2.to(dtype)
                else:
                    g = tl.load(h_rows + (lo2 + rr)[None, :], mask=row_ok[:, None] & (rr[None, :] < r2), other=0.0)
                cn = rn - s2
                ut = tl.load(u2 + rr[:, None] * sur2 + cn[None, :],
                             mask=(rr[:, None] < r2) & (cn[None, :] >= 0) & (cn[None, :] < n2), other=0.0)
                acc = tl.dot((g.to(tl.float32) * a2).to(dtype), ut, acc)
        if NP > 3:  # noqa: SIM102 (compile-time part count, then a run-time overlap test)
            if (c0 < s3 + n3) & (c0 + BN > s3):
                if HCOMP:
                    g = h3.to(dtype)
                else:
                    g = tl.load(h_rows + (lo3 + rr)[None, :], mask=row_ok[:, None] & (rr[None, :] < r3), other=0.0)
                cn = rn - s3
                ut = tl.load(u3 + rr[:, None] * sur3 + cn[None, :],
                             mask=(rr[:, None] < r3) & (cn[None, :] >= 0) & (cn[None, :] < n3), other=0.0)
                acc = tl.dot((g.to(tl.float32) * a3).to(dtype), ut, acc)
        y_rows = y_ptr + rm64[:, None] * ldy
        tl.store(y_rows + rn[None, :], acc.to(dtype), mask=row_ok[:, None] & col_ok[None, :])

    return _Kernels(lora_add, linear_lora)


# ---------------------------------------------------------------------------------------------
# Launching with little host work per call.


def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, n - 1).bit_length())


# Tiles for few and for many rows; a row count at or below SMALL_M takes the small tiles (a
# text encoder's few tokens, a single row). From the H200 sweep (benchmarks/data/h200-fused):
# 32 rows per program was the fastest or within noise of it on every shape of more rows; 8
# warps where more than 128 padded ranks would not fit 4 warps' registers.
SMALL_M = 64
CONFIG_SMALL = TileConfig(bm=16, bn=128, bk=64, warps=4, stages=2)
CONFIG_LARGE = TileConfig(bm=32, bn=128, bk=64, warps=4, stages=3)
CONFIG_LARGE_WIDE = TileConfig(bm=32, bn=128, bk=64, warps=8, stages=3)  # more than 128 padded ranks
PROGRAMS_PER_SM = 2  # enough programs in flight to hide the y traffic's latency

# Where "auto" takes the kernel (the same sweep): layers of at most this input width. On wider
# inputs cuBLAS's `x @ down` (spread over K) and addmm_ were faster than the kernel, whose
# programs each walk the whole K of their rows before the first output tile (Flux: every layer
# is 3072 wide or more; SDXL's feed-forward outputs 2560/5120). Row counts at or below SMALL_M
# also take the torch form there (one row: the torch form took a third of the kernel's time).
AUTO_MAX_IN = 2048


def _chunks(parts: list[Part]) -> list[list[Part]]:
    """Parts in launch groups: at most MAX_PARTS, at most _MAX_RANK_SUM padded ranks each."""
    groups: list[list[Part]] = []
    for p in parts:
        br = _pow2_at_least(p.down.shape[1])
        if groups:
            g = groups[-1]
            br_g = max(br, max(_pow2_at_least(q.down.shape[1]) for q in g))
            if len(g) < MAX_PARTS and br_g * (len(g) + 1) <= _MAX_RANK_SUM:
                g.append(p)
                continue
        groups.append([p])
    return groups


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _spec(v) -> tuple:
    """What Triton specialises a kernel on for one argument (ints: equal to 1, divisible by 16,
    64-bit; pointers: 16-byte aligned; floats: nothing): kernels whose fixed arguments agree on
    this share one compiled kernel."""
    if isinstance(v, float):
        return ()
    if isinstance(v, int):
        return (v == 1, v % 16 == 0, not -2 ** 31 <= v < 2 ** 31)
    return (v.dtype, v.data_ptr() % 16 == 0)


class _Group:
    """One launch's parts and everything about them that is fixed: the kernel's arguments after
    (x, y, M, split) as integers (for the direct launcher), and how to make them as tensors
    again (for Triton's JIT, at the first launch) from weak references to the plan's tensors."""

    __slots__ = ("K", "br", "c_hi", "c_lo", "head", "n_parts", "recipe", "refs", "spec", "tail_i")

    def __init__(self, parts: list[Part], ldx: int, ldy: int):
        self.K = K = parts[0].down.shape[0]
        self.c_lo = min(p.start for p in parts)
        self.c_hi = max(p.start + p.length for p in parts)
        self.n_parts = len(parts)
        self.br = max(_pow2_at_least(p.down.shape[1]) for p in parts)
        self.head = (K, ldx, ldy, self.c_lo, self.c_hi)
        per_t: list = []
        per_i: list = []
        self.recipe = []
        self.refs = []
        for p in parts + [parts[0]] * (MAX_PARTS - len(parts)):  # unused slots: compiled out by NP
            d, u = p.down, p.up
            fixed = (d.stride(0), d.stride(1))
            fixed_u = (u.stride(0), u.stride(1), d.shape[1], p.start, p.length, p.alpha)
            per_t += [d, *fixed, u, *fixed_u]
            per_i += [d.data_ptr(), *fixed, u.data_ptr(), *fixed_u]
            src, up = weakref.ref(p.source if p.source is not None else d), weakref.ref(u)
            self.recipe.append((src, p.cols, fixed, up, fixed_u))
            self.refs += [src, up]
        self.tail_i = (*self.head, *per_i)
        self.spec = tuple(_spec(t) for t in (*self.head, *per_t))

    def tail_tensors(self) -> tuple:
        per: list = []
        for src, cols, fixed, up, fixed_u in self.recipe:
            base, u = src(), up()
            if base is None or u is None:
                raise RuntimeError("fused_kernel: the factors this adder was made for were freed")
            per += [base if cols is None else base[:, cols[0]:cols[1]], *fixed, u, *fixed_u]
        return (*self.head, *per)


def _launch_hooks_set() -> bool:
    """Whether a launch hook (a profiler) is installed in Triton; the direct launch skips the
    hooks, so it is only taken without them. Triton 3.6 keeps them as chains (never None)."""
    from triton import knobs
    for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        if hook is not None and (getattr(hook, "calls", None) is None or hook.calls):
            return True
    return False


# (device index, group's specialisation, tile config) -> the compiled kernel's launch data: a
# layer whose fixed arguments specialise the same way launches it without Triton's JIT.
_COMPILED: dict[tuple, tuple] = {}


class _Launch:
    """One launch of `lora_add` for one group of parts and one tile config. The first launch of
    a specialisation goes through Triton's JIT (which compiles, or finds the compiled kernel);
    every other launch goes straight to the compiled kernel's launcher with integer pointers."""

    __slots__ = ("bm", "cfg", "const", "dev_index", "direct", "group", "interpret", "kernel", "key",
                 "min_programs", "n_tiles", "tail")

    def __init__(self, kernel, cfg: TileConfig, group: _Group, device: torch.device, interpret: bool,
                 programs_per_sm: int):
        self.kernel, self.cfg, self.group, self.interpret = kernel, cfg, group, interpret
        self.bm = cfg.bm
        self.n_tiles = -(-(group.c_hi - group.c_lo) // cfg.bn)
        self.min_programs = programs_per_sm * _sm_count(device)
        self.const = {"NP": group.n_parts, "BR": group.br, "BM": cfg.bm, "BN": cfg.bn, "BK": cfg.bk,
                      "EVEN_K": group.K % cfg.bk == 0, "PREFETCH": cfg.prefetch}
        self.dev_index = device.index if device.index is not None else (
            torch.cuda.current_device() if device.type == "cuda" else -1)
        self.tail = group.tail_i + tuple(self.const.values())
        self.key = (self.dev_index, group.spec, cfg)
        self.direct = None if interpret else _COMPILED.get(self.key)

    def first(self, x2: torch.Tensor, y2: torch.Tensor, M: int) -> None:
        m_tiles = -(-M // self.bm)
        split = max(1, min(self.n_tiles, -(-self.min_programs // m_tiles)))
        compiled = self.kernel[(m_tiles * split,)](x2, y2, M, split, *self.group.tail_tensors(), **self.const,
                                                   num_warps=self.cfg.warps, num_stages=self.cfg.stages)
        if self.interpret or compiled is None:
            return
        run = compiled.run  # loads the module, builds the launcher
        launch = getattr(run, "launch", None)
        if (launch is None or _launch_hooks_set() or getattr(run, "global_scratch_size", 1)
                or getattr(run, "profile_scratch_size", 1) or getattr(run, "num_ctas", 1) != 1):
            return  # this Triton needs its own launch path (or a profiler listens): keep the JIT's
        self.direct = _COMPILED[self.key] = (launch, torch._C._cuda_getCurrentRawStream, compiled.function,
                                             run.launch_cooperative_grid, run.launch_pdl,
                                             compiled.packed_metadata)

    def __call__(self, x2: torch.Tensor, y2: torch.Tensor, M: int, xp: int, yp: int) -> None:
        direct = self.direct
        if direct is None:
            self.first(x2, y2, M)
            return
        launch, stream, function, coop, pdl, packed = direct
        m_tiles = -(-M // self.bm)
        split = max(1, min(self.n_tiles, -(-self.min_programs // m_tiles)))
        launch(m_tiles * split, 1, 1, stream(self.dev_index), function, coop, pdl, None, None, packed, None, None,
               None, xp, yp, M, split, *self.tail)


_USABLE: dict[tuple, tuple[bool, str]] = {}


def triton_usable(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether the kernel can serve factors on `device` in `dtype`, and why not (asked once per
    device and dtype: adders are made for every layer at every activation)."""
    key = (device, dtype)
    if key not in _USABLE:
        _USABLE[key] = _usable(device, dtype)
    return _USABLE[key]


def _usable(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    if dtype not in (torch.float16, torch.bfloat16):
        return False, f"{dtype} factors (the kernel takes fp16 and bf16)"
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, f"factors on {device} (the kernel runs on CUDA)"
    major, _ = torch.cuda.get_device_capability(device)
    if dtype == torch.bfloat16 and major < 8:
        return False, "bf16 on a GPU before sm_80"
    try:
        import triton  # noqa: F401
    except Exception as e:  # noqa: BLE001 (not installed, or broken next to this torch)
        return False, f"Triton unavailable ({type(e).__name__})"
    return True, "Triton kernel"


def _with(add: Adder, form: str, reason: str, refs: list) -> Adder:
    add.form, add.reason = form, reason
    # Whether the tensors the adder was made for are all still there: an adder kept between
    # runs holds only weak references and serves again only while this is true.
    add.alive = lambda: all(r() is not None for r in refs)
    return add


def make_plan_adder(plan: Sequence[tuple], device: torch.device, dtype: torch.dtype, backend: str = "auto",
                    interpret: bool = False, out_features: int | None = None) -> Adder:
    """The adder for a layer's whole plan (layers' `_plan`: per active adapter (down, parts));
    `out_features` is the layer's output width (the row stride of y; the kernel needs it).

    backend "auto" takes the Triton kernel where `triton_usable` says so and the layer is one
    the kernel was measured faster on (input width at most AUTO_MAX_IN; calls with more than
    SMALL_M rows), else the torch form; "torch" the torch form; "triton" the kernel for every
    call (with interpret=True, Triton's interpreter on CPU tensors: tests). The returned
    callable has `.form` ("triton" or "torch"), `.reason` and `.alive()`; it holds only weak
    references to the plan's tensors, which the caller keeps while it uses the adder."""
    device = torch.device(device)
    refs = [weakref.ref(t) for down, ps in plan for t in (down, *(q[2] for q in ps))]
    fallback = _weak_torch_adder(plan)
    parts = [p for down, ps in plan for p in parts_of(down, ps)]
    K = parts[0].down.shape[0] if parts else 0
    if backend == "torch":
        return _with(fallback, "torch", "torch form asked for", refs)
    if backend == "auto":
        ok, why = triton_usable(device, dtype)
        if not ok:
            return _with(fallback, "torch", why, refs)
        if K > AUTO_MAX_IN:
            return _with(fallback, "torch", f"input width {K} > {AUTO_MAX_IN}: the torch form is faster there", refs)
    big = max((p.down.shape[1] for p in parts), default=0)
    if big > MAX_RANK:
        return _with(fallback, "torch", f"rank {big} above the kernel's {MAX_RANK}", refs)
    parts = [p for p in parts if p.alpha != 0.0 and p.length > 0]  # strength 0 adds nothing
    if not parts:
        def nothing(x2: torch.Tensor, y2: torch.Tensor) -> None:
            return None
        return _with(nothing, "triton", "every part has strength 0", [])
    if any(p.down.shape[0] != K or p.down.dtype != dtype or p.up.dtype != dtype for p in parts):
        return _with(fallback, "torch", "parts of different input width or dtype", refs)
    if out_features is None:
        raise ValueError("the Triton adder needs the layer's out_features (the row stride of y)")
    kernel = _define(interpret).lora_add
    groups = [_Group(g, K, out_features) for g in _chunks(parts)]
    del parts  # the groups keep integers and weak references only
    configs = (CONFIG_SMALL, CONFIG_LARGE, CONFIG_LARGE_WIDE, PROGRAMS_PER_SM)  # as they are now
    few_rows_kernel = backend == "triton"

    def launches(small: bool) -> tuple:
        few, many, wide, pps = configs
        return tuple(_Launch(kernel, few if small else wide if g.br * g.n_parts > 128 else many, g, device,
                             interpret, pps) for g in groups)

    # Launches for many rows and for few, each made on its first use: most layers only ever see
    # one of the two (a diffusion model's modulation layers take one row, the rest thousands).
    by_size: list = [None, None]

    # The kernels are specialised for x [M, in] and y [M, out_features] with unit column stride
    # and for their pointers' 16-byte alignment; a call that differs (another row stride, a view
    # that starts off a 16-byte boundary) takes the torch form.
    x_strides = (K, 1)
    y_strides = (out_features, 1)
    fallback_calls = [0]

    def add(x2: torch.Tensor, y2: torch.Tensor) -> None:
        M = x2.shape[0]
        xp = x2.data_ptr()
        yp = y2.data_ptr()
        if (xp | yp) & 15 or x2.stride() != x_strides or y2.stride() != y_strides:
            fallback_calls[0] += 1
            return fallback(x2, y2)
        few = M <= SMALL_M
        if few and not few_rows_kernel:
            return fallback(x2, y2)
        if M == 0:
            return None
        group_launches = by_size[few]
        if group_launches is None:
            group_launches = by_size[few] = launches(few)
        for launch in group_launches:
            launch(x2, y2, M, xp, yp)

    add.fallback, add.fallback_calls = fallback, fallback_calls
    return _with(add, "triton", "Triton kernel", refs)


def make_adder(shared_down: torch.Tensor, parts: Sequence[tuple], device: torch.device, dtype: torch.dtype,
               backend: str = "auto", interpret: bool = False, out_features: int | None = None) -> Adder:
    """The adder for one plan entry: `shared_down` [in, R] and its parts
    ((lo, hi, up, alpha, start, length), ...) as layers' plan holds them."""
    return make_plan_adder(((shared_down, tuple(parts)),), device, dtype, backend, interpret, out_features)


# ---------------------------------------------------------------------------------------------
# The update folded into the base GEMM (measured against cuBLAS's F.linear plus the adder; not
# used by the direct forward): y = x @ W^T + b + sum_p alpha_p (x @ down_p) @ up_p, with W and
# the factors read where they are, so no weight is copied.

GEMM_CONFIG = TileConfig(bm=128, bn=128, bk=64, warps=8, stages=4)


def make_linear(weight: torch.Tensor, bias: torch.Tensor | None, plan: Sequence[tuple], hcomp: bool = False,
                cfg: TileConfig = GEMM_CONFIG, group_m: int = 8, interpret: bool = False
                ) -> Callable[[torch.Tensor], torch.Tensor]:
    """`linear(x2) -> y2` for a Linear layer `weight` [out, in] with the plan's update folded in.

    hcomp=False: `h = x2 @ down` comes from one cuBLAS GEMM per call (the plan's single entry),
    and the GEMM reads h in its epilogue. hcomp=True: every output tile also accumulates its
    own `x_tile @ down` in the K loop from the x tile it already loaded (no second pass over
    x, at rank/BN more MMA work). An empty plan gives the bare Triton GEMM (for comparison with
    cuBLAS). Parts: at most MAX_PARTS, ranks at most MAX_RANK, downs with unit column stride."""
    N, K = weight.shape
    parts = [p for down, ps in plan for p in parts_of(down, ps)]
    if len(parts) > MAX_PARTS or any(p.down.shape[1] > MAX_RANK or p.down.stride(1) != 1 for p in parts):
        raise ValueError("make_linear takes at most 4 parts of rank <= 128 with unit column stride")
    if parts and not hcomp and len(plan) != 1:
        raise ValueError("make_linear without hcomp takes a plan of one entry (one down projection)")
    kernel = _define(interpret).linear_lora
    shared = plan[0][0] if parts and not hcomp else None
    per = []
    for i in range(MAX_PARTS):
        p = parts[i] if i < len(parts) else (parts[0] if parts else None)
        if p is None:
            per.append((weight, 0, weight, 0, 0, 1, 0, 0, 0.0))
            continue
        lo = 0 if shared is None else (p.down.data_ptr() - shared.data_ptr()) // shared.element_size()
        per.append((p.down, p.down.stride(0), p.up, p.up.stride(0), lo, p.down.shape[1], p.start, p.length,
                    p.alpha))
    const = {"NP": len(parts), "BR": max([_pow2_at_least(p.down.shape[1]) for p in parts] or [16]),
             "HAS_BIAS": bias is not None, "HCOMP": hcomp, "BM": cfg.bm, "BN": cfg.bn, "BK": cfg.bk,
             "GROUP_M": group_m, "EVEN_K": K % cfg.bk == 0}
    fixed_t = [t for p in per for t in p]
    fixed_i = [t.data_ptr() if isinstance(t, torch.Tensor) else t for t in fixed_t]
    b = bias if bias is not None else weight
    n_tiles = -(-N // cfg.bn)
    state = {"fast": None}

    def first(x2, h, y, M, grid):
        compiled = kernel[(grid,)](x2, weight, b, h, y, M, N, K, x2.stride(0), weight.stride(0), h.stride(0), N,
                                   *fixed_t, **const, num_warps=cfg.warps, num_stages=cfg.stages)
        if interpret or compiled is None:
            return
        run = compiled.run
        launch = getattr(run, "launch", None)
        if (launch is None or _launch_hooks_set() or getattr(run, "global_scratch_size", 1)
                or getattr(run, "profile_scratch_size", 1)):
            return
        dev = x2.device.index if x2.device.index is not None else torch.cuda.current_device()
        head = (weight.data_ptr(), b.data_ptr())
        tail = (N, K, K, weight.stride(0), h.stride(0), N, *fixed_i, *const.values())
        stream = torch._C._cuda_getCurrentRawStream
        fn, packed, coop, pdl = compiled.function, compiled.packed_metadata, run.launch_cooperative_grid, \
            run.launch_pdl

        def fast(xp, hp, yp, M, grid):
            launch(grid, 1, 1, stream(dev), fn, coop, pdl, None, None, packed, None, None, None, xp, *head, hp, yp,
                   M, *tail)
        state["fast"] = fast

    def linear(x2: torch.Tensor) -> torch.Tensor:
        M = x2.shape[0]
        y = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
        h = x2 @ shared if shared is not None else y
        grid = -(-M // cfg.bm) * n_tiles
        fast = state["fast"]
        if fast is None:
            first(x2, h, y, M, grid)
        else:
            fast(x2.data_ptr(), h.data_ptr(), y.data_ptr(), M, grid)
        return y

    return linear
