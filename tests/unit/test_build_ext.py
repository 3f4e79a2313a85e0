"""scripts/build_ext.py rebuilds a compiled module when its .py, its .pxd or a .pxd it cimports
(directly or through another .pxd) is newer than its generated C, and only then."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def build_ext(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("build_ext_under_test", ROOT / "scripts" / "build_ext.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "ROOT", str(tmp_path))
    return module


def _write(root: Path, rel: str, text: str = "", mtime: float = 1000.0) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.utime(path, (mtime, mtime))


def _tree(root: Path) -> None:
    # top.py cimports mid through its .pxd; mid.pxd cimports the base module by package form
    _write(root, "meshproxy/top.py")
    _write(root, "meshproxy/top.pxd", "cimport cython\nfrom meshproxy.pkg.mid cimport Mid\n")
    _write(root, "meshproxy/pkg/mid.py")
    _write(root, "meshproxy/pkg/mid.pxd", "from meshproxy.pkg cimport base\nfrom libc.string cimport memcpy\n")
    _write(root, "meshproxy/pkg/base.py")
    _write(root, "meshproxy/pkg/base.pxd", "cdef class Base:\n    pass\n")
    _write(root, "meshproxy/alone.py")
    for module in ("meshproxy/top", "meshproxy/pkg/mid", "meshproxy/pkg/base", "meshproxy/alone"):
        _write(root, module + ".c", mtime=2000.0)


MODULES = ["meshproxy/top.py", "meshproxy/pkg/mid.py", "meshproxy/pkg/base.py", "meshproxy/alone.py"]


def test_nothing_is_rebuilt_when_every_generated_c_is_newer_than_its_sources(build_ext, tmp_path):
    _tree(tmp_path)
    assert build_ext.stale(MODULES) == []


def test_a_changed_pxd_rebuilds_the_modules_that_cimport_it_transitively_and_no_other(build_ext, tmp_path):
    _tree(tmp_path)
    os.utime(tmp_path / "meshproxy/pkg/base.pxd", (3000.0, 3000.0))
    assert build_ext.stale(MODULES) == ["meshproxy/top.py", "meshproxy/pkg/mid.py", "meshproxy/pkg/base.py"]


def test_a_changed_py_rebuilds_only_its_own_module(build_ext, tmp_path):
    _tree(tmp_path)
    os.utime(tmp_path / "meshproxy/pkg/mid.py", (3000.0, 3000.0))
    assert build_ext.stale(MODULES) == ["meshproxy/pkg/mid.py"]


def test_a_module_without_generated_c_is_built(build_ext, tmp_path):
    _tree(tmp_path)
    (tmp_path / "meshproxy/alone.c").unlink()
    assert build_ext.stale(MODULES) == ["meshproxy/alone.py"]


def test_the_real_tree_sees_the_package_form_cimport_that_cythons_tracking_misses():
    spec = importlib.util.spec_from_file_location("build_ext_real", ROOT / "scripts" / "build_ext.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    deps = {os.path.relpath(p, ROOT) for p in module.dependencies("meshproxy/codec/httptools_backend.py")}
    assert "meshproxy/codec/framing.pxd" in deps   # from meshproxy.codec cimport framing
    assert "meshproxy/codec/api.pxd" in deps
