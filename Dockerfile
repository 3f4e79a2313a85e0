# The meshproxy image: the sidecar and pod-init (meshproxy), the control plane (meshctl).
# `meshctl inject` points its init container and native sidecar at this image (and sets their
# users: root with NET_ADMIN for pod-init, 1337 for the sidecar).  Not built or run on a real
# cluster in CI; its RUN steps are scripts in the repository that CI runs without an image
# daemon (tests/integration/test_packaging.py).
#   docker build -t meshproxy:0.1.0 .
#
# Stage 1 builds the wheels, meshproxy's with its hot path compiled by Cython (setup.py).
FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY scripts/build_ext.py scripts/build_wheels.sh scripts/install_wheels.sh scripts/
COPY meshproxy meshproxy
COPY controlplane controlplane
RUN scripts/build_wheels.sh /wheels

# Stage 2: a slim runtime without a compiler; nftables for pod-init.
FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
COPY --from=build /src/scripts/install_wheels.sh /usr/local/bin/
RUN install_wheels.sh /wheels "$(command -v python3)" \
 && rm -rf /wheels /usr/local/bin/install_wheels.sh \
 && groupadd -g 1337 meshproxy && useradd -u 1337 -g 1337 -M -s /usr/sbin/nologin meshproxy
# the proxy's uid/gid: pod-init never captures its traffic
USER 1337:1337
EXPOSE 15000 15001 15006 15010 15053
ENTRYPOINT ["meshproxy"]
