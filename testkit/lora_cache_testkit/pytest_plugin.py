"""pytest plugin of the suite (pyproject's addopts: -p lora_cache_testkit.pytest_plugin).

The repository root is the custom-node package (it has an __init__.py), so pytest would take it
for a test package and import it when setting up its tests: a second copy of our package, named
after the checkout's folder, beside the one ComfyUI loads from custom_nodes/. pytest collects
the root as a plain directory instead."""
from __future__ import annotations

from pathlib import Path

import pytest

from . import host


@pytest.hookimpl(tryfirst=True)
def pytest_collect_directory(path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if path.resolve() == host.ROOT:
        return pytest.Dir.from_parent(parent, path=path)
    return None
