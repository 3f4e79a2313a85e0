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
        self._subscribers: list[Callable[[Snapshot, Snapshot | None], None]] = []

    def subscribe(self, callback: Callable[[Snapshot, Snapshot | None], None]) -> None:
        """``callback(new, old)`` runs synchronously after each swap."""
        self._subscribers.append(callback)

    def swap(self, snapshot: Snapshot) -> None:
        old, self.current = self.current, snapshot
        self.loaded_at = time.time()
        for callback in self._subscribers:
            callback(snapshot, old)

    def reject(self, version: str, errors: list[str] | tuple[str, ...]) -> None:
        """Record a config that was refused; the current snapshot keeps serving."""
        self.last_rejection = Rejection(version, tuple(errors), time.time())
