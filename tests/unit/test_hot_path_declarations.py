"""The .pxd files that type the compiled hot path must say exactly what the .py files do.

A cdef class has a fixed set of attributes: one the .pxd forgets is an AttributeError at run
time, only on the path that sets it; the fields of a compiled dataclass take the .pxd's order
as ``__init__``'s.  These checks read both files (no compiler needed), so a drift fails here
in both modes, before any request does."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PXDS = sorted((ROOT / "meshproxy").rglob("*.pxd"))
# cdef [public|readonly] TYPE names: TYPE may be several words (long long) or a memoryview (double[:])
_DECL = re.compile(r"^\s+cdef\s+(?:public\s+|readonly\s+)?(?!class\b)(?:(?:unsigned|signed|long|short)\s+)*"
                   r"[\w.\[\]:]+\s+([\w\s,]+?)\s*(?:#.*)?$")


def pxd_classes(path: Path) -> dict[str, tuple[list[str], str | None]]:
    """Each cdef class: (the attributes it declares itself, its base class in the same file)."""
    classes: dict[str, tuple[list[str], str | None]] = {}
    current = None
    for line in path.read_text().splitlines():
        m = re.match(r"cdef class (\w+)(?:\((\w+)\))?", line)
        if m:
            current = []
            classes[m.group(1)] = (current, m.group(2))
            continue
        if current is None or "(" in line:
            continue
        m = _DECL.match(line)
        if m:
            current.extend(name.strip() for name in m.group(1).split(","))
    return classes


def py_attributes(cls: ast.ClassDef) -> tuple[list[str], bool]:
    """(attribute names, is a dataclass): dataclass fields in order, else every ``self.x =``."""
    decorators = [ast.unparse(d) for d in cls.decorator_list]
    if any("dataclass" in d for d in decorators):
        return [s.target.id for s in cls.body if isinstance(s, ast.AnnAssign)], True
    names: list[str] = []
    for node in ast.walk(cls):
        # a C struct member is set through its address (``cython.address(self._ll)``)
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "cython.address" and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Attribute) and isinstance(arg.value, ast.Name) and arg.value.id == "self":
                if arg.attr not in names:
                    names.append(arg.attr)
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for el in (t.elts if isinstance(t, ast.Tuple) else [t]):
                    if isinstance(el, ast.Attribute) and isinstance(el.value, ast.Name) and el.value.id == "self":
                        if el.attr not in names:
                            names.append(el.attr)
    return names, False


def _all_classes():
    """Every cdef class of every .pxd and every class of their .py files, by name (a cdef class
    may derive from one declared in another module: the drivers, the request record)."""
    pxd_all: dict[str, tuple[list[str], str | None]] = {}
    py_all: dict[str, ast.ClassDef] = {}
    for path in PXDS:
        pxd_all.update(pxd_classes(path))
        tree = ast.parse(path.with_suffix(".py").read_text())
        py_all.update({c.name: c for c in ast.walk(tree) if isinstance(c, ast.ClassDef)})
    return pxd_all, py_all


@pytest.mark.parametrize("pxd", PXDS, ids=lambda p: str(p.relative_to(ROOT)))
def test_each_cdef_class_declares_exactly_the_attributes_its_python_class_uses(pxd):
    tree = ast.parse(pxd.with_suffix(".py").read_text())
    py = {c.name: c for c in ast.walk(tree) if isinstance(c, ast.ClassDef)}
    classes = pxd_classes(pxd)
    pxd_all, py_all = _all_classes()
    for name, (own, base) in classes.items():
        assert name in py, f"{pxd.name}: cdef class {name} has no class in the .py"
        used, is_dataclass = py_attributes(py[name])
        if is_dataclass:
            assert own == used, f"{name}: field order differs between .pxd and .py"
            continue
        declared = list(own)
        while base in pxd_all:                      # what the base classes declare is there too
            declared += pxd_all[base][0]
            base = pxd_all[base][1]
        assert set(used) <= set(declared), f"{name}: not declared in {pxd.name}: {sorted(set(used) - set(declared))}"
        # what a class declares itself is set by it or by one of its subclasses (in any module)
        subclasses, grown = {name}, True
        while grown:
            grown = False
            for sub in py_all.values():
                if sub.name not in subclasses and any(
                        isinstance(b, ast.Name) and b.id in subclasses for b in sub.bases):
                    subclasses.add(sub.name)
                    used += py_attributes(sub)[0]
                    grown = True
        assert set(own) <= set(used), f"{name}: declared but never set: {sorted(set(own) - set(used))}"


def test_every_module_with_a_pxd_is_compiled_by_the_build():
    text = (ROOT / "scripts" / "build_ext.py").read_text()
    for pxd in PXDS:
        assert f'"{pxd.with_suffix(".py").relative_to(ROOT)}"' in text, pxd
