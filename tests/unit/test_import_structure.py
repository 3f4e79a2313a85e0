"""The import structure the style guide asks for, checked on the source (not by importing).

* no import cycles inside ``meshproxy/`` (a module imported at run time, at module level or
  inside a function, or cimported by a .pxd: a compiled module imports what its declarations
  cimport when it loads; ``if TYPE_CHECKING:`` imports are annotations only and do not count);
* the control plane imports from ``meshproxy`` only the proxy's config contract
  (``meshproxy.config``: the model, decoding, compiling); not the proxy's side of config
  delivery (its store, file watch and control-plane client), nor the data plane's runtime,
  telemetry or clients.
"""
from __future__ import annotations

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_CONTRACT = "meshproxy.config"
# under meshproxy.config but the proxy's runtime, not the contract
PROXY_CONFIG_RUNTIME = {"meshproxy.config.store", "meshproxy.config.watch", "meshproxy.config.remote",
                        "meshproxy.config.remote_source"}
# stateless helpers the control plane's TLS port shares with the data plane: SSL contexts from
# in-memory PEM, a server context whose certificate rotates, reading a peer's SPIFFE id
SHARED_HELPERS = {"meshproxy.security.tls"}


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _python_files(package: str):
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: str, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``path`` imports at run time."""
    module = _module_name(path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    found: set[str] = set()

    def resolve(name: str) -> None:
        # "a.b.c" names module a.b.c if it exists, else the package a.b
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name:
            found.add(name)

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                resolve(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            for alias in node.names:
                target = f"{prefix}.{alias.name}"
                resolve(target if target in known else prefix)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(module)
    return found


_CIMPORT = re.compile(r"^\s*from\s+([\w.]+)\s+cimport\s+(.+)$|^\s*cimport\s+([\w.]+)")


def cimports_of(pxd: str, known: set[str]) -> set[str]:
    """The modules of ``known`` that a .pxd cimports (``from a.b cimport c`` names a.b.c when
    that is a module)."""
    found = set()
    for line in open(pxd, encoding="utf-8"):
        m = _CIMPORT.match(line)
        if not m:
            continue
        if m.group(3):
            targets = [m.group(3)]
        else:
            names = [n.split(" as ")[0].strip() for n in m.group(2).split("#")[0].split(",")]
            targets = [f"{m.group(1)}.{n}" if f"{m.group(1)}.{n}" in known else m.group(1) for n in names]
        found.update(t for t in targets if t in known)
    return found


def import_graph(package: str, known: set[str] | None = None) -> dict[str, set[str]]:
    files = list(_python_files(package))
    names = {_module_name(f) for f in files} | (known or set())
    graph = {_module_name(f): imports_of(f, names) for f in files}
    for path in files:
        pxd = path[:-3] + ".pxd"
        if os.path.exists(pxd):
            module = _module_name(path)
            graph[module] |= cimports_of(pxd, names) - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
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


def test_the_cycle_finder_sees_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_reader_ignores_type_checking_imports_and_reads_cimports(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nfrom . import b\n"
                              "if TYPE_CHECKING:\n    from .c import C\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n")
    (pkg / "c.py").write_text("")
    (pkg / "c.pxd").write_text("from pkg cimport a\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", str(tmp_path))
    graph = import_graph("pkg")
    assert graph["pkg.a"] == {"pkg.b"}
    assert graph["pkg.b"] == {"pkg.a"}
    assert graph["pkg.c"] == {"pkg.a"}          # the .pxd's cimport
    assert cycles(graph) == [["pkg.a", "pkg.b"]]


def test_meshproxy_has_no_import_cycles():
    found = cycles(import_graph("meshproxy"))
    assert found == [], "import cycles in meshproxy/: " + "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("package", ["controlplane"])
def test_the_control_plane_imports_only_the_proxy_config_contract(package):
    meshproxy_modules = {_module_name(f) for f in _python_files("meshproxy")}
    graph = import_graph(package, meshproxy_modules)
    outside = sorted(f"{module} imports {target}" for module, targets in graph.items() for target in targets
                     if target.startswith("meshproxy") and target not in SHARED_HELPERS and (
                         target in PROXY_CONFIG_RUNTIME or not (
                         target == CONFIG_CONTRACT or target.startswith(CONFIG_CONTRACT + "."))))
    assert outside == []
