#!/bin/bash
# The floor vs meshproxy vs HAProxy, alternately, same upstream and load:
#   benchmarks/floor.sh [ROUNDS] [TRACE]
# Starts its own nginx upstream (core 0) and runs, one at a time on core 1: benchmarks/floor_proxy.py
# (uvloop + httptools forwarding raw bytes, nothing else), meshproxy's in-process worker
# (benchmarks/lib/inproc_worker.py: real Worker, hand-built snapshot, trace propagation off, or on
# with TRACE=1, as `meshproxy run` by default) and
# HAProxy (nbthread 1, http-reuse always). wrk -t1 -c50 on core 0; CPU from /proc/PID/stat.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-2}
TRACE=${2:-0}
TMP=$(mktemp -d)
UP=18180; FLOOR=18181; MESH=18182; HAP=18183
cat > "$TMP/nginx.conf" <<NGX
worker_processes 1; daemon on; pid $TMP/nginx.pid; error_log $TMP/error.log;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$UP; location / { return 200 "$(printf 'x%.0s' $(seq 100))"; } } }
NGX
cat > "$TMP/haproxy.cfg" <<HAP
global
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend f
  bind 127.0.0.1:$HAP
  default_backend b
backend b
  server s1 127.0.0.1:$UP
HAP
taskset -c 0 nginx -c "$TMP/nginx.conf" -p "$TMP"
trap 'kill $(cat "$TMP/nginx.pid") 2>/dev/null; rm -rf "$TMP"' EXIT
sleep 0.5

measure() {  # NAME PORT CMD...
    local name=$1 port=$2; shift 2
    taskset -c 1 "$@" > "$TMP/$name.log" 2>&1 &
    local pid=$!
    sleep 1.5
    timeout 30 taskset -c 0 wrk -t1 -c50 -d2s -H 'Host: bench.local' "http://127.0.0.1:$port/" > /dev/null 2>&1
    read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$pid/stat")
    local out; out=$(timeout 30 taskset -c 0 wrk -t1 -c50 -d5s -H 'Host: bench.local' "http://127.0.0.1:$port/" 2>&1)
    read -r u2 s2 < <(awk '{print $14, $15}' "/proc/$pid/stat")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    local n rps; n=$(echo "$out" | awk '/requests in/ {print $1}'); rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
    python3 -c "t=$(getconf CLK_TCK); u=($u2-$u1)/t*1e6/$n; s=($s2-$s1)/t*1e6/$n; print(f'{\"$name\":10s} {$rps:>9.0f} req/s  user {u:5.1f} us  sys {s:5.1f} us  total {u+s:5.1f} us per request')"
}

for _ in $(seq "$ROUNDS"); do
    measure floor "$FLOOR" .venv/bin/python benchmarks/floor_proxy.py "$UP" "$FLOOR"
    measure meshproxy "$MESH" .venv/bin/python benchmarks/lib/inproc_worker.py "$UP" "$MESH" "$TRACE"
    measure haproxy "$HAP" haproxy -f "$TMP/haproxy.cfg" -db
done
