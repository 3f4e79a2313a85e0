"""The store backend interface, its errors, and the backend table.

A backend keeps two things durable: Istio resources (with a revision history) and workload
registrations.  It also keeps an in-memory view of both (``resources()``, ``workloads()``)
that the push engine reads, and tells subscribers when either changed.  With SQLite the
view is updated by this process's own writes; with etcd it is fed by a watch, so every
replica sees every replica's writes.

Revisions are global and increase by one per accepted change (several objects changed by
one rollback share a revision, like one etcd transaction).  An object's
``metadata.resourceVersion`` is the revision of its last change.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

ResourceKey = tuple[str, str, str]          # (kind, namespace, name)
CHANGED_RESOURCES = "resources"
CHANGED_WORKLOADS = "workloads"


class StoreError(Exception):
    """Base of the errors the API turns into Kubernetes Status objects."""
    code = 500
    reason = "InternalError"


class NotFound(StoreError):
    code = 404
    reason = "NotFound"


class AlreadyExists(StoreError):
    code = 409
    reason = "AlreadyExists"


class Conflict(StoreError):
    code = 409
    reason = "Conflict"


class BadRequest(StoreError):
    code = 400
    reason = "BadRequest"


class Gone(StoreError):
    code = 410
    reason = "Expired"


class UnsupportedMediaType(StoreError):
    code = 415
    reason = "UnsupportedMediaType"


class Invalid(StoreError):
    code = 422
    reason = "Invalid"


class ApplyConflict(Conflict):
    """A server-side apply conflict; ``causes`` are Kubernetes' FieldManagerConflict causes."""

    def __init__(self, message: str, causes: list[dict]):
        super().__init__(message)
        self.causes = causes


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    revision: int
    at: float
    op: str                     # "create" | "update" | "delete" | "rollback"
    kind: str
    namespace: str
    name: str
    before: dict | None
    after: dict | None
    origin: str                 # who asked: "api", "rollback to 12", ...

    def to_dict(self) -> dict:
        """As the API shows it: a Secret's data is never in it (resources.redacted)."""
        from .resources import redacted
        return {"revision": self.revision, "at": self.at, "op": self.op, "kind": self.kind,
                "namespace": self.namespace, "name": self.name, "origin": self.origin,
                "before": redacted(self.before), "after": redacted(self.after)}


class StoreViews:
    """What every backend shares: the in-memory views of its state and the subscribers
    told what changed (``CHANGED_RESOURCES`` / ``CHANGED_WORKLOADS``).  A backend fills
    ``_resources`` and ``_workloads`` and calls ``_notify`` after each change."""

    _resources: dict
    _workloads: dict
    _subscribers: list
    _resource_revision: int = 0     # the newest revision the resource view reflects

    def resources(self) -> Mapping[ResourceKey, dict]:
        return self._resources

    def resource_revision(self) -> int:
        """The newest store revision the resource view reflects, deletions included: a list's
        ``resourceVersion``, and where a watch that has seen everything resumes."""
        return self._resource_revision

    def workloads(self) -> Mapping[str, dict]:
        return self._workloads

    def subscribe(self, callback: Callable[[str], None]) -> None:
        self._subscribers.append(callback)

    def unsubscribe(self, callback: Callable[[str], None]) -> None:
        if callback in self._subscribers:
            self._subscribers.remove(callback)

    def _notify(self, *changed: str) -> None:
        for what in changed:
            for callback in list(self._subscribers):
                callback(what)


class ConfigStore(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...

    def resources(self) -> Mapping[ResourceKey, dict]: ...
    def resource_revision(self) -> int: ...
    def workloads(self) -> Mapping[str, dict]: ...
    def subscribe(self, callback: Callable[[str], None]) -> None: ...
    def unsubscribe(self, callback: Callable[[str], None]) -> None: ...

    async def put(self, obj: dict, *, expect_version: str | None = None,
                  create_only: bool = False, origin: str = "api") -> dict: ...
    async def delete(self, key: ResourceKey, *, expect_version: str | None = None,
                     origin: str = "api") -> dict: ...
    async def history(self, limit: int = 100) -> list[HistoryEntry]: ...
    async def rollback(self, revision: int, origin: str = "api",
                       guard: Callable[[list[dict]], None] | None = None) -> int: ...

    async def register(self, workload: dict, ttl: float) -> dict: ...
    async def heartbeat(self, workload_id: str) -> bool: ...
    async def deregister(self, workload_id: str) -> bool: ...

    # security records (CA state, token records): small strings by name, shared by replicas,
    # never pushed to proxies and never part of the resource history
    async def get_secret(self, name: str) -> str | None: ...
    async def create_secret(self, name: str, value: str) -> bool: ...     # False if it exists
    async def put_secret(self, name: str, value: str) -> None: ...
    async def take_secret(self, name: str) -> str | None: ...             # delete; the value if this call removed it
    async def list_secrets(self, prefix: str) -> dict[str, str]: ...


def open_store(spec: str, *, clock=None) -> ConfigStore:
    """``sqlite:PATH`` | ``etcd://HOST:PORT[,HOST:PORT...]`` -> a backend (not yet started)."""
    if spec.startswith("sqlite:"):
        from .store_sqlite import SqliteStore
        return SqliteStore(spec[len("sqlite:"):], clock=clock)
    if spec.startswith("etcd://"):
        from .store_etcd import EtcdStore
        return EtcdStore(spec[len("etcd://"):].split(","), clock=clock)
    raise ValueError(f"--store: expected sqlite:PATH or etcd://HOST:PORT[,...], got {spec!r}")


# ---------------------------------------------------------------- shared by the backends


def same_content(a: dict | None, b: dict | None) -> bool:
    """True when two objects carry the same user content (spec, labels, annotations...)."""
    from .resources import user_view
    if a is None or b is None:
        return a is b
    return user_view(a) == user_view(b)


def check_precondition(key: ResourceKey, existing: dict | None, expect_version: str | None,
                       create_only: bool) -> None:
    from .resources import describe
    if create_only and existing is not None:
        raise AlreadyExists(f"{describe(*key)} already exists")
    if expect_version is not None:
        if existing is None:
            raise NotFound(f"{describe(*key)} not found (resourceVersion {expect_version} was given)")
        current = existing["metadata"]["resourceVersion"]
        if current != str(expect_version):
            raise Conflict(f"{describe(*key)}: the object has been modified; resourceVersion "
                           f"{expect_version} is stale, current is {current}; re-read and retry")


def stamp(obj: dict, existing: dict | None, revision: int, now: float) -> dict:
    """The object as stored: server-owned metadata filled in."""
    import time as _time
    from .resources import content_of
    md = dict(obj.get("metadata") or {})
    md["resourceVersion"] = str(revision)
    if existing is None:
        md["generation"] = 1
        md["creationTimestamp"] = _time.strftime("%Y-%m-%dT%H:%M:%SZ", _time.gmtime(now))
    else:
        old = existing["metadata"]
        spec_changed = content_of(existing) != content_of(obj)
        md["generation"] = old.get("generation", 1) + (1 if spec_changed else 0)
        md["creationTimestamp"] = old.get("creationTimestamp")
    return {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "metadata": md, **content_of(obj)}


def rollback_plan(state_at_revision: Mapping[ResourceKey, dict],
                  current: Mapping[ResourceKey, dict]) -> list[tuple[ResourceKey, dict | None]]:
    """What to write so that the current resources equal ``state_at_revision``:
    (key, object to put) for changed/missing ones, (key, None) for ones to delete."""
    plan: list[tuple[ResourceKey, dict | None]] = []
    for key, obj in sorted(state_at_revision.items()):
        if not same_content(current.get(key), obj):
            plan.append((key, obj))
    for key in sorted(current):
        if key not in state_at_revision:
            plan.append((key, None))
    return plan


def plan_changes(plan: list[tuple[ResourceKey, dict | None]],
                 current: Mapping[ResourceKey, dict]) -> list[dict]:
    """A rollback plan as the API shows it: ``{op, kind, namespace, name}`` per object, op being
    what the rollback does to it now (create a removed one, update, delete a newer one)."""
    return [{"op": "delete" if target is None else "update" if key in current else "create",
             "kind": key[0], "namespace": key[1], "name": key[2]} for key, target in plan]
