"""The CPU counted as a device, for tests on a host without a GPU.

The package never moves factors whose home is the CPU (`memory.can_offload`: a --cpu model's
factors have nowhere cheaper to go), so a CPU-only host would never run what a GPU runs: an
unload of ComfyUI's moves the factors to host memory and the next sampling moves them back. The
test kit replaces `can_offload` in the package's memory module from the outside with one that
answers yes for the CPU as well; factors "moved to the CPU" are then copied to new host tensors
and flagged, the same code a GPU runs.

- In process: `with cpu_as_device(memory): ...` (tests/test_memory.py).
- In a server: `make_base_dir(base, cpu_as_device=True)` adds a test-only custom node
  (`NODE_FILE`) that calls `install()` when ComfyUI loads custom_nodes/; ComfyUI loads them in
  directory order, so `install()` patches the package if it is loaded already and otherwise as
  soon as its memory module is imported. The node logs `MARKER`, which `ComfyServer.start`
  requires to find in the server's log."""
from __future__ import annotations

import importlib.abc
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch

NODE_FILE = "lora_cache_test_cpu_as_device.py"
MARKER = "lora_cache_testkit: the CPU counts as a device"
# ComfyUI registers a custom node package under a name made from its path, so the memory module
# is found by the end of its name.
_MEMORY_SUFFIX = ".lora_cache.memory"


def can_offload(home: torch.device | None) -> bool:
    """The package's check with every device counted, the CPU included."""
    return home is not None


def patch(memory: ModuleType) -> None:
    memory.can_offload = can_offload  # type: ignore[attr-defined]
    logging.getLogger("lora_cache_testkit").info("%s (%s)", MARKER, memory.__name__)


@contextmanager
def cpu_as_device(memory: ModuleType) -> Iterator[None]:
    old = memory.can_offload
    memory.can_offload = can_offload  # type: ignore[attr-defined]
    try:
        yield
    finally:
        memory.can_offload = old  # type: ignore[attr-defined]


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds the package's memory module through the other finders and patches it right after it
    executed, before any of the package's code can call it."""

    def find_spec(self, name, path, target=None):
        if not name.endswith(_MEMORY_SUFFIX):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            patch(module)

        # Path finders make a loader per spec, so this changes no other module's loading.
        spec.loader.exec_module = exec_and_patch
        return spec


def install() -> None:
    """For a ComfyUI process: the package's memory module patched, now or when it is imported."""
    loaded = [m for name, m in list(sys.modules.items()) if name.endswith(_MEMORY_SUFFIX) and m is not None]
    for memory in loaded:
        patch(memory)
    if not loaded:
        sys.meta_path.insert(0, _PatchOnImport())


def node_source() -> str:
    """The test-only custom node: puts this test kit on the server's path and installs."""
    testkit = str(Path(__file__).resolve().parents[1])
    return (f'"""Test-only (lora_cache_testkit.cpu_device): the CPU counts as a device."""\n'
            f"import sys\n\n"
            f"if {testkit!r} not in sys.path:\n"
            f"    sys.path.insert(0, {testkit!r})\n"
            f"from lora_cache_testkit import cpu_device\n\n"
            f"cpu_device.install()\n"
            f"NODE_CLASS_MAPPINGS = {{}}\n")
