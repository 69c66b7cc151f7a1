"""What one execution of the LoRA Cache Sweep node does: the cached entries of its LoRAs, the
settings per image, and the clone that runs them in one batched sampling (sweep.py)."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, NamedTuple

from . import adapters, build, capabilities, files, load_state, scope, service, sweep
from .errors import LoraCacheError
from .events import Event, record
from .memory import MEMORY

if TYPE_CHECKING:
    from .store import Entry


class SweepResult(NamedTuple):
    model: object  # ModelPatcher (ComfyUI's, untyped)
    clip: object | None
    batch_size: int
    labels: list[str]
    event: Event


def _entry(patcher, lora_name: str) -> tuple[Entry, bool]:
    """The cached entry of `lora_name` for the patcher's model with its factors on the layers, and
    whether it was built now. A sweep has no patch-path fallback (ComfyUI merges one strength
    into the weight for the whole batch), so what the cached path cannot serve is an error."""
    ident = files.identify(files.resolve(lora_name), lora_name)

    def patches_of() -> dict:
        sd = adapters.read_file(ident, lora_name)
        unet_p, _ = adapters.split_patches(sd, patcher, None, lora_name)
        if not unet_p:
            raise LoraCacheError(f"LoRA file '{lora_name}' has no LoRA keys for this diffusion model "
                                 f"({len(sd)} tensors, none match ComfyUI's key map)")
        return unet_p

    found = build.entry_for(patcher, lora_name, ident, patches_of)
    entry = found.entry
    built = not entry.factors_made
    build.make_factors(entry, patcher)
    if entry.cache_problem is not None:
        raise LoraCacheError(f"LoRA Cache Sweep: '{lora_name}' cannot run per image: {entry.cache_problem}")
    for path, forms in entry.layers.items():
        problem = sweep.form_problem(forms)
        if problem is not None:
            raise LoraCacheError(f"LoRA Cache Sweep: '{lora_name}' on {path}: {problem}; sweep LoRA, LoCon, LoHa "
                                 f"or LoKr files")
    if load_state.unattached_problem(entry) is not None:
        MEMORY.reattach(entry, patcher)
    return entry, built


def apply_sweep(model, clip, lora_names: list[str], strengths_text: str, strength_clip: float = 1.0,
                node_id: str | None = None) -> SweepResult:
    """Image i of the latent batch gets setting i of the grid LoRAs x strengths (LoRA-major)."""
    t0 = time.perf_counter()
    names = [n for n in lora_names if n not in (None, "", "None")]
    if not names:
        raise LoraCacheError("LoRA Cache Sweep: no LoRA selected")
    if len(set(names)) != len(names):
        raise LoraCacheError(f"LoRA Cache Sweep: a LoRA is selected twice ({', '.join(names)}); "
                             f"put its strengths in the strengths list")
    adapters.check_strength(names[0], strength_clip=strength_clip)
    settings = sweep.settings(names, sweep.parse_strengths(strengths_text))
    problem = capabilities.cached_path_problem(model)
    if problem is not None:
        raise LoraCacheError(f"LoRA Cache Sweep: per-image strengths need the cached path, which this model "
                             f"cannot take: {problem}")
    MEMORY.sweep_unloaded()
    found = [_entry(model, n) for n in names]
    entries = tuple(e for e, _ in found)
    sw = sweep.Sweep(entries, settings, seen={k: len(v) for k, v in model.patches.items()}, node=node_id)
    out_model = scope.carry_sweep(model, sw)
    out_clip, clip_note = clip, None
    if clip is not None:
        if len(names) > 1:
            clip_note = "unchanged (one text encoding serves every image; several LoRAs are swept)"
        elif strength_clip == 0:
            clip_note = "unchanged (strength_clip 0)"
        else:
            _, out_clip, ev = service.apply(None, clip, names[0], 0.0, strength_clip, True, "auto",
                                            None if node_id is None else f"{node_id}:clip", notify=False)
            clip_note = (f"{ev.clip_path} at strength {strength_clip:g} for every image (one text encoding serves "
                         f"the whole batch): {ev.reason}")
    built = [n for n, (_, b) in zip(names, found, strict=True) if b]
    reason = (f"sweep of {len(settings)} images ({', '.join(sw.labels)}); at sampling: unmerged, each image at "
              f"its strength" + (f"; built {', '.join(built)}" if built else "; cached adapters"))
    ev = record(Event(lora=", ".join(names), path="build" if built else "fast", reason=reason, node=node_id,
                      clip=clip_note, clip_path=None, ms=(time.perf_counter() - t0) * 1000.0))
    return SweepResult(out_model, out_clip, len(settings), sw.labels, ev)
