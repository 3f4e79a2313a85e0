"""``meshproxy`` command line: run, validate, explain."""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from .codec import BACKENDS, DEFAULT_BACKEND
from .codec.api import CodecLimits


def _addr(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected ADDR:PORT, got {value!r}")
    return (host.strip("[]") or "0.0.0.0", int(port))


def _labels(value: str) -> dict[str, str]:
    labels = {}
    for item in filter(None, value.split(",")):
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"expected k=v[,k=v...], got {value!r}")
        labels[key.strip()] = val.strip()
    return labels


def _app_port(value: str) -> tuple[str, int]:
    name, sep, port = value.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536 or (sep and not name):
        raise argparse.ArgumentTypeError(f"expected [NAME:]PORT, got {value!r}")
    return (name or "http", int(port))


def _pod_address() -> str:
    """The first non-loopback IPv4 address of this network namespace (the pod IP)."""
    import fcntl
    import struct
    for _, name in socket.if_nameindex():
        if name == "lo":
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue
        return socket.inet_ntoa(packed[20:24])
    return "127.0.0.1"


class _Formatter(argparse.HelpFormatter):
    """argparse's help formatter with the width found without ``shutil`` (which argparse
    imports for it, with bz2/lzma/zlib: memory every proxy process would keep)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width=None):
        if width is None:
            try:
                width = int(os.environ.get("COLUMNS", "")) or os.get_terminal_size(sys.stdout.fileno()).columns
            except (ValueError, OSError):
                width = 80
            width -= 2
        super().__init__(prog, indent_increment, max_help_position, width)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshproxy", description="meshproxy data plane", formatter_class=_Formatter)
    sub = p.add_subparsers(dest="command", required=True)

    def subcommand(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, formatter_class=_Formatter, **kwargs)

    run = subcommand("run", help="run the proxy")
    run.add_argument("--config", action="append", default=[], metavar="PATH",
                     help="Istio YAML file or directory (repeatable); watched for changes")
    run.add_argument("--listen", type=_addr, default=("127.0.0.1", 15001), help="HTTP listener (default 127.0.0.1:15001)")
    run.add_argument("--admin", type=_addr, default=("127.0.0.1", 15000), help="admin listener (default 127.0.0.1:15000)")
    run.add_argument("--workers", type=int, default=1, help="worker processes sharing the ports (SO_REUSEPORT)")
    run.add_argument("--codec", choices=sorted(BACKENDS), default=DEFAULT_BACKEND,
                     help=f"HTTP/1.1 parser backend (default {DEFAULT_BACKEND})")
    run.add_argument("--namespace", default="default", help="namespace of this proxy's workload")
    run.add_argument("--labels", type=_labels, default={}, help="labels of this proxy's workload: k=v,...")
    run.add_argument("--mode", choices=("sidecar", "gateway"), default="sidecar")
    run.add_argument("--gateway-bind", default="0.0.0.0", help="address Gateway servers listen on")
    run.add_argument("--control-plane", default="", help="control plane URL[,URL...]")
    run.add_argument("--node-id", default="", help="node id shown by `meshctl proxies` (default host-pid)")
    run.add_argument("--service", default="", help="register this workload as SERVICE with the control plane")
    run.add_argument("--app-port", type=_app_port, action="append", default=[], metavar="[NAME:]PORT",
                     help="a port of the local app this sidecar fronts (repeatable); NAME sets the protocol "
                          "as Istio's port names do (http, tcp-..., grpc...; default http)")
    run.add_argument("--capture", action="store_true",
                     help="transparent sidecar: take the connections `meshproxy pod-init` redirects")
    run.add_argument("--outbound-port", type=int, default=15001, help="with --capture: outbound capture port")
    run.add_argument("--inbound-port", type=int, default=15006,
                     help="inbound port: with --capture the capture port; in explicit mode with --service and "
                          "--app-port, the listener (on --address) peers reach this workload through; 0: none")
    run.add_argument("--health-port", type=int, default=15021,
                     help="with --capture or -- CMD: /healthz/ready, /app-health/..., /stats/prometheus (0: off)")
    run.add_argument("--dns-listen", type=_addr, default=("127.0.0.1", 15053),
                     help="with --capture: the DNS listener (mesh names; the rest forwarded)")
    run.add_argument("--no-dns", action="store_true", help="with --capture: no DNS listener")
    run.add_argument("--dns-upstream", type=_addr, action="append", default=[], metavar="ADDR:PORT",
                     help="resolver for non-mesh names (repeatable; default: /etc/resolv.conf's nameservers)")
    run.add_argument("--app-probers", default="", metavar="JSON",
                     help='application probes behind /app-health/..., Istio\'s ISTIO_KUBE_APP_PROBERS format')
    run.add_argument("--app-exit-timeout", type=float, default=30.0,
                     help="with -- CMD: on SIGTERM, seconds outbound keeps serving the exiting application")
    run.add_argument("--startup-timeout", type=float, default=60.0,
                     help="with -- CMD: seconds to wait for the proxy to be ready before giving up")
    run.add_argument("--proxy-uid", type=int, default=1337,
                     help="with --capture -- CMD started as root: the uid the proxy runs as (pod-init's --proxy-uid)")
    run.add_argument("--protocol-detection-timeout", type=float, default=5.0,
                     help="with --capture: seconds to wait for a client's first bytes on a port with no declared "
                          "protocol before treating it as TCP")
    run.add_argument("--service-account", default="default",
                     help="service account this workload runs as: its identity is "
                          "spiffe://TRUST-DOMAIN/ns/NAMESPACE/sa/SERVICE-ACCOUNT (default %(default)s)")
    run.add_argument("--token-file", default="", help="bootstrap token (from `meshctl token create`) to get the "
                                                      "workload certificate with; needs --control-plane")
    run.add_argument("--ca-file", default="", help="the mesh root certificate(s), PEM (`meshctl ca root`): verifies "
                                                   "an https control plane")
    run.add_argument("--trust-domain", default="cluster.local", help="SPIFFE trust domain (default %(default)s)")
    run.add_argument("--address", default="127.0.0.1", help="address this workload is registered under (e.g. the pod IP)")
    run.add_argument("--initial-config-timeout", type=float, default=60.0,
                     help="with --control-plane: give up (exit 1) if no config arrives within this many seconds")
    run.add_argument("--drain-timeout", type=float, default=10.0, help="seconds to drain on SIGTERM")
    run.add_argument("--drain-grace", type=float, default=5.0,
                     help="seconds after SIGTERM that new connections are still served, each answer with "
                          "Connection: close (within the drain timeout; ends once no connection is open)")
    run.add_argument("--header-timeout", type=float, default=10.0, help="request head must arrive within (408)")
    run.add_argument("--body-timeout", type=float, default=60.0,
                     help="seconds a request body may go without a byte arriving (408 and close; "
                          "nginx client_body_timeout, HAProxy timeout client)")
    run.add_argument("--idle-timeout", type=float, default=60.0, help="keep-alive idle timeout")
    run.add_argument("--connect-timeout", type=float, default=10.0, help="upstream connect timeout")
    run.add_argument("--route-timeout", type=float, default=None,
                     help="timeout for routes that set none (Istio default: none)")
    run.add_argument("--max-connections", type=int, default=10_000, help="per listener")
    run.add_argument("--max-header-bytes", type=int, default=60 * 1024)
    run.add_argument("--max-headers", type=int, default=100)
    run.add_argument("--max-target-bytes", type=int, default=8 * 1024)
    run.add_argument("--max-body-bytes", type=int, default=0, help="0 = no cap")
    run.add_argument("--tracing-endpoint", default="", help="OTLP/HTTP traces URL (e.g. http://127.0.0.1:4318/v1/traces)")
    run.add_argument("--trace-sample-rate", type=float, default=0.01, help="share of new traces sampled (0..1)")
    run.add_argument("--no-trace-propagation", action="store_true", help="do not touch trace headers at all")
    run.add_argument("--access-log", default="", help="'stdout' or a file path; off when empty")
    run.add_argument("--access-log-sample", type=float, default=1.0, help="share of requests logged (errors always)")
    run.add_argument("--disable-metrics", action="store_true", help="no request metrics (to measure their cost)")
    run.add_argument("--log-level", default="INFO")

    val = subcommand("validate", help="validate config files; prints every error, exits 1 if any")
    val.add_argument("paths", nargs="+")
    val.add_argument("--namespace", default="default")

    exp = subcommand("explain", help="print the routing decision for a request, without sending it")
    exp.add_argument("--config", action="append", required=True, metavar="PATH")
    exp.add_argument("--host", required=True)
    exp.add_argument("--path", default="/")
    exp.add_argument("--method", default="GET")
    exp.add_argument("--header", action="append", default=[], metavar="K=V")
    exp.add_argument("--port", type=int, default=None)
    exp.add_argument("--namespace", default="default")
    exp.add_argument("--labels", type=_labels, default={})
    exp.add_argument("--mode", choices=("sidecar", "gateway"), default="sidecar")
    exp.add_argument("--source-ip", default="", help="caller address, for AuthorizationPolicy (ipBlocks)")
    exp.add_argument("--principal", default="",
                     help="caller identity for AuthorizationPolicy, e.g. cluster.local/ns/default/sa/sleep "
                          "(empty: a plaintext caller)")

    init = subcommand("pod-init", help="install the pod's traffic capture rules (nftables; run as root in the pod)")
    init.add_argument("--proxy-uid", type=int, default=1337, help="the sidecar's user id: its traffic is never captured")
    init.add_argument("--proxy-gid", type=int, default=None, help="the sidecar's group id (default: --proxy-uid)")
    init.add_argument("--outbound-port", type=int, default=15001, help="outbound capture port")
    init.add_argument("--inbound-port", type=int, default=15006, help="inbound capture port")
    init.add_argument("--dns-port", type=int, default=15053, help="the sidecar's DNS port (with --capture-dns)")
    init.add_argument("--health-port", type=int, default=15021, help="never captured inbound")
    init.add_argument("--metrics-port", type=int, default=15090, help="never captured inbound")
    init.add_argument("--exclude-outbound-cidrs", default="", metavar="CIDR,...")
    init.add_argument("--exclude-outbound-ports", default="", metavar="PORT,...")
    init.add_argument("--exclude-inbound-ports", default="", metavar="PORT,...")
    init.add_argument("--no-inbound-capture", action="store_true", help="capture outbound only")
    init.add_argument("--capture-dns", action="store_true", help="redirect UDP/TCP port 53 to --dns-port")
    init.add_argument("--dry-run", action="store_true", help="print the rule set; change nothing")
    init.add_argument("--cleanup", action="store_true", help="remove the rules pod-init installed")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if argv[:1] == ["run"] and "--" in argv:       # meshproxy run ... -- CMD ARGS
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    args = _parser().parse_args(argv)
    if command:
        return _supervise(args, argv, command)
    if args.command == "run":
        return _run(args)
    if args.command == "validate":
        return _validate(args)
    if args.command == "pod-init":
        return _pod_init(args)
    return _explain(args)


def _pod_init(args) -> int:
    from .capture import podinit

    try:
        if args.cleanup:
            if args.dry_run:
                print(podinit.cleanup_transaction(), end="")
                return 0
            podinit.cleanup()
            print(f"meshproxy pod-init: removed table {podinit.FAMILY} {podinit.TABLE}", file=sys.stderr)
            return 0
        for port in (args.outbound_port, args.inbound_port, args.dns_port, args.health_port, args.metrics_port):
            if not 0 < port < 65536:
                raise podinit.PodInitError(f"{port} is not a port (1-65535)")
        rules = podinit.CaptureRules(
            proxy_uid=args.proxy_uid, proxy_gid=args.proxy_gid, outbound_port=args.outbound_port,
            inbound_port=args.inbound_port, dns_port=args.dns_port, health_port=args.health_port,
            metrics_port=args.metrics_port, capture_dns=args.capture_dns,
            capture_inbound=not args.no_inbound_capture,
            exclude_outbound_cidrs=podinit.parse_cidrs(args.exclude_outbound_cidrs, "--exclude-outbound-cidrs"),
            exclude_outbound_ports=podinit.parse_ports(args.exclude_outbound_ports, "--exclude-outbound-ports"),
            exclude_inbound_ports=podinit.parse_ports(args.exclude_inbound_ports, "--exclude-inbound-ports"))
        if args.dry_run:
            print(podinit.transaction(rules), end="")
            return 0
        text = podinit.apply(rules)
    except podinit.PodInitError as err:
        print(f"meshproxy pod-init: {err}", file=sys.stderr)
        return 1
    print(text, end="")
    print(f"meshproxy pod-init: installed table {podinit.FAMILY} {podinit.TABLE}", file=sys.stderr)
    return 0


def _supervise(args, argv: list[str], command: list[str]) -> int:
    from .capture.lifecycle import Supervisor

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.health_port:
        print("meshproxy run -- CMD: needs the health port (--health-port) to know when the proxy is ready",
              file=sys.stderr)
        return 2
    proxy_uid = args.proxy_uid if args.capture and os.getuid() == 0 else None
    supervisor = Supervisor([sys.executable, "-m", "meshproxy", *argv], command, health_port=args.health_port,
                            proxy_uid=proxy_uid, startup_timeout=args.startup_timeout,
                            app_exit_timeout=args.app_exit_timeout, proxy_stop_timeout=args.drain_timeout + 5)
    return supervisor.run()


def _run(args) -> int:
    from .bootstrap import WorkerOptions
    from .config.compile import ProxyIdentity
    from .config.model import ProxySettings
    from .process import RunOptions, run

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from . import HOT_PATH
    if HOT_PATH != "compiled":
        logging.getLogger("meshproxy").warning(
            "hot path: %s; the proxy serves about 5x fewer requests per core than compiled "
            "(build it with scripts/build_ext.py, or install a wheel built with a C compiler)", HOT_PATH)
    if not args.config and not args.control_plane:
        print("meshproxy run: give --config PATH or --control-plane URL", file=sys.stderr)
        return 2
    settings = ProxySettings(
        header_read_timeout=args.header_timeout, body_timeout=args.body_timeout, idle_timeout=args.idle_timeout,
        upstream_connect_timeout=args.connect_timeout, default_route_timeout=args.route_timeout,
        max_connections_per_listener=args.max_connections, drain_timeout=args.drain_timeout)
    capture = None
    address = args.address
    if args.capture:
        from .config.capture import CaptureConfig
        capture = CaptureConfig(outbound_port=args.outbound_port, inbound_port=args.inbound_port,
                                app_ports=tuple(args.app_port),
                                protocol_detection_timeout=args.protocol_detection_timeout)
        if address == "127.0.0.1":
            address = _pod_address()
    inbound = ()
    if not args.capture and args.service and args.app_port and args.inbound_port and args.mode == "sidecar":
        if len(args.app_port) > 1:
            print("meshproxy run: explicit mode fronts one --app-port (its inbound listener is --inbound-port); "
                  "use --capture for several", file=sys.stderr)
            return 2
        name, app_port = args.app_port[0]
        inbound = ((address, args.inbound_port, app_port, name),)
    identity = ProxyIdentity(namespace=args.namespace, labels=args.labels, mode=args.mode,
                             http_listen=args.listen, gateway_bind=args.gateway_bind, capture=capture,
                             inbound=inbound, workload_certificate=bool(args.token_file))
    limits = CodecLimits(max_header_bytes=args.max_header_bytes, max_header_count=args.max_headers,
                         max_target_bytes=args.max_target_bytes, max_body_bytes=args.max_body_bytes)
    node_id = args.node_id or f"{socket.gethostname()}-{os.getpid()}"
    security = None
    urls = [u for u in args.control_plane.split(",") if u]
    if any(u.startswith("https://") for u in urls) and not (args.token_file and args.ca_file):
        print("meshproxy run: an https control plane needs --ca-file (its root, `meshctl ca root`) and --token-file "
              "(a bootstrap token, `meshctl token create`)", file=sys.stderr)
        return 2
    if args.token_file:
        if not urls:
            print("meshproxy run: --token-file needs --control-plane", file=sys.stderr)
            return 2
        from .security.spiffe import identity_errors
        problems = identity_errors(args.namespace, args.service_account, args.trust_domain)
        if problems:
            print(f"meshproxy run: {'; '.join(problems)}", file=sys.stderr)
            return 2
        ca_pem = None
        if args.ca_file:
            try:
                with open(args.ca_file, "rb") as f:
                    ca_pem = f.read()
            except OSError as exc:
                print(f"meshproxy run: --ca-file {args.ca_file}: {exc.strerror}", file=sys.stderr)
                return 2
        security = {"token_file": args.token_file, "ca_pem": ca_pem, "service_account": args.service_account,
                    "trust_domain": args.trust_domain}
    registration = None
    if args.service:
        # the endpoint peers reach: in capture mode the application's ports on the pod address (the
        # destination's rules send them to its sidecar); in explicit mode the inbound listener
        registration = {"service": args.service, "namespace": args.namespace, "labels": args.labels,
                        "address": address, "ports": dict(args.app_port)}
        if args.token_file:      # has a workload certificate: the registry records its identity
            registration["service_account"] = args.service_account
        if inbound:
            registration["proxy_port"] = args.inbound_port
    pod = None
    if args.capture or os.environ.get("MESHPROXY_SUPERVISED") == "1":
        from .capture.pod import PodOptions, parse_app_probers
        try:
            probers = parse_app_probers(args.app_probers)
        except ValueError as err:
            print(f"meshproxy run: {err}", file=sys.stderr)
            return 2
        pod = PodOptions(health_listen=("0.0.0.0", args.health_port) if args.health_port else None,
                         dns_listen=args.dns_listen if args.capture and not args.no_dns else None,
                         dns_upstreams=list(args.dns_upstream), app_probers=probers)
    options = RunOptions(
        config_paths=args.config, listen=args.listen, admin=args.admin, workers=args.workers,
        identity=identity, settings=settings,
        worker=WorkerOptions(codec=args.codec, limits=limits, drain_timeout=args.drain_timeout,
                             drain_grace=args.drain_grace, node_id=node_id),
        control_plane=[u for u in args.control_plane.split(",") if u], registration=registration,
        initial_config_timeout=args.initial_config_timeout, pod=pod, security=security,
        telemetry={"tracing_endpoint": args.tracing_endpoint, "sample_rate": args.trace_sample_rate,
                   "propagate": not args.no_trace_propagation, "access_log": args.access_log,
                   "access_log_sample": args.access_log_sample, "service_name": args.service,
                   "disable_metrics": args.disable_metrics})
    return run(options)


def _validate(args) -> int:
    from .config.load import validate_paths

    result = validate_paths(args.paths, args.namespace)
    for error in result.errors:
        print(error)
    for warning in result.warnings:
        print(f"warning: {warning}")
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if result.errors:
        print(f"{len(result.errors)} error(s)", file=sys.stderr)
        return 1
    print(f"ok: {result.resources} resource(s) valid, {len(result.warnings)} warning(s)", file=sys.stderr)
    return 0


def _explain(args) -> int:
    from .config.compile import ProxyIdentity
    from .config.load import build_from_paths
    from .config.model import ProxySettings
    from .router.explain import explain
    from .security.authz import explain_security

    identity = ProxyIdentity(namespace=args.namespace, labels=args.labels, mode=args.mode)
    result = build_from_paths(args.config, identity, ProxySettings(), None)
    for error in result.errors:
        print(f"error: {error}", file=sys.stderr)
    if result.snapshot is None:
        return 1
    headers = {}
    for item in args.header:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"--header expects K=V, got {item!r}", file=sys.stderr)
            return 2
        headers[key.strip().lower()] = value
    print(explain(result.snapshot, args.host, args.path, method=args.method, headers=headers, port=args.port))
    for line in explain_security(result.snapshot, args.host, args.path, args.method, headers, args.port,
                                 args.source_ip, args.principal.removeprefix("spiffe://")):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
