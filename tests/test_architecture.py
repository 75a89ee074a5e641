"""The layout's rules, read from the source: dependencies run one way, no import loop, the docs name what exists.

- ``models`` is pure PyTorch: it imports nothing of ``producer`` or ``worker``.
- ``producer`` never imports ``worker`` or ``models``, except the CLI (the top floor), and only inside a command.
- The contract imports nothing of genq but itself and the errors; the shared core (``producer.core``) imports neither
  the client, the API nor the CLI; neither does the worker.
- No import loop among modules (imports under ``if TYPE_CHECKING:`` are not run, so they do not count).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "producer", "worker")
UPPER_FLOORS = ("producer.client", "producer.api", "producer.cli", "producer.settings", "producer.uploads")


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # a module of this tree
    line: int
    lazy: bool  # inside a function: runs when called, not when the importer is imported


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {
    _module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")) if "__pycache__" not in p.parts
}


def _resolve(name: str) -> str | None:
    """The module of this tree that ``name`` (a module, or a name inside one) refers to."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str, path: Path) -> list[Import]:
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if (target := _resolve(alias.name)) is not None:
                        found.append(Import(module, target, child.lineno, lazy))
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                for alias in child.names:
                    if (target := _resolve(f"{child.module}.{alias.name}")) is not None:
                        found.append(Import(module, target, child.lineno, lazy))
            visit(child, lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    visit(ast.parse(path.read_text()), False)
    return found


IMPORTS = [imp for module, path in MODULES.items() for imp in _imports(module, path)]


def _inside(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _where(imp: Import) -> str:
    return f"{MODULES[imp.importer].relative_to(ROOT)}:{imp.line} imports {imp.target}"


def test_the_tree_holds_the_packages_this_test_reads() -> None:
    assert {"producer.contract", "producer.core.store", "producer.cli.main", "worker.tasks", "models.cgan"} <= set(
        MODULES
    )
    assert len(IMPORTS) > 300  # the parser sees the imports (a broken walk would pass every rule below)


def test_models_import_nothing_of_producer_or_worker() -> None:
    bad = [_where(i) for i in IMPORTS if _inside(i.importer, "models") and _inside(i.target, "producer", "worker")]
    assert bad == []


def test_only_the_cli_reaches_into_worker_and_models_and_only_inside_a_command() -> None:
    bad = [
        _where(i)
        for i in IMPORTS
        if _inside(i.importer, "producer")
        and _inside(i.target, "worker", "models")
        and not (_inside(i.importer, "producer.cli") and i.lazy)
    ]
    assert bad == []


def test_the_contract_imports_only_itself_and_the_errors() -> None:
    bad = [
        _where(i)
        for i in IMPORTS
        if _inside(i.importer, "producer.contract") and not _inside(i.target, "producer.contract", "producer.errors")
    ]
    assert bad == []


@pytest.mark.parametrize(
    "lower", ["producer.core", "producer.contract", "producer.errors", "producer.webhooks", "worker"]
)
def test_lower_floors_import_neither_the_client_the_api_nor_the_cli(lower: str) -> None:
    bad = [_where(i) for i in IMPORTS if _inside(i.importer, lower) and _inside(i.target, *UPPER_FLOORS)]
    assert bad == []


def test_there_is_no_import_loop() -> None:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in IMPORTS:
        if imp.lazy or imp.target == imp.importer:
            continue
        graph[imp.importer].add(imp.target)
        # Importing a.b.c runs a/__init__ and a/b/__init__ first, unless the importer lives inside them already.
        parent = imp.target.rpartition(".")[0]
        while parent:
            if not _inside(imp.importer, parent) and parent in MODULES:
                graph[imp.importer].add(parent)
            parent = parent.rpartition(".")[0]

    loops = _strongly_connected(graph)
    assert loops == [], f"import loops: {loops}"


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; returns the components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_loop_finder_finds_a_loop() -> None:
    assert _strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_module_docs_architecture_names_exists() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    paths = set(re.findall(r"`((?:producer|worker|models)/[\w/]*\.(?:py|lua))`", text))
    dotted = {
        d for d in re.findall(r"`((?:producer|worker|models)(?:\.\w+)+)", text) if not d.endswith((".py", ".lua"))
    }
    assert len(paths) + len(dotted) > 40  # the page lists the modules (a format change would make this vacuous)
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    missing += sorted(d for d in dotted if _resolve(d) is None or _resolve(d) in ("producer", "worker", "models"))
    assert missing == []


def test_docs_architecture_names_every_module() -> None:
    # A row names a module by its path, or a folder's row names it by file name (`producer/api/` ... `app.py`).
    lines = (ROOT / "docs" / "architecture.md").read_text().splitlines()
    missing = []
    for path in MODULES.values():
        if path.name in ("__init__.py", "__main__.py"):
            continue
        relative = path.relative_to(ROOT).as_posix()
        folder = relative.rsplit("/", 1)[0] + "/"
        if not any(relative in line or (folder in line and f"`{path.name}`" in line) for line in lines):
            missing.append(relative)
    assert missing == [], f"modules docs/architecture.md does not name: {missing}"
