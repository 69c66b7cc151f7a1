"""docs/design.md lists every module of lora_cache/ with the modules of the library it imports;
the list is checked against the code (its `from .x import` statements, those made only for type
checking left out), so the picture a newcomer reads cannot drift from the imports."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Line numbers of the statements under `if TYPE_CHECKING:`."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for stmt in node.body:
                lines.update(range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
    return lines


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    skip = _type_checking_only(tree)
    deps = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.lineno not in skip:
            deps.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
    return deps


def documented() -> dict[str, set[str]]:
    text = (ROOT / "docs" / "design.md").read_text()
    table = text[text.index("<!-- modules:"):text.index("<!-- /modules -->")]
    rows = {}
    for m in re.finditer(r"^\| `([\w]+)\.py` \| [^|]+ \|([^|]*)\|$", table, re.M):
        rows[m.group(1)] = {x.strip() for x in m.group(2).split(",") if x.strip()}
    return rows


def test_design_lists_every_module_with_its_imports():
    code = {p.stem: imports_of(p) for p in sorted((ROOT / "lora_cache").glob("*.py"))}
    assert documented() == code
