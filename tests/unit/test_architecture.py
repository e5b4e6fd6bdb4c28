"""The shape of the package (docs/SHELL_CONTRACT.md): the core decides and never imports a
client library, the two shells have the same module list, no module reaches into a
client's private members, and no import runs in a loop."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "mqkit"
CLIENT_LIBRARIES = ("pika", "aio_pika", "aiormq", "pamqp")
SHELLS = ("_sync", "_async")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _type_only(tree: ast.Module) -> set[int]:
    """Nodes under ``if TYPE_CHECKING:``: annotations only, never run."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skipped.update(id(n) for n in ast.walk(child))
    return skipped


def _imports(name: str, path: Path) -> set[str]:
    """The modules ``name`` imports when it runs: at the top and inside functions (a late
    import is still an import), not those under ``TYPE_CHECKING``."""
    tree = ast.parse(path.read_text())
    skipped = _type_only(tree)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                found.add(full if full in MODULES else target)
    return found


def _graph() -> dict[str, set[str]]:
    return {
        name: {dep for dep in _imports(name, path) if dep in MODULES and dep != name}
        for name, path in MODULES.items()
    }


def _loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    loops: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                loops.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return loops


def test_no_module_imports_in_a_loop() -> None:
    assert _loops(_graph()) == []


def test_the_loop_finder_finds_a_late_import_loop() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _loops(graph) == [["a", "b", "c"]]


# The core: all but the shells, and the test tooling that drives brokers of its own.
CORE = sorted(
    name
    for name in MODULES
    if not name.startswith(("mqkit._sync", "mqkit._async", "mqkit.testing"))
)


@pytest.mark.parametrize("name", CORE)
def test_the_core_never_imports_a_client_library(name: str) -> None:
    used = {dep.split(".")[0] for dep in _imports(name, MODULES[name])}
    assert not used & set(CLIENT_LIBRARIES), f"{name} imports {used & set(CLIENT_LIBRARIES)}"


def test_the_shells_have_the_same_modules() -> None:
    sync, asyn = ({p.name for p in (ROOT / shell).glob("*.py")} for shell in SHELLS)
    assert sync == asyn


def test_no_module_reaches_into_a_clients_private_members() -> None:
    offenders = []
    for name, path in MODULES.items():
        if name in ("mqkit._sync.client", "mqkit._async.client"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, (ast.Name, ast.Attribute))
                and (node.value.id if isinstance(node.value, ast.Name) else node.value.attr).lstrip(
                    "_"
                )
                == "client"
            ):
                offenders.append(f"{name}:{node.lineno} client.{node.attr}")
    assert offenders == []
