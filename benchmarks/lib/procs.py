"""Starting, pinning, measuring and always stopping the processes of a benchmark run.

Every process is started in its own session (so its own process group) and registered in a
``ProcessSet``; ``ProcessSet.stop_all()`` runs from a ``finally`` and from signal handlers, and
signals each group (SIGTERM, then SIGKILL after a grace period). Nothing is ever killed by name.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")
            time.sleep(0.05)


def wait_http_ok(url: str, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered 200")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
                last = r.status
        except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout}s (last: {last})")


def pin_prefix(cores: list[int] | None) -> list[str]:
    """``taskset -c`` prefix for a command, or nothing when pinning is off."""
    if not cores:
        return []
    return ["taskset", "-c", ",".join(str(c) for c in cores)]


@dataclass
class Managed:
    name: str
    proc: subprocess.Popen
    log_path: str


@dataclass
class ProcessSet:
    """Processes this run started; stops them all, group by group."""
    procs: list[Managed] = field(default_factory=list)

    def start(self, name: str, argv: list[str], log_path: str, env: dict | None = None, cwd: str | None = None) -> Managed:
        log = open(log_path, "ab")
        try:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env=env, cwd=cwd)
        finally:
            log.close()
        m = Managed(name, proc, log_path)
        self.procs.append(m)
        return m

    def stop(self, m: Managed, grace: float = 5.0) -> None:
        _stop_group(m.proc, grace)
        if m in self.procs:
            self.procs.remove(m)

    def stop_all(self, grace: float = 5.0) -> None:
        while self.procs:
            self.stop(self.procs[-1], grace)


def _stop_group(proc: subprocess.Popen, grace: float) -> None:
    pgid = proc.pid  # start_new_session=True: the child leads its own group
    if proc.poll() is None:
        _killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    # the leader may be gone while its group (workers) lingers: finish the group off
    _killpg(pgid, signal.SIGKILL)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# --- /proc readings -------------------------------------------------------------------------

def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (read from /proc/*/stat parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0.0
    return parse_stat_cpu_ticks(stat) / CLK_TCK


def parse_stat_cpu_ticks(stat_line: str) -> int:
    # fields after "(comm)": state is field 3, utime 14, stime 15 (1-based, man 5 proc)
    rest = stat_line[stat_line.rindex(")") + 2:].split()
    return int(rest[11]) + int(rest[12])


def tree_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p) for p in process_tree(pid))


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return parse_vmrss_kib(f.read())
    except OSError:
        return 0


def parse_vmrss_kib(status_text: str) -> int:
    for line in status_text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def tree_rss_kib(pid: int) -> list[tuple[int, int]]:
    """(pid, VmRSS KiB) for the process and each descendant."""
    return [(p, rss_kib(p)) for p in process_tree(pid)]
