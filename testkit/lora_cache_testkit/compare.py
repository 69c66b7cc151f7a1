"""How results are compared with a reference: within a tolerance that follows from the arithmetic.

Floating-point addition is not associative, and the order in which a matmul or a convolution
sums its products is the kernel's choice (blocking, vector width, threads), which differs between
processors. A tolerance tuned on one machine therefore fails on another; these follow from the
dtype and the length of the sums instead, and hold for any summation order.

A dot product of length k summed in a type of unit roundoff u = eps / 2, in any order, is within

    gamma_k * sum_i |x_i w_i|,    gamma_k = k u / (1 - k u),

of the exact value (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., 3.1); the
magnitude sum_i |x_i w_i| is the same computation on absolute values.

One layer (`reference`, `tolerance`): that worst case needs every rounding to go the same way.
For the tiny SD model's convolutions (k = 5760) it is about 10,000 times the error any kernel
makes, and larger than what a missing adapter changes there. A layer's output is therefore held
to the probabilistic bound of the same sums (Higham and Mary, "A new approach to probabilistic
rounding error analysis", SIAM J. Sci. Comput. 41(5), 2019, the inner product): with rounding
errors independent and of mean zero, again for any order, to first order in u,

    |error| <= lambda * sqrt(k) * u * sum_i |x_i w_i|
    with probability at least 1 - 2 k^2 exp(-lambda^2 (1 - u)^2 / 2);

lambda = 10 leaves a failure from rounding alone below 1e-13 per value (k <= 10,000). The exact
value is stood in for by a float64 reference, whose own error (about 1e-16 relative) is far below
these tolerances.

A whole workflow (`close`): a sampled latent or a text encoding goes through dozens of layers
and sampling steps, with no magnitude at hand for each sum. It is held to the worst-case bound
of one sum of the longest length in the tiny models (K_MAX) on the scale of the result:

    max |got - ref| <= K_MAX * eps * max |ref|.

The sums along the way each err by about sqrt(k) * u relative to their magnitude and
independently, so together they stay far below one worst-case sum of the longest length:
measured on the CPU, at most 1/1000 of this tolerance over every equality the suite asserts,
while every adapter effect it asserts (`not close`) is at least 29 times above it.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

# The longest sum in the tiny models the tests run: the SD UNet's first output-block
# convolution, 320 channels plus 320 skip channels times a 3x3 kernel (tests/test_forms.py
# checks it against the models). The Flux model's longest is 320, the CLIP's 128, and the
# benchmark's tiny SDXL's 2816 (its class-label embedding).
K_MAX = 640 * 3 * 3
LAMBDA = 10.0


def eps(dtype: torch.dtype) -> float:
    """The distance from 1.0 to the next number of `dtype`: 2 u."""
    return torch.finfo(dtype).eps


def relative_tolerance(dtype: torch.dtype, *, accumulate: torch.dtype | None = None, roundings: int = 0) -> float:
    """A whole workflow's tolerance relative to the largest value of its result: K_MAX * eps of
    the type its sums are carried in (`accumulate`, default `dtype`), plus `roundings` * eps(dtype)
    where layers round their results to a narrower `dtype` (half precision sums in float32)."""
    return K_MAX * eps(accumulate or dtype) + roundings * eps(dtype)


def close(got: torch.Tensor, ref: torch.Tensor) -> bool:
    """`got` equals the reference `ref` within the rounding of a workflow in ref's dtype:
    max |got - ref| <= relative_tolerance * max |ref| (see the module's docstring)."""
    err = float((got.detach().double() - ref.detach().double()).abs().max())
    return err <= relative_tolerance(ref.dtype) * float(ref.detach().abs().max())


def reduction_length(weight: torch.Tensor) -> int:
    """The length of each output's dot product for a Linear weight [out, in] (in_features) or
    a convolution weight [out, in / groups, *kernel] (input channels times kernel elements)."""
    return weight[0].numel()


def reference(op: Callable, x: torch.Tensor, weights: Sequence[torch.Tensor],
              bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`op(x, weight, bias)` in float64 for weight = sum(weights), and its magnitude
    `op(|x|, sum(|w|), |bias|)`. Give the weight as the terms the computation under test adds
    (the layer's weight, each adapter's difference), so that the magnitude covers each term's
    sums even where terms cancel."""
    x64 = x.detach().double()
    w64 = [w.detach().double() for w in weights]
    b64 = None if bias is None else bias.detach().double()
    ref = op(x64, sum(w64), b64)
    magnitude = op(x64.abs(), sum(w.abs() for w in w64), None if b64 is None else b64.abs())
    return ref, magnitude


def tolerance(magnitude: torch.Tensor, k: int, dtype: torch.dtype, *, accumulate: torch.dtype | None = None,
              roundings: int = 0) -> torch.Tensor:
    """Elementwise tolerance of one layer's results whose exact values are sums of `k` terms
    (products and a bias) of `magnitude` (see `reference`): LAMBDA * sqrt(k) * u of the type the
    sums are carried in (`accumulate`, default `dtype`), plus `roundings` * eps(dtype) for values
    rounded to `dtype` outside those sums (half precision sums in float32, then rounds)."""
    u = eps(accumulate or dtype) / 2
    return (LAMBDA * math.sqrt(k) * u + roundings * eps(dtype)) * magnitude.detach()


def error_ratio(got: torch.Tensor, ref: torch.Tensor, tol: torch.Tensor) -> float:
    """max |got - ref| / tol (0 where both are 0): at most 1 when `got` is within tolerance."""
    err = (got.detach().double() - ref.detach().double()).abs()
    return float(torch.where(err == 0, torch.zeros_like(err), err / tol).max())
