"""One allocation for all of an adapter's tensors in one place (its device, or host memory).

A rank-32 Flux LoRA is about a thousand small tensors. Moved one by one, each is an allocation
and a copy: a thousand page-locked host allocations the first time the factors leave the device,
a thousand copies each way, and on the device a thousand blocks among torch's others, whose
freed places stay in segments that also hold live tensors. An `Arena` takes the tensors' bytes
into one buffer instead, and hands each tensor back as a view of it with its own shape, strides
and offset: views of one storage (a shared down projection and its columns) stay views of one
copy, and when the adapter moves again, the whole buffer is freed at once.

Host memory comes in pieces of at most `PIECE` bytes, each a power of two where page-locked:
torch's page-locked allocator rounds every allocation up to one (a Flux LoRA's 328 MiB in one
block would take 512 MiB) and keeps freed blocks for the next allocation of the same size, so
pieces of one size serve every adapter that moves after, whatever its size.
"""
from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import NamedTuple

import torch

_ALIGN = 256  # bytes: every run starts where any dtype's view and CUDA's kernels want it
_WIDEST = 16  # bytes: a run starts at a multiple of this in its storage, so any dtype divides it
PIECE = 64 << 20  # bytes: the largest page-locked piece
_SMALLEST = 1 << 20  # bytes: the smallest page-locked piece
_GAP = 1 << 20  # bytes between two tensors of one storage beyond which they are copied apart


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """The bytes of `t`'s storage that `t` reaches: [start, end)."""
    size = t.element_size()
    first = int(t.storage_offset())
    last = first + sum((int(n) - 1) * int(st) for n, st in zip(t.shape, t.stride(), strict=True))
    return first * size, (last + 1) * size


def _key(t: torch.Tensor) -> tuple[torch.device, int]:
    return t.device, t.untyped_storage().data_ptr()


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _moved(t: torch.Tensor, device: torch.device, pin: bool, non_blocking: bool) -> torch.Tensor:
    """`t` on `device`. To the host with `pin`: into page-locked memory, asynchronously from a
    CUDA device with `non_blocking` (the caller synchronizes once for all of an entry's tensors: a
    copy to pageable memory, then pinning it, costs a sync and a page-locked allocation per
    tensor)."""
    if device.type != "cpu":
        return t.to(device, non_blocking=non_blocking)
    if pin and t.device.type == "cuda":
        try:
            out = torch.empty(t.shape, dtype=t.dtype, device=device, pin_memory=True)
        except RuntimeError:
            return t.detach().to(device, copy=True)
        return out.copy_(t.detach(), non_blocking=non_blocking)
    out = t.detach().to(device, copy=True)
    if pin:
        try:
            out = out.pin_memory()  # the copy back to the device is then asynchronous-capable
        except RuntimeError:
            pass
    return out


class _Run(NamedTuple):
    """Bytes [lo, hi) of one source storage, copied as one to `start` in piece `piece`."""

    lo: int
    hi: int
    piece: int
    start: int


def _islands(extents: list[tuple[int, int]]) -> list[list[int]]:
    """The byte ranges of a storage its tensors reach, each from a multiple of `_WIDEST`, those
    that overlap joined (a shared down projection and the views of its columns are one island):
    no two islands share a byte, so a tensor lies in exactly one."""
    out: list[list[int]] = []
    for lo, hi in sorted(extents):
        lo -= lo % _WIDEST
        if out and lo < out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return out


class _Layout:
    """Where each island goes: runs of neighbouring islands of one storage, each run copied as
    one, in one piece without a limit (`piece` None), or in pieces of at most `piece` bytes, an
    island put into the first piece with room for it; with `pow2` each piece is a power of two,
    else as large as what it holds."""

    def __init__(self, piece: int | None, total: int, pow2: bool):
        assert piece is None or piece & (piece - 1) == 0, f"a piece of {piece} bytes is not a power of two"
        self.limit, self.pow2 = piece, pow2
        self.left = total  # island bytes not placed yet, which sizes the pieces to come
        self.sizes: list[int] = []
        self.used: list[int] = []
        self.runs: dict[tuple[torch.device, int], list[_Run]] = {}

    def _open(self, need: int) -> int:
        if self.limit is None:
            size = 0
        elif self.left >= min(_SMALLEST, self.limit):
            # the largest power of two within what is left; under the smallest piece, what is
            # left rounded up (torch rounds it so anyway)
            size = max(min(self.limit, 1 << (self.left.bit_length() - 1)), _pow2(need))
        else:
            size = max(_pow2(self.left), _pow2(need))
        self.sizes.append(size)
        self.used.append(0)
        return len(self.sizes) - 1

    def _fits(self, piece: int, end: int) -> bool:
        return self.limit is None or end <= self.sizes[piece]

    def place(self, key: tuple[torch.device, int], islands: list[list[int]]) -> None:
        runs = self.runs.setdefault(key, [])
        for lo, hi in islands:
            run = runs[-1] if runs else None
            if run is not None and lo - run.hi <= _GAP and self.used[run.piece] == run.start + run.hi - run.lo \
                    and self._fits(run.piece, run.start + hi - run.lo):  # the run ends its piece: it grows
                runs[-1] = run._replace(hi=hi)
                self.used[run.piece] = run.start + hi - run.lo
            else:
                piece = next((p for p in range(len(self.sizes))
                              if self._fits(p, _aligned(self.used[p]) + hi - lo)), None)
                if piece is None:
                    piece = self._open(hi - lo)
                start = _aligned(self.used[piece])
                runs.append(_Run(lo, hi, piece, start))
                self.used[piece] = start + hi - lo
            self.left -= hi - lo

    def pieces(self) -> list[int]:
        if self.limit is None:  # the one piece, as large as what it holds
            return [_aligned(self.used[0]) if self.used else 0]
        return self.sizes if self.pow2 else [_aligned(n) for n in self.used]


def _layout(islands: dict[tuple[torch.device, int], list[list[int]]], piece: int | None,
            pow2: bool = False) -> _Layout:
    layout = _Layout(piece, sum(hi - lo for isl in islands.values() for lo, hi in isl), pow2)
    for key, isl in islands.items():
        layout.place(key, isl)
    return layout


class Arena:
    """A `form_base.Place` on `device` (page-locked on the host with `pin`) that holds
    `tensors` (every tensor the move will place, views included) in one buffer, or in pieces of
    at most `piece` bytes (host memory takes `PIECE`), each a power of two where page-locked. A
    tensor placed that is not in `tensors` is copied on its own. With `non_blocking` copies are
    queued without a wait, and the caller synchronizes once for all (a copy to page-locked memory
    or to a device is then asynchronous); the sources are held until the arena goes, so no
    storage a queued copy reads is freed before that wait."""

    def __init__(self, tensors: Iterable[torch.Tensor], device: torch.device, pin: bool = False,
                 piece: int | None = None, non_blocking: bool = False):
        self.device, self.pin, self.non_blocking = torch.device(device), pin, non_blocking
        page_locked = pin and self.device.type == "cpu"  # laid out for it, whether or not CUDA can give it
        pinned = page_locked and torch.cuda.is_available()
        extents: dict[tuple[torch.device, int], list[tuple[int, int]]] = {}
        # each storage held while the arena lives: its address keys it (a storage freed meanwhile
        # could hand that address to another), and a queued copy may still read it
        self._sources: dict[tuple[torch.device, int], torch.UntypedStorage] = {}
        self._copied: set[tuple[torch.device, int]] = set()
        for t in tensors:
            if t.numel() == 0:
                continue
            key = _key(t)
            extents.setdefault(key, []).append(_extent(t))
            self._sources.setdefault(key, t.untyped_storage())
        islands = {key: _islands(ex) for key, ex in extents.items()}
        layout = _layout(islands, piece, pow2=page_locked)
        sizes = layout.pieces()
        if piece is not None and page_locked:
            # large islands (a dense update's) can leave pieces part empty: one block, rounded
            # up to a power of two as torch would, where that takes less
            whole = _layout(islands, None)
            block = _pow2(whole.pieces()[0])
            if block < sum(sizes):
                layout, sizes = whole, [block]
        self._runs = layout.runs
        self.buffers = [self._allocate(n, pinned) for n in sizes]
        self.nbytes = sum(b.numel() for b in self.buffers)
        self._views: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    @property
    def buffer(self) -> torch.Tensor:
        """The one buffer of an arena without pieces."""
        assert len(self.buffers) == 1, f"{len(self.buffers)} pieces"
        return self.buffers[0]

    def _allocate(self, nbytes: int, pinned: bool) -> torch.Tensor:
        if pinned:
            try:
                return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            except RuntimeError:  # no page-locked memory left: pageable, as `_moved` falls back
                pass
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def _run_of(self, key: tuple[torch.device, int], first: int, end: int) -> _Run | None:
        runs = self._runs.get(key)
        if not runs:
            return None
        i = bisect.bisect_right(runs, first, key=lambda r: r.lo) - 1
        if i < 0 or end > runs[i].hi:  # reaches past what the tensors given at the start reach
            return None
        return runs[i]

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if t.numel() == 0:
            return _moved(t, self.device, self.pin, self.non_blocking)
        key = _key(t)
        first, end = _extent(t)
        run = self._run_of(key, first, end)
        if run is None:
            return _moved(t, self.device, self.pin, self.non_blocking)
        if key not in self._copied:  # its first tensor: the storage's runs come over, each as one copy
            self._copied.add(key)
            src = torch.empty(0, dtype=torch.uint8, device=t.device).set_(self._sources[key]).detach()
            for r in self._runs[key]:
                self.buffers[r.piece][r.start:r.start + r.hi - r.lo].copy_(src[r.lo:r.hi],
                                                                            non_blocking=self.non_blocking)
        view = self._views.get((run.piece, t.dtype))
        if view is None:
            view = self._views[(run.piece, t.dtype)] = self.buffers[run.piece].view(t.dtype)
        return view.as_strided(t.shape, t.stride(), (run.start - run.lo) // t.element_size() + t.storage_offset())
