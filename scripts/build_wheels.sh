#!/usr/bin/env bash
# Build meshproxy's wheel (hot path compiled when a C compiler is present) and, unless
# --no-deps is given, the wheels of everything it needs, into DIR.  Used by the Dockerfile.
#   scripts/build_wheels.sh DIR [--no-deps]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: build_wheels.sh DIR [--no-deps]}
shift
mkdir -p "$out"
rm -rf build/lib.* build/bdist.*          # a clean wheel: only what setup.py builds now
python3 -m pip wheel --quiet --wheel-dir "$out" "$@" .
ls "$out"/meshproxy-*.whl
