"""Incremental config builds: one path from documents to a snapshot, for files and pushes.

Both config sources (files, the control plane's push stream) hand a :class:`ConfigBuilder`
the documents they hold and the registered workloads; the builder returns the next snapshot
and, per resource, what it refused.  The rules are the same for both sources:

* **Per resource, last good kept.**  A resource whose new version does not decode keeps its
  last good version (or stays absent if it never had one); every other resource is applied.
  The refusal is reported per resource (``BuildOutcome.rejected``): the file source logs it
  and shows it in ``/config_dump``, the push client sends it with its NACK, and the control
  plane lists it in ``meshctl proxies``.
* **A change costs what it changes.**  Documents are decoded once per content (a cache keyed
  by source and content hash), so a push or a file rewrite decodes only the resources that
  changed.  When the resources are unchanged and only workloads moved (pod churn), the
  affected clusters' endpoint sets are patched into a copy of the previous snapshot; route
  tables, listeners and every other cluster are the very same objects, so the data plane's
  runtime (split state, cluster state) keeps them by identity.

**Nothing on the request loop waits for a rebuild.**  A build is pure computation on
immutable inputs, so it runs off the request loop (:class:`BuildRunner`, a thread) and the
loop only swaps the finished snapshot in, which is one reference assignment plus the
runtime's identity diff.  The GIL means the build thread and the loop share one core: the
loop gets the interpreter back after at most the switch interval, which the runner lowers
while a build runs (``BUILD_SWITCH_INTERVAL``), so a request waits at most about that long
per loop wake-up instead of for the whole build.  Splitting the compiler into bounded slices
on the loop would bound the wait the same way but would turn every compile step into a
resumable state machine; a thread keeps the compiler a plain function, and the incremental
paths keep most builds short anyway.  (A separate process would avoid sharing the
interpreter but pays a pickle of the snapshot, which is the same cost moved to the loop.)
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterable, Mapping

from .compile import (
    CompileResult, ProxyIdentity, RegistryState, WorkloadEndpoint, cluster_endpoints, compile_snapshot,
    meshed_identity, workload_entry, workload_ports,
)
from .decode import DecodeResult, ResourceSet, decode_document, merge_last_good
from .hosts import resolve_host
from . import model
from .model import EMPTY_MAP, ProxySettings, Snapshot
from .resources import Document, Resource

# what steps 2-4 of a compile read (PeerAuthentication: auto mTLS to each endpoint)
# (Secret: DestinationRule tls.credentialName puts its PEMs into the clusters)
REGISTRY_KINDS = frozenset({"ServiceEntry", "DestinationRule", "PeerAuthentication", "Secret"})
BUILD_SWITCH_INTERVAL = 0.0005     # seconds: the GIL hand-over interval while a build thread runs


@dataclass(frozen=True, slots=True)
class BuildOutcome:
    snapshot: Snapshot | None                       # None: nothing to run (no valid config at all)
    errors: tuple[str, ...] = ()                    # every refusal, each naming its resource and path
    rejected: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: EMPTY_MAP)   # "Kind ns/name" -> errors
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    path: str = "full"                              # "full" | "routes" | "endpoints" | "unchanged"
    changed_clusters: int = 0                       # clusters rebuilt or patched by this build
    patched: frozenset[str] | None = None           # path "endpoints": the names of the patched clusters


@dataclass(slots=True)
class _Decoded:
    resource: Resource | None
    key: tuple[str, str, str] | None
    errors: list[str]
    warnings: list[str]


@dataclass(slots=True)
class _LastCompile:
    resources_key: tuple
    registry_key: tuple                 # the ServiceEntries and DestinationRules among them
    version: str | None
    result: CompileResult
    by_host: dict[str, tuple[WorkloadEndpoint, ...]]
    clusters_by_host: dict[str, tuple[str, ...]]


def mapping_proxy(items: dict) -> Mapping:
    """Unpickling a read-only mapping (see :mod:`meshproxy.config.shared`)."""
    return MappingProxyType(items)


def body_hash(body) -> str:
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


class ConfigBuilder:
    """Documents + workloads -> the next snapshot; keeps what it needs to make the next
    build incremental.  Not thread-safe: one build at a time (:class:`BuildRunner`)."""

    def __init__(self, identity: ProxyIdentity, settings: ProxySettings = ProxySettings()):
        self.identity = identity
        self.settings = settings
        self.resource_set: ResourceSet | None = None
        self._decoded: dict[tuple[str, str], _Decoded] = {}
        self._hosts: dict[tuple[str, str], str] = {}
        self._last: _LastCompile | None = None
        self._patched: frozenset[str] = frozenset()
        self.decodes = 0                             # documents actually decoded (cache misses)

    # ------------------------------------------------------------ decode, per resource

    def decode(self, documents: Iterable[Document]) -> tuple[DecodeResult, dict[str, tuple[str, ...]]]:
        """Decode with the content cache; duplicates are refused as :func:`decode_documents` does."""
        resources: list[Resource] = []
        errors: list[str] = []
        warnings: list[str] = []
        rejected_keys: set[tuple[str, str, str]] = set()
        rejected: dict[str, list[str]] = {}
        seen: dict[tuple[str, str, str], Resource] = {}
        cache: dict[tuple[str, str], _Decoded] = {}
        for doc in documents:
            ckey = (doc.source, body_hash(doc.body))
            hit = self._decoded.get(ckey) or cache.get(ckey)
            if hit is None or hit.errors:          # errors name the document's index: decode again
                resource, key, doc_errors, doc_warnings = decode_document(doc)
                self.decodes += 1
                hit = _Decoded(resource, key, list(doc_errors), list(doc_warnings))
            elif hit.resource is not None and hit.resource.index != doc.index:
                hit = _Decoded(dataclasses.replace(hit.resource, index=doc.index), hit.key, [], hit.warnings)
            cache[ckey] = hit
            warnings.extend(hit.warnings)
            resource, doc_errors = hit.resource, hit.errors
            if resource is not None and resource.key in seen:
                first = seen[resource.key]
                doc_errors = [f"{resource.ref}: metadata.name: defined twice (first in {first.source}"
                              f" document {first.index}); this copy is ignored"]
                errors.extend(doc_errors)
                rejected.setdefault(resource.ref, []).extend(doc_errors)
                continue
            if doc_errors:
                errors.extend(doc_errors)
                ref = f"{hit.key[0]} {hit.key[1]}/{hit.key[2]}" if hit.key else f"{doc.source} document {doc.index}"
                rejected.setdefault(ref, []).extend(doc_errors)
                if hit.key is not None:
                    rejected_keys.add(hit.key)
                continue
            if resource is not None:
                seen[resource.key] = resource
                resources.append(resource)
        self._decoded = cache                      # only what the current input holds
        result = DecodeResult(resources, errors, warnings, frozenset(rejected_keys - set(seen)))
        return result, {ref: tuple(errs) for ref, errs in rejected.items()}

    # ------------------------------------------------------------ the whole build

    def build(self, documents: Iterable[Document], workloads: Iterable[WorkloadEndpoint] = (), *,
              version: str | None = None, keep_sources: Iterable[str] = ()) -> BuildOutcome:
        """The next snapshot from everything the source holds now.  ``keep_sources``: sources
        that could not be read this time keep all their previous resources."""
        decoded, rejected = self.decode(documents)
        resource_set, kept = merge_last_good(self.resource_set, decoded, keep_sources=keep_sources)
        snapshot, path, changed, warnings = self._compile(resource_set, list(workloads), version)
        self.resource_set = resource_set
        patched = self._patched if path == "endpoints" else None
        return BuildOutcome(snapshot, tuple(decoded.errors), MappingProxyType(rejected),
                            tuple(decoded.warnings) + tuple(warnings), tuple(kept), path, changed, patched)

    def _host(self, service: str, namespace: str) -> str:
        key = (service, namespace)
        host = self._hosts.get(key)
        if host is None:
            host = self._hosts[key] = resolve_host(service, namespace)
        return host

    def _compile(self, resource_set: ResourceSet, workloads: list[WorkloadEndpoint], version: str | None):
        resources = resource_set.resources()
        resources_key = tuple((r.key, r.content_hash, r.source, r.index) for r in resources)
        registry_key = tuple(k for k in resources_key if k[0][0] in REGISTRY_KINDS)
        by_host: dict[str, list[WorkloadEndpoint]] = {}
        for w in workloads:
            by_host.setdefault(self._host(w.service, w.namespace), []).append(w)
        grouped = {h: tuple(ws) for h, ws in by_host.items()}
        last = self._last
        if last is not None and last.resources_key == resources_key:
            if last.by_host == grouped and (version is None or version == last.version):
                return last.result.snapshot, "unchanged", 0, ()
            patched = self._patch_endpoints(last, grouped, version)
            if patched is not None:
                return patched
        # routes only (a VirtualService, Gateway or Sidecar changed): steps 2-4 of the last compile stand
        reuse = last.result.registry if last is not None and last.registry_key == registry_key and \
            last.by_host == grouped else None
        result = compile_snapshot(resources, self.identity, self.settings, workloads, version=version, registry=reuse)
        changed = len(result.snapshot.clusters)
        if last is not None:
            result, changed = _keep_equal_clusters(result, last.result.snapshot)
        clusters_by_host: dict[str, list[str]] = {}
        for name, cluster in result.snapshot.clusters.items():
            clusters_by_host.setdefault(cluster.service, []).append(name)
        self._last = _LastCompile(resources_key, registry_key, version, result, grouped,
                                  {h: tuple(ns) for h, ns in clusters_by_host.items()})
        return result.snapshot, "routes" if reuse is not None else "full", changed, result.warnings

    def _patch_endpoints(self, last: _LastCompile, grouped: dict[str, tuple[WorkloadEndpoint, ...]],
                         version: str | None):
        """Only workloads changed: rebuild the endpoint sets of the services they belong to.
        None when the change is more than endpoints (a service appears or goes, its ports
        change, it is not a plain registered service): then the caller compiles in full."""
        old = last.by_host
        changed_hosts = [h for h in grouped.keys() | old.keys() if grouped.get(h) != old.get(h)]
        state = last.result.registry
        registry = state.services
        clusters = dict(last.result.snapshot.clusters)
        base_clusters = dict(state.clusters)
        new_registry = dict(registry)
        patched = 0
        names: list[str] = []
        for host in changed_hosts:
            svc = registry.get(host)
            mine = grouped.get(host)
            if svc is None or not mine or host not in old or svc.origin != "workloads" or svc.resolution != "STATIC":
                return None
            vips = list(dict.fromkeys(w.vip for w in mine if w.vip))
            if vips != svc.addresses:
                return None                       # the service's addresses change: its listeners may too
            if any(meshed_identity(w) and w.identity not in svc.identities for w in mine):
                return None                       # a new identity: auto mTLS checks the service's identities
            endpoints = []
            for w in mine:
                named = workload_ports(w)
                for name, number in named.items():
                    port = svc.port(number)
                    if port is None or port.name != name:
                        return None               # a new port: the service's clusters change shape
                endpoints.append(workload_entry(w, named))
            new_svc = dataclasses.replace(svc, endpoints=endpoints)
            new_registry[host] = new_svc
            for name in last.clusters_by_host.get(host, ()):
                cluster = clusters[name]
                port = new_svc.port(cluster.port)
                eps, _ = cluster_endpoints(new_svc, port, cluster.labels, state.peer_auth)
                clusters[name] = base_clusters[name] = dataclasses.replace(cluster, endpoints=tuple(eps))
                names.append(name)
                patched += 1
        snapshot = dataclasses.replace(last.result.snapshot, clusters=MappingProxyType(clusters),
                                       version=version if version is not None else _patched_version(
                                           last.result.snapshot.version, grouped))
        result = CompileResult(snapshot, last.result.warnings,
                               RegistryState(new_registry, state.rules, base_clusters, state.warnings, state.implicit,
                                             state.peer_auth))
        self._last = _LastCompile(last.resources_key, last.registry_key, version, result, grouped,
                                  last.clusters_by_host)
        self._patched = frozenset(names)
        return snapshot, "endpoints", patched, ()


def _keep_equal_clusters(result: CompileResult, previous: Snapshot) -> tuple[CompileResult, int]:
    """Clusters equal to the previous snapshot's are that very object, so the data plane's
    swap keeps their runtime state by an identity check (done here, off the loop, instead of
    by equality there).  Returns the result and how many clusters changed."""
    old = previous.clusters
    clusters = {}
    changed = 0
    for name, cluster in result.snapshot.clusters.items():
        before = old.get(name)
        if before is not None and before == cluster:
            cluster = before
        else:
            changed += 1
        clusters[name] = cluster
    snapshot = dataclasses.replace(result.snapshot, clusters=MappingProxyType(clusters))
    registry = result.registry
    if registry is not None:
        registry = RegistryState(registry.services, registry.rules,
                                 {n: clusters.get(n, c) for n, c in registry.clusters.items()},
                                 registry.warnings, registry.implicit)
    return CompileResult(snapshot, result.warnings, registry), changed


def _patched_version(base: str, grouped: Mapping[str, tuple[WorkloadEndpoint, ...]]) -> str:
    blob = repr(sorted((h, repr(ws)) for h, ws in grouped.items())).encode()
    return hashlib.sha256(base.encode() + blob).hexdigest()[:12]


# ---------------------------------------------------------------- off the request loop


class BuildRunner:
    """Runs builds one at a time in a thread, with short GIL slices while one runs.

    ``await runner.run(fn, *args)``: the loop keeps serving while ``fn`` runs; the caller
    swaps the result in afterwards, on the loop.  Builds are serialised (a later build
    waits for the one in flight, so two builds never share a :class:`ConfigBuilder`).
    """

    def __init__(self, switch_interval: float = BUILD_SWITCH_INTERVAL):
        self.switch_interval = switch_interval
        self._lock = asyncio.Lock()
        self.builds = 0

    async def run(self, fn, *args, **kwargs):
        async with self._lock:
            self.builds += 1
            with _short_gil_slices(self.switch_interval):
                return await asyncio.to_thread(_in_build_thread, fn, *args, **kwargs)


def _in_build_thread(fn, *args, **kwargs):
    _thread_ready_for_model_reprs()
    return fn(*args, **kwargs)


def _thread_ready_for_model_reprs() -> None:
    """Compiled, the model's extension-type dataclasses guard their ``repr`` with a
    ``threading.local`` whose ``running`` set exists only in the thread that imported the
    module (Cython's generated code): give this thread its own, so that a warning or error
    naming a model value can be formatted here.  Pure Python has no such guard."""
    for value in vars(model).values():
        guard = getattr(value, "__pyx_recursive_repr_guard", None) if isinstance(value, type) else None
        if guard is not None and not hasattr(guard, "running"):
            guard.running = set()


@contextlib.contextmanager
def _short_gil_slices(interval: float):
    """Lower the interpreter's switch interval for the duration (process-wide; put back
    afterwards unless someone else changed it meanwhile)."""
    before = sys.getswitchinterval()
    lowered = min(before, interval)
    sys.setswitchinterval(lowered)
    try:
        yield
    finally:
        if sys.getswitchinterval() == lowered:
            sys.setswitchinterval(before)
