"""No import cycle anywhere in ``plugin/`` (STYLE.md 12: a leaf module for what both sides use).

The graph is read from the source with ``ast``, so it holds every ``import`` and
``from ... import`` of a ``plugin.*`` module wherever it is written: at module level,
inside a function (a deferred import still closes a cycle, it only hides it until
that call), under ``if TYPE_CHECKING``.  ``from package import name`` points at
``package.name`` when that is a module, else at the package.  The parent packages a
submodule import runs implicitly are not edges: counting them would make every
``__init__`` that re-exports its submodules a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PLUGIN_DIR = Path(__file__).resolve().parents[2] / "plugin"


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted name -> source file for every module under ``package_dir``."""
    top = package_dir.name
    found: dict[str, Path] = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [top, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module ``from ... import`` names, resolving leading dots."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of ``known`` that ``module`` imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, is_package, node)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                targets.add(submodule if submodule in known else source)
    return {target for target in targets if target in known and target != module}


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    known = module_names(package_dir)
    return {module: imports_of(module, path, known) for module, path in known.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module, as a path
    that starts and ends at the same module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component: set[str] = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(component)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first)."""
    start = min(component)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in came_from:
                    came_from[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {start} in its own component")


def test_plugin_has_no_import_cycle() -> None:
    graph = import_graph(PLUGIN_DIR)
    assert graph.get("plugin.archive"), "the walk found no imports"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in plugin/:\n" + "\n".join(
        " -> ".join(cycle) for cycle in cycles)


def test_the_tar_format_imports_no_process_code() -> None:
    """``plugin.archive.tar`` is the format alone: the processes use it, never the reverse."""
    graph = import_graph(PLUGIN_DIR)
    tar_modules = [module for module in graph if module.startswith("plugin.archive.tar")]
    assert "plugin.archive.tar.reader" in tar_modules
    outward = {module: sorted(target for target in graph[module]
                              if target.startswith("plugin.archive")
                              and not target.startswith("plugin.archive.tar"))
               for module in tar_modules}
    assert not any(outward.values()), f"tar/ imports outside itself: {outward}"


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_cycle_through_a_function_level_import_is_found(tmp_path: Path) -> None:
    _write(tmp_path, {
        "pkg/__init__.py": "from pkg.a import A\n",
        "pkg/a.py": "from pkg.b import B\nA = 1\n",
        "pkg/b.py": "B = 2\n\ndef late() -> None:\n    from pkg import c\n",
        "pkg/c.py": "from . import a\n",
        "pkg/leaf.py": "import pkg.a\n",
    })
    graph = import_graph(tmp_path / "pkg")
    assert graph["pkg.c"] == {"pkg.a"}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


@pytest.mark.parametrize("files", [
    {"pkg/__init__.py": "from pkg.a import A\n", "pkg/a.py": "A = 1\n"},
    {"pkg/__init__.py": "", "pkg/a.py": "from pkg import b\n",
     "pkg/b.py": "import os\nfrom pkg.sub.c import C\n",
     "pkg/sub/__init__.py": "from .c import C\n",
     "pkg/sub/c.py": "from . import d\nfrom ..e import E\nC = 3\n", "pkg/sub/d.py": "",
     "pkg/e.py": "E = 5\n"},
])
def test_an_acyclic_tree_passes(tmp_path: Path, files: dict[str, str]) -> None:
    _write(tmp_path, files)
    graph = import_graph(tmp_path / "pkg")
    if "pkg.sub.c" in graph:
        assert graph["pkg.sub"] == {"pkg.sub.c"}
        assert graph["pkg.sub.c"] == {"pkg.sub.d", "pkg.e"}
    assert find_cycles(graph) == []
