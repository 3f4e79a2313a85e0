"""Processes: one worker in this process, or a master with N forked workers.

With ``--workers 1`` (the default) everything runs in one process and one event loop:
the worker, the admin listener and the config source.

With ``--workers N`` the master forks N children before it creates any event loop.
Each child binds the same addresses with SO_REUSEPORT and serves traffic.  The config is
the process group's, not each child's: the master holds the one control-plane stream (one
node, one line in ``meshctl proxies``) or file watch, builds each snapshot once, and sends
each child what changed over its pipe (:mod:`meshproxy.config.shared`).  The master runs the admin listener and answers from its
children over one pipe each (readiness is the AND of theirs, metrics are their sum,
with the last dump of a child that died kept so counters never go backwards).  It
forwards SIGTERM to the children, restarts a child that dies unexpectedly, and exits
0 once they have all drained.

Exit codes: 0 after a clean drain; ``EXIT_UNCLEAN_DRAIN`` when the drain deadline passed
with connections still open (they were closed); 1 when the proxy could not start.  The
master exits with ``EXIT_UNCLEAN_DRAIN`` when any worker did not drain cleanly.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass, field, replace
from typing import Callable

from . import HOT_PATH
from .admin import AdminServer
from .bootstrap import Worker, WorkerOptions
from .config.compile import ProxyIdentity
from .config.dump import snapshot_to_dict
from .config.incremental import BuildOutcome, BuildRunner, ConfigBuilder
from .config.load import LoadResult, load as load_files
from .config.model import ProxySettings, Snapshot
from .config.store import SnapshotStore
from .config.watch import ConfigWatcher
from .memory import usage as memory_usage
from .proxy.observe import Telemetry
from .telemetry import (
    AccessLog, MetricsAggregator, ProxyMetrics, ProxyTracer, render,
)
from .telemetry.metrics import workload_peer
from .telemetry.peer_metadata import PeerMetadataExchange, own_metadata

EXIT_UNCLEAN_DRAIN = 3

log = logging.getLogger("meshproxy")


@dataclass
class RunOptions:
    config_paths: list[str] = field(default_factory=list)
    listen: tuple[str, int] = ("127.0.0.1", 15001)
    admin: tuple[str, int] = ("127.0.0.1", 15000)
    workers: int = 1
    identity: ProxyIdentity = field(default_factory=ProxyIdentity)
    settings: ProxySettings = field(default_factory=ProxySettings)
    worker: WorkerOptions = field(default_factory=WorkerOptions)
    control_plane: list[str] = field(default_factory=list)
    registration: dict | None = None
    initial_config_timeout: float = 60.0
    telemetry: dict = field(default_factory=dict)
    pod: object = None              # capture.pod.PodOptions: health port, DNS (capture mode, or supervised)
    # workload identity: {token_file, ca_pem, service_account, trust_domain[, initial]} (None: no certificate)
    security: dict | None = None
    shared_config: bool = False     # a worker of a process group: config comes from the master's pipe


def build_certificates(options: RunOptions):
    """The workload certificate manager (not started), or None without --token-file."""
    sec = options.security
    if not sec:
        return None
    from .security.issuer import ControlPlaneIssuer
    from .security.manager import CertificateManager
    from .security.spiffe import SpiffeId
    identity = SpiffeId(sec["trust_domain"], options.identity.namespace, sec["service_account"])
    issuer = ControlPlaneIssuer(options.control_plane, sec["token_file"], sec.get("ca_pem"))
    return CertificateManager(identity, issuer, initial=sec.get("initial"))


async def start_certificates(options: RunOptions):
    """Build and start the manager: the first certificate (or the master's, for a worker)."""
    certificates = build_certificates(options)
    if certificates is None:
        return None
    from .security.manager import IssuerError
    try:
        await certificates.start(options.initial_config_timeout)
    except IssuerError as exc:
        raise SystemExit(f"meshproxy: no workload certificate for {certificates.identity}: {exc}") from None
    except asyncio.TimeoutError:
        raise SystemExit(f"meshproxy: no workload certificate for {certificates.identity} within "
                         f"{options.initial_config_timeout:g}s (is the control plane reachable?)") from None
    return certificates


# ==================================================================== config sources


class FileConfigSource:
    """Loads the config paths, swaps good snapshots in, records rejections.

    The same :class:`ConfigBuilder` path as pushed config: per resource, a refused new
    version keeps the last good one; decode is cached per content.  The first load runs
    before the worker serves; reloads run off the request loop (:class:`BuildRunner`) and
    only the swap happens on it.  Reloads are serialised and coalesced: a change seen while
    one is building makes one more build after it.
    """

    def __init__(self, options: RunOptions, store: SnapshotStore, telemetry: Telemetry | None = None):
        self.options = options
        self.store = store
        self.telemetry = telemetry
        self.builder = ConfigBuilder(options.identity, options.settings)
        self.runner = BuildRunner()
        self._pending = False
        self._reload: asyncio.Task | None = None

    @property
    def resource_set(self):
        return self.builder.resource_set

    def _build(self) -> tuple[LoadResult, BuildOutcome | None]:
        paths = self.options.config_paths
        loaded = load_files(paths)
        all_missing = paths and not loaded.documents and len(loaded.errors) >= len(paths) and \
            all(": no such file or directory" in e for e in loaded.errors)
        if all_missing and not self.builder.resource_set:
            return loaded, None
        return loaded, self.builder.build(loaded.documents, keep_sources=loaded.failed_sources)

    def load(self) -> list[str]:
        """Build and swap on the calling thread (start-up, before anything is served)."""
        return self._apply(*self._build())

    def _apply(self, loaded: LoadResult, outcome: BuildOutcome | None) -> list[str]:
        errors = list(loaded.errors) + (list(outcome.errors) if outcome is not None else [])
        if outcome is not None:
            for warning in outcome.warnings:
                log.warning("%s", warning)
            for note in outcome.notes:
                log.warning("%s", note)
            snapshot = outcome.snapshot
            if self.store.current is None or self.store.current.version != snapshot.version:
                self.store.swap(snapshot)
        for path in sorted(loaded.failed_sources):
            log.warning("%s: unreadable, its last good resources keep serving", path)
        if errors:
            version = outcome.snapshot.version if outcome is not None else "rejected"
            self.store.reject(version, errors)
            if self.telemetry is not None:
                self.telemetry.config_rejected(version)
            for error in errors:
                log.error("config rejected: %s", error)
        return errors

    async def run(self) -> None:
        watcher = ConfigWatcher(self.options.config_paths, self._changed)
        try:
            await watcher.run()
        finally:
            if self._reload is not None:
                self._reload.cancel()
                await asyncio.gather(self._reload, return_exceptions=True)

    def _changed(self) -> None:
        self._pending = True
        if self._reload is None or self._reload.done():
            self._reload = asyncio.get_running_loop().create_task(self._reload_loop(), name="config-reload")

    async def _reload_loop(self) -> None:
        while self._pending:
            self._pending = False
            try:
                self._apply(*await self.runner.run(self._build))
            except Exception:           # a broken reload must never take the proxy down
                log.exception("config reload failed; keeping the last good config")

    async def reload(self) -> list[str]:
        """One reload now, off the loop (tests, SIGHUP-style triggers)."""
        return self._apply(*await self.runner.run(self._build))


class ConfigSources:
    """The config sources of one process (files, a control plane, or both): first load,
    the tasks that keep them fresh, deregistration on drain."""

    def __init__(self, options: RunOptions, store: SnapshotStore, telemetry: Telemetry | None = None):
        self.options = options
        self.store = store
        self.telemetry = telemetry
        self.files = FileConfigSource(options, store, telemetry) if options.config_paths else None
        self.remote = None          # made by start_remote

    def load_files(self) -> bool:
        """Load the files (if any); False (after saying why on stderr) when none is valid."""
        if self.files is not None:
            errors = self.files.load()
            if self.store.current is None:
                for error in errors:
                    print(error, file=sys.stderr)
                print("meshproxy: no valid config to start with", file=sys.stderr)
                return False
        return True

    async def start_remote(self, certificates=None) -> bool:
        """Open the control-plane stream (if any) and wait for its first config; False (after
        saying why on stderr) when none came in time.  ``certificates``: the workload
        certificate manager the stream presents over https."""
        if not self.options.control_plane:
            return True
        from .config.remote_source import RemoteSource
        self.remote = RemoteSource(self.options, self.store, self.telemetry, certificates=certificates)
        try:
            await self.remote.wait_first_config(self.options.initial_config_timeout)
        except asyncio.TimeoutError:
            print(f"meshproxy: no config from {','.join(self.options.control_plane)} within "
                  f"{self.options.initial_config_timeout:g}s", file=sys.stderr)
            return False
        return True

    def run_tasks(self, loop) -> list[asyncio.Task]:
        tasks = []
        if self.files is not None:
            tasks.append(loop.create_task(self.files.run(), name="config-files"))
        if self.remote is not None:
            tasks.append(loop.create_task(self.remote.run(), name="config-remote"))
        return tasks

    async def deregister(self) -> None:
        if self.remote is not None:
            await self.remote.deregister()


class SharedConfigClient:
    """A worker's side of the process group's config: updates from the master's pipe are
    applied in the build thread, in order, and swapped in on the loop."""

    def __init__(self, store: SnapshotStore):
        self.store = store
        self.runner = BuildRunner()
        self.first = asyncio.Event()
        self._queue: list[bytes] = []
        self._task: asyncio.Task | None = None

    def receive(self, data: bytes) -> None:
        self._queue.append(data)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._apply_all(), name="shared-config")

    async def _apply_all(self) -> None:
        while self._queue:
            data = self._queue.pop(0)
            try:
                from .config.shared import apply_update
                snapshot, changed = await self.runner.run(apply_update, self.store.current, data)
            except Exception:             # a bad update must not take the worker down
                log.exception("config update from the master could not be applied; keeping the current one")
                continue
            self.store.swap(snapshot, changed)
            self.first.set()

    async def wait_first(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.first.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False


class SharedConfigHost:
    """The master's side: the process group's one config source and builder; every new
    snapshot goes to each worker as an update from the one it runs (encoded once per step)."""

    def __init__(self, options: RunOptions, send: Callable[[int, bytes], None], workers: int):
        self.store = SnapshotStore()
        self.sources = ConfigSources(options, self.store)
        self.send = send
        self.running: list[Snapshot | None] = [None] * workers
        self._encoded: dict[tuple[str, str], bytes] = {}
        self.store.subscribe(lambda new, old: self.broadcast())

    async def start(self, certificates=None) -> bool:
        return self.sources.load_files() and await self.sources.start_remote(certificates)

    def broadcast(self) -> None:
        for index in range(len(self.running)):
            self.send_to(index)
        self._encoded.clear()

    def send_to(self, index: int, whole: bool = False) -> None:
        new = self.store.current
        old = None if whole else self.running[index]
        if new is None or new is old:
            return
        key = (old.version if old is not None else "", new.version)
        data = self._encoded.get(key)
        if data is None:
            from .config.shared import encode_update
            data = self._encoded[key] = encode_update(new, old)
        try:
            self.send(index, data)
            self.running[index] = new
        except (OSError, BrokenPipeError):
            self.running[index] = None         # that worker is gone; a new one gets the whole snapshot


# ==================================================================== admin views of one worker


class WorkerAdmin:
    def __init__(self, worker: Worker, certificates=None):
        self.worker = worker
        self.certificates = certificates

    def ready(self) -> bool:
        return self.worker.ready

    async def config_dump(self) -> dict:
        return worker_config_dump(self.worker, self.certificates)

    async def metrics(self, accept: str) -> tuple[bytes, str]:
        return render_metrics(worker_metrics_dump(self.worker), accept)

    async def clusters(self) -> dict:
        return worker_clusters(self.worker)

    async def stats(self) -> str:
        return render_stats(worker_metrics_dump(self.worker))

    async def memory(self) -> dict:
        return {"processes": [worker_memory(self.worker)]}


def worker_config_dump(worker: Worker, certificates=None) -> dict:
    store = worker.store
    dump = snapshot_to_dict(store.current) if store.current is not None else {}
    rejection = store.last_rejection
    return {
        "version": store.current.version if store.current else None,
        "loaded_at": store.loaded_at,
        "last_rejection": None if rejection is None else {
            "version": rejection.version, "errors": list(rejection.errors), "at": rejection.at},
        "snapshot": dump,
        "listen_errors": worker.listen_errors,
        # the workload certificate: identity, expiry, state (valid | renewal-failing | expired)
        "certificates": certificates.status() if certificates is not None else None,
    }


def worker_clusters(worker: Worker) -> dict:
    return {"clusters": worker.clusters.stats(), "pools": worker.pools.stats()}


def worker_memory(worker: Worker) -> dict:
    listeners = worker.all_http_listeners()
    return memory_usage("worker", index=worker.options.worker_index, trims=worker.trimmer.trims,
                        http_connections=sum(l.active for l in listeners),
                        clients_not_reading=sum(l.clients_not_reading() for l in listeners))


def worker_metrics_dump(worker: Worker) -> dict:
    return worker.telemetry.metrics.dump()


def render_metrics(merged: dict, accept: str) -> tuple[bytes, str]:
    return render(merged, accept)


def render_stats(merged: dict) -> str:
    body, _ = render(merged, "")
    return "\n".join(l for l in body.decode().splitlines() if l and not l.startswith("#")) + "\n"


def build_telemetry(options: "RunOptions", loop) -> Telemetry:
    """Metrics always; tracing propagation always (spans exported only when an OTLP
    endpoint is given); access log when asked."""
    t = options.telemetry
    identity = options.identity
    labels = identity.labels
    source = workload_peer(labels, identity.namespace)
    app = source.app
    metrics = ProxyMetrics(worker=options.worker.worker_index, enabled=not t.get("disable_metrics"))
    tracer = None
    if t.get("propagate", True):
        export = None
        if t.get("tracing_endpoint"):
            from .telemetry.trace_export import build_trace_export, otlp_http_exporter
            export = build_trace_export(otlp_http_exporter(t["tracing_endpoint"], timeout_s=5.0),
                                        service_name=t.get("service_name") or f"{app}.{identity.namespace}")
            metrics.attach(export.stats)
            logging.getLogger("opentelemetry.exporter.otlp.proto.http.trace_exporter").setLevel(logging.CRITICAL)
        tracer = ProxyTracer(export, sample_rate=t.get("sample_rate", 0.01))
    access_log = None
    target = t.get("access_log")
    if target:
        sink = sys.stdout.buffer if target == "stdout" else open(target, "ab")
        access_log = AccessLog(sink, sample_rate=t.get("access_log_sample", 1.0), schedule_flush=loop.call_soon)
        metrics.attach(access_log)
    return Telemetry(metrics, tracer, access_log, source=source, peer_exchange=build_peer_exchange(options))


def build_peer_exchange(options: "RunOptions") -> PeerMetadataExchange:
    """This workload's peer metadata (its labels, namespace, service account), encoded once:
    what it tells the sidecars it talks to over mesh mutual TLS."""
    identity = options.identity
    sec = options.security or {}
    node = options.worker.node_id
    fields = own_metadata(identity.labels, identity.namespace, node=node,
                          service_account=sec.get("service_account", ""))
    return PeerMetadataExchange(fields, f"{identity.mode}~{node}.{identity.namespace}")


# ==================================================================== one process


def _install_uvloop() -> None:
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:       # uvloop is a dependency; fall back only where it cannot build
        log.warning("uvloop not available; using the default asyncio loop")


async def serve_worker(options: RunOptions, pipe=None, with_admin: bool = True) -> int:
    loop = asyncio.get_running_loop()
    store = SnapshotStore()
    telemetry = build_telemetry(options, loop)
    holder: list = []          # (worker, certificates) once built
    shared = SharedConfigClient(store) if options.shared_config and pipe is not None else None
    # a worker of a process group has no config source of its own: the master's updates are its config
    config = ConfigSources(options, store, telemetry) if shared is None else None
    if pipe is not None:
        _serve_pipe(loop, pipe, holder, shared)
    if config is not None and not config.load_files():
        return 1
    try:
        certificates = await start_certificates(options)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 1
    renewals = None
    if certificates is not None:
        telemetry.metrics.attach(certificates)
        renewals = loop.create_task(certificates.run(), name="workload-certificate-renewal")
    if shared is not None:
        if not await shared.wait_first(options.initial_config_timeout):
            print("meshproxy: no config from the master process", file=sys.stderr)
            return 1
    elif not await config.start_remote(certificates):
        return 1
    worker = Worker(loop, store, options.worker, telemetry)
    worker.certificates = certificates     # auto mTLS, ISTIO_MUTUAL, inbound termination
    await worker.start()
    for error in worker.listen_errors:
        print(f"meshproxy: {error}", file=sys.stderr)
    holder.append((worker, certificates))
    tasks = config.run_tasks(loop) if config is not None else []
    if renewals is not None:
        tasks.append(renewals)
    admin = None
    if with_admin:
        admin = AdminServer(WorkerAdmin(worker, certificates), *options.admin)
        await admin.start()
    pod = None
    if options.pod is not None and with_admin:
        from .capture.pod import PodServices, mesh_names
        pod = PodServices(options.pod, worker, WorkerAdmin(worker), lambda: mesh_names(worker))
        await pod.start()
    stop = asyncio.Event()
    hits = [0]

    def on_signal(sig: int) -> None:
        hits[0] += 1
        if hits[0] > 1:
            if sig == signal.SIGINT:         # Ctrl-C twice: the operator wants out now
                log.warning("second interrupt: exiting now")
                os._exit(1)
            log.warning("already draining: a second SIGTERM changes nothing")
            return
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    if pod is not None:
        pod.install_signals(loop)      # SIGUSR2: inbound stops accepting, outbound keeps serving
    log.info("meshproxy ready: listeners %s; hot path %s", ", ".join(
        f"{l.model.name}={a}:{p}" for (a, p), l in {**worker.http_listeners, **worker.tcp_listeners, **worker.capture_listeners}.items()),
        HOT_PATH)
    await stop.wait()
    if config is not None:
        await config.deregister()
    clean = await worker.drain()
    if pipe is not None:
        _final_dump(pipe, worker)
    telemetry.close()
    for task in tasks:
        task.cancel()
    if admin is not None:
        await admin.close()
    if pod is not None:
        await pod.close()
    if not clean:
        log.warning("drain deadline passed with connections still open: they were closed")
    return 0 if clean else EXIT_UNCLEAN_DRAIN


def run(options: RunOptions) -> int:
    if options.workers <= 1:
        _install_uvloop()
        return asyncio.run(serve_worker(options))
    return run_master(options)


# ==================================================================== master and workers


def _serve_pipe(loop, pipe, holder: list, shared: "SharedConfigClient | None") -> None:
    """Answer the master's questions (one message each way) and take its config updates.
    ``holder`` gets (worker, certificates) once the worker is built; before that it is not ready."""

    def on_readable() -> None:
        try:
            request = pipe.recv()
        except (EOFError, OSError):
            loop.remove_reader(pipe.fileno())
            os.kill(os.getpid(), signal.SIGTERM)     # master gone: drain and exit
            return
        if isinstance(request, tuple) and request[:1] == ("config",):
            if shared is not None:
                shared.receive(request[1])
            return
        worker, certificates = holder[0] if holder else (None, None)
        if request == "ready":
            pipe.send(worker is not None and worker.ready)
        elif worker is None:
            pipe.send(None)
        elif request == "metrics":
            pipe.send(worker_metrics_dump(worker))
        elif request == "config_dump":
            pipe.send(worker_config_dump(worker, certificates))
        elif request == "clusters":
            pipe.send(worker_clusters(worker))
        elif request == "memory":
            pipe.send(worker_memory(worker))

    loop.add_reader(pipe.fileno(), on_readable)


def _final_dump(pipe, worker: Worker) -> None:
    """A draining worker leaves its last counters with the master before it exits."""
    try:
        pipe.send(("final", worker_metrics_dump(worker)))
    except (OSError, BrokenPipeError):
        pass


def _child_main(options: RunOptions, index: int, pipe) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the master decides when to stop
    options.worker.worker_index = index
    _install_uvloop()
    code = asyncio.run(serve_worker(options, pipe=pipe, with_admin=False))
    sys.exit(code)


class Master:
    def __init__(self, options: RunOptions):
        self.options = options
        import multiprocessing          # only a process group (--workers N) forks
        self.ctx = multiprocessing.get_context("fork")
        self.children: list = [None] * options.workers
        self.pipes: list = [None] * options.workers
        self.aggregator = MetricsAggregator()   # keeps exited workers' counters so totals never go back
        self.stopping = False
        self._lock = None
        # one config stream (or file watch) and one build for the process group, in the master
        self.shares = bool(options.config_paths or options.control_plane)
        self.child_options = replace(options, shared_config=self.shares)
        self.config: SharedConfigHost | None = None

    def spawn(self, index: int) -> None:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_child_main, args=(self.child_options, index, child), daemon=False)
        proc.start()
        child.close()
        self.children[index] = proc
        self.pipes[index] = parent

    async def ask(self, index: int, question: str, timeout: float = 2.0):
        pipe = self.pipes[index]
        if pipe is None:
            return None
        async with self._lock:
            try:
                pipe.send(question)
                loop = asyncio.get_running_loop()
                while await loop.run_in_executor(None, pipe.poll, timeout):
                    answer = pipe.recv()
                    if isinstance(answer, tuple) and answer[:1] == ("final",):
                        self.aggregator.update(index, answer[1])
                        continue
                    return answer
                return None
            except (EOFError, OSError, BrokenPipeError):
                return None

    # admin source
    def ready(self) -> bool:
        return not self.stopping and all(c is not None and c.is_alive() for c in self.children) and self._ready_cache

    async def refresh_ready(self) -> None:
        answers = [await self.ask(i, "ready") for i in range(len(self.children))]
        self._ready_cache = all(a is True for a in answers)

    async def config_dump(self) -> dict:
        dump = await self.ask(0, "config_dump") or {}
        rejection = self.config.store.last_rejection if self.config is not None else None
        if rejection is not None:       # the master built the config: refusals are recorded here
            dump["last_rejection"] = {"version": rejection.version, "errors": list(rejection.errors),
                                      "at": rejection.at}
        return dump

    def _send_config(self, index: int, data: bytes) -> None:
        pipe = self.pipes[index]
        if pipe is None:
            raise BrokenPipeError(f"worker {index} has no pipe")
        pipe.send(("config", data))

    async def _merged(self) -> dict:
        for i in range(len(self.children)):
            dump = await self.ask(i, "metrics")
            if dump is not None:
                self.aggregator.update(i, dump)
        return self.aggregator.merged()

    async def metrics(self, accept: str) -> tuple[bytes, str]:
        return render_metrics(await self._merged(), accept)

    async def clusters(self) -> dict:
        return {f"worker{i}": await self.ask(i, "clusters") for i in range(len(self.children))}

    async def stats(self) -> str:
        return render_stats(await self._merged())

    async def memory(self) -> dict:
        workers = [await self.ask(i, "memory") for i in range(len(self.children))]
        return {"processes": [memory_usage("master")] + [w for w in workers if w is not None]}

    async def main(self) -> int:
        self._lock = asyncio.Lock()
        self._ready_cache = False
        loop = asyncio.get_running_loop()
        config_tasks: list[asyncio.Task] = []
        if self.shares:
            self.config = SharedConfigHost(self.options, self._send_config, len(self.children))
            certificates = None
            if self.options.security:         # the stream presents a workload certificate over https
                certificates = build_certificates(self.options)
                await certificates.start(self.options.initial_config_timeout)
                config_tasks.append(loop.create_task(certificates.run(), name="master-certificate-renewal"))
            if not await self.config.start(certificates):
                for proc in self.children:
                    proc.terminate()
                return 1
            self.config.broadcast()
            config_tasks += self.config.sources.run_tasks(loop)
        admin = AdminServer(self, *self.options.admin)
        await admin.start()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        while not stop.is_set():
            await self.refresh_ready()
            for i, proc in enumerate(self.children):
                if proc is not None and not proc.is_alive() and not stop.is_set():
                    log.warning("worker %d exited with %s; restarting", i, proc.exitcode)
                    self.aggregator.worker_exited(i)
                    self.spawn(i)
                    if self.config is not None:
                        self.config.send_to(i, whole=True)
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
        self.stopping = True
        if self.config is not None:
            await self.config.sources.deregister()       # before the workers drain, as one proxy does
        for proc in self.children:
            if proc is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)
        deadline = loop.time() + self.options.worker.drain_timeout + 2.0
        while loop.time() < deadline and any(p.is_alive() for p in self.children):
            self._collect_final_dumps()
            await asyncio.sleep(0.05)
        self._collect_final_dumps()
        code = 0
        for proc in self.children:
            if proc.is_alive():
                proc.kill()
                proc.join(1.0)
                code = EXIT_UNCLEAN_DRAIN
            elif proc.exitcode != 0:
                code = EXIT_UNCLEAN_DRAIN
        for task in config_tasks:
            task.cancel()
        await asyncio.gather(*config_tasks, return_exceptions=True)
        await admin.close()
        return code


    def _collect_final_dumps(self) -> None:
        for i, pipe in enumerate(self.pipes):
            try:
                while pipe is not None and pipe.poll():
                    message = pipe.recv()
                    if isinstance(message, tuple) and message[:1] == ("final",):
                        self.aggregator.update(i, message[1])
            except (EOFError, OSError):
                continue


def run_master(options: RunOptions) -> int:
    if options.security:
        # one bootstrap token, one first certificate: the master gets it before forking and
        # every worker starts from it (each then renews on its own, with its own key)
        try:
            first = asyncio.run(start_certificates(options))
        except SystemExit as exc:
            print(exc, file=sys.stderr)
            return 1
        options.security = dict(options.security, initial=first.current)
    master = Master(options)
    for i in range(options.workers):          # fork before any event loop exists
        master.spawn(i)
    _install_uvloop()
    return asyncio.run(master.main())
