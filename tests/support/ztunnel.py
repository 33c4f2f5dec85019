"""A ztunnel under test: the workload entries of its mesh config, its process, and a SOCKS5 client that reads
the reply code."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import yaml

from tests.support.daemons import Daemon, ztunnel_env

SOCKS5_NO_AUTH = b"\x05\x01\x00"  # the greeting: one method offered, "no authentication"


def workload(
    name: str, ip: str | None, *, node: str = "node1", network: str | None = "network1", **fields: object
) -> dict:
    """The mesh config entry of pod `name` ("sleep-1") in namespace default of cluster1, speaking HBONE, its
    service account the name's first part ("sleep"). `ip` None: no address; `network` None: no network key.
    `fields` add keys or replace these (e.g. `uid`, `services`, `workloadName`)."""
    return {
        "uid": f"cluster1//v1/Pod/default/{name}",
        "name": name,
        "namespace": "default",
        "serviceAccount": name.split("-")[0],
        "workloadIps": [ip] if ip else [],
        "protocol": "HBONE",
        "node": node,
        **({"network": network} if network is not None else {}),
        "clusterId": "cluster1",
        **fields,
    }


def ztunnel_daemon(
    ip: str, config: Path, ca_dir: Path, log_path: Path, *, prefix: Sequence[str] = (), **overrides: str
) -> Daemon:
    """A `ztunnel_py` process, not started yet, with `ztunnel_env(ip, config, ca_dir, **overrides)`."""
    env = ztunnel_env(ip, config, ca_dir, **overrides)
    return Daemon("ztunnel_py", env, log_path, env["READINESS_ADDR"], prefix=list(prefix))


@contextlib.asynccontextmanager
async def running_ztunnel(
    ip: str, tmp_path: Path, config: dict, ca_dir: Path, **overrides: str
) -> AsyncIterator[Daemon]:
    """One ztunnel, ready: `config` written to tmp_path/mesh.yaml, its log in tmp_path/ztunnel.log, the
    environment `ztunnel_env(ip, ..., **overrides)`. Stopped on the way out."""
    path = tmp_path / "mesh.yaml"
    path.write_text(yaml.safe_dump(config))
    daemon = ztunnel_daemon(ip, path, ca_dir, tmp_path / "ztunnel.log", **overrides).start()
    try:
        await daemon.wait_ready()
        yield daemon
    finally:
        daemon.stop()


def socks_connect(host: str | bytes, port: int) -> bytes:
    """A SOCKS5 CONNECT request to an IPv4 or IPv6 address (str) or to a domain name (bytes), as sent after the
    greeting."""
    if isinstance(host, bytes):
        address = bytes([3, len(host)]) + host
    elif ":" in host:
        address = bytes([4]) + socket.inet_pton(socket.AF_INET6, host)
    else:
        address = bytes([1]) + socket.inet_pton(socket.AF_INET, host)
    return bytes([5, 1, 0]) + address + struct.pack("!H", port)


async def socks_reply(proxy: tuple[str, int], source_ip: str, host: str | bytes, port: int) -> int:
    """The SOCKS5 reply code to a CONNECT to host:port (see `socks_connect`) sent from `source_ip`."""
    reader, writer = await asyncio.open_connection(*proxy, local_addr=(source_ip, 0))
    try:
        writer.write(SOCKS5_NO_AUTH)
        assert await reader.readexactly(2) == b"\x05\x00"
        writer.write(socks_connect(host, port))
        return (await reader.readexactly(10))[1]
    finally:
        writer.close()
