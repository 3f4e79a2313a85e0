#!/bin/bash
# Quick CPU-per-request check of the request path: one in-process worker (hand-built
# snapshot, no YAML) on core 1 in front of nginx on 127.0.0.1:18080 (core 0), wrk on core 0.
# Needs: nginx serving on 127.0.0.1:18080 (see benchmarks/README.md). Arg: 1 = tracing on.
# usage: perf_run.sh TRACE(0/1)  -> prints req/s and user/sys us per request of the proxy
cd "$(dirname "$0")/.."
taskset -c 1 .venv/bin/python benchmarks/lib/inproc_worker.py 18080 18001 $1 > /tmp/pw.log 2>&1 &
PID=$!
sleep 1
taskset -c 0 wrk -t1 -c50 -d2s -H 'Host: bench.local' http://127.0.0.1:18001/ >/dev/null 2>&1
read u1 s1 < <(awk '{print $14, $15}' /proc/$PID/stat)
OUT=$(taskset -c 0 wrk -t1 -c50 -d6s -H 'Host: bench.local' http://127.0.0.1:18001/ 2>&1)
read u2 s2 < <(awk '{print $14, $15}' /proc/$PID/stat)
N=$(echo "$OUT" | awk '/requests in/ {print $1}')
RPS=$(echo "$OUT" | awk '/Requests\/sec/ {print $2}')
TCK=$(getconf CLK_TCK)
python3 -c "u=($u2-$u1)/$TCK*1e6/$N; s=($s2-$s1)/$TCK*1e6/$N; print(f'rps={$RPS} user={u:.1f}us sys={s:.1f}us total={u+s:.1f}us/req')"
kill $PID
