"""The benchmark harness's parsing and ratio math, on captured sample output (no processes run)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from lib import loadgen, procs, profile_summary, report  # noqa: E402

WRK_OUT = """\
Running 1s test @ http://127.0.0.1:18777/
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   703.46us  274.42us   4.76ms   80.31%
    Req/Sec     2.66k    52.53     2.74k    70.00%
  2648 requests in 1.00s, 0.86MB read
Requests/sec:   2647.25
Transfer/sec:      0.86MB
BENCH requests=2648 duration_us=1000283 bytes=905771 err_connect=0 err_read=0 err_write=0 err_status=3 err_timeout=1 lat_p50_us=664.0 lat_p99_us=1341.0 lat_mean_us=703.5 lat_max_us=4756.0
"""


def test_parse_wrk_bench_line():
    r = loadgen.parse_wrk(WRK_OUT)
    assert r.requests == 2648
    assert r.rps == pytest.approx(2647.25, rel=1e-3)
    assert r.errors == 4
    assert (r.p50_us, r.p99_us) == (664.0, 1341.0)


def test_parse_wrk_without_script_line_is_an_error():
    with pytest.raises(ValueError):
        loadgen.parse_wrk(WRK_OUT.split("BENCH")[0])


def test_h2load_argv_one_connection_with_a_request_rate():
    argv = loadgen.h2load_argv("http://x/", rps=2500, duration_s=3, warmup_s=1, host="bench.local", log_path="/tmp/l")
    assert argv[argv.index("--rps") + 1] == "2500"  # --rps is per connection
    assert argv[argv.index("-c") + 1] == "1"
    assert "-r" not in argv  # -r is a rate of new connections, not of requests
    assert ":authority: bench.local" in argv  # `-H host:` would add a duplicate Host header
    with pytest.raises(ValueError):
        loadgen.run_h2load_rate([], "http://x/", rate=10_000, conns=3, duration_s=3, warmup_s=1, host=None,
                                log_path="l")


def test_parse_h2load_log_percentiles_rate_and_failures():
    # 100 requests, 1 ms apart: latencies 1..100 us; one failed stream (-1) and one 503
    rows = [f"{1_000_000 + i * 1000}\t200\t{i + 1}" for i in range(98)]
    rows += [f"{1_000_000 + 98 * 1000}\t-1\t5000", f"{1_000_000 + 99 * 1000}\t503\t100"]
    r = loadgen.parse_h2load_log("\n".join(rows) + "\n", target_rps=1000)
    assert r.requests == 100
    assert r.failed == 2
    assert r.p50_us == 50.0          # nearest rank over the 99 answered requests
    assert r.p99_us == 100.0
    assert r.achieved_rps == pytest.approx(100 / 0.103, rel=1e-3)  # until the last response ended


def test_h2load_schedule_lag_and_corrected_p99():
    # 1000 req/s: sends due every 1 ms; request 5 is held up 3 ms (the connection was busy)
    starts = [0, 1000, 2000, 3000, 4000, 8000, 8100, 8200, 8300, 9000]
    rows = [f"{1_000_000 + s}\t200\t50" for s in starts]
    r = loadgen.parse_h2load_log("\n".join(rows), target_rps=1000)
    assert r.max_lag_us == 3000
    assert r.p99_us == 50
    assert r.corrected_p99_us == 3050  # request 5 timed from when it was due
    # the same connection twice (two logs): 2000 req/s in total, each on its own schedule
    r2 = loadgen.parse_h2load_log(["\n".join(rows), "\n".join(rows)], target_rps=2000)
    assert r2.requests == 20 and r2.max_lag_us == 3000
    assert r.p99_us == 50
    assert r.corrected_p99_us == 3050  # request 5 timed from when it was due


def test_percentile_nearest_rank():
    vals = [float(v) for v in range(1, 101)]
    assert loadgen.percentile(vals, 50) == 50
    assert loadgen.percentile(vals, 99) == 99
    assert loadgen.percentile(vals, 100) == 100
    assert math.isnan(loadgen.percentile([], 50))


def test_proc_parsers():
    stat = "1234 (python3 (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 100 0 0"
    assert procs.parse_stat_cpu_ticks(stat) == 325  # utime 250 + stime 75, comm with spaces and parens
    assert procs.parse_vmrss_kib("Name:\tx\nVmRSS:\t   20480 kB\nVmSwap:\t0 kB\n") == 20480


def _results():
    def tgt(rps, rps16, p50, p99, cpu=None, rss=None, tcp=None):
        out = {"http_small": {"rps": rps, "cpu_us_per_req": cpu, "cpu_busy": 0.9, "errors": 0},
               "http_16k": {"rps": rps16, "cpu_us_per_req": cpu, "errors": 0},
               "rate": {"p50_us": p50, "p99_us": p99, "achieved_rps": 10000, "errors": 0},
               "rss": {"total_mib": rss, "max_worker_mib": rss} if rss else None}
        if tcp is not None:
            out["tcp"] = {"mib_per_s": tcp, "cpu_s_per_gib": 1.0}
        return out
    return {"meta": {"date": "2026-11-22 05:00 UTC", "command": "x", "nproc": 2, "cpu_model": "cpu",
                     "kernel": "k", "pinning": "p", "versions": "v", "wrk_threads": 1, "conns": 50,
                     "duration_s": 3, "repeat": 1, "rate": 10000, "rate_conns": 2, "rate_duration_s": 3,
                     "small_bytes": 100, "large_bytes": 16384, "tcp_mib": 256, "tcp_repeat": 2},
            "targets": {"direct": tgt(60000, 50000, 50, 200, tcp=1000),
                        "haproxy": tgt(40000, 30000, 150, 400, cpu=20.0, rss=10.0, tcp=800),
                        "meshproxy": tgt(30000, 27000, 180, 800, cpu=40.0, rss=30.0, tcp=300)},
            "notes": []}


def test_ratio_math_and_verdicts():
    assert report.ratio(30000, 40000) == 0.75
    assert report.ratio(1, 0) is None and report.ratio(None, 1) is None
    assert report.cpu_us_per_request(2.5, 100_000) == 25.0
    assert report.per_core(25.0) == 40000
    v = {row[0]: row for row in report.verdicts(_results())}
    assert v["req/s vs HAProxy (small, 50 conns)"][2] == "0.75x"
    assert v["req/s vs HAProxy (small, 50 conns)"][3].startswith("MISSED")
    assert v["req/s vs HAProxy (16 KiB, 50 conns)"][3] == "met"              # 0.90x
    assert v["added p50 over direct at fixed rate"][2] == "130 us"
    assert v["added p50 over direct at fixed rate"][3].startswith("MISSED")
    assert v["added p99 over direct at fixed rate"][2] == "600 us"
    assert v["CPU per request (small, saturated)"][3].startswith("MISSED")
    assert v["RSS per worker after the run"][3] == "met"
    assert v["TCP throughput vs HAProxy mode tcp"][2] == "0.38x"
    assert v["derived: req/s per busy core vs HAProxy (1/CPU per req)"][2] == "0.50x"


def test_unmeasured_target_says_so():
    res = _results()
    del res["targets"]["meshproxy"]["tcp"]
    v = {row[0]: row for row in report.verdicts(res)}
    assert v["TCP throughput vs HAProxy mode tcp"][3] == "NOT MEASURED"
    del res["targets"]["meshproxy"]
    assert report.verdicts(res)[0][2] == "not measured"


def test_render_and_update_keeps_surrounding_text():
    block = report.render(_results())
    assert "| meshproxy | 30000 | 0.75x | 0.50x |" in block
    assert block.startswith(report.BEGIN) and block.rstrip().endswith(report.END)
    first = report.update_results_file(None, block)
    assert first.startswith("# Benchmark results")
    edited = first.replace("# Benchmark results\n", "# Benchmark results\n\nHand-written intro.\n") + "\nTrailer.\n"
    again = report.update_results_file(edited, block.replace("30000", "31000"))
    assert "Hand-written intro." in again and again.rstrip().endswith("Trailer.")
    assert again.count(report.BEGIN) == 1 and "| meshproxy | 31000 |" in again


def test_profile_summary_from_collapsed_stacks():
    raw = ('process 7:"meshproxy run";thread (0x1);run (asyncio/runners.py:10);'
           'data_received (meshproxy/downstream/http_conn.py:50);on_header (meshproxy/codec/api.py:9) 30\n'
           'process 7:"meshproxy run";thread (0x1);run (asyncio/runners.py:10);'
           'data_received (meshproxy/downstream/http_conn.py:52) 70\n')
    text = profile_summary.summarize(raw)
    assert "100 samples" in text
    assert "| 70.0% | 70 | `data_received (http_conn.py)` |" in text
    assert "| 100.0% | 100 | `run (runners.py)` |" in text


def test_variant_cost_rows():
    res = _results()
    res["targets"]["meshproxy+trace100"] = {"http_small": {"rps": 27000, "cpu_us_per_req": 44.5},
                                            "rate": {"cpu_us_per_req": 50.0, "p50_us": 190, "p99_us": 900}}
    res["targets"]["meshproxy"]["rate"]["cpu_us_per_req"] = 45.0
    rows = report.variant_rows(res, ["meshproxy+trace100"])
    assert rows == [["meshproxy+trace100", "0.90x", "44.5 (+4.5)", "50.0 (+5.0)", "190 (+10) / 900 (+100)"]]
    assert "### Cost of each meshproxy variant" in report.render(res)


STRACE_C = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 68.28    0.002189         547      4000         2 writev
 10.54    0.000338           4      6000        32 read
  6.92    0.000222          17      2000           epoll_wait
------ ----------- ----------- --------- --------- ----------------
100.00    0.002749                 12000        34 total
"""


def test_strace_summary_per_request():
    from lib import syscalls
    counts = syscalls.parse_strace_c(STRACE_C)
    assert counts == {"writev": 4000, "read": 6000, "epoll_wait": 2000}
    per = syscalls.per_request(counts, 2000)
    assert per["total"] == 6.0
    assert per["top"][0] == ("read", 3.0)


@pytest.mark.parametrize("symbol, name", [
    ("__pyx_f_9meshproxy_5proxy_8pipeline_8Exchange_start", "meshproxy.proxy.pipeline.Exchange.start"),
    ("__pyx_pw_9meshproxy_9telemetry_7tracing_11ProxyTracer_3start", "meshproxy.telemetry.tracing.ProxyTracer.start"),
    ("__pyx_pw_9meshproxy_5codec_17httptools_backend_5_Base_5feed", "meshproxy.codec.httptools_backend._Base.feed"),
    ("__pyx_pw_9meshproxy_5proxy_8pipeline_8Exchange_1__init__", "meshproxy.proxy.pipeline.Exchange.__init__"),
    ("__pyx_f_9meshproxy_5codec_6writer__head", "meshproxy.codec.writer._head"),
    ("__pyx_tp_dealloc_9meshproxy_5proxy_8pipeline_Exchange", "meshproxy.proxy.pipeline.Exchange (dealloc)"),
    ("_PyObject_Malloc", "_PyObject_Malloc"),
])
def test_perf_summary_names_cython_symbols_as_python(symbol, name):
    from lib import perf_summary
    assert perf_summary.python_name(symbol) == name
