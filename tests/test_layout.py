"""The package's folders keep their import rules (docs/development.md, "Project layout").

- the top holds only what `flwr run` loads (client_app, server_app, task), as in
  Flower's quickstart, plus the run-config table (config);
- privacy/ imports nothing of ours but itself (and no Flower);
- data/ imports only itself and `dpfl_app.errors`;
- secagg/ (the secure-aggregation protocol) imports only itself and `dpfl_app.errors`;
- errors/ (the error types for bad input, raised on both sides) imports nothing of ours;
- client/ (the ClientApp's mods, policy and secure-aggregation stages) never imports
  strategy/, run/ or tools/;
- strategy/ and run/ never import tools/; strategy/ never imports run/;
- nothing outside tools/ imports tools/.
Checked on the import graph read from the source, including imports inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dpfl_app"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> every dpfl_app module (or package) it imports, anywhere in its body."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                found |= {f"{base}.{alias.name}" for alias in node.names} | {base}
        graph[name] = {m for m in found if m == "dpfl_app" or m.startswith("dpfl_app.")}
    return graph


def folder(module: str) -> str:
    """'dpfl_app.privacy.mechanism' -> 'privacy'; top-level modules -> their own name."""
    return module.split(".")[1] if module.count(".") >= 1 else ""


GRAPH = import_graph()
ERRORS = "dpfl_app.errors"  # the error types every layer raises: a leaf


def _errors(dep: str) -> bool:
    return dep == ERRORS or dep.startswith(ERRORS + ".")


def _violations(source_folder: str, allowed) -> list[str]:
    return [f"{mod} imports {dep}" for mod, deps in GRAPH.items() if folder(mod) == source_folder
            for dep in deps if not allowed(dep)]


def test_graph_sees_the_package():
    assert {"privacy", "data", "strategy", "run", "tools", "client"} <= {folder(m) for m in GRAPH}
    assert "dpfl_app.strategy.dp_fedavg" in GRAPH["dpfl_app.run.recorder"]


def test_privacy_imports_nothing_of_ours():
    assert _violations("privacy", lambda dep: folder(dep) == "privacy") == []


def test_data_imports_only_data_and_errors():
    assert _violations("data", lambda dep: folder(dep) == "data" or _errors(dep)) == []


def test_secagg_imports_only_itself_and_errors():
    assert _violations("secagg", lambda dep: folder(dep) == "secagg" or _errors(dep)) == []


def test_the_errors_package_imports_nothing_of_ours():
    assert ERRORS in GRAPH
    assert _violations("errors", lambda dep: False) == []


def test_the_top_is_as_thin_as_flowers_quickstart():
    top = {path.stem for path in PACKAGE.glob("*.py")}
    assert top == {"__init__", "client_app", "server_app", "task", "config"}


@pytest.mark.parametrize("source,forbidden", [
    ("strategy", {"run", "tools"}), ("run", {"tools"}), ("privacy", {"strategy", "run", "tools"}),
    ("data", {"strategy", "run", "tools"}), ("client", {"strategy", "run", "tools"}),
])
def test_no_import_runs_up(source, forbidden):
    assert _violations(source, lambda dep: folder(dep) not in forbidden) == []


def test_nothing_outside_tools_imports_tools():
    bad = [f"{mod} imports {dep}" for mod, deps in GRAPH.items() if folder(mod) != "tools"
           for dep in deps if folder(dep) == "tools"]
    assert bad == []


def test_privacy_has_no_flower_imports():
    for path in (PACKAGE / "privacy").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [n for n in names if n.split(".")[0] == "flwr"], path
