"""Snapshot -> JSON-serialisable dict, for the admin ``/config_dump`` endpoint.

Generic over the frozen dataclasses of :mod:`meshproxy.config.model`: field names are
kept, compiled regexes become their pattern, mappings become dicts, bytes become text.
A field marked ``metadata={"secret": True}`` (a private key from a Secret) is never shown:
it reads ``"<redacted>"`` when set.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import re
from typing import Any, Mapping

from .model import Snapshot

REDACTED = "<redacted>"


def to_jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: (REDACTED if f.metadata.get("secret") and getattr(value, f.name) else
                         to_jsonable(getattr(value, f.name))) for f in dataclasses.fields(value)}
    if isinstance(value, re.Pattern):
        return value.pattern
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (frozenset, set)):
        return sorted(to_jsonable(v) for v in value)
    if isinstance(value, (tuple, list)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return str(value)                  # AuthorizationPolicy ipBlocks
    return value


def snapshot_to_dict(snapshot: Snapshot) -> dict:
    """version, settings, listeners, route_tables (virtual hosts listed once, with their
    domains), clusters (endpoints and policies), resources, warnings."""
    tables = {}
    for name, table in snapshot.route_tables.items():
        vhosts: dict[int, Any] = {}
        for vh in list(table.exact.values()) + [vh for _, vh in table.wildcards] + \
                ([table.default] if table.default is not None else []):
            vhosts.setdefault(id(vh), vh)
        tables[name] = {
            "name": table.name,
            "virtual_hosts": [to_jsonable(vh) for vh in vhosts.values()],
            "wildcards": [suffix for suffix, _ in table.wildcards],
            "default": table.default.name if table.default is not None else None,
        }
    return {
        "version": snapshot.version,
        "settings": to_jsonable(snapshot.settings),
        "listeners": to_jsonable(snapshot.listeners),
        "route_tables": tables,
        "clusters": {name: to_jsonable(c) for name, c in snapshot.clusters.items()},
        "resources": to_jsonable(snapshot.resources),
        "warnings": list(snapshot.warnings),
    }
