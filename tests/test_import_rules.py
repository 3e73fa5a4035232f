"""The import rules of docs/architecture.md, read from the source with `ast` (imports inside
functions and under TYPE_CHECKING count too), and the absence of import circles.

- featurizer imports no other semrank package;
- ranker imports only featurizer;
- serving never imports training, and training never imports serving;
- inside serving, only serving/server.py (and serving/api itself) imports serving.api;
- no two modules import each other, directly or through others.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("featurizer", "ranker", "serving", "training", "semrank")
GENERATED = "semrank.ranking"  # protoc's stubs (`make proto`)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = _module_name(path)
            if not name.startswith(GENERATED):
                out[name] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The first-party module `name` is (or lies in), or None for third-party ones."""
    while name:
        if name in MODULES or name.startswith(GENERATED):
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path) -> set[str]:
    """First-party modules `module` imports anywhere in its body."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the module pkg.sub when there is one
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for n in names:
            target = _resolve(n)
            if target and target != module:
                out.add(target)
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _top(module: str) -> str:
    return module.split(".")[0]


ALLOWED = {
    "featurizer": {"featurizer"},
    "ranker": {"featurizer", "ranker"},
    "serving": {"featurizer", "ranker", "serving", "semrank"},
    "training": {"featurizer", "ranker", "training"},
    "semrank": set(PACKAGES),
}


def test_the_walk_found_the_packages():
    assert {"featurizer.errors", "ranker.interest", "serving.server", "training.ranking_metrics", "semrank.cli"} <= MODULES.keys()
    assert "featurizer.errors" in GRAPH["serving.api.errors"]  # imports are resolved


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_only_what_the_rules_allow(package):
    bad = sorted(
        f"{m} imports {t}"
        for m, targets in GRAPH.items() if _top(m) == package
        for t in targets
        if _top(t) not in ALLOWED[package] or (package != "semrank" and t.startswith("semrank.") and not t.startswith(GENERATED))
    )
    assert not bad, "\n".join(bad)


def test_only_the_server_imports_the_grpc_layer():
    bad = sorted(
        f"{m} imports {t}"
        for m, targets in GRAPH.items() if _top(m) == "serving" and not m.startswith("serving.api") and m != "serving.server"
        for t in targets if t.startswith("serving.api")
    )
    assert not bad, "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    # a package's __init__ is the package itself: an edge from a submodule to its own package's
    # __init__ is a circle only when that __init__ imports submodules back, which the graph shows
    assert _cycles(GRAPH) == []


def test_the_circle_finder_finds_circles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_states_its_rules(package):
    doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text())) or ""
    assert "Import rules" in doc, f"{package}/__init__.py must state its import rules in its docstring"


def test_nothing_imports_the_command_line():
    bad = sorted(f"{m} imports {t}" for m, targets in GRAPH.items() if not m.startswith("semrank.cli")
                 for t in targets if t.startswith("semrank.cli"))
    assert not bad, "\n".join(bad)
