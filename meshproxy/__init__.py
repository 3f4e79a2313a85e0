"""meshproxy: the data plane (HTTP/1.1 + TCP proxy).

The per-request modules can be compiled with Cython (``scripts/build_ext.py``, run by
``scripts/setup.sh``); the .py files are then the reference and the fallback.  Which one
runs is decided here, once, before any of them is imported:

* compiled, when the compiled modules are present and none is older than its .py or .pxd;
* pure Python, when there are none, when ``MESHPROXY_PURE=1``, or when one is stale (a
  source edited since the last build: running old compiled code would be worse than slow).
  Staleness is a question for a build tree only (where Cython's generated ``.c`` lies beside
  the module): an installed wheel carries no ``.c`` and its file times are those of unpacking.

``HOT_PATH`` says which (the ready log line, the pytest header, benchmark reports).
"""
from __future__ import annotations

import os
import sys
from importlib.machinery import EXTENSION_SUFFIXES, SOURCE_SUFFIXES, FileFinder, SourceFileLoader


def _choose_hot_path(root: str) -> str:
    suffix = EXTENSION_SUFFIXES[0]
    compiled = False
    stale, dirs = [], []
    for folder, _, files in os.walk(root):
        dirs.append(folder)
        for name in files:
            if name.endswith(suffix):
                base = os.path.join(folder, name[:-len(suffix)])
                built = os.stat(base + suffix).st_mtime
                compiled = True
                sources = (base + ".py", base + ".pxd")
                if os.path.exists(base + ".c") and any(
                        os.path.exists(src) and os.stat(src).st_mtime > built for src in sources):
                    stale.append(os.path.relpath(base, root))
    if not compiled:
        return "python"
    if os.environ.get("MESHPROXY_PURE") == "1" or stale:
        for folder in dirs:   # import meshproxy's modules from their .py files only
            sys.path_importer_cache[folder] = FileFinder(folder, (SourceFileLoader, SOURCE_SUFFIXES))
        if stale:
            return f"python (compiled modules older than their sources, e.g. {stale[0]}: run scripts/build_ext.py)"
        return "python (MESHPROXY_PURE=1)"
    return "compiled"


HOT_PATH = _choose_hot_path(__path__[0])
