"""The package's shape: imports between memwise's modules go one way, and every family has the same face."""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "memwise"


def module_names() -> dict[str, Path]:
    """Dotted name -> file of every module under src/memwise (a package is its __init__.py)."""
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """memwise modules that `name` imports anywhere in its file, at module level or inside functions."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:      # relative: from the package this module is in, up level - 1 more
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                # `from memwise.x import y` imports the module memwise.x.y when there is one
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {target for target in found if target in modules and target != name}


def import_graph() -> dict[str, set[str]]:
    """Edges importer -> imported, except a package importing its own submodules (re-exporting them
    from __init__.py is what a package does)."""
    modules = module_names()
    graph = {}
    for name, path in modules.items():
        targets = imported_modules(name, path, modules)
        if path.name == "__init__.py":
            targets = {t for t in targets if not t.startswith(name + ".")}
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}      # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "memwise.bench.cli" in graph["memwise.cli"]        # imported inside build_parser
    assert "memwise.source" in graph["memwise.language_model"]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("module", sorted(set(importlib.import_module("memwise.models").FAMILY_MODULES.values())))
def test_every_family_has_the_family_interface(module):
    family = importlib.import_module(module)
    for name in ("MODEL_TYPES", "spec_from_config", "load", "synthetic", "parameter_count", "weight_sizes"):
        assert hasattr(family, name), f"{module} has no {name}"


# ---- size: a module holds one idea, a function one step ----------------------------------------

MODULE_LINES = 400
FUNCTION_LINES = 80


def source_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*") if p.suffix in (".py", ".c", ".h"))


def c_function_bodies(text: str) -> list[tuple[int, int]]:
    """(first line, line count) of each top-level brace block that follows a ')' in C source: the
    bodies of functions, comments and strings skipped."""
    text = re.sub(r"/\*.*?\*/|//[^\n]*", lambda m: re.sub(r"[^\n]", " ", m.group()), text, flags=re.S)
    text = re.sub(r'"(\\.|[^"\\\n])*"', '""', text)
    text = re.sub(r"^\s*#.*(\\\n.*)*$", lambda m: re.sub(r"[^\n]", " ", m.group()), text, flags=re.M)
    bodies, depth, start, previous = [], 0, 0, ""
    for at, char in enumerate(text):
        if char == "{":
            if depth == 0 and previous == ")":
                start = at
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0 and start:
                first = text.count("\n", 0, start) + 1
                bodies.append((first, text.count("\n", start, at) + 1))
                start = 0
        if not char.isspace():
            previous = char
    return bodies


def test_no_module_is_too_long() -> None:
    long = [f"{p.relative_to(PACKAGE)}: {n} lines" for p in source_files()
            if (n := p.read_text().count("\n")) > MODULE_LINES]
    assert not long, f"split these (one idea per module): {long}"


def test_no_function_is_too_long() -> None:
    long = []
    for path in source_files():
        text = path.read_text()
        if path.suffix == ".py":
            spans = [(node.name, node.lineno, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(text))
                     if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
        else:
            spans = [("function", first, count) for first, count in c_function_bodies(text)]
        long += [f"{path.relative_to(PACKAGE)}:{line} {name} ({count} lines)"
                 for name, line, count in spans if count > FUNCTION_LINES]
    assert not long, f"split these: {long}"


def test_the_c_function_finder_sees_functions() -> None:
    text = "static int f(int a) {\n  if (a) { return 1; }\n  /* } */ return 0;\n}\nint x[] = {1, 2};\n"
    assert c_function_bodies(text) == [(1, 4)]
