# One image, the three daemons of the ambient data plane (plus the mesh PKI CLI and the sample app):
#
#   docker build -t ambient-py .
#   docker run [-e SETTING=...] ambient-py                ztunnel-py, the default command
#   docker run [-e SETTING=...] ambient-py waypoint-py    or ewgateway-py; python -m certs, python -m topology.app
#   docker run --rm ambient-py ztunnel-py --help          every setting, with its environment variable
#
# deploy/README.md runs it with Docker Compose and on Kubernetes.

# --- build: a virtual environment with the locked dependencies and the project's wheel ------------------
FROM python:3.11-slim-trixie AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# The dependencies first, so that a code change does not reinstall them. deploy/install.sh is also what
# tests/test_deploy.py runs, in a temporary directory.
COPY deploy/install.sh deploy/requirements.lock deploy/build-requirements.lock deploy/
RUN sh deploy/install.sh deps /opt/ambient-py
# .dockerignore lets in only the packages, pyproject.toml and these deploy files.
COPY . .
RUN sh deploy/install.sh app /opt/ambient-py /src

# --- runtime -------------------------------------------------------------------------------------------
FROM python:3.11-slim-trixie
# curl: `curl --socks5-hostname` from inside a container is how a client enters the mesh in the compose demo.
# Debian's current version of a stable release: pinning it would break the build at every point release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends curl \
 && rm -rf /var/lib/apt/lists/*
# A fixed non-root uid, so Kubernetes' runAsUser and volume permissions can name it. /var/lib/ambient is
# where the compose demo's shared volume (PKI, mesh state) is mounted; a new volume takes its owner.
RUN groupadd --system --gid 10001 ambient \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin ambient \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/ambient
COPY --from=build /opt/ambient-py /opt/ambient-py
ENV PATH=/opt/ambient-py/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /var/lib/ambient
# 15008 HBONE, 15001 outbound capture, 15006 inbound plaintext capture, 15080 SOCKS5, 15020 metrics,
# 15021 readiness (SPEC §2). The admin port 15000 stays on localhost.
EXPOSE 15008 15001 15006 15080 15020 15021
# GET /healthz/ready on the daemon's READINESS_ADDR (0.0.0.0 and :: mean this container's loopback). Python,
# not curl: this check must not depend on a debugging tool.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; h, _, p = (os.environ.get('READINESS_ADDR') or '0.0.0.0:15021').rpartition(':'); h = h.strip('[]'); h = {'': '127.0.0.1', '0.0.0.0': '127.0.0.1', '::': '::1'}.get(h, h); u.build_opener(u.ProxyHandler({})).open('http://%s:%s/healthz/ready' % ('[%s]' % h if ':' in h else h, p), timeout=2)"]
CMD ["ztunnel-py"]
