"""The next-hop decision (SPEC §3.3, §5, §6) on a small mesh state, without any I/O."""

from __future__ import annotations

import random

import pytest

from hbone.identity import Identity
from mesh.config import parse_config
from mesh.routing import HopKind, Router, RoutingError
from mesh.state import MeshState

CONFIG = """
workloads:
- {uid: c1/sleep, name: sleep, namespace: default, serviceAccount: sleep, workloadIps: ["10.0.1.10"],
   protocol: HBONE, network: net1, clusterId: c1, node: n1}
- {uid: c1/echo, name: echo-1, namespace: default, serviceAccount: echo, workloadIps: ["10.0.1.20"],
   protocol: HBONE, network: net1, clusterId: c1, services: {"default/echo.default.svc.cluster.local": {80: 8080}}}
- {uid: c1/legacy, name: legacy, namespace: default, serviceAccount: legacy, workloadIps: ["10.0.1.30"],
   protocol: TCP, network: net1}
- {uid: c1/waypoint, name: waypoint, namespace: default, serviceAccount: waypoint, workloadIps: ["10.0.1.40"],
   protocol: HBONE, network: net1, services: {"default/waypoint.default.svc.cluster.local": {15008: 15008}}}
- {uid: c1/pinned, name: pinned, namespace: default, serviceAccount: pinned, workloadIps: ["10.0.1.50"],
   protocol: HBONE, network: net1,
   waypoint: {destination: "default/waypoint.default.svc.cluster.local", hboneMtlsPort: 15008}}
- {uid: c2/gw, name: eastwest, namespace: istio-system, serviceAccount: eastwest, workloadIps: ["192.0.2.2"],
   protocol: HBONE, network: net2}
- {uid: net2/SplitHorizonWorkload/echo, name: echo-remote, namespace: default, workloadIps: [], protocol: HBONE,
   network: net2, capacity: 3, networkGateway: {destination: "net2/192.0.2.2", hboneMtlsPort: 15008},
   services: {"default/echo.default.svc.cluster.local": {80: 8080},
              "default/reviews.default.svc.cluster.local": {9080: 8080},
              "default/nosans.default.svc.cluster.local": {80: 8080}}}
services:
- {name: echo, namespace: default, hostname: echo.default.svc.cluster.local, vips: ["net1/10.96.0.1"],
   ports: {80: 8080}, subjectAltNames: ["spiffe://cluster.local/ns/default/sa/echo"]}
- {name: reviews, namespace: default, hostname: reviews.default.svc.cluster.local, vips: ["net1/10.96.0.2"],
   ports: {9080: 8080}, subjectAltNames: ["spiffe://cluster.local/ns/default/sa/reviews"],
   waypoint: {destination: "default/waypoint.default.svc.cluster.local", hboneMtlsPort: 15008}}
- {name: waypoint, namespace: default, hostname: waypoint.default.svc.cluster.local, vips: ["net1/10.96.0.3"],
   ports: {15008: 15008}, subjectAltNames: ["spiffe://cluster.local/ns/default/sa/waypoint"]}
- {name: nosans, namespace: default, hostname: nosans.default.svc.cluster.local, vips: ["net1/10.96.0.4"],
   ports: {80: 8080}}
- {name: empty, namespace: default, hostname: empty.default.svc.cluster.local, vips: ["net1/10.96.0.5"],
   ports: {80: 8080}}
"""

ECHO = Identity.parse("spiffe://cluster.local/ns/default/sa/echo")
WAYPOINT = Identity.parse("spiffe://cluster.local/ns/default/sa/waypoint")
GATEWAY = Identity.parse("spiffe://cluster.local/ns/istio-system/sa/eastwest")


@pytest.fixture
def router() -> Router:
    return Router(MeshState(parse_config(CONFIG, "test.yaml")), "net1", rng=random.Random(7))


@pytest.fixture
def sleep(router: Router):  # type: ignore[no-untyped-def]
    return router.state.workload_by_uid("c1/sleep")


def test_service_vip_spreads_local_and_remote_by_capacity(router: Router, sleep) -> None:  # type: ignore[no-untyped-def]
    hops = [router.route(sleep, "10.96.0.1", 80) for _ in range(4000)]
    local = [h for h in hops if h.kind is HopKind.HBONE]
    remote = [h for h in hops if h.kind is HopKind.DOUBLE_HBONE]
    assert 0.20 < len(local) / len(hops) < 0.30  # capacity 1 against 3
    hop = local[0]
    assert hop.address == ("10.0.1.20", 15008) and hop.authority == "10.0.1.20:8080"
    assert hop.expected == {ECHO} and hop.service is not None and hop.service.name == "echo"
    far = remote[0]
    assert far.address == ("192.0.2.2", 15008)
    assert far.authority == "echo.default.svc.cluster.local:80"  # the service port, on both CONNECTs
    assert far.expected == {GATEWAY} and far.inner_expected == {ECHO}


def test_service_with_a_waypoint_goes_to_it_with_the_original_destination(router: Router, sleep) -> None:  # type: ignore[no-untyped-def]
    hop = router.route(sleep, "10.96.0.2", 9080)
    assert hop.kind is HopKind.HBONE and hop.via_waypoint
    assert hop.address == ("10.0.1.40", 15008) and hop.authority == "10.96.0.2:9080"
    assert hop.expected == {WAYPOINT}
    # The waypoint itself routes past it, to the endpoints.
    past = router.route_service(None, hop.service, 9080, from_waypoint=True)  # type: ignore[arg-type]
    assert past.kind is HopKind.DOUBLE_HBONE and not past.via_waypoint


def test_a_waypoint_routes_to_the_endpoints_whatever_the_service_waypoint(router: Router) -> None:
    reviews = router.state.service_by_hostname("reviews.default.svc.cluster.local")
    assert reviews is not None
    # Whichever waypoint the service names (this one or another): the endpoints, never a chain.
    hop = router.route_service(None, reviews, 9080, from_waypoint=True)
    assert hop.kind is HopKind.DOUBLE_HBONE and not hop.via_waypoint
    assert hop.workload is not None and hop.workload.uid == "net2/SplitHorizonWorkload/echo"
    # ztunnel (no from_waypoint) is unchanged: to the service's waypoint.
    assert router.route_service(None, reviews, 9080).via_waypoint


def test_pod_addressed_traffic(router: Router, sleep) -> None:  # type: ignore[no-untyped-def]
    pod = router.route(sleep, "10.0.1.20", 8080)
    assert (pod.kind, pod.address, pod.authority) == (HopKind.HBONE, ("10.0.1.20", 15008), "10.0.1.20:8080")
    legacy = router.route(sleep, "10.0.1.30", 8080)
    assert (legacy.kind, legacy.address) == (HopKind.TCP, ("10.0.1.30", 8080))
    pinned = router.route(sleep, "10.0.1.50", 8080)
    assert pinned.via_waypoint and pinned.authority == "10.0.1.50:8080"
    # A waypoint sends to the pod itself, whatever waypoint the pod names.
    direct = router.route(sleep, "10.0.1.50", 8080, from_waypoint=True)
    assert (direct.kind, direct.address, direct.via_waypoint) == (HopKind.HBONE, ("10.0.1.50", 15008), False)
    outside = router.route(sleep, "203.0.113.9", 443)
    assert (outside.kind, outside.address) == (HopKind.PASSTHROUGH, ("203.0.113.9", 443))


def test_hostname_routes_like_the_vip(router: Router, sleep) -> None:  # type: ignore[no-untyped-def]
    hop = router.route_hostname(sleep, "reviews.default.svc.cluster.local", 9080)
    assert hop.via_waypoint and hop.authority == "10.96.0.2:9080"
    with pytest.raises(RoutingError, match="unknown hostname"):
        router.route_hostname(sleep, "nope.default.svc.cluster.local", 80)


def test_what_cannot_be_reached_says_why(router: Router, sleep) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RoutingError, match="no endpoint for port 80") as refused:
        router.route(sleep, "10.96.0.5", 80)
    assert refused.value.service is not None  # the service was resolved: metrics name it
    with pytest.raises(RoutingError, match="unknown hostname") as unknown:
        router.route_hostname(sleep, "nope.default.svc.cluster.local", 80)
    assert unknown.value.service is None
    # A remote endpoint cannot be verified without the service's identities.
    for _ in range(20):
        with pytest.raises(RoutingError, match="subjectAltNames"):
            router.route(sleep, "10.96.0.4", 80)


def test_passthrough_mode_dials_the_original_address() -> None:
    # ztunnel's Passthrough load-balancer mode: no endpoint is chosen, the VIP is dialled in plain TCP.
    empty = 'vips: ["net1/10.96.0.5"],\n   ports: {80: 8080}}'
    assert empty in CONFIG
    config = CONFIG.replace(empty, empty[:-1] + ", loadBalancer: {mode: Passthrough}}")
    router = Router(MeshState(parse_config(config, "test.yaml")), "net1", rng=random.Random(7))
    sleep = router.state.workload_by_uid("c1/sleep")
    by_vip = router.route(sleep, "10.96.0.5", 80)
    by_name = router.route_hostname(sleep, "empty.default.svc.cluster.local", 80)
    for hop in (by_vip, by_name):
        assert (hop.kind, hop.address, hop.service) == (HopKind.PASSTHROUGH, ("10.96.0.5", 80), None)
    # A waypoint still chooses among the endpoints (here: none).
    service = router.state.service_by_hostname("empty.default.svc.cluster.local")
    assert service is not None
    with pytest.raises(RoutingError, match="no endpoint"):
        router.route_service(sleep, service, 80, from_waypoint=True)
