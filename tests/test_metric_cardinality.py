"""What a peer chooses must not choose how many series we keep: prometheus-client keeps every label set it has
seen for the life of the process, so label values taken from a peer are bounded in number, not only in size.

- Baggage (SPEC §4.2, beyond Istio): one verified identity may describe at most `LABEL_SETS_PER_IDENTITY`
  different label sets, the process at most `LABEL_SETS_IN_ALL`; past that its new label sets count as absent
  (and as drops, reason `too_many_label_sets`), in every daemon, since they all go through `peer_from_baggage`.
- The waypoint's upstream answer: `response_code` is an HTTP status (100-599; anything else is the upstream
  protocol error it is, 502 UPE), `grpc_response_status` one of gRPC's codes (anything else is UNKNOWN, 2).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import h2.connection
import h2.events
import pytest

from hbone.client import dial
from hbone.identity import Identity
from mesh.metrics import (
    LABEL_SETS_PER_IDENTITY,
    REASON_TOO_MANY_LABEL_SETS,
    BaggageMetrics,
    PeerLabelBudget,
    new_registry,
)
from mesh.peers import peer_from_baggage
from tests.support.apps import TcpApp, echo, stream_pair
from tests.support.daemons import Daemon, metric_samples, scrape
from tests.support.http_clients import H2Client, Http1Client, open_tunnel
from tests.support.pki import TestPki, ident
from tests.support.standins import H2App
from tests.support.waiting import eventually
from tests.support.waypoint_mesh import WAYPOINT_ID, Topology, baggage_of, custom_upstream, fqdn
from tests.support.waypoint_proc import Sample, WaypointProcess, series, total
from tests.support.ztunnel import running_ztunnel, workload

BAGGAGE_ENABLED = True  # read by tests/support/waypoint_fixtures.py: the waypoint runs with the exchange on

NAMES = 50  # distinct workload names one peer sends, well past the bound
assert NAMES > LABEL_SETS_PER_IDENTITY
DROPPED = "istio_baggage_dropped_items_total"
REQUESTS = "istio_requests_total"
GRPC = [("content-type", "application/grpc"), ("te", "trailers")]
MESSAGE = b"\x00\x00\x00\x00\x02hi"  # one length-prefixed gRPC message
DEADLINE = 10.0  # for what the test waits on, never a measure of anything


def names(prefix: str) -> list[str]:
    return [f"{prefix}-{i}" for i in range(NAMES)]


# -- the bound itself, without processes -------------------------------------------------------------------------


def test_one_identity_gets_its_bound_of_label_sets_and_no_more(caplog: pytest.LogCaptureFixture) -> None:
    registry = new_registry()
    counted = BaggageMetrics(registry)
    many, other = Identity("cluster.local", "ns1", "many"), Identity("cluster.local", "ns1", "other")
    with caplog.at_level(logging.WARNING, logger="mesh.peers"):
        described = [peer_from_baggage([baggage_of(name)], many, counted) for name in names("w")]
        # The first ones are labelled from baggage as before; past the bound, baggage counts as absent.
        admitted = described[:LABEL_SETS_PER_IDENTITY]
        assert [p.workload if p else None for p in admitted] == names("w")[:LABEL_SETS_PER_IDENTITY]
        assert all(p is not None and p.principal == str(many) and p.namespace == "ns1" for p in admitted)
        assert described[LABEL_SETS_PER_IDENTITY:] == [None] * (NAMES - LABEL_SETS_PER_IDENTITY)
        # A label set admitted before still is: the series exists already, and honest traffic keeps its labels.
        again = peer_from_baggage([baggage_of("w-0")], many, counted)
        assert again is not None and again.workload == "w-0"
        # Another identity has a bound of its own.
        theirs = peer_from_baggage([baggage_of("theirs")], other, counted)
        assert theirs is not None and (theirs.workload, theirs.principal) == ("theirs", str(other))
    refused = NAMES - LABEL_SETS_PER_IDENTITY
    assert registry.get_sample_value(DROPPED, {"reason": REASON_TOO_MANY_LABEL_SETS}) == refused
    # One warning for the identity, however many refusals it caused (the peer decides how many).
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(many) in warnings[0].getMessage()


def test_the_process_keeps_a_bounded_number_of_label_sets_and_identities(caplog: pytest.LogCaptureFixture) -> None:
    registry = new_registry()
    budget = PeerLabelBudget(per_identity=3, in_all=5)
    counted = BaggageMetrics(registry, budget)
    peers = [Identity("cluster.local", "ns2", f"sa{i}") for i in range(12)]
    with caplog.at_level(logging.WARNING, logger="mesh.peers"):
        described = [peer_from_baggage([baggage_of(f"w{i}")], peer, counted) for i, peer in enumerate(peers)]
        assert [p.workload if p else None for p in described] == [f"w{i}" for i in range(5)] + [None] * 7
        # Known identities keep what they have, and get nothing new once the process has spent its bound.
        assert peer_from_baggage([baggage_of("w0")], peers[0], counted) is not None
        assert peer_from_baggage([baggage_of("w0-again")], peers[0], counted) is None
    assert len(budget) == 5
    assert registry.get_sample_value(DROPPED, {"reason": REASON_TOO_MANY_LABEL_SETS}) == 8
    # Identities with nothing admitted are not remembered one by one: one warning for all of them, one for sa0.
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2


# -- the waypoint: source labels from baggage ----------------------------------------------------------------------


async def test_waypoint_one_identity_cannot_mint_series_with_baggage(
    pki: TestPki, topo: Topology, waypoint: WaypointProcess, endpoints: object
) -> None:
    many = Identity("cluster.local", "cardinality", "many")
    conn = await dial(waypoint.inbound, pki.client_ctx(many), {WAYPOINT_ID}, local_identity=many)
    try:
        for name in [*names("wp"), "wp-0"]:
            client = Http1Client(await conn.open_stream(topo.authority("echo"), [("baggage", baggage_of(name))]))
            assert (await client.request("GET", "/", "echo")).status == 200
            client.close()
    finally:
        conn.close()
    other = Identity("cluster.local", "cardinality", "other")
    _, tunnel = await open_tunnel(pki, other, waypoint.inbound, WAYPOINT_ID, topo.authority("echo"),
                                  [("baggage", baggage_of("other-wl"))])  # fmt: skip
    client = Http1Client(tunnel)
    assert (await client.request("GET", "/", "echo")).status == 200
    client.close()

    def requests_by_workload(principal: Identity) -> dict[str, float]:
        found = series(waypoint.scrape(), REQUESTS, source_principal=str(principal))
        out: dict[str, float] = {}
        for s in found:
            out[s.labels["source_workload"]] = out.get(s.labels["source_workload"], 0) + s.value
        return out

    mine = await eventually(lambda: (r := requests_by_workload(many)) and sum(r.values()) == NAMES + 1 and r,
                            "every request of the first identity is counted")  # fmt: skip
    # The first ones labelled from baggage as before (the first one twice), the rest as without baggage: an
    # identity the state does not know is its principal and nothing more.
    expected = {name: 1.0 for name in names("wp")[:LABEL_SETS_PER_IDENTITY]}
    expected["wp-0"] = 2.0
    expected["unknown"] = float(NAMES - LABEL_SETS_PER_IDENTITY)
    assert mine == expected
    assert len(mine) <= LABEL_SETS_PER_IDENTITY + 1
    theirs = await eventually(lambda: requests_by_workload(other), "the other identity's request is counted")
    assert theirs == {"other-wl": 1.0}
    samples = waypoint.scrape()
    assert total(samples, DROPPED, reason=REASON_TOO_MANY_LABEL_SETS) == NAMES - LABEL_SETS_PER_IDENTITY
    assert "label set beyond the bound" in waypoint.log()


# -- ztunnel inbound: the same bound (and the same code) -------------------------------------------------------------

Z, ECHO_IP, UNKNOWN_IP = "127.21.1.1", "127.21.1.20", "127.21.1.77"
APP_PORT = 8080


@pytest.fixture
async def ztunnel(tmp_path: Path, pki: TestPki):
    app = await TcpApp(echo).start(ECHO_IP, APP_PORT)
    try:
        config = {"workloads": [workload("echo-1", ECHO_IP, workloadName="echo")]}
        async with running_ztunnel(Z, tmp_path, config, pki.paths["cluster1"], NETWORK="network1",
                                   AMBIENT_ENABLE_BAGGAGE="true", INBOUND_PLAINTEXT_ADDR="off") as daemon:  # fmt: skip
            yield daemon
    finally:
        await app.close()


async def test_ztunnel_inbound_one_identity_cannot_mint_series_with_baggage(ztunnel: Daemon, pki: TestPki) -> None:
    many = Identity("cluster.local", "cardinality", "many")
    conn = await dial((ECHO_IP, 15008), pki.client_ctx(many), [ident("echo")], source_ip=UNKNOWN_IP)
    try:
        for name in names("zt"):
            tunnel = await conn.open_stream(f"{ECHO_IP}:{APP_PORT}", [("baggage", baggage_of(name))])
            reader, writer = stream_pair(tunnel)
            writer.write(b"hi")
            writer.write_eof()
            assert await reader.read() == b"hi"
    finally:
        conn.close()
    text = await scrape(f"{Z}:15020")
    opened = [(labels, value) for labels, value in metric_samples(text, "istio_tcp_connections_opened_total")
              if labels["reporter"] == "destination" and labels["source_principal"] == str(many)]  # fmt: skip
    by_workload = {labels["source_workload"]: value for labels, value in opened}
    expected = {name: 1.0 for name in names("zt")[:LABEL_SETS_PER_IDENTITY]}
    expected["unknown"] = float(NAMES - LABEL_SETS_PER_IDENTITY)
    assert by_workload == expected
    dropped = dict((labels["reason"], value) for labels, value in metric_samples(text, DROPPED))
    assert dropped.get(REASON_TOO_MANY_LABEL_SETS) == NAMES - LABEL_SETS_PER_IDENTITY


# -- the waypoint: labels from the upstream's answer ---------------------------------------------------------------


def custom_requests(waypoint: WaypointProcess, **labels: str) -> list[Sample]:
    return series(waypoint.scrape(), REQUESTS, destination_service=fqdn("custom"), **labels)


async def test_upstream_status_outside_http_is_a_protocol_error(
    pki: TestPki, topo: Topology, waypoint: WaypointProcess
) -> None:
    def odd_status(conn: h2.connection.H2Connection, sid: int) -> None:
        conn.send_headers(sid, [(":status", "7777"), ("content-type", "text/plain")], end_stream=True)

    async with custom_upstream(topo, pki, H2App(odd_status)):
        _, tunnel = await open_tunnel(pki, ident("status-h2"), waypoint.inbound, WAYPOINT_ID,
                                      topo.authority("custom"))  # fmt: skip
        client = H2Client(tunnel)
        sid = client.request("custom", "/odd", [], b"x")
        response = await asyncio.wait_for(client.next_event(sid), DEADLINE)
        assert isinstance(response, h2.events.ResponseReceived)
        assert dict(response.headers)[":status"] == "502"
        client.close()

    async def odd_status_h1(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 777 Odd\r\ncontent-length: 0\r\n\r\n")  # three digits, which h11 takes
        await reader.read()

    async with custom_upstream(topo, pki, odd_status_h1):
        _, tunnel = await open_tunnel(pki, ident("status-h1"), waypoint.inbound, WAYPOINT_ID,
                                      topo.authority("custom"))  # fmt: skip
        h1 = Http1Client(tunnel)
        resp = await h1.request("GET", "/odd", "custom")
        assert resp.status == 502, resp
        h1.close()

    def answered() -> list[Sample]:
        found = [s for s in custom_requests(waypoint)
                 if s.labels["source_principal"] in (str(ident("status-h2")), str(ident("status-h1")))]  # fmt: skip
        return found if sum(s.value for s in found) == 2 else []

    found = await eventually(answered, "both requests are counted")
    # The protocol error it is, as for any malformed answer: 502 with Envoy's UPE.
    assert {(s.labels["response_code"], s.labels["response_flags"]) for s in found} == {("502", "UPE")}
    codes = {s.labels["response_code"] for s in custom_requests(waypoint)}
    assert not codes & {"7777", "777"}, codes


async def test_upstream_grpc_status_outside_grpc_codes_is_unknown(
    pki: TestPki, topo: Topology, waypoint: WaypointProcess
) -> None:
    app = H2App()

    def odd_grpc(conn: h2.connection.H2Connection, sid: int) -> None:
        if app.requests[-1][":path"].endswith("/TrailersOnly"):
            conn.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc"),
                                    ("grpc-status", "999")], end_stream=True)  # fmt: skip
        else:
            conn.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
            conn.send_data(sid, MESSAGE)
            conn.send_headers(sid, [("grpc-status", "17")], end_stream=True)

    app.answer = odd_grpc
    caller = ident("grpc-odd")
    async with custom_upstream(topo, pki, app):
        _, tunnel = await open_tunnel(pki, caller, waypoint.inbound, WAYPOINT_ID, topo.authority("custom"))
        client = H2Client(tunnel)
        for path in ("/pkg.Odd/TrailersOnly", "/pkg.Odd/Trailers"):
            sid = client.request("custom", path, GRPC, MESSAGE)
            event = await asyncio.wait_for(client.next_event(sid), DEADLINE)
            while not isinstance(event, h2.events.StreamEnded):
                event = await asyncio.wait_for(client.next_event(sid), DEADLINE)
        client.close()

    def answered() -> list[Sample]:
        found = custom_requests(waypoint, request_protocol="grpc", source_principal=str(caller))
        return found if sum(s.value for s in found) == 2 else []

    found = await eventually(answered, "both calls are counted")
    assert {s.labels["grpc_response_status"] for s in found} == {"2"}  # UNKNOWN, as a gRPC client reads it
    statuses = {s.labels["grpc_response_status"] for s in custom_requests(waypoint)}
    assert not statuses & {"999", "17"}, statuses
