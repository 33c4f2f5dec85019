"""The original destination a CONNECT names: a service VIP:port, a pod IP:port, or `<service FQDN>:<port>`
(double HBONE through a gateway) (SPEC §3.3, §6)."""

from __future__ import annotations

from dataclasses import dataclass

from hbone.authority import Authority
from mesh.model import Service, Workload
from mesh.state import MeshState


@dataclass(frozen=True, slots=True)
class OriginalDestination:
    authority: str
    port: int
    service: Service | None  # the service the client called (also the pod's service, when it has one)
    workload: Workload | None = None  # set when the client called a pod IP directly
    ip: str = ""


class UnknownDestination(LookupError):
    """The authority names nothing this waypoint knows; the CONNECT is answered 503."""


def resolve(state: MeshState, network: str, target: Authority) -> OriginalDestination:
    text = str(target)
    if target.ip is None:
        service = state.service_by_hostname(target.host)
        if service is None:
            raise UnknownDestination(f"no service has hostname {target.host!r}")
        return OriginalDestination(text, target.port, _with_port(service, target.port))
    service = state.service_by_vip(network, target.ip)
    if service is not None:
        return OriginalDestination(text, target.port, _with_port(service, target.port), ip=target.host)
    workload = state.workload_by_address(network, target.ip)
    if workload is None:
        where = f" on network {network!r}" if network else ""
        raise UnknownDestination(f"{target.host} is neither a service VIP nor a workload IP{where}")
    return OriginalDestination(text, target.port, _service_of_pod(state, workload, target.port), workload,
                               target.host)  # fmt: skip


def _with_port(service: Service, port: int) -> Service:
    if service.ports and port not in service.ports:
        ports = ", ".join(str(p) for p in service.ports)
        raise UnknownDestination(f"service {service.hostname} has no port {port} (it has {ports})")
    return service


def _service_of_pod(state: MeshState, workload: Workload, target_port: int) -> Service | None:
    """For metrics: the service through which the pod serves this port, if any."""
    for key, ports in workload.services.items():
        service = state.service_by_key(key)
        if service is None:
            continue
        if target_port in ports.values() or target_port in service.ports.values():
            return service
    return None
