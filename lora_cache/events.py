"""What each execution of the node did: one record behind the log line, the stats route
and the web badge, so all three always say the same thing."""
from __future__ import annotations

import logging
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field

log = logging.getLogger("lora_cache")

PATHS = ("fast", "build", "full", "off")
_recent: deque["Event"] = deque(maxlen=200)


@dataclass(frozen=True)
class Decision:
    """A fast/build/full/off choice and the reason for it."""

    path: str
    reason: str

    def __post_init__(self):
        assert self.path in PATHS, self.path


@dataclass
class Event:
    lora: str
    path: str
    reason: str
    ms: float
    clip: str | None = None
    node: str | None = None
    time: float = field(default_factory=time.time)

    def as_dict(self) -> dict:
        return asdict(self)


def record(event: Event) -> Event:
    _recent.append(event)
    clip = f"; clip: {event.clip}" if event.clip else ""
    log.info("[LoRA Cache] %s: %s (%s%s) %.3f ms", event.lora, event.path, event.reason, clip, event.ms)
    _notify_ui(event)
    return event


def recent(limit: int = 50) -> list[dict]:
    return [e.as_dict() for e in list(_recent)[-limit:]]


def clear() -> None:
    _recent.clear()


def _notify_ui(event: Event) -> None:
    # The badge must update on every execution, so the node pushes its event itself.
    # Only a server that is already imported can have an instance; importing it here would
    # be retried (and fail slowly) on every execution where ComfyUI runs without a server.
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is not None and event.node is not None:
        instance.send_sync("lora_cache.event", event.as_dict())
