"""The kit's shape, checked from its source: imports run one way (no circle, counting imports inside functions), the
config schema imports nothing of the kit but errors and io, and no module grows past what a reader takes in."""

from __future__ import annotations

import ast
from pathlib import Path

KIT = Path(__file__).resolve().parent.parent / "kit"
MAX_MODULE_LINES = 450


def kit_imports() -> dict[str, set[str]]:
    """module → the kit modules it imports, anywhere in the file (top level or inside a function)."""
    graph = {}
    for path in sorted(KIT.glob("*.py")):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:
                    found.add(node.module.split(".")[0])
                elif node.level == 1:
                    found.update(alias.name for alias in node.names)
                elif node.level == 0 and node.module and node.module.split(".")[0] == "kit":
                    parts = node.module.split(".")
                    found.update([parts[1]] if len(parts) > 1 else [alias.name for alias in node.names])
        graph[path.stem] = {name for name in found if (KIT / f"{name}.py").is_file()} - {path.stem}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_kit_imports_one_way_without_a_circle():
    assert cycles(kit_imports()) == []


def test_the_cycle_finder_sees_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_config_schema_imports_nothing_of_the_kit_but_errors_and_io():
    assert kit_imports()["config"] <= {"errors", "io"}


def test_no_module_is_longer_than_a_reader_takes_in():
    lengths = {path.name: len(path.read_text().splitlines()) for path in KIT.glob("*.py")}
    assert {name: n for name, n in lengths.items() if n > MAX_MODULE_LINES} == {}


def test_the_readme_layout_lists_every_module_and_no_other():
    readme = (KIT.parent / "README.md").read_text()
    block = readme[readme.index("## Layout"):]
    block = block[block.index("```") + 3:]
    listed = {line.split()[0] for line in block[:block.index("```")].splitlines() if line.strip().startswith("kit/")}
    modules = {f"kit/{path.name}" for path in KIT.glob("*.py") if path.name not in ("__init__.py", "__main__.py")}
    assert listed == modules
