"""The base weight a copy is built from, on the device: what ComfyUI's cast hands the layer.

Under dynamic VRAM a weight that comfy-aimdo does not hold on the device comes through the cast
from the model file by way of pinned host memory, one layer and one stream sync at a time, and
stays in comfy-aimdo's memory after. A merged copy takes that way: the layer's "off" runs and the
copy's rebuilds (a strength change, a switch) then find the weight resident. A copy of the base
weight (a sweep's layer without adapters of its own) is built once and kept, and serves the layer
in place of the cast: where the cast would hand over the stored tensor as it is (the compute
dtype, no weight functions or lowvram patches, not quantized), comfy-aimdo's file reader puts the
same bytes straight into a tensor of ours, several times faster (an H200: SDXL's 4.2 GiB of
linear weights in 0.64 s against 1.9 s through the cast, Flux's 22 GiB in 1.6 s against 3.8 s),
and comfy-aimdo's memory is not spent on a second copy. A weight comfy-aimdo holds resident comes
through the cast, which is then a device copy.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import NamedTuple

import comfy.ops
import torch

from .form_base import weight_of

_memory_management: ModuleType | None
try:  # ComfyUI with dynamic VRAM; before it (0.3.75) no weight is read from its file
    _memory_management = importlib.import_module("comfy.memory_management")
except ImportError:
    _memory_management = None

# comfy-aimdo's vbar page (VBAR_PAGE_SIZE); its residency flags are per page.
_VBAR_PAGE = 32 << 20
_PLAIN = (torch.Tensor, torch.nn.Parameter)


class Base(NamedTuple):
    weight: torch.Tensor
    bias: torch.Tensor | None
    # read from the model file into tensors of ours, which a copy may keep as they are; else
    # ComfyUI's or comfy-aimdo's, valid only inside `base_of`'s block
    from_file: bool


@contextmanager
def base_of(module: torch.nn.Module, dtype: torch.dtype, device: torch.device,
            file_ok: bool = False) -> Iterator[Base]:
    """The layer's weight and bias as its forward's cast would hand them over, on `device` in
    `dtype`; `file_ok`: read from the model file where that gives the same tensor and the weight
    is not resident."""
    read = _from_file(module, dtype, device) if file_ok else None
    if read is not None:
        yield read
        return
    weight, bias, stream = comfy.ops.cast_bias_weight(module, dtype=dtype, device=device, bias_dtype=dtype,
                                                      offloadable=True)
    try:
        yield Base(weight, bias, False)
    finally:
        comfy.ops.uncast_bias_weight(module, weight, bias, stream)


def _from_file(module: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> Base | None:
    read_into = getattr(_memory_management, "read_tensor_file_slice_into", None)
    if read_into is None or getattr(module, "_v", None) is None or device.type != "cuda":
        return None  # not a layer comfy-aimdo streams from its file
    params: tuple[torch.Tensor | None, ...] = (weight_of(module), getattr(module, "bias", None))
    for name, t in zip(("weight", "bias"), params, strict=True):
        if t is None:
            continue
        if (getattr(module, name + "_function", None) or getattr(module, name + "_lowvram_function", None)
                or type(t) not in _PLAIN or t.is_meta or t.dtype != dtype
                or getattr(t, "_model_dtype", t.dtype) != dtype):
            return None  # the cast converts or patches it: only the cast gives the same tensor
    if _maybe_resident(module):
        return None
    stream = torch.cuda.current_stream(device)
    out: list[torch.Tensor | None] = []
    for t in params:
        if t is None:
            out.append(None)
            continue
        dest = torch.empty(t.shape, dtype=t.dtype, device=device)
        try:
            read = read_into(t, dest, stream=stream)
        except (TypeError, RuntimeError):
            # a ComfyUI whose reader takes no stream, or comfy-aimdo's reader failing: the cast
            # still gives the weight
            return None
        if not read:
            return None  # not a slice of a model file it can read
        out.append(dest)
    assert out[0] is not None
    return Base(out[0], out[1], True)


def _maybe_resident(module: torch.nn.Module) -> bool:
    """Whether comfy-aimdo may hold the layer's weight on the device: it was cast into its vbar
    and the pages are still there (the cast checks their signature; a page evicted and faulted
    again for a neighbour only makes the cast stream it)."""
    if getattr(module, "_v_signature", None) is None:
        return False
    v: tuple = module._v  # type: ignore[assignment]  # comfy-aimdo's (vbar, address, bytes)
    vbar, addr, size = v
    residency = getattr(vbar, "get_residency", None)
    if residency is None:
        return True  # this comfy-aimdo cannot tell: the cast decides
    start = addr - vbar.base_addr
    pages = residency()[start // _VBAR_PAGE:(start + max(size, 1) - 1) // _VBAR_PAGE + 1]
    return bool(pages) and all(p & 1 for p in pages)
