from .lora_cache_loader import NODES, comfy_entrypoint

__all__ = ["NODES", "comfy_entrypoint"]
