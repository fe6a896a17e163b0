"""The package's layout rules, read from the source: no import cycle between modules, and the layers
(models / methods / runtime below the training loop and the launcher) only import downwards."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lctrun"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(node: ast.AST) -> list[str]:
    """The lctrun modules an import statement names (`from lctrun import x` names lctrun.x if it is one)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("lctrun")]
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lctrun"):
        subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES]
        return subs or [node.module]
    return []


def imports(name: str, top_level_only: bool) -> set[str]:
    tree = ast.parse(MODULES[name].read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    return {m for node in nodes for m in imported(node) if m in MODULES and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt] if nxt in path else path + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_no_module_level_import_cycle():
    graph = {name: imports(name, top_level_only=True) for name in MODULES}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("layer", ["lctrun.models", "lctrun.methods", "lctrun.runtime", "lctrun.data"])
def test_lower_layers_never_import_the_loop_or_the_launcher(layer):
    """Not even inside a function: a runtime runs a job it is given, it does not reach up for train()."""
    above = {"lctrun.train", "lctrun.launch", "lctrun.cli", "lctrun.compare", "lctrun.reproduce", "lctrun.bench"}
    for name in (n for n in MODULES if n == layer or n.startswith(layer + ".")):
        assert not imports(name, top_level_only=False) & above, name


def test_every_test_the_readme_names_exists():
    """The README backs its promises with test names: each one it names is a test in tests/."""
    import re

    root = Path(__file__).resolve().parents[1]
    named = set(re.findall(r"\b(test_[a-z0-9_]+)\b", (root / "README.md").read_text()))
    defined = {
        m for path in (root / "tests").glob("test_*.py") for m in re.findall(r"def (test_\w+)", path.read_text())
    }
    files = {path.stem for path in (root / "tests").glob("test_*.py")}
    assert named and named - defined - files == set()
