"""Endpoint choice: health, split-horizon usability, routing preferences, capacity, gateway pickers."""

from __future__ import annotations

import random
from collections import Counter
from ipaddress import ip_address

import pytest

from mesh.loadbalance import LeastConnections, choose_endpoint, eligible
from mesh.model import (
    Endpoint,
    GatewayAddress,
    HealthPolicy,
    HealthStatus,
    LoadBalancer,
    LoadBalancerMode,
    LoadBalancerScope,
    Locality,
    NetworkAddress,
    Workload,
)

GW = GatewayAddress(NetworkAddress("net2", ip_address("172.18.0.10")))


def wl(
    name: str,
    *,
    ip: str | None = "10.0.0.1",
    network: str = "net1",
    region: str = "r1",
    zone: str = "z1",
    subzone: str = "s1",
    node: str = "n1",
    cluster: str = "c1",
    capacity: int = 1,
    healthy: bool = True,
    gateway: GatewayAddress | None = None,
) -> Workload:
    return Workload(
        uid=name,
        name=name,
        namespace="default",
        workload_ips=(ip_address(ip),) if ip else (),
        network=network,
        cluster_id=cluster,
        locality=Locality(region, zone, subzone),
        node=node,
        capacity=capacity,
        status=HealthStatus.HEALTHY if healthy else HealthStatus.UNHEALTHY,
        network_gateway=gateway,
    )


def ep(w: Workload, port: int = 8080) -> Endpoint:
    return Endpoint(w, port)


SOURCE = wl("source")


def names(endpoints: list[Endpoint]) -> list[str]:
    return [e.workload.name for e in endpoints]


def test_unhealthy_filtered_unless_allow_all() -> None:
    eps = [ep(wl("up")), ep(wl("down", healthy=False))]
    assert names(eligible(eps, source=SOURCE)) == ["up"]
    allow_all = LoadBalancer(health_policy=HealthPolicy.ALLOW_ALL)
    assert names(eligible(eps, source=SOURCE, load_balancer=allow_all)) == ["up", "down"]
    assert choose_endpoint([ep(wl("down", healthy=False))], source=SOURCE) is None
    assert choose_endpoint([], source=SOURCE) is None


def test_addressless_workloads_need_another_network_and_a_gateway() -> None:
    remote = ep(wl("remote", ip=None, network="net2", gateway=GW))
    no_gateway = ep(wl("nogw", ip=None, network="net2"))
    same_network = ep(wl("samenet", ip=None, network="net1", gateway=GW))
    eps = [remote, no_gateway, same_network]
    assert names(eligible(eps, source=SOURCE)) == ["remote"]
    # Without a source workload, the chooser's own network decides (the gateway's case).
    assert names(eligible(eps, network="net2")) == ["samenet"]


def test_capacity_weights() -> None:
    rng = random.Random(1234)
    eps = [ep(wl("one", capacity=1)), ep(wl("three", ip=None, network="net2", capacity=3, gateway=GW))]
    picks = [choose_endpoint(eps, source=SOURCE, rng=rng) for _ in range(4000)]
    counts = Counter(p.workload.name for p in picks if p is not None)
    # Expect 1000 : 3000; a binomial s.d. is ~27, so ±150 is far outside chance yet catches a wrong weight.
    assert abs(counts["one"] - 1000) < 150, counts
    assert abs(counts["three"] - 3000) < 150, counts


def test_zero_capacity_everywhere_gives_nothing() -> None:
    assert choose_endpoint([ep(wl("z", capacity=0))], source=SOURCE) is None


def test_seeded_choice_is_deterministic() -> None:
    eps = [ep(wl(f"w{i}")) for i in range(10)]
    first = [choose_endpoint(eps, source=SOURCE, rng=random.Random(7)) for _ in range(3)]
    assert first[0] == first[1] == first[2]


NEAR = [
    ep(wl("same-zone")),
    ep(wl("same-region", zone="z2")),
    ep(wl("far", region="r2", zone="z9")),
    ep(wl("same-node-other-region", region="r9", node="n1")),
]


@pytest.mark.parametrize(
    ("prefs", "mode", "expected"),
    [
        ((), LoadBalancerMode.STANDARD, ["same-zone", "same-region", "far", "same-node-other-region"]),
        (("Region", "Zone"), LoadBalancerMode.STANDARD, ["same-zone"]),
        (("Region",), LoadBalancerMode.STANDARD, ["same-zone", "same-region"]),
        (("Node",), LoadBalancerMode.STANDARD, ["same-zone", "same-region", "far", "same-node-other-region"]),
        (("Region", "Zone"), LoadBalancerMode.FAILOVER, ["same-zone"]),
        (("Region", "Zone"), LoadBalancerMode.STRICT, ["same-zone"]),
    ],
)
def test_routing_preferences(prefs: tuple[str, ...], mode: LoadBalancerMode, expected: list[str]) -> None:
    lb = LoadBalancer(tuple(LoadBalancerScope(p) for p in prefs), mode)
    assert names(eligible(NEAR, source=SOURCE, load_balancer=lb)) == expected


def test_standard_falls_back_to_next_tier_strict_does_not() -> None:
    far_only = [ep(wl("same-region", zone="z2")), ep(wl("far", region="r2"))]
    zone_pref = (LoadBalancerScope.REGION, LoadBalancerScope.ZONE)
    standard = LoadBalancer(zone_pref, LoadBalancerMode.STANDARD)
    strict = LoadBalancer(zone_pref, LoadBalancerMode.STRICT)
    assert names(eligible(far_only, source=SOURCE, load_balancer=standard)) == ["same-region"]
    assert eligible(far_only, source=SOURCE, load_balancer=strict) == []
    # Unhealthy endpoints do not count as the best tier.
    sick_near = [ep(wl("near", healthy=False)), ep(wl("far", region="r2"))]
    assert names(eligible(sick_near, source=SOURCE, load_balancer=standard)) == ["far"]


def test_network_and_cluster_preferences() -> None:
    eps = [
        ep(wl("local")),
        ep(wl("other-cluster", cluster="c2")),
        ep(wl("remote", ip=None, network="net2", cluster="c2", gateway=GW)),
    ]
    net_first = LoadBalancer((LoadBalancerScope.NETWORK,))
    assert names(eligible(eps, source=SOURCE, load_balancer=net_first)) == ["local", "other-cluster"]
    cluster = LoadBalancer((LoadBalancerScope.CLUSTER,))
    assert names(eligible(eps, source=SOURCE, load_balancer=cluster)) == ["local"]
    # Only remote endpoints left: Standard still reaches them.
    assert names(eligible(eps[2:], source=SOURCE, load_balancer=net_first)) == ["remote"]


def test_least_connections() -> None:
    lc: LeastConnections[str] = LeastConnections()
    items = ["a", "b", "c"]
    assert lc.pick([]) is None
    # With no load, ties rotate so new connections spread.
    assert sorted(lc.acquire(items) or "" for _ in range(3)) == ["a", "b", "c"]
    lc.dec("b")
    assert lc.pick(items) == "b"
    lc.inc("b")
    lc.inc("b")
    assert lc.active("b") == 2
    assert lc.pick(items) in {"a", "c"}
    with lc.track("a"):
        assert lc.active("a") == 2
        assert lc.pick(items) == "c"
    assert lc.active("a") == 1
    for item in items:
        while lc.active(item):
            lc.dec(item)
    lc.dec("a")  # extra closes never go negative
    assert lc.active("a") == 0


def test_least_connections_spreads_long_lived_streams() -> None:
    lc: LeastConnections[Endpoint] = LeastConnections()
    eps = [ep(wl(f"w{i}")) for i in range(4)]
    for _ in range(40):
        lc.acquire(eps)
    assert [lc.active(e) for e in eps] == [10, 10, 10, 10]
