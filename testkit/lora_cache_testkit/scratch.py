"""Scratch folders for the scripts and benchmarks: generated models and LoRA files are large (a
Flux-sized benchmark writes hundreds of MB), so each folder goes away when the process ends."""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path


def scratch_dir(prefix: str = "lc_") -> Path:
    """A new folder under the system's temp folder, removed at the process's exit."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
