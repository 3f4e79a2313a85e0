"""The embedded store: one SQLite file (WAL), used by a single control-plane process.

Resources and history are written in one transaction per change.  Registrations are
persisted so that a restarted control plane still knows every workload; heartbeats are
not written (they only move an in-memory deadline), and a restarted process gives every
persisted registration one fresh TTL to heartbeat again before it expires.
"""
from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from typing import Callable, Mapping

from .store import (CHANGED_RESOURCES, CHANGED_WORKLOADS, StoreViews, BadRequest, HistoryEntry, NotFound,
                    ResourceKey, check_precondition, plan_changes, rollback_plan, same_content, stamp)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS resources (
    kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (kind, namespace, name));
CREATE TABLE IF NOT EXISTS history (
    revision INTEGER NOT NULL, seq INTEGER NOT NULL, at REAL NOT NULL, op TEXT NOT NULL,
    kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
    before TEXT, after TEXT, origin TEXT NOT NULL, PRIMARY KEY (revision, seq));
CREATE TABLE IF NOT EXISTS workloads (id TEXT PRIMARY KEY, body TEXT NOT NULL, ttl REAL NOT NULL);
CREATE TABLE IF NOT EXISTS secrets (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class SqliteStore(StoreViews):
    def __init__(self, path: str, *, clock: Callable[[], float] | None = None,
                 sweep_interval: float = 0.5):
        self.path = path
        self._clock = clock or time.monotonic
        self._wall = time.time
        self._sweep_interval = sweep_interval
        self._db: sqlite3.Connection | None = None
        self._resources: dict[ResourceKey, dict] = {}
        self._workloads: dict[str, dict] = {}
        self._deadlines: dict[str, float] = {}
        self._ttls: dict[str, float] = {}
        self._subscribers: list[Callable[[str], None]] = []
        self._sweeper: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(SCHEMA)
        self._db = db
        for body, in db.execute("SELECT body FROM resources"):
            obj = json.loads(body)
            md = obj["metadata"]
            self._resources[(obj["kind"], md["namespace"], md["name"])] = obj
        self._resource_revision = self._revision()
        now = self._clock()
        for wid, body, ttl in db.execute("SELECT id, body, ttl FROM workloads"):
            self._workloads[wid] = json.loads(body)
            self._ttls[wid] = ttl
            self._deadlines[wid] = now + ttl
        self._sweeper = asyncio.create_task(self._sweep_loop(), name="sqlite-store-ttl-sweeper")

    async def close(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        if self._db:
            self._db.close()
            self._db = None

    # ------------------------------------------------------------ views


    # ------------------------------------------------------------ resources

    def _revision(self) -> int:
        row = self._db.execute("SELECT v FROM meta WHERE k='revision'").fetchone()
        return int(row[0]) if row else 0

    def _write(self, revision: int, changes: list[tuple[str, ResourceKey, dict | None, dict | None]],
               origin: str) -> None:
        """One transaction: the new revision, the rows, and their history entries."""
        db = self._db
        now = self._wall()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES ('revision', ?)", (str(revision),))
            for seq, (op, key, before, after) in enumerate(changes):
                if after is None:
                    db.execute("DELETE FROM resources WHERE kind=? AND namespace=? AND name=?", key)
                else:
                    db.execute("INSERT OR REPLACE INTO resources VALUES (?, ?, ?, ?)", (*key, json.dumps(after)))
                db.execute("INSERT INTO history VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (revision, seq, now, op, *key, json.dumps(before) if before else None,
                            json.dumps(after) if after else None, origin))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        for op, key, before, after in changes:
            if after is None:
                self._resources.pop(key, None)
            else:
                self._resources[key] = after
        self._resource_revision = revision

    async def put(self, obj: dict, *, expect_version: str | None = None,
                  create_only: bool = False, origin: str = "api") -> dict:
        md = obj["metadata"]
        key = (obj["kind"], md["namespace"], md["name"])
        async with self._lock:
            existing = self._resources.get(key)
            check_precondition(key, existing, expect_version, create_only)
            if existing is not None and same_content(existing, obj):
                return existing                      # no-op update: no new revision, no push
            revision = self._revision() + 1
            stored = stamp(obj, existing, revision, self._wall())
            self._write(revision, [("update" if existing else "create", key, existing, stored)], origin)
        self._notify(CHANGED_RESOURCES)
        return stored

    async def delete(self, key: ResourceKey, *, expect_version: str | None = None,
                     origin: str = "api") -> dict:
        async with self._lock:
            existing = self._resources.get(key)
            if existing is None:
                raise NotFound(f"{key[0]} {key[1]}/{key[2]} not found")
            check_precondition(key, existing, expect_version, False)
            revision = self._revision() + 1
            self._write(revision, [("delete", key, existing, None)], origin)
        self._notify(CHANGED_RESOURCES)
        gone = dict(existing, metadata=dict(existing["metadata"], resourceVersion=str(revision)))
        return gone

    async def history(self, limit: int = 100) -> list[HistoryEntry]:
        rows = self._db.execute(
            "SELECT revision, at, op, kind, namespace, name, before, after, origin FROM history "
            "ORDER BY revision DESC, seq DESC LIMIT ?", (limit,)).fetchall()
        return [HistoryEntry(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]) if r[6] else None,
                             json.loads(r[7]) if r[7] else None, r[8]) for r in rows]

    async def rollback(self, revision: int, origin: str = "api", guard=None) -> int:
        async with self._lock:
            current_revision = self._revision()
            if not 1 <= revision <= current_revision:
                raise BadRequest(f"revision {revision} does not exist (history has 1..{current_revision})")
            state: dict[ResourceKey, dict] = {}
            for kind, ns, name, after in self._db.execute(
                    "SELECT kind, namespace, name, after FROM history WHERE revision <= ? "
                    "ORDER BY revision, seq", (revision,)):
                if after is None:
                    state.pop((kind, ns, name), None)
                else:
                    state[(kind, ns, name)] = json.loads(after)
            plan = rollback_plan(state, self._resources)
            if not plan:
                return current_revision
            if guard is not None:           # may refuse (raise): nothing is written
                guard(plan_changes(plan, self._resources))
            new_revision = current_revision + 1
            changes = []
            for key, target in plan:
                existing = self._resources.get(key)
                after = None if target is None else stamp(target, existing, new_revision, self._wall())
                changes.append(("rollback", key, existing, after))
            self._write(new_revision, changes, origin or f"rollback to {revision}")
        self._notify(CHANGED_RESOURCES)
        return new_revision

    # ------------------------------------------------------------ registry

    async def register(self, workload: dict, ttl: float) -> dict:
        wid = workload["id"]
        changed = self._workloads.get(wid) != workload or self._ttls.get(wid) != ttl
        self._ttls[wid] = ttl
        self._deadlines[wid] = self._clock() + ttl
        if changed:
            self._db.execute("INSERT OR REPLACE INTO workloads VALUES (?, ?, ?)", (wid, json.dumps(workload), ttl))
            self._workloads[wid] = workload
            self._notify(CHANGED_WORKLOADS)
        return workload

    async def heartbeat(self, workload_id: str) -> bool:
        if workload_id not in self._workloads:
            return False
        self._deadlines[workload_id] = self._clock() + self._ttls[workload_id]
        return True

    async def deregister(self, workload_id: str) -> bool:
        if self._workloads.pop(workload_id, None) is None:
            return False
        self._deadlines.pop(workload_id, None)
        self._ttls.pop(workload_id, None)
        self._db.execute("DELETE FROM workloads WHERE id=?", (workload_id,))
        self._notify(CHANGED_WORKLOADS)
        return True

    def expire(self) -> list[str]:
        """Remove every registration whose deadline passed; returns their ids."""
        now = self._clock()
        dead = [wid for wid, deadline in self._deadlines.items() if deadline <= now]
        for wid in dead:
            self._workloads.pop(wid, None)
            self._deadlines.pop(wid, None)
            self._ttls.pop(wid, None)
            self._db.execute("DELETE FROM workloads WHERE id=?", (wid,))
        if dead:
            self._notify(CHANGED_WORKLOADS)
        return dead

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval)
            self.expire()

    # ------------------------------------------------------------ security records

    async def get_secret(self, name: str) -> str | None:
        row = self._db.execute("SELECT value FROM secrets WHERE name=?", (name,)).fetchone()
        return row[0] if row else None

    async def create_secret(self, name: str, value: str) -> bool:
        cur = self._db.execute("INSERT OR IGNORE INTO secrets VALUES (?, ?)", (name, value))
        return cur.rowcount == 1

    async def put_secret(self, name: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO secrets VALUES (?, ?)", (name, value))

    async def take_secret(self, name: str) -> str | None:
        row = self._db.execute("DELETE FROM secrets WHERE name=? RETURNING value", (name,)).fetchone()
        return row[0] if row else None

    async def list_secrets(self, prefix: str) -> dict[str, str]:
        rows = self._db.execute("SELECT name, value FROM secrets WHERE substr(name, 1, ?) = ?", (len(prefix), prefix))
        return dict(rows.fetchall())
