"""The layer picture in docs/design.md is the import graph: every drawn arrow is an import and every
import between the drawn nodes is drawn; the core imports only stdlib/torch/numpy."""

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "gq_plugin"
CORE = ("codebook", "rate", "tdc", "search", "quantizer", "tokens")


def _node(module: str) -> str | None:
    """gq_plugin.<x>... -> the picture's node: a core module, 'adapters' or 'lab'."""
    parts = module.split(".")
    if parts[0] != "gq_plugin" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in (*CORE, "adapters", "lab") else None


def import_graph() -> tuple[set[tuple[str, str]], dict[str, set[str]]]:
    edges, external = set(), {}
    for path in PKG.rglob("*.py"):
        if "csrc" in path.parts:
            continue
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        pkg = name if rel.name == "__init__" else name.rsplit(".", 1)[0]
        src = _node(name)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                    targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
                else:
                    targets = [node.module or ""]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                dst = _node(t)
                if dst and src and dst != src:
                    edges.add((src, dst))
                elif not t.startswith("gq_plugin") and src:
                    external.setdefault(src, set()).add(t.split(".")[0])
    return edges, external


def drawn_edges() -> set[tuple[str, str]]:
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    block = re.search(r"```mermaid\n(.*?)```", text, re.S).group(1)
    return {(a, b) for a, b in re.findall(r"^\s*(\w+)\s*-->\s*(\w+)", block, re.M)}


def test_picture_matches_imports():
    edges, _ = import_graph()
    drawn = drawn_edges()
    assert drawn - edges == set(), "arrows drawn in docs/design.md that no import makes"
    assert edges - drawn == set(), "imports missing from the picture in docs/design.md"


def test_core_imports_only_stdlib_torch_numpy_and_adapters_only_the_core():
    edges, external = import_graph()
    std = set(sys.stdlib_module_names) | {"torch", "numpy"}
    for mod in CORE:
        assert external.get(mod, set()) <= std, (mod, external.get(mod))
        assert {b for a, b in edges if a == mod} <= set(CORE), mod
    assert {b for a, b in edges if a == "adapters"} <= set(CORE)


def test_docstrings_cite_a_design_document_that_exists():
    for path in (PKG / "quantizer.py", PKG / "search" / "__init__.py"):
        text = path.read_text(encoding="utf-8")
        assert "docs/design.md" in text and "DESIGN.md" not in text, path
    assert (ROOT / "docs" / "design.md").is_file()
