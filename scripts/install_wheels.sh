#!/usr/bin/env bash
# Install the wheels in DIR (built by build_wheels.sh) with PYTHON, offline, and check that
# the installed proxy runs its compiled hot path.
#   scripts/install_wheels.sh DIR [PYTHON] [--no-deps]
set -euo pipefail
dir=${1:?usage: install_wheels.sh DIR [PYTHON] [--no-deps]}
python=${2:-python3}
shift $(( $# >= 2 ? 2 : 1 ))
"$python" -m pip install --quiet --no-cache-dir --no-index --find-links "$dir" "$@" "$dir"/meshproxy-*.whl
hot=$(cd / && "$python" -c 'import meshproxy; print(meshproxy.HOT_PATH)')
echo "meshproxy hot path: $hot"
[ "$hot" = compiled ] || { echo "install_wheels.sh: the installed meshproxy is not compiled ($hot)" >&2; exit 1; }
