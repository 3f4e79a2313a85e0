"""Compile meshproxy's hot path with Cython, in place (the .so files sit beside the .py files
and are imported instead of them).

    .venv/bin/python scripts/build_ext.py           # build what changed (run by scripts/setup.sh)
    .venv/bin/python scripts/build_ext.py --clean   # remove the compiled modules: pure Python

The .py modules are the reference and the fallback; a ``foo.pxd`` beside ``foo.py`` (an
"augmenting" declaration file) gives the compiled module its types: cdef classes with typed
attributes, C-level calls between the hot classes.  Types come only from the .pxd files
(annotation typing is off), and ``nonecheck`` is on, so a typed attribute that holds None
raises AttributeError as in Python instead of crashing the process.

Only changed modules are rebuilt: a module whose .py, .pxd or a meshproxy .pxd it cimports
(transitively) is newer than its generated C (``stale``); a change of the directives or flags
below rebuilds them all.  A missing C compiler or Python headers is not an error: the proxy
then runs as pure Python, and ``meshproxy.HOT_PATH`` says which one is running.
"""
from __future__ import annotations

import glob
import os
import re
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

# Cython's own helpers (its function type, argument parsing, memoryviews, class creation...)
# compiled once into this module, which the modules above import, instead of once into each
# of them: every proxy process maps them once.
SHARED = "meshproxy._cyutility"

# Compiler flags: no unwind tables (.eh_frame: C has no exceptions; the debug sections keep
# .debug_frame for debuggers and profilers), so that each process maps less of the modules.
CFLAGS = ["-O2", "-fno-asynchronous-unwind-tables"]


def clean() -> None:
    for pattern in ("meshproxy/**/*.so", "meshproxy/**/*.c"):
        for path in glob.glob(os.path.join(ROOT, pattern), recursive=True):
            os.remove(path)


def _drop_unlisted() -> None:
    """Compiled modules of modules no longer in HOT (left by an older checkout) are removed:
    beside a newer .py they would make meshproxy refuse every compiled module as stale."""
    listed = {os.path.join(ROOT, m[:-3]) for m in HOT} | {os.path.join(ROOT, SHARED.replace(".", "/"))}
    for path in glob.glob(os.path.join(ROOT, "meshproxy/**/*.so"), recursive=True):
        base = path[: path.index(".", len(os.path.dirname(path)) + 1)]
        if base not in listed:
            os.remove(path)
            c_file = base + ".c"
            if os.path.exists(c_file):
                os.remove(c_file)


_CIMPORT = re.compile(r"^\s*(?:from\s+(meshproxy[\w.]*)\s+cimport\s+([\w, ()]+)|cimport\s+(meshproxy[\w.]*))", re.M)


def cimported(path: str) -> set:
    """The meshproxy .pxd files that ``path`` (a .py or .pxd) cimports directly.
    ``from meshproxy.codec cimport framing`` names a module; ``from meshproxy.codec.api
    cimport RequestHead`` names a module's declarations."""
    with open(path) as f:
        text = f.read()
    found = set()
    for package, names, module in _CIMPORT.findall(text):
        candidates = [module] if module else [package] + [
            f"{package}.{name.strip()}" for name in names.strip("()").split(",")]
        for dotted in candidates:
            pxd = os.path.join(ROOT, *dotted.split(".")) + ".pxd"
            if os.path.exists(pxd):
                found.add(pxd)
    return found


def dependencies(module: str) -> set:
    """Every file a compiled module is built from: its .py, its .pxd, and each meshproxy .pxd
    cimported from them, transitively (a changed class layout in one .pxd changes the layout
    seen by every module that cimports it, directly or through another .pxd)."""
    py = os.path.join(ROOT, module)
    todo = [py, py[:-3] + ".pxd"]
    seen = set()
    while todo:
        path = todo.pop()
        if path in seen or not os.path.exists(path):
            continue
        seen.add(path)
        todo.extend(cimported(path))
    return seen


def stale(modules: list) -> list:
    """The modules whose generated C is missing or older than one of their dependencies.
    Cython's own tracking misses ``from meshproxy.codec cimport framing``, and a module built
    against an old declaration fails at import ("wrong signature"); this scan replaces it."""
    out = []
    for module in modules:
        c_file = os.path.join(ROOT, module[:-3] + ".c")
        if not os.path.exists(c_file):
            out.append(module)
            continue
        built = os.path.getmtime(c_file)
        if any(os.path.getmtime(dep) > built for dep in dependencies(module)):
            out.append(module)
    return out


# annotation_typing off: types come from the .pxd files only; warn.unreachable off: the Python
# reference after an ``if cython.compiled:`` branch is unreachable in C by design; auto_pickle
# off: no pickle support generated for every extension type (connections, parsers, pools are
# never pickled); the snapshot's types, which a process group pickles to its workers, turn it
# back on in model.py's first line
DIRECTIVES = {"annotation_typing": False, "nonecheck": True, "warn.unreachable": False, "auto_pickle": False}

STAMP = os.path.join(ROOT, "build", "build_ext-settings")


def _settings() -> str:
    return repr((DIRECTIVES, CFLAGS, SHARED))


def rebuilt(modules: list) -> list:
    """What a build regenerates: every module after a change of the directives, flags or
    shared module (recorded in build/ by the last build; file times cannot tell), else the
    stale ones."""
    try:
        with open(STAMP) as f:
            if f.read() == _settings():
                return stale(modules)
    except OSError:
        pass
    return list(modules)


def shared_source() -> str:
    """The C file Cython generates for :data:`SHARED`."""
    return SHARED.replace(".", "/") + ".c"


def extensions(optional: bool = False) -> list:
    """The hot path as cythonized extensions (also what ``setup.py`` builds into a wheel;
    ``optional``: a module that fails to compile is left out, and runs as pure Python)."""
    from Cython.Build import cythonize
    from setuptools import Extension
    changed = set(rebuilt(HOT))
    if changed == set(HOT):         # all of them (new flags or directives): the shared one too
        changed.add(shared_source())
    exts = [Extension(m[:-3].replace("/", "."), [m], extra_compile_args=CFLAGS, optional=optional) for m in HOT]
    exts.append(Extension(SHARED, [shared_source()], extra_compile_args=CFLAGS, optional=optional))
    # the changed modules are regenerated (force: Cython's tracking may think them current);
    # the others keep their C, and build_ext recompiles only a C file newer than its module
    return [ext for group, force in (([e for e in exts if e.sources[0] in changed], True),
                                     ([e for e in exts if e.sources[0] not in changed], False)) if group
            for ext in cythonize(group, language_level=3, nthreads=2, quiet=True, force=force,
                                 compiler_directives=DIRECTIVES, shared_utility_qualified_name=SHARED)]


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
    changed = rebuilt(HOT)
    try:
        modules = extensions()
        setup(name="meshproxy-hot-path", ext_modules=modules,
              script_args=["-q", "build_ext", "--inplace", "-j", "2"])
    except (Exception, SystemExit) as err:   # no compiler, no Python.h: stay pure Python
        clean()
        print(f"build_ext: compiling failed ({err}); meshproxy runs as pure Python", file=sys.stderr)
        return 0
    os.makedirs(os.path.dirname(STAMP), exist_ok=True)
    with open(STAMP, "w") as f:
        f.write(_settings())
    print(f"build_ext: hot path compiled ({len(changed)} of {len(HOT)} modules changed, shared {SHARED}, "
          f"{time.time() - started:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    if "--clean" in sys.argv[1:]:
        clean()
        sys.exit(0)
    sys.exit(build())
