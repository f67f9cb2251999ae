"""shared/ stays a few packages by concern, with imports pointing one way (shared/__init__.py)."""

from __future__ import annotations

import ast
from collections.abc import Collection
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


# --- how much each module leans on, and that nothing leans back --------------------------

ROOT = SHARED.parent
# The project's Python, as modules: what an import of one of these names reaches.
PACKAGES = ("shared", "cli", "local", "bench", "tests")
SCRIPTS = ("function_app",)
MOST_IMPORTS = 12


def project_modules(root: Path) -> dict[str, Path]:
    """Every module of the project under `root`, by dotted name (a package by its own name)."""
    found = {name: root / f"{name}.py" for name in SCRIPTS if (root / f"{name}.py").exists()}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def module_imports(name: str, path: Path, modules: Collection[str]) -> set[str]:
    """The project modules a module imports anywhere in it (inside functions too), each as the
    module the imported name resolves to."""

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(filter(None, (resolve(alias.name) for alias in node.names)))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                target = full if full in modules else resolve(base)
                if target:
                    targets.add(target)
    targets.discard(name)
    return targets


def packages_of(name: str) -> set[str]:
    """The packages importing a module runs first: `shared.access.gate` runs `shared.access`."""
    return {name.rsplit(".", n)[0] for n in range(1, name.count(".") + 1)}


def import_graph(root: Path, *, packages_run: bool = False) -> dict[str, set[str]]:
    """Each module's imports; with `packages_run`, also the packages those imports run on the
    way, except the module's own (a package's modules importing each other is how it loads)."""
    modules = project_modules(root)
    graph = {name: module_imports(name, path, modules) for name, path in modules.items()}
    if packages_run:
        for name, targets in graph.items():
            ran = {p for t in targets for p in packages_of(t)} & modules.keys()
            targets |= ran - packages_of(name) - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The groups of modules that import each other, directly or round about (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in graph.get(module, ()):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = {stack.pop()}
            while module not in group:
                group.add(stack.pop())
            if len(group) > 1:
                found.append(group)

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_no_module_in_shared_imports_more_than_a_dozen_project_modules():
    graph = import_graph(ROOT)
    heavy = {
        name: len(targets)
        for name, targets in graph.items()
        if name.startswith("shared") and len(targets) > MOST_IMPORTS
    }
    assert not heavy, {name: sorted(graph[name]) for name in heavy}


def test_no_import_cycle_anywhere_in_the_project():
    graph = import_graph(ROOT, packages_run=True)
    found = cycles(graph)
    assert not found, [sorted(group) for group in found]


def test_the_checks_see_a_cycle_through_a_lazy_import_and_count_each_module_once(tmp_path):
    (tmp_path / "shared" / "web").mkdir(parents=True)
    (tmp_path / "shared" / "__init__.py").write_text("")
    (tmp_path / "shared" / "web" / "__init__.py").write_text("")
    (tmp_path / "shared" / "web" / "a.py").write_text(
        "from shared.web import b\nfrom shared.web.b import f, g\n"
    )
    (tmp_path / "shared" / "web" / "b.py").write_text("def f():\n    from shared.web.a import x\n")
    graph = import_graph(tmp_path)
    assert graph["shared.web.a"] == {"shared.web.b"}
    assert cycles(graph) == [{"shared.web.a", "shared.web.b"}]


def test_the_cycle_check_sees_a_package_that_imports_back(tmp_path):
    (tmp_path / "shared" / "low").mkdir(parents=True)
    (tmp_path / "shared" / "__init__.py").write_text("")
    (tmp_path / "shared" / "low" / "__init__.py").write_text("from shared.low.a import A\n")
    (tmp_path / "shared" / "low" / "a.py").write_text("from shared.low.b import B\nA = B\n")
    (tmp_path / "shared" / "low" / "b.py").write_text("B = 1\n")
    (tmp_path / "shared" / "high.py").write_text("from shared.low.b import B\n")
    assert cycles(import_graph(tmp_path, packages_run=True)) == []
    (tmp_path / "shared" / "low" / "b.py").write_text("def f():\n    import shared.high\n")
    graph = import_graph(tmp_path, packages_run=True)
    assert graph["shared.high"] == {"shared.low.b", "shared.low"}
    assert cycles(graph) == [{"shared.high", "shared.low", "shared.low.a", "shared.low.b"}]
