"""The waypoint end to end (baggage flag off): the real `python -m waypoint_py` between an HBONE client and
stand-in ztunnels at the endpoints' podIP:15008, routing every request on its own."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import struct
import urllib.request
from collections import Counter

import pytest

from hbone.authority import parse_authority
from hbone.errors import ConnectRefused
from mesh.config import parse_config
from mesh.metrics import HTTP_BUCKETS
from mesh.settings import WorkloadInfo
from mesh.state import MeshState
from tests.support.http_clients import H2Client, Http1Client, open_tunnel
from tests.support.pki import TestPki
from tests.support.waiting import eventually
from tests.support.waypoint_mesh import (
    CLIENT_ID,
    CLIENT_IP,
    NETWORK,
    REMOTE_ID,
    WAYPOINT_ID,
    Endpoints,
    Topology,
    baggage_of,
    custom_upstream,
    fqdn,
)
from tests.support.waypoint_proc import WaypointProcess, series, total
from waypoint_py.destination import resolve
from waypoint_py.http_types import RequestHead
from waypoint_py.routes import NoRoute, decide
from waypoint_py.view import build_view

REQUESTS = "istio_requests_total"


async def client_for(pki: TestPki, wp: WaypointProcess, authority: str, baggage: str | None = None,
                     source_ip: str | None = None) -> Http1Client:  # fmt: skip
    headers = [("baggage", baggage)] if baggage else []
    _, tunnel = await open_tunnel(pki, CLIENT_ID, wp.inbound, WAYPOINT_ID, authority, headers, source_ip)
    return Http1Client(tunnel)


async def test_requests_on_one_connection_spread_over_endpoints(
    pki: TestPki, topo: Topology, waypoint: WaypointProcess, endpoints: Endpoints
) -> None:
    # From the client's own address: without baggage, the source is a workload only when identity and IP match.
    client = await client_for(pki, waypoint, topo.authority("echo"), baggage_of("liar"), topo.ip(CLIENT_IP))
    seen: Counter[str] = Counter()
    for _ in range(300):
        resp = await client.request("GET", "/", "echo:80")
        assert resp.status == 200
        seen[resp.headers["x-endpoint"]] += 1
    client.close()
    assert set(seen) == {"echo-1", "echo-2", "echo-3"}
    for name, n in seen.items():  # 100 expected each: 55-145 is over 5 standard deviations (chance 1e-7)
        assert 55 <= n <= 145, (name, seen)
    # Flag off: labels come from the state, never from the client's baggage; none is sent upstream.
    samples = waypoint.scrape()
    labels = dict(reporter="waypoint", source_workload="sleep", source_canonical_service="sleep",
                  source_principal=str(CLIENT_ID), destination_workload="echo", destination_service=fqdn("echo"),
                  destination_principal="spiffe://cluster.local/ns/default/sa/echo", response_code="200",
                  request_protocol="http", response_flags="-", connection_security_policy="mutual_tls")  # fmt: skip
    assert total(samples, REQUESTS, **labels) >= 300
    assert total(samples, REQUESTS, source_workload="liar") == 0
    # Balanced per request, yet not a CONNECT per request: kept-alive upstream connections, one per endpoint.
    connects = [c for z in endpoints.ztunnels.values() for c in z.connects]
    assert 3 <= len(connects) <= 5, len(connects)
    assert sum(endpoints.apps[name].connections for name in seen) == len(connects)
    assert all("baggage" not in c.headers for c in connects)
    assert all(c.headers["forwarded"].endswith(f";host={fqdn('echo')}") for c in connects)


async def test_weighted_split(pki: TestPki, topo: Topology, waypoint: WaypointProcess, endpoints: Endpoints) -> None:
    async def run(connection: int) -> list[str]:
        client = await client_for(pki, waypoint, topo.authority("echo"))
        seen = []
        for i in range(100):
            resp = await client.request("GET", f"/split/{connection}/{i}", "echo:80")
            assert resp.status == 200
            seen.append(resp.headers["x-endpoint"])
        client.close()
        return seen

    # Ten keep-alive connections at once, a hundred requests each: the split holds per request.
    results = await asyncio.gather(*(run(c) for c in range(10)))
    to_v2 = sum(name == "echo-v2" for seen in results for name in seen)
    assert 135 <= to_v2 <= 265, to_v2  # 200 expected: over 5 standard deviations (chance 3e-7)


async def test_header_and_path_matches(pki: TestPki, topo: Topology, waypoint: WaypointProcess,
                                       endpoints: Endpoints) -> None:  # fmt: skip
    client = await client_for(pki, waypoint, topo.authority("echo"))
    assert (await client.request("GET", "/", "echo", [("x-version", "v2")])).headers["x-endpoint"] == "echo-v2"
    assert (await client.request("GET", "/v2/reviews", "echo")).headers["x-endpoint"] == "echo-v2"
    assert (await client.request("GET", "/v2", "echo")).headers["x-endpoint"] == "echo-v2"
    # A prefix matches whole path elements only; a non-matching header falls through to the default rule.
    assert (await client.request("GET", "/v2x", "echo")).headers["x-endpoint"] != "echo-v2"
    assert (await client.request("GET", "/", "echo", [("x-version", "v3")])).headers["x-endpoint"] != "echo-v2"
    client.close()


async def test_no_matching_rule_is_404(pki: TestPki, topo: Topology, waypoint: WaypointProcess,
                                       endpoints: Endpoints) -> None:  # fmt: skip
    client = await client_for(pki, waypoint, topo.authority("strict"))
    assert (await client.request("GET", "/only", "strict")).status == 200
    resp = await client.request("GET", "/other", "strict")
    assert resp.status == 404
    assert b"no rule of route default/strict matches GET /other" in resp.body
    # The connection stays usable after an error answer.
    assert (await client.request("GET", "/only", "strict")).status == 200
    client.close()
    samples = waypoint.scrape()
    assert total(samples, REQUESTS, destination_service=fqdn("strict"), response_code="404", response_flags="NR") == 1


async def test_timeout_is_504_ut(pki: TestPki, topo: Topology, waypoint: WaypointProcess,
                                 endpoints: Endpoints) -> None:  # fmt: skip
    client = await client_for(pki, waypoint, topo.authority("slow"))
    resp = await client.request("GET", "/slow", "slow")
    assert resp.status == 504
    assert b"upstream request timeout" in resp.body
    client.close()
    samples = waypoint.scrape()
    assert total(samples, REQUESTS, destination_service=fqdn("slow"), response_code="504", response_flags="UT") == 1


async def test_retry_on_503_succeeds(pki: TestPki, topo: Topology, waypoint: WaypointProcess,
                                     endpoints: Endpoints) -> None:  # fmt: skip
    flaky = endpoints.apps["flaky"]
    flaky.fail_next = 1
    client = await client_for(pki, waypoint, topo.authority("flaky"))
    resp = await client.request("POST", "/flaky", "flaky", body=b"x" * 1000)
    assert resp.status == 200
    assert flaky.requests == 2  # the 503, then the retry
    # Two failures exhaust the retries? No: attempts=2 means up to three tries.
    flaky.fail_next = 3
    resp = await client.request("GET", "/flaky", "flaky")
    assert resp.status == 503
    client.close()
    samples = waypoint.scrape()
    svc = fqdn("flaky")
    assert total(samples, REQUESTS, destination_service=svc, response_code="200", response_flags="-") == 1
    assert total(samples, REQUESTS, destination_service=svc, response_code="503", response_flags="URX") == 1


async def test_upstream_connect_failure_is_503_uf(pki: TestPki, topo: Topology, waypoint: WaypointProcess,
                                                  endpoints: Endpoints) -> None:  # fmt: skip
    client = await client_for(pki, waypoint, topo.authority("down"))
    resp = await client.request("GET", "/", "down")
    assert resp.status == 503
    assert b"upstream connect error" in resp.body
    client.close()
    samples = waypoint.scrape()
    assert total(samples, REQUESTS, destination_service=fqdn("down"), response_code="503", response_flags="UF") == 1


async def test_upstream_failures_before_the_response(pki: TestPki, topo: Topology,
                                                     waypoint: WaypointProcess) -> None:  # fmt: skip
    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if head.startswith(b"GET /invalid "):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nhello")
            await reader.read()  # until the waypoint gives up on the connection
        # else: the connection closes with no answer at all

    async with custom_upstream(topo, pki, app):
        client = await client_for(pki, waypoint, topo.authority("custom"))
        # Not HTTP: 502, "upstream protocol error", as Envoy answers and flags it.
        resp = await client.request("GET", "/invalid", "custom")
        assert resp.status == 502 and b"malformed HTTP/1.1" in resp.body, resp
        # The connection closed before an answer: 503 with Envoy's "upstream connection termination" (UR is an
        # HTTP/2 stream reset).
        resp = await client.request("GET", "/closed", "custom")
        assert resp.status == 503 and b"closed the connection" in resp.body, resp
        client.close()
    samples = waypoint.scrape()
    svc = fqdn("custom")
    assert total(samples, REQUESTS, destination_service=svc, response_code="502", response_flags="UPE") == 1
    assert total(samples, REQUESTS, destination_service=svc, response_code="503", response_flags="UC") == 1


def test_route_to_a_backend_missing_from_the_state_is_500(topo: Topology) -> None:
    # Loading the config refuses a route to an undefined service; should the waypoint's view lack one all the
    # same, the answer is Gateway API's for an invalid backend: 500.
    state = MeshState(parse_config(topo.config(), "mesh.yaml"))
    view = build_view(state, WorkloadInfo("default", "waypoint", "waypoint"), NETWORK, "cluster1")
    services = {key: svc for key, svc in view.services_by_name.items() if key != ("default", "echo-v2")}
    without_v2 = dataclasses.replace(view, services_by_name=services)
    original = resolve(state, NETWORK, parse_authority(topo.authority("echo")))
    with pytest.raises(NoRoute) as info:
        decide(without_v2, original, RequestHead("GET", "/v2/x", fqdn("echo"), [], False))
    assert info.value.status == 500
    assert "backend service default/echo-v2 is not in the mesh state" in str(info.value)


async def test_unknown_original_destination_is_refused_503(pki: TestPki, topo: Topology,
                                                           waypoint: WaypointProcess) -> None:  # fmt: skip
    with pytest.raises(ConnectRefused) as info:
        await open_tunnel(pki, CLIENT_ID, waypoint.inbound, WAYPOINT_ID, f"{topo.ip(250)}:80")
    assert info.value.status == 503


async def test_malformed_http_is_400_and_only_that_connection_closes(
    pki: TestPki, topo: Topology, waypoint: WaypointProcess, endpoints: Endpoints
) -> None:
    good = await client_for(pki, waypoint, topo.authority("echo"))
    assert (await good.request("GET", "/", "echo")).status == 200
    _, tunnel = await open_tunnel(pki, CLIENT_ID, waypoint.inbound, WAYPOINT_ID, topo.authority("echo"))
    bad = Http1Client(tunnel)
    bad.writer.write(b"GET / HTTP/1.1\r\nHost: echo\r\nBad Header\r\n\r\n")
    reply = await bad.reader.read()  # everything until the waypoint closes
    assert reply.startswith(b"HTTP/1.1 400 "), reply
    assert (await good.request("GET", "/", "echo")).status == 200
    good.close()
    samples = waypoint.scrape()
    assert total(samples, REQUESTS, destination_service=fqdn("echo"), response_code="400", response_flags="DPE") == 1


async def test_remote_endpoint_through_gateway(pki: TestPki, topo: Topology, waypoint: WaypointProcess,
                                               endpoints: Endpoints) -> None:  # fmt: skip
    client = await client_for(pki, waypoint, topo.authority("remote"))
    for _ in range(3):
        resp = await client.request("GET", "/", "remote")
        assert (resp.status, resp.body) == (200, b"remote")
    client.close()
    assert endpoints.gateway is not None and endpoints.remote is not None
    outer = endpoints.gateway.connects
    # The remote network stands for one endpoint (capacity 1), so one inner connection carries all three.
    assert len(outer) == 1
    assert all(c.authority == f"{fqdn('remote')}:80" and c.headers["x-istio-source"] == "waypoint" for c in outer)
    inner = endpoints.remote.connects
    assert len(inner) == 1
    assert all(c.headers["x-forwarded-network"] == "net1" and "x-istio-source" not in c.headers for c in inner)
    # Flag off: a remote destination is unknown but for the identity its inner TLS proved.
    samples = waypoint.scrape()
    (s,) = series(samples, REQUESTS, destination_service=fqdn("remote"))
    assert s.value == 3
    assert s.labels["destination_principal"] == str(REMOTE_ID)
    assert s.labels["destination_workload"] == "unknown"
    assert s.labels["destination_cluster"] == "unknown"


async def test_histograms_have_spec_buckets_and_count_every_request(
    pki: TestPki, topo: Topology, waypoint: WaypointProcess, endpoints: Endpoints
) -> None:
    client = await client_for(pki, waypoint, topo.authority("echo"))
    for _ in range(5):
        await client.request("GET", "/v2/hist", "echo")
    client.close()
    samples = waypoint.scrape()
    labels = {"destination_workload": "echo-v2", "response_code": "200"}
    requests = total(samples, REQUESTS, **labels)
    assert requests >= 5
    for histogram in ("istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes"):
        buckets = series(samples, f"{histogram}_bucket", **labels)
        edges = sorted({float(b.labels["le"]) for b in buckets})
        assert edges == [*HTTP_BUCKETS, float("inf")]
        assert total(samples, f"{histogram}_count", **labels) == requests
        assert total(samples, f"{histogram}_bucket", le="+Inf", **labels) == requests
    assert not [s for s in samples if s.name.endswith("_created")]
    (build,) = series(samples, "istio_build")
    assert build.labels["component"] == "waypoint" and build.value == 1


async def test_config_dump_names_the_waypoint(waypoint: WaypointProcess) -> None:
    import json
    import urllib.request

    url = f"http://{waypoint.admin[0]}:{waypoint.admin[1]}/config_dump"
    dump = await asyncio.to_thread(lambda: json.load(urllib.request.urlopen(url, timeout=10)))
    assert dump["waypoint"]["identity"] == str(WAYPOINT_ID)
    assert dump["waypoint"]["workload"] == "cluster1//v1/Pod/default/waypoint"


def set_log_level(wp: WaypointProcess, level: str) -> None:
    url = f"http://{wp.admin[0]}:{wp.admin[1]}/logging?level={level}"
    with urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST"), timeout=5) as resp:
        assert resp.status == 200


async def test_tunnels_that_vanish_are_no_error(pki: TestPki, topo: Topology, waypoint: WaypointProcess) -> None:
    # A client that resets its tunnel, and an HTTP/2 upstream whose tunnel is reset (its application sent a TCP
    # RST), are ordinary ends: a debug line each, never an error with a traceback.
    async def reset_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # the waypoint's connection preface has begun
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST

    start = len(waypoint.log())

    def log() -> str:
        return waypoint.log()[start:]

    await asyncio.to_thread(set_log_level, waypoint, "debug")
    try:
        _, tunnel = await open_tunnel(pki, CLIENT_ID, waypoint.inbound, WAYPOINT_ID, topo.authority("echo"))
        tunnel.reset()  # before a single byte
        await eventually(lambda: f"CONNECT {topo.authority('echo')} from" in log()
                         and "stream reset by peer" in log(), "the client's reset is seen")  # fmt: skip

        async with custom_upstream(topo, pki, reset_at_once):
            _, tunnel = await open_tunnel(pki, CLIENT_ID, waypoint.inbound, WAYPOINT_ID, topo.authority("custom"))
            client = H2Client(tunnel)
            sid = client.request("custom", "/", body=b"")
            await asyncio.wait_for(client.next_event(sid), 10)  # whatever the answer: the upstream is gone
            await eventually(lambda: "HTTP/2 connection to" in log(), "the lost upstream is seen")
            client.close()
    finally:
        await asyncio.to_thread(set_log_level, waypoint, "reset")
    assert "Traceback" not in log() and " error " not in log(), log()
