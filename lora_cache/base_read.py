"""The base weight a copy is built from, on the device: what ComfyUI's cast hands the layer.

Under dynamic VRAM a weight that comfy-aimdo does not hold on the device comes through the cast
from the model file by way of pinned host memory, one layer and one stream sync at a time, and
stays in comfy-aimdo's memory after. A merged copy takes that way: the layer's "off" runs and the
copy's rebuilds (a strength change, a switch) then find the weight resident. Copies of the base
weight (a sweep's layers without adapters of their own) are built once and kept, and serve their
layers in place of the cast: where the cast would hand over the stored tensor as it is (the
compute dtype, no weight functions or lowvram patches, not quantized), comfy-aimdo's file reader
puts the same bytes straight into tensors of ours, and comfy-aimdo's memory is not spent on a
second copy. The reader is called once per span of the file that holds adjacent layers (at most
`_SPAN` bytes), not once per tensor: its cost is per call (an H200: SDXL's 743 linear weights,
4.2 GiB, in 0.2 s over 33 spans, 0.6 s per tensor, 1.7-2.3 s through the cast). A weight
comfy-aimdo holds resident comes through the cast, which is then a device copy.
"""
from __future__ import annotations

import importlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any, NamedTuple

import comfy.ops
import torch

from .form_base import weight_of

log = logging.getLogger("lora_cache")

_host_buffer: ModuleType | None
try:  # comfy-aimdo, which ComfyUI's dynamic VRAM streams with; without it no weight is read from its file
    _host_buffer = importlib.import_module("comfy_aimdo.host_buffer")
except (ImportError, OSError):
    _host_buffer = None

# comfy-aimdo's vbar page (VBAR_PAGE_SIZE); its residency flags are per page.
_VBAR_PAGE = 32 << 20
_PLAIN = (torch.Tensor, torch.nn.Parameter)
# One read of the file covers adjacent tensors up to this size; a gap of at most `_GAP` bytes
# (norms, biases, convolutions between two layers) is read along rather than split.
_SPAN = 256 << 20
_GAP = 1 << 20


class Base(NamedTuple):
    weight: torch.Tensor
    bias: torch.Tensor | None
    # read from the model file into tensors of ours, which a copy may keep as they are; else
    # ComfyUI's or comfy-aimdo's, valid only inside `base_of`'s block
    from_file: bool


@contextmanager
def base_of(module: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> Iterator[Base]:
    """The layer's weight and bias as its forward's cast hands them over, on `device` in
    `dtype`."""
    weight, bias, stream = comfy.ops.cast_bias_weight(module, dtype=dtype, device=device, bias_dtype=dtype,
                                                      offloadable=True)
    try:
        yield Base(weight, bias, False)
    finally:
        comfy.ops.uncast_bias_weight(module, weight, bias, stream)


class _Slice(NamedTuple):
    """One stored tensor of a layer and where the model file holds it."""

    module_id: int
    name: str
    tensor: torch.Tensor
    file_ref: Any
    offset: int
    size: int


def read_from_file(modules: list[torch.nn.Module], dtype: torch.dtype,
                   device: torch.device) -> dict[int, Base]:
    """The base weights (and biases) of those of `modules` whose cast would hand over the stored
    tensor as it is and whose weight comfy-aimdo does not hold on the device, read from the model
    file into tensors of ours on `device`, by module id. The others, and any the reader fails or
    the device has no room for, are left to the cast."""
    reader = getattr(_host_buffer, "read_file_to_device", None)
    if reader is None or device.type != "cuda":
        return {}
    pages: dict[int, list[int]] = {}
    slices = [s for m in modules if not _maybe_resident(m, pages) for s in _slices_of(m, dtype)]
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(device)
    got: dict[tuple[int, str], torch.Tensor] = {}
    buf: torch.Tensor | None = None
    for span in _spans(slices):
        start = span[0].offset
        size = max(s.offset + s.size for s in span) - start
        buf = None  # the last span's buffer goes before the next one is allocated
        try:
            buf = torch.empty(size, dtype=torch.uint8, device=device)
            # queued on the current stream, so the copies below follow it
            reader(span[0].file_ref, start, size, stream.cuda_stream, buf.data_ptr(), index, mark_cold=False)
            for s in span:
                t = torch.empty(s.tensor.shape, dtype=s.tensor.dtype, device=device)
                # through bytes: a tensor's offset in the span need not suit its dtype's alignment
                t.view(-1).view(torch.uint8).copy_(buf[s.offset - start:s.offset - start + s.size])
                got[(s.module_id, s.name)] = t
        except torch.OutOfMemoryError:
            break  # what was read serves, the cast gives the rest
        except (TypeError, RuntimeError) as e:
            # a comfy-aimdo whose reader differs or fails: this span's layers take the cast
            log.debug("[LoRA Cache] reading %d bytes of the model file failed (%s); those layers take the cast",
                      size, e)
    buf = None
    if got:
        # the span buffers go back to the driver, where comfy-aimdo can place weights
        torch.cuda.empty_cache()
    out: dict[int, Base] = {}
    for m in modules:
        weight = got.get((id(m), "weight"))
        bias = got.get((id(m), "bias"))
        if weight is not None and (bias is not None or getattr(m, "bias", None) is None):
            out[id(m)] = Base(weight, bias, True)
    return out


def _slices_of(module: torch.nn.Module, dtype: torch.dtype) -> list[_Slice]:
    """The layer's weight and bias as slices of its model file, or none where the cast would not
    hand over the stored tensor as it is or the file does not hold it whole."""
    if getattr(module, "_v", None) is None:
        return []  # not a layer comfy-aimdo streams from its file
    out = []
    for name, t in (("weight", weight_of(module)), ("bias", getattr(module, "bias", None))):
        if t is None:
            continue
        if (getattr(module, name + "_function", None) or getattr(module, name + "_lowvram_function", None)
                or type(t) not in _PLAIN or t.is_meta or t.dtype != dtype
                or getattr(t, "_model_dtype", t.dtype) != dtype):
            return []  # the cast converts or patches it: only the cast gives the same tensor
        # what ComfyUI's loader records on a tensor it maps from a safetensors file
        info = getattr(t.untyped_storage(), "_comfy_tensor_file_slice", None)
        if (info is None or info.file_ref is None or t.numel() * t.element_size() != info.size
                or t.storage_offset() != 0 or not t.is_contiguous()):
            return []
        out.append(_Slice(id(module), name, t, info.file_ref, info.offset, info.size))
    return out


def _spans(slices: list[_Slice]) -> list[list[_Slice]]:
    """`slices` grouped into reads: by file and offset, each span at most `_SPAN` bytes (or one
    larger tensor) with gaps of at most `_GAP` bytes."""
    spans: list[list[_Slice]] = []
    end = 0
    for s in sorted(slices, key=lambda s: (id(s.file_ref), s.offset)):
        span = spans[-1] if spans else None
        if (span is not None and span[0].file_ref is s.file_ref and s.offset - end <= _GAP
                and s.offset + s.size - span[0].offset <= _SPAN):
            span.append(s)
            end = max(end, s.offset + s.size)
        else:
            spans.append([s])
            end = s.offset + s.size
    return spans


def _maybe_resident(module: torch.nn.Module, pages: dict[int, list[int]]) -> bool:
    """Whether comfy-aimdo may hold the layer's weight on the device: it was cast into its vbar
    and the pages are still there (the cast checks their signature; a page evicted and faulted
    again for a neighbour only makes the cast stream it). `pages`: each vbar's residency flags,
    read once per call of read_from_file (a read copies every page's flag)."""
    if getattr(module, "_v_signature", None) is None:
        return False
    v: tuple = module._v  # type: ignore[assignment]  # comfy-aimdo's (vbar, address, bytes)
    vbar, addr, size = v
    residency = getattr(vbar, "get_residency", None)
    if residency is None:
        return True  # this comfy-aimdo cannot tell: the cast decides
    flags = pages.get(id(vbar))
    if flags is None:
        flags = pages[id(vbar)] = residency()
    start = addr - vbar.base_addr
    mine = flags[start // _VBAR_PAGE:(start + max(size, 1) - 1) // _VBAR_PAGE + 1]
    return bool(mine) and all(p & 1 for p in mine)
