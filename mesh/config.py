"""Load the mesh state file: ztunnel's local config format (`LOCAL_XDS_PATH`) plus our waypoint `routes`.

The file is checked strictly, as ztunnel's serde structs with `deny_unknown_fields` are: an unknown key, a
wrong type or a dangling reference is refused with a `ConfigError` naming the file, the key path (for example
`workloads[2].networkGateway.hboneMtlsPort`) and what was expected. The caller keeps its last good state.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import yaml

from hbone.baggage import MAX_VALUE_BYTES, WORKLOAD_TYPES, is_valid_value
from hbone.identity import (
    DEFAULT_TRUST_DOMAIN,
    SPIFFE_PREFIX,
    Identity,
    IdentityError,
    check_segment,
    check_trust_domain,
)
from mesh.model import (
    DEFAULT_HBONE_PORT,
    Action,
    ApplicationTunnel,
    AppTunnelProtocol,
    Authorization,
    BackendRef,
    Clause,
    FrozenMap,
    GatewayAddress,
    HeaderMatch,
    HeaderMatchType,
    HealthPolicy,
    HealthStatus,
    IPAddress,
    IPNetwork,
    LoadBalancer,
    LoadBalancerMode,
    LoadBalancerScope,
    Locality,
    MatchKind,
    NamespacedHostname,
    NetworkAddress,
    NetworkMode,
    PathMatch,
    PathMatchType,
    PortMap,
    Protocol,
    RbacMatch,
    RetryPolicy,
    Route,
    RouteMatch,
    RouteRule,
    Rule,
    Scope,
    Service,
    ServiceAccountMatch,
    StringMatch,
    Timeouts,
    Workload,
)

E = TypeVar("E", bound=StrEnum)
T = TypeVar("T")


class ConfigError(ValueError):
    """A config file we refuse; the message is meant for the person who wrote the file."""


class ConfigReadError(ConfigError):
    """A config file that could not be read (an I/O error, such as running out of file descriptors): it says
    nothing of the file, and reading it again later may work."""


@dataclass(frozen=True, slots=True)
class MeshConfig:
    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()
    policies: tuple[Authorization, ...] = ()
    routes: tuple[Route, ...] = ()
    source: str = "<config>"


# --- YAML ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Tagged:
    """A `!Exact value` style node: serde_yaml's tag form of an enum variant carrying data."""

    tag: str
    value: Any


class _Loader(yaml.SafeLoader):
    """SafeLoader that knows the enum tags and refuses duplicate keys (which PyYAML silently overwrites)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` overrides are legitimate, only literal repeats are refused
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, list | dict):
                continue  # let PyYAML report unhashable keys itself
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {mark.line + 1})", mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _construct_tagged(loader: yaml.SafeLoader, node: yaml.Node) -> _Tagged:
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        assert isinstance(node, yaml.MappingNode)
        value = loader.construct_mapping(node, deep=True)
    return _Tagged(node.tag.lstrip("!"), value)


for _kind in MatchKind:
    _Loader.add_constructor(f"!{_kind.value}", _construct_tagged)


# --- The reader: typed access with key paths ----------------------------------------------------------

_MISSING: Any = object()


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, expected: str, got: Any = _MISSING) -> ConfigError:
        where = f"{self.source}: {path}" if path else self.source
        if got is _MISSING:
            return ConfigError(f"{where}: {expected}")
        return ConfigError(f"{where}: expected {expected}, got {_show(got)}")

    def obj(self, value: Any, path: str, keys: tuple[str, ...], required: tuple[str, ...] = ()) -> _Obj:
        if not isinstance(value, dict):
            raise self.fail(path, "a mapping", value)
        for key in value:
            if key not in keys:
                raise self.fail(_join(path, str(key)), f"unknown key; expected one of: {', '.join(keys)}")
        for key in required:
            if key not in value:
                raise self.fail(_join(path, key), "missing required key")
        return _Obj(self, value, path)

    def items(self, value: Any, path: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(path, "a list", value)
        return value

    def string(self, value: Any, path: str, *, empty: bool = True) -> str:
        if not isinstance(value, str):
            raise self.fail(path, "a string (quote numbers and booleans)", value)
        if not empty and value == "":
            raise self.fail(path, "a non-empty string", value)
        return value

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(path, "true or false", value)
        return value

    def integer(self, value: Any, path: str, lo: int, hi: int, *, key: bool = False) -> int:
        # A map key such as `"80"` may be written quoted (JSON has only string keys); a value may not, as
        # ztunnel's parser refuses it. Bools are ints in Python and are refused.
        if key and isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.fail(path, f"an integer from {lo} to {hi}", value)
        return value

    def port(self, value: Any, path: str, *, key: bool = False) -> int:
        return self.integer(value, path, 1, 65535, key=key)

    def enum(self, cls: type[E], value: Any, path: str) -> E:
        try:
            return cls(value)
        except ValueError:
            raise self.fail(path, "one of " + "|".join(m.value for m in cls), value) from None

    def ip(self, value: Any, path: str) -> IPAddress:
        try:
            return ipaddress.ip_address(self.string(value, path))
        except ValueError:
            raise self.fail(path, "an IP address", value) from None

    def cidr(self, value: Any, path: str) -> IPNetwork:
        try:
            # Host bits are tolerated (10.0.0.1/8 means 10.0.0.0/8), as ztunnel's IpNet does.
            return ipaddress.ip_network(self.string(value, path), strict=False)
        except ValueError:
            raise self.fail(path, "an IP address or CIDR such as 10.0.0.0/8", value) from None

    def network_address(self, value: Any, path: str) -> NetworkAddress:
        text = self.string(value, path)
        network, sep, ip = text.partition("/")
        try:
            if sep:
                return NetworkAddress(network, ipaddress.ip_address(ip))
        except ValueError:
            pass
        raise self.fail(path, '"<network>/<ip>" (an empty network is written "/<ip>")', value)

    def port_map(self, value: Any, path: str) -> PortMap:
        if value is None:
            return FrozenMap()
        if not isinstance(value, dict):
            raise self.fail(path, "a mapping {servicePort: targetPort}", value)
        out: dict[int, int] = {}
        for key, target in value.items():
            port = self.port(key, _join(path, str(key)), key=True)
            # 0 is how istiod says "named target port, resolve per endpoint".
            out[port] = self.integer(target, _join(path, str(key)), 0, 65535)
        return FrozenMap(out)

    def duration(self, value: Any, path: str) -> float:
        try:
            return parse_duration(self.string(value, path))
        except ValueError:
            raise self.fail(path, "a duration such as 500ms, 2s, 1m or 1m30s", value) from None

    def each(self, value: Any, path: str, read: Callable[[Any, str], T]) -> tuple[T, ...]:
        return tuple(read(item, f"{path}[{i}]") for i, item in enumerate(self.items(value, path)))


class _Obj:
    """One YAML mapping whose keys were already checked; getters take defaults for optional keys."""

    def __init__(self, r: _Reader, value: dict[Any, Any], path: str) -> None:
        self.r = r
        self.value = value
        self.path = path

    def at(self, key: str) -> str:
        return _join(self.path, key)

    def get(self, key: str, default: Any = None) -> Any:
        value = self.value.get(key)
        return default if value is None else value

    def has(self, key: str) -> bool:
        return self.value.get(key) is not None

    def string(self, key: str, default: str = "", *, empty: bool = True) -> str:
        return self.r.string(self.get(key, default), self.at(key), empty=empty)

    def label(self, key: str, *, empty: bool = True) -> str:
        """A string that peers learn through `baggage`: held to what a peer accepts there (SPEC §4.2), so that
        no value is sent to one side and silently missing on the other."""
        value = self.string(key, empty=empty)
        if value and not is_valid_value(value):
            raise self.r.fail(self.at(key), f"at most {MAX_VALUE_BYTES} characters of A-Z a-z 0-9 . _ -", value)
        return value

    def spiffe(self, key: str, default: str, check: Callable[[str], str]) -> str:
        """A part of the workload's SPIFFE identity (trust domain, namespace, service account): held to the rule
        every peer's certificate is checked by (`hbone.identity`), so that a name no handshake would accept is
        refused here, naming its key, instead of failing every connection of that workload at run time."""
        value = self.string(key, default, empty=False)
        try:
            return check(value)
        except IdentityError as e:
            raise self.r.fail(self.at(key), f"{_show(value)} cannot be part of a SPIFFE id: {e}") from None

    def opt(self, key: str, read: Callable[[Any, str], T]) -> T | None:
        """An optional sub-value: None when absent, else `read(value, path)`."""
        return read(self.value[key], self.at(key)) if self.has(key) else None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _show(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, _Tagged):
        return f"!{value.tag} {value.value!r}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --- Workloads ----------------------------------------------------------------------------------------

_GATEWAY_KEYS = ("destination", "hboneMtlsPort")


def _gateway(r: _Reader, value: Any, path: str) -> GatewayAddress:
    o = r.obj(value, path, _GATEWAY_KEYS, required=("destination",))
    text = o.string("destination", empty=False)
    left, sep, right = text.partition("/")
    expected = '"<network>/<ip>" or "<namespace>/<hostname>"'
    if not sep or not right:
        raise r.fail(o.at("destination"), expected, text)
    destination: NetworkAddress | NamespacedHostname
    try:
        destination = NetworkAddress(left, ipaddress.ip_address(right))
    except ValueError:
        if not left:
            raise r.fail(o.at("destination"), expected, text) from None
        destination = NamespacedHostname(left, right)
    port = r.port(o.get("hboneMtlsPort", DEFAULT_HBONE_PORT), o.at("hboneMtlsPort"))
    return GatewayAddress(destination, port)


_WORKLOAD_KEYS = (
    "uid", "name", "namespace", "serviceAccount", "trustDomain", "workloadIps", "protocol", "network",
    "clusterId", "workloadName", "workloadType", "canonicalName", "canonicalRevision", "locality", "node",
    "hostname", "networkMode", "nativeTunnel", "applicationTunnel", "waypoint", "networkGateway",
    "authorizationPolicies", "status", "capacity", "services",
)  # fmt: skip


def _workload(r: _Reader, value: Any, path: str) -> Workload:
    o = r.obj(value, path, _WORKLOAD_KEYS, required=("name", "namespace"))
    name = o.string("name", empty=False)
    namespace = o.label("namespace", empty=False)
    o.spiffe("namespace", "", check_segment)
    service_account = o.spiffe("serviceAccount", "default", check_segment)
    trust_domain = o.spiffe("trustDomain", DEFAULT_TRUST_DOMAIN, check_trust_domain)
    try:
        Identity.of(namespace, service_account, trust_domain)  # each part is good; the whole may be too long
    except IdentityError as e:
        raise r.fail(o.at("serviceAccount"), f"{_show(service_account)} cannot be part of a SPIFFE id: {e}") from None
    loc = r.obj(o.get("locality", {}), o.at("locality"), ("region", "zone", "subzone"))
    kind = o.string("workloadType", "deployment").lower()
    if kind not in WORKLOAD_TYPES:
        raise r.fail(o.at("workloadType"), "one of " + "|".join(sorted(WORKLOAD_TYPES)), kind)
    services: dict[str, PortMap] = {}
    raw_services = o.get("services", {})
    if not isinstance(raw_services, dict):
        raise r.fail(o.at("services"), 'a mapping {"<namespace>/<hostname>": {servicePort: targetPort}}')
    for key, ports in raw_services.items():
        key_path = f"{o.at('services')}[{key!r}]"
        ns, sep, host = r.string(key, key_path).partition("/")
        if not ns or not sep or not host:
            raise r.fail(key_path, 'a key "<namespace>/<hostname>"', key)
        services[key] = r.port_map(ports, key_path)
    return Workload(
        # ztunnel derives a uid when none is given; ours only has to be unique within the file.
        uid=o.string("uid", f"{namespace}/{name}", empty=False),
        name=name,
        namespace=namespace,
        service_account=service_account,
        trust_domain=trust_domain,
        workload_ips=r.each(o.get("workloadIps"), o.at("workloadIps"), r.ip),
        protocol=r.enum(Protocol, o.get("protocol", "TCP"), o.at("protocol")),
        network=o.string("network"),
        cluster_id=o.label("clusterId"),
        workload_name=o.label("workloadName"),
        workload_type=kind,
        canonical_name=o.label("canonicalName"),
        canonical_revision=o.label("canonicalRevision"),
        locality=Locality(loc.label("region"), loc.label("zone"), loc.string("subzone")),
        node=o.string("node"),
        hostname=o.string("hostname"),
        network_mode=r.enum(NetworkMode, o.get("networkMode", "Standard"), o.at("networkMode")),
        native_tunnel=r.boolean(o.get("nativeTunnel", False), o.at("nativeTunnel")),
        application_tunnel=_app_tunnel(r, o.get("applicationTunnel"), o.at("applicationTunnel")),
        waypoint=o.opt("waypoint", lambda v, p: _gateway(r, v, p)),
        network_gateway=o.opt("networkGateway", lambda v, p: _gateway(r, v, p)),
        authorization_policies=r.each(o.get("authorizationPolicies"), o.at("authorizationPolicies"), r.string),
        status=r.enum(HealthStatus, o.get("status", "Healthy"), o.at("status")),
        capacity=r.integer(o.get("capacity", 1), o.at("capacity"), 0, 2**32 - 1),
        services=FrozenMap(services),
    )


def _app_tunnel(r: _Reader, value: Any, path: str) -> ApplicationTunnel | None:
    if value is None:
        return None
    o = r.obj(value, path, ("protocol", "port"))
    port = r.port(o.get("port"), o.at("port")) if o.has("port") else None
    protocol = r.enum(AppTunnelProtocol, o.get("protocol", "NONE"), o.at("protocol"))
    if protocol is AppTunnelProtocol.PROXY:
        # ztunnel would have to write a PROXY v2 header before the application's bytes; we do not.
        raise r.fail(o.at("protocol"), "NONE (the PROXY protocol is not implemented)", o.get("protocol"))
    return ApplicationTunnel(protocol, port)


# --- Services -----------------------------------------------------------------------------------------

_SERVICE_KEYS = (
    "name", "namespace", "hostname", "vips", "ports", "subjectAltNames", "waypoint", "loadBalancer",
    "canonical",
)  # fmt: skip


def _service(r: _Reader, value: Any, path: str) -> Service:
    o = r.obj(value, path, _SERVICE_KEYS, required=("name", "namespace", "hostname"))

    def san(item: Any, item_path: str) -> Identity:
        try:
            return Identity.parse(r.string(item, item_path))
        except IdentityError as e:
            raise r.fail(item_path, f"a SPIFFE id spiffe://<td>/ns/<ns>/sa/<sa> ({e})") from None

    return Service(
        name=o.string("name", empty=False),
        namespace=o.string("namespace", empty=False),
        hostname=o.string("hostname", empty=False),
        vips=r.each(o.get("vips"), o.at("vips"), r.network_address),
        ports=r.port_map(o.get("ports"), o.at("ports")),
        subject_alt_names=r.each(o.get("subjectAltNames"), o.at("subjectAltNames"), san),
        waypoint=o.opt("waypoint", lambda v, p: _gateway(r, v, p)),
        load_balancer=_load_balancer(r, o.get("loadBalancer"), o.at("loadBalancer")),
        canonical=r.boolean(o.get("canonical", False), o.at("canonical")),
    )


def _load_balancer(r: _Reader, value: Any, path: str) -> LoadBalancer | None:
    if value is None:
        return None
    o = r.obj(value, path, ("routingPreferences", "mode", "healthPolicy"))
    prefs = r.each(o.get("routingPreferences"), o.at("routingPreferences"),
                   lambda v, p: r.enum(LoadBalancerScope, v, p))  # fmt: skip
    return LoadBalancer(
        routing_preferences=prefs,
        mode=r.enum(LoadBalancerMode, o.get("mode", "Standard"), o.at("mode")),
        health_policy=r.enum(HealthPolicy, o.get("healthPolicy", "OnlyHealthy"), o.at("healthPolicy")),
    )


# --- Policies -----------------------------------------------------------------------------------------

_POLICY_KEYS = ("name", "namespace", "scope", "action", "dryRun", "rules")
_MATCH_FIELDS = (
    "namespaces", "principals", "serviceAccounts", "sourceIps", "destinationIps", "destinationPorts",
)  # fmt: skip
_MATCH_KEYS = _MATCH_FIELDS + tuple("not" + f[0].upper() + f[1:] for f in _MATCH_FIELDS)


def _string_match(r: _Reader, value: Any, path: str, *, principal: bool = False) -> StringMatch:
    expected = '{Exact|Prefix|Suffix: "<text>"}, {Presence: []} or a !Exact/!Prefix/!Suffix tag'
    if isinstance(value, _Tagged):
        tag, inner = value.tag, value.value
    elif isinstance(value, dict) and len(value) == 1:
        ((tag, inner),) = value.items()
    else:
        raise r.fail(path, expected, value)
    kind = r.enum(MatchKind, tag, path)
    if kind is MatchKind.PRESENCE:
        return StringMatch(kind)
    text = r.string(inner, f"{path}.{tag}")
    if principal and text.startswith(SPIFFE_PREFIX):
        # ztunnel compares principals without the scheme; a pasted SPIFFE id would silently never match.
        text = text[len(SPIFFE_PREFIX) :]
    return StringMatch(kind, text)


def _sa_match(r: _Reader, value: Any, path: str) -> ServiceAccountMatch:
    o = r.obj(value, path, ("namespace", "serviceAccount"), required=("namespace", "serviceAccount"))
    return ServiceAccountMatch(o.string("namespace", empty=False), o.string("serviceAccount", empty=False))


def _rbac_match(r: _Reader, value: Any, path: str) -> RbacMatch:
    o = r.obj(value, path, _MATCH_KEYS)

    def strings(key: str, principal: bool = False) -> tuple[StringMatch, ...]:
        return r.each(o.get(key), o.at(key), lambda v, p: _string_match(r, v, p, principal=principal))

    def sas(key: str) -> tuple[ServiceAccountMatch, ...]:
        return r.each(o.get(key), o.at(key), lambda v, p: _sa_match(r, v, p))

    def cidrs(key: str) -> tuple[IPNetwork, ...]:
        return r.each(o.get(key), o.at(key), r.cidr)

    def ports(key: str) -> tuple[int, ...]:
        return r.each(o.get(key), o.at(key), r.port)

    return RbacMatch(
        namespaces=strings("namespaces"),
        not_namespaces=strings("notNamespaces"),
        principals=strings("principals", principal=True),
        not_principals=strings("notPrincipals", principal=True),
        service_accounts=sas("serviceAccounts"),
        not_service_accounts=sas("notServiceAccounts"),
        source_ips=cidrs("sourceIps"),
        not_source_ips=cidrs("notSourceIps"),
        destination_ips=cidrs("destinationIps"),
        not_destination_ips=cidrs("notDestinationIps"),
        destination_ports=ports("destinationPorts"),
        not_destination_ports=ports("notDestinationPorts"),
    )


def _policy(r: _Reader, value: Any, path: str) -> Authorization:
    o = r.obj(value, path, _POLICY_KEYS, required=("name", "namespace", "scope", "action"))

    def clause(v: Any, p: str) -> Clause:
        return r.each(v, p, lambda m, mp: _rbac_match(r, m, mp))

    def rule(v: Any, p: str) -> Rule:
        return r.each(v, p, clause)

    return Authorization(
        name=o.string("name", empty=False),
        # Global policies may sit in any namespace (istiod puts them in the root namespace).
        namespace=o.string("namespace"),
        scope=r.enum(Scope, o.get("scope"), o.at("scope")),
        action=r.enum(Action, o.get("action"), o.at("action")),
        # ztunnel requires dryRun; a missing one meaning "enforce" is the only safe reading.
        dry_run=r.boolean(o.get("dryRun", False), o.at("dryRun")),
        rules=r.each(o.get("rules"), o.at("rules"), rule),
    )


# --- Routes -------------------------------------------------------------------------------------------

_DURATION = re.compile(r"(?:\d{1,5}(?:h|m|s|ms)){1,4}")
_DURATION_PART = re.compile(r"(\d+)(h|ms|m|s)")
_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_RETRY_ON = ("connect-failure", "reset", "5xx", "gateway-error")
_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")


def parse_duration(text: str) -> float:
    """Gateway API duration (`500ms`, `2s`, `1m30s`) in seconds; raises ValueError."""
    if not _DURATION.fullmatch(text):
        raise ValueError(text)
    return sum(int(n) * _SECONDS[unit] for n, unit in _DURATION_PART.findall(text))


def _route_match(r: _Reader, value: Any, path: str) -> RouteMatch:
    o = r.obj(value, path, ("path", "headers", "method"))
    path_match = None
    if o.has("path"):
        p = r.obj(o.get("path"), o.at("path"), ("type", "value"))
        kind = r.enum(PathMatchType, p.get("type", "PathPrefix"), p.at("type"))
        text = p.string("value", "/")
        if not text.startswith("/"):
            raise r.fail(p.at("value"), "a path starting with /", text)
        path_match = PathMatch(kind, text)

    def header(v: Any, hp: str) -> HeaderMatch:
        h = r.obj(v, hp, ("name", "value", "type"), required=("name", "value"))
        kind = r.enum(HeaderMatchType, h.get("type", "Exact"), h.at("type"))
        text = h.string("value")
        pattern = None
        if kind is HeaderMatchType.REGULAR_EXPRESSION:
            try:
                pattern = re.compile(text)
            except re.error as e:
                raise r.fail(h.at("value"), f"a valid regular expression ({e})") from None
        return HeaderMatch(h.string("name", empty=False).lower(), text, kind, pattern)

    method = None
    if o.has("method"):
        method = r.string(o.get("method"), o.at("method"))
        if method not in _METHODS:
            raise r.fail(o.at("method"), "one of " + "|".join(_METHODS), method)
    return RouteMatch(path_match, r.each(o.get("headers"), o.at("headers"), header), method)


def _route_rule(r: _Reader, value: Any, path: str, namespace: str) -> RouteRule:
    o = r.obj(value, path, ("matches", "backendRefs", "timeouts", "retry"), required=("backendRefs",))

    def backend(v: Any, bp: str) -> BackendRef:
        b = r.obj(v, bp, ("name", "namespace", "port", "weight"), required=("name", "port"))
        return BackendRef(
            name=b.string("name", empty=False),
            namespace=b.string("namespace", namespace, empty=False),
            port=r.port(b.get("port"), b.at("port")),
            weight=r.integer(b.get("weight", 1), b.at("weight"), 0, 1_000_000),
        )

    backends = r.each(o.get("backendRefs"), o.at("backendRefs"), backend)
    if not backends:
        raise r.fail(o.at("backendRefs"), "at least one backend")
    timeouts = None
    if o.has("timeouts"):
        t = r.obj(o.get("timeouts"), o.at("timeouts"), ("request", "backendRequest"))
        timeouts = Timeouts(t.opt("request", r.duration), t.opt("backendRequest", r.duration))
    retry = None
    if o.has("retry"):
        y = r.obj(o.get("retry"), o.at("retry"), ("attempts", "retryOn", "backoff"))

        def retry_on(v: Any, rp: str) -> str:
            text = str(v) if isinstance(v, int) and not isinstance(v, bool) else r.string(v, rp)
            if text not in _RETRY_ON and not (len(text) == 3 and text.isdigit() and text[0] in "45"):
                raise r.fail(rp, "one of " + "|".join(_RETRY_ON) + " or a 4xx/5xx status code", v)
            return text

        retry = RetryPolicy(
            attempts=r.integer(y.get("attempts", 1), y.at("attempts"), 0, 100),
            retry_on=r.each(y.get("retryOn"), y.at("retryOn"), retry_on),
            backoff=y.opt("backoff", r.duration),
        )
    matches = r.each(o.get("matches"), o.at("matches"), lambda v, p: _route_match(r, v, p))
    return RouteRule(matches or (RouteMatch(),), backends, timeouts, retry)


def _route(r: _Reader, value: Any, path: str) -> Route:
    o = r.obj(value, path, ("name", "namespace", "hostnames", "rules"), required=("name", "namespace"))
    namespace = o.string("namespace", empty=False)
    hostnames = r.each(o.get("hostnames"), o.at("hostnames"), lambda v, p: _route_hostname(r, v, p))
    rules = r.each(o.get("rules"), o.at("rules"), lambda v, p: _route_rule(r, v, p, namespace))
    return Route(o.string("name", empty=False), namespace, hostnames, rules)


_HOSTNAME = re.compile(r"(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")


def _route_hostname(r: _Reader, value: Any, path: str) -> str:
    """A route hostname as Gateway API writes it: a DNS name, or `*.` + one for every host under it."""
    name = r.string(value, path, empty=False).lower()
    if len(name) > 253 or not _HOSTNAME.fullmatch(name):
        raise r.fail(path, "a DNS name, or *.<domain> (a wildcard only as the whole first label)", value)
    return name


# --- Cross-references ---------------------------------------------------------------------------------


def _check_unique(r: _Reader, items: Mapping[str, list[str]], what: str) -> None:
    for key, paths in items.items():
        if len(paths) > 1:
            raise r.fail(paths[1], f"duplicate {what} {key!r} (first defined at {paths[0]})")


def _check_references(r: _Reader, cfg: MeshConfig) -> None:
    """Refuse dangling names: a typo in a policy reference would otherwise silently open access."""
    uids: dict[str, list[str]] = {}
    addresses: dict[str, list[str]] = {}
    for i, w in enumerate(cfg.workloads):
        uids.setdefault(w.uid, []).append(f"workloads[{i}].uid")
        # Host-network workloads share their node's IP, so they cannot be found by address anyway.
        if w.network_mode is NetworkMode.STANDARD:
            for j, ip in enumerate(w.workload_ips):
                addresses.setdefault(f"{w.network}/{ip}", []).append(f"workloads[{i}].workloadIps[{j}]")
    _check_unique(r, uids, "workload uid")
    _check_unique(r, addresses, "workload address")

    hosts: dict[str, list[str]] = {}
    vips: dict[str, list[str]] = {}
    names: set[tuple[str, str]] = set()
    for i, s in enumerate(cfg.services):
        hosts.setdefault(s.key, []).append(f"services[{i}].hostname")
        names.add((s.namespace, s.name))
        for j, vip in enumerate(s.vips):
            vips.setdefault(str(vip), []).append(f"services[{i}].vips[{j}]")
    _check_unique(r, hosts, "service")
    _check_unique(r, vips, "service VIP")

    policies: dict[str, list[str]] = {}
    for i, p in enumerate(cfg.policies):
        policies.setdefault(p.key, []).append(f"policies[{i}].name")
    _check_unique(r, policies, "policy")

    def check_waypoint(gw: GatewayAddress | None, path: str) -> None:
        target = gw.destination if gw is not None else None
        if isinstance(target, NamespacedHostname) and str(target) not in hosts:
            raise r.fail(path, f"a defined service, but no service is {target}")

    for i, w in enumerate(cfg.workloads):
        for key in w.services:
            if key not in hosts:
                raise r.fail(f"workloads[{i}].services[{key!r}]", "a service defined under `services`")
        for j, ref in enumerate(w.authorization_policies):
            if ref not in policies:
                path = f"workloads[{i}].authorizationPolicies[{j}]"
                raise r.fail(path, f"a defined policy; no policy is {ref}")
        check_waypoint(w.waypoint, f"workloads[{i}].waypoint.destination")
    for i, s in enumerate(cfg.services):
        check_waypoint(s.waypoint, f"services[{i}].waypoint.destination")
    routes: dict[str, list[str]] = {}
    for i, route in enumerate(cfg.routes):
        routes.setdefault(f"{route.namespace}/{route.name}", []).append(f"routes[{i}].name")
        for j, rule in enumerate(route.rules):
            for k, b in enumerate(rule.backend_refs):
                if (b.namespace, b.name) not in names:
                    path = f"routes[{i}].rules[{j}].backendRefs[{k}].name"
                    raise r.fail(path, f"a defined service; no service {b.namespace}/{b.name}")
    _check_unique(r, routes, "route")


# --- Entry points -------------------------------------------------------------------------------------

_TOP_KEYS = ("workloads", "services", "policies", "routes")


def parse_config(text: str, source_name: str = "<config>") -> MeshConfig:
    """Parse and validate the YAML text; `source_name` is used in error messages."""
    r = _Reader(source_name)
    try:
        doc = yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as e:
        raise ConfigError(f"{source_name}: invalid YAML: {e}") from None
    if doc is None:
        doc = {}
    o = r.obj(doc, "", _TOP_KEYS)
    cfg = MeshConfig(
        workloads=r.each(o.get("workloads"), "workloads", lambda v, p: _workload(r, v, p)),
        services=r.each(o.get("services"), "services", lambda v, p: _service(r, v, p)),
        policies=r.each(o.get("policies"), "policies", lambda v, p: _policy(r, v, p)),
        routes=r.each(o.get("routes"), "routes", lambda v, p: _route(r, v, p)),
        source=source_name,
    )
    _check_references(r, cfg)
    return cfg


def load_config(path: str | Path) -> MeshConfig:
    """Read and validate the config file at `path`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigReadError(f"{path}: cannot read config file: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: cannot read config file: {e}") from None
    return parse_config(text, str(path))
