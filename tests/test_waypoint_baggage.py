"""The waypoint with AMBIENT_ENABLE_BAGGAGE=true (SPEC §4.3): the source peer comes from the request
baggage, the destination peer from the destination ztunnel's response baggage (the inner CONNECT's, through
a gateway), and upstream the waypoint sends its own baggage, never the client's."""

from __future__ import annotations

import re

from hbone.baggage import MAX_HEADER_BYTES, REASON_NOT_ASCII, REASON_TOO_LARGE, parse
from hbone.client import dial
from hbone.identity import Identity
from tests.support.http_clients import Http1Client, open_tunnel
from tests.support.pki import TestPki
from tests.support.waypoint_mesh import (
    CLIENT_ID,
    CLIENT_IP,
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
    # One trace id per connection (SPEC §3.3): the outer and the inner CONNECT of one attempt carry the same.
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", outer.headers["traceparent"])
    assert inner.headers["traceparent"] == outer.headers["traceparent"]
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


# Refused whole by the parser (SPEC §4.2): the header then counts as absent.
NOT_ASCII = "k8s.deployment.name=sl\xe9ep,service.name=liar"  # sent as latin-1: one byte 0xE9
TOO_LARGE = "service.name=liar," + "k8s.namespace.name=x," * (MAX_HEADER_BYTES // 21)


async def test_refused_client_baggage_counts_as_absent(
    pki: TestPki, topo: Topology, waypoint: WaypointProcess, endpoints: Endpoints
) -> None:
    assert parse([NOT_ASCII]).reason == REASON_NOT_ASCII and parse([TOO_LARGE]).reason == REASON_TOO_LARGE
    for bad in (NOT_ASCII, TOO_LARGE):
        # From the client pod's own IP: like a missing header, the state then names the client.
        conn = await dial(waypoint.inbound, pki.client_ctx(CLIENT_ID), {WAYPOINT_ID}, local_identity=CLIENT_ID,
                          source_ip=topo.ip(CLIENT_IP))  # fmt: skip
        client = Http1Client(await conn.open_stream(topo.authority("echo"), [("baggage", bad)]))
        assert (await client.request("GET", "/v2/refused", "echo")).status == 200
        client.close()
    samples = waypoint.scrape()
    (s,) = series(samples, "istio_requests_total", source_workload="sleep", destination_service=fqdn("echo-v2"))
    assert s.value == 2
    assert (s.labels["source_canonical_service"], s.labels["source_cluster"]) == ("sleep", "cluster1")
    assert s.labels["source_principal"] == str(CLIENT_ID)
    for reason in (REASON_NOT_ASCII, REASON_TOO_LARGE):
        (dropped,) = series(samples, "istio_baggage_dropped_items_total", reason=reason)
        assert dropped.value >= 1


async def test_refused_response_baggage_counts_as_absent(
    pki: TestPki, topo: Topology, waypoint: WaypointProcess, endpoints: Endpoints
) -> None:
    endpoints.ztunnels["echo-v2"].response_baggage = NOT_ASCII
    for name in ("echo-1", "echo-2", "echo-3"):
        endpoints.ztunnels[name].response_baggage = TOO_LARGE
    _, tunnel = await open_tunnel(pki, CLIENT_ID, waypoint.inbound, WAYPOINT_ID, topo.authority("echo"),
                                  [("baggage", baggage_of("sleep-refused"))])  # fmt: skip
    client = Http1Client(tunnel)
    assert (await client.request("GET", "/v2/refused", "echo")).status == 200
    assert (await client.request("GET", "/refused", "echo")).status == 200
    client.close()
    # A local endpoint is then named by the state, as without response baggage; never "unknown".
    samples = series(waypoint.scrape(), "istio_requests_total", source_workload="sleep-refused")
    by_service = {s.labels["destination_service"]: s.labels for s in samples}
    assert set(by_service) == {fqdn("echo-v2"), fqdn("echo")}
    v2, v1 = by_service[fqdn("echo-v2")], by_service[fqdn("echo")]
    assert (v2["destination_workload"], v2["destination_canonical_revision"]) == ("echo-v2", "v2")
    assert (v1["destination_workload"], v1["destination_canonical_revision"]) == ("echo", "v1")
    assert v2["destination_principal"] == "spiffe://cluster.local/ns/default/sa/echo-v2"


async def test_client_baggage_cannot_claim_another_namespace(
    pki: TestPki, topo: Topology, waypoint: WaypointProcess, endpoints: Endpoints
) -> None:
    """Baggage describes the peer, but its namespace is the one its certificate proves (as at the gateway):
    a workload of `elsewhere` saying `k8s.namespace.name=default` is still counted in `elsewhere`."""
    stranger = Identity("cluster.local", "elsewhere", "stranger")
    _, tunnel = await open_tunnel(pki, stranger, waypoint.inbound, WAYPOINT_ID, topo.authority("echo"),
                                  [("baggage", baggage_of("claims-default"))])  # fmt: skip
    assert "k8s.namespace.name=default" in baggage_of("claims-default")
    client = Http1Client(tunnel)
    assert (await client.request("GET", "/v2/claim", "echo")).status == 200
    client.close()
    (s,) = series(waypoint.scrape(), "istio_requests_total", source_workload="claims-default")
    assert s.labels["source_workload_namespace"] == "elsewhere"
    assert s.labels["source_principal"] == str(stranger)
    assert (s.labels["source_canonical_service"], s.labels["source_cluster"]) == ("claims-default", "cluster1")


async def test_response_baggage_cannot_claim_another_namespace(
    pki: TestPki, topo: Topology, waypoint: WaypointProcess, endpoints: Endpoints
) -> None:
    """The destination's response baggage describes it, local or through a gateway, but its namespace is the
    one its certificate proves: a `default` endpoint saying `k8s.namespace.name=elsewhere` stays in `default`."""
    assert endpoints.remote is not None
    for stand_in, name in ((endpoints.ztunnels["echo-v2"], "echo-v2-claims"), (endpoints.remote, "remote-claims")):
        claim = baggage_of(name).replace("k8s.namespace.name=default", "k8s.namespace.name=elsewhere")
        assert "k8s.namespace.name=elsewhere" in claim
        stand_in.response_baggage = claim
    for service, path in (("echo", "/v2/claim"), ("remote", "/")):
        _, tunnel = await open_tunnel(pki, CLIENT_ID, waypoint.inbound, WAYPOINT_ID, topo.authority(service),
                                      [("baggage", baggage_of("sleep-claims"))])  # fmt: skip
        client = Http1Client(tunnel)
        assert (await client.request("GET", path, service)).status == 200
        client.close()
    samples = series(waypoint.scrape(), "istio_requests_total", source_workload="sleep-claims")
    by_service = {s.labels["destination_service"]: s.labels for s in samples}
    assert set(by_service) == {fqdn("echo-v2"), fqdn("remote")}
    v2, remote = by_service[fqdn("echo-v2")], by_service[fqdn("remote")]
    assert (v2["destination_workload"], v2["destination_workload_namespace"]) == ("echo-v2-claims", "default")
    assert v2["destination_principal"] == "spiffe://cluster.local/ns/default/sa/echo-v2"
    assert (remote["destination_workload"], remote["destination_workload_namespace"]) == ("remote-claims", "default")
    assert remote["destination_principal"] == str(REMOTE_ID)
