"""The waypoint's HTTP inside tunnels: HTTP/2 prior knowledge with gRPC trailers, a 100 MiB streamed upload
with bounded memory, pipelining, 100-continue, and a graceful drain on SIGTERM; and, without processes, what
its HTTP/1.1 side refuses and when it sends 100 Continue."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import h11
import pytest

from tests.support.http_clients import Http1Client, grpc_calls, open_tunnel
from tests.support.pki import TestPki
from tests.support.standins import FakeWriter, reader_with
from tests.support.waypoint_mesh import CLIENT_ID, WAYPOINT_ID, Endpoints, Topology, fqdn
from tests.support.waypoint_proc import WaypointProcess, series, total
from waypoint_py.h1_server import Http1Exchange, Http1Session

MiB = 1 << 20




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
        while "draining" not in proc.log():
            await asyncio.sleep(0.02)
        client.writer.write(client.conn.send(h11.Data(data=second)))
        client.writer.write(client.conn.send(h11.EndOfMessage()))
        resp = await client.read_response()
        assert resp.status == 200
        assert resp.body.decode() == f"{2 * MiB} {hashlib.sha256(first + second).hexdigest()}"
        assert resp.headers["connection"] == "close"
        assert await exit_status == 0
    finally:
        proc.stop()


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
