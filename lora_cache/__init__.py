"""Persistent LoRA cache for ComfyUI. Holds no node classes (see nodes/)."""
from .decision import MODES, mode_of
from .errors import LoraCacheError
from .memory import MEMORY
from .routes import purge, stats
from .service import StackRow, apply, apply_stack, fingerprint
from .store import STORE

__all__ = ["MEMORY", "MODES", "LoraCacheError", "STORE", "StackRow", "apply", "apply_stack", "fingerprint", "mode_of",
           "purge", "stats"]
