"""Module layering: no import circles between the loaders, rendering below the report writer."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "semalign"


def _imports(path: Path) -> set[str]:
    """Every module a file imports (top level or inside functions), as dotted names relative to semalign."""
    pkg = path.relative_to(SRC.parent).with_suffix("").parts[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = list(pkg[: len(pkg) - node.level + 1]) if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_assets_does_not_import_load():
    assert not any(m.startswith("semalign.models.load") for m in _imports(SRC / "models" / "assets.py"))
    assert not any(m.startswith("semalign.models.assets") for m in _imports(SRC / "models" / "save.py"))


def test_report_renders_html_without_the_analysis_package():
    mods = _imports(SRC / "report.py")
    assert "semalign.render.html" in mods
    assert not any(m.startswith("semalign.analysis") for m in mods)
    assert not any(m.startswith(("semalign.analysis", "semalign.report")) for m in _imports(SRC / "render" / "html.py"))
