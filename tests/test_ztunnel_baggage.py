"""ztunnel with the baggage exchange on (SPEC §4): a source the state does not know by its address is described
by its request baggage, and a double-HBONE destination by its inner response baggage; either way the namespace
is the one the peer's certificate proves, as at the gateway, and a header refused whole counts as absent."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hbone.baggage import REASON_NOT_ASCII
from hbone.client import dial
from hbone.identity import Identity
from tests.support.apps import TcpApp, echo, stream_pair
from tests.support.daemons import Daemon, metric_samples, scrape
from tests.support.pki import TestPki, ident
from tests.support.standins import StandInHbone
from tests.support.ztunnel import SOCKS5_NO_AUTH, running_ztunnel, socks_connect, workload

Z, SLEEP_IP, ECHO_IP, UNKNOWN_IP = "127.17.1.1", "127.17.1.10", "127.17.1.20", "127.17.1.77"
GATEWAY_IP, REMOTE_ZTUNNEL_IP, REMOTE_APP_IP, REMOTE_VIP = "127.17.2.1", "127.17.2.10", "127.17.2.20", "127.17.9.1"
APP_PORT = 8080
CLAIM = "k8s.cluster.name=cluster1,k8s.namespace.name=default,k8s.deployment.name=claims-default,service.name=cd"
NOT_ASCII = "k8s.deployment.name=sl\xe9ep,service.name=liar"  # sent as latin-1: one byte 0xE9
REMOTE_HOST = "remote.default.svc.cluster.local"
# network2's endpoint of `remote`: its certificate is of namespace `elsewhere`, its baggage claims `default`.
REMOTE_ID = Identity("cluster.local", "elsewhere", "remote")
REMOTE_CLAIM = "k8s.cluster.name=cluster2,k8s.namespace.name=default,k8s.deployment.name=remote-bg,service.name=rb"


def mesh_config() -> dict:
    return {
        "workloads": [
            workload("sleep-1", SLEEP_IP, workloadName="sleep"),
            workload("echo-1", ECHO_IP, workloadName="echo"),
            workload("eastwest-1", GATEWAY_IP, node="", network="network2", namespace="istio-system",
                     workloadName="eastwest"),
            workload("remote-1", None, node="", network="network2", workloadName="remote",
                     services={f"default/{REMOTE_HOST}": {80: APP_PORT}},
                     networkGateway={"destination": f"network2/{GATEWAY_IP}", "hboneMtlsPort": 15008}),
        ],
        "services": [
            {"name": "remote", "namespace": "default", "hostname": REMOTE_HOST, "vips": [f"network1/{REMOTE_VIP}"],
             "ports": {80: APP_PORT}, "subjectAltNames": [str(REMOTE_ID)]},
        ],
    }  # fmt: skip


@pytest.fixture
async def ztunnel(tmp_path: Path, pki: TestPki):
    app = await TcpApp(echo).start(ECHO_IP, APP_PORT)
    try:
        async with running_ztunnel(Z, tmp_path, mesh_config(), pki.paths["cluster1"], NETWORK="network1",
                                   AMBIENT_ENABLE_BAGGAGE="true", INBOUND_PLAINTEXT_ADDR="off") as daemon:  # fmt: skip
            yield daemon
    finally:
        await app.close()


async def connect_from(pki: TestPki, source: Identity, source_ip: str, baggage: str = CLAIM) -> None:
    """One tunnel to the echo app carrying `baggage`, a round trip through it, then close."""
    conn = await dial((ECHO_IP, 15008), pki.client_ctx(source), [ident("echo")], source_ip=source_ip)
    tunnel = await conn.open_stream(f"{ECHO_IP}:{APP_PORT}", [("baggage", baggage)])
    reader, writer = stream_pair(tunnel)
    writer.write(b"hello")
    writer.write_eof()
    assert await reader.read() == b"hello"
    conn.close()


async def test_source_baggage_cannot_claim_another_namespace(ztunnel: Daemon, pki: TestPki) -> None:
    stranger = Identity("cluster.local", "elsewhere", "stranger")
    await connect_from(pki, stranger, UNKNOWN_IP)
    # An address the state knows, under another identity: not that workload, so baggage again.
    await connect_from(pki, stranger, SLEEP_IP)
    opened = metric_samples(await scrape(f"{Z}:15020"), "istio_tcp_connections_opened_total")
    sources = [labels for labels, _ in opened if labels["reporter"] == "destination"]
    assert sources and len(sources) == 1, sources
    (labels,) = sources
    assert labels["source_workload"] == "claims-default" and labels["source_canonical_service"] == "cd"
    assert labels["source_workload_namespace"] == "elsewhere"
    assert labels["source_principal"] == str(stranger)
    assert sum(value for labels, value in opened if labels["reporter"] == "destination") == 2


async def test_a_source_known_by_address_is_named_by_the_state(ztunnel: Daemon, pki: TestPki) -> None:
    await connect_from(pki, ident("sleep"), SLEEP_IP)
    opened = metric_samples(await scrape(f"{Z}:15020"), "istio_tcp_connections_opened_total")
    ((labels, value),) = [(labels, value) for labels, value in opened if labels["reporter"] == "destination"]
    assert (labels["source_workload"], labels["source_workload_namespace"]) == ("sleep", "default")
    assert value == 1


async def test_refused_source_baggage_counts_as_absent(ztunnel: Daemon, pki: TestPki) -> None:
    """A header the parser refuses whole (SPEC §4.2) is as if none was sent: the source is its verified
    identity and nothing more, not an empty description pinned to the certificate's namespace."""
    stranger = Identity("cluster.local", "elsewhere", "stranger")
    await connect_from(pki, stranger, UNKNOWN_IP, NOT_ASCII)
    samples = await scrape(f"{Z}:15020")
    opened = metric_samples(samples, "istio_tcp_connections_opened_total")
    ((labels, value),) = [(labels, value) for labels, value in opened if labels["reporter"] == "destination"]
    assert labels["source_principal"] == str(stranger)
    assert (labels["source_workload"], labels["source_workload_namespace"]) == ("unknown", "unknown")
    assert value == 1
    dropped = metric_samples(samples, "istio_baggage_dropped_items_total")
    assert [v for labels, v in dropped if labels["reason"] == REASON_NOT_ASCII] == [1]


async def test_double_hbone_destination_baggage_cannot_claim_another_namespace(ztunnel: Daemon, pki: TestPki) -> None:
    """The inner CONNECT's response baggage names the remote endpoint (SPEC §4.3, step 5), but its namespace is
    the one its inner certificate proves."""
    app = await TcpApp(echo).start(REMOTE_APP_IP, APP_PORT)
    destination = StandInHbone(pki, REMOTE_ID, cluster="cluster2", response_baggage=REMOTE_CLAIM,
                               targets={f"{REMOTE_HOST}:80": (REMOTE_APP_IP, APP_PORT)})  # fmt: skip
    gateway = StandInHbone(pki, ident("eastwest", "istio-system"), cluster="cluster2",
                           targets={f"{REMOTE_HOST}:80": (REMOTE_ZTUNNEL_IP, 15008)})  # fmt: skip
    await destination.start(REMOTE_ZTUNNEL_IP, 15008)
    await gateway.start(GATEWAY_IP, 15008)
    try:
        reader, writer = await asyncio.open_connection(Z, 15080, local_addr=(SLEEP_IP, 0))
        writer.write(SOCKS5_NO_AUTH + socks_connect(REMOTE_HOST.encode(), 80))
        assert await reader.readexactly(12) == b"\x05\x00" + b"\x05\x00\x00\x01" + bytes(6), ztunnel.logs()
        writer.write(b"hello")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b"hello"  # the bound only guards against a hang
        writer.close()
        assert len(destination.connects) == 1
    finally:
        await gateway.close()
        await destination.close()
        await app.close()
    opened = metric_samples(await scrape(f"{Z}:15020"), "istio_tcp_connections_opened_total")
    ((labels, value),) = [(labels, value) for labels, value in opened if labels["reporter"] == "source"]
    assert labels["destination_service"] == REMOTE_HOST
    assert (labels["destination_workload"], labels["destination_canonical_service"]) == ("remote-bg", "rb")
    assert labels["destination_cluster"] == "cluster2"
    assert labels["destination_workload_namespace"] == "elsewhere"
    assert labels["destination_principal"] == str(REMOTE_ID)
    assert value == 1
