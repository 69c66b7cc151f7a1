"""One allocation for all of an adapter's tensors in one place (its device, or host memory).

A rank-32 Flux LoRA is about a thousand small tensors. Moved one by one, each is an allocation
and a copy: a thousand page-locked host allocations the first time the factors leave the device,
a thousand copies each way, and on the device a thousand blocks among torch's others, whose
freed places stay in segments that also hold live tensors. An `Arena` takes the tensors' bytes
into one buffer instead, and hands each tensor back as a view of it with its own shape, strides
and offset: views of one storage (a shared down projection and its columns) stay views of one
copy, and when the adapter moves again, the whole buffer is freed at once.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from .form_base import moved

_ALIGN = 256  # bytes: every span starts where any dtype's view and CUDA's kernels want it
_WIDEST = 16  # bytes: a span starts at a multiple of this in its storage, so any dtype divides it


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """The bytes of `t`'s storage that `t` reaches: [start, end)."""
    size = t.element_size()
    first = int(t.storage_offset())
    last = first + sum((int(n) - 1) * int(st) for n, st in zip(t.shape, t.stride(), strict=True))
    return first * size, (last + 1) * size


def _key(t: torch.Tensor) -> tuple[torch.device, int]:
    return t.device, t.untyped_storage().data_ptr()


class Arena:
    """A `form_base.Place` on `device` (page-locked on the host with `pin`) that holds
    `tensors` (every tensor the move will place, views included) in one buffer. Each storage
    they use gets one span, the bytes from the first one of them reaches to the last; a tensor
    placed that is not in `tensors` is copied on its own. Copies are queued without a wait: the
    caller synchronizes once for all (a copy to page-locked memory or to a device is
    asynchronous)."""

    def __init__(self, tensors: Iterable[torch.Tensor], device: torch.device, pin: bool = False):
        self.device, self.pin = torch.device(device), pin
        spans: dict[tuple[torch.device, int], list[int]] = {}
        # each storage held until its bytes are copied: its address keys it, and a storage freed
        # meanwhile could hand that address to another
        self._sources: dict[tuple[torch.device, int], torch.UntypedStorage] = {}
        for t in tensors:
            if t.numel() == 0:
                continue
            lo, hi = _extent(t)
            key = _key(t)
            span = spans.setdefault(key, [lo, hi])
            span[0], span[1] = min(span[0], lo), max(span[1], hi)
            self._sources.setdefault(key, t.untyped_storage())
        # storage key -> where its span starts in the buffer, and the span in the storage
        self._at: dict[tuple[torch.device, int], tuple[int, int, int]] = {}
        total = 0
        for key, (lo, hi) in spans.items():
            lo -= lo % _WIDEST
            self._at[key] = (total, lo, hi)
            total += -(-(hi - lo) // _ALIGN) * _ALIGN
        self.nbytes = total
        self.buffer = self._allocate(total)
        self._views: dict[torch.dtype, torch.Tensor] = {}

    def _allocate(self, nbytes: int) -> torch.Tensor:
        if self.pin and self.device.type == "cpu" and torch.cuda.is_available():
            try:
                return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            except RuntimeError:  # no page-locked memory left: pageable, as `moved` falls back
                pass
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        key = _key(t)
        at = self._at.get(key)
        if at is None or t.numel() == 0:
            return moved(t, self.device, self.pin)
        start, lo, hi = at
        first, end = _extent(t)
        if first < lo or end > hi:  # reaches past what the tensors given at the start reach
            return moved(t, self.device, self.pin)
        storage = self._sources.pop(key, None)
        if storage is not None:  # its first tensor: the span's bytes come over once
            src = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)[lo:hi]
            self.buffer[start:start + hi - lo].copy_(src.detach(), non_blocking=True)
        view = self._views.get(t.dtype)
        if view is None:
            view = self._views[t.dtype] = self.buffer.view(t.dtype)
        size = t.element_size()
        return view.as_strided(t.shape, t.stride(), (start - lo) // size + t.storage_offset())
