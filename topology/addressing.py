"""Give every node, pod, gateway, VIP and daemon of a topology its address, for one of two run modes.

`netns` addresses are the real ones (network namespaces isolate them):
- each network's pod range (default 10.244.0.0/16, the same in every network, so pod IPs overlap):
  `.0.1` is the network's router, node number i gets `.i.1` and its pods `.i.2`, `.i.3`, ...;
- gateways (and the routers' legs) on the transit range, 198.18.0.0/24;
- VIPs on the service range, from 10.96.0.10;
- a management range, 203.0.113.0/24, one address per daemon for its stats and readiness ports.

`loopback` (no root) keeps the same layout inside 127.0.0.0/8, one block of /16s per run so parallel runs do
not meet: transit `127.B.x.y`, VIPs `127.B+1.x.y`, network k's pods `127.B+1+k.x.y` (same low 16 bits as in
netns mode). Nothing is isolated there, so pod IPs cannot overlap; each daemon's management address is its
own address.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Literal, Protocol

from topology.spec import (
    GatewaySpec,
    Topology,
    TopologyError,
    WaypointSpec,
)

Mode = Literal["netns", "loopback"]

MAX_NETWORKS = 8
MAX_POD_OFFSET = 1 << 16  # pinned pod IPs must sit in the first /16 of a pod range (see loopback)
NODE_STRIDE = 256  # each node owns one /24 of its network's pod range
MGMT_CIDR = IPv4Network("203.0.113.0/24")
MGMT_SCRAPER_IP = MGMT_CIDR[-2]  # the management namespace's own address; daemons count up from .1
FIRST_VIP_OFFSET = 10

HBONE_PORT = 15008
STATS_PORT = 15020
READINESS_PORT = 15021
ADMIN_PORT = 15000
SOCKS5_PORT = 15080
OUTBOUND_PORT = 15001
# Daemon ports: an app listening on one of them would collide with ztunnel on the same pod IP.
RESERVED_PORTS = frozenset({ADMIN_PORT, OUTBOUND_PORT, 15006, HBONE_PORT, STATS_PORT, READINESS_PORT, SOCKS5_PORT})

DaemonKind = Literal["ztunnel", "waypoint", "gateway"]


def router_ip(pod_cidr: IPv4Network) -> IPv4Address:
    return pod_cidr[1]


def node_ip(pod_cidr: IPv4Network, index: int) -> IPv4Address:
    """The address of the `index`-th node (1-based) of a network."""
    return pod_cidr[index * NODE_STRIDE + 1]


class _HasNodes(Protocol):
    id: str
    network: str
    nodes: tuple[str, ...]


def nodes_of_network(clusters: Iterable[_HasNodes], network: str) -> list[tuple[str, str]]:
    """(cluster, node) pairs of a network in file order; the position + 1 is the node's index."""
    return [(c.id, n) for c in clusters if c.network == network for n in c.nodes]


# --- the plan -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Location:
    """Where a process runs: on a node, or at a network's edge (its router, where the gateway lives)."""

    network: str
    cluster: str = ""
    node: str = ""

    @property
    def is_edge(self) -> bool:
        return not self.node

    def __str__(self) -> str:
        return f"edge of {self.network}" if self.is_edge else f"{self.cluster}/{self.node}"


@dataclass(frozen=True, slots=True)
class NodePlan:
    cluster: str
    node: str
    network: str
    index: int
    ip: IPv4Address

    @property
    def location(self) -> Location:
        return Location(self.network, self.cluster, self.node)


@dataclass(frozen=True, slots=True)
class PodPlan:
    """One pod: an app replica or a waypoint."""

    cluster: str
    node: str
    network: str
    namespace: str
    name: str  # pod name, `<deployment>-<i>`
    workload: str  # deployment name
    ip: IPv4Address
    kind: Literal["app", "waypoint"]

    @property
    def location(self) -> Location:
        return Location(self.network, self.cluster, self.node)


@dataclass(frozen=True, slots=True)
class DaemonPlan:
    name: str  # `<cluster>/ztunnel/<node>`, `<cluster>/waypoint/<name>`, `<cluster>/gateway/<name>`
    kind: DaemonKind
    cluster: str
    network: str
    location: Location
    ip: IPv4Address  # where it takes traffic: node IP (ztunnel), pod IP (waypoint), transit IP (gateway)
    mgmt_ip: IPv4Address  # its stats and readiness listeners
    admin: tuple[str, int]
    workload_info: str  # PROXY_WORKLOAD_INFO, namespace/name/service-account

    @property
    def stats(self) -> tuple[str, int]:
        return (str(self.mgmt_ip), STATS_PORT)

    @property
    def readiness(self) -> tuple[str, int]:
        return (str(self.mgmt_ip), READINESS_PORT)


@dataclass(frozen=True, slots=True)
class AddressPlan:
    mode: Mode
    topology: Topology
    nodes: tuple[NodePlan, ...]
    pods: tuple[PodPlan, ...]
    routers: dict[str, IPv4Address]  # network -> its router's address in the pod range
    transit: dict[str, IPv4Address]  # network -> its edge's address on the transit link (gateway's, if any)
    vips: dict[tuple[str, str], IPv4Address]  # (namespace, service) -> VIP
    daemons: tuple[DaemonPlan, ...]
    pod_prefixes: dict[str, int]  # network -> prefix length of its pod range on interfaces
    transit_prefix: int
    mgmt_prefix: int

    def node(self, cluster: str, node: str) -> NodePlan:
        return next(n for n in self.nodes if (n.cluster, n.node) == (cluster, node))

    def pods_of(self, cluster: str, namespace: str, workload: str) -> tuple[PodPlan, ...]:
        return tuple(p for p in self.pods if (p.cluster, p.namespace, p.workload) == (cluster, namespace, workload))

    def gateway_ip(self, network: str) -> IPv4Address | None:
        return self.transit.get(network) if self.topology.network(network).gateway is not None else None

    def daemon(self, name: str) -> DaemonPlan:
        """By full name, or by a prefix that names one daemon (`cluster1/ztunnel`)."""
        exact = [d for d in self.daemons if d.name == name]
        found = exact or [d for d in self.daemons if d.name.startswith(name.rstrip("/") + "/")]
        if len(found) != 1:
            names = ", ".join(d.name for d in self.daemons)
            what = "no daemon" if not found else "several daemons"
            raise KeyError(f"{what} called {name!r}; daemons: {names}")
        return found[0]

    @property
    def has_transit(self) -> bool:
        return bool(self.transit)


# --- address spaces -------------------------------------------------------------------------------------


class _Space(Protocol):
    def pod(self, network_index: int, cidr: IPv4Network, offset: int) -> IPv4Address: ...
    def transit(self, cidr: IPv4Network, offset: int) -> IPv4Address: ...
    def vip(self, cidr: IPv4Network, offset: int) -> IPv4Address: ...


class _NetnsSpace:
    def pod(self, network_index: int, cidr: IPv4Network, offset: int) -> IPv4Address:
        return cidr[offset]

    def transit(self, cidr: IPv4Network, offset: int) -> IPv4Address:
        return cidr[offset]

    def vip(self, cidr: IPv4Network, offset: int) -> IPv4Address:
        return cidr[offset]


class _LoopbackSpace:
    def __init__(self, base: int) -> None:
        if not 1 <= base <= 254 - (MAX_NETWORKS + 1):
            raise ValueError(f"loopback base {base} out of range")
        self.base = base

    @staticmethod
    def _low16(offset: int, what: str) -> tuple[int, int]:
        if not 0 < offset < MAX_POD_OFFSET:
            raise TopologyError(f"{what} offset {offset} does not fit the loopback layout (at most 65535)")
        return offset >> 8, offset & 0xFF

    def pod(self, network_index: int, cidr: IPv4Network, offset: int) -> IPv4Address:
        b, c = self._low16(offset, "pod address")
        return IPv4Address(f"127.{self.base + 1 + network_index}.{b}.{c}")

    def transit(self, cidr: IPv4Network, offset: int) -> IPv4Address:
        b, c = self._low16(offset, "transit address")
        return IPv4Address(f"127.{self.base}.{b}.{c}")

    def vip(self, cidr: IPv4Network, offset: int) -> IPv4Address:
        b, c = self._low16(offset, "VIP")
        return IPv4Address(f"127.{self.base + 1}.{b}.{c}")


def default_loopback_base(pid: int | None = None) -> int:
    """A block of 127/16s chosen from the process id, so parallel runs usually differ."""
    pid = os.getpid() if pid is None else pid
    return 16 + (pid % 22) * 10  # 16..226, ten /16s each; MAX_NETWORKS + 2 of them are used


def plan_addresses(topology: Topology, mode: Mode = "netns", *, loopback_base: int | None = None) -> AddressPlan:
    """Every address of the topology in `mode`; raises TopologyError when something does not fit."""
    space: _Space = _NetnsSpace() if mode == "netns" else _LoopbackSpace(loopback_base or default_loopback_base())
    nodes: list[NodePlan] = []
    pods: list[PodPlan] = []
    routers: dict[str, IPv4Address] = {}
    for k, net in enumerate(topology.networks, start=1):
        cidr = net.pod_cidr
        base = int(cidr.network_address)
        routers[net.name] = space.pod(k, cidr, 1)
        pinned = _pinned_offsets(topology, net.name, base)
        for index, (cid, node) in enumerate(nodes_of_network(topology.clusters, net.name), start=1):
            nodes.append(NodePlan(cid, node, net.name, index, space.pod(k, cidr, index * NODE_STRIDE + 1)))
            free = _free_offsets(index, pinned)
            for kind, namespace, workload, pod, ip in _pods_on_node(topology, cid, node):
                if ip is not None:
                    offset = int(ip) - base
                else:
                    offset = next(free, None)
                    if offset is None:
                        raise TopologyError(f"{topology.source}: node {cid}/{node} has more than 253 pods")
                pods.append(PodPlan(cid, node, net.name, namespace, pod, workload, space.pod(k, cidr, offset), kind))

    transit = _plan_transit(topology, space)
    vips = _plan_vips(topology, space)
    plan = AddressPlan(
        mode=mode,
        topology=topology,
        nodes=tuple(nodes),
        pods=tuple(pods),
        routers=routers,
        transit=transit,
        vips=vips,
        daemons=(),
        pod_prefixes={n.name: n.pod_cidr.prefixlen if mode == "netns" else 16 for n in topology.networks},
        transit_prefix=topology.transit_cidr.prefixlen if mode == "netns" else 16,
        mgmt_prefix=MGMT_CIDR.prefixlen,
    )
    daemons = _plan_daemons(plan, mode)
    return dataclasses.replace(plan, daemons=daemons)


def _pinned_offsets(topology: Topology, network: str, base: int) -> set[int]:
    taken = {int(ip) - base for a in topology.apps if topology.network_of(a.cluster) == network for ip in a.ips}
    taken |= {
        int(w.ip) - base for w in topology.waypoints if w.ip is not None and topology.network_of(w.cluster) == network
    }
    return taken


def _free_offsets(index: int, pinned: set[int]) -> Iterator[int]:
    start = index * NODE_STRIDE
    return (o for o in range(start + 2, start + 255) if o not in pinned)


def _pods_on_node(
    topology: Topology, cluster: str, node: str
) -> Iterator[tuple[Literal["app", "waypoint"], str, str, str, IPv4Address | None]]:
    """(kind, namespace, workload, pod name, pinned ip) in a stable order: waypoints, then apps."""
    for w in topology.cluster(cluster).waypoints:
        if w.node == node:
            yield "waypoint", w.namespace, w.name, waypoint_pod(w), w.ip
    for a in topology.apps:
        if (a.cluster, a.node) == (cluster, node):
            for i, pod in enumerate(a.pods):
                yield "app", a.namespace, a.name, pod, (a.ips[i] if a.ips else None)


def waypoint_pod(w: WaypointSpec) -> str:
    return f"{w.name}-0"


def gateway_pod(g: GatewaySpec) -> str:
    return f"{g.name}-0"


def _plan_transit(topology: Topology, space: _Space) -> dict[str, IPv4Address]:
    """Edge addresses on the transit link: only when there is more than one network and a gateway."""
    if len(topology.networks) < 2 or not topology.gateways:
        return {}
    cidr = topology.transit_cidr
    base = int(cidr.network_address)
    taken = {int(g.address) - base for g in topology.gateways if g.address is not None}
    free = (o for o in range(1, cidr.num_addresses - 1) if o not in taken)
    out: dict[str, IPv4Address] = {}
    for net in topology.networks:
        gw = net.gateway
        offset = int(gw.address) - base if gw is not None and gw.address is not None else next(free)
        out[net.name] = space.transit(cidr, offset)
    return out


def _plan_vips(topology: Topology, space: _Space) -> dict[tuple[str, str], IPv4Address]:
    cidr = topology.service_cidr
    base = int(cidr.network_address)
    taken = {int(s.vip) - base for s in topology.services if s.vip is not None}
    free = (o for o in range(FIRST_VIP_OFFSET, cidr.num_addresses - 1) if o not in taken)
    out = {}
    for s in topology.services:
        if s.vip is not None:
            offset = int(s.vip) - base
            if not 0 < offset < cidr.num_addresses - 1:
                raise TopologyError(f"{topology.source}: service {s.name}: VIP {s.vip} is outside serviceCidr {cidr}")
        else:
            offset = next(free)
        out[(s.namespace, s.name)] = space.vip(cidr, offset)
    return out


def _plan_daemons(plan: AddressPlan, mode: Mode) -> tuple[DaemonPlan, ...]:
    topology = plan.topology
    mgmt = iter(MGMT_CIDR.hosts())
    out: list[DaemonPlan] = []
    admin_ports: dict[Location, int] = {}

    def admin(location: Location, ip: IPv4Address) -> tuple[str, int]:
        if mode == "loopback":
            return (str(ip), ADMIN_PORT)  # every daemon has its own 127 address
        port = admin_ports.get(location, ADMIN_PORT)
        admin_ports[location] = port + 100  # daemons sharing a namespace share its 127.0.0.1
        return ("127.0.0.1", port)

    def add(name: str, kind: DaemonKind, cluster: str, location: Location, ip: IPv4Address, info: str) -> None:
        mgmt_ip = next(mgmt) if mode == "netns" else ip
        out.append(DaemonPlan(name, kind, cluster, location.network, location, ip, mgmt_ip, admin(location, ip), info))

    for n in plan.nodes:
        add(f"{n.cluster}/ztunnel/{n.node}", "ztunnel", n.cluster, n.location, n.ip,
            f"istio-system/ztunnel-{n.node}/ztunnel")  # fmt: skip
    for w in topology.waypoints:
        pod = next(p for p in plan.pods if p.kind == "waypoint" and (p.cluster, p.namespace, p.workload)
                   == (w.cluster, w.namespace, w.name))  # fmt: skip
        suffix = w.name if w.namespace == "default" else f"{w.namespace}/{w.name}"
        add(f"{w.cluster}/waypoint/{suffix}", "waypoint", w.cluster, pod.location, pod.ip,
            f"{w.namespace}/{pod.name}/{w.service_account}")  # fmt: skip
    for g in topology.gateways:
        ip = plan.transit.get(g.network)
        if ip is None:
            continue  # a single-network mesh: the gateway has nobody to serve, so it is not run
        add(f"{g.cluster}/gateway/{g.name}", "gateway", g.cluster, Location(g.network), ip,
            f"{g.namespace}/{gateway_pod(g)}/{g.service_account}")  # fmt: skip
    if len(out) > MGMT_CIDR.num_addresses - 3:
        raise TopologyError(f"{topology.source}: more daemons than management addresses ({len(out)})")
    return tuple(out)


def describe(plan: AddressPlan) -> list[tuple[str, str, str, str]]:
    """The address table: (what, where, address, ports), for people."""
    rows: list[tuple[str, str, str, str]] = []
    for d in plan.daemons:
        ports = f"stats {d.mgmt_ip}:{STATS_PORT}, ready :{READINESS_PORT}"
        if d.kind == "ztunnel":
            ports = f"socks5 :{SOCKS5_PORT}, hbone <pod>:{HBONE_PORT}, " + ports
        else:
            ports = f"hbone :{HBONE_PORT}, " + ports
        rows.append((d.name, str(d.location), str(d.ip), ports))
    for p in plan.pods:
        if p.kind == "app":
            app = next(a for a in plan.topology.apps if (a.cluster, a.namespace, a.name)
                       == (p.cluster, p.namespace, p.workload))  # fmt: skip
            ports = ", ".join(f"{'http' if port == app.http_port else 'tcp echo'} :{port}" for port in app.ports)
            rows.append((f"{p.cluster}/{p.namespace}/{p.name}", str(p.location), str(p.ip), ports))
    for s in plan.topology.services:
        ports = ", ".join(f"{sp}->{tp}" for sp, tp in s.ports.items())
        rows.append((f"service {s.hostname}", "all networks", str(plan.vips[(s.namespace, s.name)]), ports))
    return rows


def format_table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))] if rows else []
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows)
