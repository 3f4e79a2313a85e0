"""``meshproxy run ... -- CMD ARGS``: the proxy and its application as one pod-like unit.

The launching process becomes a small supervisor (no event loop, no proxying) that does what the
kubelet and Istio's ``holdApplicationUntilProxyStarts`` do together:

1. start the proxy (``meshproxy run`` with the same arguments, without ``-- CMD``); started as root
   with ``--capture`` it runs as ``--proxy-uid`` (default 1337), the uid ``pod-init`` never
   captures, while CMD keeps the caller's uid and is captured;
2. wait until the proxy's health port answers ``/healthz/ready`` (at most ``--startup-timeout``;
   a proxy that never gets ready: CMD is not started, exit 1);
3. start CMD; forward SIGTERM, SIGINT, SIGHUP, SIGUSR1 and SIGUSR2 to it;
4. a proxy that dies while CMD runs is started again (a native sidecar's ``restartPolicy:
   Always``); CMD's connections through it fail until it is back, and work again after;
5. shutdown: on SIGTERM/SIGINT, CMD gets the signal and the proxy gets SIGUSR2 (stop accepting
   inbound, keep serving outbound); once CMD has exited (or after ``--app-exit-timeout``, then
   SIGKILL) the proxy gets SIGTERM and drains; when CMD exits on its own, the same from there.
   The supervisor exits with CMD's exit code (128+N for a signal N).
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

log = logging.getLogger("meshproxy.lifecycle")

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
POLL = 0.05


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz/ready", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def _exit_code(code: int) -> int:
    return code if code >= 0 else 128 - code


class Supervisor:
    def __init__(self, proxy_argv: list[str], app_argv: list[str], *, health_port: int, proxy_uid: int | None,
                 startup_timeout: float = 60.0, app_exit_timeout: float = 30.0, proxy_stop_timeout: float = 30.0):
        self.proxy_argv = proxy_argv
        self.app_argv = app_argv
        self.health_port = health_port
        self.proxy_uid = proxy_uid
        self.startup_timeout = startup_timeout
        self.app_exit_timeout = app_exit_timeout
        self.proxy_stop_timeout = proxy_stop_timeout
        self.proxy: subprocess.Popen | None = None
        self.app: subprocess.Popen | None = None
        self.pending: list[int] = []           # signals received, handled by the loop
        self.restarts = 0

    def _start_proxy(self) -> None:
        argv, kwargs = self.proxy_argv, {}
        if self.proxy_uid is not None:
            uid = self.proxy_uid
            if shutil.which("setpriv"):
                # util-linux's setpriv changes uid while the exec still has root's file access
                # (an interpreter under a root-only directory still starts); Popen(user=) as fallback
                argv = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv]
            else:
                kwargs = {"user": uid, "group": uid, "extra_groups": []}
        env = dict(os.environ, MESHPROXY_SUPERVISED="1")
        self.proxy = subprocess.Popen(argv, env=env, start_new_session=True, **kwargs)

    def _signal(self, proc: subprocess.Popen | None, sig: int) -> None:
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def run(self) -> int:
        for sig in FORWARDED:
            signal.signal(sig, lambda s, _f: self.pending.append(s))
        self._start_proxy()
        deadline = time.monotonic() + self.startup_timeout
        while not _ready(self.health_port):
            if self.proxy.poll() is not None:
                print(f"meshproxy: the proxy exited with {self.proxy.returncode} before it was ready; "
                      f"{self.app_argv[0]} not started", file=sys.stderr)
                return 1
            if any(s in (signal.SIGTERM, signal.SIGINT) for s in self.pending) or time.monotonic() > deadline:
                print(f"meshproxy: the proxy was not ready within {self.startup_timeout:g}s; "
                      f"{self.app_argv[0]} not started", file=sys.stderr)
                self._stop_proxy()
                return 1
            time.sleep(POLL)
        self.pending = [s for s in self.pending if s not in (signal.SIGTERM, signal.SIGINT)]
        try:
            self.app = subprocess.Popen(self.app_argv)
        except OSError as err:
            print(f"meshproxy: cannot start {self.app_argv[0]}: {err}", file=sys.stderr)
            self._stop_proxy()
            return 127
        log.info("application started (pid %d) after the proxy was ready", self.app.pid)
        code = self._watch()
        self._stop_proxy()
        return code

    def _watch(self) -> int:
        shutting_down_at = None
        while True:
            while self.pending:
                sig = self.pending.pop(0)
                self._signal(self.app, sig)
                if sig in (signal.SIGTERM, signal.SIGINT) and shutting_down_at is None:
                    shutting_down_at = time.monotonic()
                    self._signal(self.proxy, signal.SIGUSR2)      # inbound stops, outbound keeps serving
            code = self.app.poll()
            if code is not None:
                return _exit_code(code)
            if shutting_down_at is not None and time.monotonic() - shutting_down_at > self.app_exit_timeout:
                print(f"meshproxy: {self.app_argv[0]} did not exit within {self.app_exit_timeout:g}s: SIGKILL",
                      file=sys.stderr)
                self._signal(self.app, signal.SIGKILL)
                return _exit_code(self.app.wait())
            if self.proxy.poll() is not None and shutting_down_at is None:
                self.restarts += 1
                print(f"meshproxy: the proxy exited with {self.proxy.returncode}; restarting it "
                      f"(restart {self.restarts})", file=sys.stderr)
                time.sleep(min(0.1 * self.restarts, 2.0))
                self._start_proxy()
            time.sleep(POLL)

    def _stop_proxy(self) -> None:
        proxy = self.proxy
        if proxy is None or proxy.poll() is not None:
            return
        self._signal(proxy, signal.SIGTERM)
        try:
            proxy.wait(self.proxy_stop_timeout)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()
