"""Where an outer CONNECT may go (SPEC §5): the service named by its authority, and the local workloads
that can take the stream, either the service's endpoints or its waypoint.

Pure: it reads one snapshot of the mesh state and returns the candidates; choosing among them is the
balancer's job, so that every outer stream gets its own choice.
"""

from __future__ import annotations

from dataclasses import dataclass

from hbone.authority import Authority
from mesh.model import DEFAULT_HBONE_PORT, HealthPolicy, Service, Workload
from mesh.state import MeshState

# The value a waypoint puts in `x-istio-source` on its outer CONNECT: its traffic has been through the
# waypoint already and must not be sent back to it.
FROM_WAYPOINT = "waypoint"


class NoRoute(Exception):
    """The stream cannot be served (answered 503). `service` is set when the authority did name one."""

    def __init__(self, reason: str, service: Service | None = None) -> None:
        super().__init__(reason)
        self.service = service


CandidateKey = tuple[str, str, int]


@dataclass(frozen=True, slots=True)
class Candidate:
    """A local workload that can take the stream, and the HBONE address of its ztunnel (or itself)."""

    workload: Workload
    address: tuple[str, int]

    @property
    def key(self) -> CandidateKey:
        # The workload's uid and address, not the Workload itself: a config reload that only changes a
        # workload's labels must not reset its connection count or its ejection.
        return (self.workload.uid, *self.address)


@dataclass(frozen=True, slots=True)
class Destination:
    service: Service
    service_port: int
    candidates: tuple[Candidate, ...]
    via_waypoint: bool


def resolve(state: MeshState, network: str, target: Authority, source: str | None) -> Destination:
    """The candidates for a CONNECT to `target` (`<service FQDN>:<service port>`); raises NoRoute."""
    if target.is_ip:
        raise NoRoute(f"authority {target} is an IP address; the gateway only serves <service hostname>:<port>")
    service = state.service_by_hostname(target.host)
    if service is None:
        raise NoRoute(f"no service has hostname {target.host!r}")
    port = target.port
    endpoints = state.endpoints(service, port)
    if port not in service.ports and not endpoints:
        raise NoRoute(f"service {service.hostname} has no port {port}", service)
    if service.waypoint is not None and (source or "").strip().lower() != FROM_WAYPOINT:
        return Destination(service, port, _waypoint_candidates(state, network, service), via_waypoint=True)
    lb = service.load_balancer
    allow_unhealthy = lb is not None and lb.health_policy is HealthPolicy.ALLOW_ALL
    local = [ep.workload for ep in endpoints if ep.workload.network == network and ep.workload.workload_ips]
    usable = [w for w in local if allow_unhealthy or w.healthy]
    if not usable:
        elsewhere = len(endpoints) - len(local)
        raise NoRoute(
            f"service {service.hostname}:{port} has no healthy endpoint on network {network or '(default)'!r} "
            f"({len(local)} local endpoint(s) unhealthy, {elsewhere} on other networks or without an IP)",
            service,
        )
    # An endpoint's ztunnel takes HBONE on the endpoint's own IP, at the hboneMtlsPort convention.
    return Destination(service, port, tuple(Candidate(w, (str(w.workload_ips[0]), DEFAULT_HBONE_PORT))
                                            for w in usable), via_waypoint=False)  # fmt: skip


def _waypoint_candidates(state: MeshState, network: str, service: Service) -> tuple[Candidate, ...]:
    address = service.waypoint
    assert address is not None
    found = [w for w in state.gateway_workloads(address) if w.network == network and w.workload_ips]
    healthy = tuple(Candidate(w, (str(w.workload_ips[0]), address.hbone_mtls_port)) for w in found if w.healthy)
    if not healthy:
        why = "has no healthy workload on this network" if found else "is not in the mesh state"
        raise NoRoute(f"service {service.hostname} uses waypoint {address.destination}, which {why}", service)
    return healthy
