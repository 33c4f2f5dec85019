# The compose demo's network plumbing (compose/node-net.sh, compose/edge-net.sh): `ip` and `iptables` on the
# same base as the main image, so the layers are shared. Runs as root with NET_ADMIN, inside its own
# network namespace only; no daemon runs in it.
FROM python:3.11-slim-trixie
# Debian's current versions of a stable release: pinning them would break the build at every point release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends iproute2 iptables \
 && rm -rf /var/lib/apt/lists/*
CMD ["sh", "-c", "echo 'run compose/node-net.sh or compose/edge-net.sh' >&2; exit 2"]
