"""The topology loader and config generator: examples load, views are right, broken files name the problem."""

from __future__ import annotations

import random
from collections import Counter
from ipaddress import IPv4Address
from pathlib import Path

import pytest
import yaml

from mesh.config import parse_config
from mesh.routing import HopKind, Router
from mesh.state import MeshState
from topology.addressing import plan_addresses
from topology.generate import generate_configs, main, render, write_configs
from topology.loader import load_topology, parse_topology
from topology.spec import TopologyError

EXAMPLES = Path(__file__).resolve().parent.parent / "topology" / "examples"
TWO = EXAMPLES / "two-networks.yaml"
ONE = EXAMPLES / "single-network.yaml"


def states(path: Path, mode: str = "netns") -> dict[str, MeshState]:
    topology = load_topology(path)
    plan = plan_addresses(topology, mode)  # type: ignore[arg-type]
    return {
        cid: MeshState(parse_config(render(cfg), f"{cid}.yaml"))
        for cid, cfg in generate_configs(topology, plan).items()
    }


def workloads_named(state: MeshState, prefix: str) -> list:
    return [w for w in state.workloads if w.name.startswith(prefix)]


@pytest.mark.parametrize("path", [TWO, ONE], ids=["two-networks", "single-network"])
@pytest.mark.parametrize("mode", ["netns", "loopback"])
def test_examples_generate_configs_the_daemons_load(path: Path, mode: str, tmp_path: Path) -> None:
    topology = load_topology(path)
    plan = plan_addresses(topology, mode)  # type: ignore[arg-type]
    paths = write_configs(topology, plan, tmp_path)
    assert sorted(paths) == ["cluster1", "cluster2"]
    for path_ in paths.values():
        text = path_.read_text()
        assert text.startswith("# Mesh state of")
        parse_config(text, str(path_))
    if mode == "loopback":
        for pod in plan.pods:
            assert pod.ip.is_loopback
        assert all(d.ip.is_loopback and d.mgmt_ip == d.ip for d in plan.daemons)


def test_example_is_human_sized() -> None:
    lines = [line for line in TWO.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(lines) <= 60


def test_two_networks_split_horizon_capacity_counts_remote_endpoints() -> None:
    views = states(TWO)
    one, two = views["cluster1"], views["cluster2"]
    echo1 = one.service_by_hostname("echo.default.svc.cluster.local")
    assert echo1 is not None
    endpoints = one.endpoint_workloads(echo1)
    local = [w for w in endpoints if w.network == "network1"]
    remote = [w for w in endpoints if w.network == "network2"]
    assert [w.name for w in local] == ["echo-v1-0"]
    assert len(remote) == 1  # one split-horizon workload per (service, network)
    (sh,) = remote
    assert sh.capacity == 3 and sh.workload_ips == ()
    assert sh.network_gateway is not None and str(sh.network_gateway.destination) == "network2/198.18.0.2"
    assert sh.network_gateway.hbone_mtls_port == 15008

    echo2 = two.service_by_hostname("echo.default.svc.cluster.local")
    assert echo2 is not None
    remote2 = [w for w in two.endpoint_workloads(echo2) if w.network == "network1"]
    assert [w.capacity for w in remote2] == [1]
    assert len([w for w in two.endpoint_workloads(echo2) if w.network == "network2"]) == 3

    ratings = one.service_by_hostname("ratings.default.svc.cluster.local")
    assert ratings is not None
    assert [(w.network, w.capacity) for w in one.endpoint_workloads(ratings)] == [("network2", 1)]


def test_two_networks_views_hold_only_own_network_pods_and_overlap() -> None:
    views = states(TWO)
    for cid, network in (("cluster1", "network1"), ("cluster2", "network2")):
        state = views[cid]
        pods = [w for w in state.workloads if w.workload_ips and w.namespace == "default"]
        assert pods and all(w.network == network and w.cluster_id == cid for w in pods)
    ips1 = {ip for w in views["cluster1"].workloads if w.network == "network1" for ip in w.workload_ips}
    ips2 = {ip for w in views["cluster2"].workloads if w.network == "network2" for ip in w.workload_ips}
    assert IPv4Address("10.244.1.3") in ips1 & ips2  # the same pod IP exists in both networks
    # Both gateways are in every view, with their transit address and identity.
    for state in views.values():
        gateways = {w.network: w for w in state.workloads if w.name == "eastwest-0"}
        assert {n: [str(ip) for ip in w.workload_ips] for n, w in gateways.items()} == {
            "network1": ["198.18.0.1"],
            "network2": ["198.18.0.2"],
        }
        assert str(gateways["network2"].identity) == "spiffe://cluster.local/ns/istio-system/sa/eastwest"


def test_services_carry_vips_sans_and_waypoints() -> None:
    one = states(TWO)["cluster1"]
    echo = one.service_by_hostname("echo.default.svc.cluster.local")
    reviews = one.service_by_hostname("reviews.default.svc.cluster.local")
    waypoint = one.service_by_hostname("waypoint.default.svc.cluster.local")
    assert echo is not None and reviews is not None and waypoint is not None
    assert [str(v) for v in echo.vips] == ["network1/10.96.0.10", "network2/10.96.0.10"]
    assert [str(s) for s in echo.subject_alt_names] == ["spiffe://cluster.local/ns/default/sa/echo"]
    assert reviews.waypoint is not None and str(reviews.waypoint.destination) == (
        "default/waypoint.default.svc.cluster.local"
    )
    assert dict(waypoint.ports) == {15008: 15008}
    # The waypoint service's endpoint is cluster1's own waypoint, reached directly.
    (wp,) = one.endpoint_workloads(waypoint)
    assert (wp.cluster_id, wp.network, wp.node) == ("cluster1", "network1", "")
    assert wp.workload_ips


def test_generated_state_routes_like_the_topology_says() -> None:
    one = states(TWO)["cluster1"]
    sleep = next(w for w in one.workloads if w.name == "sleep-0")
    router = Router(one, "network1", rng=random.Random(7))

    ratings = router.route_hostname(sleep, "ratings.default.svc.cluster.local", 9080)
    assert ratings.kind is HopKind.DOUBLE_HBONE
    assert ratings.address == ("198.18.0.2", 15008)
    assert ratings.authority == "ratings.default.svc.cluster.local:9080"
    assert {str(i) for i in ratings.inner_expected} == {"spiffe://cluster.local/ns/default/sa/ratings"}

    reviews = router.route_hostname(sleep, "reviews.default.svc.cluster.local", 9080)
    assert reviews.kind is HopKind.HBONE and reviews.via_waypoint
    assert reviews.address == ("10.244.1.2", 15008)

    # Capacity weighting: 1 local endpoint, 3 behind the gateway.
    kinds = Counter(router.route_hostname(sleep, "echo.default.svc.cluster.local", 80).kind for _ in range(800))
    assert 0.65 < kinds[HopKind.DOUBLE_HBONE] / 800 < 0.85


def test_single_network_views_are_direct() -> None:
    views = states(ONE)
    for state in views.values():
        assert not [w for w in state.workloads if w.network_gateway is not None]
        echo = state.service_by_hostname("echo.default.svc.cluster.local")
        assert echo is not None
        assert sorted(w.cluster_id for w in state.endpoint_workloads(echo)) == ["cluster1", "cluster2", "cluster2"]
    two = views["cluster2"]
    sleep_ip = next(w for w in two.workloads if w.name == "sleep-0").workload_ips[0]
    echo2_ips = {w.workload_ips[0] for w in two.workloads if w.workload_name == "echo-v2"}
    assert str(sleep_ip).startswith("10.244.1.") and all(str(ip).startswith("10.244.2.") for ip in echo2_ips)
    # cluster2 has no waypoint of its own: it uses cluster1's, on the same network, directly.
    waypoint = two.service_by_hostname("waypoint.default.svc.cluster.local")
    assert waypoint is not None
    assert [w.cluster_id for w in two.endpoint_workloads(waypoint)] == ["cluster1"]


def test_remote_waypoint_is_reached_through_its_gateway() -> None:
    text = TWO.read_text().replace("  waypoints: [waypoint]\n  gateway: {name: eastwest, address: 198.18.0.2}",
                                   "  gateway: {name: eastwest, address: 198.18.0.2}")  # fmt: skip
    topology = parse_topology(text, "remote-waypoint.yaml")
    two = MeshState(parse_config(render(generate_configs(topology)["cluster2"]), "cluster2.yaml"))
    waypoint = two.service_by_hostname("waypoint.default.svc.cluster.local")
    assert waypoint is not None
    (sh,) = two.endpoint_workloads(waypoint)
    assert sh.network == "network1" and sh.capacity == 1 and sh.network_gateway is not None


def test_cli_writes_one_file_per_cluster(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(TWO), str(tmp_path), "--mode", "loopback"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cluster1.yaml", "cluster2.yaml"]
    broken = tmp_path / "broken.yaml"
    broken.write_text("clusters: []\n")
    assert main([str(broken), str(tmp_path / "out")]) == 1
    assert "broken.yaml: clusters: at least one cluster is needed" in capsys.readouterr().err


# --- broken topologies ----------------------------------------------------------------------------------

BASE = {
    "clusters": [
        {"id": "cluster1", "network": "network1", "nodes": ["node1"], "waypoints": ["waypoint"],
         "gateway": {"name": "eastwest"}},
        {"id": "cluster2", "network": "network2", "nodes": ["node2"], "gateway": "eastwest"},
    ],
    "apps": [
        {"name": "sleep", "cluster": "cluster1"},
        {"name": "echo-v1", "cluster": "cluster1"},
        {"name": "echo-v2", "cluster": "cluster2", "version": "v2", "replicas": 2},
    ],
    "services": [{"name": "echo", "ports": {80: 8080}}, {"name": "other", "selector": "echo", "ports": {81: 9000}}],
}  # fmt: skip


def broken(edit: str, value: object) -> str:
    """BASE with one key (a dotted path, list indexes as numbers) set to `value` (None deletes it)."""
    doc = yaml.safe_load(yaml.safe_dump(BASE))
    *parents, last = edit.split(".")
    node = doc
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    key = int(last) if last.isdigit() else last
    if value is None:
        del node[key]
    else:
        node[key] = value
    return yaml.safe_dump(doc)


def test_base_of_the_broken_cases_is_fine() -> None:
    topology = parse_topology(yaml.safe_dump(BASE), "t.yaml")
    assert [n.gateway.name for n in topology.networks if n.gateway] == ["eastwest", "eastwest"]


@pytest.mark.parametrize(
    ("edit", "value", "message"),
    [
        ("services.1.waypoint", "foo", "t.yaml: services[1].waypoint: no waypoint 'foo' in namespace default"),
        ("services.0.selector", "nope", "t.yaml: services[0].selector: no app in namespace default has app label"),
        ("services.0.ports", {80: 8081},
         "t.yaml: services[0].ports.80: target port 8081 is not served by app 'echo-v1'"),
        ("services.0.colour", "blue", "t.yaml: services[0].colour: unknown key; expected one of: name, namespace"),
        ("clusters.1.id", "cluster1", "t.yaml: clusters[1].id: duplicate cluster 'cluster1' (first at clusters[0])"),
        ("clusters.1.network", "Network 2", "t.yaml: clusters[1].network: expected a lower-case DNS label"),
        ("clusters.0.gateway", {"name": "eastwest", "address": "10.0.0.1"},
         "t.yaml: clusters[0].gateway.address: 10.0.0.1 is not a host address of transitCidr 198.18.0.0/24"),
        ("apps.1.node", "node9", "t.yaml: apps[1].node: no node 'node9' in cluster1 (nodes: node1)"),
        ("apps.1.cluster", "cluster3", "t.yaml: apps[1].cluster: no cluster 'cluster3' (clusters: cluster1, cluster2)"),
        ("apps.1.ips", ["10.244.1.1"], "t.yaml: apps[1].ips[0]: 10.244.1.1 is already used on network1 by node "
                                       "cluster1/node1"),
        ("apps.2.ips", ["10.244.9.9"], "t.yaml: apps[2].ips: 1 addresses for 2 replicas"),
        ("apps.1.ips", ["10.245.0.9"], "t.yaml: apps[1].ips[0]: 10.245.0.9 is not a host address of network1's pod"),
        ("apps.1.httpPort", 15008, "t.yaml: apps[1]: ports [15000, 15001, 15006, 15008, 15020, 15021, 15080] belong"),
        ("apps.1.replicas", 0, "t.yaml: apps[1].replicas: expected an integer from 1 to 100, got 0"),
        ("clusters.1.gateway", None, "t.yaml: services[0]: endpoints of 'echo' are on network2, which has no gateway"),
        ("transitCidr", "198.0.0.0/8", "t.yaml: transitCidr: expected a prefix length from /16 to /29"),
        ("networks", {"network9": {}}, "t.yaml: networks.network9: unknown key; expected one of: network1, network2"),
        ("services.1.name", "waypoint", "t.yaml: services[1].name: default/waypoint is already the service of a "
                                        "waypoint"),
        ("clusters", [], "t.yaml: clusters: at least one cluster is needed"),
    ],
)  # fmt: skip
def test_broken_topology_names_file_path_and_problem(edit: str, value: object, message: str) -> None:
    with pytest.raises(TopologyError) as info:
        parse_topology(broken(edit, value), "t.yaml")
    assert message in str(info.value)


def test_two_gateways_on_one_network_are_refused() -> None:
    text = broken("clusters.1.network", "network1")
    with pytest.raises(TopologyError, match=r"clusters\[1\].gateway: network1 already has gateway 'eastwest'"):
        parse_topology(text, "t.yaml")


def test_duplicate_yaml_keys_and_bad_yaml_are_refused() -> None:
    with pytest.raises(TopologyError, match=r"t\.yaml: invalid YAML: .*duplicate key 'apps'"):
        parse_topology("clusters: [{id: c, network: n}]\napps: []\napps: []\n", "t.yaml")
    with pytest.raises(TopologyError, match=r"t\.yaml: invalid YAML"):
        parse_topology("clusters: [", "t.yaml")
    with pytest.raises(TopologyError, match=r"missing\.yaml: cannot read topology file"):
        load_topology("missing.yaml")


def test_pinned_addresses_are_kept_and_skipped_by_auto_assignment() -> None:
    text = broken("apps.0.ips", ["10.244.1.2"])
    plan = plan_addresses(parse_topology(text, "t.yaml"))
    by_name = {p.name: str(p.ip) for p in plan.pods if p.network == "network1"}
    assert by_name["sleep-0"] == "10.244.1.2"
    assert by_name["waypoint-0"] == "10.244.1.3"  # the next free one
    assert len(set(by_name.values())) == len(by_name) == 3
