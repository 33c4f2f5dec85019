"""Typed, immutable mesh state: workloads, services, L4 policies and waypoint routes (SPEC §8).

Everything here is frozen and hashable, so a loaded state can be shared by every task without locks, and
workloads/endpoints can key dictionaries (connection counts, caches) across config reloads.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import TypeVar

from hbone.baggage import Baggage
from hbone.identity import DEFAULT_TRUST_DOMAIN, Identity

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

DEFAULT_HBONE_PORT = 15008


def canonical_ip(ip: IPAddress | str) -> IPAddress:
    """The address as the config names it: dual-stack sockets report IPv4 peers as ::ffff:a.b.c.d."""
    if isinstance(ip, str):
        ip = ipaddress.ip_address(ip)
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


K = TypeVar("K")
V = TypeVar("V")


class FrozenMap(Mapping[K, V]):
    """A read-only, hashable mapping (dicts would make the frozen dataclasses unhashable)."""

    __slots__ = ("_data", "_hash")

    def __init__(self, data: Mapping[K, V] | None = None) -> None:
        self._data: dict[K, V] = dict(data or {})
        self._hash: int | None = None

    def __getitem__(self, key: K) -> V:
        return self._data[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._data.items()))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self._data == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"


PortMap = FrozenMap[int, int]


class Protocol(StrEnum):
    HBONE = "HBONE"
    TCP = "TCP"


class HealthStatus(StrEnum):
    HEALTHY = "Healthy"
    UNHEALTHY = "Unhealthy"


class NetworkMode(StrEnum):
    STANDARD = "Standard"
    HOST_NETWORK = "HostNetwork"


class AppTunnelProtocol(StrEnum):
    NONE = "NONE"
    PROXY = "PROXY"


@dataclass(frozen=True, slots=True)
class NetworkAddress:
    """An IP qualified by its network: the same IP may exist in two networks."""

    network: str
    address: IPAddress

    def __str__(self) -> str:
        return f"{self.network}/{self.address}"


@dataclass(frozen=True, slots=True)
class NamespacedHostname:
    namespace: str
    hostname: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.hostname}"


@dataclass(frozen=True, slots=True)
class GatewayAddress:
    """How to reach a waypoint or a network's east-west gateway."""

    destination: NetworkAddress | NamespacedHostname
    hbone_mtls_port: int = DEFAULT_HBONE_PORT


@dataclass(frozen=True, slots=True)
class Locality:
    region: str = ""
    zone: str = ""
    subzone: str = ""


@dataclass(frozen=True, slots=True)
class ApplicationTunnel:
    protocol: AppTunnelProtocol = AppTunnelProtocol.NONE
    port: int | None = None


@dataclass(frozen=True, slots=True)
class Workload:
    uid: str
    name: str
    namespace: str
    service_account: str = "default"
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    workload_ips: tuple[IPAddress, ...] = ()
    protocol: Protocol = Protocol.TCP
    network: str = ""
    cluster_id: str = ""
    workload_name: str = ""
    workload_type: str = "deployment"
    canonical_name: str = ""
    canonical_revision: str = ""
    locality: Locality = Locality()
    node: str = ""
    hostname: str = ""
    network_mode: NetworkMode = NetworkMode.STANDARD
    native_tunnel: bool = False
    application_tunnel: ApplicationTunnel | None = None
    waypoint: GatewayAddress | None = None
    network_gateway: GatewayAddress | None = None
    authorization_policies: tuple[str, ...] = ()
    status: HealthStatus = HealthStatus.HEALTHY
    capacity: int = 1
    # "<namespace>/<hostname>" → {servicePort: targetPort}; this is what makes the workload an endpoint.
    services: FrozenMap[str, PortMap] = field(default_factory=FrozenMap)

    @property
    def identity(self) -> Identity:
        return Identity.of(self.namespace, self.service_account, self.trust_domain)

    @property
    def healthy(self) -> bool:
        return self.status is HealthStatus.HEALTHY

    def baggage(self) -> Baggage:
        """This workload's peer metadata as sent on CONNECTs and in 200 responses."""
        return Baggage(
            cluster_id=self.cluster_id or None,
            namespace=self.namespace or None,
            workload_type=self.workload_type or None,
            workload_name=self.workload_name or None,
            service_name=self.canonical_name or None,
            service_version=self.canonical_revision or None,
            region=self.locality.region or None,
            zone=self.locality.zone or None,
        )


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A workload serving a service, with the target port it serves the asked-for service port on."""

    workload: Workload
    port: int


class LoadBalancerScope(StrEnum):
    REGION = "Region"
    ZONE = "Zone"
    SUBZONE = "Subzone"
    NODE = "Node"
    CLUSTER = "Cluster"
    NETWORK = "Network"


class LoadBalancerMode(StrEnum):
    STANDARD = "Standard"
    STRICT = "Strict"
    FAILOVER = "Failover"
    PASSTHROUGH = "Passthrough"  # ztunnel does not choose an endpoint: the original address is dialled as is


class HealthPolicy(StrEnum):
    ONLY_HEALTHY = "OnlyHealthy"
    ALLOW_ALL = "AllowAll"


@dataclass(frozen=True, slots=True)
class LoadBalancer:
    routing_preferences: tuple[LoadBalancerScope, ...] = ()
    mode: LoadBalancerMode = LoadBalancerMode.STANDARD
    health_policy: HealthPolicy = HealthPolicy.ONLY_HEALTHY


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    namespace: str
    hostname: str
    vips: tuple[NetworkAddress, ...] = ()
    ports: PortMap = field(default_factory=FrozenMap)
    subject_alt_names: tuple[Identity, ...] = ()
    waypoint: GatewayAddress | None = None
    load_balancer: LoadBalancer | None = None
    canonical: bool = False

    @property
    def key(self) -> str:
        """The `<namespace>/<hostname>` form that workloads' `services` maps use."""
        return f"{self.namespace}/{self.hostname}"


# --- L4 authorization -------------------------------------------------------------------------------


class Scope(StrEnum):
    GLOBAL = "Global"
    NAMESPACE = "Namespace"
    WORKLOAD_SELECTOR = "WorkloadSelector"


class Action(StrEnum):
    ALLOW = "Allow"
    DENY = "Deny"


class MatchKind(StrEnum):
    EXACT = "Exact"
    PREFIX = "Prefix"
    SUFFIX = "Suffix"
    PRESENCE = "Presence"


@dataclass(frozen=True, slots=True)
class StringMatch:
    kind: MatchKind
    value: str = ""

    def matches(self, text: str) -> bool:
        if self.kind is MatchKind.EXACT:
            return text == self.value
        if self.kind is MatchKind.PREFIX:
            return text.startswith(self.value)
        if self.kind is MatchKind.SUFFIX:
            return text.endswith(self.value)
        return text != ""


@dataclass(frozen=True, slots=True)
class ServiceAccountMatch:
    namespace: str
    service_account: str


@dataclass(frozen=True, slots=True)
class RbacMatch:
    """One match of a clause; every non-empty field must pass (see mesh.authz)."""

    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()
    source_ips: tuple[IPNetwork, ...] = ()
    not_source_ips: tuple[IPNetwork, ...] = ()
    destination_ips: tuple[IPNetwork, ...] = ()
    not_destination_ips: tuple[IPNetwork, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()


# rules → clauses → matches
Clause = tuple[RbacMatch, ...]
Rule = tuple[Clause, ...]


@dataclass(frozen=True, slots=True)
class Authorization:
    name: str
    namespace: str
    scope: Scope
    action: Action
    dry_run: bool = False
    rules: tuple[Rule, ...] = ()

    @property
    def key(self) -> str:
        """The `<namespace>/<name>` form that workloads' `authorizationPolicies` lists use."""
        return f"{self.namespace}/{self.name}"


# --- Waypoint routes (ours; shaped like a Gateway API HTTPRoute) ---------------------------------------


class PathMatchType(StrEnum):
    PATH_PREFIX = "PathPrefix"
    EXACT = "Exact"


class HeaderMatchType(StrEnum):
    EXACT = "Exact"
    REGULAR_EXPRESSION = "RegularExpression"


@dataclass(frozen=True, slots=True)
class PathMatch:
    type: PathMatchType
    value: str

    def matches(self, path: str) -> bool:
        path = path.split("?", 1)[0]
        if self.type is PathMatchType.EXACT:
            return path == self.value
        # Gateway API prefixes match whole path elements: /v2 matches /v2 and /v2/x but not /v2x.
        prefix = self.value.rstrip("/")
        return prefix == "" or path == prefix or path.startswith(prefix + "/")


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    name: str  # lowercase: HTTP header names are case-insensitive
    value: str
    type: HeaderMatchType = HeaderMatchType.EXACT
    pattern: re.Pattern[str] | None = field(default=None, compare=False)

    def matches(self, value: str | None) -> bool:
        if value is None:
            return False
        if self.type is HeaderMatchType.EXACT:
            return value == self.value
        assert self.pattern is not None
        return self.pattern.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """All given conditions must hold; an empty match matches every request."""

    path: PathMatch | None = None
    headers: tuple[HeaderMatch, ...] = ()
    method: str | None = None

    def matches(self, method: str, path: str, headers: Mapping[str, str]) -> bool:
        """`headers` is keyed by lowercase name."""
        if self.method is not None and method != self.method:
            return False
        if self.path is not None and not self.path.matches(path):
            return False
        return all(h.matches(headers.get(h.name)) for h in self.headers)


@dataclass(frozen=True, slots=True)
class BackendRef:
    name: str
    namespace: str
    port: int
    weight: int = 1


# Durations are float seconds; the metadata lets /config_dump print them back in the config's own form.
_DURATION = {"duration": True}


@dataclass(frozen=True, slots=True)
class Timeouts:
    request: float | None = field(default=None, metadata=_DURATION)
    backend_request: float | None = field(default=None, metadata=_DURATION)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 1
    retry_on: tuple[str, ...] = ()  # connect-failure, reset, 5xx, gateway-error, or a status code
    backoff: float | None = field(default=None, metadata=_DURATION)


@dataclass(frozen=True, slots=True)
class RouteRule:
    matches: tuple[RouteMatch, ...] = (RouteMatch(),)
    backend_refs: tuple[BackendRef, ...] = ()
    timeouts: Timeouts | None = None
    retry: RetryPolicy | None = None

    def matches_request(self, method: str, path: str, headers: Mapping[str, str]) -> bool:
        return any(m.matches(method, path, headers) for m in self.matches)


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    namespace: str
    hostnames: tuple[str, ...] = ()  # lower case; empty: every host
    rules: tuple[RouteRule, ...] = ()

    def matches_host(self, host: str) -> bool:
        """Gateway API hostname matching: exact, or `*.<domain>` for any host with one or more labels in front
        of `.<domain>` (not `<domain>` itself); case-insensitive."""
        if not self.hostnames:
            return True
        host = host.lower()
        for name in self.hostnames:
            if name.startswith("*."):
                if host.endswith(name[1:]):
                    return True
            elif host == name:
                return True
        return False
