"""LoRA Cache Loader: a ComfyUI custom-node package (this folder goes into custom_nodes/)."""

# ComfyUI imports this folder as a package. Test runners may import this file on its own
# (a checkout folder whose name is not a Python identifier); then there is nothing to register.
if __package__:
    from .lora_cache import routes as _routes
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    WEB_DIRECTORY = "./web/js"
    _routes.register()

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
