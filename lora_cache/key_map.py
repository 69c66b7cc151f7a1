"""ComfyUI's LoRA key map for one file: only the entries the file has keys under.

ComfyUI's key maps name every layer several ways (kohya, diffusers, its own and each model's
own names): about 4500 entries for Flux, where a file uses one naming for a few hundred layers.
`comfy.lora.load_lora` tries every entry with every adapter class, about 40 string formats and
lookups each, which is most of the time it takes (120 ms of a Flux file's first use on an H200).
An entry no key of the file starts with loads nothing, as long as ComfyUI's loaders look up
only keys that start with the entry: `load_lora_reads_prefixed_keys` checks that on the ComfyUI
at hand, by what its load_lora asks for, and the full map is used where it does not hold.
"""
from __future__ import annotations

import bisect
import functools
import logging

import comfy.lora

log = logging.getLogger("lora_cache")

_PROBE = "lora_cache_probe_layer"


class _AskedFor(dict):
    """An empty state dict that notes every key a loader asks for, and whether it looked at
    all keys (a loader that scans the file could match names that do not start with the entry)."""

    def __init__(self):
        super().__init__()
        self.asked: list = []
        self.scanned = False

    def _ask(self, key) -> None:
        self.asked.append(key)

    def __contains__(self, key) -> bool:
        self._ask(key)
        return False

    def __getitem__(self, key):
        self._ask(key)
        raise KeyError(key)

    def get(self, key, default=None):
        self._ask(key)
        return default

    def keys(self):
        return _Keys(self)

    def __iter__(self):
        self.scanned = True
        return iter(())

    def items(self):
        self.scanned = True
        return iter(())

    def values(self):
        self.scanned = True
        return iter(())


class _Keys:
    def __init__(self, owner: _AskedFor):
        self.owner = owner

    def __contains__(self, key) -> bool:
        self.owner._ask(key)
        return False

    def __iter__(self):
        self.owner.scanned = True
        return iter(())

    def __len__(self) -> int:
        return 0


@functools.cache
def load_lora_reads_prefixed_keys() -> bool:
    """Whether this ComfyUI's load_lora, for a key map entry the file has no key of, asks only
    for keys that start with the entry (so dropping that entry changes nothing)."""
    sd = _AskedFor()
    try:
        comfy.lora.load_lora(sd, {_PROBE: "probe.weight"}, log_missing=False)
    except Exception as e:  # a loader that fails on an empty file: nothing known, use the full map
        log.info("[LoRA Cache] ComfyUI's key map is used whole: load_lora failed on a probe (%s)", e)
        return False
    ok = bool(sd.asked) and not sd.scanned and all(isinstance(k, str) and k.startswith(_PROBE) for k in sd.asked)
    if not ok:
        log.info("[LoRA Cache] ComfyUI's key map is used whole: its load_lora %s",
                 "scans the file's keys" if sd.scanned else "asks for keys that do not start with the layer's name")
    return ok


def for_file(key_map: dict, sd: dict) -> dict:
    """`key_map` without the entries that no key of `sd` starts with (the same order), where
    that cannot change what load_lora returns; else `key_map` itself."""
    names = list(sd)
    if not all(isinstance(n, str) for n in names) or not load_lora_reads_prefixed_keys():
        return key_map
    names.sort()

    def in_file(prefix) -> bool:
        if not isinstance(prefix, str):
            return True
        i = bisect.bisect_left(names, prefix)
        return i < len(names) and names[i].startswith(prefix)

    return {x: target for x, target in key_map.items() if in_file(x)}
