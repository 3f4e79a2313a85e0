"""wrk (closed-loop throughput) and h2load (fixed request rate latency) runners and parsers.

Throughput: ``wrk -c 50`` keeps 50 keep-alive connections busy; requests/s is what the target
sustains with the load generator on its own core(s).

Fixed-rate latency: wrk (4.x, not wrk2) cannot hold a request rate, and ``h2load -r`` is a rate of
*new connections*, not of requests. ``h2load --h1 -c C --rps R`` gives each of C keep-alive
connections its own request timer (R requests/s each, C*R in total), and ``--log-file`` writes
every request's latency, from which p50/p99 are computed exactly here.
"""
from __future__ import annotations

import math
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

LUA = str(Path(__file__).with_name("wrk_report.lua"))


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    bytes: int
    errors: int          # connect + read + write + timeout + non-2xx/3xx statuses
    p50_us: float
    p99_us: float
    mean_us: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0


_BENCH_RE = re.compile(r"^BENCH (.*)$", re.M)


def parse_wrk(stdout: str) -> WrkResult:
    m = _BENCH_RE.search(stdout)
    if not m:
        raise ValueError("wrk output has no BENCH line (was wrk_report.lua loaded?):\n" + stdout[-2000:])
    kv = dict(item.split("=", 1) for item in m.group(1).split())
    errors = sum(int(kv[k]) for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout"))
    return WrkResult(requests=int(kv["requests"]), duration_s=int(kv["duration_us"]) / 1e6, bytes=int(kv["bytes"]),
                     errors=errors, p50_us=float(kv["lat_p50_us"]), p99_us=float(kv["lat_p99_us"]),
                     mean_us=float(kv["lat_mean_us"]))


def wrk_argv(url: str, *, conns: int, threads: int, duration_s: float, host: str | None) -> list[str]:
    argv = ["wrk", "-t", str(threads), "-c", str(conns), "-d", f"{max(1, round(duration_s))}s",
            "--timeout", "5s", "-s", LUA]
    if host:
        argv += ["-H", f"Host: {host}"]
    return argv + [url]


def run_wrk(prefix: list[str], url: str, *, conns: int, threads: int, duration_s: float,
            host: str | None) -> tuple[WrkResult, str]:
    argv = prefix + wrk_argv(url, conns=conns, threads=threads, duration_s=duration_s, host=host)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip()}")
    return parse_wrk(out.stdout), " ".join(argv)


# --- h2load fixed rate -----------------------------------------------------------------------

@dataclass
class RateResult:
    target_rps: int
    achieved_rps: float   # requests completed / wall time of the measured phase (from the log)
    requests: int
    failed: int           # status -1 (stream failed) or >= 400
    p50_us: float
    p90_us: float
    p99_us: float
    p999_us: float
    max_us: float


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile (the smallest value with at least pct% of values <= it)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def parse_h2load_log(text: str, target_rps: int, skip_first_s: float = 0.0) -> RateResult:
    """h2load --log-file rows: start (us since epoch) TAB status TAB latency (us)."""
    rows = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        rows.append((int(parts[0]), int(parts[1]), int(parts[2])))
    if not rows:
        raise ValueError("h2load log is empty")
    rows.sort()
    t0 = rows[0][0] + int(skip_first_s * 1e6)
    rows = [r for r in rows if r[0] >= t0]
    failed = sum(1 for _, status, _ in rows if status < 0 or status >= 400)
    lat = sorted(float(r[2]) for r in rows if r[1] > 0)
    span_us = (rows[-1][0] + rows[-1][2]) - rows[0][0] if rows else 0
    achieved = len(rows) / (span_us / 1e6) if span_us > 0 else 0.0
    return RateResult(target_rps=target_rps, achieved_rps=achieved, requests=len(rows), failed=failed,
                      p50_us=percentile(lat, 50), p90_us=percentile(lat, 90), p99_us=percentile(lat, 99),
                      p999_us=percentile(lat, 99.9), max_us=lat[-1] if lat else math.nan)


def h2load_argv(url: str, *, rate: int, conns: int, duration_s: float, warmup_s: float, host: str | None,
                log_path: str) -> list[str]:
    if rate % conns:
        raise ValueError(f"rate {rate} must divide evenly over {conns} connections")
    argv = ["h2load", "--h1", "-t", "1", "-c", str(conns), "-m", "1", "--rps", str(rate // conns),
            "-D", str(max(1, round(duration_s))), "--warm-up-time", str(max(1, round(warmup_s))),
            "--log-file", log_path]
    if host:  # `-H host: X` would send a second Host header; :authority replaces the first
        argv += ["-H", f":authority: {host}"]
    return argv + [url]


def run_h2load_rate(prefix: list[str], url: str, *, rate: int, conns: int, duration_s: float, warmup_s: float,
                    host: str | None, log_path: str) -> tuple[RateResult, str]:
    Path(log_path).unlink(missing_ok=True)  # h2load appends to an existing log file
    argv = prefix + h2load_argv(url, rate=rate, conns=conns, duration_s=duration_s, warmup_s=warmup_s,
                                host=host, log_path=log_path)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + warmup_s + 20)
    if out.returncode != 0:
        raise RuntimeError(f"h2load failed ({out.returncode}): {out.stdout[-500:]} {out.stderr.strip()}")
    return parse_h2load_log(Path(log_path).read_text(), rate), " ".join(argv)
