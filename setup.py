"""Build hook for ``pip install .``, ``pip wheel .`` and ``python -m build``: the package
(metadata in pyproject.toml) with its hot path compiled by Cython, the same modules and
directives as ``scripts/build_ext.py``.  Each extension is optional: without a C compiler
or Python's headers the wheel holds the pure-Python modules only, and the proxy says so in
its first log lines.  ``MESHPROXY_NO_EXT=1`` builds without extensions (``scripts/setup.sh``
uses it for its editable install, then compiles in place itself).
"""
import os
import shutil
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _inplace(module: str) -> str:
    return os.path.join(ROOT, module[:-3] + sysconfig.get_config_var("EXT_SUFFIX"))


def _fresh(module: str) -> bool:
    """An in-place compiled module newer than its .py and .pxd: what meshproxy itself runs."""
    built = _inplace(module)
    sources = [os.path.join(ROOT, module), os.path.join(ROOT, module[:-3] + ".pxd")]
    return os.path.exists(built) and all(
        os.path.getmtime(s) <= os.path.getmtime(built) for s in sources if os.path.exists(s))


def _extensions() -> list:
    if os.environ.get("MESHPROXY_NO_EXT") == "1":
        return []
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        from build_ext import HOT, SHARED, extensions, shared_source
        if all(_fresh(m) and os.path.exists(os.path.join(ROOT, m[:-3] + ".c")) for m in HOT):
            # built in place already (scripts/setup.sh): packaged as built, nothing recompiled
            return [Extension(m[:-3].replace("/", "."), [m[:-3] + ".c"], optional=True) for m in HOT] + [
                Extension(SHARED, [shared_source()], optional=True)]
        return extensions(optional=True)
    except ImportError as err:              # no Cython in the build environment
        print(f"setup.py: {err}: building meshproxy without its compiled hot path", file=sys.stderr)
        return []
    finally:
        sys.path.pop(0)


class BuildExtReusingInPlace(build_ext):
    """Takes a module ``scripts/build_ext.py`` already compiled in place and still fresh
    (newer than its .py and .pxd, the rule meshproxy itself applies) instead of compiling it
    again, as ccache would."""

    def build_extension(self, ext):
        module = ext.name.replace(".", "/") + ".py"
        if _fresh(module):
            inplace, target = _inplace(module), self.get_ext_fullpath(ext.name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(inplace, target)
            return
        super().build_extension(ext)


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExtReusingInPlace})
