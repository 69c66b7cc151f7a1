"""Bootstraps the real ComfyUI installed by scripts/setup_host.sh for in-process use.

Shared by the tests, the demo and the benchmark. Import this before anything from comfy.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMFY_DIR = Path(os.environ.get("COMFYUI_DIR", ROOT / ".host" / "ComfyUI")).resolve()

_booted = False


def boot(cpu: bool = True, extra_args: dict | None = None) -> Path:
    """Puts ComfyUI on sys.path and sets its CLI args without parsing argv.

    ComfyUI reads its settings from comfy.cli_args.args at import time of
    comfy.model_management, so they must be set first.
    """
    global _booted
    if _booted:
        return COMFY_DIR
    if not (COMFY_DIR / "main.py").is_file():
        raise SystemExit(f"ComfyUI not found at {COMFY_DIR}: run scripts/setup_host.sh first")
    sys.path.insert(0, str(COMFY_DIR))
    from comfy.cli_args import args  # noqa: E402

    args.cpu = cpu
    for k, v in (extra_args or {}).items():
        setattr(args, k, v)
    # `nodes` puts comfy/ itself on sys.path; utils.extra_config must be imported before it.
    import utils.extra_config  # noqa: F401,E402
    _booted = True
    return COMFY_DIR
