"""Which test files run code of the compiled hot path (``pytest --hot-path-usage``).

``./scripts/test`` reruns, on the pure-Python modules (``MESHPROXY_PURE=1``), the tests whose
outcome can depend on the choice between them.  A test that runs no function of a module
``scripts/build_ext.py`` compiles behaves the same either way.  Run under ``MESHPROXY_PURE=1``
(the modules are then Python a profiler sees), this option records for each test (set-up and
teardown included, all threads) whether a function of those modules ran, counted by the module
whose globals the frame runs in (so a dataclass's generated methods count for their class's
module), and prints the test files where none did: the rerun's ``--ignore`` list.  Proxies run
as child processes are not seen: the request-path integration files are named in ``scripts/test``.
"""
from __future__ import annotations

import sys
import threading
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def hot_modules() -> set[str]:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from build_ext import HOT
    finally:
        sys.path.pop(0)
    return {module[:-3].replace("/", ".") for module in HOT}


class HotPathUsage:
    def __init__(self) -> None:
        self.modules = hot_modules()
        self.used: dict[str, bool] = {}
        self._hit = False

    def _profile(self, frame, event, arg):
        # by the frame's module, not its file: methods a dataclass generates (exec'd, file
        # "<string>") run with the globals of the module that defines the class
        if event == "call" and frame.f_globals.get("__name__") in self.modules:
            self._hit = True

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self._hit = False
        sys.setprofile(self._profile)
        threading.setprofile(self._profile)
        try:
            yield
        finally:
            sys.setprofile(None)
            threading.setprofile(None)
            self.used[item.nodeid] = self._hit

    def pytest_terminal_summary(self, terminalreporter):
        import meshproxy
        write = terminalreporter.write_line
        if meshproxy.HOT_PATH == "compiled":
            write("--hot-path-usage: run it with MESHPROXY_PURE=1 (compiled functions are not seen)")
            return
        per_file: dict[str, list[bool]] = defaultdict(list)
        for nodeid, hit in self.used.items():
            per_file[nodeid.split("::", 1)[0]].append(hit)
        write("")
        write("hot path usage per test file (tests running compiled-module code / tests):")
        for path in sorted(per_file):
            hits = per_file[path]
            write(f"  {sum(hits):5d} / {len(hits):5d}  {path}")
        unused = sorted(p for p, hits in per_file.items() if not any(hits))
        write("files running no compiled-module code: " + (" ".join(unused) or "(none)"))


def pytest_addoption(parser) -> None:
    parser.addoption("--hot-path-usage", action="store_true",
                     help="report which test files run functions of the compiled hot path "
                          "(run with MESHPROXY_PURE=1)")


def pytest_configure(config) -> None:
    if config.getoption("--hot-path-usage", False):
        config.pluginmanager.register(HotPathUsage(), "hot-path-usage")
