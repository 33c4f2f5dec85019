"""The topology as typed values: clusters, networks, gateways, waypoints, apps and services.

A `Topology` is what a person describes in one YAML file (see `topology.loader` for the format). It holds
no addresses beyond the ones the person pinned; `topology.addressing` assigns the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network

from hbone.identity import Identity

DEFAULT_NAMESPACE = "default"
GATEWAY_NAMESPACE = "istio-system"
DOMAIN_SUFFIX = "svc.cluster.local"
HBONE_PORT = 15008
DEFAULT_HTTP_PORT = 8080
DEFAULT_TCP_PORT = 9000


class TopologyError(ValueError):
    """A topology file we refuse; the message names the file and the key path."""


@dataclass(frozen=True, slots=True)
class WaypointSpec:
    name: str
    namespace: str
    service_account: str
    cluster: str
    node: str  # where its process runs (the cluster's first node unless pinned)
    ip: IPv4Address | None = None

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.{DOMAIN_SUFFIX}"

    @property
    def ref(self) -> WaypointRef:
        return WaypointRef(self.namespace, self.name)


@dataclass(frozen=True, slots=True)
class GatewaySpec:
    """The east-west gateway of one network; it runs in `cluster` and is reached at `address`."""

    name: str
    namespace: str
    service_account: str
    cluster: str
    network: str
    address: IPv4Address | None = None  # in the transit network; None = assign one


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    id: str
    network: str
    nodes: tuple[str, ...]
    waypoints: tuple[WaypointSpec, ...] = ()
    gateway: GatewaySpec | None = None


@dataclass(frozen=True, slots=True)
class NetworkSpec:
    name: str
    pod_cidr: IPv4Network
    clusters: tuple[str, ...]  # ids, in file order
    gateway: GatewaySpec | None = None


@dataclass(frozen=True, slots=True)
class AppSpec:
    """A deployment of the sample app: `replicas` pods named `<name>-<i>` on one node."""

    name: str
    namespace: str
    service_account: str
    app: str  # the `app` label: canonical service name, what services select
    version: str
    cluster: str
    node: str
    replicas: int = 1
    ips: tuple[IPv4Address, ...] = ()  # pinned pod IPs, one per replica, or empty
    http_port: int = DEFAULT_HTTP_PORT
    tcp_port: int | None = DEFAULT_TCP_PORT

    @property
    def pods(self) -> tuple[str, ...]:
        return tuple(f"{self.name}-{i}" for i in range(self.replicas))

    @property
    def ports(self) -> tuple[int, ...]:
        return (self.http_port,) if self.tcp_port is None else (self.http_port, self.tcp_port)


@dataclass(frozen=True, slots=True)
class WaypointRef:
    """A service's waypoint, by name: each cluster uses the nearest waypoint of that name (its own, else one
    on its network, else one on another network through that network's gateway)."""

    namespace: str
    name: str

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.{DOMAIN_SUFFIX}"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.hostname}"


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    name: str
    namespace: str
    ports: dict[int, int]  # servicePort: targetPort
    selector: str  # the `app` label of its endpoints, in every cluster (namespace sameness)
    vip: IPv4Address | None = None
    waypoint: WaypointRef | None = None

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.{DOMAIN_SUFFIX}"

    @property
    def key(self) -> str:
        """`<namespace>/<hostname>`, as a workload's `services` map names it."""
        return f"{self.namespace}/{self.hostname}"


@dataclass(frozen=True, slots=True)
class Topology:
    source: str
    trust_domain: str
    clusters: tuple[ClusterSpec, ...]
    networks: tuple[NetworkSpec, ...]
    apps: tuple[AppSpec, ...]
    services: tuple[ServiceSpec, ...]
    transit_cidr: IPv4Network
    service_cidr: IPv4Network
    _by_id: dict[str, ClusterSpec] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._by_id.update({c.id: c for c in self.clusters})

    def cluster(self, cluster_id: str) -> ClusterSpec:
        return self._by_id[cluster_id]

    def network(self, name: str) -> NetworkSpec:
        return next(n for n in self.networks if n.name == name)

    def network_of(self, cluster_id: str) -> str:
        return self._by_id[cluster_id].network

    @property
    def waypoints(self) -> tuple[WaypointSpec, ...]:
        return tuple(w for c in self.clusters for w in c.waypoints)

    @property
    def gateways(self) -> tuple[GatewaySpec, ...]:
        return tuple(n.gateway for n in self.networks if n.gateway is not None)

    def endpoints(self, service: ServiceSpec) -> tuple[AppSpec, ...]:
        """The apps backing `service`, in every cluster."""
        return tuple(a for a in self.apps if a.namespace == service.namespace and a.app == service.selector)

    def identity(self, namespace: str, service_account: str) -> Identity:
        return Identity(self.trust_domain, namespace, service_account)
