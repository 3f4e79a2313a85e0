# The meshproxy image: the sidecar and pod-init (meshproxy), the control plane (meshctl).
# `meshctl inject` points its init container and native sidecar at this image.  Not built or run
# on a real cluster in CI (see README: what is tested on a real cluster: nothing yet).
FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/meshproxy
COPY pyproject.toml README.md ./
COPY meshproxy meshproxy
COPY controlplane controlplane
COPY scripts/build_ext.py scripts/build_ext.py
# the compiled hot path is built in place beside the .py files (an editable install keeps them there)
RUN pip install --no-cache-dir -e . \
 && python scripts/build_ext.py \
 && python -m compileall -q meshproxy controlplane \
 && apt-get purge -y gcc libc6-dev && apt-get autoremove -y
# the proxy's uid/gid: pod-init never captures its traffic
RUN groupadd -g 1337 meshproxy && useradd -u 1337 -g 1337 -M -s /usr/sbin/nologin meshproxy
ENTRYPOINT ["meshproxy"]
