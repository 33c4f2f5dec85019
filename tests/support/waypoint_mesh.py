"""A small mesh around one waypoint, on loopback addresses `127.A.B.x` chosen per test module: the mesh
state file, the waypoint process, and the stand-in endpoints (ztunnels at `podIP:15008` in front of HTTP
apps), plus a remote network reached through a stand-in east-west gateway (double HBONE)."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hbone.identity import Identity
from tests.support.pki import TestPki
from tests.support.standins import GrpcApp, HttpApp, Live, StandInHbone
from tests.support.waypoint_proc import WaypointProcess, free_port

NETWORK = "net1"
REMOTE_NETWORK = "net2"
APP_PORT = 8080
GRPC_PORT = 50051
HBONE_PORT = 15008
WAYPOINT_HOST = "waypoint.default.svc.cluster.local"

# service name → last octet of its VIP
VIPS = {"echo": 100, "echo-v2": 101, "flaky": 102, "slow": 103, "grpc": 104, "strict": 105, "down": 106, "remote": 107,
        "custom": 108}
# endpoint workload name → (last octet of its IP, service, service account)
ENDPOINTS = {
    "echo-1": (11, "echo", "echo"),
    "echo-2": (12, "echo", "echo"),
    "echo-3": (13, "echo", "echo"),
    "echo-v2": (21, "echo-v2", "echo-v2"),
    "flaky": (31, "flaky", "flaky"),
    "slow": (41, "slow", "slow"),
    "grpc": (51, "grpc", "grpc"),
    "down": (61, "down", "down"),  # nothing listens there
    "custom": (71, "custom", "custom"),  # what a test puts there (`custom_upstream`)
}
NOT_STARTED = ("down", "custom")  # by `Endpoints`
# Not the `random` module: a test that seeds it must not make two runs pick the same addresses.
_RNG = random.SystemRandom()
WAYPOINT_IP, CLIENT_IP, GATEWAY_IP, REMOTE_ZTUNNEL_IP, REMOTE_APP_IP = 2, 3, 200, 201, 202


def ident(sa: str, ns: str = "default") -> Identity:
    return Identity("cluster.local", ns, sa)


WAYPOINT_ID = ident("waypoint")
CLIENT_ID = ident("sleep")
GATEWAY_ID = ident("eastwest", "istio-system")
REMOTE_ID = ident("remote")


def fqdn(service: str) -> str:
    return f"{service}.default.svc.cluster.local"


def baggage_of(name: str, cluster: str = "cluster1", version: str = "v9") -> str:
    return (f"k8s.cluster.name={cluster},k8s.namespace.name=default,k8s.deployment.name={name},"
            f"service.name={name},service.version={version}")  # fmt: skip


@dataclass
class Topology:
    base: str = field(default_factory=lambda: f"127.{_RNG.randint(64, 250)}.{_RNG.randint(1, 250)}")
    gateway_port: int = 0
    remote_port: int = 0

    def __post_init__(self) -> None:
        self.gateway_port = self.gateway_port or free_port(self.ip(GATEWAY_IP))
        self.remote_port = self.remote_port or free_port(self.ip(REMOTE_ZTUNNEL_IP))

    def ip(self, last: int) -> str:
        return f"{self.base}.{last}"

    def vip(self, service: str) -> str:
        return self.ip(VIPS[service])

    def authority(self, service: str) -> str:
        port = GRPC_PORT if service == "grpc" else 80
        return f"{self.vip(service)}:{port}"

    def config(self) -> str:
        waypoint_ref = {"destination": f"default/{WAYPOINT_HOST}", "hboneMtlsPort": HBONE_PORT}

        def workload(name: str, last: int | None, sa: str, services: dict[str, dict[int, int]],
                     **extra: object) -> dict[str, object]:  # fmt: skip
            return {
                "uid": f"cluster1//v1/Pod/default/{name}", "name": name, "namespace": "default",
                "serviceAccount": sa, "workloadIps": [self.ip(last)] if last else [], "protocol": "HBONE",
                "network": NETWORK, "clusterId": "cluster1", "workloadName": name.rsplit("-", 1)[0]
                if name.startswith("echo-") and name != "echo-v2" else name,
                "canonicalName": "echo" if name.startswith("echo") else name,
                "canonicalRevision": "v2" if name == "echo-v2" else "v1",
                "services": {f"default/{fqdn(s)}": ports for s, ports in services.items()}, **extra,
            }  # fmt: skip

        workloads = [
            workload("waypoint", WAYPOINT_IP, "waypoint", {"waypoint": {HBONE_PORT: HBONE_PORT}}),
            workload("sleep", CLIENT_IP, "sleep", {}),
        ]
        for name, (last, service, sa) in ENDPOINTS.items():
            port = GRPC_PORT if service == "grpc" else 80
            target = GRPC_PORT if service == "grpc" else APP_PORT
            workloads.append(workload(name, last, sa, {service: {port: target}}))
        workloads.append({
            "uid": f"{REMOTE_NETWORK}/SplitHorizonWorkload/istio-system/eastwest/default/{fqdn('remote')}",
            "name": "remote", "namespace": "default", "serviceAccount": "remote", "workloadIps": [],
            "protocol": "HBONE", "network": REMOTE_NETWORK, "capacity": 1,
            "networkGateway": {"destination": f"{REMOTE_NETWORK}/{self.ip(GATEWAY_IP)}",
                               "hboneMtlsPort": self.gateway_port},
            "services": {f"default/{fqdn('remote')}": {80: APP_PORT}},
        })  # fmt: skip
        workloads.append({
            "uid": "cluster2//v1/Pod/istio-system/eastwest", "name": "eastwest", "namespace": "istio-system",
            "serviceAccount": "eastwest", "workloadIps": [self.ip(GATEWAY_IP)], "protocol": "HBONE",
            "network": REMOTE_NETWORK, "clusterId": "cluster2",
        })  # fmt: skip
        services = [{"name": "waypoint", "namespace": "default", "hostname": WAYPOINT_HOST,
                     "vips": [f"{NETWORK}/{self.ip(99)}"], "ports": {HBONE_PORT: HBONE_PORT},
                     "subjectAltNames": [str(WAYPOINT_ID)]}]  # fmt: skip
        for name in VIPS:
            port = GRPC_PORT if name == "grpc" else 80
            target = GRPC_PORT if name == "grpc" else APP_PORT
            services.append({
                "name": name, "namespace": "default", "hostname": fqdn(name),
                "vips": [f"{NETWORK}/{self.vip(name)}"], "ports": {port: target},
                "subjectAltNames": [str(ident(name if name != "strict" else "echo"))], "waypoint": waypoint_ref,
            })  # fmt: skip
        routes = [
            {"name": "echo", "namespace": "default", "hostnames": [fqdn("echo")], "rules": [
                {"matches": [{"headers": [{"name": "x-version", "value": "v2"}]}],
                 "backendRefs": [{"name": "echo-v2", "port": 80}]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/v2"}}],
                 "backendRefs": [{"name": "echo-v2", "port": 80}]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/split"}}],
                 "backendRefs": [{"name": "echo", "port": 80, "weight": 80},
                                 {"name": "echo-v2", "port": 80, "weight": 20}]},
                {"backendRefs": [{"name": "echo", "port": 80}]},
            ]},
            {"name": "strict", "namespace": "default", "hostnames": [fqdn("strict")], "rules": [
                {"matches": [{"path": {"type": "Exact", "value": "/only"}}],
                 "backendRefs": [{"name": "echo", "port": 80}]},
            ]},
            {"name": "flaky", "namespace": "default", "hostnames": [fqdn("flaky")], "rules": [
                {"backendRefs": [{"name": "flaky", "port": 80}],
                 "retry": {"attempts": 2, "retryOn": ["503"], "backoff": "10ms"}},
            ]},
            {"name": "slow", "namespace": "default", "hostnames": [fqdn("slow")], "rules": [
                {"backendRefs": [{"name": "slow", "port": 80}], "timeouts": {"request": "300ms"}},
            ]},
        ]  # fmt: skip
        return yaml.safe_dump({"workloads": workloads, "services": services, "routes": routes}, sort_keys=False)

    def start_waypoint(self, pki: TestPki, tmp: Path, *, baggage: bool) -> WaypointProcess:
        config = tmp / "mesh.yaml"
        config.write_text(self.config())
        env = {
            "LOCAL_XDS_PATH": str(config),
            "CA_CERTS_DIR": str(pki.paths["cluster1"]),
            "PROXY_WORKLOAD_INFO": "default/waypoint/waypoint",
            "CLUSTER_ID": "cluster1",
            "NETWORK": NETWORK,
            "AMBIENT_ENABLE_BAGGAGE": "true" if baggage else "false",
            "DRAIN_DEADLINE": "5s",
        }
        return WaypointProcess(self.ip(WAYPOINT_IP), env, tmp / "waypoint.log").start()


class Endpoints:
    """Every endpoint's stand-in ztunnel (at podIP:15008) and app (at podIP:8080 or :50051), the remote
    network's gateway and ztunnel, all in the test's event loop."""

    def __init__(self, topo: Topology, pki: TestPki, *, response_baggage: bool) -> None:
        self.topo = topo
        self.pki = pki
        self.response_baggage = response_baggage
        self.apps: dict[str, HttpApp] = {}
        self.grpc = GrpcApp()
        self.ztunnels: dict[str, StandInHbone] = {}
        self.gateway: StandInHbone | None = None
        self.remote: StandInHbone | None = None
        self.remote_app = HttpApp("remote")

    async def start(self) -> Endpoints:
        t = self.topo
        for name, (last, service, sa) in ENDPOINTS.items():
            if name in NOT_STARTED:
                continue
            bag = baggage_of(f"{name}-bg") if self.response_baggage else None
            self.ztunnels[name] = await StandInHbone(self.pki, ident(sa), response_baggage=bag).start(
                t.ip(last), HBONE_PORT
            )
            if service == "grpc":
                await self.grpc.start(t.ip(last), GRPC_PORT)
            else:
                self.apps[name] = await HttpApp(name).start(t.ip(last), APP_PORT)
        remote_authority = f"{fqdn('remote')}:80"
        await self.remote_app.start(t.ip(REMOTE_APP_IP), APP_PORT)
        bag = baggage_of("remote-bg", "cluster2") if self.response_baggage else None
        self.remote = await StandInHbone(self.pki, REMOTE_ID, cluster="cluster2", response_baggage=bag,
                                         targets={remote_authority: (t.ip(REMOTE_APP_IP), APP_PORT)}
                                         ).start(t.ip(REMOTE_ZTUNNEL_IP), t.remote_port)  # fmt: skip
        # A gateway never answers with baggage: it does not see the inner CONNECT at all.
        self.gateway = await StandInHbone(self.pki, GATEWAY_ID, cluster="cluster2",
                                          targets={remote_authority: (t.ip(REMOTE_ZTUNNEL_IP), t.remote_port)}
                                          ).start(t.ip(GATEWAY_IP), t.gateway_port)  # fmt: skip
        return self

    async def close(self) -> None:
        for z in self.ztunnels.values():
            await z.close()
        for a in self.apps.values():
            await a.close()
        await self.grpc.close()
        await self.remote_app.close()
        for s in (self.gateway, self.remote):
            if s is not None:
                await s.close()


AppHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Coroutine[object, object, None]]


@contextlib.asynccontextmanager
async def custom_upstream(topo: Topology, pki: TestPki, app: AppHandler) -> AsyncIterator[None]:
    """The `custom` service's endpoint for the time of a test: a stand-in ztunnel at podIP:15008 in front of
    `app`, a raw TCP handler on podIP:8080 (HTTP/1.1 or HTTP/2, as the client speaks to the waypoint), so that
    a test can make the upstream misbehave. Its connections are closed at the end, whatever `app` does."""
    last = ENDPOINTS["custom"][0]
    live = Live()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with live.track(writer), contextlib.suppress(ConnectionError):
            await app(reader, writer)
        writer.close()

    ztunnel = await StandInHbone(pki, ident("custom")).start(topo.ip(last), HBONE_PORT)
    server = await asyncio.start_server(serve, topo.ip(last), APP_PORT, reuse_address=True)
    try:
        yield
    finally:
        server.close()
        await live.close()
        await ztunnel.close()
