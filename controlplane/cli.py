"""meshctl: serve the control plane, or talk to one.

  meshctl serve [--store sqlite:PATH | --store etcd://HOST:PORT[,...]] [--listen ADDR:PORT]
  meshctl apply -f FILE|DIR|- [--dry-run]     meshctl diff -f FILE|DIR|-
  meshctl get KIND [NAME] [-n NS | -A] [-o yaml|json|wide]
  meshctl delete KIND NAME [-n NS]  |  meshctl delete -f FILE|DIR|-
  meshctl history [--limit N]       meshctl rollback REVISION
  meshctl proxies [-o json]         meshctl endpoints SERVICE [-n NS]
  meshctl canary status [NAME] [-n NS] [-o json]
  meshctl canary promote|abort|pause|resume NAME [-n NS]

The server comes from --server, else $MESHCTL_SERVER, else http://127.0.0.1:15010.
Every problem is printed as one line on stderr; the exit code is 1 if there was any.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from .delivery import cli as canary_cli
from .resources import DEFAULT_API_VERSION, GROUP, lookup_kind

DEFAULT_SERVER = "http://127.0.0.1:15010"
TIMEOUT = 10.0


class CliError(Exception):
    """A problem to print; ``lines`` are printed one per line."""

    def __init__(self, *lines: str):
        super().__init__(lines[0] if lines else "")
        self.lines = lines


# ---------------------------------------------------------------- HTTP


class Client:
    def __init__(self, server: str):
        self.server = server.rstrip("/")
        self.warnings: list[str] = []      # Warning headers of the last response

    def call(self, method: str, path: str, body=None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method,
                                     headers={"content-type": "application/json",
                                              "x-meshctl-user": os.environ.get("USER", "meshctl")})
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
                self.warnings = [parse_warning(v) for v in resp.headers.get_all("warning") or []]
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            payload = exc.read()
            try:
                return exc.code, json.loads(payload)
            except ValueError:
                return exc.code, {"message": payload.decode(errors="replace")}
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CliError(f"cannot reach the control plane at {self.server}: {reason}") from None


def parse_warning(value: str) -> str:
    """``299 - "text"`` -> ``text`` (RFC 7234 warn-code, agent, quoted text)."""
    parts = value.split(" ", 2)
    text = parts[2] if len(parts) == 3 else value
    return text[1:-1] if text.startswith('"') and text.endswith('"') else text


def status_lines(body: dict) -> list[str]:
    causes = (body.get("details") or {}).get("causes") or []
    if causes:
        return [c.get("message", "") for c in causes]
    return [body.get("message") or json.dumps(body)]


def resource_path(kind: str, namespace: str | None, name: str | None = None) -> str:
    k = lookup_kind(kind)
    plural = k.plural
    base = f"/apis/{k.group}/v1"
    if namespace is None:
        return f"{base}/{plural}"
    return f"{base}/namespaces/{namespace}/{plural}" + (f"/{name}" if name else "")


# ---------------------------------------------------------------- documents


def read_documents(paths: list[str], default_ns: str) -> tuple[list[tuple[str, dict]], list[str]]:
    """(where, object) for every Istio object in the files; errors for everything else."""
    files: list[tuple[str, str]] = []
    errors: list[str] = []
    for path in paths:
        if path == "-":
            files.append(("<stdin>", sys.stdin.read()))
            continue
        p = Path(path)
        if p.is_dir():
            members = sorted(x for x in p.iterdir() if x.suffix in (".yaml", ".yml", ".json") and x.is_file())
            files += [(str(x), x.read_text()) for x in members]
        elif p.is_file():
            files.append((str(p), p.read_text()))
        else:
            errors.append(f"{path}: no such file or directory")
    docs: list[tuple[str, dict]] = []
    for where, text in files:
        try:
            loaded = list(yaml.safe_load_all(text))
        except yaml.YAMLError as exc:
            errors.append(f"{where}: not valid YAML: {str(exc).splitlines()[0]}")
            continue
        index = 0
        for doc in loaded:
            if doc is None:
                continue
            items = doc.get("items", []) if isinstance(doc, dict) and doc.get("kind", "").endswith("List") else [doc]
            for item in items:
                label = f"{where}[{index}]"
                index += 1
                if not isinstance(item, dict):
                    errors.append(f"{label}: a document must be a mapping")
                    continue
                kind = lookup_kind(str(item.get("kind", "")))
                if kind is None or kind.kind != item.get("kind"):
                    errors.append(f"{label}: kind {item.get('kind')!r} is not served by meshctl "
                                  f"(VirtualService, DestinationRule, ServiceEntry, Gateway, Sidecar, Canary)")
                    continue
                md = item.setdefault("metadata", {}) if isinstance(item.get("metadata"), (dict, type(None))) else None
                if md is None:
                    errors.append(f"{label}: metadata: must be a mapping")
                    continue
                if item["metadata"] is None:
                    item["metadata"] = {}
                item["metadata"].setdefault("namespace", default_ns)
                docs.append((label, item))
    return docs, errors


def comparable(obj: dict | None) -> str:
    if obj is None:
        return ""
    md = obj.get("metadata") or {}
    view = {"apiVersion": obj.get("apiVersion", DEFAULT_API_VERSION), "kind": obj.get("kind"),
            "metadata": {k: md[k] for k in ("name", "namespace", "labels", "annotations") if md.get(k)},
            "spec": obj.get("spec")}
    return yaml.safe_dump(view, sort_keys=True)


def unified(old: dict | None, new: dict | None, label: str) -> str:
    return "".join(difflib.unified_diff(comparable(old).splitlines(True), comparable(new).splitlines(True),
                                        f"live/{label}", f"merged/{label}"))


# ---------------------------------------------------------------- commands


def _ref(obj: dict) -> tuple[str, str, str]:
    md = obj["metadata"]
    return obj["kind"], md["namespace"], md.get("name", "")


def cmd_apply(client: Client, args, *, diff_only: bool = False) -> int:
    docs, problems = read_documents(args.filename, args.namespace or "default")
    differences = 0
    for where, obj in docs:
        kind, ns, name = _ref(obj)
        if not name:
            problems.append(f"{where}: {kind} {ns}/?: metadata.name: required")
            continue
        path = resource_path(kind, ns, name)
        code, live = client.call("GET", path)
        live = live if code == 200 else None
        body = dict(obj, metadata={k: v for k, v in obj["metadata"].items() if k != "resourceVersion"})
        dry = args.dry_run or diff_only
        code, result = client.call("PUT", path + ("?dryRun=All" if dry else ""), body)
        if code >= 300:
            problems += status_lines(result)
            continue
        for warning in client.warnings:
            print(f"Warning: {warning}", file=sys.stderr)
        ref = f"{kind.lower()}.{lookup_kind(kind).group}/{name}" + (f" -n {ns}" if ns != "default" else "")
        changed = comparable(live) != comparable(result)
        if dry:
            text = unified(live, result, f"{kind}/{ns}/{name}")
            if text:
                differences += 1
                print(text, end="")
            if not diff_only:
                print(f"{ref} {'unchanged' if not changed else ('configured' if live else 'created')} (dry run, valid)")
        else:
            verb = "unchanged" if not changed else ("configured" if live else "created")
            print(f"{ref} {verb} (resourceVersion {result['metadata']['resourceVersion']})")
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    if problems:
        return 1
    return 1 if diff_only and differences else 0


def _age(created: str | None) -> str:
    if not created:
        return "?"
    seconds = max(0, time.time() - _utc(created))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _utc(stamp: str) -> float:
    import calendar
    return calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ"))


def _summary(obj: dict) -> str:
    spec = obj.get("spec") or {}
    kind = obj["kind"]
    if kind == "VirtualService":
        dests = []
        for route in spec.get("http") or []:
            for d in route.get("route") or []:
                dst = d.get("destination") or {}
                dests.append(f"{dst.get('host')}{':' + dst['subset'] if dst.get('subset') else ''}={d.get('weight', 100)}")
        return f"hosts={','.join(spec.get('hosts') or [])} gateways={','.join(spec.get('gateways') or []) or '-'} " \
               f"routes={' '.join(dests) or '-'}"
    if kind == "DestinationRule":
        return f"host={spec.get('host')} subsets={','.join(s.get('name', '?') for s in spec.get('subsets') or []) or '-'}"
    if kind == "ServiceEntry":
        return f"hosts={','.join(spec.get('hosts') or [])} resolution={spec.get('resolution', 'NONE')}"
    if kind == "Canary":
        status = obj.get("status") or {}
        return f"host={spec.get('host')} {spec.get('stable')}->{spec.get('canary')} phase={status.get('phase', '-')} " \
               f"weight={status.get('canaryWeight', '-')}"
    if kind == "Gateway":
        return "servers=" + ",".join(f"{s.get('port', {}).get('number')}/{s.get('port', {}).get('protocol')}"
                                     for s in spec.get("servers") or [])
    return f"egress={len(spec.get('egress') or [])}"


def cmd_get(client: Client, args) -> int:
    kind = lookup_kind(args.kind)
    if kind is None:
        raise CliError(f"unknown kind {args.kind!r} (virtualservices|destinationrules|serviceentries|gateways|sidecars|"
                       "canaries)")
    ns = None if args.all_namespaces else (args.namespace or "default")
    if args.name and ns is None:
        raise CliError("a NAME needs a namespace (-n), not -A")
    code, body = client.call("GET", resource_path(kind.kind, ns, args.name))
    if code != 200:
        raise CliError(*status_lines(body))
    items = [body] if args.name else body["items"]
    if args.output == "json":
        print(json.dumps(body, indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump(body, sort_keys=False), end="")
    else:
        rows = [["NAMESPACE", "NAME", "RESOURCEVERSION", "AGE"] + (["SUMMARY"] if args.output == "wide" else [])]
        for obj in items:
            md = obj["metadata"]
            rows.append([md["namespace"], md["name"], md["resourceVersion"], _age(md.get("creationTimestamp"))]
                        + ([_summary(obj)] if args.output == "wide" else []))
        print_table(rows)
    return 0


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def cmd_delete(client: Client, args) -> int:
    targets: list[tuple[str, str, str]] = []
    problems: list[str] = []
    if args.filename:
        docs, problems = read_documents(args.filename, args.namespace or "default")
        targets = [_ref(obj) for _, obj in docs]
    elif args.kind and args.name:
        kind = lookup_kind(args.kind)
        if kind is None:
            raise CliError(f"unknown kind {args.kind!r}")
        targets = [(kind.kind, args.namespace or "default", args.name)]
    else:
        raise CliError("delete needs KIND NAME or -f FILE")
    for kind, ns, name in targets:
        code, body = client.call("DELETE", resource_path(kind, ns, name))
        if code != 200:
            problems += status_lines(body)
        else:
            print(f"{kind.lower()}.{lookup_kind(kind).group}/{name} deleted (revision {body['metadata']['resourceVersion']})")
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    return 1 if problems else 0


def cmd_history(client: Client, args) -> int:
    code, body = client.call("GET", f"/history?limit={args.limit}")
    if code != 200:
        raise CliError(*status_lines(body))
    rows = [["REVISION", "TIME", "OP", "KIND", "NAMESPACE/NAME", "BY"]]
    for e in body["items"]:
        rows.append([str(e["revision"]), time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["at"])), e["op"],
                     e["kind"], f"{e['namespace']}/{e['name']}", e["origin"]])
    print_table(rows)
    return 0


def cmd_rollback(client: Client, args) -> int:
    code, body = client.call("POST", f"/history/{args.revision}/rollback")
    if code != 200:
        raise CliError(*status_lines(body))
    print(f"rolled back to revision {body['rolled_back_to']}: now at revision {body['revision']}")
    return 0


def cmd_proxies(client: Client, args) -> int:
    code, body = client.call("GET", "/push/v1/proxies")
    if code != 200:
        raise CliError(*status_lines(body))
    if args.output == "json":
        print(json.dumps(body, indent=2))
        return 0
    rows = [["NODE", "SERVICE", "NAMESPACE", "LABELS", "STATE", "ACKED", "LAST NACK", "CONNECTED", "REPLICA"]]
    for p in body["items"]:
        nack = p.get("last_nack")
        nack_text = f"{nack['version']}: {' | '.join(nack['errors'])}" if nack else "-"
        rows.append([p["node_id"], p["service"] or f"({p['mode']})", p["namespace"],
                     ",".join(f"{k}={v}" for k, v in sorted(p["labels"].items())) or "-", p["state"],
                     p["acked_version"] or "-", nack_text,
                     time.strftime("%H:%M:%S", time.localtime(p["connected_since"])), p.get("replica", "local")])
    print_table(rows)
    return 0


def cmd_endpoints(client: Client, args) -> int:
    ns = args.namespace or "default"
    code, body = client.call("GET", f"/registry/v1/namespaces/{ns}/services/{args.service}/endpoints")
    if code != 200:
        raise CliError(*status_lines(body))
    rows = [["ADDRESS", "PORTS", "LABELS", "NODE"]]
    for w in body["items"]:
        rows.append([w["address"], ",".join(f"{k}={v}" for k, v in sorted(w["ports"].items())),
                     ",".join(f"{k}={v}" for k, v in sorted(w["labels"].items())) or "-", w.get("node_id") or "-"])
    print_table(rows)
    return 0


def cmd_serve(args) -> int:
    import asyncio
    from .server import serve
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    try:
        from .vips import VipAllocator
        VipAllocator(args.vip_range)
    except ValueError as exc:
        print(f"meshctl serve: --vip-range: {exc}", file=sys.stderr)
        return 2
    runner(serve(args.store, args.listen, debounce=args.debounce, ttl=args.ttl, ready_file=args.ready_file,
                 vip_range=args.vip_range))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshctl", description="meshproxy control plane and its client")
    parser.add_argument("--server", default=os.environ.get("MESHCTL_SERVER", DEFAULT_SERVER),
                        help="control-plane URL (default: $MESHCTL_SERVER or %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the control plane")
    p.add_argument("--store", default="sqlite:meshctl.db", help="sqlite:PATH or etcd://HOST:PORT[,HOST:PORT...]")
    p.add_argument("--listen", default="127.0.0.1:15010")
    p.add_argument("--debounce", type=float, default=0.1, help="seconds of quiet before a push (default 0.1)")
    p.add_argument("--ttl", type=float, default=10.0, help="default registration TTL in seconds (default 10)")
    p.add_argument("--ready-file", help="write the bound port to this file once listening")
    p.add_argument("--vip-range", default="240.240.0.0/16",
                   help="CIDR that service virtual IPs are allocated from (default 240.240.0.0/16)")

    for name in ("apply", "diff"):
        p = sub.add_parser(name, help="create or update resources" if name == "apply" else "show what apply would change")
        p.add_argument("-f", "--filename", action="append", required=True)
        p.add_argument("-n", "--namespace")
        if name == "apply":
            p.add_argument("--dry-run", action="store_true", help="validate and show the diff; change nothing")

    p = sub.add_parser("get")
    p.add_argument("kind")
    p.add_argument("name", nargs="?")
    p.add_argument("-n", "--namespace")
    p.add_argument("-A", "--all-namespaces", action="store_true")
    p.add_argument("-o", "--output", choices=("yaml", "json", "wide"))

    p = sub.add_parser("delete")
    p.add_argument("kind", nargs="?")
    p.add_argument("name", nargs="?")
    p.add_argument("-n", "--namespace")
    p.add_argument("-f", "--filename", action="append")

    p = sub.add_parser("history")
    p.add_argument("--limit", type=int, default=50)
    p = sub.add_parser("rollback")
    p.add_argument("revision", type=int)
    p = sub.add_parser("proxies")
    p.add_argument("-o", "--output", choices=("json",))
    p = sub.add_parser("endpoints")
    p.add_argument("service")
    p.add_argument("-n", "--namespace")
    canary_cli.add_parser(sub)
    p = sub.add_parser("inject", help="add the meshproxy sidecar to Kubernetes workloads (like istioctl kube-inject)")
    p.add_argument("-f", "--filename", required=True, help="YAML file, or - for stdin")
    p.add_argument("-o", "--output", help="write here instead of stdout")
    p.add_argument("--image", default="meshproxy:0.1.0", help="the meshproxy image (Dockerfile)")
    p.add_argument("--control-plane", default="http://meshctl.meshproxy-system.svc:15010",
                   help="control plane URL the sidecars connect to")
    p.add_argument("--no-capture-dns", action="store_true", help="leave the pods' DNS alone")
    return parser


def cmd_inject(args) -> int:
    import yaml
    from .inject import InjectError, InjectOptions, inject_documents
    try:
        text = sys.stdin.read() if args.filename == "-" else open(args.filename).read()
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
        out = inject_documents(docs, InjectOptions(image=args.image, control_plane=args.control_plane,
                                                   capture_dns=not args.no_capture_dns))
    except (OSError, yaml.YAMLError, InjectError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    rendered = yaml.safe_dump_all(out, sort_keys=False)
    if args.output:
        with open(args.output, "w") as f:
            f.write(rendered)
    else:
        sys.stdout.write(rendered)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "inject":
        return cmd_inject(args)
    client = Client(args.server)
    commands = {"apply": cmd_apply, "get": cmd_get, "delete": cmd_delete, "history": cmd_history,
                "rollback": cmd_rollback, "proxies": cmd_proxies, "endpoints": cmd_endpoints,
                "canary": lambda c, a: canary_cli.run(c, a, CliError),
                "diff": lambda c, a: cmd_apply(c, a, diff_only=True)}
    if args.command == "diff":
        args.dry_run = True
    try:
        return commands[args.command](client, args)
    except CliError as exc:
        for line in exc.lines:
            print(f"error: {line}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
