"""Loading ztunnel's local config format (plus our routes): the reference example, defaults, and errors."""

from __future__ import annotations

import json
from ipaddress import ip_address, ip_network
from pathlib import Path

import pytest
import yaml

from hbone.identity import Identity
from mesh.config import ConfigError, MeshConfig, load_config, parse_config, parse_duration
from mesh.model import (
    Action,
    GatewayAddress,
    HeaderMatchType,
    HealthStatus,
    MatchKind,
    NamespacedHostname,
    NetworkAddress,
    PathMatchType,
    Protocol,
    Scope,
    StringMatch,
)
from mesh.state import MeshState

# The complete example of the reference (§7), verbatim, comments included.
REFERENCE_EXAMPLE = """\
workloads:
- uid: cluster1//v1/Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  trustDomain: cluster.local
  workloadIps: ["127.0.0.1"]
  protocol: HBONE
  node: local
  network: ""
  clusterId: cluster1
  workloadName: client
  workloadType: deployment
  canonicalName: client
  canonicalRevision: v1
  locality: {region: r1, zone: z1, subzone: ""}
  services: {}
- uid: cluster1//v1/Pod/default/server
  name: server
  namespace: default
  serviceAccount: server
  trustDomain: cluster.local
  workloadIps: ["127.0.0.2"]
  protocol: HBONE
  node: local
  clusterId: cluster1
  workloadName: server
  workloadType: deployment
  canonicalName: server
  canonicalRevision: v1
  # optional; the referenced waypoint Service/Workload must also be defined, else UnknownWaypoint:
  # waypoint: {destination: "default/waypoint.default.svc.cluster.local", hboneMtlsPort: 15008}
  authorizationPolicies: ["default/allow-client"]
  services:
    "default/server.default.svc.cluster.local": {80: 8080}
- uid: net2/SplitHorizonWorkload/istio-system/eastwest/default/server.default.svc.cluster.local
  name: remote-server
  namespace: default
  trustDomain: cluster.local
  workloadIps: []                      # remote: no IPs
  protocol: HBONE
  network: net2
  capacity: 3
  networkGateway: {destination: "net2/172.18.0.10", hboneMtlsPort: 15008}
  services:
    "default/server.default.svc.cluster.local": {80: 8080}
services:
- name: server
  namespace: default
  hostname: server.default.svc.cluster.local
  vips: ["/127.10.0.1"]
  ports: {80: 8080}
  subjectAltNames: ["spiffe://cluster.local/ns/default/sa/server"]
  canonical: true
policies:
- name: allow-client
  namespace: default
  scope: WorkloadSelector          # Global | Namespace | WorkloadSelector
  action: Allow                    # Allow | Deny
  dryRun: false                    # required (no serde default)
  rules:                           # rules -> clauses -> matches
  - - - principals: [{Exact: "cluster.local/ns/default/sa/client"}]   # or `!Exact cluster.local/...`
        destinationPorts: [8080]
"""

ROUTES = """\
services:
- {name: reviews, namespace: default, hostname: reviews.default.svc.cluster.local, ports: {9080: 9080}}
- {name: reviews-v2, namespace: default, hostname: reviews-v2.default.svc.cluster.local, ports: {9080: 9080}}
routes:
- name: reviews
  namespace: default
  hostnames: ["reviews.default.svc.cluster.local"]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v2}, headers: [{name: x-user, value: jason}], method: GET}]
    backendRefs: [{name: reviews-v2, namespace: default, port: 9080, weight: 80}]
    timeouts: {request: 2s}
    retry: {attempts: 3, retryOn: [connect-failure, "503"], backoff: 25ms}
  - matches: [{headers: [{name: X-Canary, value: "^(yes|1)$", type: RegularExpression}]}]
    backendRefs: [{name: reviews, port: 9080}]
  - backendRefs: [{name: reviews, port: 9080}]
"""


def test_reference_example_parses() -> None:
    cfg = parse_config(REFERENCE_EXAMPLE, "example.yaml")
    client, server, remote = cfg.workloads
    assert client.uid == "cluster1//v1/Pod/default/client"
    assert client.workload_ips == (ip_address("127.0.0.1"),)
    assert client.protocol is Protocol.HBONE
    assert (client.node, client.locality.region, client.locality.zone) == ("local", "r1", "z1")
    assert client.identity == Identity.parse("spiffe://cluster.local/ns/default/sa/client")
    assert server.authorization_policies == ("default/allow-client",)
    assert server.services == {"default/server.default.svc.cluster.local": {80: 8080}}
    assert remote.workload_ips == ()
    assert remote.capacity == 3
    assert remote.service_account == "default"
    assert remote.network_gateway == GatewayAddress(NetworkAddress("net2", ip_address("172.18.0.10")), 15008)
    (svc,) = cfg.services
    assert svc.vips == (NetworkAddress("", ip_address("127.10.0.1")),)
    assert svc.ports == {80: 8080}
    assert svc.subject_alt_names == (Identity("cluster.local", "default", "server"),)
    assert svc.canonical is True
    (policy,) = cfg.policies
    assert (policy.scope, policy.action, policy.dry_run) == (Scope.WORKLOAD_SELECTOR, Action.ALLOW, False)
    (((match,),),) = policy.rules
    assert match.principals == (StringMatch(MatchKind.EXACT, "cluster.local/ns/default/sa/client"),)
    assert match.destination_ports == (8080,)


def test_workload_baggage_from_config() -> None:
    client = parse_config(REFERENCE_EXAMPLE, "example.yaml").workloads[0]
    b = client.baggage()
    assert (b.cluster_id, b.namespace, b.workload_type, b.workload_name) == (
        "cluster1",
        "default",
        "deployment",
        "client",
    )
    assert (b.service_name, b.service_version, b.region, b.zone) == ("client", "v1", "r1", "z1")


def test_defaults_as_istio() -> None:
    cfg = parse_config(
        "workloads: [{name: w, namespace: ns, waypoint: {destination: net/10.0.0.9}}]\n", "defaults.yaml"
    )
    (w,) = cfg.workloads
    assert (w.trust_domain, w.service_account, w.protocol, w.status, w.capacity) == (
        "cluster.local",
        "default",
        Protocol.TCP,
        HealthStatus.HEALTHY,
        1,
    )
    assert w.waypoint is not None and w.waypoint.hbone_mtls_port == 15008
    assert w.uid == "ns/w"


def test_empty_file_is_an_empty_mesh() -> None:
    assert parse_config("", "empty.yaml") == MeshConfig(source="empty.yaml")
    assert parse_config("workloads:\nservices: []\n", "e.yaml").workloads == ()


def test_string_match_forms() -> None:
    text = """\
policies:
- name: p
  namespace: ns
  scope: Namespace
  action: Deny
  rules:
  - - - principals: [!Exact cluster.local/ns/a/sa/b, {Prefix: "cluster.local/ns/x/"}, !Suffix /sa/admin]
        namespaces: [{Presence: []}, !Presence ""]
        notPrincipals: [{Exact: "spiffe://cluster.local/ns/a/sa/c"}]
        sourceIps: [10.0.0.0/8, 192.168.1.7]
        serviceAccounts: [{namespace: a, serviceAccount: b}]
"""
    (policy,) = parse_config(text, "p.yaml").policies
    (((m,),),) = policy.rules
    assert m.principals == (
        StringMatch(MatchKind.EXACT, "cluster.local/ns/a/sa/b"),
        StringMatch(MatchKind.PREFIX, "cluster.local/ns/x/"),
        StringMatch(MatchKind.SUFFIX, "/sa/admin"),
    )
    assert m.namespaces == (StringMatch(MatchKind.PRESENCE), StringMatch(MatchKind.PRESENCE))
    # A pasted SPIFFE id would never match, since principals are compared without the scheme.
    assert m.not_principals == (StringMatch(MatchKind.EXACT, "cluster.local/ns/a/sa/c"),)
    assert m.source_ips == (ip_network("10.0.0.0/8"), ip_network("192.168.1.7/32"))


def test_routes() -> None:
    cfg = parse_config(ROUTES, "routes.yaml")
    (route,) = cfg.routes
    assert route.hostnames == ("reviews.default.svc.cluster.local",)
    first, second, third = route.rules
    (m,) = first.matches
    assert m.path is not None and (m.path.type, m.path.value) == (PathMatchType.PATH_PREFIX, "/v2")
    assert m.method == "GET"
    assert (m.headers[0].name, m.headers[0].value, m.headers[0].type) == (
        "x-user",
        "jason",
        HeaderMatchType.EXACT,
    )
    (backend,) = first.backend_refs
    assert (backend.name, backend.namespace, backend.port, backend.weight) == (
        "reviews-v2",
        "default",
        9080,
        80,
    )
    assert first.timeouts is not None and first.timeouts.request == 2.0
    assert first.retry is not None
    assert (first.retry.attempts, first.retry.retry_on, first.retry.backoff) == (
        3,
        ("connect-failure", "503"),
        0.025,
    )
    assert first.matches_request("GET", "/v2/x?q=1", {"x-user": "jason"})
    assert not first.matches_request("GET", "/v2x", {"x-user": "jason"})
    assert not first.matches_request("POST", "/v2", {"x-user": "jason"})
    assert not first.matches_request("GET", "/v2", {})
    assert second.backend_refs[0].namespace == "default"  # defaults to the route's namespace
    assert second.matches_request("GET", "/", {"x-canary": "yes"})
    assert not second.matches_request("GET", "/", {"x-canary": "yess"})
    assert third.matches_request("DELETE", "/anything", {})


def test_route_hostnames_exact_and_wildcard() -> None:
    text = ROUTES.replace('hostnames: ["reviews.default.svc.cluster.local"]',
                          'hostnames: ["Reviews.default.svc.cluster.local", "*.example.com"]')  # fmt: skip
    (route,) = parse_config(text, "routes.yaml").routes
    assert route.hostnames == ("reviews.default.svc.cluster.local", "*.example.com")
    assert route.matches_host("reviews.default.svc.cluster.local")
    assert route.matches_host("REVIEWS.default.svc.cluster.local")
    # Gateway API: the wildcard stands for one or more whole labels, and not for the domain itself.
    assert route.matches_host("a.example.com") and route.matches_host("a.b.example.com")
    assert not route.matches_host("example.com") and not route.matches_host("aexample.com")
    assert not route.matches_host("reviews")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("2s", 2.0), ("1m", 60.0), ("1h", 3600.0), ("1m30s", 90.0), ("0s", 0.0)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "2", "1.5s", "-1s", "2 s", "1d", "123456s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


W = "workloads:\n- {name: a, namespace: ns, workloadIps: [10.0.0.1]}\n- {name: b, namespace: ns}\n"


def wl(fields: str) -> str:
    return f"workloads: [{{name: a, namespace: ns, {fields}}}]"


def svc(fields: str) -> str:
    return f"services: [{{name: s, namespace: ns, hostname: h, {fields}}}]"


def pol(fields: str) -> str:
    return f"policies: [{{name: p, namespace: ns, scope: Global, {fields}}}]"


def match(fields: str) -> str:
    return pol(f"action: Deny, rules: [[[{{{fields}}}]]]")


M = "policies[0].rules[0][0][0]"
R = "routes[0].rules[0]"

ERRORS = [
    # (file text, key path in the message, words of the expectation)
    (wl("bogus: 1"), "workloads[0].bogus", "unknown key"),
    ("wrkloads: []", "wrkloads", "unknown key; expected one of: workloads"),
    ("workloads: [{namespace: ns}]", "workloads[0].name", "missing required key"),
    ("workloads: {}", "workloads", "expected a list"),
    ("workloads: [[]]", "workloads[0]", "expected a mapping"),
    (
        W + "- {name: c, namespace: ns, networkGateway: {destination: n/1.2.3.4, hboneMtlsPort: 99999}}",
        "workloads[2].networkGateway.hboneMtlsPort",
        "integer from 1 to 65535, got 99999",
    ),
    (
        W + "- {name: c, namespace: ns, networkGateway: {destination: nowhere}}",
        "workloads[2].networkGateway.destination",
        "<network>/<ip>",
    ),
    (
        W + "- {name: c, namespace: ns, networkGateway: {destination: n/1.2.3.4, hbonePort: 1}}",
        "workloads[2].networkGateway.hbonePort",
        "unknown key",
    ),
    (wl("workloadIps: [10.0.0.300]"), "workloads[0].workloadIps[0]", "an IP"),
    (wl("protocol: hbone"), "workloads[0].protocol", "HBONE|TCP"),
    (wl("status: Ready"), "workloads[0].status", "Healthy|Unhealthy"),
    (wl("capacity: -1"), "workloads[0].capacity", "integer"),
    (wl("capacity: true"), "workloads[0].capacity", "integer"),
    (wl("capacity: '3'"), "workloads[0].capacity", "integer"),  # quoted: a string, as ztunnel reads it
    (svc("ports: {80: '8080'}"), "services[0].ports.80", "integer"),
    (wl("workloadType: statefulset"), "workloads[0].workloadType", "deployment"),
    (wl("canonicalRevision: 1.0"), "workloads[0].canonicalRevision", "string"),
    (wl("locality: {region: r, city: c}"), "workloads[0].locality.city", "unknown"),
    # Values that travel in baggage hold to what a peer keeps there, so none goes missing on the way.
    (wl('canonicalRevision: "1.0+build5"'), "workloads[0].canonicalRevision", "A-Z a-z 0-9 . _ -"),
    (wl('locality: {region: "us east"}'), "workloads[0].locality.region", "A-Z a-z 0-9 . _ -"),
    (wl(f"clusterId: {'c' * 254}"), "workloads[0].clusterId", "at most 253 characters"),
    # The parts of a workload's identity hold to the SPIFFE rule its peers check it by (hbone.identity), so a
    # name no handshake would accept is refused here rather than failing every connection at run time.
    (wl("trustDomain: Cluster.Local"), "workloads[0].trustDomain", "'Cluster.Local' cannot be part of a SPIFFE id"),
    (wl("trustDomain: cluster.local:443"), "workloads[0].trustDomain", "may only hold lowercase"),
    (wl('serviceAccount: "sleep%20v2"'), "workloads[0].serviceAccount", "no percent-encoding"),
    (wl('serviceAccount: "a/sa/b"'), "workloads[0].serviceAccount", "cannot be part of a SPIFFE id"),
    ('workloads: [{name: a, namespace: ".."}]', "workloads[0].namespace", "is not '.' or '..'"),
    (wl("services: {svc: {80: 80}}"), "workloads[0].services['svc']", "<namespace>"),
    (wl("services: {ns/h: {80: 80}}"), "workloads[0].services['ns/h']", "defined"),
    (
        wl("authorizationPolicies: [ns/missing]"),
        "workloads[0].authorizationPolicies[0]",
        "no policy is ns/missing",
    ),
    (
        wl("waypoint: {destination: ns/wp.ns.svc.cluster.local}"),
        "workloads[0].waypoint.destination",
        "no service is ns/wp.ns.svc.cluster.local",
    ),
    (
        W + "- {name: c, namespace: ns, workloadIps: [10.0.0.1]}",
        "workloads[2].workloadIps[0]",
        "duplicate workload",
    ),
    (
        "workloads: [{name: a, namespace: ns}, {name: a, namespace: ns}]",
        "workloads[1].uid",
        "duplicate workload",
    ),
    (svc("vips: [10.0.0.1]"), "services[0].vips[0]", "<network>/<ip>"),
    (svc("ports: {http: 80}"), "services[0].ports.http", "integer"),
    (svc("subjectAltNames: [x]"), "services[0].subjectAltNames[0]", "SPIFFE"),
    (svc("loadBalancer: {mode: Random}"), "services[0].loadBalancer.mode", "Standard|Strict|Failover|Passthrough"),
    (
        svc("loadBalancer: {routingPreferences: [Planet]}"),
        "services[0].loadBalancer.routingPreferences[0]",
        "Zone",
    ),
    (
        svc("vips: [/1.1.1.1]}, {name: t, namespace: ns, hostname: t, vips: [/1.1.1.1]"),
        "services[1].vips[0]",
        "duplicate service VIP",
    ),
    (
        pol("scope: Cluster, action: Allow").replace("scope: Global, ", ""),
        "policies[0].scope",
        "Global|Namespace",
    ),
    (pol("action: Audit"), "policies[0].action", "Allow|Deny"),
    ("policies: [{name: p, namespace: ns, scope: Global}]", "policies[0].action", "missing required key"),
    (pol("action: Deny, dryRun: maybe"), "policies[0].dryRun", "true or false"),
    (match("principals: [x]"), f"{M}.principals[0]", "{Exact|Prefix|Suffix"),
    (match("principals: [{Regex: x}]"), f"{M}.principals[0]", "Exact|Prefix|Suffix|Presence"),
    (match("sourceIps: [10.0.0.0/33]"), f"{M}.sourceIps[0]", "CIDR"),
    (match("ports: [80]"), f"{M}.ports", "unknown key"),
    (
        match("serviceAccounts: [{namespace: a}]"),
        f"{M}.serviceAccounts[0].serviceAccount",
        "missing required key",
    ),
    (ROUTES.replace("type: PathPrefix", "type: Regex"), f"{R}.matches[0].path.type", "PathPrefix|Exact"),
    (ROUTES.replace("value: /v2", "value: v2"), f"{R}.matches[0].path.value", "starting with /"),
    (ROUTES.replace("request: 2s", "request: 2"), f"{R}.timeouts.request", "duration"),
    (ROUTES.replace("backoff: 25ms", "backoff: soon"), f"{R}.retry.backoff", "duration"),
    (ROUTES.replace('"503"', "teapot"), f"{R}.retry.retryOn[1]", "status code"),
    (ROUTES.replace("method: GET", "method: get"), f"{R}.matches[0].method", "GET|HEAD"),
    (
        ROUTES.replace("^(yes|1)$", "(unclosed"),
        "routes[0].rules[1].matches[0].headers[0].value",
        "regular expression",
    ),
    (
        ROUTES.replace("[{name: reviews-v2", "[{name: nope"),
        f"{R}.backendRefs[0].name",
        "no service default/nope",
    ),
    (ROUTES.replace("port: 9080, weight", "weight"), f"{R}.backendRefs[0].port", "missing"),
    (ROUTES.replace("timeouts: {request: 2s}", "timeouts: {idle: 2s}"), f"{R}.timeouts.idle", "unknown key"),
    (ROUTES.replace('["reviews.default', '["a.*.default'), "routes[0].hostnames[0]", "*.<domain>"),
    (ROUTES.replace('["reviews.default', '["*reviews.default'), "routes[0].hostnames[0]", "DNS name"),
]


@pytest.mark.parametrize(("text", "path", "expected"), ERRORS)
def test_errors_name_file_key_and_expectation(text: str, path: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "/etc/mesh/state.yaml")
    message = str(info.value)
    assert message.startswith(f"/etc/mesh/state.yaml: {path}: "), message
    assert expected in message, message


def test_yaml_syntax_and_duplicate_keys_refused() -> None:
    with pytest.raises(ConfigError, match=r"^bad\.yaml: invalid YAML"):
        parse_config("workloads: [", "bad.yaml")
    with pytest.raises(ConfigError, match=r"duplicate key 'name' \(line 1\)"):
        parse_config("workloads: [{name: a, name: b, namespace: ns}]", "dup.yaml")
    # Merge keys may be overridden: that is not a duplicate.
    text = "x: &base {name: a, namespace: ns}\n"
    with pytest.raises(ConfigError, match="x: unknown key"):
        parse_config(text, "m.yaml")
    merged = "workloads:\n- &w {name: a, namespace: ns}\n- {<<: *w, name: b}\n"
    assert [w.name for w in parse_config(merged, "m.yaml").workloads] == ["a", "b"]


def test_yaml_tags_outside_the_safe_set_refused() -> None:
    with pytest.raises(ConfigError, match="invalid YAML"):
        parse_config("workloads: !!python/object/apply:os.system [echo]", "evil.yaml")


def test_load_config_file(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(REFERENCE_EXAMPLE)
    cfg = load_config(path)
    assert cfg.source == str(path)
    assert len(cfg.workloads) == 3
    path.write_text("workloads: [{name: a}]")
    with pytest.raises(ConfigError, match=f"^{path}: workloads\\[0\\].namespace: missing required key"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")


def test_config_dump_round_trips() -> None:
    for text in (REFERENCE_EXAMPLE, ROUTES):
        cfg = parse_config(text, "a.yaml")
        dumped = MeshState(cfg).to_dict()
        json.dumps(dumped)  # JSON-able
        again = parse_config(yaml.safe_dump(dumped), "b.yaml")
        assert again.workloads == cfg.workloads
        assert again.services == cfg.services
        assert again.policies == cfg.policies
        assert again.routes == cfg.routes


def test_waypoint_hostname_address() -> None:
    text = """\
services:
- {name: waypoint, namespace: ns, hostname: waypoint.ns.svc.cluster.local, ports: {15008: 15008}}
- name: s
  namespace: ns
  hostname: s.ns.svc.cluster.local
  waypoint: {destination: ns/waypoint.ns.svc.cluster.local, hboneMtlsPort: 15009}
"""
    svc = parse_config(text, "w.yaml").services[1]
    assert svc.waypoint == GatewayAddress(NamespacedHostname("ns", "waypoint.ns.svc.cluster.local"), 15009)


def test_quoted_port_keys_are_ports() -> None:
    # JSON (and some YAML writers) can only write map keys as strings.
    (service,) = parse_config(svc("ports: {'80': 8080}"), "s.yaml").services
    assert dict(service.ports) == {80: 8080}


def test_the_readme_example_loads() -> None:
    # What users copy first must be what the loader accepts.
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### The mesh config (`LOCAL_XDS_PATH`)"):]
    example = section[section.index("```yaml\n") + len("```yaml\n"):section.index("\n```", section.index("```yaml"))]
    cfg = parse_config(example, "README.md")
    assert [w.name for w in cfg.workloads] == ["ratings-v1-0", "ratings-remote"]
    assert cfg.routes and cfg.policies
