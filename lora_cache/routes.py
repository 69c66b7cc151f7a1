"""HTTP routes on ComfyUI's own server: GET /lora_cache/stats, POST /lora_cache/purge."""
from __future__ import annotations

import logging
from typing import TypedDict

from . import copies, events
from .memory import MEMORY
from .store import STORE

log = logging.getLogger("lora_cache")


class AdapterStats(TypedDict):
    """One cached adapter in the stats (the web panel reads these keys)."""

    name: str
    bytes: int
    device: str | None
    resident: bool
    cached: bool  # the adapter takes the cached path (else `reason` says why not)
    reason: str | None
    layers: int
    model: str | None


def stats() -> dict:
    """The cache as it is now. A read: it moves nothing and changes no generation (the web
    panel polls it after every event)."""
    adapters: list[AdapterStats] = []
    for e in STORE.entries():
        model = e.model_ref()
        adapters.append({
            "name": e.lora,
            "bytes": e.nbytes,
            "device": e.device,
            "resident": e.resident,
            "cached": e.cache_problem is None,
            "reason": e.cache_problem,
            "layers": len(e.layers),
            "model": type(model).__name__ if model is not None else None,
        })
    by_device: dict[str, int] = {}
    for a in adapters:
        if a["device"] is not None:
            by_device[a["device"]] = by_device.get(a["device"], 0) + a["bytes"]
    return {"adapters": adapters, "bytes_by_device": by_device, "memory": MEMORY.stats(),
            "generation": STORE.generation, "events": events.recent(), "samplings": events.samplings()}


def purge() -> dict:
    n = STORE.purge()
    # The entries' merged copies went with them; copies of base weights (a sweep's) belong to none.
    copies.REGISTRY.drop_where(lambda _held: True)
    MEMORY.copy_caps.clear()
    log.info("[LoRA Cache] purged %d cached adapters", n)
    return {"purged": n}


def register() -> bool:
    """Adds the routes when a ComfyUI server exists (not when ComfyUI is used as a library)."""
    try:
        from aiohttp import web
        from server import PromptServer
    except Exception:
        return False
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return False
    routes = instance.routes

    @routes.get("/lora_cache/stats")
    async def _stats(request):
        return web.json_response(stats())

    @routes.post("/lora_cache/purge")
    async def _purge(request):
        # Takes no parameters: nothing a request says can reach the file system.
        return web.json_response(purge())

    return True
