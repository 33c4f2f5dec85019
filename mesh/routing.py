"""Where a connection goes next (SPEC §3.3, §5, §6): a waypoint, a pod over HBONE, a remote network's
gateway (double HBONE), a plain TCP workload, or straight through.

The decision is pure: it reads the mesh state and returns a `Hop`; ztunnel and the waypoint carry it out.
"""

from __future__ import annotations

import enum
import ipaddress
import random
from dataclasses import dataclass

from hbone.authority import format_authority
from hbone.identity import Identity
from mesh.loadbalance import choose_endpoint
from mesh.model import (
    GatewayAddress,
    LoadBalancerMode,
    NamespacedHostname,
    NetworkAddress,
    Protocol,
    Service,
    Workload,
)
from mesh.state import MeshState


class HopKind(enum.Enum):
    HBONE = "hbone"  # mTLS + CONNECT to <ip>:15008 (a pod's ztunnel or a waypoint)
    DOUBLE_HBONE = "double-hbone"  # through a remote network's east-west gateway
    TCP = "tcp"  # plain TCP to a workload that is not in the mesh
    PASSTHROUGH = "passthrough"  # not a mesh destination: to the original address


class RoutingError(Exception):
    """No way to reach the destination; `flag` is the metric's response_flags value, `service` the service
    the client meant when that much was resolved (for destination_service)."""

    flag = "CONNECT"

    def __init__(self, message: str, service: Service | None = None) -> None:
        super().__init__(message)
        self.service = service


@dataclass(frozen=True, slots=True)
class Hop:
    kind: HopKind
    address: tuple[str, int]  # the TCP address dialled: next hop ip:15008, gateway ip:15008, or ip:port
    authority: str = ""  # the CONNECT :authority
    expected: frozenset[Identity] = frozenset()  # identities the next hop may present
    inner_expected: frozenset[Identity] = frozenset()  # double HBONE: the destination service's SANs
    workload: Workload | None = None  # the workload we connect to (pod, waypoint; the remote endpoint)
    service: Service | None = None  # the service the client meant, for destination_service
    via_waypoint: bool = False
    gateway: Workload | None = None
    target_port: int = 0

    @property
    def service_hostname(self) -> str | None:
        return self.service.hostname if self.service is not None else None


def _ip_text(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    return str(ip)


class Router:
    """Routing decisions over one snapshot of the mesh state, from the point of view of `network`."""

    def __init__(self, state: MeshState, network: str, rng: random.Random | None = None) -> None:
        self.state = state
        self.network = network
        self.rng = rng

    # -- entry points ------------------------------------------------------------------------------
    def route(
        self,
        source: Workload | None,
        dst_ip: str,
        dst_port: int,
        *,
        from_waypoint: bool = False,
    ) -> Hop:
        """Route a captured connection to `dst_ip:dst_port` (a service VIP, a pod IP, or anything else).

        `from_waypoint`: the caller is a waypoint routing a request, which always goes to the destination
        itself (a pod, or one of the service's endpoints): Istio's waypoint never hands its traffic on to
        another waypoint (SPEC §6)."""
        service = self.state.service_by_vip(self.network, dst_ip)
        if service is not None:
            return self.route_service(
                source, service, dst_port, original=(dst_ip, dst_port), from_waypoint=from_waypoint
            )
        workload = self.state.workload_by_address(self.network, dst_ip)
        if workload is not None:
            return self.route_workload(source, workload, dst_ip, dst_port, from_waypoint=from_waypoint)
        return Hop(HopKind.PASSTHROUGH, (dst_ip, dst_port))  # not a mesh destination

    def route_hostname(
        self, source: Workload | None, hostname: str, port: int, *, from_waypoint: bool = False
    ) -> Hop:
        """Route to a service by hostname (SOCKS5 with a domain name)."""
        service = self.state.service_by_hostname(hostname.rstrip(".").lower(), source.namespace if source else None)
        if service is None:
            raise RoutingError(f"unknown hostname {hostname!r}: no service has it")
        original = None
        for vip in service.vips:
            if vip.network == self.network:
                original = (_ip_text(vip.address), port)
                break
        return self.route_service(source, service, port, original=original, from_waypoint=from_waypoint)

    def route_service(
        self,
        source: Workload | None,
        service: Service,
        port: int,
        *,
        original: tuple[str, int] | None = None,
        from_waypoint: bool = False,
    ) -> Hop:
        """A connection to a service: its waypoint if it has one (not `from_waypoint`: see `route`), else one of
        its endpoints."""
        try:
            return self._route_service(source, service, port, original, from_waypoint)
        except RoutingError as exc:
            if exc.service is None:
                exc.service = service
            raise

    def _route_service(
        self,
        source: Workload | None,
        service: Service,
        port: int,
        original: tuple[str, int] | None,
        from_waypoint: bool,
    ) -> Hop:
        if service.waypoint is not None and not from_waypoint:
            waypoint = self._pick_gateway_workload(service.waypoint, source)
            if waypoint is None:
                raise RoutingError(
                    f"service {service.hostname} names waypoint {service.waypoint.destination}, "
                    "which is not in the mesh state"
                )
            authority = format_authority(*original) if original else f"{service.hostname}:{port}"
            return self._to_waypoint(waypoint, service.waypoint, authority, service, port, source)
        lb = service.load_balancer
        if lb is not None and lb.mode is LoadBalancerMode.PASSTHROUGH and not from_waypoint:
            # As ztunnel: no endpoint is chosen; the connection goes to the address the client dialled, in plain
            # TCP, and (ztunnel's labels) names no service.
            if original is None:
                raise RoutingError(f"service {service.hostname} is in Passthrough mode and has no VIP on this network")
            return Hop(HopKind.PASSTHROUGH, original)
        endpoints = self.state.endpoints(service, port)
        chosen = choose_endpoint(
            endpoints, source=source, network=self.network, load_balancer=service.load_balancer, rng=self.rng
        )
        if chosen is None:
            if not endpoints:
                raise RoutingError(f"service {service.hostname} has no endpoint for port {port}")
            raise RoutingError(f"service {service.hostname}:{port} has no healthy endpoint")
        return self.to_endpoint(chosen.workload, chosen.port, service, port)

    def route_workload(
        self,
        source: Workload | None,
        workload: Workload,
        dst_ip: str,
        dst_port: int,
        *,
        from_waypoint: bool = False,
    ) -> Hop:
        """A connection addressed to a pod IP: its waypoint if it has one (not `from_waypoint`: see `route`)."""
        if workload.waypoint is not None and not from_waypoint:
            waypoint = self._pick_gateway_workload(workload.waypoint, source)
            if waypoint is None:
                raise RoutingError(
                    f"workload {workload.name} names waypoint {workload.waypoint.destination}, "
                    "which is not in the mesh state"
                )
            is_self = source is not None and source.uid == waypoint.uid
            if not is_self:
                authority = format_authority(dst_ip, dst_port)
                return self._to_waypoint(waypoint, workload.waypoint, authority, None, dst_port, source)
        if workload.protocol is Protocol.HBONE:
            return Hop(
                HopKind.HBONE,
                (dst_ip, 15008),
                authority=format_authority(dst_ip, dst_port),
                expected=frozenset([workload.identity]),
                workload=workload,
                target_port=dst_port,
            )
        return Hop(HopKind.TCP, (dst_ip, dst_port), workload=workload, target_port=dst_port)

    # -- building hops ------------------------------------------------------------------------------
    def to_endpoint(self, workload: Workload, target_port: int, service: Service, service_port: int) -> Hop:
        """The hop to one chosen endpoint of `service`: local over HBONE or TCP, remote through its gateway."""
        if workload.network != self.network:
            return self._through_gateway(workload, service, service_port)
        ip = self._local_ip(workload)
        if workload.protocol is Protocol.HBONE:
            return Hop(
                HopKind.HBONE,
                (ip, 15008),
                authority=format_authority(ip, target_port),
                expected=frozenset([workload.identity, *service.subject_alt_names]),
                workload=workload,
                service=service,
                target_port=target_port,
            )
        return Hop(HopKind.TCP, (ip, target_port), workload=workload, service=service, target_port=target_port)

    def _to_waypoint(
        self,
        waypoint: Workload,
        address: GatewayAddress,
        authority: str,
        service: Service | None,
        port: int,
        source: Workload | None,
    ) -> Hop:
        waypoint_sans: tuple[Identity, ...] = ()
        waypoint_service = self._waypoint_service(address)
        if waypoint_service is not None:
            waypoint_sans = waypoint_service.subject_alt_names
        if waypoint.network != self.network:
            if service is None:
                raise RoutingError("a workload-addressed connection cannot cross networks to a waypoint")
            hop = self._through_gateway(waypoint, service, port)
            inner = frozenset([*waypoint_sans]) or hop.inner_expected
            return Hop(
                HopKind.DOUBLE_HBONE,
                hop.address,
                hop.authority,
                hop.expected,
                inner,
                waypoint,
                service,
                via_waypoint=True,
                gateway=hop.gateway,
                target_port=port,
            )
        ip = self._local_ip(waypoint)
        return Hop(
            HopKind.HBONE,
            (ip, address.hbone_mtls_port),
            authority=authority,
            expected=frozenset([waypoint.identity, *waypoint_sans]),
            workload=waypoint,
            service=service,
            via_waypoint=True,
            target_port=port,
        )

    def _through_gateway(self, workload: Workload, service: Service, service_port: int) -> Hop:
        if workload.network_gateway is None:
            raise RoutingError(f"endpoint {workload.uid} is on network {workload.network!r} but has no networkGateway")
        gateway = self.state.resolve_gateway(workload.network_gateway)
        if gateway is None:
            raise RoutingError(f"network gateway {workload.network_gateway.destination} is not in the mesh state")
        if not service.subject_alt_names:
            raise RoutingError(
                f"service {service.hostname} lists no subjectAltNames: a remote endpoint cannot be "
                "verified through the gateway"
            )
        gw_ip = self._gateway_ip(gateway, workload.network_gateway)
        gateway_service = self._waypoint_service(workload.network_gateway)
        gateway_sans = gateway_service.subject_alt_names if gateway_service is not None else ()
        return Hop(
            HopKind.DOUBLE_HBONE,
            (gw_ip, workload.network_gateway.hbone_mtls_port),
            authority=f"{service.hostname}:{service_port}",
            expected=frozenset([gateway.identity, *gateway_sans]),
            inner_expected=frozenset(service.subject_alt_names),
            workload=workload,
            service=service,
            gateway=gateway,
            target_port=service_port,
        )

    # -- helpers ----------------------------------------------------------------------------------------
    def _pick_gateway_workload(self, address: GatewayAddress, source: Workload | None) -> Workload | None:
        candidates = [w for w in self.state.gateway_workloads(address) if w.healthy]
        if not candidates:
            return None
        if len(candidates) == 1:
            return candidates[0]
        return (self.rng or random).choice(candidates)

    def _waypoint_service(self, address: GatewayAddress) -> Service | None:
        dest = address.destination
        if isinstance(dest, NamespacedHostname):
            return self.state.service_by_key(str(dest)) or self.state.service_by_hostname(dest.hostname, dest.namespace)
        return None

    def _local_ip(self, workload: Workload) -> str:
        if not workload.workload_ips:
            raise RoutingError(f"workload {workload.uid} has no IP address")
        return _ip_text(workload.workload_ips[0])

    @staticmethod
    def _gateway_ip(gateway: Workload, address: GatewayAddress) -> str:
        if isinstance(address.destination, NetworkAddress):
            return _ip_text(address.destination.address)
        if not gateway.workload_ips:
            raise RoutingError(f"gateway workload {gateway.uid} has no IP address")
        return _ip_text(gateway.workload_ips[0])
