"""Read a topology YAML file into a `Topology`, refusing anything unknown or inconsistent.

The format (every key camelCase; `?` = optional, with its default):

    trustDomain?: cluster.local
    transitCidr?: 198.18.0.0/24      # where the east-west gateways are reachable from every network
    serviceCidr?: 10.96.0.0/16       # service VIPs
    networks?:                       # per-network overrides
      <network>: {podCidr?: 10.244.0.0/16}   # every network defaults to the same range: pod IPs overlap
    clusters:
    - id: cluster1
      network: network1
      nodes?: [node1]
      waypoints?: [waypoint]         # names (namespace default), or {name, namespace?, serviceAccount?, node?, ip?}
      gateway?: eastwest             # or {name, namespace?: istio-system, serviceAccount?: <name>, address?}
    apps:                            # deployments of the sample app (topology.app)
    - {name: echo-v1, cluster: cluster1, namespace?: default, app?: echo, version?: v1, node?: <first>,
       replicas?: 1, ips?: [...], serviceAccount?: <app>, httpPort?: 8080, tcpPort?: 9000 (false: none)}
    services:
    - {name: echo, ports: {80: 8080}, namespace?: default, selector?: <name>, vip?: <auto>,
       waypoint?: <name> | {name, namespace?}}   # each cluster uses its nearest waypoint of that name

`app` defaults to the name without a trailing `-<version>`, so `echo-v1` (version v1) is app `echo`; a service
selects the apps with its `selector` app label in its namespace, in every cluster.

Errors read `<file>: <key path>: <what is wrong>`, e.g.
`t.yaml: services[1].waypoint: no waypoint 'foo' in namespace default of any cluster`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, TypeVar

import yaml

from topology import addressing
from topology.spec import (
    DEFAULT_HTTP_PORT,
    DEFAULT_NAMESPACE,
    DEFAULT_TCP_PORT,
    GATEWAY_NAMESPACE,
    AppSpec,
    ClusterSpec,
    GatewaySpec,
    NetworkSpec,
    ServiceSpec,
    Topology,
    TopologyError,
    WaypointRef,
    WaypointSpec,
)

T = TypeVar("T")

DEFAULT_POD_CIDR = IPv4Network("10.244.0.0/16")
DEFAULT_TRANSIT_CIDR = IPv4Network("198.18.0.0/24")
DEFAULT_SERVICE_CIDR = IPv4Network("10.96.0.0/16")
MAX_NETWORKS = addressing.MAX_NETWORKS

# Names become Linux namespace names, file names and DNS labels, so they are held to DNS label rules.
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_VERSION = re.compile(r"[A-Za-z0-9._-]{1,63}")  # what baggage can carry unharmed


class _NoDuplicatesLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently; a topology with two `services:` is a mistake."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str | int) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, message: str) -> TopologyError:
        return TopologyError(f"{self.source}: {path}: {message}" if path else f"{self.source}: {message}")

    def mapping(self, value: Any, path: str, keys: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
        if not isinstance(value, dict):
            raise self.fail(path, f"expected a mapping, got {_show(value)}")
        for key in value:
            if key not in keys:
                where = f"{path}.{key}" if path else str(key)
                raise self.fail(where, f"unknown key; expected one of: {', '.join(keys)}")
        for key in required:
            if value.get(key) is None:
                raise self.fail(f"{path}.{key}" if path else key, "missing required key")
        return value

    def items(self, value: Any, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(path, f"expected a list, got {_show(value)}")
        return value

    def label(self, value: Any, path: str) -> str:
        if not isinstance(value, str) or not _LABEL.fullmatch(value):
            raise self.fail(path, f"expected a lower-case DNS label such as 'cluster1', got {_show(value)}")
        return value

    def string(self, value: Any, path: str, pattern: re.Pattern[str], what: str) -> str:
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise self.fail(path, f"expected {what}, got {_show(value)}")
        return value

    def integer(self, value: Any, path: str, lo: int, hi: int) -> int:
        if isinstance(value, str) and value.isdigit():
            value = int(value)  # quoted map keys such as "80"
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.fail(path, f"expected an integer from {lo} to {hi}, got {_show(value)}")
        return value

    def ip(self, value: Any, path: str) -> IPv4Address:
        try:
            return IPv4Address(value) if isinstance(value, str) else IPv4Address("x")
        except ValueError:
            raise self.fail(path, f"expected an IPv4 address, got {_show(value)}") from None

    def cidr(self, value: Any, path: str, min_prefix: int, max_prefix: int) -> IPv4Network:
        try:
            net = IPv4Network(value) if isinstance(value, str) else IPv4Network("x")
        except ValueError:
            raise self.fail(path, f"expected an IPv4 CIDR such as 10.244.0.0/16, got {_show(value)}") from None
        if not min_prefix <= net.prefixlen <= max_prefix:
            raise self.fail(path, f"expected a prefix length from /{min_prefix} to /{max_prefix}, got {net}")
        return net

    def each(self, value: Any, path: str, read: Callable[[Any, str], T]) -> list[T]:
        return [read(item, f"{path}[{i}]") for i, item in enumerate(self.items(value, path))]


def _show(value: Any) -> str:
    if value is None:
        return "nothing"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_TOP_KEYS = ("trustDomain", "transitCidr", "serviceCidr", "networks", "clusters", "apps", "services")
_CLUSTER_KEYS = ("id", "network", "nodes", "waypoints", "gateway")
_WAYPOINT_KEYS = ("name", "namespace", "serviceAccount", "node", "ip")
_GATEWAY_KEYS = ("name", "namespace", "serviceAccount", "address")
_APP_KEYS = (
    "name", "namespace", "serviceAccount", "app", "version", "cluster", "node", "replicas", "ips", "httpPort",
    "tcpPort",
)  # fmt: skip
_SERVICE_KEYS = ("name", "namespace", "ports", "selector", "vip", "waypoint")


class _TopologyReader:
    """One pass over the document; cross-references are checked once everything they point at is known."""

    def __init__(self, source: str) -> None:
        self.r = _Reader(source)
        self.ip_owner: dict[tuple[str, IPv4Address], str] = {}  # (network, ip) -> key path that took it

    def read(self, doc: Any) -> Topology:
        r = self.r
        doc = r.mapping({} if doc is None else doc, "", _TOP_KEYS, required=("clusters",))
        trust_domain = doc.get("trustDomain", "cluster.local")
        if not isinstance(trust_domain, str) or not re.fullmatch(r"[a-z0-9.-]+", trust_domain):
            raise r.fail("trustDomain", f"expected a trust domain such as cluster.local, got {_show(trust_domain)}")
        transit = r.cidr(doc.get("transitCidr", str(DEFAULT_TRANSIT_CIDR)), "transitCidr", 16, 29)
        service_cidr = r.cidr(doc.get("serviceCidr", str(DEFAULT_SERVICE_CIDR)), "serviceCidr", 8, 24)

        clusters = r.each(doc.get("clusters"), "clusters", self.cluster)
        if not clusters:
            raise r.fail("clusters", "at least one cluster is needed")
        self.clusters = {c.id: c for c in clusters}
        self.cluster_paths: dict[str, str] = {}
        for i, c in enumerate(clusters):
            if c.id in self.cluster_paths:
                raise r.fail(f"clusters[{i}].id", f"duplicate cluster {c.id!r} (first at {self.cluster_paths[c.id]})")
            self.cluster_paths[c.id] = f"clusters[{i}]"
        networks = self.networks(doc.get("networks"), clusters)
        self.pod_cidr = {n.name: n.pod_cidr for n in networks}
        self.reserve_infrastructure(networks, clusters)
        self.check_pinned_waypoints(clusters)
        gateways = self.check_gateways(clusters, transit)

        apps = r.each(doc.get("apps"), "apps", self.app)
        seen_apps: dict[tuple[str, str, str], str] = {}
        for i, a in enumerate(apps):
            key = (a.cluster, a.namespace, a.name)
            if key in seen_apps:
                raise r.fail(f"apps[{i}].name", f"duplicate app {a.namespace}/{a.name} in {a.cluster} "
                                                f"(first at {seen_apps[key]})")  # fmt: skip
            seen_apps[key] = f"apps[{i}]"

        topo_networks = tuple(NetworkSpec(n.name, n.pod_cidr, n.clusters, gateways.get(n.name)) for n in networks)
        self.apps = apps
        self.all_waypoints = [w for c in clusters for w in c.waypoints]
        self.networks_by_name = {n.name: n for n in topo_networks}
        services = r.each(doc.get("services"), "services", self.service)
        seen_services: dict[tuple[str, str], str] = {}
        seen_vips: dict[IPv4Address, str] = {}
        for i, s in enumerate(services):
            key = (s.namespace, s.name)
            if key in seen_services:
                raise r.fail(f"services[{i}].name", f"duplicate service {s.namespace}/{s.name} "
                                                    f"(first at {seen_services[key]})")  # fmt: skip
            seen_services[key] = f"services[{i}]"
            if s.vip is not None:
                if s.vip in seen_vips:
                    raise r.fail(f"services[{i}].vip", f"VIP {s.vip} is already {seen_vips[s.vip]}'s")
                seen_vips[s.vip] = f"services[{i}]"
        return Topology(
            source=r.source,
            trust_domain=trust_domain,
            clusters=tuple(clusters),
            networks=topo_networks,
            apps=tuple(apps),
            services=tuple(services),
            transit_cidr=transit,
            service_cidr=service_cidr,
        )

    # --- clusters, networks, gateways -----------------------------------------------------------------

    def cluster(self, value: Any, path: str) -> ClusterSpec:
        r = self.r
        o = r.mapping(value, path, _CLUSTER_KEYS, required=("id", "network"))
        cid = r.label(o["id"], f"{path}.id")
        network = r.label(o["network"], f"{path}.network")
        nodes = r.each(o.get("nodes", ["node1"]), f"{path}.nodes", r.label)
        if not nodes:
            raise r.fail(f"{path}.nodes", "a cluster needs at least one node")
        for j, node in enumerate(nodes):
            if node in nodes[:j]:
                raise r.fail(f"{path}.nodes[{j}]", f"duplicate node {node!r}")
        waypoints = r.each(o.get("waypoints"), f"{path}.waypoints",
                           lambda v, p: self.waypoint(v, p, cid, nodes))  # fmt: skip
        for j, w in enumerate(waypoints):
            if any((w.namespace, w.name) == (x.namespace, x.name) for x in waypoints[:j]):
                raise r.fail(f"{path}.waypoints[{j}]", f"duplicate waypoint {w.namespace}/{w.name}")
        gateway = None
        if o.get("gateway") is not None:
            gateway = self.gateway(o["gateway"], f"{path}.gateway", cid, network)
        return ClusterSpec(cid, network, tuple(nodes), tuple(waypoints), gateway)

    def waypoint(self, value: Any, path: str, cluster: str, nodes: list[str]) -> WaypointSpec:
        r = self.r
        if isinstance(value, str):
            value = {"name": value}
        o = r.mapping(value, path, _WAYPOINT_KEYS, required=("name",))
        name = r.label(o["name"], f"{path}.name")
        node = r.label(o.get("node", nodes[0]), f"{path}.node")
        if node not in nodes:
            raise r.fail(f"{path}.node", f"no node {node!r} in {cluster} (nodes: {', '.join(nodes)})")
        ip = r.ip(o["ip"], f"{path}.ip") if o.get("ip") is not None else None
        return WaypointSpec(
            name=name,
            namespace=r.label(o.get("namespace", DEFAULT_NAMESPACE), f"{path}.namespace"),
            service_account=r.label(o.get("serviceAccount", name), f"{path}.serviceAccount"),
            cluster=cluster,
            node=node,
            ip=ip,
        )

    def gateway(self, value: Any, path: str, cluster: str, network: str) -> GatewaySpec:
        r = self.r
        if isinstance(value, str):
            value = {"name": value}
        o = r.mapping(value, path, _GATEWAY_KEYS, required=("name",))
        name = r.label(o["name"], f"{path}.name")
        address = r.ip(o["address"], f"{path}.address") if o.get("address") is not None else None
        return GatewaySpec(
            name=name,
            namespace=r.label(o.get("namespace", GATEWAY_NAMESPACE), f"{path}.namespace"),
            service_account=r.label(o.get("serviceAccount", name), f"{path}.serviceAccount"),
            cluster=cluster,
            network=network,
            address=address,
        )

    def networks(self, value: Any, clusters: list[ClusterSpec]) -> list[NetworkSpec]:
        r = self.r
        overrides = r.mapping({} if value is None else value, "networks", tuple(c.network for c in clusters))
        order: dict[str, list[str]] = {}
        for c in clusters:
            order.setdefault(c.network, []).append(c.id)
        if len(order) > MAX_NETWORKS:
            raise r.fail("clusters", f"at most {MAX_NETWORKS} networks are supported, got {len(order)}")
        out = []
        for name, ids in order.items():
            path = f"networks.{name}"
            o = r.mapping({} if overrides.get(name) is None else overrides[name], path, ("podCidr",))
            pod_cidr = r.cidr(o.get("podCidr", str(DEFAULT_POD_CIDR)), f"{path}.podCidr", 8, 16)
            nodes = sum(len(self.clusters[cid].nodes) for cid in ids)
            if nodes > 250:
                raise r.fail(path, f"at most 250 nodes per network, got {nodes}")
            out.append(NetworkSpec(name, pod_cidr, tuple(ids)))
        return out

    def reserve_infrastructure(self, networks: list[NetworkSpec], clusters: list[ClusterSpec]) -> None:
        """Router and node addresses are taken before any pinned pod IP is looked at."""
        for n in networks:
            self.ip_owner[(n.name, addressing.router_ip(n.pod_cidr))] = f"the router of {n.name}"
            for index, (cid, node) in enumerate(addressing.nodes_of_network(clusters, n.name), start=1):
                self.ip_owner[(n.name, addressing.node_ip(n.pod_cidr, index))] = f"node {cid}/{node}"

    def take_ip(self, network: str, ip: IPv4Address, path: str) -> None:
        r = self.r
        cidr = self.pod_cidr[network]
        if ip not in cidr or ip in (cidr.network_address, cidr.broadcast_address):
            raise r.fail(path, f"{ip} is not a host address of {network}'s pod range {cidr}")
        if int(ip) - int(cidr.network_address) >= addressing.MAX_POD_OFFSET:
            raise r.fail(path, f"{ip} is beyond the first /16 of {cidr}; pinned pod IPs must be within it")
        owner = self.ip_owner.get((network, ip))
        if owner is not None:
            raise r.fail(path, f"{ip} is already used on {network} by {owner}")
        self.ip_owner[(network, ip)] = path

    def check_pinned_waypoints(self, clusters: list[ClusterSpec]) -> None:
        for i, c in enumerate(clusters):
            for j, w in enumerate(c.waypoints):
                if w.ip is not None:
                    self.take_ip(c.network, w.ip, f"clusters[{i}].waypoints[{j}].ip")

    def check_gateways(self, clusters: list[ClusterSpec], transit: IPv4Network) -> dict[str, GatewaySpec]:
        r = self.r
        gateways: dict[str, GatewaySpec] = {}
        where: dict[str, str] = {}
        addresses: dict[IPv4Address, str] = {}
        for i, c in enumerate(clusters):
            gw = c.gateway
            if gw is None:
                continue
            path = f"clusters[{i}].gateway"
            if c.network in gateways:
                raise r.fail(path, f"{c.network} already has gateway {gateways[c.network].name!r} "
                                   f"({where[c.network]}); one gateway per network")  # fmt: skip
            if gw.address is not None:
                if gw.address not in transit or gw.address in (transit.network_address, transit.broadcast_address):
                    raise r.fail(f"{path}.address", f"{gw.address} is not a host address of transitCidr {transit}")
                if gw.address in addresses:
                    raise r.fail(f"{path}.address", f"{gw.address} is already {addresses[gw.address]}'s address")
                addresses[gw.address] = path
            gateways[c.network] = gw
            where[c.network] = path
        return gateways

    # --- apps and services ----------------------------------------------------------------------------

    def cluster_ref(self, value: Any, path: str) -> ClusterSpec:
        cid = self.r.label(value, path)
        if cid not in self.clusters:
            raise self.r.fail(path, f"no cluster {cid!r} (clusters: {', '.join(self.clusters)})")
        return self.clusters[cid]

    def app(self, value: Any, path: str) -> AppSpec:
        r = self.r
        o = r.mapping(value, path, _APP_KEYS, required=("name", "cluster"))
        name = r.label(o["name"], f"{path}.name")
        cluster = self.cluster_ref(o["cluster"], f"{path}.cluster")
        version = r.string(o.get("version", "v1"), f"{path}.version", _VERSION, "a version such as v1")
        label = o.get("app")
        if label is None:
            label = name[: -len(version) - 1] if name.endswith(f"-{version}") else name
        app = r.label(label, f"{path}.app")
        node = r.label(o.get("node", cluster.nodes[0]), f"{path}.node")
        if node not in cluster.nodes:
            raise r.fail(f"{path}.node", f"no node {node!r} in {cluster.id} (nodes: {', '.join(cluster.nodes)})")
        replicas = r.integer(o.get("replicas", 1), f"{path}.replicas", 1, 100)
        ips = r.each(o.get("ips"), f"{path}.ips", r.ip)
        if ips and len(ips) != replicas:
            raise r.fail(f"{path}.ips", f"{len(ips)} addresses for {replicas} replicas; give one per replica")
        for k, ip in enumerate(ips):
            self.take_ip(cluster.network, ip, f"{path}.ips[{k}]")
        http_port = r.integer(o.get("httpPort", DEFAULT_HTTP_PORT), f"{path}.httpPort", 1, 65535)
        tcp_raw = o.get("tcpPort", DEFAULT_TCP_PORT)
        tcp_port = None if tcp_raw is False else r.integer(tcp_raw, f"{path}.tcpPort", 1, 65535)
        if tcp_port == http_port:
            raise r.fail(f"{path}.tcpPort", f"{tcp_port} is already the httpPort")
        if http_port in addressing.RESERVED_PORTS or tcp_port in addressing.RESERVED_PORTS:
            raise r.fail(path, f"ports {sorted(addressing.RESERVED_PORTS)} belong to the mesh daemons")
        return AppSpec(
            name=name,
            namespace=r.label(o.get("namespace", DEFAULT_NAMESPACE), f"{path}.namespace"),
            service_account=r.label(o.get("serviceAccount", app), f"{path}.serviceAccount"),
            app=app,
            version=version,
            cluster=cluster.id,
            node=node,
            replicas=replicas,
            ips=tuple(ips),
            http_port=http_port,
            tcp_port=tcp_port,
        )

    def service(self, value: Any, path: str) -> ServiceSpec:
        r = self.r
        o = r.mapping(value, path, _SERVICE_KEYS, required=("name", "ports"))
        name = r.label(o["name"], f"{path}.name")
        namespace = r.label(o.get("namespace", DEFAULT_NAMESPACE), f"{path}.namespace")
        if any(w.ref == WaypointRef(namespace, name) for w in self.all_waypoints):
            raise r.fail(f"{path}.name", f"{namespace}/{name} is already the service of a waypoint")
        selector = r.label(o.get("selector", name), f"{path}.selector")
        raw_ports = o["ports"]
        if not isinstance(raw_ports, dict) or not raw_ports:
            raise r.fail(f"{path}.ports", f"expected a mapping {{servicePort: targetPort}}, got {_show(raw_ports)}")
        ports = {
            r.integer(k, f"{path}.ports.{k}", 1, 65535): r.integer(v, f"{path}.ports.{k}", 1, 65535)
            for k, v in raw_ports.items()
        }
        backends = [a for a in self.apps if a.namespace == namespace and a.app == selector]
        if not backends:
            labels = sorted({a.app for a in self.apps if a.namespace == namespace})
            raise r.fail(f"{path}.selector", f"no app in namespace {namespace} has app label {selector!r} "
                                             f"(labels there: {', '.join(labels) or 'none'})")  # fmt: skip
        for port, target in ports.items():
            for a in backends:
                if target not in a.ports:
                    served = ", ".join(map(str, a.ports))
                    raise r.fail(f"{path}.ports.{port}",
                                 f"target port {target} is not served by app {a.name!r} in {a.cluster} "
                                 f"(it serves {served})")  # fmt: skip
        vip = r.ip(o["vip"], f"{path}.vip") if o.get("vip") is not None else None
        waypoint = self.waypoint_ref(o["waypoint"], f"{path}.waypoint", namespace) if o.get("waypoint") else None
        service = ServiceSpec(name, namespace, ports, selector, vip, waypoint)
        self.check_reachable(service, backends, path)
        return service

    def waypoint_ref(self, value: Any, path: str, namespace: str) -> WaypointRef:
        r = self.r
        if isinstance(value, str):
            value = {"name": value}
        o = r.mapping(value, path, ("name", "namespace"), required=("name",))
        ref = WaypointRef(r.label(o.get("namespace", namespace), f"{path}.namespace"), r.label(o["name"], path))
        found = [w for w in self.all_waypoints if w.ref == ref]
        if not found:
            raise r.fail(path, f"no waypoint {ref.name!r} in namespace {ref.namespace} of any cluster")
        # A network without such a waypoint of its own reaches one through that waypoint's network gateway.
        networks_with = {self.clusters[w.cluster].network for w in found}
        missing = set(self.networks_by_name) - networks_with
        if missing and not any(self.networks_by_name[n].gateway is not None for n in networks_with):
            raise r.fail(path, f"waypoint {ref.name!r} is only on {', '.join(sorted(networks_with))}, which has "
                               f"no gateway: {', '.join(sorted(missing))} could not reach it")  # fmt: skip
        return ref

    def check_reachable(self, service: ServiceSpec, backends: list[AppSpec], path: str) -> None:
        """Endpoints on another network are only reachable through that network's gateway."""
        endpoint_networks = {self.clusters[a.cluster].network for a in backends}
        for network in endpoint_networks:
            if len(self.networks_by_name) > 1 and self.networks_by_name[network].gateway is None:
                others = sorted(set(self.networks_by_name) - {network})
                raise self.r.fail(path, f"endpoints of {service.name!r} are on {network}, which has no gateway: "
                                        f"{', '.join(others)} could not reach them (give a cluster of {network} "
                                        "a gateway)")  # fmt: skip


def parse_topology(text: str, source: str = "<topology>") -> Topology:
    """Parse and validate topology YAML; `source` names the file in error messages."""
    try:
        doc = yaml.load(text, Loader=_NoDuplicatesLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as e:
        raise TopologyError(f"{source}: invalid YAML: {e}") from None
    return _TopologyReader(source).read(doc)


def load_topology(path: str | Path) -> Topology:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TopologyError(f"{path}: cannot read topology file: {e}") from None
    return parse_topology(text, str(path))
