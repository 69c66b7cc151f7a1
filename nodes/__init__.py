from comfy_api.latest import ComfyExtension, io

from . import lora_cache_loader
from .grid import LoraCacheGrid
from .sweep import LoraCacheSweep

NODES = [*lora_cache_loader.NODES, LoraCacheSweep, LoraCacheGrid]


class LoraCacheExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> LoraCacheExtension:
    return LoraCacheExtension()


__all__ = ["NODES", "comfy_entrypoint"]
