"""The waypoint's HTTP inside tunnels: HTTP/2 prior knowledge with gRPC trailers, a 100 MiB streamed upload
with bounded memory, pipelining, 100-continue, and a graceful drain on SIGTERM; gRPC answers the way gRPC
clients need them, a client that gives up taking its upstream request with it, and a malformed body; and,
without processes, what its HTTP/1.1 side refuses and when it sends 100 Continue."""

from __future__ import annotations

import asyncio
import hashlib
import struct
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h11
import pytest
from h2.errors import ErrorCodes

from hbone.h2fast import PlainEncoder
from tests.support.http_clients import H2Client, Http1Client, grpc_calls, open_tunnel
from tests.support.pki import TestPki
from tests.support.standins import FakeWriter, H2App, reader_with
from tests.support.waiting import eventually
from tests.support.waypoint_mesh import CLIENT_ID, WAYPOINT_ID, Endpoints, Topology, custom_upstream, fqdn
from tests.support.waypoint_proc import WaypointProcess, series, total
from waypoint_py.h1_server import Http1Exchange, Http1Session

MiB = 1 << 20
REQUESTS = "istio_requests_total"
GRPC = [("content-type", "application/grpc"), ("te", "trailers")]
MESSAGE = b"\x00\x00\x00\x00\x02hi"  # one length-prefixed gRPC message
DEADLINE = 10.0  # for what the test waits on, never a measure of anything


def requests_of(waypoint: WaypointProcess, service: str, **labels: str) -> float:
    return total(waypoint.scrape(), REQUESTS, destination_service=fqdn(service), **labels)


async def test_grpc_over_http2_with_trailers(pki: TestPki, topo: Topology, waypoint: WaypointProcess,
                                             endpoints: Endpoints) -> None:  # fmt: skip
    _, tunnel = await open_tunnel(pki, CLIENT_ID, waypoint.inbound, WAYPOINT_ID, topo.authority("grpc"))
    messages = [f"hello {i}".encode() * (i + 1) for i in range(5)]
    # Five calls at once on one HTTP/2 connection: each is its own request upstream, a stream of one shared
    # upstream HTTP/2 connection to the endpoint.
    results = await grpc_calls(tunnel, "grpc:50051", "/echo.Echo/Say", messages)
    for message, result in zip(messages, results, strict=True):
        assert result.headers[":status"] == "200"
        assert result.data == b"\x00" + len(message).to_bytes(4, "big") + message
        assert result.trailers == {"grpc-status": "0", "grpc-message": "done"}
    seen = endpoints.grpc.seen_headers[-1]
    assert seen["te"] == "trailers" and seen[":path"] == "/echo.Echo/Say"
    assert len(endpoints.ztunnels["grpc"].connects) == 1
    assert endpoints.grpc.connections == 1
    samples = waypoint.scrape()
    assert total(samples, "istio_requests_total", destination_service=fqdn("grpc"), request_protocol="grpc",
                 grpc_response_status="0", response_code="200", destination_workload="grpc") == 5  # fmt: skip


async def test_100_mib_upload_streams_with_bounded_memory(pki: TestPki, topo: Topology, waypoint: WaypointProcess,
                                                          endpoints: Endpoints) -> None:  # fmt: skip
    _, tunnel = await open_tunnel(pki, CLIENT_ID, waypoint.inbound, WAYPOINT_ID, topo.authority("echo"))
    client = Http1Client(tunnel)
    assert (await client.request("GET", "/warm-up", "echo")).status == 200
    before = waypoint.rss_kib()
    resp, digest = await client.upload("/upload", "echo", 100 * MiB, seed=7)
    peak = waypoint.rss_kib("VmHWM")
    assert resp.status == 200
    assert resp.body.decode() == f"{100 * MiB} {digest}"
    growth = peak - before
    assert growth < 40 * 1024, f"waypoint RSS grew by {growth} KiB during a 100 MiB upload"
    client.close()
    samples = waypoint.scrape()
    (s,) = series(samples, "istio_request_bytes_sum", destination_service=fqdn("echo"), request_protocol="http")
    assert s.value >= 100 * MiB


async def test_pipelined_requests_answer_in_order(pki: TestPki, topo: Topology, waypoint: WaypointProcess,
                                                  endpoints: Endpoints) -> None:  # fmt: skip
    _, tunnel = await open_tunnel(pki, CLIENT_ID, waypoint.inbound, WAYPOINT_ID, topo.authority("echo"))
    client = Http1Client(tunnel)
    paths = ["/v2/a", "/b", "/v2/c", "/d"]
    for path in paths:
        client.writer.write(client.conn.send(h11.Request(method="GET", target=path, headers=[("host", "echo")])))
        client.writer.write(client.conn.send(h11.EndOfMessage()))
        if path != paths[-1]:
            # h11 models one request at a time; the bytes are on the wire already.
            client.conn = h11.Connection(h11.CLIENT)
    await client.writer.drain()
    client.conn = h11.Connection(h11.CLIENT)
    answers = []
    for path in paths:
        client.conn.send(h11.Request(method="GET", target=path, headers=[("host", "echo")]))
        client.conn.send(h11.EndOfMessage())
        resp = await client.read_response()
        answers.append(resp.headers["x-endpoint"] == "echo-v2")
    assert answers == [True, False, True, False]
    client.close()


async def test_expect_100_continue_and_chunked_body(pki: TestPki, topo: Topology, waypoint: WaypointProcess,
                                                    endpoints: Endpoints) -> None:  # fmt: skip
    _, tunnel = await open_tunnel(pki, CLIENT_ID, waypoint.inbound, WAYPOINT_ID, topo.authority("echo"))
    client = Http1Client(tunnel)
    resp, digest = await client.upload("/upload", "echo", 3 * MiB + 17, seed=3, expect_continue=True)
    assert resp.status == 200 and resp.body.decode() == f"{3 * MiB + 17} {digest}"
    # The connection is kept alive after a chunked upload.
    resp = await client.request("POST", "/upload", "echo", body=b"abc")
    assert resp.body.decode() == f"3 {hashlib.sha256(b'abc').hexdigest()}"
    client.close()


async def test_sigterm_lets_the_request_in_flight_finish(pki: TestPki, topo: Topology, tmp_path: Path,
                                                         endpoints: Endpoints) -> None:  # fmt: skip
    proc = topo.start_waypoint(pki, tmp_path, baggage=False)
    try:
        _, tunnel = await open_tunnel(pki, CLIENT_ID, proc.inbound, WAYPOINT_ID, topo.authority("echo"))
        client = Http1Client(tunnel)
        headers = [("host", "echo"), ("content-length", str(2 * MiB))]
        client.writer.write(client.conn.send(h11.Request(method="POST", target="/upload", headers=headers)))
        first, second = b"a" * MiB, b"b" * MiB
        client.writer.write(client.conn.send(h11.Data(data=first)))
        await client.writer.drain()
        await asyncio.sleep(0)  # let the first half reach the waypoint's loop
        exit_status = asyncio.create_task(asyncio.to_thread(proc.terminate))
        await eventually(lambda: "draining" in proc.log(), "the waypoint starts draining")
        client.writer.write(client.conn.send(h11.Data(data=second)))
        client.writer.write(client.conn.send(h11.EndOfMessage()))
        resp = await client.read_response()
        assert resp.status == 200
        assert resp.body.decode() == f"{2 * MiB} {hashlib.sha256(first + second).hexdigest()}"
        assert resp.headers["connection"] == "close"
        assert await exit_status == 0
    finally:
        proc.stop()


async def test_grpc_trailers_only_answer_is_one_headers_frame(pki: TestPki, topo: Topology,
                                                             waypoint: WaypointProcess) -> None:  # fmt: skip
    def not_found(conn: h2.connection.H2Connection, sid: int) -> None:
        conn.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "5"),
                                ("grpc-message", "no such thing")], end_stream=True)  # fmt: skip

    async with custom_upstream(topo, pki, H2App(not_found)):
        _, tunnel = await open_tunnel(pki, CLIENT_ID, waypoint.inbound, WAYPOINT_ID, topo.authority("custom"))
        client = H2Client(tunnel)
        sid = client.request("custom", "/pkg.Things/Get", GRPC, MESSAGE)
        response = await asyncio.wait_for(client.next_event(sid), DEADLINE)
        assert isinstance(response, h2.events.ResponseReceived)
        assert dict(response.headers)["grpc-status"] == "5"
        # END_STREAM on the HEADERS frame itself: gRPC clients read HEADERS followed by an empty DATA that ends
        # the stream as "server closed the stream without sending trailers" (INTERNAL), not as the status.
        assert response.stream_ended is not None
        client.close()
    await eventually(lambda: requests_of(waypoint, "custom", request_protocol="grpc", response_code="200",
                                         response_flags="-", grpc_response_status="5") == 1,
                     "the call is counted")  # fmt: skip


async def test_grpc_answer_without_grpc_status_counts_as_unknown(pki: TestPki, topo: Topology,
                                                                 waypoint: WaypointProcess) -> None:  # fmt: skip
    def broken(conn: h2.connection.H2Connection, sid: int) -> None:
        conn.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
        conn.send_data(sid, MESSAGE)
        conn.reset_stream(sid, ErrorCodes.INTERNAL_ERROR)  # and never a grpc-status

    async with custom_upstream(topo, pki, H2App(broken)):
        _, tunnel = await open_tunnel(pki, CLIENT_ID, waypoint.inbound, WAYPOINT_ID, topo.authority("custom"))
        client = H2Client(tunnel)
        sid = client.request("custom", "/pkg.Things/Broken", GRPC, MESSAGE)
        event = await asyncio.wait_for(client.next_event(sid), DEADLINE)
        while not isinstance(event, h2.events.StreamReset):
            event = await asyncio.wait_for(client.next_event(sid), DEADLINE)
        client.close()
    # HTTP 200 without grpc-status is UNKNOWN (2), as Envoy maps it; not OK (0).
    await eventually(lambda: requests_of(waypoint, "custom", request_protocol="grpc", response_code="200",
                                         response_flags="UR", grpc_response_status="2") == 1,
                     "the call is counted with grpc_response_status 2")  # fmt: skip


async def test_http2_upstream_connection_closed_is_503_uc(pki: TestPki, topo: Topology,
                                                          waypoint: WaypointProcess) -> None:  # fmt: skip
    async def hangs_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        while data := await reader.read(1 << 16):
            if any(isinstance(e, h2.events.RequestReceived) for e in conn.receive_data(data)):
                return  # the connection closes under the request

    async with custom_upstream(topo, pki, hangs_up):
        _, tunnel = await open_tunnel(pki, CLIENT_ID, waypoint.inbound, WAYPOINT_ID, topo.authority("custom"))
        client = H2Client(tunnel)
        sid = client.request("custom", "/pkg.Things/Gone", GRPC, MESSAGE)
        response = await asyncio.wait_for(client.next_event(sid), DEADLINE)
        assert isinstance(response, h2.events.ResponseReceived) and dict(response.headers)[":status"] == "503"
        client.close()
    # The whole connection ended: Envoy's "upstream connection termination" (UC); UR is a stream reset.
    await eventually(lambda: requests_of(waypoint, "custom", request_protocol="grpc", response_code="503",
                                         response_flags="UC") == 1, "the call is counted")  # fmt: skip


async def test_http2_header_strings_go_upstream_as_they_are(pki: TestPki, topo: Topology,
                                                            waypoint: WaypointProcess) -> None:  # fmt: skip
    """A 60,000-byte header value goes upstream as a plain literal, about as long as it is, not Huffman-coded
    (some 37,500 bytes for these letters): hpack's Huffman coder is pure Python and quadratic in a string's
    length, so a client sending such values could keep the waypoint's CPU busy for 0.25 s per request."""
    received: list[int] = []

    async def measures(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.local_settings.max_header_list_size = 1 << 20
        total = 0
        while data := await reader.read(1 << 16):
            total += len(data)
            if any(isinstance(e, h2.events.RequestReceived) for e in conn.receive_data(data)):
                received.append(total)
                return

    big = "a" * 60_000
    async with custom_upstream(topo, pki, measures):
        _, tunnel = await open_tunnel(pki, CLIENT_ID, waypoint.inbound, WAYPOINT_ID, topo.authority("custom"))
        client = H2Client(tunnel)
        client.conn.encoder = PlainEncoder()
        client.request("custom", "/pkg.Things/Big", [*GRPC, ("x-big", big)], MESSAGE)
        await eventually(lambda: received, "the request reaches the upstream")
        client.close()
    assert received[0] > len(big)


async def test_http2_expect_100_continue(pki: TestPki, topo: Topology, waypoint: WaypointProcess,
                                         endpoints: Endpoints) -> None:  # fmt: skip
    _, tunnel = await open_tunnel(pki, CLIENT_ID, waypoint.inbound, WAYPOINT_ID, topo.authority("grpc"))
    client = H2Client(tunnel)
    sid = client.request("grpc:50051", "/echo.Echo/Say", [*GRPC, ("expect", "100-continue")])
    # The client holds its body back until it is told to go on.
    informational = await asyncio.wait_for(client.next_event(sid), DEADLINE)
    assert isinstance(informational, h2.events.InformationalResponseReceived)
    assert dict(informational.headers)[":status"] == "100"
    client.send_body(sid, MESSAGE)
    response = await asyncio.wait_for(client.next_event(sid), DEADLINE)
    assert isinstance(response, h2.events.ResponseReceived) and dict(response.headers)[":status"] == "200"
    data = await asyncio.wait_for(client.next_event(sid), DEADLINE)
    assert isinstance(data, h2.events.DataReceived) and data.data == MESSAGE
    trailers = await asyncio.wait_for(client.next_event(sid), DEADLINE)
    assert isinstance(trailers, h2.events.TrailersReceived) and dict(trailers.headers)["grpc-status"] == "0"
    client.close()
    assert "expect" not in endpoints.grpc.seen_headers[-1]  # answered here, not forwarded


async def test_http2_client_reset_cancels_the_upstream_stream(pki: TestPki, topo: Topology,
                                                              waypoint: WaypointProcess) -> None:  # fmt: skip
    app = H2App(answer=None)  # never answers
    async with custom_upstream(topo, pki, app):
        _, tunnel = await open_tunnel(pki, CLIENT_ID, waypoint.inbound, WAYPOINT_ID, topo.authority("custom"))
        client = H2Client(tunnel)
        sid = client.request("custom", "/pkg.Things/Wait", GRPC, MESSAGE)
        await eventually(lambda: len(app.requests) == 1, "the call reaches the upstream")
        client.reset(sid)  # a gRPC client past its deadline
        await eventually(lambda: app.resets == [ErrorCodes.CANCEL], "the upstream stream is reset (CANCEL)")
        client.close()
    # Reported as the client's disconnect, with no response.
    await eventually(lambda: requests_of(waypoint, "custom", request_protocol="grpc", response_code="0",
                                         response_flags="DC", grpc_response_status="unknown") == 1,
                     "the cancelled call is counted")  # fmt: skip


async def test_http2_oversized_frame_is_refused_at_its_header(pki: TestPki, topo: Topology,
                                                              waypoint: WaypointProcess) -> None:  # fmt: skip
    """A client's frame header announcing 1 MiB, over the waypoint's MAX_FRAME_SIZE (HTTP/2's default 16 KiB):
    GOAWAY FRAME_SIZE_ERROR as soon as the header is in, not once a body the client may never send is kept."""
    _, tunnel = await open_tunnel(pki, CLIENT_ID, waypoint.inbound, WAYPOINT_ID, topo.authority("echo"))
    client = H2Client(tunnel)
    sid = client.request("echo", "/upload")  # an open stream, its body to come
    length = 1 * MiB
    client.writer.write(struct.pack("!HBBBL", length >> 8, length & 0xFF, 0x0, 0, sid) + bytes(1000))
    ended: list[h2.events.ConnectionTerminated] = []

    async def until_goaway() -> None:
        while not ended:
            data = await client.reader.read(1 << 16)
            assert data, "the connection closed without GOAWAY"
            ended.extend(e for e in client.conn.receive_data(data) if isinstance(e, h2.events.ConnectionTerminated))

    await asyncio.wait_for(until_goaway(), DEADLINE)
    assert ended[0].error_code == ErrorCodes.FRAME_SIZE_ERROR
    client.close()


async def test_http1_client_close_cancels_the_upstream_request(pki: TestPki, topo: Topology,
                                                               waypoint: WaypointProcess) -> None:  # fmt: skip
    seen: list[bytes] = []

    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        while await reader.read(1 << 16):
            pass
        seen.append(b"")  # the waypoint ended the upstream connection

    async with custom_upstream(topo, pki, never_answers):
        _, tunnel = await open_tunnel(pki, CLIENT_ID, waypoint.inbound, WAYPOINT_ID, topo.authority("custom"))
        client = Http1Client(tunnel)
        client.writer.write(b"GET /wait HTTP/1.1\r\nHost: custom\r\n\r\n")
        await eventually(lambda: len(seen) == 1, "the request reaches the upstream")
        client.close()  # the client gives up
        await eventually(lambda: len(seen) == 2, "the upstream connection is closed")
    await eventually(lambda: requests_of(waypoint, "custom", request_protocol="http", response_code="0",
                                         response_flags="DC") == 1, "the abandoned request is counted")  # fmt: skip


async def test_malformed_request_body_is_400_and_closes(pki: TestPki, topo: Topology, waypoint: WaypointProcess,
                                                        endpoints: Endpoints) -> None:  # fmt: skip
    _, tunnel = await open_tunnel(pki, CLIENT_ID, waypoint.inbound, WAYPOINT_ID, topo.authority("echo"))
    client = Http1Client(tunnel)
    client.writer.write(b"POST /upload HTTP/1.1\r\nHost: echo\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"zz\r\nhello\r\n0\r\n\r\n")  # fmt: skip
    reply = await asyncio.wait_for(client.reader.read(), DEADLINE)  # everything until the waypoint closes
    head = reply.partition(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 400 ") and b"\r\nconnection: close" in head, reply
    await eventually(lambda: requests_of(waypoint, "echo", response_code="400", response_flags="DPE") == 1,
                     "the request is counted as 400 DPE")  # fmt: skip


# -- the HTTP/1.1 side on its own ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        # h11 would read this one by its Transfer-Encoding; we refuse it (no room for request smuggling).
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 4\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nBad Header\r\n\r\n", 400),
        (b"\x16\x03\x01\x00", 400),  # a TLS ClientHello
        # Too big, whether the head arrives whole in one read or is still incomplete at 64 KiB.
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"y" * 70000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"y" * 70000, 431),
    ],
)
async def test_malformed_http1_requests_are_refused(raw: bytes, status: int) -> None:
    writer = FakeWriter()
    seen: list[Http1Exchange] = []
    bad: list[int] = []

    async def handle(ex: Http1Exchange) -> None:
        seen.append(ex)

    session = Http1Session(reader_with(raw), writer, b"", handle, lambda s, _: bad.append(s))  # type: ignore[arg-type]
    await asyncio.wait_for(session.run(), 5)
    assert not seen and bad == [status]
    assert bytes(writer.data).startswith(b"HTTP/1.1 %d " % status) and writer.closed


async def test_100_continue_is_sent_when_the_body_is_asked_for() -> None:
    writer = FakeWriter()
    reader = reader_with(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n", eof=False)
    got: list[bytes | None] = []

    async def handle(ex: Http1Exchange) -> None:
        assert writer.data == b""  # nothing yet: the upstream is not connected
        reader.feed_data(b"ok")
        got.append(await ex.read_body())
        await ex.send_error(503, "no")
        reader.feed_eof()

    await Http1Session(reader, writer, b"", handle, lambda s, w: None).run()  # type: ignore[arg-type]
    assert got == [b"ok"]
    assert bytes(writer.data).startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 ")
