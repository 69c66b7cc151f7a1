"""What each execution of the node did: one record behind the log line, the stats route
and the web badge, so all three always say the same thing."""
from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import TypedDict

log = logging.getLogger("lora_cache")

_recent: deque[Event] = deque(maxlen=200)
# What each sampling ran merged and unmerged, and what building its copies took.
_samplings: deque[Sampling] = deque(maxlen=50)


class Sampling(TypedDict, total=False):
    """A sampling's record (a plain dict: the stats route and the websocket send it as it is)."""

    adapters: list[str]  # the LoRA files it runs
    nodes: list[str]  # the nodes whose badges show it
    copies: int  # layers on a copy (merged or of the base weight)
    layers: int  # layers it adapts
    net: int  # layers served through ComfyUI's cast (reach.py)
    bytes: int  # bytes of the copies it runs
    built: int  # copies built for it
    build_ms: float
    setup_ms: float  # ours before its first step
    reason: str
    time: float


def sampling(reason: str, adapters: Iterable[str] = (), nodes: Iterable[str] = (), *, copies: int = 0,
             layers: int = 0, nbytes: int = 0, built: int = 0, build_ms: float = 0.0) -> Sampling:
    return Sampling(adapters=list(adapters), nodes=list(nodes), copies=copies, layers=layers, net=0,
                    bytes=nbytes, built=built, build_ms=build_ms, reason=reason)


@dataclass
class Event:
    lora: str
    path: str
    reason: str
    ms: float
    clip: str | None = None  # the text encoder's "path (reason)", when the node patched it
    clip_path: str | None = None
    node: str | None = None
    rows: list | None = None  # a stack node's per-row events
    time: float = field(default_factory=time.time)

    def as_dict(self) -> dict:
        return asdict(self)


def record(event: Event, notify: bool = True) -> Event:
    _recent.append(event)
    clip = f"; clip: {event.clip}" if event.clip else ""
    log.info("[LoRA Cache] %s: %s (%s%s) %.3f ms", event.lora, event.path, event.reason, clip, event.ms)
    if notify:
        _notify_ui(event)
    return event


def recent(limit: int = 50) -> list[dict]:
    return [e.as_dict() for e in list(_recent)[-limit:]]


def record_sampling(info: Sampling) -> Sampling:
    """A sampling's start: which layers run merged copies, what was built and why the rest run
    unmerged. The badges of the nodes whose adapters it runs show it under their own event.
    Returns the record, which `amend_sampling` adds to."""
    info = Sampling(**info)
    info["time"] = time.time()
    _samplings.append(info)
    log.info("[LoRA Cache] sampling with %s: %s", ", ".join(info["adapters"]), info["reason"])
    _notify_sampling(info)
    return info


def amend_sampling(info: Sampling, note: str, net: int) -> None:
    """What the sampling found after its start (its first model call), added to its record: the
    reason gets `note`, `net` the layers served through ComfyUI's cast, the badge line is drawn
    again."""
    info["net"] = net
    info["reason"] = f"{info['reason']}; {note}"
    log.info("[LoRA Cache] sampling with %s: %s", ", ".join(info["adapters"]), note)
    _notify_sampling(info)


def _notify_sampling(info: Sampling) -> None:
    instance = _server()
    if instance is not None and info.get("nodes"):
        instance.send_sync("lora_cache.sampling", info)


def samplings() -> list[Sampling]:
    return list(_samplings)


def clear() -> None:
    _recent.clear()
    _samplings.clear()


def _server():
    # Only a server that is already imported can have an instance; importing it here would
    # be retried (and fail slowly) on every execution where ComfyUI runs without a server.
    server = sys.modules.get("server")
    return getattr(getattr(server, "PromptServer", None), "instance", None)


def _notify_ui(event: Event) -> None:
    # The badge must update on every execution, so the node pushes its event itself.
    instance = _server()
    if instance is not None and event.node is not None:
        instance.send_sync("lora_cache.event", event.as_dict())
