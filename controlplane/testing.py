"""Run a real control-plane process (for tests, the demo and the benchmark).

``ControlPlaneProcess`` starts ``python -m controlplane.cli serve`` on port 0, waits for the
port it bound (``--ready-file``) and stops it with SIGTERM (SIGKILL after a limit), or kills
it outright to simulate a crash.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class ControlPlaneProcess:
    def __init__(self, store: str, *, port: int = 0, debounce: float = 0.1, ttl: float = 10.0,
                 extra_env: dict | None = None, log_path: str | None = None):
        self.store = store
        self.port = port
        self.debounce = debounce
        self.ttl = ttl
        self.extra_env = extra_env or {}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> "ControlPlaneProcess":
        ready = Path(tempfile.mkdtemp(prefix="meshctl-")) / "port"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "controlplane.cli", "serve", "--store", self.store,
             "--listen", f"127.0.0.1:{self.port}", "--debounce", str(self.debounce), "--ttl", str(self.ttl),
             "--ready-file", str(ready)],
            stdout=log, stderr=log, env={**os.environ, **self.extra_env})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready.exists() and ready.read_text():
                self.port = int(ready.read_text())
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"control plane exited with {self.proc.returncode} before listening")
            time.sleep(0.02)
        self.kill()
        raise TimeoutError(f"control plane did not listen within {timeout} s")

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
