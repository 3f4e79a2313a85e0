"""wrk (closed-loop throughput) and h2load (fixed request rate latency) runners and parsers.

Throughput: ``wrk -c 50`` keeps 50 keep-alive connections busy; requests/s is what the target
sustains with the load generator on its own core(s).

Fixed-rate latency: wrk (4.x, not wrk2) cannot hold a request rate, and ``h2load -r`` is a rate of
*new connections*, not of requests. ``h2load --h1 -c 1 --rps R`` gives a keep-alive connection a
request timer (R requests/s); C such h2load processes give C*R in total, and ``--log-file`` writes
every request's latency, from which p50/p99 are computed exactly here.
"""
from __future__ import annotations

import math
import re
import subprocess
import time
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
    # h2load sends a request late when its connection is still busy, and times it from the late
    # send (coordinated omission). The schedule is i/rate from the first request; lag is how far
    # behind it the sends fell, and the corrected p99 times each request from its scheduled start.
    max_lag_us: float = 0.0
    corrected_p99_us: float = math.nan


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile (the smallest value with at least pct% of values <= it)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def _rows(text: str) -> list[tuple[int, int, int]]:
    rows = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            rows.append((int(parts[0]), int(parts[1]), int(parts[2])))
    rows.sort()
    return rows


def parse_h2load_log(texts: str | list[str], target_rps: int) -> RateResult:
    """h2load --log-file rows (start in us since epoch, status, latency in us), one log per connection.

    Each log is one connection sending every ``len(texts) / target_rps`` seconds; its schedule is
    anchored where it ran earliest (h2load never sends ahead of it), which gives each request's lag
    and its latency timed from when it was due.
    """
    if isinstance(texts, str):
        texts = [texts]
    per_conn = [r for r in (_rows(t) for t in texts) if r]
    if not per_conn:
        raise ValueError("h2load log is empty")
    period = 1e6 * len(texts) / target_rps
    rows, corrected, lag = [], [], 0.0
    for conn_rows in per_conn:
        offsets = [start - i * period for i, (start, _, _) in enumerate(conn_rows)]
        origin = min(offsets)
        lag = max(lag, max(offsets) - origin)
        corrected += [max(float(latency), start + latency - (origin + i * period))
                      for i, (start, status, latency) in enumerate(conn_rows) if status > 0]
        rows += conn_rows
    rows.sort()
    corrected.sort()
    failed = sum(1 for _, status, _ in rows if status < 0 or status >= 400)
    lat = sorted(float(r[2]) for r in rows if r[1] > 0)
    span_us = max(s + l for s, _, l in rows) - rows[0][0]
    achieved = len(rows) / (span_us / 1e6) if span_us > 0 else 0.0
    return RateResult(target_rps=target_rps, achieved_rps=achieved, requests=len(rows), failed=failed,
                      p50_us=percentile(lat, 50), p90_us=percentile(lat, 90), p99_us=percentile(lat, 99),
                      p999_us=percentile(lat, 99.9), max_us=lat[-1] if lat else math.nan,
                      max_lag_us=lag, corrected_p99_us=percentile(corrected, 99))


def h2load_argv(url: str, *, rps: int, duration_s: float, warmup_s: float, host: str | None,
                log_path: str) -> list[str]:
    """One h2load, one keep-alive connection, ``rps`` requests/s on it."""
    argv = ["h2load", "--h1", "-t", "1", "-c", "1", "-m", "1", "--rps", str(rps),
            "-D", str(max(1, round(duration_s))), "--warm-up-time", str(max(1, round(warmup_s))),
            "--log-file", log_path]
    if host:  # `-H host: X` would send a second Host header; :authority replaces the first
        argv += ["-H", f":authority: {host}"]
    return argv + [url]


def run_h2load_rate(prefix: list[str], url: str, *, rate: int, conns: int, duration_s: float, warmup_s: float,
                    host: str | None, log_path: str) -> tuple[RateResult, str]:
    """``conns`` h2load processes of one connection each, ``rate / conns`` req/s each.

    Not one h2load with ``-c conns``: its connections' timers start together and fire in lock-step
    bursts. Separate processes start at unrelated moments (and are staggered by a fraction of the
    period), so their sends interleave; and each log holds one connection, whose schedule is known.
    """
    if rate % conns:
        raise ValueError(f"rate {rate} must divide evenly over {conns} connections")
    per = rate // conns
    logs = [f"{log_path}.{i}" for i in range(conns)]
    procs_, argv = [], []
    try:
        for i, log in enumerate(logs):
            Path(log).unlink(missing_ok=True)  # h2load appends to an existing log file
            argv = prefix + h2load_argv(url, rps=per, duration_s=duration_s, warmup_s=warmup_s, host=host,
                                        log_path=log)
            procs_.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            time.sleep(1.0 / per / conns)
        for p in procs_:
            out, _ = p.communicate(timeout=duration_s + warmup_s + 20)
            if p.returncode != 0:
                raise RuntimeError(f"h2load failed ({p.returncode}): {out[-500:]}")
    finally:
        for p in procs_:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = [Path(log).read_text() for log in logs]
    cmd = f"{conns} x [{' '.join(argv).replace(logs[-1], log_path + '.N')}] started {1e6 / per / conns:.0f} us apart"
    return parse_h2load_log(texts, rate), cmd
