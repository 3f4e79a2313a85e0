#!/bin/bash
# cython_exp/alternate.sh ROUNDS VARIANT...   (variant "pure" = no .so) -- pipeline_bench us/request, alternated
# BENCH_ARGS="" for the browser-like request (default: --wrk-request)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
rounds=$1; shift
for r in $(seq "$rounds"); do
  for v in "$@"; do
    if [ "$v" = pure ]; then cython_exp/variant.sh pure >/dev/null; else cython_exp/variant.sh use "$v" >/dev/null; fi
    echo "$v: $(.venv/bin/python benchmarks/pipeline_bench.py ${BENCH_ARGS---wrk-request} | cut -d' ' -f1)"
  done
done
