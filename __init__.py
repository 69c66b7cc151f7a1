"""LoRA Cache Loader: a ComfyUI custom-node package (this folder goes into custom_nodes/)."""

# ComfyUI imports this folder as a package. Test runners may import this file on its own
# (a checkout folder whose name is not a Python identifier); then there is nothing to register.
# The nodes use the V3 schema: ComfyUI registers them through comfy_entrypoint, and takes that
# only when the package exports no NODE_CLASS_MAPPINGS.
if __package__:
    from .lora_cache import routes as _routes
    from .nodes import comfy_entrypoint

    WEB_DIRECTORY = "./web/js"
    _routes.register()

    __all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
