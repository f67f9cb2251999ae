"""shared/ stays a few packages by concern, with imports pointing one way (shared/__init__.py)."""

from __future__ import annotations

import ast
from pathlib import Path

SHARED = Path(__file__).resolve().parent.parent / "shared"
# Lowest first: each may import only those before it.
ORDER = (
    "errors",
    "platform",
    "directory",
    "access",
    "governance",
    "upstreams",
    "plugins",
    "runtime",
    "pipeline",
    "web",
    "management",
)


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, top-level name under shared) of every import of shared in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "shared":
                found += [(node.lineno, alias.name) for alias in node.names]
            elif node.module.startswith("shared."):
                found.append((node.lineno, node.module.split(".")[1]))
        elif isinstance(node, ast.Import):
            found += [
                (node.lineno, alias.name.split(".")[1])
                for alias in node.names
                if alias.name.startswith("shared.")
            ]
    return found


def test_shared_has_at_most_a_dozen_top_level_modules_each_named_in_the_order():
    top = sorted(
        p.stem if p.is_file() else p.name
        for p in SHARED.iterdir()
        if p.name != "__init__.py" and (p.suffix == ".py" or (p / "__init__.py").exists())
    )
    assert len(top) <= 12, top
    assert set(top) <= set(ORDER), set(top) - set(ORDER)
    for name in top:
        if (SHARED / name).is_dir():
            assert ast.get_docstring(ast.parse((SHARED / name / "__init__.py").read_text())), name


def test_imports_point_down_the_order_only():
    upward = []
    for path in sorted(SHARED.rglob("*.py")):
        owner = path.relative_to(SHARED).parts[0].removesuffix(".py")
        if owner == "__init__":
            continue
        for line, name in imported(path):
            if name != owner and ORDER.index(name) > ORDER.index(owner):
                upward.append(f"{path.relative_to(SHARED.parent)}:{line} imports shared.{name}")
    assert not upward, "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    wrong = tmp_path / "probe.py"
    wrong.write_text("def later():\n    from shared.pipeline.call import proxy\n")
    assert imported(wrong) == [(2, "pipeline")]
