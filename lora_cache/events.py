"""What each execution of the node did: one record behind the log line, the stats route
and the web badge, so all three always say the same thing."""
from __future__ import annotations

import logging
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field

log = logging.getLogger("lora_cache")

_recent: deque[Event] = deque(maxlen=200)
# What `auto` chose per sampling and what the sampling cost (time from ON_PRE_RUN to cleanup).
_samplings: deque[dict] = deque(maxlen=50)


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


def record_sampling(info: dict) -> None:
    info = {**info, "time": time.time()}
    _samplings.append(info)
    log.info("[LoRA Cache] sampling with %s: %s form (%s), %.1f ms", ", ".join(info["adapters"]),
             info["form"], info["reason"], info["ms"])


def samplings() -> list[dict]:
    return list(_samplings)


def clear() -> None:
    _recent.clear()
    _samplings.clear()


def _notify_ui(event: Event) -> None:
    # The badge must update on every execution, so the node pushes its event itself.
    # Only a server that is already imported can have an instance; importing it here would
    # be retried (and fail slowly) on every execution where ComfyUI runs without a server.
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is not None and event.node is not None:
        instance.send_sync("lora_cache.event", event.as_dict())
