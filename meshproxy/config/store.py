"""Holds the snapshot the proxy is running and swaps it whole.

Whoever produces snapshots (the file watcher, the control-plane client) calls
:meth:`SnapshotStore.swap`; whoever consumes them (listeners, the cluster manager,
the admin endpoints) reads :attr:`SnapshotStore.current` once per request or
subscribes for changes.  Rejections are kept so that /config_dump can show them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from .model import Snapshot


@dataclass(frozen=True, slots=True)
class Rejection:
    version: str
    errors: tuple[str, ...]
    at: float


class SnapshotStore:
    def __init__(self, snapshot: Snapshot | None = None):
        self.current: Snapshot | None = snapshot
        self.last_rejection: Rejection | None = None
        self.loaded_at: float = time.time() if snapshot else 0.0
        # during a swap's callbacks: the clusters that differ from the previous snapshot when
        # nothing else does (an endpoint patch), so a subscriber may update just those; else None
        self.changed_clusters: frozenset[str] | None = None
        self._subscribers: list[Callable[[Snapshot, Snapshot | None], None]] = []

    def subscribe(self, callback: Callable[[Snapshot, Snapshot | None], None]) -> None:
        """``callback(new, old)`` runs synchronously after each swap."""
        self._subscribers.append(callback)

    def swap(self, snapshot: Snapshot, changed_clusters: frozenset[str] | None = None) -> None:
        """``changed_clusters``: ``snapshot`` is the current one with only these clusters
        changed (added, replaced or removed), routes and listeners the same objects."""
        old, self.current = self.current, snapshot
        self.loaded_at = time.time()
        self.changed_clusters = changed_clusters if old is not None else None
        try:
            for callback in self._subscribers:
                callback(snapshot, old)
        finally:
            self.changed_clusters = None

    def reject(self, version: str, errors: list[str] | tuple[str, ...]) -> None:
        """Record a config that was refused; the current snapshot keeps serving."""
        self.last_rejection = Rejection(version, tuple(errors), time.time())
