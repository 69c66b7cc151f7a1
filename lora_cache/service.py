"""What one execution of a LoRA Cache Loader node does: decide the path, build or reuse the
cache entry, and return the patchers. Node classes call `apply` and nothing else."""
from __future__ import annotations

import time
import weakref

import comfy.utils

from . import adapters, capabilities, decision, files, scope
from .errors import LoraCacheError
from .events import Decision, Event, record
from .store import STORE, Entry


def fingerprint(lora_name: str, enabled: bool) -> str | float:
    """The node's change fingerprint (IS_CHANGED): the file's identity and the cache generation,
    so a rewritten file or a purge makes ComfyUI execute the node again."""
    if not enabled:
        return "off"
    try:
        ident = files.identify(files.resolve(lora_name), lora_name)
    except LoraCacheError:
        return float("nan")  # always "changed": the node runs and reports the error itself
    return f"{ident.sha256}:{ident.size}:{ident.mtime_ns}:{ident.ctime_ns}:{STORE.generation}"


def _entry_for(target_model, patches_of, lora: str, ident, build_factors) -> tuple[Entry, str]:
    """The current entry for (model, file): reused when the file is unchanged, else rebuilt.
    Returns the entry and what happened ("cached", "first use", "file changed on disk")."""
    entry = STORE.get(target_model, ident.path)
    if entry is not None and entry.identity == ident and entry.live:
        return entry, "cached"
    why = "first use" if entry is None else f"file changed on disk ({entry.identity.describe()} -> {ident.describe()})"
    patches = patches_of()
    new = Entry(lora=lora, identity=ident, model_ref=weakref.ref(target_model), model_id=id(target_model),
                patches=patches)
    build_factors(new)  # may raise: nothing is stored until it returned
    if entry is not None:
        STORE.drop(entry)
    STORE.put(new)
    return new, why


def apply(model, clip, lora_name: str, strength_model: float, strength_clip: float,
          enabled: bool = True, mode: str = "auto", node_id: str | None = None):
    """Returns (model, clip, event). With `enabled` false the inputs come back unchanged."""
    t0 = time.perf_counter()

    def done(d: Decision, clip_note: str | None = None):
        ev = Event(lora=lora_name, path=d.path, reason=d.reason, clip=clip_note, node=node_id,
                   ms=(time.perf_counter() - t0) * 1000.0)
        return record(ev)

    if not enabled:
        return model, clip, done(Decision("off", "disabled"))
    if mode not in decision.MODES:
        raise LoraCacheError(f"LoRA '{lora_name}': unknown mode {mode!r} (one of {', '.join(decision.MODES)})")
    adapters.check_strength(lora_name, strength_model=strength_model, strength_clip=strength_clip)
    use_model = model is not None and strength_model != 0
    use_clip = clip is not None and strength_clip != 0
    if not use_model and not use_clip:
        return model, clip, done(Decision("off", "strengths are 0"))

    path = files.resolve(lora_name)
    ident = files.identify(path, lora_name)
    read: dict = {}

    def split():
        # Read and mapped at most once per execution, and only when an entry must be built.
        if "split" not in read:
            sd = adapters.read_file(ident, lora_name)
            unet_p, clip_p = adapters.split_patches(sd, model if use_model else None, clip if use_clip else None)
            if not unet_p and not clip_p:
                target = " or ".join(t for t, used in (("diffusion model", use_model), ("text encoder", use_clip)) if used)
                raise LoraCacheError(f"LoRA file '{lora_name}' has no LoRA keys for this {target} "
                                     f"({len(sd)} tensors, none match ComfyUI's key map)")
            read["split"] = (unet_p, clip_p)
        return read["split"]

    out_model, out_clip, clip_note = model, clip, None
    # The file is read only if an entry must be built, and split() checks both sides at once
    # before any entry is stored, so a bad file leaves nothing cached.
    d = Decision("off", "no LoRA keys for the diffusion model")
    if use_model:
        d, out_model = _apply_model(model, lora_name, ident, strength_model, mode, lambda: split()[0])
    if use_clip:
        centry, _ = _entry_for(clip.cond_stage_model, lambda: split()[1], lora_name, ident,
                               lambda e: setattr(e, "plan_reason", "text encoder"))
        if centry.patches:
            out_clip = clip.clone()
            out_clip.add_patches(centry.patches, strength_clip)
            clip_note = "ComfyUI patches (text encoder)"
        else:
            clip_note = "no LoRA keys for the text encoder"
    return out_model, out_clip, done(d, clip_note)


def _apply_model(model, lora_name, ident, strength, mode, make_patches):
    device, dtype = decision.device_dtype(model)

    def build(entry: Entry) -> None:
        pbar = comfy.utils.ProgressBar(len(entry.patches))
        plan = adapters.plan_dynamic(entry.patches, model, lora_name, device, dtype,
                                     progress=lambda done: pbar.update_absolute(done))
        entry.plan_reason = plan.reason
        if plan.layers is not None:
            entry.layers = plan.layers

    entry, what = _entry_for(model.model, make_patches, lora_name, ident, build)
    if not entry.patches:  # the file only holds text encoder keys
        return Decision("off", "no LoRA keys for the diffusion model"), model

    full_reason = None
    if mode == "merged":
        full_reason = "mode merged"
    elif entry.plan_reason is not None:
        full_reason = entry.plan_reason
    else:
        full_reason = (capabilities.dynamic_path_problem(model)
                       or decision.placement_problem(model, extra_bytes=0 if what == "cached" else entry.nbytes))

    if full_reason is not None:
        n = model.clone()
        n.add_patches(entry.patches, strength)
        return Decision("full", f"{full_reason}; ComfyUI patch path"), n

    if what == "cached":
        d = decision.fast_or_not(model, entry)
        if entry.last_strength is not None and entry.last_strength != strength:
            d = Decision(d.path, f"{d.reason}; strength {entry.last_strength:g}->{strength:g}")
        if d.path == "build":
            entry.attach()  # idempotent: re-registers exactly these factors on every layer
    else:
        d = Decision("build", f"{what}: {len(entry.layers)} layers, {entry.nbytes / 1024:.0f} KiB on {entry.device}")
    entry.last_strength = strength
    return d, scope.carry(model, entry, strength)
