"""meshctl: serve the control plane, or talk to one.

  meshctl serve [--store sqlite:PATH | --store etcd://HOST:PORT[,...]] [--listen ADDR:PORT]
                [--discovery-namespaces NS,...]
  meshctl apply -f FILE|DIR|- [--dry-run]     meshctl diff -f FILE|DIR|-
  meshctl get KIND [NAME] [-n NS | -A] [-o yaml|json|wide]
  meshctl delete KIND NAME [-n NS]  |  meshctl delete -f FILE|DIR|-
  meshctl history [--limit N]       meshctl rollback REVISION [--include-security] [--dry-run]
  meshctl proxies [-o json]         meshctl endpoints SERVICE [-n NS]
  meshctl canary status [NAME] [-n NS] [-o json]
  meshctl canary promote|abort|pause|resume NAME [-n NS]
  meshctl token create --namespace NS --service-account SA [--ttl D]    (a sidecar's bootstrap token)
  meshctl token create --scope view|edit|admin --name WHO [--ttl D]     (an API token)
  meshctl token list | revoke ID
  meshctl ca root | status | rotate prepare|activate|finish [--force]

The server comes from --server, else $MESHCTL_SERVER, else the credentials file's, else
http://127.0.0.1:15010.  The credentials file (--credentials, else $MESHCTL_CREDENTIALS, else
~/.config/meshctl/credentials.json, written by `meshctl serve`) gives the CA to verify an
https server with and the bearer token to send.
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
from .validation import load_yaml_all

DEFAULT_SERVER = "http://127.0.0.1:15010"
TIMEOUT = 10.0


class CliError(Exception):
    """A problem to print; ``lines`` are printed one per line."""

    def __init__(self, *lines: str):
        super().__init__(lines[0] if lines else "")
        self.lines = lines


# ---------------------------------------------------------------- HTTP


class Client:
    def __init__(self, server: str, *, token: str = "", ca_pem: str = ""):
        self.server = server.rstrip("/")
        self.token = token
        self.credentials_path = ""
        self.warnings: list[str] = []      # Warning headers of the last response
        self._context = None
        if self.server.startswith("https://"):
            import ssl
            if not ca_pem:
                raise CliError(f"{self.server}: no CA certificate to verify it with (give --credentials, "
                               f"$MESHCTL_CREDENTIALS, or the file `meshctl serve` wrote)")
            self._context = ssl.create_default_context(cadata=ca_pem)

    def call(self, method: str, path: str, body=None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"content-type": "application/json", "x-meshctl-user": os.environ.get("USER", "meshctl")}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.server + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT, context=self._context) as resp:
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
    base = k.base_path("v1")
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
            loaded = list(load_yaml_all(text))
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
                                  f"(VirtualService, DestinationRule, ServiceEntry, Gateway, Sidecar, "
                                  f"AuthorizationPolicy, PeerAuthentication, Secret, Canary)")
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
        group = lookup_kind(kind).group
        ref = f"{kind.lower()}{'.' + group if group else ''}/{name}" + (f" -n {ns}" if ns != "default" else "")
        changed = comparable(live) != comparable(result)
        if kind == "Secret" and live is not None:       # its data is never shown: the version says
            changed = dry or live["metadata"].get("resourceVersion") != result["metadata"].get("resourceVersion")
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
    if kind == "Secret":
        return f"type={obj.get('type', 'Opaque')} (data never shown)"
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
    query = "&".join(q for q, on in (("includeSecurity=true", args.include_security), ("dryRun=All", args.dry_run))
                     if on)
    code, body = client.call("POST", f"/history/{args.revision}/rollback" + (f"?{query}" if query else ""))
    if code != 200:
        raise CliError(*status_lines(body))
    for c in body.get("changes", []):       # the plan: what the rollback does (did) to each object
        kind = lookup_kind(c["kind"])
        ref = c["kind"].lower() + (f".{kind.group}" if kind is not None and kind.group else "")
        print(f"{c['op']} {ref}/{c['name']} -n {c['namespace']}")
    if args.dry_run:
        print(f"would roll back to revision {body['rolled_back_to']} (dry run: nothing changed, "
              f"still at revision {body['revision']})")
    else:
        print(f"rolled back to revision {body['rolled_back_to']}: now at revision {body['revision']}")
    return 0


def cmd_proxies(client: Client, args) -> int:
    code, body = client.call("GET", "/push/v1/proxies")
    if code != 200:
        raise CliError(*status_lines(body))
    if args.output == "json":
        print(json.dumps(body, indent=2))
        return 0
    rows = [["NODE", "SERVICE", "NAMESPACE", "LABELS", "STATE", "ACKED", "LAST NACK", "CONNECTED", "REPLICA",
             "IDENTITY", "CERT EXPIRES", "SECRETS"]]
    for p in body["items"]:
        nack = p.get("last_nack")
        nack_text = "-"
        if nack:
            refused = ", ".join(sorted(nack.get("resources") or {}))
            kept = f"refused {refused} (last good kept, rest applied): " if refused and nack.get("applied") else ""
            nack_text = f"{nack['version']}: {kept}{' | '.join(nack['errors'])}"
        rows.append([p["node_id"], p["service"] or f"({p['mode']})", p["namespace"],
                     ",".join(f"{k}={v}" for k, v in sorted(p["labels"].items())) or "-", p["state"],
                     p["acked_version"] or "-", nack_text,
                     time.strftime("%H:%M:%S", time.localtime(p["connected_since"])), p.get("replica", "local"),
                     p.get("principal") or "-", cert_expiry(p),
                     "granted" if p.get("secrets") == "granted" else "withheld" if p.get("secrets") else "-"])
    print_table(rows)
    return 0


def cert_expiry(proxy: dict, now: float | None = None) -> str:
    """``2026-12-08T14:38:02Z (in 23h59m)``; OpenSSL's text if it could not be read; ``-`` without."""
    at = proxy.get("cert_expires_at")
    if not at:
        return proxy.get("cert_not_after") or "-"
    left = at - (time.time() if now is None else now)
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
    if left <= 0:
        return f"{when} (expired)"
    return f"{when} (in {int(left // 3600)}h{int(left % 3600 // 60):02d}m)"


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
    security = {"tls": not args.insecure_loopback, "trust_domain": args.trust_domain,
                "workload_ttl": args.workload_cert_ttl, "max_workload_ttl": max(args.max_workload_cert_ttl,
                                                                                 args.workload_cert_ttl)}
    if args.secret_readers:
        from .security.service import parse_secret_readers
        if args.insecure_loopback:
            raise CliError("--secret-readers needs authenticated proxies: with --insecure-loopback the control "
                           "plane pushes no Secret to any proxy")
        try:
            parse_secret_readers(args.secret_readers)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        security["secret_readers"] = tuple(args.secret_readers)
    if bool(args.ca_cert) != bool(args.ca_key):
        raise CliError("--ca-cert and --ca-key go together")
    if args.ca_cert:
        from .security.ca import load_supplied
        try:
            security["supplied"] = load_supplied(args.ca_cert, args.ca_key)
        except (OSError, ValueError) as exc:
            raise CliError(str(exc)) from None
    if args.san:
        host = args.listen.rpartition(":")[0].strip("[]") or "127.0.0.1"
        security["hosts"] = (host, *args.san)
    selectors = tuple(n for n in args.discovery_namespaces.split(",") if n) if args.discovery_namespaces else None
    runner(serve(args.store, args.listen, debounce=args.debounce, ttl=args.ttl, ready_file=args.ready_file,
                 security=security, credentials=args.credentials, vip_range=args.vip_range,
                 discovery_namespaces=selectors))
    return 0


def parse_duration(value: str) -> float:
    """``90``, ``90s``, ``15m``, ``24h``, ``7d`` -> seconds."""
    import argparse as _argparse
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = value.strip().lower()
    try:
        seconds = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        raise _argparse.ArgumentTypeError(f"expected a duration like 30s, 15m, 24h, 7d; got {value!r}") from None
    if seconds <= 0:
        raise _argparse.ArgumentTypeError(f"a duration must be > 0, got {value!r}")
    return seconds


# ---------------------------------------------------------------- tokens and the CA


def cmd_token(client: Client, args) -> int:
    if args.token_command == "create":
        if args.scope:
            if args.namespace or args.service_account:
                raise CliError("give either --scope (an API token) or --namespace/--service-account (a bootstrap token)")
            body = {"scope": args.scope, "name": args.name or f"{args.scope}-token"}
            if args.ttl:
                body["ttl"] = args.ttl
            code, result = client.call("POST", "/security/v1/api-tokens", body)
        else:
            body = {"namespace": args.namespace or "default", "service_account": args.service_account or "default",
                    "ttl": args.ttl or 3600.0, "reusable": args.reusable}
            code, result = client.call("POST", "/security/v1/bootstrap-tokens", body)
        if code != 201:
            raise CliError(*status_lines(result))
        print(result["token"])
        if "identity" in result:
            use = "reusable until it" if result.get("reusable") else "single use,"
            print(f"bootstrap token {result['id']} for {result['identity']}, {use} expires "
                  f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(result['expires_at']))}", file=sys.stderr)
        else:
            print(f"API token {result['id']} '{result['name']}' with scope {result['scope']}", file=sys.stderr)
        return 0
    if args.token_command == "list":
        rows = [["ID", "KIND", "SCOPE/IDENTITY", "NAME", "EXPIRES", "CREATED BY"]]
        for kind, path in (("api", "/security/v1/api-tokens"), ("bootstrap", "/security/v1/bootstrap-tokens")):
            code, result = client.call("GET", path)
            if code != 200:
                raise CliError(*status_lines(result))
            for t in result["items"]:
                what = t.get("scope") or f"{t['namespace']}/{t['service_account']}"
                expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t["expires_at"])) if t.get("expires_at") else "never"
                rows.append([t["id"], kind, what, t.get("name", "-"), expires, t.get("created_by") or "-"])
        print_table(rows)
        return 0
    code, result = client.call("DELETE", f"/security/v1/api-tokens/{args.id}")
    if code != 200:
        raise CliError(*status_lines(result))
    print(f"API token {args.id} revoked")
    return 0


def cmd_ca(client: Client, args) -> int:
    if args.ca_command == "root":
        code, result = client.call("GET", "/security/v1/ca/roots")
        if code != 200:
            raise CliError(*status_lines(result))
        print("".join(result["roots"]), end="")
        return 0
    if args.ca_command == "status":
        code, result = client.call("GET", "/security/v1/ca")
        if code != 200:
            raise CliError(*status_lines(result))
        if args.output == "json":
            print(json.dumps(result, indent=2))
            return 0
        print(f"trust domain {result['trust_domain']}, phase {result['phase']}, next step {result['next_step']}, "
              f"{result['live_certificates']} live workload certificate(s)")
        for r in result["roots"]:
            mark = "*" if r["fingerprint"] == result["signing"] else " "
            print(f" {mark} {r['fingerprint'][:16]}  {r['subject']}  until {r['not_after']}")
        if result["waiting_for"]:
            print(f"{result['next_step']} waits for: {', '.join(result['waiting_for'])}")
        return 0
    path = f"/security/v1/ca/rotate/{args.step}" + ("?force=true" if args.force else "")
    code, result = client.call("POST", path)
    if code != 200:
        raise CliError(*status_lines(result))
    print(f"CA rotation: {args.step} done; phase {result['phase']}, {len(result['roots'])} root(s) in the bundle; "
          f"next step {result['next_step']}")
    if client.credentials_path:
        code, roots = client.call("GET", "/security/v1/ca/roots")
        if code == 200:
            update_credentials_ca(client.credentials_path, "".join(roots["roots"]))
            print(f"updated the CA bundle in {client.credentials_path}")
    return 0


def update_credentials_ca(path: str, ca_pem: str) -> None:
    from .security.service import write_private
    with open(path) as f:
        data = json.load(f)
    data["ca"] = ca_pem
    write_private(path, json.dumps(data, indent=2) + "\n")


def load_credentials(path: str | None) -> dict | None:
    """The credentials file: --credentials, else $MESHCTL_CREDENTIALS, else the default path if it exists."""
    from .server import default_credentials_path
    explicit = path or os.environ.get("MESHCTL_CREDENTIALS")
    path = explicit or default_credentials_path()
    if not os.path.exists(path):
        if explicit:
            raise CliError(f"credentials file {path} does not exist")
        return None
    try:
        with open(path) as f:
            data = json.load(f)
        data["_path"] = path
        return data
    except (OSError, ValueError) as exc:
        raise CliError(f"credentials file {path}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshctl", description="meshproxy control plane and its client")
    parser.add_argument("--server", default=os.environ.get("MESHCTL_SERVER"),
                        help="control-plane URL (default: $MESHCTL_SERVER, else the credentials file's, else "
                             f"{DEFAULT_SERVER})")
    parser.add_argument("--credentials", help="credentials file written by `meshctl serve` (server URL, CA, token); "
                                              "default $MESHCTL_CREDENTIALS or ~/.config/meshctl/credentials.json")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the control plane")
    p.add_argument("--store", default="sqlite:meshctl.db", help="sqlite:PATH or etcd://HOST:PORT[,HOST:PORT...]")
    p.add_argument("--listen", default="127.0.0.1:15010")
    p.add_argument("--debounce", type=float, default=0.1, help="seconds of quiet before a push (default 0.1)")
    p.add_argument("--discovery-namespaces", default="", metavar="NS[,NS...]",
                   help="discover only these namespaces (glob patterns; istio-system always): Istio's "
                        "discoverySelectors; resources and workloads elsewhere reach no proxy")
    p.add_argument("--ttl", type=float, default=10.0, help="default registration TTL in seconds (default 10)")
    p.add_argument("--ready-file", help="write the bound port to this file once listening")
    p.add_argument("--vip-range", default="240.240.0.0/16",
                   help="CIDR that service virtual IPs are allocated from (default 240.240.0.0/16)")
    p.add_argument("--insecure-loopback", action="store_true",
                   help="plaintext HTTP with no authentication, allowed only on a loopback address (local demo)")
    p.add_argument("--secret-readers", action="append", default=[], metavar="NS/SA[,NS/SA...]",
                   help="workload identities (namespace/service account of their certificate) that are pushed the "
                        "Secrets of their namespace that their Gateways name (repeatable; default nobody). Not "
                        "with --insecure-loopback, which pushes no Secret")
    p.add_argument("--credentials", dest="credentials",
                   help="where to write the admin credentials file (default ~/.config/meshctl/credentials.json)")
    p.add_argument("--ca-cert", help="use this CA certificate (PEM) as the mesh root instead of generating one")
    p.add_argument("--ca-key", help="the key of --ca-cert (PEM)")
    p.add_argument("--trust-domain", default="cluster.local", help="SPIFFE trust domain (default %(default)s)")
    p.add_argument("--workload-cert-ttl", type=parse_duration, default=24 * 3600.0,
                   help="lifetime of workload certificates (default 24h; e.g. 10s for tests)")
    p.add_argument("--max-workload-cert-ttl", type=parse_duration, default=90 * 86400.0,
                   help="longest lifetime a sidecar may ask for (default 90d)")
    p.add_argument("--san", action="append", default=[],
                   help="extra DNS name or address for the control plane's serving certificate (repeatable)")

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
    p.add_argument("--include-security", action="store_true",
                   help="also restore PeerAuthentication/AuthorizationPolicy (refused without it when they differ)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
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
    p.add_argument("--control-plane", default="https://meshctl.mesh-system.svc:15010",
                   help="control plane URL the sidecars connect to (https: each pod mounts the mesh root from "
                        "ConfigMap --ca-configmap and its bootstrap token from Secret --token-secret)")
    p.add_argument("--ca-configmap", default="meshproxy-ca-root-cert",
                   help="ConfigMap (in each pod's namespace) whose key root-cert.pem is `meshctl ca root`")
    p.add_argument("--token-secret", default="meshproxy-bootstrap-{service_account}",
                   help="Secret (in each pod's namespace) whose key token is a `meshctl token create --reusable` "
                        "token; {service_account} is the pod's serviceAccountName")
    p.add_argument("--no-capture-dns", action="store_true", help="leave the pods' DNS alone")

    p = sub.add_parser("token", help="bootstrap tokens for sidecars, API tokens for meshctl")
    tsub = p.add_subparsers(dest="token_command", required=True)
    t = tsub.add_parser("create", help="--namespace/--service-account: a bootstrap token; --scope: an API token")
    t.add_argument("-n", "--namespace")
    t.add_argument("--service-account")
    t.add_argument("--scope", choices=("view", "edit", "admin"))
    t.add_argument("--name", help="API token: the name recorded as author of changes")
    t.add_argument("--ttl", type=parse_duration, help="lifetime (bootstrap default 1h; API default: no expiry)")
    t.add_argument("--reusable", action="store_true",
                   help="bootstrap token valid for its identity until it expires (a restarting sidecar presents it "
                        "again), instead of single use")
    tsub.add_parser("list")
    t = tsub.add_parser("revoke", help="revoke an API token")
    t.add_argument("id")

    p = sub.add_parser("ca", help="the mesh certificate authority")
    csub = p.add_subparsers(dest="ca_command", required=True)
    csub.add_parser("root", help="print the trust bundle (PEM), for sidecars' --ca-file")
    c = csub.add_parser("status", help="phase, roots, and what the next rotation step waits for")
    c.add_argument("-o", "--output", choices=("json",))
    c = csub.add_parser("rotate", help="root rotation: prepare, then activate, then finish")
    c.add_argument("step", choices=("prepare", "activate", "finish"))
    c.add_argument("--force", action="store_true", help="do not wait for every workload to renew (may fail requests)")
    return parser


def cmd_inject(args) -> int:
    import yaml
    from .inject import InjectError, InjectOptions, inject_documents
    try:
        text = sys.stdin.read() if args.filename == "-" else open(args.filename).read()
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
        out = inject_documents(docs, InjectOptions(image=args.image, control_plane=args.control_plane,
                                                   capture_dns=not args.no_capture_dns,
                                                   ca_configmap=args.ca_configmap, token_secret=args.token_secret))
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


def make_client(args) -> Client:
    creds = load_credentials(args.credentials)
    server = args.server or (creds or {}).get("server") or DEFAULT_SERVER
    client = Client(server, token=(creds or {}).get("token", ""), ca_pem=(creds or {}).get("ca", ""))
    client.credentials_path = (creds or {}).get("_path", "")
    return client


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        try:
            return cmd_serve(args)
        except CliError as exc:
            for line in exc.lines:
                print(f"error: {line}", file=sys.stderr)
            return 1
    if args.command == "inject":
        return cmd_inject(args)
    try:
        client = make_client(args)
    except CliError as exc:
        for line in exc.lines:
            print(f"error: {line}", file=sys.stderr)
        return 1
    commands = {"apply": cmd_apply, "get": cmd_get, "delete": cmd_delete, "history": cmd_history,
                "rollback": cmd_rollback, "proxies": cmd_proxies, "endpoints": cmd_endpoints,
                "canary": lambda c, a: canary_cli.run(c, a, CliError),
                "token": cmd_token, "ca": cmd_ca,
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
