"""Compile meshproxy's hot path with Cython, in place (the .so files sit beside the .py files
and are imported instead of them).

    .venv/bin/python scripts/build_ext.py           # build what changed (run by scripts/setup.sh)
    .venv/bin/python scripts/build_ext.py --clean   # remove the compiled modules: pure Python

The .py modules are the reference and the fallback; a ``foo.pxd`` beside ``foo.py`` (an
"augmenting" declaration file) gives the compiled module its types: cdef classes with typed
attributes, C-level calls between the hot classes.  Types come only from the .pxd files
(annotation typing is off), and ``nonecheck`` is on, so a typed attribute that holds None
raises AttributeError as in Python instead of crashing the process.

Only changed modules are rebuilt (Cython and build_ext compare timestamps).  A missing C
compiler or Python headers is not an error: the proxy then runs as pure Python, and
``meshproxy.HOT_PATH`` says which one is running.
"""
from __future__ import annotations

import glob
import os
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Per-request modules, roughly in the order of the life of a request.  With a .pxd: typed;
# without: compiled as they are (the interpreter loop goes, the Python objects stay).
HOT = [
    "meshproxy/clock.py",
    "meshproxy/lists.py",
    "meshproxy/batch.py",
    "meshproxy/runtime.py",
    "meshproxy/driver.py",
    "meshproxy/downstream/http_conn.py",
    "meshproxy/codec/api.py",
    "meshproxy/codec/httptools_backend.py",
    "meshproxy/codec/llhttp_driver.py",
    "meshproxy/codec/framing.py",
    "meshproxy/codec/writer.py",
    "meshproxy/config/model.py",
    "meshproxy/router/request.py",
    "meshproxy/router/match.py",
    "meshproxy/router/split.py",
    "meshproxy/proxy/pipeline.py",
    "meshproxy/proxy/transform.py",
    "meshproxy/proxy/observe.py",
    "meshproxy/cluster/state.py",
    "meshproxy/cluster/balancer.py",
    "meshproxy/upstream/connection.py",
    "meshproxy/upstream/pool.py",
    "meshproxy/telemetry/metrics.py",
    "meshproxy/telemetry/tracing.py",
]


def clean() -> None:
    for pattern in ("meshproxy/**/*.so", "meshproxy/**/*.c"):
        for path in glob.glob(os.path.join(ROOT, pattern), recursive=True):
            os.remove(path)


def _drop_unlisted() -> None:
    """Compiled modules of modules no longer in HOT (left by an older checkout) are removed:
    beside a newer .py they would make meshproxy refuse every compiled module as stale."""
    listed = {os.path.join(ROOT, m[:-3]) for m in HOT}
    for path in glob.glob(os.path.join(ROOT, "meshproxy/**/*.so"), recursive=True):
        base = path[: path.index(".", len(os.path.dirname(path)) + 1)]
        if base not in listed:
            os.remove(path)
            c_file = base + ".c"
            if os.path.exists(c_file):
                os.remove(c_file)


def _declarations_changed() -> bool:
    """Whether a .pxd is newer than a compiled module: then everything is rebuilt.  Cython's
    own dependency tracking misses some cimports (``from meshproxy.codec cimport framing``), and
    a module built against an old declaration fails at import ("wrong signature")."""
    pxds = glob.glob(os.path.join(ROOT, "meshproxy/**/*.pxd"), recursive=True)
    built = glob.glob(os.path.join(ROOT, "meshproxy/**/*.so"), recursive=True)
    if not pxds or not built:
        return False
    return max(map(os.path.getmtime, pxds)) > min(map(os.path.getmtime, built))


# annotation_typing off: types come from the .pxd files only; warn.unreachable off: the Python
# reference after an ``if cython.compiled:`` branch is unreachable in C by design
DIRECTIVES = {"annotation_typing": False, "nonecheck": True, "warn.unreachable": False}


def extensions(optional: bool = False) -> list:
    """The hot path as cythonized extensions (also what ``setup.py`` builds into a wheel;
    ``optional``: a module that fails to compile is left out, and runs as pure Python)."""
    from Cython.Build import cythonize
    from setuptools import Extension
    exts = [Extension(m[:-3].replace("/", "."), [m], extra_compile_args=["-O2"], optional=optional) for m in HOT]
    return cythonize(exts, language_level=3, nthreads=2, quiet=True, force=_declarations_changed(),
                     compiler_directives=DIRECTIVES)


def build() -> int:
    try:
        from setuptools import setup
        import Cython  # noqa: F401
    except ImportError as err:
        print(f"build_ext: {err}; meshproxy runs as pure Python", file=sys.stderr)
        return 0
    _drop_unlisted()
    warnings.simplefilter("ignore")   # setuptools' notes about pyproject.toml, not about this build
    started = time.time()
    try:
        modules = extensions()
        setup(name="meshproxy-hot-path", ext_modules=modules,
              script_args=["-q", "build_ext", "--inplace", "-j", "2"])
    except (Exception, SystemExit) as err:   # no compiler, no Python.h: stay pure Python
        clean()
        print(f"build_ext: compiling failed ({err}); meshproxy runs as pure Python", file=sys.stderr)
        return 0
    print(f"build_ext: hot path compiled ({len(HOT)} modules, {time.time() - started:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    if "--clean" in sys.argv[1:]:
        clean()
        sys.exit(0)
    sys.exit(build())
