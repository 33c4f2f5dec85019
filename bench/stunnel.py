"""An stunnel TLS 1.3 mTLS pair as the reference a tunnel is compared with.

Real configuration files, certificates from our PKI, stunnel's defaults otherwise: the point is what a
well-known C TLS proxy does out of the box, not a tuned opponent (nor a crippled one).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from bench.pki import CertFiles
from bench.procs import Process, ProcessGroup, wait_listening

CIPHERSUITES = "TLS_AES_256_GCM_SHA384"


def stunnel_binary() -> str:
    for name in ("stunnel4", "stunnel"):
        if path := shutil.which(name):
            return path
    raise RuntimeError("stunnel is not installed (make bench installs it: scripts/setup-system.sh stunnel4)")


def config(
    *,
    client: bool,
    accept: int,
    connect: int,
    certs: CertFiles,
    host: str = "127.0.0.1",
    connect_host: str | None = None,
) -> str:
    """One stunnel service: `client` takes plain TCP and speaks TLS to `connect`; a server the reverse.
    Both listen on `host`; `connect` is on `connect_host` (default: `host` too)."""
    lines = [
        "foreground = yes",  # stay our child process, log to stderr
        "pid =",
        "syslog = no",
        "debug = warning",
        "",
        "[bench]",
        f"client = {'yes' if client else 'no'}",
        f"accept = {host}:{accept}",
        f"connect = {connect_host or host}:{connect}",
        f"cert = {certs.chain}",
        f"key = {certs.key}",
        f"CAfile = {certs.root}",
        "verifyChain = yes",  # both sides check the peer's chain up to our root: mutual TLS
        "requireCert = yes",
        "sslVersionMin = TLSv1.3",
        "sslVersionMax = TLSv1.3",
        f"ciphersuites = {CIPHERSUITES}",
    ]
    return "\n".join(lines) + "\n"


def start(
    procs: ProcessGroup,
    name: str,
    folder: Path,
    *,
    client: bool,
    accept: int,
    connect: int,
    certs: CertFiles,
    connect_host: str | None = None,
) -> Process:
    """Write `<folder>/<name>.conf`, start stunnel on it and wait until it listens on `accept`."""
    folder.mkdir(parents=True, exist_ok=True)
    conf = folder / f"{name}.conf"
    conf.write_text(config(client=client, accept=accept, connect=connect, certs=certs, connect_host=connect_host))
    proc = procs.start(name, [stunnel_binary(), str(conf)])
    wait_listening(accept, proc)
    return proc
