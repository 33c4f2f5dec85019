"""Two clusters on two isolated networks (network namespaces, overlapping pod IPs), real daemons, real curl.

The whole mesh comes from topology/examples/two-networks.yaml: cluster1 (network1) has the client `sleep`
and one `echo` pod; cluster2 (network2) has three `echo` pods, `reviews` and `ratings`. Only the east-west
gateways' addresses are routed between the networks, so everything crosses as double HBONE.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
from pathlib import Path

import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from topology import netns
from topology.app import pattern_sha256
from topology.launch import Mesh
from topology.loader import parse_topology

REPO = Path(__file__).resolve().parents[1]
TWO = REPO / "topology" / "examples" / "two-networks.yaml"
SINGLE = REPO / "topology" / "examples" / "single-network.yaml"
REASON = netns.netns_unavailable_reason()
pytestmark = [
    pytest.mark.skipif(REASON is not None, reason=f"multi-network tests need network namespaces: {REASON}"),
    pytest.mark.asyncio(loop_scope="module"),
]

ECHO = "http://echo.default.svc.cluster.local/"
RATINGS = "http://ratings.default.svc.cluster.local:9080/"
REVIEWS = "http://reviews.default.svc.cluster.local:9080/"  # cluster1's waypoint, 3 pods in cluster2


def samples(text: str, name: str, **match: str) -> list[dict[str, str]]:
    """Label sets of every sample of `name` whose labels include `match`, with the value under `_value`."""
    out = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in match.items()):
                out.append({**s.labels, "_value": s.value})
    return out


def total(text: str, name: str, **match: str) -> float:
    return sum(s["_value"] for s in samples(text, name, **match))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh_on(tmp_path_factory: pytest.TempPathFactory):
    async with Mesh(TWO, tmp_path_factory.mktemp("mesh-baggage-on"), baggage=True, mode="netns") as mesh:
        yield mesh


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh_off(tmp_path_factory: pytest.TempPathFactory):
    async with Mesh(TWO, tmp_path_factory.mktemp("mesh-baggage-off"), baggage=False, mode="netns") as mesh:
        yield mesh


async def test_network2_pod_ips_are_unreachable_from_network1(mesh_on: Mesh) -> None:
    ratings = mesh_on.pod("ratings-v1")
    # Straight to the pod IP, without the mesh: nothing in network1 routes there (or the same IP is a
    # different pod of network1's own), so it never reaches ratings.
    argv = netns.exec_argv(mesh_on.ns_of_pod(mesh_on.pod("sleep")),
                           ["curl", "-sS", "--max-time", "2", f"http://{ratings.ip}:8080/"])  # fmt: skip
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert proc.returncode != 0 or b"ratings" not in out


async def test_service_only_in_network2_is_reached_byte_exact(mesh_on: Mesh) -> None:
    result = (await mesh_on.curl("sleep", RATINGS)).check()
    assert result.text.startswith("ratings-v1-0 cluster2")
    size = 64 * 1024 * 1024
    big = (await mesh_on.curl("sleep", f"{RATINGS}bytes/{size}", timeout=120)).check()
    assert len(big.stdout) == size
    assert hashlib.sha256(big.stdout).hexdigest() == pattern_sha256(size)


async def test_service_in_both_networks_spreads_by_capacity(mesh_on: Mesh) -> None:
    """echo: one endpoint in cluster1, three behind cluster2's gateway (one split-horizon workload, capacity 3).

    Each connection's endpoint is drawn at random by capacity, so the local share is binomial (240 draws,
    p = 1/4: 60 +- 6.7). The bounds are 4.5 standard deviations wide, so chance alone fails this about once
    in 100,000 runs, while a choice that ignored capacity (p = 1/2, 120 +- 7.7) fails it nearly always."""
    seen = collections.Counter()
    for _ in range(4):  # 4 x 60 at once: enough concurrency for the gateway's choices, bounded for the machine
        results = await asyncio.gather(*(mesh_on.curl("sleep", ECHO) for _ in range(60)))
        for r in results:
            seen[r.check().text.split()[0]] += 1
    local = seen["echo-v1-0"]
    remote = {pod: n for pod, n in seen.items() if pod.startswith("echo-v2-")}
    assert set(remote) == {"echo-v2-0", "echo-v2-1", "echo-v2-2"}
    assert 30 <= local <= 96, seen  # expected 60
    for n in remote.values():  # the gateway spreads its share (expected 180) evenly: 60 each
        assert 36 <= n <= 84, seen


async def test_baggage_on_names_the_remote_peer_on_both_sides(mesh_on: Mesh) -> None:
    (await mesh_on.curl("sleep", RATINGS)).check()
    src = await mesh_on.scrape("cluster1/ztunnel")
    dst = await mesh_on.scrape("cluster2/ztunnel")
    out = samples(src, "istio_tcp_connections_opened_total", reporter="source",
                  destination_service="ratings.default.svc.cluster.local")  # fmt: skip
    assert out, src
    for s in out:
        assert s["destination_workload"] == "ratings-v1"
        assert s["destination_workload_namespace"] == "default"
        assert s["destination_cluster"] == "cluster2"
        assert s["destination_canonical_service"] == "ratings"
        assert s["destination_version"] == "v1"
        assert s["destination_principal"] == "spiffe://cluster.local/ns/default/sa/ratings"
        assert s["source_workload"] == "sleep" and s["source_cluster"] == "cluster1"
    inb = samples(dst, "istio_tcp_connections_opened_total", reporter="destination",
                  destination_workload="ratings-v1")  # fmt: skip
    assert inb, dst
    for s in inb:
        assert s["source_workload"] == "sleep"
        assert s["source_workload_namespace"] == "default"
        assert s["source_cluster"] == "cluster1"
        assert s["source_app"] == "sleep"
        assert s["source_principal"] == "spiffe://cluster.local/ns/default/sa/sleep"
        assert s["destination_cluster"] == "cluster2"


async def test_baggage_off_leaves_the_remote_peer_unknown(mesh_off: Mesh) -> None:
    (await mesh_off.curl("sleep", RATINGS)).check()
    src = await mesh_off.scrape("cluster1/ztunnel")
    dst = await mesh_off.scrape("cluster2/ztunnel")
    out = samples(src, "istio_tcp_connections_opened_total", reporter="source",
                  destination_service="ratings.default.svc.cluster.local")  # fmt: skip
    assert out
    for s in out:
        assert s["destination_workload"] == "unknown"
        assert s["destination_cluster"] == "unknown"
        assert s["destination_version"] == "unknown"
        # What mTLS proves is still reported.
        assert s["destination_principal"] == "spiffe://cluster.local/ns/default/sa/ratings"
    inb = samples(dst, "istio_tcp_connections_opened_total", reporter="destination",
                  destination_workload="ratings-v1")  # fmt: skip
    assert inb
    for s in inb:
        assert s["source_workload"] == "unknown"
        assert s["source_cluster"] == "unknown"
        assert s["source_principal"] == "spiffe://cluster.local/ns/default/sa/sleep"


async def test_waypoint_names_both_ends_across_networks_with_baggage(mesh_on: Mesh) -> None:
    for _ in range(3):
        assert (await mesh_on.curl("sleep", REVIEWS)).check().text.startswith("reviews-v1-")
    text = await mesh_on.scrape("cluster1/waypoint")
    rows = samples(text, "istio_requests_total", reporter="waypoint",
                   destination_service="reviews.default.svc.cluster.local")  # fmt: skip
    assert rows and sum(r["_value"] for r in rows) >= 3
    for r in rows:
        assert r["source_workload"] == "sleep" and r["source_cluster"] == "cluster1"
        assert r["source_principal"] == "spiffe://cluster.local/ns/default/sa/sleep"
        assert r["destination_workload"] == "reviews-v1" and r["destination_cluster"] == "cluster2"
        assert r["destination_principal"] == "spiffe://cluster.local/ns/default/sa/reviews"
        assert r["response_code"] == "200" and r["request_protocol"] == "http"
        assert r["connection_security_policy"] == "mutual_tls"


async def test_waypoint_leaves_the_remote_end_unknown_without_baggage(mesh_off: Mesh) -> None:
    (await mesh_off.curl("sleep", REVIEWS)).check()
    text = await mesh_off.scrape("cluster1/waypoint")
    rows = samples(text, "istio_requests_total", reporter="waypoint",
                   destination_service="reviews.default.svc.cluster.local")  # fmt: skip
    assert rows
    for r in rows:
        assert r["source_workload"] == "sleep"  # same cluster: known from the mesh state
        assert r["destination_workload"] == "unknown" and r["destination_cluster"] == "unknown"
        assert r["destination_principal"] == "spiffe://cluster.local/ns/default/sa/reviews"
        assert r["response_code"] == "200"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh_three_reviews(tmp_path_factory: pytest.TempPathFactory):
    """The example with three `reviews` pods in cluster2, behind cluster1's waypoint."""
    text = TWO.read_text().replace("{name: reviews-v1, cluster: cluster2, version: v1}",
                                   "{name: reviews-v1, cluster: cluster2, version: v1, replicas: 3}")  # fmt: skip
    assert "replicas: 3}" in text
    topology = parse_topology(text, str(TWO))
    async with Mesh(topology, tmp_path_factory.mktemp("mesh-3-reviews"), baggage=True, mode="netns") as mesh:
        yield mesh


async def test_waypoint_balances_each_request_of_one_connection(mesh_three_reviews: Mesh) -> None:
    """300 requests on one keep-alive connection: the waypoint picks a remote pod per request."""
    mesh_on = mesh_three_reviews

    async def connections_to_waypoint() -> float:
        ztunnel = await mesh_on.scrape("cluster1/ztunnel")
        return total(ztunnel, "istio_tcp_connections_opened_total", reporter="source", destination_workload="waypoint")

    before = await connections_to_waypoint()
    result = (await mesh_on.curl("sleep", REVIEWS, *([REVIEWS] * 299), timeout=120)).check()
    pods = collections.Counter(line.split()[0] for line in result.text.splitlines())
    assert sum(pods.values()) == 300
    assert set(pods) == {"reviews-v1-0", "reviews-v1-1", "reviews-v1-2"}
    for n in pods.values():
        assert 0.23 <= n / 300 <= 0.43, pods  # 33 % +- 10 %
    assert await connections_to_waypoint() == before + 1  # all 300 requests came on one connection


async def test_gateway_reports_only_what_it_can_see(mesh_on: Mesh) -> None:
    (await mesh_on.curl("sleep", RATINGS)).check()
    text = await mesh_on.scrape("cluster2/gateway")
    relayed = samples(text, "istio_tcp_connections_opened_total", reporter="destination",
                      destination_service="ratings.default.svc.cluster.local")  # fmt: skip
    assert relayed
    for s in relayed:
        assert s["source_principal"] == "spiffe://cluster.local/ns/default/sa/sleep"  # the outer peer
        assert s["destination_workload"] == "ratings-v1"  # the endpoint it chose
    # The inner CONNECT's x-forwarded-network and the destination's answer never reach the gateway.
    log = mesh_on.log("cluster2/gateway")
    assert "x-forwarded-network" not in log and "network1" not in text


async def test_gateway_restart_and_dead_endpoint(mesh_on: Mesh) -> None:
    (await mesh_on.curl("sleep", RATINGS)).check()
    await mesh_on.restart("cluster2/gateway")
    # The pooled outer connection died with the old gateway: the next connections dial a new one.
    for _ in range(3):
        assert (await mesh_on.curl("sleep", RATINGS)).check().text.startswith("ratings-v1-0")
    # Stop one remote echo application (its node's ztunnel lives on): the gateway cannot see inside the
    # tunnel, but no client waits: the destination ztunnel answers 503 at once and curl fails fast.
    await mesh_on.stop_process("cluster2/echo-v2-0")
    results = await asyncio.gather(*(mesh_on.curl("sleep", ECHO, timeout=20) for _ in range(30)))
    assert all(r.returncode != 28 for r in results)  # 28 is curl's "operation timed out"
    ok = [r.text.split()[0] for r in results if r.ok]
    assert "echo-v2-0" not in ok and len(ok) >= 10
    await mesh_on.start_process("cluster2/echo-v2-0")

    # Now the endpoint itself becomes unreachable (its HBONE port refuses, as when its node is gone): the
    # gateway's connect fails, it answers 503 with the CONNECT flag and stops choosing that endpoint.
    pod = mesh_on.pod("cluster2/echo-v2-0")
    ns = mesh_on.ns_of_pod(pod)
    rule = ["INPUT", "-d", str(pod.ip), "-p", "tcp", "--dport", "15008", "-j", "REJECT", "--reject-with", "tcp-reset"]
    await _run(netns.exec_argv(ns, ["iptables", "-I", *rule]))
    try:
        results = []
        for _ in range(30):
            results.append(await mesh_on.curl("sleep", ECHO, timeout=20))
        assert all(r.returncode != 28 for r in results)
        failed = [r for r in results if not r.ok]
        assert len(failed) <= 2  # only the attempts before the gateway ejected it
        assert "echo-v2-0" not in [r.text.split()[0] for r in results if r.ok]
        gateway = await mesh_on.scrape("cluster2/gateway")
        assert total(gateway, "istio_tcp_connections_failed_total", response_flags="CONNECT") >= 1
    finally:
        await _run(netns.exec_argv(ns, ["iptables", "-D", *rule]))


async def _run(argv: list[str]) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()


async def test_single_network_multicluster_is_direct(tmp_path: Path) -> None:
    async with Mesh(SINGLE, tmp_path, baggage=True, mode="netns") as mesh:
        # One pod in cluster1, two in cluster2: until both answered (20 tries missed cluster1 3e-4 of the time).
        text_by_pod = collections.Counter()
        for _ in range(60):
            text_by_pod[(await mesh.curl("sleep", ECHO)).check().text.split()[1]] += 1
            if set(text_by_pod) == {"cluster1", "cluster2"}:
                break
        assert set(text_by_pod) == {"cluster1", "cluster2"}
        src = await mesh.scrape("cluster1/ztunnel")
        remote = samples(src, "istio_tcp_connections_opened_total", reporter="source", destination_cluster="cluster2")
        assert remote and all(s["connection_security_policy"] == "mutual_tls" for s in remote)
        assert all(s["source_cluster"] == "cluster1" for s in remote)
        dst = await mesh.scrape("cluster2/ztunnel")
        inbound = samples(dst, "istio_tcp_connections_opened_total", reporter="destination", source_cluster="cluster1")
        assert inbound  # known by IP from the shared network, no gateway involved
