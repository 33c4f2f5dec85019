"""MeshState indexes: by network-qualified address, uid, VIP, hostname; endpoints; node/proxy selection."""

from __future__ import annotations

from ipaddress import ip_address

from mesh.config import parse_config
from mesh.model import Endpoint, GatewayAddress, NamespacedHostname, NetworkAddress
from mesh.state import MeshState

CONFIG = """\
workloads:
- {uid: a1, name: a, namespace: ns1, serviceAccount: sa-a, workloadIps: [10.0.0.1], network: net1, node: n1,
   services: {ns1/svc.ns1.svc.cluster.local: {80: 8081}}, authorizationPolicies: [ns1/own]}
# Same IP as a1, other network: must not collide.
- {uid: b1, name: b, namespace: ns1, workloadIps: [10.0.0.1], network: net2, node: n2,
   services: {ns1/svc.ns1.svc.cluster.local: {}}}
- {uid: c1, name: c, namespace: ns2, serviceAccount: sa-c, workloadIps: ["fd00::3"], network: net1, node: n1,
   status: Unhealthy, services: {ns1/svc.ns1.svc.cluster.local: {443: 8443}}}
- {uid: r1, name: remote, namespace: ns1, network: net3, capacity: 4,
   networkGateway: {destination: net3/172.18.0.10},
   services: {ns1/svc.ns1.svc.cluster.local: {80: 8080}}}
- {uid: wp1, name: waypoint, namespace: ns1, serviceAccount: waypoint, workloadIps: [10.0.0.9], network: net1,
   services: {ns1/waypoint.ns1.svc.cluster.local: {15008: 15008}}}
- {uid: hn, name: hostnet, namespace: ns1, workloadIps: [10.0.0.1], network: net1, networkMode: HostNetwork}
services:
- name: svc
  namespace: ns1
  hostname: svc.ns1.svc.cluster.local
  vips: [net1/10.96.0.1, net2/10.96.0.1]
  ports: {80: 8080, 9090: 0}
  waypoint: {destination: ns1/waypoint.ns1.svc.cluster.local}
- {name: waypoint, namespace: ns1, hostname: waypoint.ns1.svc.cluster.local, ports: {15008: 15008}}
- {name: shared, namespace: ns1, hostname: shared.example.com}
- {name: shared, namespace: ns2, hostname: shared.example.com}
policies:
- {name: own, namespace: ns1, scope: WorkloadSelector, action: Allow}
- {name: ns-wide, namespace: ns1, scope: Namespace, action: Deny}
- {name: other-ns, namespace: ns2, scope: Namespace, action: Deny}
- {name: everywhere, namespace: istio-system, scope: Global, action: Deny}
- {name: unattached, namespace: ns1, scope: WorkloadSelector, action: Deny}
"""

STATE = MeshState(parse_config(CONFIG, "state.yaml"))


def uid(w: object) -> str | None:
    return getattr(w, "uid", None)


def test_workload_by_address_is_keyed_by_network() -> None:
    assert uid(STATE.workload_by_address("net1", "10.0.0.1")) == "a1"
    assert uid(STATE.workload_by_address("net2", ip_address("10.0.0.1"))) == "b1"
    assert STATE.workload_by_address("net3", "10.0.0.1") is None
    assert uid(STATE.workload_by_address("net1", "fd00::3")) == "c1"
    # A dual-stack listener reports IPv4 peers as mapped IPv6 addresses.
    assert uid(STATE.workload_by_address("net1", "::ffff:10.0.0.1")) == "a1"


def test_workload_by_uid() -> None:
    assert uid(STATE.workload_by_uid("r1")) == "r1"
    assert STATE.workload_by_uid("nope") is None


def test_service_by_vip_is_keyed_by_network() -> None:
    svc = STATE.service_by_vip("net1", "10.96.0.1")
    assert svc is not None and svc.name == "svc"
    assert STATE.service_by_vip("net2", "10.96.0.1") is svc
    assert STATE.service_by_vip("", "10.96.0.1") is None


def test_service_by_hostname_prefers_namespace() -> None:
    assert getattr(STATE.service_by_hostname("shared.example.com", "ns2"), "namespace", None) == "ns2"
    assert getattr(STATE.service_by_hostname("shared.example.com", "ns1"), "namespace", None) == "ns1"
    assert getattr(STATE.service_by_hostname("shared.example.com", "ns9"), "namespace", None) == "ns1"
    assert getattr(STATE.service_by_hostname("shared.example.com"), "namespace", None) == "ns1"
    assert STATE.service_by_hostname("nope.example.com") is None
    assert STATE.service_by_key("ns2/shared.example.com") is not None


def test_endpoints_use_own_mapping_then_service_ports() -> None:
    svc = STATE.service_by_key("ns1/svc.ns1.svc.cluster.local")
    assert svc is not None
    by_uid = {ep.workload.uid: ep.port for ep in STATE.endpoints(svc, 80)}
    # a1 maps 80 itself; b1 and c1 fall back to the service's 80→8080; r1 has its own mapping.
    assert by_uid == {"a1": 8081, "b1": 8080, "c1": 8080, "r1": 8080}
    assert [(ep.workload.uid, ep.port) for ep in STATE.endpoints(svc, 443)] == [("c1", 8443)]
    assert STATE.endpoints(svc, 9090) == ()  # target port 0: nothing to connect to
    assert STATE.endpoints(svc, 1234) == ()
    assert [w.uid for w in STATE.endpoint_workloads(svc)] == ["a1", "b1", "c1", "r1"]
    assert all(isinstance(ep, Endpoint) for ep in STATE.endpoints(svc, 80))


def test_local_workloads() -> None:
    assert [w.uid for w in STATE.workloads_on_node("n1")] == ["a1", "c1"]
    assert STATE.workloads_on_node("n9") == ()
    assert [w.uid for w in STATE.workloads_for_proxy("ns1", "a", "sa-a")] == ["a1"]
    assert STATE.workloads_for_proxy("ns1", "a", "default") == ()
    a = STATE.workload_by_uid("a1")
    assert a is not None
    assert STATE.workloads_with_identity(a.identity) == (a,)


def test_policies_for() -> None:
    a = STATE.workload_by_uid("a1")
    c = STATE.workload_by_uid("c1")
    assert a is not None and c is not None
    assert sorted(p.key for p in STATE.policies_for(a)) == [
        "istio-system/everywhere",
        "ns1/ns-wide",
        "ns1/own",
    ]
    assert sorted(p.key for p in STATE.policies_for(c)) == ["istio-system/everywhere", "ns2/other-ns"]
    assert STATE.policies_for(a) is STATE.policies_for(a)  # cached


def test_resolve_gateway() -> None:
    svc = STATE.service_by_key("ns1/svc.ns1.svc.cluster.local")
    assert svc is not None and svc.waypoint is not None
    assert uid(STATE.resolve_gateway(svc.waypoint)) == "wp1"
    by_ip = GatewayAddress(NetworkAddress("net1", ip_address("10.0.0.9")))
    assert uid(STATE.resolve_gateway(by_ip)) == "wp1"
    # The same IP in a network we know nothing of resolves to nothing.
    assert STATE.resolve_gateway(GatewayAddress(NetworkAddress("net3", ip_address("10.0.0.9")))) is None
    assert STATE.gateway_workloads(GatewayAddress(NamespacedHostname("ns1", "nope"))) == ()


def test_empty_state() -> None:
    empty = MeshState()
    assert empty.workload_by_address("", "127.0.0.1") is None
    assert empty.to_dict() == {"workloads": [], "services": [], "policies": [], "routes": []}


def test_to_dict_shape() -> None:
    dumped = STATE.to_dict()
    a = dumped["workloads"][0]
    assert a["workloadIps"] == ["10.0.0.1"]
    assert a["services"] == {"ns1/svc.ns1.svc.cluster.local": {"80": 8081}}
    assert dumped["workloads"][3]["networkGateway"] == {
        "destination": "net3/172.18.0.10",
        "hboneMtlsPort": 15008,
    }
    assert dumped["services"][0]["vips"] == ["net1/10.96.0.1", "net2/10.96.0.1"]
