#!/bin/bash
# cython_exp/variant.sh save NAME | use NAME | pure   -- keep built .so sets side by side
set -euo pipefail
cd "$(dirname "$0")/.."
store=cython_exp/build/variants
case "$1" in
  save) rm -rf "$store/$2"; mkdir -p "$store/$2"; find meshproxy -name '*.so' -exec cp --parents {} "$store/$2" \; ;;
  use)  find meshproxy -name '*.so' -delete; (cd "$store/$2" && find meshproxy -name '*.so' -exec cp --parents {} "$OLDPWD" \;) ;;
  pure) find meshproxy -name '*.so' -delete ;;
esac
find meshproxy -name '*.so' | wc -l
