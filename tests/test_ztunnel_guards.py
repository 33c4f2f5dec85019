"""ztunnel's guards as a real process: no loops into the ports it is configured with (SPEC §2, §3.4), a
workload with an application tunnel takes any authority (§3.4), and double HBONE carries one traceparent
per connection on both CONNECTs (§3.3). Stand-ins play network2's gateway and destination ztunnel."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
import yaml

from mesh.config import ConfigError, parse_config
from tests.support.apps import TcpApp
from tests.support.daemons import Daemon
from tests.support.pki import TestPki, ident
from tests.support.rawh2 import RawH2Client
from tests.support.standins import StandInHbone
from tests.support.ztunnel import SOCKS5_NO_AUTH, running_ztunnel, socks_connect, socks_reply, workload

Z, SLEEP_IP, ECHO_IP, TUNNELLED_IP = "127.13.1.1", "127.13.1.10", "127.13.1.20", "127.13.1.30"
GATEWAY_IP, REMOTE_ZTUNNEL_IP, REMOTE_APP_IP = "127.13.2.1", "127.13.2.10", "127.13.2.20"
SOCKS_PORT = 25080  # not Istio's 15080: the guard must follow the configuration
APP_TUNNEL_PORT = 18080
REMOTE_HOST = "remote.default.svc.cluster.local"
GATEWAY = ident("istio-eastwestgateway", "istio-system")


def mesh_config() -> dict:
    return {
        "workloads": [
            workload("sleep-1", SLEEP_IP),
            workload("echo-1", ECHO_IP),
            workload("tunnelled-1", TUNNELLED_IP, applicationTunnel={"protocol": "NONE", "port": APP_TUNNEL_PORT}),
            workload("istio-eastwestgateway", GATEWAY_IP, node="", network="network2", namespace="istio-system",
                     serviceAccount="istio-eastwestgateway"),
            workload("remote-1", None, node="", network="network2", services={f"default/{REMOTE_HOST}": {80: 8080}},
                     networkGateway={"destination": f"network2/{GATEWAY_IP}", "hboneMtlsPort": 15008}),
        ],
        "services": [
            {"name": "remote", "namespace": "default", "hostname": REMOTE_HOST, "vips": ["network1/127.13.9.1"],
             "ports": {80: 8080}, "subjectAltNames": [str(ident("remote"))]},
        ],
    }  # fmt: skip


async def named_app(name: bytes, host: str, port: int) -> TcpApp:
    """A TCP app that says its name and closes: which one a tunnel reached."""

    async def hello(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(name)
        await writer.drain()

    return await TcpApp(hello).start(host, port)


@pytest.fixture
async def ztunnel(tmp_path: Path, pki: TestPki):
    # OUTBOUND_ADDR "OFF": `off` is taken in any case.
    async with running_ztunnel(Z, tmp_path, mesh_config(), pki.paths["cluster1"], NETWORK="network1",
                               SOCKS5_ADDR=f"{Z}:{SOCKS_PORT}", OUTBOUND_ADDR="OFF",
                               INBOUND_PLAINTEXT_ADDR="off") as daemon:  # fmt: skip
        yield daemon


async def connect_status(pki: TestPki, local_ip: str, authority: str) -> int | None:
    """The answer to a CONNECT to `local_ip`:15008 from the sleep workload."""
    client = await RawH2Client.open((local_ip, 15008), pki.client_ctx(ident("sleep")))
    try:
        return (await client.request([(":method", "CONNECT"), (":authority", authority)])).status
    finally:
        client.close()


async def test_loopback_to_a_configured_port_is_refused_in_any_spelling(ztunnel: Daemon) -> None:
    # SOCKS reply 2 (not allowed): SOCKS5 is configured on 25080, and ::ffff:127.x is loopback too.
    for host, port in ((Z, SOCKS_PORT), (f"::ffff:{Z}", SOCKS_PORT), ("::ffff:127.0.0.1", 15008)):
        assert await socks_reply((Z, SOCKS_PORT), SLEEP_IP, host, port) == 2, (host, port, ztunnel.logs())
    assert ztunnel.logs().count("a loop into ztunnel itself") == 3


async def test_inbound_target_on_a_configured_port_is_refused(ztunnel: Daemon, pki: TestPki) -> None:
    # Istio forbids a resolved target port that is one of its listeners' ports, whatever the application.
    app = await named_app(b"echo-1", ECHO_IP, SOCKS_PORT)
    try:
        assert await connect_status(pki, ECHO_IP, f"{ECHO_IP}:{SOCKS_PORT}") == 503
        assert f"port {SOCKS_PORT} is one of ztunnel's own" in ztunnel.logs()
    finally:
        await app.close()


async def test_application_tunnel_takes_any_authority_on_its_port(ztunnel: Daemon, pki: TestPki) -> None:
    app = await named_app(b"tunnelled-1", TUNNELLED_IP, APP_TUNNEL_PORT)
    try:
        # Another pod's address as the authority: the tunnel's application decides what to do with it. Only
        # the tunnel's port listens, so a 200 (sent once the application is connected) says it was used.
        assert await connect_status(pki, TUNNELLED_IP, f"{SLEEP_IP}:8080") == 200, ztunnel.logs()
        # Without an application tunnel the same mismatch is refused.
        assert await connect_status(pki, ECHO_IP, f"{SLEEP_IP}:8080") == 400
    finally:
        await app.close()


def test_proxy_protocol_application_tunnel_is_refused_at_load() -> None:
    config = mesh_config()
    config["workloads"][2]["applicationTunnel"]["protocol"] = "PROXY"
    with pytest.raises(ConfigError, match=r"mesh\.yaml: workloads\[2\]\.applicationTunnel\.protocol: .*PROXY"):
        parse_config(yaml.safe_dump(config), "mesh.yaml")


async def test_double_hbone_carries_one_traceparent_on_both_connects(ztunnel: Daemon, pki: TestPki) -> None:
    app = await named_app(b"remote-1", REMOTE_APP_IP, 8080)
    destination = StandInHbone(pki, ident("remote"), cluster="cluster2",
                               targets={f"{REMOTE_HOST}:80": (REMOTE_APP_IP, 8080)})  # fmt: skip
    gateway = StandInHbone(pki, GATEWAY, cluster="cluster2",
                           targets={f"{REMOTE_HOST}:80": (REMOTE_ZTUNNEL_IP, 15008)})  # fmt: skip
    await destination.start(REMOTE_ZTUNNEL_IP, 15008)
    await gateway.start(GATEWAY_IP, 15008)
    try:
        reader, writer = await asyncio.open_connection(Z, SOCKS_PORT, local_addr=(SLEEP_IP, 0))
        writer.write(SOCKS5_NO_AUTH + socks_connect(REMOTE_HOST.encode(), 80))
        assert await reader.readexactly(12) == b"\x05\x00" + b"\x05\x00\x00\x01" + bytes(6), ztunnel.logs()
        assert await asyncio.wait_for(reader.read(), 10) == b"remote-1"  # the bound only guards against a hang
        writer.close()
        ((outer,), (inner,)) = gateway.connects, destination.connects
        assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", outer.headers["traceparent"])
        assert inner.headers["traceparent"] == outer.headers["traceparent"]
        assert inner.headers["x-forwarded-network"] == "network1" and "x-forwarded-network" not in outer.headers
    finally:
        await gateway.close()
        await destination.close()
        await app.close()
