#!/usr/bin/env bash
# Sets up everything meshproxy needs on a fresh Debian machine with Python 3.11:
# system packages (peers and tools used by tests and benchmarks) and a venv at .venv.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PKGS="curl openssl nginx-light haproxy wrk nghttp2-client etcd-server prometheus iproute2 nftables util-linux kubectl chromium"
missing=""
for bin in curl openssl nginx haproxy wrk h2load etcd promtool ip nft setpriv kubectl chromium; do
  command -v "$bin" >/dev/null 2>&1 || missing="yes"
done
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $APT_PKGS >/dev/null
  # the Debian packages start system services; we run our own instances on loopback ports
  for svc in nginx haproxy etcd prometheus prometheus-node-exporter; do
    $SUDO systemctl disable --now "$svc" >/dev/null 2>&1 || $SUDO service "$svc" stop >/dev/null 2>&1 || true
  done
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if ! $PY -c 'import ensurepip, venv' >/dev/null 2>&1; then
    # Debian's system Python ships venv/ensurepip separately
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq python3-venv >/dev/null
  fi
  $PY -m venv .venv
fi
if ! .venv/bin/python -c 'import meshproxy, uvloop, httptools, h11, yaml, cython, cryptography, pytest_asyncio, pytest_timeout, playwright, opentelemetry.exporter.otlp.proto.http, kubernetes, dns.message' >/dev/null 2>&1; then
  .venv/bin/pip install -q --upgrade pip >/dev/null
  # the editable install skips setup.py's compile: build_ext.py below compiles in place
  MESHPROXY_NO_EXT=1 .venv/bin/pip install -q -e '.[test]'
fi

# The compiled hot path (Cython, in place; ~50 s the first time, then only what changed).
# It needs a C compiler and the headers of the venv's Python; without them meshproxy runs as
# pure Python (slower, same behaviour).
if ! command -v gcc >/dev/null 2>&1 || ! .venv/bin/python -c 'import os, sysconfig; assert os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))' >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends gcc libc6-dev python3-dev >/dev/null
fi
.venv/bin/python scripts/build_ext.py

# Byte-compile the Python modules, as pip does for an installed package (an editable install
# does not).  Without .pyc files every proxy process compiles its modules from source at start:
# slower, and the compiler's scratch memory stays in the worker's RSS (~5 MiB measured, with
# PYTHONDONTWRITEBYTECODE set, which keeps Python from caching them itself).  A stale .pyc is
# never used: Python checks it against the source.
.venv/bin/python -m compileall -q meshproxy controlplane benchmarks >/dev/null
