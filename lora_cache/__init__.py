"""Persistent dynamic-LoRA cache for ComfyUI. Holds no node classes (see nodes/)."""
from .decision import MODES
from .errors import LoraCacheError
from .routes import purge, stats
from .service import apply, fingerprint
from .store import STORE

__all__ = ["MODES", "LoraCacheError", "STORE", "apply", "fingerprint", "purge", "stats"]
