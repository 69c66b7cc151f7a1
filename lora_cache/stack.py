"""The adapters a patcher carries, in chain order: an attachment of the model or text-encoder
patcher that ComfyUI clones along with it, so every later node's patcher carries what the nodes
before it added; and the same adapters per targeted layer (`layer_chains`). Which of them ride
in ComfyUI's own patches for a sampling is chain_order.py's business; when they are active,
scope.py's."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch

    from .store import Entry

KEY = "lora_cache"
# On a sampling patcher: how many leading items of its stack ride in ComfyUI's own patches
# (chain_order.splice_late_patches).
SPLICED = "lora_cache_spliced"


class StackItem(NamedTuple):
    entry: Entry
    strength: float
    mode: str  # auto, merged, unmerged
    # ComfyUI patches per weight key on the patcher the node carried the adapter onto; more at
    # sampling time means a later node patched the same layer.
    seen: Mapping[str, int] = {}
    seen_spliced: int = 0  # how many items before it were in those patches already (SPLICED)
    node: str | None = None  # the node that carried it, for the badge


@dataclass(frozen=True)
class AdapterStack:
    """The ordered adapters a patcher carries. Immutable: clones share it."""

    items: tuple[StackItem, ...] = ()

    def with_adapter(self, item: StackItem) -> AdapterStack:
        return AdapterStack(self.items + (item,))


def stack_of(patcher) -> AdapterStack:
    return patcher.get_attachment(KEY) or AdapterStack()


def active_items(patcher) -> tuple[StackItem, ...]:
    """The stack items that our layers run for `patcher` (those before are in its patches)."""
    return stack_of(patcher).items[patcher.get_attachment(SPLICED) or 0:]


@dataclass
class LayerChain:
    """One targeted layer with every adapter on it, in stack order."""

    path: str
    module: torch.nn.Module
    chain: list = field(default_factory=list)  # (forms, strength) in stack order
    entries: list = field(default_factory=list)
    modes: list = field(default_factory=list)


def layer_chains(items: list[StackItem]) -> list[LayerChain]:
    """Each targeted layer once, with every adapter on it in stack order."""
    per_module: dict[int, LayerChain] = {}
    for item in items:
        for path, module, factors in item.entry.modules():
            lc = per_module.setdefault(id(module), LayerChain(path, module))
            lc.chain.append((factors, item.strength))
            lc.entries.append(item.entry.uid)
            lc.modes.append(item.mode)
    return list(per_module.values())
