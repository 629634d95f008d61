"""The architecture, checked: imports follow the layer order of docs/architecture.md (also inside
functions), modules import each other without circles, and modules and functions stay small."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fedsecure"

# Lowest first; a module may import its own layer and the layers below, never above, never a
# sibling of the same rank. The top-level facade (``fedsecure/__init__.py``, ``fedsecure/optim.py``)
# sits above every layer, and no layer imports it.
LAYERS: dict[str, int] = {
    "errors": 0,
    "wire": 1, "data": 1,
    "aggregate": 2,
    "worker": 3,
    "pointer": 4, "transport": 4,
    "fl": 5,
    "privacy": 6,
    "experiment": 7, "dashboard": 7,
    "cli": 8,
}
FACADE = {"__init__", "__main__", "optim"}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def _modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        yield ".".join(("fedsecure", *parts)), path


def _imports(name: str, path: Path) -> Iterator[tuple[int, str]]:
    """Every fedsecure module ``name`` imports, at any depth of its code, with the line."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target == "fedsecure" or target.startswith("fedsecure."):
                yield node.lineno, target


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] in FACADE:
        return None
    return parts[1]


MODULES = dict(_modules())


def test_every_package_is_a_layer() -> None:
    packages = {_layer(name) for name in MODULES} - {None}
    assert packages <= set(LAYERS), f"packages outside the layer order: {sorted(packages - set(LAYERS))}"


def test_imports_follow_the_layer_order() -> None:
    wrong = []
    for name, path in MODULES.items():
        layer = _layer(name)
        if layer is None:
            continue
        for line, target in _imports(name, path):
            other = _layer(target) if target != "fedsecure" else "the facade"
            if other == layer:
                continue
            if other is None or other == "the facade":
                wrong.append(f"{name}:{line} imports the top-level facade ({target})")
            elif LAYERS[other] > LAYERS[layer]:
                wrong.append(f"{name}:{line} ({layer}) imports {target} ({other}), a higher layer")
            elif LAYERS[other] == LAYERS[layer]:
                wrong.append(f"{name}:{line} ({layer}) imports {target} ({other}), a sibling layer")
    assert not wrong, "\n".join(wrong)


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for _, target in _imports(name, path):
            while target not in MODULES and "." in target:  # `from m import name` names m.name
                target = target.rsplit(".", 1)[0]
            if target in MODULES and target != name and not name.startswith(target + "."):
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles() -> None:
    # a package's __init__ re-exporting its modules is not a circle with them
    graph = {k: {t for t in v if not (MODULES[t].name == "__init__.py" and k.startswith(t + "."))}
             for k, v in _graph().items()}
    assert not _cycles(graph), _cycles(graph)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_sizes(name: str) -> None:
    source = MODULES[name].read_text()
    assert source.count("\n") <= MAX_MODULE_LINES, f"{name}: {source.count(chr(10))} lines"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{name}: functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """An upward import inside a function is found (the checker is not blind to function bodies)."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from fedsecure.cli import main\n")
    assert [t for _, t in _imports("fedsecure.worker.bad", bad)] == ["fedsecure.cli", "fedsecure.cli.main"]
