"""The waypoint's per-request decisions without processes: which route and backend a request gets, which
endpoint serves it, which headers are forwarded, and when a body can be replayed for a retry."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from hbone.authority import parse_authority
from mesh.config import parse_config
from mesh.routing import Router
from mesh.settings import WorkloadInfo
from mesh.state import MeshState
from waypoint_py.body import RetainedBody
from waypoint_py.destination import UnknownDestination, resolve
from waypoint_py.endpoints import EndpointChooser
from waypoint_py.http_types import RequestHead, end_to_end
from waypoint_py.routes import NoRoute, RouteTarget, decide
from waypoint_py.view import build_view

CONFIG = """\
workloads:
- {uid: w1, name: waypoint, namespace: default, serviceAccount: waypoint, workloadIps: ["10.0.0.2"],
   network: net1, clusterId: c1, workloadName: waypoint, canonicalName: waypoint, canonicalRevision: v1}
- {uid: r1, name: reviews-1, namespace: default, serviceAccount: reviews, workloadIps: ["10.0.0.11"],
   network: net1, services: {"default/reviews.default.svc.cluster.local": {9080: 9080}}}
services:
- {name: reviews, namespace: default, hostname: reviews.default.svc.cluster.local, vips: ["net1/10.1.0.1"],
   ports: {9080: 9080}}
- {name: reviews-v2, namespace: default, hostname: reviews-v2.default.svc.cluster.local, ports: {9080: 9080}}
- {name: ratings, namespace: default, hostname: ratings.default.svc.cluster.local, vips: ["net1/10.1.0.2"],
   ports: {9080: 9080}}
routes:
- name: reviews
  namespace: default
  hostnames: ["reviews.default.svc.cluster.local"]
  rules:
  - matches: [{path: {type: PathPrefix, value: /v2}, method: GET}]
    backendRefs: [{name: reviews-v2, port: 9080}]
  - matches: [{headers: [{name: x-canary, value: "^(yes|1)$", type: RegularExpression}]}]
    backendRefs: [{name: reviews, port: 9080, weight: 3}, {name: reviews-v2, port: 9080, weight: 1}]
  - matches: [{path: {type: Exact, value: /}}]
    backendRefs: [{name: reviews, port: 9080}]
"""


@pytest.fixture(scope="module")
def view():  # type: ignore[no-untyped-def]
    state = MeshState(parse_config(CONFIG, "test.yaml"))
    return build_view(state, WorkloadInfo("default", "waypoint", "waypoint"), "net1", "c1")


def head(path: str = "/", method: str = "GET", host: str = "reviews:9080", **headers: str) -> RequestHead:
    hdrs = [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return RequestHead(method, path, host, hdrs, has_body=False)


def test_own_workload_and_baggage(view) -> None:  # type: ignore[no-untyped-def]
    assert view.workload.uid == "w1"
    assert view.baggage == ("k8s.cluster.name=c1,k8s.namespace.name=default,k8s.deployment.name=waypoint,"
                            "service.name=waypoint,service.version=v1")  # fmt: skip


def test_original_destination_by_vip_pod_ip_and_hostname(view) -> None:  # type: ignore[no-untyped-def]
    by_vip = resolve(view.state, "net1", parse_authority("10.1.0.1:9080"))
    assert by_vip.service is not None and by_vip.service.name == "reviews" and by_vip.workload is None
    by_pod = resolve(view.state, "net1", parse_authority("10.0.0.11:9080"))
    assert by_pod.workload is not None and by_pod.workload.uid == "r1"
    assert by_pod.service is not None and by_pod.service.name == "reviews"
    by_name = resolve(view.state, "net1", parse_authority("reviews.default.svc.cluster.local:9080"))
    assert by_name.service is not None and by_name.service.name == "reviews"
    for unknown in ("10.9.9.9:80", "10.1.0.1:80", "nope.default.svc.cluster.local:80"):
        with pytest.raises(UnknownDestination):
            resolve(view.state, "net1", parse_authority(unknown))
    with pytest.raises(UnknownDestination):
        resolve(view.state, "net2", parse_authority("10.1.0.1:9080"))  # VIPs belong to a network


def test_rules_in_order(view) -> None:  # type: ignore[no-untyped-def]
    original = resolve(view.state, "net1", parse_authority("10.1.0.1:9080"))
    assert decide(view, original, head("/v2/x")).service.name == "reviews-v2"
    assert decide(view, original, head("/")).service.name == "reviews"
    with pytest.raises(NoRoute) as info:
        decide(view, original, head("/v2/x", method="POST"))  # the method does not match, nor does the rest
    assert info.value.status == 404
    # Another service the route does not claim goes to its original destination.
    ratings = resolve(view.state, "net1", parse_authority("10.1.0.2:9080"))
    target = decide(view, ratings, head("/anything", host="ratings"))
    assert (target.service.name, target.port, target.rule) == ("ratings", 9080, None)


def test_weighted_backends_and_regex_header(view) -> None:  # type: ignore[no-untyped-def]
    original = resolve(view.state, "net1", parse_authority("10.1.0.1:9080"))
    rng = random.Random(5)
    picks = Counter(decide(view, original, head("/c", x_canary="yes"), rng).service.name for _ in range(4000))
    assert 2800 <= picks["reviews"] <= 3200, picks
    with pytest.raises(NoRoute):
        decide(view, original, head("/c", x_canary="yess"))


def test_connection_headers_are_not_forwarded() -> None:
    headers = [(b"connection", b"keep-alive, x-hop"), (b"x-hop", b"1"), (b"keep-alive", b"timeout=5"),
               (b"te", b"trailers"), (b"transfer-encoding", b"chunked"), (b"host", b"a"), (b":path", b"/"),
               (b"x-end", b"2"), (b"content-length", b"3")]  # fmt: skip
    assert end_to_end(headers) == [(b"x-end", b"2"), (b"content-length", b"3")]
    assert end_to_end(headers, keep_te_trailers=True) == [(b"te", b"trailers"), (b"x-end", b"2"),
                                                          (b"content-length", b"3")]  # fmt: skip


class _Source:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = list(chunks)
        self.request_trailers = None

    async def read_body(self) -> bytes | None:
        return self.chunks.pop(0) if self.chunks else None


async def test_small_body_replays_and_big_body_does_not() -> None:
    small = RetainedBody(_Source([b"ab", b"cd"]), keep_limit=10)  # type: ignore[arg-type]
    first = small.cursor()
    assert await first.next() == b"ab"
    assert small.replayable
    again = small.cursor()
    assert [await again.next(), await again.next(), await again.next()] == [b"ab", b"cd", None]
    assert small.consumed == 4
    big = RetainedBody(_Source([b"x" * 8, b"y" * 8]), keep_limit=10)  # type: ignore[arg-type]
    cursor = big.cursor()
    await cursor.next()
    assert big.replayable
    await cursor.next()
    assert not big.replayable


ENDPOINTS_CONFIG = """\
workloads:
- {uid: w1, name: waypoint, namespace: default, serviceAccount: waypoint, workloadIps: ["10.0.0.2"], network: n1}
- {uid: a, name: a, namespace: default, serviceAccount: s, workloadIps: ["10.0.0.11"], network: n1, protocol: HBONE,
   services: {"default/s.default.svc.cluster.local": {80: 8080}}}
- {uid: b, name: b, namespace: default, serviceAccount: s, workloadIps: ["10.0.0.12"], network: n1, protocol: HBONE,
   capacity: 3, services: {"default/s.default.svc.cluster.local": {80: 8080}}}
- {uid: c, name: c, namespace: default, serviceAccount: s, workloadIps: ["10.0.0.13"], network: n1, protocol: HBONE,
   status: Unhealthy, services: {"default/s.default.svc.cluster.local": {80: 8080}}}
services:
- {name: s, namespace: default, hostname: s.default.svc.cluster.local, vips: ["n1/10.1.0.1"], ports: {80: 8080}}
"""


def test_endpoint_choice_matches_the_router() -> None:
    state = MeshState(parse_config(ENDPOINTS_CONFIG, "test.yaml"))
    view = build_view(state, WorkloadInfo("default", "waypoint", "waypoint"), "n1", "")
    service = state.service_by_hostname("s.default.svc.cluster.local")
    assert service is not None
    target = RouteTarget(service, 80)
    chooser = EndpointChooser("n1", random.Random(1))
    router = Router(state, "n1", random.Random(1))
    ours = Counter(chooser.pick(view, target).address for _ in range(4000))
    draws = (router.route_service(view.workload, service, 80, from_waypoint=True) for _ in range(4000))
    theirs = Counter(hop.address for hop in draws)
    assert ours == theirs  # the same draws from the same seed: the same choices
    assert set(ours) == {("10.0.0.11", 15008), ("10.0.0.12", 15008)}
    assert 0.2 < ours[("10.0.0.11", 15008)] / 4000 < 0.3  # capacity 1 against 3
    hop = chooser.pick(view, target)
    assert hop == router.to_endpoint(hop.workload, 8080, service, 80)  # type: ignore[arg-type]


CHAIN_CONFIG = """\
workloads:
- {uid: w1, name: waypoint, namespace: default, serviceAccount: waypoint, workloadIps: ["10.0.0.2"], protocol: HBONE,
   network: n1, services: {"default/waypoint.default.svc.cluster.local": {15008: 15008}}}
- {uid: w2, name: other-wp, namespace: default, serviceAccount: other-wp, workloadIps: ["10.0.0.3"], protocol: HBONE,
   network: n1, services: {"default/other-wp.default.svc.cluster.local": {15008: 15008}}}
- {uid: a1, name: a-1, namespace: default, serviceAccount: a, workloadIps: ["10.0.0.11"], protocol: HBONE,
   network: n1, services: {"default/a.default.svc.cluster.local": {80: 8080}}}
- {uid: b1, name: b-1, namespace: default, serviceAccount: b, workloadIps: ["10.0.0.12"], protocol: HBONE,
   network: n1, services: {"default/b.default.svc.cluster.local": {80: 8081}}}
- {uid: c1, name: c-1, namespace: default, serviceAccount: c, workloadIps: ["10.0.0.13"], protocol: HBONE,
   network: n1, services: {"default/c.default.svc.cluster.local": {80: 8082}}}
services:
- {name: waypoint, namespace: default, hostname: waypoint.default.svc.cluster.local, vips: ["n1/10.1.0.9"],
   ports: {15008: 15008}}
- {name: other-wp, namespace: default, hostname: other-wp.default.svc.cluster.local, vips: ["n1/10.1.0.8"],
   ports: {15008: 15008}}
- {name: a, namespace: default, hostname: a.default.svc.cluster.local, vips: ["n1/10.1.0.1"], ports: {80: 8080},
   waypoint: {destination: "default/waypoint.default.svc.cluster.local", hboneMtlsPort: 15008}}
- {name: b, namespace: default, hostname: b.default.svc.cluster.local, vips: ["n1/10.1.0.2"], ports: {80: 8081},
   waypoint: {destination: "default/other-wp.default.svc.cluster.local", hboneMtlsPort: 15008}}
- {name: c, namespace: default, hostname: c.default.svc.cluster.local, vips: ["n1/10.1.0.3"], ports: {80: 8082},
   waypoint: {destination: "default/other-wp.default.svc.cluster.local", hboneMtlsPort: 15008}}
routes:
- name: a
  namespace: default
  hostnames: ["a.default.svc.cluster.local"]
  rules:
  - backendRefs: [{name: b, port: 80}]
"""


def test_a_service_behind_another_waypoint_is_reached_at_its_endpoints() -> None:
    """SPEC §6: the waypoint load-balances over the chosen service's endpoints, never hands the request on to
    that service's own waypoint (neither for a route backend nor for the original destination)."""
    state = MeshState(parse_config(CHAIN_CONFIG, "test.yaml"))
    view = build_view(state, WorkloadInfo("default", "waypoint", "waypoint"), "n1", "")
    chooser = EndpointChooser("n1", random.Random(1))
    backend = decide(view, resolve(state, "n1", parse_authority("10.1.0.1:80")), head(host="a"))
    original = decide(view, resolve(state, "n1", parse_authority("10.1.0.3:80")), head(host="c"))
    for target, (ip, port) in ((backend, ("10.0.0.12", 8081)), (original, ("10.0.0.13", 8082))):
        hop = chooser.pick(view, target)
        assert (hop.address, hop.authority, hop.via_waypoint) == ((ip, 15008), f"{ip}:{port}", False)
        assert hop.workload is not None and hop.workload.name != "other-wp"
