"""The waypoint's source peer with the baggage flag off (SPEC §4.3, §7): the mesh state names the client
only when both its verified identity and its IP match one workload; otherwise only the principal is known."""

from __future__ import annotations

from hbone.client import dial
from tests.support.http_clients import Http1Client
from tests.support.pki import TestPki
from tests.support.waypoint_mesh import CLIENT_ID, CLIENT_IP, WAYPOINT_ID, Endpoints, Topology, fqdn
from tests.support.waypoint_proc import WaypointProcess, series

STRANGER_IP = 9  # last octet of an address no workload has


async def request_from(pki: TestPki, topo: Topology, wp: WaypointProcess, last_octet: int, path: str) -> None:
    conn = await dial(wp.inbound, pki.client_ctx(CLIENT_ID), {WAYPOINT_ID}, local_identity=CLIENT_ID,
                      source_ip=topo.ip(last_octet))  # fmt: skip
    client = Http1Client(await conn.open_stream(topo.authority("echo")))
    assert (await client.request("GET", path, "echo")).status == 200
    client.close()


async def test_source_named_only_when_identity_and_ip_match(
    pki: TestPki, topo: Topology, waypoint: WaypointProcess, endpoints: Endpoints
) -> None:
    await request_from(pki, topo, waypoint, CLIENT_IP, "/v2/pod")
    # Same identity from an IP the state does not give it: several workloads may share a service account,
    # so the identity alone must not pick one of them.
    await request_from(pki, topo, waypoint, STRANGER_IP, "/v2/stranger")
    samples = series(waypoint.scrape(), "istio_requests_total", destination_service=fqdn("echo-v2"))
    by_source = {s.labels["source_workload"]: s for s in samples}
    assert set(by_source) == {"sleep", "unknown"}
    assert by_source["sleep"].value == by_source["unknown"].value == 1
    stranger = by_source["unknown"].labels
    assert stranger["source_principal"] == str(CLIENT_ID)
    assert (stranger["source_canonical_service"], stranger["source_app"]) == ("unknown", "unknown")
