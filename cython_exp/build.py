"""Throwaway Cython build for the hot-path experiment (branch cython-exp).

    PYTHONPATH=/work/cy .venv/bin/python cython_exp/build.py [--clean] [module.py ...]

Compiles the listed modules (default: HOT) in place; the .so files sit next to the .py
files and are imported first.  A ``foo.pxd`` next to ``foo.py`` (augmenting pxd) is
picked up automatically by Cython.  ``--clean`` removes the .so/.c files (pure Python).
"""
import glob
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.chdir(ROOT)

HOT = [
    "meshproxy/proxy/pipeline.py",
    "meshproxy/codec/httptools_backend.py",
    "meshproxy/codec/framing.py",
    "meshproxy/codec/writer.py",
    "meshproxy/codec/api.py",
    "meshproxy/downstream/http_conn.py",
    "meshproxy/upstream/connection.py",
    "meshproxy/upstream/pool.py",
    "meshproxy/cluster/state.py",
    "meshproxy/proxy/transform.py",
    "meshproxy/proxy/observe.py",
    "meshproxy/telemetry/metrics.py",
    "meshproxy/router/split.py",
    "meshproxy/bootstrap.py",   # step D: Worker as a cdef class
    # step E: small per-request helpers, compiled without declarations
    "meshproxy/telemetry/tracing.py",
    "meshproxy/cluster/balancer.py",
    "meshproxy/router/match.py",
    "meshproxy/router/request.py",
]


def clean():
    for pat in ("meshproxy/**/*.so", "meshproxy/**/*.c", "meshproxy/**/*.html"):
        for f in glob.glob(pat, recursive=True):
            os.remove(f)


def main(argv):
    if "--clean" in argv:
        clean()
        return
    mods = [a for a in argv if a.endswith(".py")] or HOT
    from Cython.Build import cythonize
    from setuptools import Extension, setup

    exts = [Extension(m[:-3].replace("/", "."), [m], extra_compile_args=["-O2"]) for m in mods]
    t0 = time.time()
    # the typed variant: types come from the .pxd files only (a `data: bytes` annotation in the .py
    # would otherwise have to be repeated exactly in the .pxd signature)
    directives = {} if "--annotation-typing" in argv else {"annotation_typing": False}
    # a typed attribute that is None must raise AttributeError as in Python, not dereference
    # NULL vtables / struct fields (without this an upstream response arriving while
    # UpstreamConnection.exchange is None segfaults the proxy instead of closing the connection)
    if "--no-nonecheck" not in argv:
        directives["nonecheck"] = True
    ext_modules = cythonize(exts, language_level=3, nthreads=2, annotate="--annotate" in argv,
                            compiler_directives=directives)
    setup(name="cyexp", ext_modules=ext_modules, script_args=["build_ext", "--inplace", "-j", "2"])
    print(f"build time {time.time() - t0:.1f} s for {len(mods)} modules", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
