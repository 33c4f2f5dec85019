"""The indexes every daemon looks things up in, built once per loaded config (SPEC §8, reference §7/§9).

A `MeshState` is immutable: a config reload builds a new one and swaps the reference, so lookups on the hot
path take no locks. Addresses are always qualified by network, because two networks may reuse an IP range.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from hbone.identity import Identity
from mesh.config import MeshConfig
from mesh.model import (
    Authorization,
    Endpoint,
    GatewayAddress,
    IPAddress,
    NamespacedHostname,
    NetworkAddress,
    NetworkMode,
    Route,
    Scope,
    Service,
    StringMatch,
    Workload,
    canonical_ip,
)


class MeshState:
    def __init__(self, config: MeshConfig | None = None) -> None:
        config = config or MeshConfig()
        self.config = config
        self.workloads: tuple[Workload, ...] = config.workloads
        self.services: tuple[Service, ...] = config.services
        self.policies: tuple[Authorization, ...] = config.policies
        self.routes: tuple[Route, ...] = config.routes

        self._workload_by_uid = {w.uid: w for w in self.workloads}
        self._workload_by_address: dict[tuple[str, IPAddress], Workload] = {}
        for w in self.workloads:
            if w.network_mode is NetworkMode.STANDARD:
                for ip in w.workload_ips:
                    self._workload_by_address.setdefault((w.network, canonical_ip(ip)), w)
        self._service_by_vip: dict[tuple[str, IPAddress], Service] = {
            (v.network, canonical_ip(v.address)): s for s in self.services for v in s.vips
        }
        self._service_by_key = {s.key: s for s in self.services}
        self._services_by_hostname: dict[str, list[Service]] = {}
        for s in self.services:
            self._services_by_hostname.setdefault(s.hostname, []).append(s)
        self._endpoints_of: dict[str, list[Workload]] = {}
        for w in self.workloads:
            for key in w.services:
                self._endpoints_of.setdefault(key, []).append(w)
        self._policy_by_key = {p.key: p for p in self.policies}
        # Policies by workload are asked for on every inbound connection; the state never changes, so cache.
        self._policies_cache: dict[Workload, tuple[Authorization, ...]] = {}

    # --- workloads ------------------------------------------------------------------------------------

    def workload_by_address(self, network: str, ip: IPAddress | str) -> Workload | None:
        return self._workload_by_address.get((network, canonical_ip(ip)))

    def workload_by_uid(self, uid: str) -> Workload | None:
        return self._workload_by_uid.get(uid)

    def workloads_on_node(self, node: str) -> tuple[Workload, ...]:
        """The workloads a shared-mode ztunnel on `node` serves."""
        return tuple(w for w in self.workloads if w.node == node)

    def workloads_for_proxy(self, namespace: str, name: str, service_account: str) -> tuple[Workload, ...]:
        """The workload(s) a dedicated-mode proxy acts as (PROXY_WORKLOAD_INFO `namespace/name/sa`)."""
        return tuple(
            w
            for w in self.workloads
            if w.namespace == namespace and w.name == name and w.service_account == service_account
        )

    def workloads_with_identity(self, identity: Identity) -> tuple[Workload, ...]:
        return tuple(w for w in self.workloads if w.identity == identity)

    # --- services -------------------------------------------------------------------------------------

    def service_by_vip(self, network: str, ip: IPAddress | str) -> Service | None:
        return self._service_by_vip.get((network, canonical_ip(ip)))

    def service_by_key(self, key: str) -> Service | None:
        """By `<namespace>/<hostname>`."""
        return self._service_by_key.get(key)

    def service_by_hostname(self, hostname: str, namespace: str | None = None) -> Service | None:
        """The service with this hostname; when several namespaces define it, prefer `namespace`."""
        candidates = self._services_by_hostname.get(hostname)
        if not candidates:
            return None
        if namespace is not None:
            for s in candidates:
                if s.namespace == namespace:
                    return s
        return candidates[0]

    def endpoint_workloads(self, service: Service) -> tuple[Workload, ...]:
        """Every workload whose `services` map names `service`, in config order."""
        return tuple(self._endpoints_of.get(service.key, ()))

    def endpoints(self, service: Service, service_port: int) -> tuple[Endpoint, ...]:
        """Endpoints serving `service_port`, each with its target port.

        An endpoint's own mapping wins over the service's, as in ztunnel; a target port of 0 (a named port
        that istiod could not resolve) or no mapping at all means the endpoint cannot take this port.
        """
        out: list[Endpoint] = []
        for w in self._endpoints_of.get(service.key, ()):
            target = w.services[service.key].get(service_port) or service.ports.get(service_port)
            if target:
                out.append(Endpoint(w, target))
        return tuple(out)

    # --- policies -------------------------------------------------------------------------------------

    def policy(self, key: str) -> Authorization | None:
        """By `<namespace>/<name>`."""
        return self._policy_by_key.get(key)

    def policies_for(self, workload: Workload) -> tuple[Authorization, ...]:
        """Policies for traffic to `workload`: its namespace's, the global ones, and its own list."""
        cached = self._policies_cache.get(workload)
        if cached is not None:
            return cached
        chosen: dict[str, Authorization] = {}
        for p in self.policies:
            if p.scope is Scope.GLOBAL or (p.scope is Scope.NAMESPACE and p.namespace == workload.namespace):
                chosen.setdefault(p.key, p)
        for key in workload.authorization_policies:
            listed = self._policy_by_key.get(key)
            if listed is not None:
                chosen.setdefault(key, listed)
        result = tuple(chosen.values())
        self._policies_cache[workload] = result
        return result

    # --- waypoints and gateways -----------------------------------------------------------------------

    def gateway_workloads(self, gateway: GatewayAddress) -> tuple[Workload, ...]:
        """The workloads behind a waypoint or network gateway address.

        `network/IP` names one workload; `namespace/hostname` names a service, and every endpoint of it is
        a candidate (the caller load-balances among them).
        """
        dest = gateway.destination
        if isinstance(dest, NetworkAddress):
            w = self.workload_by_address(dest.network, dest.address)
            return (w,) if w is not None else ()
        assert isinstance(dest, NamespacedHostname)
        service = self.service_by_key(str(dest)) or self.service_by_hostname(dest.hostname, dest.namespace)
        return self.endpoint_workloads(service) if service is not None else ()

    def resolve_gateway(self, gateway: GatewayAddress) -> Workload | None:
        """One workload for `gateway`: the first healthy candidate, else the first one at all."""
        candidates = self.gateway_workloads(gateway)
        return next((w for w in candidates if w.healthy), candidates[0] if candidates else None)

    # --- /config_dump ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The loaded state as JSON-able data, in the config file's own shape and key names."""
        return {
            "workloads": [_dump(w) for w in self.workloads],
            "services": [_dump(s) for s in self.services],
            "policies": [_dump(p) for p in self.policies],
            "routes": [_dump(r) for r in self.routes],
        }


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def _dump_duration(seconds: float) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def _dump(value: Any) -> Any:
    if isinstance(value, StringMatch):
        return {value.kind.value: [] if value.kind.value == "Presence" else value.value}
    if isinstance(value, GatewayAddress):
        return {"destination": str(value.destination), "hboneMtlsPort": value.hbone_mtls_port}
    if isinstance(value, Identity | NetworkAddress | NamespacedHostname):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, re.Pattern):
        return value.pattern
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            if f.name == "pattern" or item is None:
                continue  # the compiled regex repeats `value`; None means "not set" in the file too
            out[_camel(f.name)] = _dump_duration(item) if f.metadata.get("duration") else _dump(item)
        return out
    if isinstance(value, Mapping):
        return {str(k): _dump(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_dump(v) for v in value]
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(value)
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    return value
