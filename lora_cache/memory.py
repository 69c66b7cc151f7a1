"""Moving cached factors off their device and back, and following ComfyUI's model unloads.

ComfyUI calls a patcher's ON_DETACH callbacks whenever it detaches the model: at a load of
another patcher of the same model (weights stay; `unpatch_all` False), and when it unloads
the model (free_memory, unload_all_models, POST /free with unload_models; `unpatch_all` True,
the weights have moved to the offload device). The node adds `on_detach` to every patcher it
returns (clones inherit it), so when a model leaves its device its factors leave too.
"""
from __future__ import annotations

import logging
import os

import torch

from . import layers

log = logging.getLogger("lora_cache")

HOST = torch.device("cpu")
# Factors that live on the CPU (a --cpu model) have nowhere cheaper to go, so they are never
# "moved to the CPU". Tests set this (or the environment variable, for a server) to run the
# offload path on a CPU-only host.
CPU_AS_DEVICE = os.environ.get("LORA_CACHE_TEST_CPU_AS_DEVICE") == "1"


def can_offload(home: torch.device | None) -> bool:
    return home is not None and (torch.device(home).type != "cpu" or CPU_AS_DEVICE)


def move_factors(layer_factors: dict, to_host: bool, home: torch.device) -> None:
    """Moves every layer's factors in place (see layers.move_layer: the objects the layers hold
    stay the same, a shared down projection moves as one)."""
    home = torch.device(home)
    dest = HOST if to_host else home
    pin = to_host and home.type == "cuda" and torch.cuda.is_available()
    for fs in layer_factors.values():
        layers.move_layer(fs, dest, pin=pin)
    if not to_host and home.type == "cuda":
        torch.cuda.current_stream(home).synchronize()


def on_detach(patcher, unpatch_all: bool) -> None:
    """ComfyUI's ON_DETACH (any load or unload touching a model of ours): factors of models that
    left their device leave it too. The store reads each model's load state, so this one sweep
    also covers models whose last load was not by a patcher of ours."""
    from .store import STORE
    n = STORE.sweep_unloaded()
    if n:
        log.info("[LoRA Cache] model unloaded by ComfyUI: factors of %d cached adapters moved to cpu", n)
