"""One config per process group: the master builds, the workers receive what changed.

With ``--workers N`` the master process holds the only control-plane stream (or file watch)
and the only :class:`~meshproxy.config.incremental.ConfigBuilder`; each worker gets every
new snapshot as an *update* over its pipe and swaps it in.  An update carries only what
differs from the snapshot the worker runs, by identity on the master's side (the builder
keeps unchanged clusters and virtual hosts as the same objects):

* clusters: the changed and the removed ones (an endpoint change is one cluster);
* route tables: per table, the changed and removed domains, wildcards and default, or the
  table whole when it is new;
* listeners, resources, warnings, settings, version: always (small).

The worker rebuilds its next snapshot from its current one plus the update in its build
thread (:class:`~meshproxy.config.incremental.BuildRunner`), so unchanged entries stay the
worker's own objects and its runtime state (cluster state, split state) carries over.
Pickled with a private dispatch table (read-only mappings become dicts and back); the pipe
is the master's own, so nothing else is ever unpickled.
"""
from __future__ import annotations

import copyreg
import dataclasses
import io
import pickle
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from .incremental import mapping_proxy
from .model import RouteTable, Snapshot


@dataclass(frozen=True, slots=True)
class TableUpdate:
    name: str
    whole: RouteTable | None                       # a new table, sent whole
    exact: Mapping = field(default_factory=dict)   # changed domains
    removed: tuple[str, ...] = ()
    wildcards: tuple = ()
    default: object = None


@dataclass(frozen=True, slots=True)
class SnapshotUpdate:
    base: str                                      # the version this applies to ("" = whole snapshot)
    snapshot: Snapshot                             # clusters and route_tables emptied when base != ""
    clusters: Mapping = field(default_factory=dict)
    removed_clusters: tuple[str, ...] = ()
    tables: tuple[TableUpdate, ...] = ()
    removed_tables: tuple[str, ...] = ()


def _reduce_mapping(m):
    return mapping_proxy, (dict(m),)


def dumps(value) -> bytes:
    out = io.BytesIO()
    pickler = pickle.Pickler(out, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = copyreg.dispatch_table.copy()
    pickler.dispatch_table[MappingProxyType] = _reduce_mapping
    pickler.dump(value)
    return out.getvalue()


def encode_update(new: Snapshot, old: Snapshot | None) -> bytes:
    """What takes a worker running ``old`` (None: nothing) to ``new``."""
    if old is None:
        return dumps(SnapshotUpdate("", new))
    clusters = {n: c for n, c in new.clusters.items() if old.clusters.get(n) is not c}
    removed = tuple(n for n in old.clusters if n not in new.clusters)
    tables = []
    for name, table in new.route_tables.items():
        before = old.route_tables.get(name)
        if before is table:
            continue
        if before is None:
            tables.append(TableUpdate(name, table))
            continue
        exact = {d: vh for d, vh in table.exact.items() if before.exact.get(d) is not vh}
        gone = tuple(d for d in before.exact if d not in table.exact)
        tables.append(TableUpdate(name, None, MappingProxyType(exact), gone, table.wildcards, table.default))
    removed_tables = tuple(n for n in old.route_tables if n not in new.route_tables)
    shell = dataclasses.replace(new, clusters=MappingProxyType({}), route_tables=MappingProxyType({}))
    return dumps(SnapshotUpdate(old.version, shell, MappingProxyType(clusters), removed, tuple(tables),
                                removed_tables))


class UpdateMismatch(Exception):
    """The update builds on a version the worker does not run."""


def apply_update(current: Snapshot | None, data: bytes) -> tuple[Snapshot, frozenset[str] | None]:
    """The worker's next snapshot: ``current`` with the update applied (in its build thread),
    and the names of the changed clusters when nothing else changed (else None)."""
    update: SnapshotUpdate = pickle.loads(data)
    if not update.base:
        return update.snapshot, None
    if current is None or current.version != update.base:
        raise UpdateMismatch(f"update for {update.base}, running {current.version if current else 'nothing'}")
    clusters = dict(current.clusters)
    clusters.update(update.clusters)
    for name in update.removed_clusters:
        clusters.pop(name, None)
    tables = dict(current.route_tables)
    for name in update.removed_tables:
        tables.pop(name, None)
    for t in update.tables:
        if t.whole is not None:
            tables[t.name] = t.whole
            continue
        before = tables[t.name]
        exact = dict(before.exact)
        exact.update(t.exact)
        for domain in t.removed:
            exact.pop(domain, None)
        tables[t.name] = RouteTable(t.name, MappingProxyType(exact), t.wildcards, t.default)
    snapshot = dataclasses.replace(update.snapshot, clusters=MappingProxyType(clusters),
                                   route_tables=MappingProxyType(tables))
    if update.tables or update.removed_tables or update.snapshot.listeners != current.listeners:
        return snapshot, None
    # routes and listeners as they were: keep the worker's own objects, name the changed clusters
    snapshot = dataclasses.replace(snapshot, route_tables=current.route_tables, listeners=current.listeners)
    return snapshot, frozenset(update.clusters) | frozenset(update.removed_clusters)
