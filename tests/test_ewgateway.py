"""The east-west gateway as a real process (`python -m ewgateway_py`), between a double-HBONE client in
this test and stand-in destination ztunnels (`TunnelServer`s on <endpoint IP>:15008).

Every test gets its own 127.a.b.0/24 so that the gateway and the endpoints can all use port 15008.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from certs import CertificateAuthority, MintingProvider
from ewgateway_py.balancer import EndpointBalancer
from ewgateway_py.dispatch import Candidate, Destination, NoRoute, resolve
from hbone.authority import parse_authority
from hbone.client import client_over
from hbone.connection import H2Settings, HboneConnection
from hbone.errors import ConnectRefused
from hbone.identity import Identity
from hbone.pool import Pool
from hbone.tunnel import Tunnel
from mesh.config import parse_config
from mesh.credentials import TlsIdentities
from mesh.model import Workload
from mesh.state import MeshState
from mesh.upstream import Connector
from tests.support.apps import TcpApp, TunnelServer, digest_reply, echo, send_pattern, stream_pair
from tests.support.daemons import REPO, Daemon, http_get, metric_samples, scrape
from tests.support.pki import TestPki
from tests.support.waiting import eventually

SETTLE = 20.0  # seconds for the gateway's metrics and state to catch up; bounds a hang, measures nothing

TD = "cluster.local"
GATEWAY = Identity(TD, "istio-system", "istio-eastwestgateway")
SLEEP = Identity(TD, "default", "sleep")
STRANGER = Identity(TD, "default", "stranger")  # a source the gateway's mesh state does not know
SERVER = "server.default.svc.cluster.local"
INNER_MARKER = "inner-only-c0ffee"  # sent only inside the inner tunnel: must never show at the gateway


def server_identity(name: str) -> Identity:
    return Identity(TD, "default", name)


# --- a per-test address block -----------------------------------------------------------------------------


@dataclass
class Net:
    prefix: str  # "127.a.b"

    def ip(self, host: int) -> str:
        return f"{self.prefix}.{host}"

    @property
    def gateway(self) -> str:
        return self.ip(1)


@pytest.fixture
def net() -> Net:
    rng = random.SystemRandom()
    return Net(f"127.{rng.randint(16, 250)}.{rng.randint(1, 250)}")


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# --- the mesh state the gateway loads ---------------------------------------------------------------------


def workload(name: str, ip: str | None, *, network: str = "network2", cluster: str = "cluster2",
             services: dict[str, dict[int, int]] | None = None, status: str = "Healthy",
             namespace: str = "default", app: str | None = None) -> dict[str, Any]:  # fmt: skip
    w: dict[str, Any] = {
        "uid": f"{cluster}//Pod/{namespace}/{name}",
        "name": name,
        "namespace": namespace,
        "serviceAccount": name,
        "network": network,
        "clusterId": cluster,
        "workloadName": app or name,
        "canonicalName": app or name,
        "canonicalRevision": "v1",
        "protocol": "HBONE",
        "status": status,
    }
    if ip is not None:
        w["workloadIps"] = [ip]
    if services:
        w["services"] = services
    return w


def service(name: str, sans: list[str], *, ports: dict[int, int] | None = None,
            waypoint: str | None = None) -> dict[str, Any]:  # fmt: skip
    s: dict[str, Any] = {
        "name": name,
        "namespace": "default",
        "hostname": f"{name}.default.svc.cluster.local",
        "ports": ports or {80: 8080},
        "subjectAltNames": [str(server_identity(n)) for n in sans],
    }
    if waypoint:
        s["waypoint"] = {"destination": waypoint, "hboneMtlsPort": 15008}
    return s


def endpoint_of(svc: str) -> dict[str, dict[int, int]]:
    return {f"default/{svc}.default.svc.cluster.local": {80: 8080}}


def base_state(net: Net) -> dict[str, Any]:
    """The client in network1 and the gateway itself; tests add services and endpoints."""
    return {
        "workloads": [
            workload("sleep", "10.1.0.5", network="network1", cluster="cluster1"),
            workload("istio-eastwestgateway", net.gateway, namespace="istio-system"),
        ],
        "services": [],
    }


# --- the gateway process ----------------------------------------------------------------------------------


@dataclass
class GatewayProcess:
    """The daemon under test, with its mesh state file and its admin, stats and readiness addresses."""

    net: Net
    workdir: Path
    daemon: Daemon | None = None
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def address(self) -> tuple[str, int]:
        return (self.net.gateway, 15008)

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        assert self.daemon is not None and self.daemon.proc is not None
        return self.daemon.proc

    def write_state(self, state: dict[str, Any]) -> None:
        # Write then rename, so the watcher never reads half a file.
        tmp = self.workdir / "mesh.yaml.tmp"
        tmp.write_text(yaml.safe_dump(state, sort_keys=False))
        os.replace(tmp, self.workdir / "mesh.yaml")

    def start(self, pki: TestPki, state: dict[str, Any], **extra: str) -> None:
        self.write_state(state)
        host = self.net.gateway
        self.ports = {name: free_port(host) for name in ("stats", "readiness", "admin")}
        env = {
            "PYTHONPATH": str(REPO),
            "CLUSTER_ID": "cluster2",
            "NETWORK": "network2",
            "TRUST_DOMAIN": TD,
            "LOCAL_XDS_PATH": str(self.workdir / "mesh.yaml"),
            "CA_CERTS_DIR": str(pki.paths["cluster2"]),
            "PROXY_WORKLOAD_INFO": "istio-system/istio-eastwestgateway/istio-eastwestgateway",
            "INBOUND_ADDR": f"{host}:15008",
            "STATS_ADDR": f"{host}:{self.ports['stats']}",
            "READINESS_ADDR": f"{host}:{self.ports['readiness']}",
            "ADMIN_ADDR": f"{host}:{self.ports['admin']}",
            "LOG_LEVEL": "debug",
            **extra,
        }
        self.daemon = Daemon("ewgateway_py", env, self.workdir / "gateway.log",
                             f"{host}:{self.ports['readiness']}").start()  # fmt: skip

    async def wait_ready(self) -> None:
        assert self.daemon is not None
        await self.daemon.wait_ready()

    def url(self, server: str, path: str) -> str:
        return f"http://{self.net.gateway}:{self.ports[server]}{path}"

    async def metrics(self) -> str:
        return await scrape(f"{self.net.gateway}:{self.ports['stats']}")

    async def config_dump(self) -> dict[str, Any]:
        return json.loads(await asyncio.to_thread(http_get, self.url("admin", "/config_dump")))

    def output(self) -> str:
        """Everything the process wrote: its log (stderr) and its access log (stdout)."""
        return self.daemon.logs() if self.daemon is not None else ""

    def stop(self) -> None:
        if self.daemon is not None and self.daemon.proc is not None and self.daemon.proc.poll() is None:
            self.daemon.proc.kill()
        if self.daemon is not None:
            self.daemon.stop()


@pytest.fixture
def gateway(net: Net, tmp_path: Path) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(net, tmp_path)
    yield gw
    gw.stop()


# --- the two sides around the gateway ---------------------------------------------------------------------


def client_connector(pki: TestPki) -> Connector:
    """A source ztunnel's outbound side in cluster1: certificates for any identity, one pool."""
    ca = CertificateAuthority.load(pki.paths["cluster1"])
    return Connector(TlsIdentities(MintingProvider(ca)), H2Settings(), Pool())


async def endpoint(pki: TestPki, ip: str, name: str, app: TcpApp) -> TunnelServer:
    """A stand-in destination ztunnel for pod `name` at ip:15008; every stream goes to `app`."""
    identity = server_identity(name)
    server = TunnelServer(identity, lambda: pki.server_ctx(identity, "cluster2"),
                          route=lambda _t: ("127.0.0.1", app.port))  # fmt: skip
    return await server.start(ip, 15008)


@dataclass
class Double:
    outer: Tunnel
    inner_conn: HboneConnection
    inner: Tunnel


async def double(connector: Connector, gw: GatewayProcess, authority: str, inner_expected: list[Identity], *,
                 source: Identity = SLEEP, outer_headers: list[tuple[str, str]] | None = None,
                 inner_headers: list[tuple[str, str]] | None = None) -> Double:  # fmt: skip
    """Double HBONE by hand, keeping hold of the outer stream to compare byte counts with the gateway's."""
    outer = await connector.connect(source, [GATEWAY], gw.address, authority, outer_headers or [])
    inner_conn = await client_over(outer, connector.identities.client(source), inner_expected,
                                   local_identity=source, name="inner")  # fmt: skip
    inner = await inner_conn.open_stream(authority, inner_headers or [])
    return Double(outer, inner_conn, inner)


async def exchange(tunnel: asyncio.Transport, payload: bytes) -> bytes:
    reader, writer = stream_pair(tunnel)
    writer.write(payload)
    writer.write_eof()
    return await reader.read()


async def echo_once(connector: Connector, gw: GatewayProcess, authority: str, expected: list[Identity],
                    **headers: list[tuple[str, str]]) -> Identity | None:  # fmt: skip
    """One short stream through the gateway; returns the identity that terminated the inner TLS."""
    tunnel = await connector.connect_double(SLEEP, [GATEWAY], gw.address, authority, headers.get("outer", []),
                                            expected, headers.get("inner", []))  # fmt: skip
    payload = os.urandom(64)
    assert await exchange(tunnel, payload) == payload
    return tunnel.connection.peer_identity


def samples(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(value for have, value in metric_samples(text, name)
               if all(have.get(k) == v for k, v in labels.items()))  # fmt: skip


# --- tests ------------------------------------------------------------------------------------------------


def test_help_lists_every_setting_and_identity_is_required() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PROXY_WORKLOAD_INFO", None)
    shown = subprocess.run([sys.executable, "-m", "ewgateway_py", "--help"], cwd=REPO, env=env,
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    for name in ("INBOUND_ADDR", "LOCAL_XDS_PATH", "CA_CERTS_DIR", "NETWORK", "TRUST_DOMAIN",
                 "PROXY_WORKLOAD_INFO", "AMBIENT_ENABLE_BAGGAGE", "DRAIN_DEADLINE", "STATS_ADDR"):  # fmt: skip
        assert name in shown
    missing = subprocess.run([sys.executable, "-m", "ewgateway_py"], cwd=REPO, env=env, capture_output=True,
                             text=True)  # fmt: skip
    assert missing.returncode == 2
    assert "PROXY_WORKLOAD_INFO" in missing.stderr


# The choice and the dispatch are pure; these pin their rules without a process.


def _state(text: dict[str, Any]) -> MeshState:
    return MeshState(parse_config(yaml.safe_dump(text), "mesh.yaml"))


def _candidates(n: int) -> list[Candidate]:
    return [Candidate(Workload(uid=f"w{i}", name=f"w{i}", namespace="default"), (f"10.0.0.{i}", 15008))
            for i in range(n)]  # fmt: skip


def test_balancer_prefers_fewest_streams_rotates_ties_and_ejects_failures_for_a_while() -> None:
    now = [0.0]
    balancer = EndpointBalancer(ejection=10.0, clock=lambda: now[0])
    a, b, c = _candidates(3)
    assert [balancer.acquire([a, b, c]) for _ in range(3)] == [a, b, c]  # ties rotate
    balancer.release(b)
    assert balancer.acquire([a, b, c]) == b  # the only one with fewer open streams
    for x in (a, b, c):
        balancer.release(x)
    balancer.failed(a)
    picks = [balancer.acquire([a, b, c]) for _ in range(4)]
    assert a not in picks
    for x in picks:
        balancer.release(x)
    balancer.failed(b)
    balancer.failed(c)
    assert balancer.acquire([a, b, c]) in (a, b, c)  # all ejected: try one anyway rather than refuse
    now[0] = 10.0
    assert balancer.describe()["ejected"] == []
    balancer.failed(a)
    balancer.succeeded(a)  # a success ends the ejection early
    assert balancer.describe()["ejected"] == []


def test_dispatch_rules() -> None:
    state = _state({
        "workloads": [
            workload("a", "10.0.0.1", services={f"default/{SERVER}": {8080: 9090}}),
            workload("remote", "10.9.0.1", network="network3", services=endpoint_of("server")),
            workload("waypoint", "10.0.0.9"),
        ],
        "services": [service("server", ["a"], waypoint="network2/10.0.0.9")],
    })  # fmt: skip

    def go(authority: str, source: str | None = None) -> Destination:
        return resolve(state, "network2", parse_authority(authority), source)

    assert [c.workload.name for c in go(f"{SERVER}:80").candidates] == ["waypoint"]
    direct = go(f"{SERVER}:80", "Waypoint")
    assert not direct.via_waypoint
    assert [c.address for c in direct.candidates] == [("10.0.0.1", 15008)]  # local only, at 15008
    # A port only an endpoint maps is still a port of the service.
    assert go(f"{SERVER}.:8080", "waypoint").service.name == "server"
    with pytest.raises(NoRoute, match="no port 81"):
        go(f"{SERVER}:81")


async def test_large_body_relayed_opaquely_with_metrics_from_the_outer_peer_only(
    pki: TestPki, net: Net, gateway: GatewayProcess
) -> None:
    state = base_state(net)
    state["services"].append(service("server", ["server-a"]))
    state["workloads"].append(workload("server-a", net.ip(11), services=endpoint_of("server"), app="server"))
    gateway.start(pki, state, AMBIENT_ENABLE_BAGGAGE="true")
    app = await TcpApp(digest_reply).start()
    ep = await endpoint(pki, net.ip(11), "server-a", app)
    connector = client_connector(pki)
    try:
        await gateway.wait_ready()
        authority = f"{SERVER}:80"
        # The outer peer came from another network: its outer baggage (flag on) names it.
        outer_baggage = (
            "k8s.cluster.name=cluster1,k8s.namespace.name=default,k8s.deployment.name=sleep,service.name=sleep"
        )
        inner_headers = [("baggage", f"k8s.deployment.name={INNER_MARKER},service.name={INNER_MARKER}"),
                         ("x-forwarded-network", "network1"), ("x-inner-marker", INNER_MARKER)]  # fmt: skip
        d = await double(connector, gateway, authority, [server_identity("server-a")],
                         outer_headers=[("baggage", outer_baggage)], inner_headers=inner_headers)  # fmt: skip
        # Two TLS sessions, two identities: the outer one ends at the gateway, the inner one at the endpoint.
        assert d.outer.connection.peer_identity == GATEWAY
        assert d.inner_conn.peer_identity == server_identity("server-a")

        reader, writer = stream_pair(d.inner)
        total = 32 * 1024 * 1024
        sent_digest = await send_pattern(writer, seed=7, total=total)
        writer.write_eof()
        assert (await reader.read()).decode() == f"{total} {sent_digest}"

        # The inner connection stays open, idle: the gateway's counts must settle on exactly what went
        # through the outer stream, both ways (the scrape flushes live connections).
        labels = {"reporter": "destination", "destination_service": SERVER}

        async def bytes_match() -> bool:
            text = await gateway.metrics()
            rx = samples(text, "istio_tcp_received_bytes_total", **labels)
            tx = samples(text, "istio_tcp_sent_bytes_total", **labels)
            return rx == d.outer.bytes_sent and tx == d.outer.bytes_received

        await eventually(bytes_match, "the gateway's byte counts to match the outer stream", SETTLE)
        assert d.outer.bytes_sent > total  # the relayed bytes are ciphertext of the inner session

        # A second source whose baggage lies about its namespace: the certificate's namespace wins.
        liar = "k8s.namespace.name=kube-system,k8s.deployment.name=stranger-app,service.version=v9"
        tunnel = await connector.connect_double(STRANGER, [GATEWAY], gateway.address, authority,
                                                [("baggage", liar)], [server_identity("server-a")],
                                                [("baggage", f"service.name={INNER_MARKER}")])  # fmt: skip
        _, stranger_writer = stream_pair(tunnel)
        stranger_writer.write_eof()

        d.inner_conn.close("done")
        await eventually(lambda: _closed(gateway, 2), "both streams to be counted closed", SETTLE)

        text = await gateway.metrics()
        opened = {"reporter": "destination", "source_principal": str(SLEEP), "source_workload": "sleep",
                  "source_workload_namespace": "default", "source_cluster": "cluster1",
                  "destination_workload": "server", "destination_principal": str(server_identity("server-a")),
                  "destination_cluster": "cluster2", "destination_service": SERVER,
                  "destination_service_name": "server", "destination_service_namespace": "default",
                  "connection_security_policy": "mutual_tls", "request_protocol": "tcp"}  # fmt: skip
        assert samples(text, "istio_tcp_connections_opened_total", **opened) == 1
        assert samples(text, "istio_tcp_connections_closed_total", **opened, response_flags="-") == 1
        assert samples(text, "istio_tcp_received_bytes_total", **opened) == d.outer.bytes_sent
        stranger = {"source_principal": str(STRANGER), "source_workload": "stranger-app",
                    "source_workload_namespace": "default", "source_version": "v9"}  # fmt: skip
        assert samples(text, "istio_tcp_connections_opened_total", **stranger) == 1
        assert "outer-claim" not in text and "kube-system" not in text
        assert 'istio_build{component="eastwestgateway"' in text
        assert samples(text, "istio_tcp_sockets_open", reporter="destination") == 0

        # Nothing from inside the inner tunnel reaches the gateway's metrics or its logs.
        assert INNER_MARKER not in text
        # Access lines are written in batches (within mesh.accesslog.FLUSH_INTERVAL).
        await eventually(lambda: "connection complete" in gateway.output(), "the access line")
        output = gateway.output()
        assert INNER_MARKER not in output
        assert "connection complete" in output and f"src.identity={SLEEP}" in output

        dump = await gateway.config_dump()
        assert dump["component"] == "eastwestgateway"
        assert dump["gateway"]["identity"] == str(GATEWAY)
    finally:
        await connector.pool.close()
        await ep.close()
        await app.close()


async def _closed(gateway: GatewayProcess, n: int) -> bool:
    text = await gateway.metrics()
    return samples(text, "istio_tcp_connections_closed_total", reporter="destination") >= n


async def test_streams_it_cannot_serve_get_503(pki: TestPki, net: Net, gateway: GatewayProcess) -> None:
    state = base_state(net)
    state["services"] += [service("server", ["server-a"]), service("sick", ["sick-a"]),
                          service("faraway", ["far-a"])]  # fmt: skip
    state["workloads"] += [
        workload("server-a", net.ip(11), services=endpoint_of("server")),
        workload("sick-a", net.ip(12), services=endpoint_of("sick"), status="Unhealthy"),
        # An endpoint of another network is not the gateway's to reach.
        workload("far-a", "10.9.0.1", network="network3", services=endpoint_of("faraway")),
    ]
    gateway.start(pki, state)
    connector = client_connector(pki)
    try:
        await gateway.wait_ready()
        for authority in ("nope.default.svc.cluster.local:80", f"{net.ip(11)}:15008", f"{SERVER}:81",
                          "sick.default.svc.cluster.local:80", "faraway.default.svc.cluster.local:80"):  # fmt: skip
            with pytest.raises(ConnectRefused) as refused:
                await connector.connect(SLEEP, [GATEWAY], gateway.address, authority, [])
            assert refused.value.status == 503, authority
        text = await gateway.metrics()
        assert samples(text, "istio_tcp_connections_failed_total", response_flags="CONNECT") == 5
        # The unknown hostname is not turned into a label: a peer must not be able to mint series.
        assert "nope.default" not in text
        assert samples(text, "istio_tcp_connections_failed_total",
                       destination_service="sick.default.svc.cluster.local") == 1  # fmt: skip
        assert "no service has hostname 'nope.default.svc.cluster.local'" in gateway.output()
    finally:
        await connector.pool.close()


async def test_unreachable_endpoint_is_503_connect_and_then_passed_over(
    pki: TestPki, net: Net, gateway: GatewayProcess
) -> None:
    state = base_state(net)
    state["services"].append(service("server", ["server-a", "server-dead"]))
    state["workloads"] += [
        workload("server-dead", net.ip(10), services=endpoint_of("server")),  # nothing listens there
        workload("server-a", net.ip(11), services=endpoint_of("server")),
    ]
    gateway.start(pki, state)
    app = await TcpApp(echo).start()
    live = await endpoint(pki, net.ip(11), "server-a", app)
    connector = client_connector(pki)
    expected = [server_identity("server-a"), server_identity("server-dead")]
    try:
        await gateway.wait_ready()
        refusals = 0
        for _ in range(2):  # ties rotate, so one of the first two streams goes to the dead endpoint
            try:
                await echo_once(connector, gateway, f"{SERVER}:80", expected)
            except ConnectRefused as exc:
                assert exc.status == 503
                refusals += 1
        assert refusals == 1
        text = await gateway.metrics()
        assert samples(text, "istio_tcp_connections_failed_total", response_flags="CONNECT",
                       destination_workload="server-dead") == 1  # fmt: skip
        dump = await gateway.config_dump()
        assert [e["uid"] for e in dump["gateway"]["endpoints"]["ejected"]] == ["cluster2//Pod/default/server-dead"]

        seen = live.streams_seen
        for _ in range(10):
            assert await echo_once(connector, gateway, f"{SERVER}:80", expected) == server_identity("server-a")
        assert live.streams_seen == seen + 10
        text = await gateway.metrics()
        assert samples(text, "istio_tcp_connections_failed_total", response_flags="CONNECT") == 1
    finally:
        await connector.pool.close()
        await live.close()
        await app.close()


async def test_streams_of_one_pooled_connection_spread_evenly(
    pki: TestPki, net: Net, gateway: GatewayProcess
) -> None:
    names = ["server-a", "server-b", "server-c"]
    state = base_state(net)
    state["services"].append(service("server", names))
    state["workloads"] += [workload(n, net.ip(11 + i), services=endpoint_of("server"), app="server")
                           for i, n in enumerate(names)]  # fmt: skip
    gateway.start(pki, state)
    app = await TcpApp(echo).start()
    servers = [await endpoint(pki, net.ip(11 + i), n, app) for i, n in enumerate(names)]
    connector = client_connector(pki)
    expected = [server_identity(n) for n in names]
    try:
        await gateway.wait_ready()
        total, batch = 300, 30  # fewer concurrent streams than one connection allows, so one connection
        served: list[Identity | None] = []
        for _ in range(total // batch):
            served += await asyncio.gather(*(echo_once(connector, gateway, f"{SERVER}:80", expected)
                                             for _ in range(batch)))  # fmt: skip
        assert connector.pool.connections_opened == 1
        counts = [s.streams_seen for s in servers]
        assert sum(counts) == total
        for n, count in zip(names, counts, strict=True):
            assert abs(count / total - 1 / 3) <= 0.10, f"{n} got {count} of {total}: {counts}"
            # ...and each stream's inner TLS really ended at the endpoint that counted it.
            assert served.count(server_identity(n)) == count
        # Baggage off: the peer from another network is only its verified identity (SPEC §4.3), nothing
        # read out of its certificate or guessed from the mesh state.
        text = await gateway.metrics()
        assert samples(text, "istio_tcp_connections_opened_total", source_principal=str(SLEEP),
                       source_workload="unknown", source_workload_namespace="unknown",
                       source_cluster="unknown") == total  # fmt: skip
    finally:
        await connector.pool.close()
        for s in servers:
            await s.close()
        await app.close()


async def test_service_with_waypoint_goes_there_unless_the_waypoint_sent_it(
    pki: TestPki, net: Net, gateway: GatewayProcess
) -> None:
    state = base_state(net)
    state["services"].append(service("server", ["server-a", "waypoint"], waypoint=f"network2/{net.ip(20)}"))
    state["workloads"] += [
        workload("server-a", net.ip(11), services=endpoint_of("server")),
        workload("waypoint", net.ip(20)),
    ]
    gateway.start(pki, state)
    app = await TcpApp(echo).start()
    pod = await endpoint(pki, net.ip(11), "server-a", app)
    waypoint = await endpoint(pki, net.ip(20), "waypoint", app)
    connector = client_connector(pki)
    expected = [server_identity("server-a"), server_identity("waypoint")]
    try:
        await gateway.wait_ready()
        assert await echo_once(connector, gateway, f"{SERVER}:80", expected) == server_identity("waypoint")
        from_waypoint = [("x-istio-source", "waypoint")]
        assert await echo_once(connector, gateway, f"{SERVER}:80", expected,
                               outer=from_waypoint) == server_identity("server-a")  # fmt: skip
        assert (waypoint.streams_seen, pod.streams_seen) == (1, 1)
        text = await gateway.metrics()
        assert samples(text, "istio_tcp_connections_opened_total", destination_workload="waypoint") == 1
        assert samples(text, "istio_tcp_connections_opened_total", destination_workload="server-a") == 1
    finally:
        await connector.pool.close()
        await pod.close()
        await waypoint.close()
        await app.close()


async def test_config_reload_applies_to_new_streams(pki: TestPki, net: Net, gateway: GatewayProcess) -> None:
    state = base_state(net)
    state["services"].append(service("server", ["server-a", "server-b"]))
    state["workloads"].append(workload("server-a", net.ip(11), services=endpoint_of("server")))
    gateway.start(pki, state)
    app = await TcpApp(echo).start()
    a = await endpoint(pki, net.ip(11), "server-a", app)
    b = await endpoint(pki, net.ip(12), "server-b", app)
    connector = client_connector(pki)
    expected = [server_identity("server-a"), server_identity("server-b")]
    try:
        await gateway.wait_ready()
        assert await echo_once(connector, gateway, f"{SERVER}:80", expected) == server_identity("server-a")
        state["workloads"][-1] = workload("server-b", net.ip(12), services=endpoint_of("server"))
        gateway.write_state(state)

        async def reloaded() -> bool:
            return (await gateway.config_dump())["stateGeneration"] >= 2

        await eventually(reloaded, "the gateway to load the new state", SETTLE)
        for _ in range(3):
            assert await echo_once(connector, gateway, f"{SERVER}:80", expected) == server_identity("server-b")
        assert (a.streams_seen, b.streams_seen) == (1, 3)
    finally:
        await connector.pool.close()
        await a.close()
        await b.close()
        await app.close()


async def test_sigterm_lets_an_open_stream_finish_then_exits_zero(
    pki: TestPki, net: Net, gateway: GatewayProcess
) -> None:
    state = base_state(net)
    state["services"].append(service("server", ["server-a"]))
    state["workloads"].append(workload("server-a", net.ip(11), services=endpoint_of("server")))
    gateway.start(pki, state, DRAIN_DEADLINE="30s")
    app = await TcpApp(digest_reply).start()
    ep = await endpoint(pki, net.ip(11), "server-a", app)
    connector = client_connector(pki)
    try:
        await gateway.wait_ready()
        tunnel = await connector.connect_double(SLEEP, [GATEWAY], gateway.address, f"{SERVER}:80", [],
                                                [server_identity("server-a")], [])  # fmt: skip
        reader, writer = stream_pair(tunnel)
        first = os.urandom(1 << 20)
        writer.write(first)
        await writer.drain()

        assert gateway.proc is not None
        gateway.proc.send_signal(signal.SIGTERM)
        # The GOAWAY tells us the drain has begun; the stream must carry on through it.
        outer_conns = connector.pool.connections()
        assert len(outer_conns) == 1

        async def goaway_seen() -> bool:
            return not outer_conns[0].usable

        await eventually(goaway_seen, "the gateway's GOAWAY", SETTLE)
        second = os.urandom(3 << 20)
        writer.write(second)
        writer.write_eof()
        n, digest = (await reader.read()).decode().split()
        assert (int(n), digest) == (len(first) + len(second), hashlib.sha256(first + second).hexdigest())

        assert await asyncio.to_thread(gateway.proc.wait, 30) == 0
        assert "drained" in gateway.output()
    finally:
        await connector.pool.close()
        await ep.close()
        await app.close()

