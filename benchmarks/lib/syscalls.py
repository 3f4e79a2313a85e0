"""Syscalls per request of a proxy: ``strace -c`` attached during a short extra load run.

strace slows the traced process a lot, so this runs after the measured runs and only its counts
(not its timings) are used: calls of each syscall divided by the requests served meanwhile.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def parse_strace_c(text: str) -> dict[str, int]:
    """{syscall: calls} from an ``strace -c`` summary (the total row is left out)."""
    counts: dict[str, int] = {}
    dashes = 0
    for line in text.splitlines():
        if line.startswith("------"):
            dashes += 1
            continue
        if dashes != 1:  # rows sit between the first and the second dashed line
            continue
        parts = line.split()
        if len(parts) < 5:
            continue
        name = parts[-1]
        counts[name] = counts.get(name, 0) + int(parts[3])
    return counts


def per_request(counts: dict[str, int], requests: int, top: int = 6) -> dict:
    if requests <= 0:
        return {"total": None, "top": []}
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
    return {"total": sum(counts.values()) / requests,
            "top": [(name, calls / requests) for name, calls in ranked]}


def trace(pids: list[int], out_path: str, run_load) -> tuple[dict[str, int], int]:
    """Attach ``strace -c -f`` to pids, call run_load() -> requests, detach; (counts, requests)."""
    argv = ["strace", "-c", "-f", "-q", "-o", out_path]
    for pid in pids:
        argv += ["-p", str(pid)]
    st = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        time.sleep(0.5)  # let it attach
        requests = run_load()
    finally:
        if st.poll() is None:
            os.killpg(st.pid, signal.SIGINT)  # strace -c writes its summary when interrupted
            try:
                st.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(st.pid, signal.SIGKILL)
                st.wait()
    text = Path(out_path).read_text() if Path(out_path).exists() else ""
    return parse_strace_c(text), requests
