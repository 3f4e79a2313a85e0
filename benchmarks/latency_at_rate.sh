#!/bin/bash
# Latency and CPU per request of the request path at a fixed rate: one in-process worker
# (benchmarks/lib/inproc_worker.py, hand-built snapshot) on core 1 in front of nginx on
# 127.0.0.1:18080 (core 0); 10 h2load processes of one keep-alive connection at 1000 req/s
# each (10k req/s, as run.py's latency load) on core 0 for 6 s.  Prints p50/p90/p99 (us,
# h2load's per-request log) and the worker's user/sys CPU per request.
# Needs: nginx serving on 127.0.0.1:18080 (see benchmarks/README.md). Arg: 1 = tracing on.
# A/B: PYTHONPATH=/path/to/other/checkout benchmarks/latency_at_rate.sh 1
set -u
cd "$(dirname "$0")/.."
taskset -c 1 .venv/bin/python benchmarks/lib/inproc_worker.py 18080 18001 "${1:-1}" > /tmp/latency_at_rate.log 2>&1 &
PID=$!
sleep 1.2
taskset -c 0 wrk -t1 -c10 -d1s -H 'Host: bench.local' http://127.0.0.1:18001/ >/dev/null 2>&1
T=$(mktemp -d)
read -r u1 s1 < <(awk '{print $14, $15}' /proc/$PID/stat)
P=""
for i in 0 1 2 3 4 5 6 7 8 9; do
  timeout 30 taskset -c 0 h2load --h1 -c1 -t1 -m1 --rps 1000 -D 6 --warm-up-time 1 \
    -H ':authority: bench.local' --log-file "$T/l$i" http://127.0.0.1:18001/ > /dev/null 2>&1 &
  P="$P $!"
  sleep 0.0003$i     # start at unrelated moments, as run.py does
done
wait $P
read -r u2 s2 < <(awk '{print $14, $15}' /proc/$PID/stat)
kill $PID; wait $PID 2>/dev/null
.venv/bin/python - "$T" "$u1" "$s1" "$u2" "$s2" "$(getconf CLK_TCK)" <<'PY'
import glob
import sys
sys.path.insert(0, "benchmarks/lib")
from loadgen import parse_h2load_log
logs, u1, s1, u2, s2, tck = sys.argv[1], *map(int, sys.argv[2:])
r = parse_h2load_log([open(f).read() for f in sorted(glob.glob(logs + "/l*"))], 10000)
per = 1e6 / tck / r.requests
print(f"achieved {r.achieved_rps:.0f} req/s  p50 {r.p50_us:.0f}  p90 {r.p90_us:.0f}  p99 {r.p99_us:.0f} us  "
      f"CPU user {(u2 - u1) * per:.1f}  sys {(s2 - s1) * per:.1f} us/req  failed {r.failed}")
PY
rm -rf "$T"
