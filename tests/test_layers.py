"""The shape of the code: modules stack without cycles, and the lower layers stay free of
the upper ones (the protocol core does no I/O; events know nothing of sessions)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import nkservice

PACKAGE = Path(nkservice.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports_of(module: str) -> set[str]:
    """Every nkservice module `module` imports, anywhere in it: `TYPE_CHECKING` blocks and
    function bodies included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in MODULES and name != module}


def test_no_import_cycles() -> None:
    graph = {module: imports_of(module) for module in MODULES}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = " -> ".join([*path[path.index(module):], module])
            raise AssertionError(f"import cycle: {cycle}")
        if module in done:
            return
        for imported in sorted(graph[module]):
            visit(imported, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_the_protocol_core_does_no_io() -> None:
    for module in MODULES:
        if module.startswith("nkservice.protocol"):
            source = ast.parse(MODULES[module].read_text())
            names = {alias.name.split(".")[0] for node in ast.walk(source)
                     if isinstance(node, ast.Import) for alias in node.names}
            names |= {node.module.split(".")[0] for node in ast.walk(source)
                      if isinstance(node, ast.ImportFrom) and node.module}
            assert not names & {"asyncio", "socket", "ssl", "selectors"}, module
    # …and nothing it imports brings them in either.
    probe = ("import sys, nkservice.protocol.connection, nkservice.protocol.framing, "
             "nkservice.protocol.names; "
             "print(sorted({'asyncio', 'socket', 'ssl'} & set(sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert loaded == "[]"


def test_events_know_nothing_of_services_or_transports() -> None:
    for module in MODULES:
        if module.startswith("nkservice.events"):
            assert all(imported.startswith(("nkservice.events", "nkservice.errors"))
                       for imported in imports_of(module)), module
