"""The package's layers: each imports only the layers below it, and no module imports in a cycle.

Every ``import`` statement counts, also the ones inside functions (a deferred import is still a
dependency); only imports under ``if TYPE_CHECKING:`` are left out, since they never run (a
proxy's annotations name its trace, whose module imports the proxy). The layers, lowest
first, are the folders of ``lazytensor/`` (see docs/architecture.md); the top-level modules
(``lazytensor/__init__.py``, the CLI, the demo, the tiny-model builder) sit above them, and
the server may use only core, runtime and protocol.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: Lowest first; a module may import its own layer and the layers before it.
LAYERS = ["core", "runtime", "protocol", "backends", "tracing", "frontend", "app"]
SERVER_MAY_IMPORT = {"core", "runtime", "protocol"}


def module_name(path: pathlib.Path) -> str:
    if "lazytensor_server" in path.parts:
        parts = path.relative_to(ROOT / "server").with_suffix("").parts
    else:
        parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, pathlib.Path]:
    files = [*(ROOT / "lazytensor").rglob("*.py"), *(ROOT / "server").rglob("*.py")]
    return {module_name(p): p for p in files}


def imports_of(name: str, path: pathlib.Path) -> set[str]:
    """The lazytensor modules ``name`` imports (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[: len(parent) - (node.level - 1)]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    known = modules()
    return {m for m in found if m in known and m != name}


def layer_of(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "lazytensor_server":
        return "server"
    if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS):
        return parts[1]
    return "app"


GRAPH = {name: imports_of(name, path) for name, path in modules().items()}


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_each_module_imports_only_downward(name: str) -> None:
    layer = layer_of(name)
    for target in GRAPH[name]:
        other = layer_of(target)
        if layer == "server":
            assert other in SERVER_MAY_IMPORT | {"server"}, f"{name} imports {target}"
        elif layer != "app":  # the CLI and the demo start servers; the library never does
            assert other != "server", f"{name} imports the server package ({target})"
            assert LAYERS.index(other) <= LAYERS.index(layer), (
                f"{name} ({layer}) imports {target} ({other}), a layer above it"
            )


def test_no_import_cycle() -> None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in sorted(GRAPH[name]):
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_the_check_sees_deferred_imports() -> None:
    # The CLI imports the server inside a function; the check must see that edge.
    assert "lazytensor_server.app" in GRAPH["lazytensor.cli"]
