"""A meshed set of pods for capture tests: a control plane in a pod of its own and application
pods with ``pod-init`` rules and a ``meshproxy run --capture`` sidecar (as uid 1337), built on
:mod:`netns`.  Everything runs inside the pods' namespaces; the host's namespace is never used.

    with PodNetwork("capture") as net:
        mesh = Mesh(net, tmp_path)                      # control plane in pod "istiod"
        mesh.add_workload("reviews-v1", "reviews", {"app": "reviews", "version": "v1"},
                          app=["http", "reviews-v1", "9080"], app_ports=["http:9080"])
        client = mesh.add_workload("client", "client", {"app": "client"})
        client.pod.run(["curl", "-s", "http://reviews:9080/"])

:func:`add_reviews_and_client` is the set of pods the capture tests and ``./scripts/pod-demo``
share (with :data:`REVIEWS_90_10`): what the demo shows is what the tests check.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

from netns import Pod, PodNetwork, wait_until

PROBE = str(Path(__file__).resolve().parent / "pod_probe.py")
PROXY_UID = 1337
CP_PORT = 15010

_HEALTH_WAIT = """
import sys, time, urllib.request
deadline = time.monotonic() + float(sys.argv[2])
while True:
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=1) as r:
            if r.status == 200:
                break
    except Exception:
        pass
    if time.monotonic() > deadline:
        sys.exit("not ready")
    time.sleep(0.05)
"""


def start_ready(pod: Pod, argv: list[str], user: int | None = None, log: Path | None = None) -> subprocess.Popen:
    """Start a pod_probe server (or anything that prints ``ready``) and wait for that line."""
    proc = pod.popen(argv, user=user, stdout=subprocess.PIPE, stderr=open(log, "ab") if log else None, text=True,
                     env=pod.network.env())
    line = proc.stdout.readline().strip()
    if line != "ready":
        raise RuntimeError(f"{argv} in {pod} did not start: {line!r}")
    return proc


class Workload:
    def __init__(self, mesh: "Mesh", pod: Pod, sidecar: subprocess.Popen | None, log: Path):
        self.mesh = mesh
        self.pod = pod
        self.sidecar = sidecar
        self.log = log

    def http(self, url: str, timeout: float = 5) -> tuple[int, dict, bytes]:
        """GET from inside this pod (as the application would: plain urllib, no proxy settings)."""
        code = ("import json,sys,urllib.request,urllib.error\n"
                "req=urllib.request.Request(sys.argv[1])\n"
                "try:\n"
                "    r=urllib.request.urlopen(req,timeout=float(sys.argv[2])); s,h,b=r.status,dict(r.headers),r.read()\n"
                "except urllib.error.HTTPError as e:\n"
                "    s,h,b=e.code,dict(e.headers),e.read()\n"
                "print(json.dumps([s,h,b.decode('latin-1')]))\n")
        out = self.pod.python(code, url, str(timeout), timeout=timeout + 15)
        if out.returncode != 0:
            raise RuntimeError(f"GET {url} from {self.pod}: {out.stderr.strip()[-500:]}")
        status, headers, body = json.loads(out.stdout)
        return status, {k.lower(): v for k, v in headers.items()}, body.encode("latin-1")

    def admin(self, path: str) -> str:
        """The sidecar's admin page; a connection reset (seen a few times on a loaded machine,
        cause not found) is retried twice, as a scraper would on its next interval."""
        for attempt in range(3):
            try:
                return self.http(f"http://127.0.0.1:15000{path}")[2].decode()
            except RuntimeError as err:
                if "ConnectionResetError" not in str(err) or attempt == 2:
                    raise
                time.sleep(0.5)

    def metrics(self) -> str:
        return self.admin("/metrics")

    def sidecar_log(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_config(self, check, what: str, timeout: float = 10) -> None:
        """Wait until ``check(config_dump text)`` holds at this sidecar (a pushed config arrived)."""
        wait_until(lambda: check(self.admin("/config_dump")), timeout, 0.2, what)


class Mesh:
    def __init__(self, net: PodNetwork, tmp: Path, debounce: float = 0.05):
        self.net = net
        self.tmp = tmp
        self.cp_pod = net.add_pod("istiod")
        # the control plane serves TLS (it is not on loopback): meshctl uses its credentials
        # file, sidecars (uid 1337) get a bootstrap token and the root from a directory they can read
        self.secrets = Path(tempfile.mkdtemp(prefix=f"meshpods-{os.getpid()}-"))
        self.secrets.chmod(0o755)
        weakref.finalize(self, shutil.rmtree, str(self.secrets), True)
        self.credentials = self.secrets / "credentials.json"
        self.url = f"https://{self.cp_pod.address}:{CP_PORT}"
        self.workloads: dict[str, Workload] = {}
        ready = tmp / "cp-port"
        self.cp = self.cp_pod.popen(
            [sys.executable, "-m", "controlplane.cli", "serve", "--store", f"sqlite:{tmp / 'cp.db'}",
             "--listen", f"{self.cp_pod.address}:{CP_PORT}", "--debounce", str(debounce), "--ttl", "10",
             "--ready-file", str(ready), "--credentials", str(self.credentials)],
            stdout=open(tmp / "cp.log", "ab"), stderr=subprocess.STDOUT, env=net.env())
        deadline = time.monotonic() + 20
        while not (ready.exists() and ready.read_text()):
            if self.cp.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"control plane did not start: {(tmp / 'cp.log').read_text()[-2000:]}")
            time.sleep(0.05)
        self.root = self.secrets / "root.pem"
        self.root.write_text(json.loads(self.credentials.read_text())["ca"])
        self.root.chmod(0o644)
        self._tokens = 0

    def meshctl(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        result = self.cp_pod.run([sys.executable, "-m", "controlplane.cli", "--credentials", str(self.credentials),
                                  *args], input=input, env=self.net.env())
        return result

    def token_file(self, namespace: str, service_account: str) -> Path:
        """A reusable bootstrap token (a restarted sidecar presents it again) in a file the
        sidecar's uid can read."""
        result = self.meshctl("token", "create", "--namespace", namespace, "--service-account", service_account,
                              "--reusable", "--ttl", "2h")
        if result.returncode != 0:
            raise RuntimeError(f"meshctl token create failed: {result.stderr}")
        self._tokens += 1
        path = self.secrets / f"{service_account}-{self._tokens}.token"
        path.write_text(result.stdout.strip())
        path.chmod(0o644)
        return path

    def apply(self, yaml_text: str) -> None:
        result = self.meshctl("apply", "-f", "-", input=yaml_text)
        if result.returncode != 0:
            raise RuntimeError(f"meshctl apply failed: {result.stdout}{result.stderr}")

    def add_workload(self, name: str, service: str, labels: dict[str, str], *, app: list[str] | None = None,
                     app_ports: list[str] = (), pod_init: list[str] = (), sidecar: list[str] = (),
                     resolv_conf: str | None = None, start_sidecar: bool = True,
                     namespace: str = "default", wait: bool = True) -> Workload:
        """A pod with the application (``app``: pod_probe.py arguments), pod-init rules and, unless
        ``start_sidecar`` is False, its sidecar (``wait=False``: do not wait until it is ready;
        :meth:`wait_ready` later, so several sidecars start at once)."""
        pod = self.net.add_pod(name)
        pod.set_resolv_conf(resolv_conf or f"nameserver {self.cp_pod.address}\n"
                                           f"search {namespace}.svc.cluster.local svc.cluster.local cluster.local\n"
                                           "options ndots:5 timeout:2 attempts:1\n")
        log = self.tmp / f"{name}.log"
        if app:
            start_ready(pod, [sys.executable, PROBE, *app], log=log)
        result = pod.run([sys.executable, "-m", "meshproxy", "pod-init", *pod_init], env=self.net.env())
        if result.returncode != 0:
            raise RuntimeError(f"pod-init in {pod}: {result.stderr}")
        workload = Workload(self, pod, None, log)
        self.workloads[name] = workload
        if start_sidecar:
            self.start_sidecar(workload, service, labels, app_ports, sidecar, namespace, wait=wait)
        return workload

    def sidecar_argv(self, service: str, labels: dict[str, str], app_ports, extra, namespace="default") -> list[str]:
        argv = [sys.executable, "-m", "meshproxy", "run", "--capture", "--control-plane", self.url,
                "--ca-file", str(self.root), "--token-file", str(self.token_file(namespace, service)),
                "--service-account", service, "--service", service, "--namespace", namespace,
                "--labels", ",".join(f"{k}={v}" for k, v in labels.items()),
                "--drain-timeout", "2", "--trace-sample-rate", "1"]
        for port in app_ports:
            argv += ["--app-port", port]
        return argv + list(extra)

    def start_sidecar(self, workload: Workload, service: str, labels: dict[str, str], app_ports=(), extra=(),
                      namespace="default", wait: bool = True) -> subprocess.Popen:
        argv = self.sidecar_argv(service, labels, app_ports, extra, namespace)
        workload.sidecar = workload.pod.popen(argv, user=PROXY_UID, stdout=open(workload.log, "ab"),
                                              stderr=subprocess.STDOUT, env=self.net.env())
        if wait:
            self.wait_ready(workload)
        return workload.sidecar

    def wait_all_ready(self) -> None:
        """Wait for every sidecar started so far (started with ``wait=False``, they start at once)."""
        for workload in self.workloads.values():
            if workload.sidecar is not None:
                self.wait_ready(workload)

    def wait_ready(self, workload: Workload, timeout: float = 30) -> None:
        result = workload.pod.python(_HEALTH_WAIT, "http://127.0.0.1:15021/healthz/ready", str(timeout),
                                     timeout=timeout + 15)
        if result.returncode != 0:
            raise RuntimeError(f"sidecar in {workload.pod} not ready: {workload.sidecar_log()[-3000:]}")

    def wait_endpoints(self, service: str, count: int, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while True:
            out = self.meshctl("endpoints", service).stdout
            if out.count(self.net.prefix + ".") >= count:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{service}: {count} endpoints not registered: {out}")
            time.sleep(0.1)


REVIEWS_90_10 = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 90}
    - {destination: {host: reviews, subset: v2}, weight: 10}
"""


def add_reviews_and_client(mesh: Mesh, sidecar: list[str] = (), reviews_sidecar: list[str] = ()) -> Workload:
    """The pods the capture tests and the pod demo share: ``reviews-v1`` and ``reviews-v2`` (an HTTP
    app on 9080 answering its name; ``reviews_sidecar``: more arguments for their sidecars) and
    ``client`` (DNS captured), all meshed, ``sidecar`` the arguments every sidecar gets.  The
    sidecars are started, not waited for (:meth:`Mesh.wait_all_ready`), so more pods can join them
    first.  Returns the client."""
    for version in ("v1", "v2"):
        mesh.add_workload(f"reviews-{version}", "reviews", {"app": "reviews", "version": version},
                          app=["http", f"reviews-{version}", "9080"], app_ports=["http:9080"],
                          sidecar=[*sidecar, *reviews_sidecar], wait=False)
    return mesh.add_workload("client", "client", {"app": "client", "version": "v1"}, pod_init=["--capture-dns"],
                             sidecar=list(sidecar), wait=False)
