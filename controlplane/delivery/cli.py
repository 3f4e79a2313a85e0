"""``meshctl canary``: status, promote, abort, pause, resume (over the delivery API).

  meshctl canary status [NAME] [-n NS | -A] [-o json]
  meshctl canary promote|abort|pause|resume NAME [-n NS]

Takes the ``Client`` of :mod:`controlplane.cli` (passed in; no import back into it).
"""
from __future__ import annotations

import json
import time

from .spec import GROUP, PLURAL

ACTIONS = ("promote", "abort", "pause", "resume")


def add_parser(sub) -> None:
    p = sub.add_parser("canary", help="watch and steer canaries")
    p.add_argument("action", choices=("status",) + ACTIONS)
    p.add_argument("name", nargs="?")
    p.add_argument("-n", "--namespace")
    p.add_argument("-A", "--all-namespaces", action="store_true")
    p.add_argument("-o", "--output", choices=("json",))


def _base(namespace: str | None) -> str:
    return f"/apis/{GROUP}/v1" + (f"/namespaces/{namespace}" if namespace else "") + f"/{PLURAL}"


def _messages(body: dict) -> list[str]:
    causes = (body.get("details") or {}).get("causes") or []
    return [c.get("message", "") for c in causes] or [body.get("message") or json.dumps(body)]


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def _clock(at: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at)) if at else "-"


def run(client, args, error) -> int:
    ns = args.namespace or "default"
    if args.action != "status":
        if not args.name:
            raise error(f"meshctl canary {args.action} needs a NAME")
        code, body = client.call("POST", f"{_base(ns)}/{args.name}/{args.action}", {})
        if code >= 300:
            raise error(*_messages(body))
        print(body.get("message", f"{args.action} requested"))
        return 0
    if args.name:
        code, body = client.call("GET", f"{_base(ns)}/{args.name}")
        if code != 200:
            raise error(*_messages(body))
        if args.output == "json":
            print(json.dumps(body, indent=2))
        else:
            describe(body)
        return 0
    code, body = client.call("GET", _base(None if args.all_namespaces else ns))
    if code != 200:
        raise error(*_messages(body))
    if args.output == "json":
        print(json.dumps(body, indent=2))
        return 0
    rows = [["NAMESPACE", "NAME", "STABLE", "CANARY", "PHASE", "WEIGHT", "PASSED", "FAILED", "MESSAGE"]]
    for item in body["items"]:
        s, spec = item.get("status") or {}, item["spec"]
        rows.append([item["metadata"]["namespace"], item["metadata"]["name"], spec.get("stable"), spec.get("canary"),
                     s.get("phase", "-") + (" (paused)" if s.get("paused") else ""), str(s.get("canaryWeight", "-")),
                     str(s.get("passedChecks", "-")), str(s.get("failedChecks", "-")), (s.get("message") or "")[:80]])
    _table(rows)
    return 0


def describe(obj: dict) -> None:
    s, spec = obj.get("status") or {}, obj["spec"]
    analysis = spec.get("analysis") or {}
    md = obj["metadata"]
    print(f"Canary {md['namespace']}/{md['name']}: {spec['host']} {spec['stable']} -> {spec['canary']}")
    print(f"  phase:        {s.get('phase', '-')}" + (f"  PAUSED: {s['paused']['reason']}" if s.get("paused") else ""))
    print(f"  weight:       {s.get('canaryWeight', '-')}%  (steps {analysis.get('stepWeights') or analysis.get('stepWeight', '-')}"
          f", max {analysis.get('maxWeight', 100)})")
    print(f"  checks:       {s.get('passedChecks', 0)} passed, {s.get('failedChecks', 0)} failed "
          f"(threshold {analysis.get('threshold', 1)})")
    print(f"  message:      {s.get('message') or '-'}")
    decision = s.get("lastDecision")
    if decision:
        window = decision.get("window") or {}
        print(f"  last check:   {_clock(decision.get('at'))} {decision['verdict']} at weight {decision.get('weight')}: "
              f"{decision.get('reason', '')}")
        if window:
            c, st = window["canary"], window["stable"]
            print(f"    window {window['seconds']}s from {window['proxies']} proxies: canary {c['requests']} requests "
                  f"{c['errors']} errors, stable {st['requests']} requests {st['errors']} errors")
        for m in decision.get("metrics") or []:
            value = "-" if m["value"] is None else f"{m['value']:.4g}"
            stable = "-" if m.get("stable") is None else f"{m['stable']:.4g}"
            p = "" if m.get("pValue") is None else f" p={m['pValue']:.3g}"
            print(f"    {m['name']:22} {m['verdict']:8} canary {value} stable {stable} ({m['threshold']}){p}")
    events = (s.get("events") or [])[-8:]
    if events:
        print("  events:")
        for e in events:
            print(f"    {_clock(e['at'])} {e['type']:7} {e['message']}")
