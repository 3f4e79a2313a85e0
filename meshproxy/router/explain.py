"""``explain``: the routing decision a request would get, as text, without sending it.

Uses the same functions as the data plane (``select_virtual_host``, ``block_matches``) and
their slow twin ``block_mismatch`` for the reasons, so what it prints is what the proxy does.
"""
from __future__ import annotations

from typing import Mapping

from ..config.model import Cluster, HttpRoute, RouteTable, Snapshot, StringMatch
from .match import block_matches, block_mismatch, select_virtual_host, strip_port
from .request import RequestView


def _fmt_seconds(value: float | None) -> str:
    if value is None:
        return "none"
    return f"{value * 1000:g}ms" if value < 1 else f"{value:g}s"


def _vhost_reason(table: RouteTable, authority: str) -> str:
    if authority in table.exact:
        return f'exact domain "{authority}"'
    host = strip_port(authority)
    if host in table.exact:
        return f'exact domain "{host}" (port ignored)'
    for suffix, _ in table.wildcards:
        if host.endswith(suffix) and len(host) > len(suffix):
            return f'wildcard "*{suffix}"'
    return "default virtual host (no domain matched)"


def _sm(sm: StringMatch | None) -> str:
    return "" if sm is None else f'{sm.kind} "{sm.value}"'


def _route_label(i: int, route: HttpRoute) -> str:
    return f'route[{i}] "{route.name}"' if route.name else f"route[{i}]"


def _tables(snapshot: Snapshot, authority: str, port: int | None) -> list[tuple[str, RouteTable, int, str]]:
    if port is None:
        tail = authority.rpartition(":")[2] if not authority.endswith("]") else ""
        port = int(tail) if tail.isdigit() and ":" in authority else None
    out, seen = [], set()
    for listener in snapshot.listeners:
        if listener.protocol not in ("HTTP", "HTTPS") or (port is not None and listener.port != port):
            continue
        table = snapshot.route_tables.get(listener.route_table)
        if table is not None and listener.route_table not in seen:
            seen.add(listener.route_table)
            out.append((f"listener {listener.name} ({listener.address}:{listener.port})", table, listener.port,
                        "https" if listener.protocol == "HTTPS" else "http"))
    if not out:     # no listener on that port: try every table (e.g. a snapshot without listeners)
        for name, table in snapshot.route_tables.items():
            out.append((f"route table {name}", table, port or 0, "http"))
    return out


def explain(snapshot: Snapshot, authority: str, path: str, method: str = "GET",
            headers: Mapping[str, str] = {}, port: int | None = None) -> str:
    authority = authority.lower()
    path, _, query = path.partition("?")
    lines = [f"request: {method} {authority}{path}{'?' + query if query else ''}"
             + (f" port {port}" if port is not None else "")]
    tables = _tables(snapshot, authority, port)
    if not tables:
        lines.append("no HTTP listener or route table: 404 NR")
        return "\n".join(lines)
    for where, table, listener_port, scheme in tables:
        lines.append(f"{where} -> route table {table.name!r}")
        req = RequestView(method, authority, path, query,
                          {k.lower(): v for k, v in headers.items()}, listener_port,
                          scheme, "")
        _explain_table(snapshot, table, req, lines)
    return "\n".join(lines)


def _explain_table(snapshot: Snapshot, table: RouteTable, req: RequestView, lines: list[str]) -> None:
    vhost = select_virtual_host(table, req.authority)
    if vhost is None:
        lines.append(f'  no virtual host for "{req.authority}" and no default: 404 NR')
        return
    origin = (f"VirtualService {vhost.name}" if not vhost.name.startswith("service:")
              else f"implicit route to {vhost.name[len('service:'):]}")
    lines.append(f"  virtual host {vhost.name!r} ({origin}) via {_vhost_reason(table, req.authority)}")
    chosen = None
    for i, route in enumerate(vhost.routes):
        label = _route_label(i, route)
        if not route.matches:
            lines.append(f"  {label}: MATCHED (no match conditions)  [{route.source}]")
            chosen = route
            break
        reasons = []
        for j, m in enumerate(route.matches):
            if block_matches(m, req):
                name = f' "{m.name}"' if m.name else ""
                lines.append(f"  {label}: MATCHED by match[{j}]{name}  [{route.source}]")
                chosen = route
                break
            reasons.append(block_mismatch(m, req))
        if chosen is not None:
            break
        lines.append(f"  {label}: " + "; ".join(
            r if len(reasons) == 1 else f"match[{j}] {r}" for j, r in enumerate(reasons)))
    if chosen is None:
        lines.append("  no route matched: 404 NR")
        return
    _explain_action(snapshot, chosen, lines)


def _explain_action(snapshot: Snapshot, route: HttpRoute, lines: list[str]) -> None:
    if route.redirect is not None:
        r = route.redirect
        lines.append(f"  redirect {r.code}: uri={r.uri} authority={r.authority} scheme={r.scheme} port={r.port}")
        return
    if route.direct_response is not None:
        lines.append(f"  direct response {route.direct_response.status} ({len(route.direct_response.body)} bytes)")
        return
    live = [d for d in route.destinations if d.weight > 0]
    total = sum(d.weight for d in live)
    lines.append("  destinations:")
    if not live:
        lines.append("    none with weight > 0: 503")
    sticky = None
    for d in route.destinations:
        share = f"{100.0 * d.weight / total:.1f}%" if total and d.weight > 0 else "0% (never chosen)"
        subset = f" subset {d.subset}" if d.subset else ""
        portpart = f" port {d.port}" if d.port else ""
        cluster = snapshot.clusters.get(d.cluster) if d.cluster else None
        target = (f"cluster {d.cluster} ({len(cluster.endpoints)} endpoints)" if cluster is not None
                  else "NO CLUSTER: 503 NR (missing subset/service?)")
        lines.append(f"    {d.host}{subset}{portpart} weight {d.weight} share {share} -> {target}")
        if cluster is not None and sticky is None and cluster.policy.load_balancer.consistent_hash is not None:
            sticky = cluster.policy.load_balancer.consistent_hash
    if sticky is not None:
        name = f" {sticky.name}" if sticky.name else ""
        lines.append(f"    split is sticky per {sticky.key}{name} (same key -> same version while weights stand)")
    elif len(live) > 1:
        lines.append("    split: smooth weighted round robin per worker")
    lines.append("  policies:")
    lines.append(f"    timeout: {_fmt_seconds(route.timeout)}")
    r = route.retries
    if r is None or r.attempts == 0:
        lines.append("    retries: none")
    else:
        codes = f" codes {sorted(r.retriable_status_codes)}" if r.retriable_status_codes else ""
        lines.append(f"    retries: {r.attempts} on {','.join(sorted(r.retry_on))}{codes}, per try "
                     f"{_fmt_seconds(r.per_try_timeout)}, backoff base {_fmt_seconds(r.backoff_base)}"
                     f"{', non-idempotent too' if r.allow_non_idempotent else ' (idempotent methods only)'}")
    if route.fault is not None:
        f = route.fault
        lines.append(f"    fault: delay {_fmt_seconds(f.delay)} for {f.delay_percentage:g}%, "
                     f"abort {f.abort_status} for {f.abort_percentage:g}%")
    for m in route.mirrors:
        lines.append(f"    mirror: {m.host} subset {m.subset} -> {m.cluster} ({m.percentage:g}%)")
    if route.rewrite is not None:
        lines.append(f"    rewrite: uri={route.rewrite.uri} authority={route.rewrite.authority}")
    seen = set()
    for d in route.destinations:
        cluster = snapshot.clusters.get(d.cluster) if d.cluster else None
        if cluster is None or cluster.name in seen:
            continue
        seen.add(cluster.name)
        lines.extend("    " + line for line in _cluster_lines(cluster))


def _cluster_lines(cluster: Cluster) -> list[str]:
    p = cluster.policy
    lb = p.load_balancer
    if lb.consistent_hash is not None:
        ch = lb.consistent_hash
        algo = "maglev" if ch.algorithm == "maglev" else f"ring hash (min ring {ch.minimum_ring_size})"
        lb_text = f"consistent hash on {ch.key} {ch.name}".rstrip() + f", {algo}"
    else:
        lb_text = lb.simple
    if lb.warmup:
        lb_text += f", warmup {_fmt_seconds(lb.warmup)}"
    out = [f"cluster {cluster.name}: lb {lb_text}"]
    o = p.outlier
    if o is None:
        out.append("  outlier detection: off")
    else:
        out.append(f"  outlier detection: consecutive 5xx {o.consecutive_5xx or 'off'}, consecutive gateway "
                   f"errors {o.consecutive_gateway_errors or 'off'}, base ejection {_fmt_seconds(o.base_ejection_time)} x times "
                   f"ejected, max ejected {o.max_ejection_percent}%, panic below {o.min_health_percent}% healthy")
    cp = p.connection_pool
    def lim(v):
        return "unlimited" if v >= 2**31 - 1 else str(v)
    out.append(f"  connection pool: max connections {lim(cp.max_connections)}, max pending "
               f"{lim(cp.max_pending_requests)}, max requests {lim(cp.max_requests)}, max retries {lim(cp.max_retries)} (and retry budget 20%/min 3), "
               f"connect timeout {_fmt_seconds(cp.connect_timeout)}")
    return out
