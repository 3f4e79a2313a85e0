#!/bin/bash
# Instructions per proxied request (Python side only), counted by callgrind: the
# difference between two runs of pipeline_bench.py with different request counts,
# divided by the difference.  Repeats exactly on a busy VM where timings drift.
#   benchmarks/instructions_per_request.sh [pipeline_bench options, e.g. --trace]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONHASHSEED=0   # set and dict layouts, hence instruction counts, repeat exactly
count() {
    valgrind --tool=callgrind --callgrind-out-file=/dev/null .venv/bin/python benchmarks/pipeline_bench.py \
        --n "$1" "${@:2}" 2>&1 | grep -oP 'refs:\s+\K[\d,]+' | tr -d ,
}
a=$(count 500 "$@")
b=$(count 1500 "$@")
echo "instructions per proxied request: $(( (b - a) / 1000 )) (callgrind, pipeline_bench.py $*)"
