"""The waypoint with AMBIENT_ENABLE_BAGGAGE=true (SPEC §4.3): the source peer comes from the request
baggage, the destination peer from the destination ztunnel's response baggage (the inner CONNECT's, through
a gateway), and upstream the waypoint sends its own baggage, never the client's."""

from __future__ import annotations

from hbone.baggage import parse
from tests.support.http_clients import Http1Client, open_tunnel
from tests.support.pki import TestPki
from tests.support.waypoint_mesh import (
    CLIENT_ID,
    REMOTE_ID,
    WAYPOINT_ID,
    Endpoints,
    Topology,
    baggage_of,
    fqdn,
)
from tests.support.waypoint_proc import WaypointProcess, series

WAYPOINT_BAGGAGE = ("k8s.cluster.name=cluster1,k8s.namespace.name=default,k8s.deployment.name=waypoint,"
                    "service.name=waypoint,service.version=v1")  # fmt: skip


BAGGAGE_ENABLED = True  # read by tests/support/waypoint_fixtures.py


async def test_both_peers_from_baggage_and_own_baggage_upstream(
    pki: TestPki, topo: Topology, waypoint: WaypointProcess, endpoints: Endpoints
) -> None:
    client_baggage = baggage_of("sleep-bg", cluster="cluster9", version="v7")
    _, tunnel = await open_tunnel(pki, CLIENT_ID, waypoint.inbound, WAYPOINT_ID, topo.authority("echo"),
                                  [("baggage", client_baggage)])  # fmt: skip
    # The waypoint answers the CONNECT with its own peer metadata.
    assert [v.decode() for v in tunnel.header_values("baggage", response=True)] == [WAYPOINT_BAGGAGE]
    client = Http1Client(tunnel)
    for _ in range(6):
        assert (await client.request("GET", "/v2/x", "echo")).status == 200
    client.close()
    (connect,) = endpoints.ztunnels["echo-v2"].connects[-1:]
    assert connect.headers["baggage"] == WAYPOINT_BAGGAGE
    assert all("sleep-bg" not in c.headers.get("baggage", "") for z in endpoints.ztunnels.values()
               for c in z.connects)  # fmt: skip
    samples = waypoint.scrape()
    (s,) = series(samples, "istio_requests_total", destination_service=fqdn("echo-v2"), response_code="200")
    assert s.value == 6
    labels = s.labels
    assert (labels["source_workload"], labels["source_canonical_service"], labels["source_canonical_revision"],
            labels["source_cluster"]) == ("sleep-bg", "sleep-bg", "v7", "cluster9")  # fmt: skip
    assert labels["source_principal"] == str(CLIENT_ID)  # always the mTLS identity, never baggage
    assert (labels["destination_workload"], labels["destination_canonical_service"],
            labels["destination_canonical_revision"]) == ("echo-v2-bg", "echo-v2-bg", "v9")  # fmt: skip
    assert labels["destination_principal"] == "spiffe://cluster.local/ns/default/sa/echo-v2"


async def test_remote_destination_from_inner_response_baggage(
    pki: TestPki, topo: Topology, waypoint: WaypointProcess, endpoints: Endpoints
) -> None:
    _, tunnel = await open_tunnel(pki, CLIENT_ID, waypoint.inbound, WAYPOINT_ID, topo.authority("remote"),
                                  [("baggage", baggage_of("sleep-bg"))])  # fmt: skip
    client = Http1Client(tunnel)
    assert (await client.request("GET", "/", "remote")).body == b"remote"
    client.close()
    assert endpoints.gateway is not None and endpoints.remote is not None
    (outer,) = endpoints.gateway.connects
    (inner,) = endpoints.remote.connects
    assert outer.headers["baggage"] == inner.headers["baggage"] == WAYPOINT_BAGGAGE
    assert outer.headers["x-istio-source"] == "waypoint"
    assert inner.headers["x-forwarded-network"] == "net1"
    (s,) = series(waypoint.scrape(), "istio_requests_total", destination_service=fqdn("remote"))
    assert s.labels["destination_workload"] == "remote-bg"
    assert s.labels["destination_cluster"] == "cluster2"
    assert s.labels["destination_principal"] == str(REMOTE_ID)
    assert s.labels["source_workload"] == "sleep-bg"


async def test_oversized_client_baggage_is_dropped_and_counted(
    pki: TestPki, topo: Topology, waypoint: WaypointProcess, endpoints: Endpoints
) -> None:
    bad = "k8s.deployment.name=" + "x" * 300 + ",service.name=ok"
    assert parse([bad]).dropped == 1
    _, tunnel = await open_tunnel(pki, CLIENT_ID, waypoint.inbound, WAYPOINT_ID, topo.authority("echo"),
                                  [("baggage", bad)])  # fmt: skip
    client = Http1Client(tunnel)
    assert (await client.request("GET", "/v2/bounded", "echo")).status == 200
    client.close()
    samples = waypoint.scrape()
    (s,) = series(samples, "istio_requests_total", source_canonical_service="ok")
    assert s.labels["source_workload"] == "unknown"
    (dropped,) = series(samples, "istio_baggage_dropped_items_total", reason="invalid_value")
    assert dropped.value >= 1
