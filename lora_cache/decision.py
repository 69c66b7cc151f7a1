"""The fast / build / full / off decision: one pure function over the facts of one node
execution. Gathering the facts (reading ComfyUI's state, the cache, the file) is the caller's
job (service.py); here nothing is read or changed, so every rule can be tested on its own.

Every Decision carries the reason that the log line, the stats route and the badge show.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

MODES = ("auto", "merged", "unmerged")
# Saved workflows name a mode by a former value: "dynamic" was the unmerged mode (the word now
# means only ComfyUI's dynamic VRAM).
MODE_ALIASES = {"dynamic": "unmerged"}
PATHS = ("fast", "build", "full", "off")

Path = Literal["fast", "build", "full", "off"]
# How the node's output carries the adapter: our clone that activates cached factors ("cache"),
# ComfyUI's own add_patches ("comfy"), or not at all: the inputs come back ("none").
Via = Literal["cache", "comfy", "none"]


def mode_of(value: str) -> str | None:
    """The mode a widget value names (a former value included), or None for an unknown one."""
    mode = MODE_ALIASES.get(value, value)
    return mode if mode in MODES else None


@dataclass(frozen=True)
class Decision:
    """A fast/build/full/off choice, the reason for it and what the node does about it."""

    path: Path
    reason: str
    via: Via = "cache"
    reattach: bool = False  # move the cached factors back to their device before carrying

    def __post_init__(self):
        if self.path not in PATHS:
            raise ValueError(f"unknown path {self.path!r}: one of {PATHS}")


@dataclass(frozen=True)
class Facts:
    """What one side (diffusion model or text encoder) of one node execution looks like.

    Problems are reason strings (None: no problem); each is read by the caller from ComfyUI's
    state (load_state.py, capabilities.py) or from the cache entry."""

    side: Literal["model", "clip"]
    mode: str
    found: str  # "cached", "first use", "file changed on disk (...)"
    has_patches: bool = True  # the file has LoRA keys for this side
    adapter_problem: str | None = None  # the adapter's type or layers rule out the cache
    host_problem: str | None = None  # this ComfyUI / this patcher cannot run the cached path
    placement_problem: str | None = None  # ComfyUI would not hold the whole model on its device
    attach_problem: str | None = None  # a cached entry's factors are not ready on its layers
    merged_problem: str | None = None  # another patcher's patches are merged into the weights
    layer_count: int = 0
    nbytes: int = 0
    device: str | None = None
    form_note: str | None = None  # the cached forms types other than plain LoRA took ("lokr as kron factors")
    change: str | None = None  # what changed since this node's last run ("strength 1->0.6")


def decide(f: Facts) -> Decision:
    target = "diffusion model" if f.side == "model" else "text encoder"
    if not f.has_patches:
        return Decision("off", f"no LoRA keys for the {target}", via="none")
    # The text encoder's merged mode is ComfyUI's own: it has no sampling to build copies for.
    if f.mode == "merged" and f.side == "clip":
        return Decision("full", "mode merged; ComfyUI patch path", via="comfy")
    for problem in (f.adapter_problem, f.host_problem, f.placement_problem):
        if problem is not None:
            return Decision("full", f"{problem}; ComfyUI patch path", via="comfy")
    # What the sampling (or encoding) does with the adapter: the node only carries it on a clone
    # of the model; its layers are activated when that clone runs.
    when = "at encoding" if f.side == "clip" else "at sampling"
    how = (f"{when}: merged copies wherever they fit" if f.mode == "merged" else
           f"{when}: merged copies where they fit, the rest unmerged" if f.mode == "auto" and f.side == "model"
           else f"{when}: unmerged")
    if f.found != "cached":
        note = f"; {f.form_note}" if f.form_note else ""
        return Decision("build", f"{f.found}: {f.layer_count} layers, {f.nbytes / 1024:.0f} KiB on {f.device}{note}; "
                                 f"{how}")
    suffix = f"; {f.change}" if f.change else ""
    for problem in (f.attach_problem, f.merged_problem):
        if problem is not None:
            return Decision("build", f"cached factors reused, but {problem}{suffix}", reattach=True)
    return Decision("fast", f"cached adapter, nothing built or moved; {how}{suffix}")
