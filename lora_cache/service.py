"""What one execution of a LoRA Cache node does: gather the facts of each side (diffusion model,
text encoder), let decision.py choose the path, and return the clones that carry the result.
Node classes call `apply` / `apply_stack` and nothing else."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from . import adapters, build, capabilities, decision, files, load_state, scope
from .decision import Decision, Facts
from .errors import LoraCacheError
from .events import Event, record
from .memory import MEMORY
from .store import STORE, Entry


class LastRun(NamedTuple):
    lora: str
    strength: float


# (node key, side) -> that node's last run on the cached path: the reason string says what
# changed ("switch a->b", "strength 0.8->0.6").
_last_run: dict[tuple[str, str], LastRun] = {}
_PATH_WEIGHT = {"off": 0, "fast": 1, "build": 2, "full": 3}


def fingerprint(lora_name: str | None, enabled: bool) -> str | float:
    """The node's change fingerprint (IS_CHANGED): the file's identity and the cache generation,
    so a rewritten file, a purge or factors moved off the device make ComfyUI execute the node
    again."""
    if not enabled or lora_name in (None, "", "None"):
        return "off"
    try:
        ident = files.identify(files.resolve(lora_name), lora_name)
    except LoraCacheError:
        return float("nan")  # always "changed": the node runs and reports the error itself
    return f"{ident.size}:{ident.mtime_ns}:{ident.ctime_ns}:{ident.inode}:{STORE.generation}"


@dataclass
class _Side:
    """The diffusion model or the text encoder: what the node patches and how."""

    name: Literal["model", "clip"]
    obj: Any  # ModelPatcher, or comfy.sd.CLIP (ComfyUI's, untyped)
    strength: float

    @property
    def patcher(self):
        return self.obj if self.name == "model" else self.obj.patcher

    def full(self, patches: dict):
        n = self.obj.clone()
        n.add_patches(patches, self.strength)
        return n

    def cached(self, entry: Entry, mode: str, node: str | None):
        if self.name == "model":
            return scope.carry(self.obj, entry, self.strength, mode, node)
        return scope.carry_clip(self.obj, entry, self.strength, node)


def _what_changed(key: tuple[str, str] | None, entry: Entry, lora: str, strength: float) -> str | None:
    last = _last_run.get(key) if key is not None else None
    if last is None and entry.last_strength is not None:
        last = LastRun(lora, entry.last_strength)
    if last is None:
        return None
    if last.lora != lora:
        return f"switch {last.lora}->{lora}"
    if last.strength != strength:
        return f"strength {last.strength:g}->{strength:g}"
    return None


def _facts(side: _Side, found: build.Found, mode: str, run_key: tuple[str, str] | None) -> Facts:
    entry, patcher = found.entry, side.patcher
    cached = found.how == "cached"
    return Facts(
        side=side.name, mode=mode, found=found.how, has_patches=bool(entry.patches),
        adapter_problem=entry.cache_problem,
        host_problem=capabilities.cached_path_problem(patcher) or load_state.weight_patched_at_cast(patcher, entry),
        placement_problem=load_state.placement_problem(patcher, extra_bytes=0 if cached else entry.nbytes),
        attach_problem=load_state.unattached_problem(entry) if cached else None,
        merged_problem=load_state.merged_problem(patcher) if cached else None,
        # only a build names the size: summing it is per-layer work the fast path does not need
        layer_count=len(entry.layers), nbytes=0 if cached else entry.nbytes, device=entry.device,
        form_note=entry.form_note,
        change=_what_changed(run_key, entry, entry.lora, side.strength) if cached else None)


def _apply_side(side: _Side, lora_name: str, ident, mode: str, patches_of: Callable[[], dict],
                run_key: tuple[str, str] | None):
    found = build.entry_for(side.patcher, lora_name, ident, patches_of)
    entry = found.entry
    d = decision.decide(_facts(side, found, mode, run_key))
    if d.via == "cache" and not entry.factors_made:
        # Only now that the cached path would serve are the factors worked out (ComfyUI's patch
        # path needs none); their facts may still send the adapter there.
        build.make_factors(entry, side.patcher)
        if found.how == "cached":
            found = found._replace(how="cached patches, factors built now")
        d = decision.decide(_facts(side, found, mode, run_key))
    if d.via == "none":
        return d, side.obj
    if d.via == "comfy":
        if run_key is not None:
            _last_run.pop(run_key, None)
        return d, side.full(entry.patches)
    if d.reattach:
        MEMORY.reattach(entry, side.patcher)
    entry.last_strength = side.strength
    if run_key is not None:
        _last_run[run_key] = LastRun(lora_name, side.strength)
    return d, side.cached(entry, mode, run_key[0] if run_key is not None else None)


def apply(model, clip, lora_name: str, strength_model: float, strength_clip: float,
          enabled: bool = True, mode: str = "auto", node_id: str | None = None, notify: bool = True):
    """Returns (model, clip, event). With `enabled` false the inputs come back unchanged."""
    t0 = time.perf_counter()

    def done(d: Decision, clip_d: Decision | None = None):
        ev = Event(lora=lora_name, path=d.path, reason=d.reason, node=node_id,
                   clip=None if clip_d is None else f"{clip_d.path} ({clip_d.reason})",
                   clip_path=None if clip_d is None else clip_d.path,
                   ms=(time.perf_counter() - t0) * 1000.0)
        return record(ev, notify=notify)

    if not enabled:
        return model, clip, done(Decision("off", "disabled", via="none"))
    known = decision.mode_of(mode)
    if known is None:
        raise LoraCacheError(f"LoRA '{lora_name}': unknown mode {mode!r} (one of {', '.join(decision.MODES)})")
    mode = known
    adapters.check_strength(lora_name, strength_model=strength_model, strength_clip=strength_clip)
    use_model = model is not None and strength_model != 0
    use_clip = clip is not None and strength_clip != 0
    if not use_model and not use_clip:
        return model, clip, done(Decision("off", "strengths are 0", via="none"))

    MEMORY.sweep_unloaded()
    path = files.resolve(lora_name)
    ident = files.identify(path, lora_name)
    read: dict = {}

    def split():
        # Read and mapped at most once per execution, and only when an entry must be built.
        # Both sides are checked here, before any entry is stored, so a bad file leaves
        # nothing cached.
        if "split" not in read:
            sd = adapters.read_file(ident, lora_name)
            unet_p, clip_p = adapters.split_patches(sd, model if use_model else None, clip if use_clip else None,
                                                    lora_name)
            if not unet_p and not clip_p:
                target = " or ".join(t for t, used in (("diffusion model", use_model), ("text encoder", use_clip))
                                     if used)
                raise LoraCacheError(f"LoRA file '{lora_name}' has no LoRA keys for this {target} "
                                     f"({len(sd)} tensors, none match ComfyUI's key map)")
            read["split"] = (unet_p, clip_p)
        return read["split"]

    key = (lambda side: (node_id, side)) if node_id is not None else (lambda side: None)
    out_model, out_clip = model, clip
    d = clip_d = None
    if use_model:
        d, out_model = _apply_side(_Side("model", model, strength_model), lora_name, ident, mode,
                                   lambda: split()[0], key("model"))
    if use_clip:
        clip_d, out_clip = _apply_side(_Side("clip", clip, strength_clip), lora_name, ident, mode,
                                       lambda: split()[1], key("clip"))
    if d is None:  # text encoder only: the event's path is the text encoder's
        assert clip_d is not None  # the text encoder ran: a run with neither side returned above
        d = Decision(clip_d.path, f"text encoder: {clip_d.reason}")
    return out_model, out_clip, done(d, clip_d)


@dataclass(frozen=True)
class StackRow:
    lora_name: str
    strength_model: float
    strength_clip: float
    enabled: bool = True


def apply_stack(model, clip, rows: list[StackRow], mode: str = "auto", node_id: str | None = None):
    """Several adapters in one node: the same as a chain of LoRA Cache Loaders, one per row.
    Each row records its own event; the node's badge gets one summary event."""
    t0 = time.perf_counter()
    row_events = []
    for i, row in enumerate(rows):
        if row.lora_name in (None, "", "None"):
            continue
        row_id = f"{node_id}:{i + 1}" if node_id is not None else None
        model, clip, ev = apply(model, clip, row.lora_name, row.strength_model, row.strength_clip,
                                row.enabled, mode, row_id, notify=False)
        row_events.append(ev)
    if not row_events:
        summary = Event(lora="(none)", path="off", reason="no LoRA selected", node=node_id,
                        ms=(time.perf_counter() - t0) * 1000.0)
    else:
        def weight(e: Event) -> int:
            return max(_PATH_WEIGHT[e.path], _PATH_WEIGHT[e.clip_path or "off"])
        worst = max(row_events, key=weight)
        path = next(p for p, w in _PATH_WEIGHT.items() if w == weight(worst))
        reason = ", ".join(f"{e.lora}: {e.path}" for e in row_events) + f" | {worst.lora}: {worst.reason}"
        summary = Event(lora=", ".join(e.lora for e in row_events), path=path, reason=reason, node=node_id,
                        ms=(time.perf_counter() - t0) * 1000.0, rows=[e.as_dict() for e in row_events])
    return model, clip, record(summary)
