"""The package has no import cycle: the modules' top-level `passuntil.*` imports form a DAG.

Imports inside functions (deferred on purpose, e.g. of an optional backend) and under
`if TYPE_CHECKING:` are not followed: they do not run when the module is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "src" / "passuntil"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.Module, module: str, is_package: bool, *, deferred: bool = False) -> set[str]:
    """The modules `module` imports when it is imported (or, with `deferred`, anywhere in it)."""
    out: set[str] = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    base = module.split(".")
                    base = base[: len(base) - node.level + (1 if is_package else 0)]
                    name = ".".join(base + ([node.module] if node.module else []))
                else:
                    name = node.module or ""
                out.add(name)  # (`from pkg import submodule` adds pkg too: it runs pkg/__init__)
                out.update(f"{name}.{a.name}" for a in node.names)
            elif isinstance(node, ast.If):
                test = node.test
                type_checking = (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                    isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
                if not type_checking:
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for h in node.handlers:
                    visit(h.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif deferred and isinstance(node, ast.AST):
                visit(ast.iter_child_nodes(node))

    visit(tree.body)
    return out


def import_graph(*, deferred: bool = False) -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for module, path in files.items():
        names = _imports(ast.parse(path.read_text()), module, path.name == "__init__.py",
                         deferred=deferred)
        # a module's own packages have started importing before it runs: no edge to them
        ancestors = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        graph[module] = {n for n in names if n in files and n != module and n not in ancestors}
    # importing a.b.c from outside a.b runs a.b's __init__.py first (inside it, it already ran)
    for module in files:
        parts = module.split(".")
        for i in range(2, len(parts)):
            parent = ".".join(parts[:i])
            if parent in files:
                for owner, deps in graph.items():
                    inside = owner == parent or owner.startswith(parent + ".")
                    if module in deps and not inside:
                        deps.add(parent)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := dfs(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_the_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_follows_the_run_layer():
    graph = import_graph()
    assert "passuntil.runner" in graph["passuntil.distributed"]
    assert "passuntil.distributed" in graph["passuntil.evaluate"]


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_cycle_even_through_deferred_imports():
    """An import inside a function hides a circle from Python, not from a reader (evaluate.py and
    distributed.py used to import each other that way): none, counting those too."""
    cycle = find_cycle(import_graph(deferred=True))
    assert cycle is None, "import cycle (deferred imports included): " + " -> ".join(cycle)
