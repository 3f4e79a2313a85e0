"""Pure rewrites of the driven VirtualService and DestinationRule (no I/O, no store).

The controller computes the object it wants and writes it through the store like a human
``meshctl apply`` (so every weight change is a revision in the history, pushed
make-before-break).  These functions never touch anything but the copy they return.

Route shapes written, for the driven http route ``R`` of the VirtualService:

* a step with canary weight ``w``: ``R.route = [stable (100 - w), canary (w)]``;
* A/B: a route named :data:`AB_ROUTE` with the ``match`` sent 100% to the canary is put just
  before ``R`` (which stays on stable); it is removed at the end;
* blue/green with mirroring: ``R.mirror`` = the canary subset, ``mirrorPercentage`` = mirrorWeight;
* promoted: ``R.route = [canary 100]``; rolled back: ``R.route = [stable 100]``.
"""
from __future__ import annotations

import copy

from .spec import CanarySpec, service_fqdn

AB_ROUTE = "canary-ab"


def _dests(route: dict) -> list[dict]:
    return [d for d in route.get("route") or [] if isinstance(d, dict)]


def _host_of(dest: dict) -> str:
    return str((dest.get("destination") or {}).get("host", ""))


def find_route(vs_spec: dict, spec: CanarySpec) -> int | None:
    """Index of the driven http route: by name, else the first route (not our A/B route) whose
    destinations are all the canary's host."""
    ns = spec.namespace
    for i, route in enumerate(vs_spec.get("http") or []):
        if not isinstance(route, dict) or route.get("name") == AB_ROUTE:
            continue
        if spec.route is not None:
            if route.get("name") == spec.route:
                return i
            continue
        dests = _dests(route)
        if dests and all(service_fqdn(_host_of(d), ns) == spec.fqdn for d in dests):
            return i
    return None


def observed_weights(vs_spec: dict, spec: CanarySpec) -> dict[str, int] | None:
    """subset -> weight of the driven route as it is now (None if the route is gone)."""
    index = find_route(vs_spec, spec)
    if index is None:
        return None
    dests = _dests(vs_spec["http"][index])
    out: dict[str, int] = {}
    for d in dests:
        subset = str((d.get("destination") or {}).get("subset", ""))
        out[subset] = out.get(subset, 0) + int(d.get("weight", 100 if len(dests) == 1 else 0))
    return out


def route_state(vs_spec: dict, spec: CanarySpec) -> tuple:
    """What the controller owns in the VirtualService, comparable: the driven route's weights,
    the A/B route's match and the mirror.  Drift = this differs from what was last written."""
    index = find_route(vs_spec, spec)
    if index is None:
        return ("missing",)
    route = vs_spec["http"][index]
    ab = next((r.get("match") for r in vs_spec.get("http") or [] if isinstance(r, dict)
               and r.get("name") == AB_ROUTE), None)
    mirror = route.get("mirror")
    mirror_subset = (mirror or {}).get("subset") if isinstance(mirror, dict) else None
    return (tuple(sorted(observed_weights(vs_spec, spec).items())), repr(ab),
            mirror_subset, repr(route.get("mirrorPercentage")) if mirror_subset else None)


def rewrite_virtual_service(vs: dict, spec: CanarySpec, canary_weight: int, *, final: str | None = None,
                            ab_match: tuple[dict, ...] = (), mirror_weight: int = 0) -> dict:
    """The VirtualService with the driven route set for this state.

    ``final``: ``"promoted"`` (100% canary) or ``"rolledback"`` (100% stable); otherwise the
    route carries ``canary_weight`` (0..100) on the canary and the rest on stable.
    """
    out = copy.deepcopy(vs)
    http = out["spec"].setdefault("http", [])
    http[:] = [r for r in http if not (isinstance(r, dict) and r.get("name") == AB_ROUTE)]
    index = find_route(out["spec"], spec)
    if index is None:
        raise ValueError(f"{spec.ref}: the driven route is missing from VirtualService "
                         f"{spec.namespace}/{spec.virtual_service}")
    route = http[index]
    dests = _dests(route)
    template = next((d for d in dests if (d.get("destination") or {}).get("subset") == spec.stable),
                    dests[0] if dests else {"destination": {"host": spec.host}})

    def dest(subset: str, weight: int) -> dict:
        d = copy.deepcopy(template)
        d["destination"] = dict(d.get("destination") or {}, subset=subset)
        d["weight"] = weight
        return d

    if final == "promoted":
        route["route"] = [dest(spec.canary, 100)]
    elif final == "rolledback":
        route["route"] = [dest(spec.stable, 100)]
    else:
        w = max(0, min(100, canary_weight))
        route["route"] = [dest(spec.stable, 100 - w), dest(spec.canary, w)]
    # the mirror, if we own it (it names the canary subset)
    mirror = route.get("mirror")
    if isinstance(mirror, dict) and mirror.get("subset") in (spec.canary, spec.stable) and \
            service_fqdn(str(mirror.get("host", "")), spec.namespace) == spec.fqdn:
        route.pop("mirror", None)
        route.pop("mirrorPercentage", None)
    if mirror_weight and final is None:
        route["mirror"] = dict(template.get("destination") or {"host": spec.host}, subset=spec.canary)
        route["mirrorPercentage"] = {"value": float(mirror_weight)}
    if ab_match and final is None:
        ab = {"name": AB_ROUTE, "match": [copy.deepcopy(m) for m in ab_match],
              "route": [dest(spec.canary, 100)]}
        http.insert(index, ab)
    return out


def sticky_destination_rule(dr: dict, cookie_name: str, max_age: int) -> dict:
    """The DestinationRule with a cookie consistent hash: the sticky version split keeps a user
    who reached the canary on it while its weight grows (keys only move stable -> canary)."""
    out = copy.deepcopy(dr)
    policy = out["spec"].setdefault("trafficPolicy", {})
    policy["loadBalancer"] = {"consistentHash": {"httpCookie": {"name": cookie_name, "ttl": f"{max_age}s"}}}
    return out


def restore_load_balancer(dr: dict, saved: dict | None) -> dict:
    """Undo :func:`sticky_destination_rule` (``saved`` = the loadBalancer before, or None)."""
    out = copy.deepcopy(dr)
    policy = out["spec"].setdefault("trafficPolicy", {})
    if saved is None:
        policy.pop("loadBalancer", None)
        if not policy:
            out["spec"].pop("trafficPolicy", None)
    else:
        policy["loadBalancer"] = copy.deepcopy(saved)
    return out
