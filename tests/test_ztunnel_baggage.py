"""ztunnel's inbound with the baggage exchange on (SPEC §4): a source the state does not know by its address
is described by its request baggage, but its namespace is the one its certificate proves, as at the gateway."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hbone.client import dial
from hbone.identity import Identity
from tests.support.apps import TcpApp, echo, stream_pair
from tests.support.daemons import Daemon, metric_samples, scrape, ztunnel_env
from tests.support.pki import TestPki, ident

Z, SLEEP_IP, ECHO_IP, UNKNOWN_IP = "127.17.1.1", "127.17.1.10", "127.17.1.20", "127.17.1.77"
APP_PORT = 8080
CLAIM = "k8s.cluster.name=cluster1,k8s.namespace.name=default,k8s.deployment.name=claims-default,service.name=cd"


def workload(name: str, ip: str) -> dict:
    return {
        "uid": f"cluster1//v1/Pod/default/{name}",
        "name": name,
        "workloadName": name.split("-")[0],
        "namespace": "default",
        "serviceAccount": name.split("-")[0],
        "workloadIps": [ip],
        "protocol": "HBONE",
        "node": "node1",
        "network": "network1",
        "clusterId": "cluster1",
    }


@pytest.fixture
async def ztunnel(tmp_path: Path, pki: TestPki):
    config = tmp_path / "mesh.yaml"
    config.write_text(yaml.safe_dump({"workloads": [workload("sleep-1", SLEEP_IP), workload("echo-1", ECHO_IP)]}))
    env = ztunnel_env(Z, config, pki.paths["cluster1"], NETWORK="network1", AMBIENT_ENABLE_BAGGAGE="true",
                      INBOUND_PLAINTEXT_ADDR="off")  # fmt: skip
    daemon = Daemon("ztunnel_py", env, tmp_path / "ztunnel.log", f"{Z}:15021").start()
    app = await TcpApp(echo).start(ECHO_IP, APP_PORT)
    try:
        await daemon.wait_ready()
        yield daemon
    finally:
        daemon.stop()
        await app.close()


async def connect_from(pki: TestPki, source: Identity, source_ip: str) -> None:
    """One tunnel to the echo app carrying CLAIM as its baggage, a round trip through it, then close."""
    conn = await dial((ECHO_IP, 15008), pki.client_ctx(source), [ident("echo")], source_ip=source_ip)
    tunnel = await conn.open_stream(f"{ECHO_IP}:{APP_PORT}", [("baggage", CLAIM)])
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
