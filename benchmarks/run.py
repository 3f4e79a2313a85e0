#!/usr/bin/env python3
"""Side-by-side benchmark: direct vs meshproxy vs HAProxy vs nginx, against one nginx upstream.

    .venv/bin/python benchmarks/run.py [--quick] [--only direct,meshproxy,haproxy,nginx]
                                       [--out benchmarks/RESULTS.md] [--profile] [--json FILE]

Everything runs on loopback from config files generated into a temp dir; every process started
here is stopped (process groups, in a finally and on SIGINT/SIGTERM). See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from string import Template

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from lib import loadgen, procs, report  # noqa: E402
from lib.procs import ProcessSet, pin_prefix  # noqa: E402

ALL_TARGETS = ("direct", "meshproxy", "haproxy", "nginx", "meshproxy-realistic")
DEFAULT_TARGETS = ("direct", "meshproxy", "haproxy", "nginx")
HOST = "bench.local"
SMALL_BYTES = 100
LARGE_BYTES = 16 * 1024


class Interrupted(Exception):
    pass


def _on_signal(signum, _frame):
    raise Interrupted(f"signal {signum}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short runs (3 s) for development; numbers are rough")
    p.add_argument("--only", default=",".join(DEFAULT_TARGETS),
                   help="comma list of targets among direct,meshproxy,haproxy,nginx (the default) and "
                        "meshproxy-realistic (issue 3's config: 50 services, 10-route VirtualService, 90/10 "
                        "split); direct is needed for added latency, haproxy for the ratios")
    p.add_argument("--out", default=None, help="write/update this markdown results file (e.g. benchmarks/RESULTS.md)")
    p.add_argument("--json", default=None, help="also write the raw results as JSON here")
    p.add_argument("--label", default=None, help="label for the run in RESULTS.md (e.g. 'quick run, noisy machine')")
    p.add_argument("--profile", action="store_true",
                   help="after meshproxy's measured runs, run py-spy during an extra throughput run and "
                        "write a speedscope profile + top summary (--profile-dir)")
    p.add_argument("--profile-dir", default=str(HERE / "profiles"))
    p.add_argument("--profile-native", action="store_true", help="py-spy --native (C frames too; slower)")
    p.add_argument("--syscalls", action="store_true",
                   help="after each proxy's measured runs, count its syscalls per request with strace -c "
                        "during an extra 2 s throughput run (strace slows it: only the counts are used)")
    p.add_argument("--duration", type=float, default=None, help="seconds per wrk run (default 10, quick 3)")
    p.add_argument("--repeat", type=int, default=None, help="wrk runs per size; median reported (default 3, quick 1)")
    p.add_argument("--conns", type=int, default=50, help="wrk connections (default 50)")
    p.add_argument("--rate", type=int, default=10_000, help="fixed request rate for latency (default 10000 req/s)")
    p.add_argument("--rate-conns", type=int, default=10,
                   help="h2load processes of one keep-alive connection each sharing the fixed rate "
                        "(default 10, i.e. 1000 req/s each; see README)")
    p.add_argument("--low-rate", type=int, default=1000,
                   help="also measure latency nearly idle: one connection at this many req/s (default 1000; 0 = skip)")
    p.add_argument("--rate-duration", type=float, default=None, help="seconds measured at the fixed rate (default 10, quick 3)")
    p.add_argument("--rate-repeat", type=int, default=None,
                   help="fixed-rate runs per target, in rounds over the targets like the throughput runs; "
                        "p50 and p99 are each the median over the runs (default 3, quick 1)")
    p.add_argument("--tcp-mib", type=int, default=None, help="size of the TCP download in MiB (default 1024, quick 256)")
    p.add_argument("--tcp-repeat", type=int, default=None, help="TCP downloads per target; median (default 3, quick 2)")
    p.add_argument("--workers", type=int, default=1, help="meshproxy --workers (default 1)")
    p.add_argument("--meshproxy", default=str(REPO / ".venv" / "bin" / "meshproxy"), help="meshproxy executable")
    p.add_argument("--meshproxy-arg", action="append", default=[],
                   help="extra argument for `meshproxy run` (repeatable), e.g. --meshproxy-arg=--codec=h11")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                   help="an extra meshproxy run named meshproxy+NAME with these extra `meshproxy run` arguments, "
                        "measured right after plain meshproxy (repeatable). $otlp_url in ARGS is replaced by the "
                        "URL of an OTLP/HTTP sink the harness starts, e.g. "
                        "--variant 'trace100=--tracing-endpoint $otlp_url --trace-sample-rate 1'")
    p.add_argument("--meshproxy-config", default=None,
                   help="use this config file/dir instead of the generated one (must route Host bench.local); "
                        "$upstream_port and $tcp_port in *.tmpl files are filled in")
    p.add_argument("--http-reuse", default="always", choices=("always", "safe", "aggressive", "never"),
                   help="HAProxy http-reuse mode (default always)")
    p.add_argument("--no-pin", action="store_true", help="do not use taskset")
    p.add_argument("--proxy-cores", default=None, help="cores for the proxy under test (default: the last one)")
    p.add_argument("--load-cores", default=None, help="cores for load generator + upstream (default: the first one)")
    p.add_argument("--sequential", action="store_true",
                   help="measure one target at a time, start to stop (default: all targets stay up and the "
                        "small-response runs go round them)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs) for inspection")
    args = p.parse_args(argv)
    args.targets = [t.strip() for t in args.only.split(",") if t.strip()]
    bad = [t for t in args.targets if t not in ALL_TARGETS]
    if bad:
        p.error(f"unknown target(s) {bad}; choose from {ALL_TARGETS}")
    args.variants = {}
    for v in args.variant:
        vname, sep, vargs = v.partition("=")
        if not sep or not vname.strip():
            p.error(f"--variant expects NAME=ARGS, got {v!r}")
        args.variants[f"meshproxy+{vname.strip()}"] = shlex.split(vargs)
    if args.variants:  # variants run right after plain meshproxy (or after direct if it is not run)
        at = args.targets.index("meshproxy") + 1 if "meshproxy" in args.targets else min(1, len(args.targets))
        args.targets[at:at] = list(args.variants)
    q = args.quick
    args.duration = args.duration or (3.0 if q else 10.0)
    args.repeat = args.repeat or (1 if q else 3)
    args.rate_duration = args.rate_duration or (3.0 if q else 10.0)
    args.rate_repeat = args.rate_repeat or (1 if q else 3)
    args.rate_warmup = 1.0 if q else 2.0
    args.tcp_mib = args.tcp_mib or (256 if q else 1024)
    args.tcp_repeat = args.tcp_repeat or (2 if q else 3)
    if args.rate % args.rate_conns:
        p.error("--rate must be a multiple of --rate-conns")
    return args


# --- machine facts ---------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "missing"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


def versions(args) -> str:
    parts = [
        _first_line(["nginx", "-v"]).replace("nginx version: ", ""),
        _first_line(["haproxy", "-v"]).split(" - ")[0],
        _first_line(["wrk", "--version"]).split(" Copyright")[0],
        _first_line(["h2load", "--version"]),
        "Python " + platform.python_version(),
    ]
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "meshproxy"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        parts.append(f"meshproxy @ {rev}" + (" (meshproxy/ has uncommitted changes)" if dirty else ""))
        hot = subprocess.run([sys.executable, "-c", "import meshproxy; print(meshproxy.HOT_PATH)"],
                             capture_output=True, text=True, timeout=30, cwd=str(REPO)).stdout.strip()
        parts.append(f"hot path {hot or 'unknown'}")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return ", ".join(parts)


def parse_cores(text: str | None) -> list[int] | None:
    return [int(c) for c in text.split(",")] if text else None


def plan_pinning(args) -> tuple[list[int] | None, list[int] | None, str]:
    if args.no_pin:
        return None, None, "none (--no-pin): every process floats over all cores"
    cores = sorted(os.sched_getaffinity(0))
    if shutil.which("taskset") is None or len(cores) < 2:
        return None, None, f"none ({len(cores)} core(s) available or no taskset): results include contention"
    proxy = parse_cores(args.proxy_cores) or [cores[-1]]
    load = parse_cores(args.load_cores) or [c for c in cores if c not in proxy][:1]
    desc = (f"proxy under test on core(s) {proxy}; load generator (wrk/h2load/curl) and upstream nginx share "
            f"core(s) {load}; direct runs put wrk and the upstream on {load} only")
    return proxy, load, desc


# --- targets ---------------------------------------------------------------------------------

def render_template(name: str, dest: Path, **values) -> Path:
    text = Template((HERE / "configs" / name).read_text()).substitute(**{k: str(v) for k, v in values.items()})
    dest.write_text(text)
    return dest


def make_docroot(tmp: Path, tcp_mib: int) -> Path:
    root = tmp / "www"
    root.mkdir()
    (root / "small").write_bytes(b"x" * (SMALL_BYTES - 1) + b"\n")
    (root / "16k").write_bytes(b"y" * (LARGE_BYTES - 1) + b"\n")
    with open(root / "big", "wb") as f:  # sparse: the page cache serves zeros, the wire carries them all
        f.truncate(tcp_mib * 1024 * 1024)
    for p in [tmp, root, *root.iterdir()]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return root


class Target:
    """One thing under test: how to start it, which port serves HTTP (and TCP), which pid to measure."""

    def __init__(self, name: str, http_port: int, tcp_port: int | None = None, host: str | None = None):
        self.name, self.http_port, self.tcp_port, self.host = name, http_port, tcp_port, host
        self.managed: procs.Managed | None = None
        self.tcp_note: str | None = None

    @property
    def pid(self) -> int | None:
        return self.managed.proc.pid if self.managed else None


def start_target(name: str, args, ps: ProcessSet, tmp: Path, upstream_port: int, proxy_cores) -> Target:
    pre = pin_prefix(proxy_cores)
    if name == "direct":
        return Target("direct", upstream_port, tcp_port=upstream_port)
    if name == "haproxy":
        port, tport = procs.free_port(), procs.free_port()
        cfg = render_template("haproxy.cfg.tmpl", tmp / "haproxy.cfg", port=port, tcp_port=tport,
                              upstream_port=upstream_port, http_reuse=args.http_reuse)
        t = Target(name, port, tport)
        t.managed = ps.start(name, pre + ["haproxy", "-db", "-f", str(cfg)], str(tmp / "haproxy.log"))
        procs.wait_port(port, proc=t.managed.proc)
        return t
    if name == "nginx":
        port = procs.free_port()
        cfg = render_template("nginx_proxy.conf.tmpl", tmp / "nginx-proxy.conf", prefix=tmp, port=port,
                              upstream_port=upstream_port)
        t = Target(name, port)
        t.managed = ps.start(name, pre + ["nginx", "-p", str(tmp), "-c", str(cfg)], str(tmp / "nginx-proxy.log"))
        procs.wait_port(port, proc=t.managed.proc)
        return t
    if name.startswith("meshproxy"):
        try:
            return _start_meshproxy(name, args, ps, tmp, upstream_port, pre, with_tcp=True)
        except RuntimeError as exc:
            if args.meshproxy_config:
                raise
            # the TCP listener may be what breaks it: measure HTTP without it rather than nothing
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "?"
            t = _start_meshproxy(name, args, ps, tmp, upstream_port, pre, with_tcp=False)
            t.tcp_note = f"meshproxy failed to start with the TCP listener config ({first}); HTTP measured without it"
            return t
    raise ValueError(name)


OTLP_SINK = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def ensure_otlp_sink(args, ps: ProcessSet, tmp: Path) -> str:
    """A throwaway OTLP/HTTP receiver (answers 200, discards) on the load cores, started once."""
    if getattr(args, "otlp_url", None):
        return args.otlp_url
    port = procs.free_port()
    _, load_cores, _ = plan_pinning(args)
    m = ps.start("otlp-sink", pin_prefix(load_cores) + [sys.executable, "-c", OTLP_SINK, str(port)],
                 str(tmp / "otlp-sink.log"))
    procs.wait_port(port, proc=m.proc)
    args.otlp_url = f"http://127.0.0.1:{port}/v1/traces"
    return args.otlp_url


def _start_meshproxy(name, args, ps: ProcessSet, tmp: Path, upstream_port: int, pre, with_tcp: bool) -> Target:
    port, tport, admin = procs.free_port(), procs.free_port(), procs.free_port()
    cfg_dir = tmp / f"mesh-{name}-{'tcp' if with_tcp else 'http'}"
    cfg_dir.mkdir()
    if name == "meshproxy-realistic":
        from lib import meshconfig
        (cfg_dir / "realistic.yaml").write_text(meshconfig.realistic(upstream_port, tport, with_tcp=with_tcp))
    elif args.meshproxy_config:
        src = Path(args.meshproxy_config)
        for f in ([src] if src.is_file() else sorted(src.iterdir())):
            text = f.read_text()
            if f.suffix == ".tmpl":
                text = Template(text).safe_substitute(upstream_port=upstream_port, tcp_port=tport)
            (cfg_dir / f.name.removesuffix(".tmpl")).write_text(text)
    else:
        render_template("meshproxy.yaml.tmpl", cfg_dir / "bench.yaml", upstream_port=upstream_port)
        if with_tcp:
            render_template("meshproxy-tcp.yaml.tmpl", cfg_dir / "bench-tcp.yaml", upstream_port=upstream_port,
                            tcp_port=tport)
    argv = pre + [args.meshproxy, "run", "--config", str(cfg_dir), "--listen", f"127.0.0.1:{port}",
                  "--admin", f"127.0.0.1:{admin}", "--workers", str(args.workers),
                  "--log-level", "WARNING", *args.meshproxy_arg]
    if name in args.variants:
        argv += [a.replace("$otlp_url", ensure_otlp_sink(args, ps, tmp)) for a in args.variants[name]]
    t = Target(name, port, tport if with_tcp else None, host=HOST)
    log_path = tmp / f"{name}-{'tcp' if with_tcp else 'http'}.log"
    t.managed = ps.start(name, argv, str(log_path))
    try:
        procs.wait_http_ok(f"http://127.0.0.1:{admin}/ready", timeout=30, proc=t.managed.proc)
    except Exception:
        ps.stop(t.managed)
        raise RuntimeError(f"{name} did not become ready; log tail:\n" + log_path.read_text(errors="replace")[-3000:])
    if with_tcp:
        try:
            procs.wait_port(tport, timeout=2)
        except TimeoutError:
            t.tcp_port = None
            t.tcp_note = "TCP listener (Sidecar egress bind+port) did not open its port"
    return t


def check_response(t: Target, path: str, size: int) -> None:
    req = urllib.request.Request(f"http://127.0.0.1:{t.http_port}{path}", headers={"Host": t.host} if t.host else {})
    with urllib.request.urlopen(req, timeout=5) as r:
        body = r.read()
        if r.status != 200 or len(body) != size:
            raise RuntimeError(f"{t.name}: GET {path} gave {r.status} with {len(body)} bytes, expected 200/{size}")


# --- measurements ----------------------------------------------------------------------------

def wrk_once(t: Target, path: str, args, load_pre) -> tuple[dict, str]:
    """One wrk run against ``t``, with the CPU its process tree spent meanwhile."""
    url = f"http://127.0.0.1:{t.http_port}{path}"
    cpu0, wall0 = (procs.tree_cpu_seconds(t.pid) if t.pid else 0.0), time.monotonic()
    res, cmd = loadgen.run_wrk(load_pre, url, conns=args.conns, threads=1, duration_s=args.duration, host=t.host)
    cpu1, wall1 = (procs.tree_cpu_seconds(t.pid) if t.pid else 0.0), time.monotonic()
    return {"rps": res.rps, "requests": res.requests, "errors": res.errors, "p50_us": res.p50_us,
            "p99_us": res.p99_us, "cpu_s": cpu1 - cpu0, "wall_s": wall1 - wall0,
            "cpu_us_per_req": report.cpu_us_per_request(cpu1 - cpu0, res.requests) if t.pid else None,
            "cpu_busy": (cpu1 - cpu0) / (wall1 - wall0) if t.pid else None}, cmd


def summarise_wrk(t: Target, path: str, runs: list[dict], cmd: str, notes: list[str]) -> dict:
    """The median run of ``runs``, whole (its CPU belongs to its request count), with all req/s."""
    runs = sorted(runs, key=lambda r: r["rps"])
    out = dict(runs[len(runs) // 2])
    out["all_rps"] = [round(r["rps"]) for r in runs]
    out["errors"] = sum(r["errors"] for r in runs)
    out["command"] = cmd
    if out["errors"]:
        notes.append(f"{t.name} {path}: {out['errors']} wrk errors (connect/read/write/timeout/non-2xx)")
    return out


def measure_interleaved(started: dict, path: str, args, load_pre, notes: list[str]) -> dict:
    """The throughput runs of every target for ``path``, round by round: round k runs each
    target once, in the order given, so a change of the machine's speed over the minutes of a
    benchmark (seen on this VM: HAProxy 72k -> 82k req/s between two runs an hour apart)
    reaches every target alike instead of favouring whichever ran in the faster minutes."""
    runs: dict[str, list[dict]] = {name: [] for name in started}
    cmds: dict[str, str] = {}
    for k in range(args.repeat):
        for name, t in started.items():
            run_, cmds[name] = wrk_once(t, path, args, load_pre)
            runs[name].append(run_)
            print(f"   {path} round {k + 1}: {name} {run_['rps']:.0f} req/s, cpu {run_['cpu_us_per_req']} us/req",
                  flush=True)
    return {name: summarise_wrk(started[name], path, runs[name], cmds[name], notes) for name in started}


def measure_rate_interleaved(started: dict, args, load_pre, tmp: Path, notes: list[str], proxy_cores) -> dict:
    """The fixed-rate latency runs of every target, in rounds like the throughput runs.
    One 10 s window per target moved by more than the 100 us target between runs on this VM
    (and with every target at once: nginx and meshproxy both +30 us in one window), so each
    target's p50 and p99 are the medians over its rounds; the row's other figures (CPU, the
    achieved rate) are those of the run with the median p50, and every round's p50 / p99 is
    kept in ``all_p50_us`` / ``all_p99_us``."""
    runs: dict[str, list[dict]] = {name: [] for name in started}
    for k in range(args.rate_repeat):
        for name, t in started.items():
            run_ = measure_rate(t, args, load_pre, tmp, notes, proxy_cores)
            runs[name].append(run_)
            print(f"   latency round {k + 1}: {name} {run_['achieved_rps']:.0f} req/s, p50 {run_['p50_us']:.0f} us "
                  f"p99 {run_['p99_us']:.0f} us", flush=True)
    out = {}
    for name, rs in runs.items():
        by_p50 = sorted(rs, key=lambda r: r["p50_us"])
        row = dict(by_p50[len(rs) // 2])
        row["p99_us"] = sorted(r["p99_us"] for r in rs)[len(rs) // 2]
        row["all_p50_us"] = [round(r["p50_us"]) for r in rs]
        row["all_p99_us"] = [round(r["p99_us"]) for r in rs]
        row["errors"] = sum(r["errors"] for r in rs)
        out[name] = row
    return out


def proxy_capacity(args, proxy_cores, name: str) -> int:
    """How many cores the target can keep busy: its processes (workers) capped by its pinned cores."""
    procs_ = args.workers if name.startswith("meshproxy") else 1
    cores = len(proxy_cores) if proxy_cores else (os.cpu_count() or 1)
    return max(1, min(procs_, cores))


def measure_low_rate(t: Target, args, load_pre, tmp: Path) -> dict:
    """Latency with the target nearly idle: one connection at --low-rate req/s."""
    res, cmd = loadgen.run_h2load_rate(load_pre, f"http://127.0.0.1:{t.http_port}/small", rate=args.low_rate,
                                       conns=1, duration_s=args.rate_duration, warmup_s=args.rate_warmup,
                                       host=t.host, log_path=str(tmp / f"h2load-low-{t.name}.log"))
    return {"target_rps": res.target_rps, "achieved_rps": res.achieved_rps, "requests": res.requests,
            "errors": res.failed, "p50_us": res.p50_us, "p90_us": res.p90_us, "p99_us": res.p99_us,
            "max_us": res.max_us, "command": cmd}


def measure_rate(t: Target, args, load_pre, tmp: Path, notes: list[str], proxy_cores) -> dict:
    url = f"http://127.0.0.1:{t.http_port}/small"
    log = str(tmp / f"h2load-{t.name}.log")
    cpu0, wall0 = (procs.tree_cpu_seconds(t.pid) if t.pid else 0.0), time.monotonic()
    res, cmd = loadgen.run_h2load_rate(load_pre, url, rate=args.rate, conns=args.rate_conns,
                                       duration_s=args.rate_duration, warmup_s=args.rate_warmup,
                                       host=t.host, log_path=log)
    cpu1, wall1 = (procs.tree_cpu_seconds(t.pid) if t.pid else 0.0), time.monotonic()
    # wall includes h2load's warm-up and start-up, so this under-states how busy the proxy was
    busy = (cpu1 - cpu0) / (wall1 - wall0) if t.pid else None
    total_requests = res.requests  # logged requests = measured phase (warm-up is not logged)
    out = {"target_rps": res.target_rps, "achieved_rps": res.achieved_rps, "requests": res.requests,
           "errors": res.failed, "p50_us": res.p50_us, "p90_us": res.p90_us, "p99_us": res.p99_us,
           "p999_us": res.p999_us, "max_us": res.max_us, "command": cmd,
           "max_lag_us": res.max_lag_us, "corrected_p99_us": res.corrected_p99_us,
           "cpu_us_per_req": report.cpu_us_per_request(cpu1 - cpu0, total_requests) if t.pid else None,
           "cpu_busy": busy}
    if busy is not None and out["cpu_us_per_req"] and \
            out["cpu_us_per_req"] * res.target_rps / 1e6 > 0.9 * proxy_capacity(args, proxy_cores, t.name):
        notes.append(f"{t.name}: at {res.target_rps} req/s it costs {out['cpu_us_per_req']:.0f} us CPU per request, i.e. "
                     f"{out['cpu_us_per_req'] * res.target_rps / 1e6:.0%} of a core: the fixed rate is at or past its "
                     f"capacity, so its latency there is mostly queueing")
    if res.max_lag_us > 20_000:
        notes.append(f"{t.name}: at the fixed rate a connection's sends fell up to {res.max_lag_us / 1000:.0f} ms "
                     f"behind its schedule (target or load generator stalled); timed from when each request was "
                     f"due, p99 would be {res.corrected_p99_us:.0f} us instead of {res.p99_us:.0f} us")
    if res.achieved_rps < 0.95 * res.target_rps:
        notes.append(f"{t.name}: fixed-rate run reached only {res.achieved_rps:.0f} of {res.target_rps} req/s "
                     f"(latency figures are then not at the intended load)")
    if res.failed:
        notes.append(f"{t.name}: {res.failed} failed requests in the fixed-rate run")
    return out


def measure_tcp(t: Target, args, load_pre, notes: list[str]) -> dict | None:
    if t.tcp_port is None:
        return None
    url = f"http://127.0.0.1:{t.tcp_port}/big"
    speeds, cpu_per_gib = [], []
    for _ in range(args.tcp_repeat):
        cpu0 = procs.tree_cpu_seconds(t.pid) if t.pid else 0.0
        argv = load_pre + ["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{size_download} %{time_total}", url]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        cpu1 = procs.tree_cpu_seconds(t.pid) if t.pid else 0.0
        if out.returncode != 0:
            notes.append(f"{t.name}: TCP download failed: {out.stderr.strip()}")
            return None
        size, secs = out.stdout.split()
        size, secs = int(size), float(secs)
        if size != args.tcp_mib * 1024 * 1024:
            notes.append(f"{t.name}: TCP download got {size} bytes, expected {args.tcp_mib} MiB")
            return None
        speeds.append(size / secs / (1024 * 1024))
        cpu_per_gib.append((cpu1 - cpu0) / (size / 2**30))
    return {"mib_per_s": report.median(speeds), "all_mib_per_s": [round(s) for s in speeds],
            "cpu_s_per_gib": report.median(cpu_per_gib) if t.pid else None,
            "command": " ".join(shlex.quote(a) for a in argv),
            "note": "plain TCP relay of an HTTP download" if t.name != "direct" else "curl straight to the upstream"}


def measure_rss(t: Target, workers_hint: int) -> dict | None:
    if not t.pid:
        return None
    tree = procs.tree_rss_kib(t.pid)  # the started process first, then its descendants
    rss = [kib for _, kib in tree]
    # per worker: the children when the started process is a master with workers, else itself
    workers = rss[1:] if len(rss) > 1 else rss
    return {"total_mib": sum(rss) / 1024, "max_worker_mib": max(workers) / 1024 if workers else None,
            "master_mib": rss[0] / 1024 if len(rss) > 1 else None,
            "processes": len(tree), "per_process_mib": [round(k / 1024, 1) for k in rss]}


def measure_syscalls(t: Target, args, load_pre, tmp: Path) -> dict:
    from lib import syscalls

    def load() -> int:
        res, _ = loadgen.run_wrk(load_pre, f"http://127.0.0.1:{t.http_port}/small", conns=args.conns, threads=1,
                                 duration_s=2, host=t.host)
        return res.requests

    counts, requests = syscalls.trace(procs.process_tree(t.pid), str(tmp / f"strace-{t.name}.txt"), load)
    out = syscalls.per_request(counts, requests)
    out["requests"] = requests
    return out


def profile_meshproxy(t: Target, args, load_pre, tmp: Path, name: str) -> str:
    out_dir = Path(args.profile_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    py_spy = str(REPO / ".venv" / "bin" / "py-spy")
    dur = max(3, round(args.duration))
    speedscope = out_dir / f"{name}-{stamp}.speedscope.json"
    raw = tmp / "pyspy.raw"
    # --native (C frames: the compiled hot path's functions) needs py-spy to pause the process per sample
    native = ["--native"] if args.profile_native else ["--nonblocking"]
    # speedscope for people, raw (collapsed stacks) for the summary below: two sampled runs
    results = []
    for fmt_, path in (("speedscope", speedscope), ("raw", raw)):
        spy = subprocess.Popen([py_spy, "record", "--pid", str(t.pid), "--subprocesses", "--rate", "200",
                                "--duration", str(dur), "--format", fmt_, "-o", str(path), *native],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            time.sleep(0.5)
            res, _ = loadgen.run_wrk(load_pre, f"http://127.0.0.1:{t.http_port}/small", conns=args.conns,
                                     threads=1, duration_s=dur, host=t.host)
            results.append(res.rps)
            spy.wait(timeout=dur + 30)
        finally:
            if spy.poll() is None:
                os.killpg(spy.pid, signal.SIGKILL)
                spy.wait()
    if not raw.exists():
        return f"py-spy produced no output ({spy.stderr.read().decode(errors='replace')[-500:] if spy.stderr else ''})"
    from lib import profile_summary
    summary = profile_summary.summarize(raw.read_text(), top=20)
    text = (f"Sampled with `py-spy record --rate 200 --subprocesses {native[0]}` during "
            f"{dur} s of `wrk -c{args.conns}` on /small (req/s while sampled: "
            f"{', '.join(f'{r:.0f}' for r in results)}). Speedscope file: "
            f"`{os.path.relpath(speedscope, REPO)}` (open in speedscope.app).\n\n" + summary)
    if shutil.which("perf"):
        # py-spy reads Python frames only: with the compiled hot path it sees the event loop and
        # nothing under it.  perf samples the CPU (kernel, libpython, llhttp, compiled modules).
        text += "\n" + perf_profile(t, args, load_pre, tmp, dur)
    (out_dir / f"{name}-{stamp}.top.md").write_text(text)
    return text


def perf_profile(t: Target, args, load_pre, tmp: Path, dur: int) -> str:
    data = tmp / "perf.data"
    rec = subprocess.Popen(["perf", "record", "-F", "999", "-p", str(t.pid), "-o", str(data), "--",
                            "sleep", str(dur)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           start_new_session=True)
    try:
        time.sleep(0.5)
        res, _ = loadgen.run_wrk(load_pre, f"http://127.0.0.1:{t.http_port}/small", conns=args.conns,
                                 threads=1, duration_s=dur, host=t.host)
        rec.wait(timeout=dur + 30)
    finally:
        if rec.poll() is None:
            os.killpg(rec.pid, signal.SIGKILL)
            rec.wait()
    if rec.returncode != 0 or not data.exists():
        err = rec.stderr.read().decode(errors="replace")[-300:] if rec.stderr else ""
        return f"perf record failed (rc {rec.returncode}): {err}\n"
    from lib import perf_summary
    return (f"Sampled with `perf record -F 999 -p PID` during {dur} s of `wrk -c{args.conns}` on /small "
            f"(req/s while sampled: {res.rps:.0f}), the CPU seen whole:\n\n" + perf_summary.summarize(str(data)))


# --- main ------------------------------------------------------------------------------------

def _not_measured(name: str, exc: Exception, notes: list[str]) -> None:
    notes.append(f"{name}: not measured: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")
    print(f"   FAILED: {exc}", file=sys.stderr, flush=True)


def measure_group(group: list[str], args, ps: ProcessSet, tmp: Path, upstream_port: int, proxy_cores, load_pre,
                  results: dict) -> None:
    """Start the targets of ``group``, run their small-response rounds, then measure the rest
    target by target, stopping each when it is done."""
    notes = results["notes"]
    started: dict[str, Target] = {}
    for name in group:
        print(f"== starting {name}", flush=True)
        t = None
        try:
            t = start_target(name, args, ps, tmp, upstream_port, proxy_cores)
            check_response(t, "/small", SMALL_BYTES)
            check_response(t, "/16k", LARGE_BYTES)
            # warm-up: connections, upstream pools, caches
            loadgen.run_wrk(load_pre, f"http://127.0.0.1:{t.http_port}/small", conns=args.conns, threads=1,
                            duration_s=1, host=t.host)
            started[name] = t
        except (Interrupted, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - one broken target must not sink the others
            _not_measured(name, exc, notes)
            if t is not None and t.managed is not None:
                ps.stop(t.managed)
    print(f"== small responses{', interleaved' if len(started) > 1 else ''}", flush=True)
    small = measure_interleaved(started, "/small", args, load_pre, notes) if started else {}
    print(f"== 16 KiB responses{', interleaved' if len(started) > 1 else ''}", flush=True)
    large = measure_interleaved(started, "/16k", args, load_pre, notes) if started else {}
    print(f"== latency at {args.rate} req/s{', interleaved' if len(started) > 1 else ''}", flush=True)
    at_rate = measure_rate_interleaved(started, args, load_pre, tmp, notes, proxy_cores) if started else {}
    for name, t in started.items():
        print(f"== {name}", flush=True)
        try:
            r: dict = {"http_small": small[name]}
            print(f"   small: {r['http_small']['rps']:.0f} req/s, cpu {r['http_small']['cpu_us_per_req']} us/req", flush=True)
            busy = r["http_small"].get("cpu_busy")
            if busy is not None and busy < 0.9 * proxy_capacity(args, proxy_cores, name):
                notes.append(f"{name}: its CPU was only {busy:.0%} busy during the small-response run, so the "
                             f"bottleneck was elsewhere (the load core running wrk + upstream, or other processes "
                             f"on its own core): its req/s is a lower bound; compare CPU us/req")
            r["http_16k"] = large[name]
            print(f"   16k:   {r['http_16k']['rps']:.0f} req/s", flush=True)
            r["rate"] = at_rate[name]
            print(f"   rate {r['rate']['achieved_rps']:.0f} req/s: p50 {r['rate']['p50_us']:.0f} us "
                  f"p99 {r['rate']['p99_us']:.0f} us (medians of {r['rate']['all_p50_us']} / "
                  f"{r['rate']['all_p99_us']})", flush=True)
            if args.low_rate:
                r["rate_low"] = measure_low_rate(t, args, load_pre, tmp)
                print(f"   low rate {r['rate_low']['achieved_rps']:.0f} req/s: p50 {r['rate_low']['p50_us']:.0f} us "
                      f"p99 {r['rate_low']['p99_us']:.0f} us", flush=True)
            r["rss"] = measure_rss(t, args.workers)
            if name in ("direct", "haproxy") or name.startswith("meshproxy"):
                r["tcp"] = measure_tcp(t, args, load_pre, notes)
                if t.tcp_note:
                    notes.append(f"{name}: {t.tcp_note}")
                if r["tcp"] is None:
                    r["tcp_note"] = t.tcp_note or ("TCP listener not available" if name.startswith("meshproxy")
                                                   else "failed")
                    notes.append(f"{name}: TCP throughput not measured ({r['tcp_note']})")
                else:
                    print(f"   tcp: {r['tcp']['mib_per_s']:.0f} MiB/s", flush=True)
            if args.syscalls and t.pid:
                r["syscalls"] = measure_syscalls(t, args, load_pre, tmp)
            if name.startswith("meshproxy") and args.profile:
                results.setdefault("profiles", {})[name] = profile_meshproxy(t, args, load_pre, tmp, name)
            results["targets"][name] = r
        except (Interrupted, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - one broken target must not sink the others
            _not_measured(name, exc, notes)
        finally:
            if t.managed is not None:
                ps.stop(t.managed)


def run(args, ps: ProcessSet, tmp: Path) -> dict:
    proxy_cores, load_cores, pin_desc = plan_pinning(args)
    load_pre = pin_prefix(load_cores)
    root = make_docroot(tmp, args.tcp_mib)
    upstream_port = procs.free_port()
    conf = render_template("upstream_nginx.conf.tmpl", tmp / "upstream.conf", prefix=tmp, port=upstream_port,
                           docroot=root)
    up = ps.start("upstream", load_pre + ["nginx", "-p", str(tmp), "-c", str(conf)], str(tmp / "upstream.log"))
    procs.wait_port(upstream_port, proc=up.proc)

    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(shlex.quote(a) for a in [".venv/bin/python", "benchmarks/run.py", *sys.argv[1:]]),
        "nproc": os.cpu_count(), "cpu_model": cpu_model(), "kernel": platform.release(),
        "loadavg_start": loadavg(), "pinning": pin_desc, "versions": versions(args),
        "wrk_threads": 1, "conns": args.conns, "duration_s": args.duration, "repeat": args.repeat,
        "rate": args.rate, "rate_conns": args.rate_conns, "low_rate": args.low_rate, "rate_duration_s": args.rate_duration,
        "rate_repeat": args.rate_repeat,
        "small_bytes": SMALL_BYTES, "large_bytes": LARGE_BYTES, "tcp_mib": args.tcp_mib, "tcp_repeat": args.tcp_repeat,
        "label": args.label or ("quick run" if args.quick else None), "meshproxy_workers": args.workers,
        "sequential": args.sequential,
    }
    results: dict = {"meta": meta, "targets": {}, "notes": []}
    # By default every target is started and warmed up first and stays up (idle, on the proxy
    # core) until its turn for the other measurements, while the small-response runs go round
    # the targets; --sequential measures one target at a time from start to stop.
    for group in ([[name] for name in args.targets] if args.sequential else [args.targets]):
        measure_group(group, args, ps, tmp, upstream_port, proxy_cores, load_pre, results)
    meta["loadavg_end"] = loadavg()
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    for tool in ("nginx", "wrk", "h2load", "curl"):
        if shutil.which(tool) is None:
            print(f"benchmarks/run.py: {tool} is not installed", file=sys.stderr)
            return 2
    ps = ProcessSet()
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    tmp = Path(tempfile.mkdtemp(prefix="meshbench-"))
    try:
        results = run(args, ps, tmp)
    except (Interrupted, KeyboardInterrupt) as exc:
        print(f"interrupted ({exc}); stopping everything", file=sys.stderr)
        return 130
    finally:
        ps.stop_all()
        for s, h in old.items():
            signal.signal(s, h)
        if args.keep_tmp:
            print(f"temp dir kept: {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    block = report.render(results)
    print()
    print(block)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    if args.out:
        out = Path(args.out)
        existing = out.read_text() if out.exists() else None
        out.write_text(report.update_results_file(existing, block))
        print(f"wrote {out}", file=sys.stderr)
    missing = [n for n in args.targets if n not in results["targets"]]
    if missing:
        print(f"not measured: {', '.join(missing)} (see the notes)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
