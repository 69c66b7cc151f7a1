"""How outputs are compared with stock: the dynamic path adds the low-rank product to the
output while stock rounds merged weights, so equal means equal within float tolerance."""
import torch

RTOL, ATOL = 1e-4, 2e-4


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=RTOL, atol=ATOL)
