"""GPU check of an adapter's factors moving through one arena (lora_cache/arena.py) the way the
memory owner moves them (memory.move_factors): every copy queued asynchronously on the current
stream, the tensors handed back as views, one wait at the end. The stream is held back first
(`torch.cuda._sleep`), so the copies are still queued while the tensors they read are dropped and
new device and page-locked blocks are taken and overwritten; after the one wait every value must
be the source's. Both ways (into page-locked host pieces and back into one device block), with
host pieces of the memory owner's size and of 64 KiB, over factors like a build makes: shared down
projections with column views, transposed views, odd offsets, three dtypes. Runs under the
allocator ComfyUI's main.py picks (host.boot). Prints a JSON report; on a GPU machine, from the
repository root: COMFYUI_DIR=path/to/ComfyUI PYTHONPATH=testkit python3 scripts/gpu_arena_check.py
"""
from __future__ import annotations

import importlib
import json
import sys

from lora_cache_testkit import host

host.boot(cpu=False)

import torch

HOLD_CYCLES = 200_000_000  # about 0.1 s of the device's clock: the copies queue behind it


def factors(device: torch.device) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for i in range(300):
        dtype = (torch.bfloat16, torch.float16, torch.float32)[i % 3]
        rank, n, m = 1 + i % 33, 64 + 7 * i, 96 + 5 * i
        down = torch.randn(n, 3 * rank, device=device).to(dtype)
        out += [down] + [down[:, k * rank:(k + 1) * rank] for k in range(3)]
        out.append(torch.randn(rank, m, device=device).to(dtype).t())
        out.append(torch.randn(m, device=device).to(dtype)[1:])
    return out


def scribble(device: torch.device) -> list[torch.Tensor]:
    """New device and page-locked blocks, overwritten: where a source's block were handed out
    before its copy ran, the copy would read these bytes."""
    junk = [torch.full((1 << 20,), 7, dtype=torch.uint8, device=device) for _ in range(64)]
    return junk + [torch.full((n,), 7, dtype=torch.uint8, pin_memory=True) for n in (1 << 20, 1 << 22, 1 << 26)]


def move(arena_mod, tensors: list[torch.Tensor], dest: torch.device, device: torch.device,
         piece: int | None) -> list[torch.Tensor]:
    """As memory.move_factors: one arena, every tensor placed, the sources dropped, one wait."""
    torch.cuda._sleep(HOLD_CYCLES)
    place = arena_mod.Arena(tensors, dest, pin=dest.type == "cpu", piece=piece, non_blocking=True)
    moved = [place(t) for t in tensors]
    tensors.clear()  # the layers now hold the moved tensors
    junk = scribble(device)
    torch.cuda.current_stream(device).synchronize()
    del junk, place
    return moved


def main() -> int:
    arena_mod = importlib.import_module(host.load_package().__name__ + ".lora_cache.arena")
    device = torch.device("cuda", torch.cuda.current_device())
    report: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, **host.allocator_report(),
                    "runs": []}
    torch.manual_seed(0)
    for piece in (arena_mod.PIECE, 1 << 16):
        made = factors(device)
        ref = [t.cpu() for t in made]
        offsets = [t.data_ptr() % 16 for t in made]
        on_host = move(arena_mod, made, torch.device("cpu"), device, piece)
        back = move(arena_mod, list(on_host), device, device, None)
        for way, got in (("to host", on_host), ("back", back)):
            report["runs"].append({
                "way": way, "piece": piece, "tensors": len(got),
                "equal": sum(torch.equal(a, b.cpu()) for a, b in zip(ref, got, strict=True)),
                "aligned": sum(b.data_ptr() % 16 == o for b, o in zip(got, offsets, strict=True)),
                "pinned": sum(b.is_pinned() for b in got) if way == "to host" else None,
                "blocks": len({b.untyped_storage().data_ptr() for b in got}),
            })
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
