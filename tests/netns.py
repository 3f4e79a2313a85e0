"""Pods for tests: one Linux network namespace per pod, wired to a bridge of its own.

A :class:`PodNetwork` is what a Kubernetes node gives its pods, built from plain Linux parts:

* a *bridge namespace* holding a Linux bridge (``br0``) that owns the gateway address;
* one network namespace per :meth:`PodNetwork.add_pod`, with loopback up and an ``eth0`` that is
  one end of a veth pair whose other end is enslaved to the bridge;
* addresses from ``10.<a>.<b>.0/24`` (private, RFC 1918) that exist only inside these
  namespaces: nothing is added to, routed through or visible from the host's namespace, so a test
  can only ever reach these addresses and loopback.

Every name carries the pid of the test process (``mp<pid>-<n>-<pod>``), so two test runs on one
machine never collide.  Everything is removed by :meth:`PodNetwork.close` (processes started in
the pods, the namespaces and with them the veths and the bridge, the per-pod ``/etc/netns``
files); also at interpreter exit (KeyboardInterrupt / SIGINT included, via ``atexit``) and,
for runs that died harder (SIGKILL), by the next run, which removes namespaces whose pid is gone.

Creating namespaces needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN); CI runs as root.  Without it
:class:`PodNetwork` raises :class:`PodNetworkUnavailable` with what to grant: a test that needs
pods fails, it never skips.

Typical use (one network per test module keeps the suite fast)::

    from netns import PodNetwork        # tests/ is on sys.path (conftest.py)

    @pytest.fixture(scope="module")
    def net():
        with PodNetwork("mtls") as net:
            yield net

    def test_x(net):
        a = net.add_pod("client")
        b = net.add_pod("server")              # b.address == "10.x.y.3"
        srv = b.popen([sys.executable, "-m", "http.server", "8080"])
        a.wait_port(b.address, 8080)          # (checked from inside pod a)
        out = a.run(["curl", "-s", f"http://{b.address}:8080/"]).stdout

:meth:`Pod.run` / :meth:`Pod.popen` run a command inside the pod (``ip netns exec``), optionally as
another user id (``user=1337``: the sidecar's uid; ``setpriv``).  ``resolv_conf=`` gives a pod its
own ``/etc/resolv.conf`` (``ip netns exec`` bind-mounts ``/etc/netns/<pod>/resolv.conf``).
"""
from __future__ import annotations

import atexit
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

PREFIX = "mp"                      # every namespace this module creates: mp<pid>-<n>-<name>
_NAME_RE = re.compile(r"^mp(\d+)-\d+-")
_counter = itertools.count(1)      # networks made by this process (part of their names)
_live: "weakref.WeakSet[PodNetwork]" = weakref.WeakSet()
_atexit_installed = False


class PodNetworkUnavailable(RuntimeError):
    """The machine cannot build pods (not root, or a tool is missing)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def require_pod_support() -> None:
    """Raise :class:`PodNetworkUnavailable` with what to install or grant, or return."""
    missing = [tool for tool in ("ip", "nft", "setpriv") if shutil.which(tool) is None]
    if missing:
        raise PodNetworkUnavailable(
            f"pod tests need {', '.join(missing)} (Debian: iproute2, nftables, util-linux; "
            "./scripts/setup.sh installs them)")
    probe = f"{PREFIX}{os.getpid()}-probe"
    result = _ip("netns", "add", probe, check=False)
    if result.returncode != 0:
        raise PodNetworkUnavailable(
            "pod tests build Linux network namespaces and need root (CAP_SYS_ADMIN and CAP_NET_ADMIN); "
            f"run the suite as root (CI does) or in a container with those capabilities: "
            f"`ip netns add` said: {result.stderr.strip()}")
    _ip("netns", "del", probe, check=False)


def remove_stale_namespaces() -> list[str]:
    """Delete namespaces left by earlier runs whose process is gone (e.g. killed with SIGKILL)."""
    removed = []
    listing = _ip("netns", "list", check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME_RE.match(name)
        if m is None:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        _ip("netns", "del", name, check=False)
        shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)
        removed.append(name)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cleanup_all() -> None:
    for network in list(_live):
        network.close()


def _install_exit_hooks() -> None:
    global _atexit_installed
    if _atexit_installed:
        return
    _atexit_installed = True
    atexit.register(_cleanup_all)
    # SIGTERM's default action skips atexit: turn it into SystemExit when nobody else handles it
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        try:
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        except ValueError:          # not the main thread
            pass


class Pod:
    """One pod: a network namespace with ``lo`` and ``eth0`` (``address``/``prefix``)."""

    def __init__(self, network: "PodNetwork", name: str, netns: str, address: str, index: int):
        self.network = network
        self.name = name
        self.netns = netns
        self.address = address
        self.index = index
        self.processes: list[subprocess.Popen] = []

    def __repr__(self) -> str:
        return f"Pod({self.name} {self.address} netns={self.netns})"

    def command(self, argv: list[str], user: int | None = None) -> list[str]:
        """``argv`` wrapped to run inside this pod (as ``user`` if given)."""
        wrapped = ["ip", "netns", "exec", self.netns]
        if user is not None:
            wrapped += ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]
        return wrapped + [str(a) for a in argv]

    def run(self, argv: list[str], user: int | None = None, timeout: float = 30,
            check: bool = False, **kwargs) -> subprocess.CompletedProcess:
        """Run to completion inside the pod; stdout/stderr captured as text unless overridden."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(self.command(argv, user), timeout=timeout, check=check, **kwargs)

    def popen(self, argv: list[str], user: int | None = None, **kwargs) -> subprocess.Popen:
        """Start inside the pod; the process is killed when the network closes."""
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.command(argv, user), **kwargs)
        self.processes.append(proc)
        return proc

    def python(self, code: str, *args: str, user: int | None = None, timeout: float = 30,
               **kwargs) -> subprocess.CompletedProcess:
        """Run a Python snippet (this interpreter, this repository importable) inside the pod."""
        kwargs.setdefault("env", self.network.env())
        return self.run([sys.executable, "-c", code, *args], user=user, timeout=timeout, **kwargs)

    def wait_port(self, host: str, port: int, timeout: float = 15.0) -> None:
        """Wait until a TCP connect from inside this pod to host:port succeeds."""
        code = ("import socket,sys,time\n"
                "d=time.monotonic()+float(sys.argv[3])\n"
                "while True:\n"
                "    try:\n"
                "        socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=1).close();break\n"
                "    except OSError:\n"
                "        if time.monotonic()>d: sys.exit('timeout')\n"
                "        time.sleep(0.05)\n")
        result = self.python(code, host, str(port), str(timeout), timeout=timeout + 10)
        if result.returncode != 0:
            raise TimeoutError(f"{self}: {host}:{port} not reachable within {timeout}s: {result.stderr.strip()}")

    def set_resolv_conf(self, text: str) -> None:
        """Give processes started afterwards in this pod their own /etc/resolv.conf."""
        directory = Path("/etc/netns") / self.netns
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "resolv.conf").write_text(text)

    def nft(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(["nft", *args], check=check)

    def stop_processes(self, timeout: float = 5.0) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    proc.kill()
        for proc in self.processes:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.processes.clear()


class PodNetwork:
    """A bridge namespace and the pods attached to it.  Use as a context manager.

    ``tag`` only makes names readable (``mp<pid>-<n>-<tag>-br``); uniqueness comes from the pid
    and a per-process counter.  ``subnet`` is the /24 the pods live in; by default a private
    ``10.<a>.<b>.0/24`` derived from the pid and counter.  The bridge owns ``.1``; pods get
    ``.2``, ``.3``, ... in the order they are added.
    """

    def __init__(self, tag: str = "net", subnet: str | None = None):
        require_pod_support()
        remove_stale_namespaces()
        _install_exit_hooks()
        self.id = next(_counter)
        self.tag = re.sub(r"[^a-z0-9]", "", tag.lower())[:12] or "net"
        self.base = f"{PREFIX}{os.getpid()}-{self.id}-{self.tag}"
        if subnet is None:
            a = 64 + (os.getpid() >> 8) % 64
            b = (os.getpid() + self.id) % 256
            subnet = f"10.{a}.{b}.0"
        self.subnet = subnet.split("/")[0]
        self.prefix = ".".join(self.subnet.split(".")[:3])
        self.gateway = f"{self.prefix}.1"
        self.bridge_netns = f"{self.base}-br"
        self.pods: dict[str, Pod] = {}
        self._closed = False
        _live.add(self)
        try:
            _ip("netns", "add", self.bridge_netns)
            _ip("-n", self.bridge_netns, "link", "set", "lo", "up")
            _ip("-n", self.bridge_netns, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.bridge_netns, "addr", "add", f"{self.gateway}/24", "dev", "br0")
            _ip("-n", self.bridge_netns, "link", "set", "br0", "up")
        except Exception:
            self.close()
            raise

    def __enter__(self) -> "PodNetwork":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def env(self) -> dict[str, str]:
        """Environment for Python processes in the pods: this repository importable."""
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return env

    def add_pod(self, name: str) -> Pod:
        """A new pod on this network: namespace ``<base>-<name>``, ``eth0`` with the next address,
        a default route via the bridge (so any off-subnet address, e.g. a service VIP, leaves
        through eth0 and can be captured)."""
        if self._closed:
            raise RuntimeError("network closed")
        if name in self.pods:
            raise ValueError(f"pod {name} exists")
        index = len(self.pods) + 2
        if index > 254:
            raise ValueError("a PodNetwork holds at most 253 pods")
        clean = re.sub(r"[^a-z0-9-]", "", name.lower())[:20] or "pod"
        netns = f"{self.base}-{clean}"
        address = f"{self.prefix}.{index}"
        pod = Pod(self, name, netns, address, index)
        self.pods[name] = pod
        peer = f"veth{index}"
        _ip("netns", "add", netns)
        _ip("-n", netns, "link", "set", "lo", "up")
        # both ends are created in their namespaces directly: nothing appears in the host's
        _ip("-n", netns, "link", "add", "eth0", "type", "veth", "peer", "name", peer, "netns", self.bridge_netns)
        _ip("-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "route", "add", "default", "via", self.gateway)
        _ip("-n", self.bridge_netns, "link", "set", peer, "master", "br0")
        _ip("-n", self.bridge_netns, "link", "set", peer, "up")
        return pod

    def close(self) -> None:
        """Kill the pods' processes, delete every namespace of this network.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        for pod in self.pods.values():
            pod.stop_processes()
        for pod in self.pods.values():
            _ip("netns", "del", pod.netns, check=False)
            shutil.rmtree(f"/etc/netns/{pod.netns}", ignore_errors=True)
        _ip("netns", "del", self.bridge_netns, check=False)
        _live.discard(self)

    def namespaces(self) -> list[str]:
        return [self.bridge_netns] + [p.netns for p in self.pods.values()]


def existing_namespaces() -> set[str]:
    return {line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines() if line.split()}


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not met within {timeout}s")
        time.sleep(interval)
