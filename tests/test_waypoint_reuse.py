"""Upstream connection reuse in the waypoint (Envoy-style per-endpoint pools): each request still picks its
own endpoint, then takes a kept-alive connection to it; a connection the upstream closed while idle costs
the client nothing; one the upstream asked to close (`connection: close`) is never used again."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import urllib.request
from collections import Counter

import pytest

from mesh.accesslog import format_text
from mesh.metrics import PeerLabels
from mesh.model import Service
from tests.support.daemons import metric_samples
from tests.support.http_clients import Http1Client, grpc_calls, open_tunnel
from tests.support.pki import TestPki
from tests.support.standins import FakeWriter, reader_with
from tests.support.waiting import eventually
from tests.support.waypoint_mesh import CLIENT_ID, WAYPOINT_ID, Endpoints, Topology, fqdn
from tests.support.waypoint_proc import WaypointProcess, total
from waypoint_py.errors import UpstreamClosed, UpstreamProtocolError
from waypoint_py.http_types import RequestHead, ResponseHead
from waypoint_py.telemetry import MESSAGE, RequestReport, RequestTelemetry
from waypoint_py.upstream_h1 import Http1Upstream

REQUESTS = "istio_requests_total"
ECHOES = ("echo-1", "echo-2", "echo-3")


async def client_for(pki: TestPki, wp: WaypointProcess, authority: str) -> Http1Client:
    _, tunnel = await open_tunnel(pki, CLIENT_ID, wp.inbound, WAYPOINT_ID, authority)
    return Http1Client(tunnel)


async def idle_upstreams(wp: WaypointProcess) -> int:
    url = f"http://{wp.admin[0]}:{wp.admin[1]}/config_dump"
    dump = await asyncio.to_thread(lambda: json.load(urllib.request.urlopen(url, timeout=10)))
    return int(dump["waypoint"]["upstream"]["idleHttp1"])


def echo_connects(endpoints: Endpoints) -> int:
    return sum(len(endpoints.ztunnels[name].connects) for name in ECHOES)


async def test_balanced_per_request_over_few_upstream_connections(
    pki: TestPki, topo: Topology, waypoint: WaypointProcess, endpoints: Endpoints
) -> None:
    seen: Counter[str] = Counter()
    for _ in range(2):  # two client connections, one after the other: the second finds the kept ones
        client = await client_for(pki, waypoint, topo.authority("echo"))
        for _ in range(90):
            resp = await client.request("GET", "/", "echo")
            assert resp.status == 200
            seen[resp.headers["x-endpoint"]] += 1
        client.close()
    assert set(seen) == set(ECHOES)
    for name, n in seen.items():
        assert 27 <= n <= 93, (name, seen)  # 60 expected: over 5 standard deviations (chance 4e-7)
    # Requests are sequential: one kept connection per endpoint serves them all (a little slack).
    connects = echo_connects(endpoints)
    assert 3 <= connects <= 4, connects
    assert sum(endpoints.apps[name].connections for name in ECHOES) == connects
    assert sum(endpoints.apps[name].requests for name in ECHOES) == 180


async def test_concurrent_requests_to_one_endpoint_get_their_own_connections(
    pki: TestPki, topo: Topology, waypoint: WaypointProcess, endpoints: Endpoints
) -> None:
    clients = [await client_for(pki, waypoint, topo.authority("echo")) for _ in range(4)]

    async def run(client: Http1Client) -> list[str]:
        return [(await client.request("GET", "/v2/c", "echo")).headers["x-endpoint"] for _ in range(20)]

    results = await asyncio.gather(*(run(c) for c in clients))
    assert all(name == "echo-v2" for seen in results for name in seen)
    # Never more connections than requests in flight at once; far fewer than the 80 requests.
    assert 1 <= len(endpoints.ztunnels["echo-v2"].connects) <= 4
    for c in clients:
        c.close()


async def test_upstream_closing_idle_connections_is_invisible(
    pki: TestPki, topo: Topology, waypoint: WaypointProcess, endpoints: Endpoints
) -> None:
    client = await client_for(pki, waypoint, topo.authority("echo"))
    seen: set[str] = set()
    while len(seen) < len(ECHOES):  # endpoints are drawn at random: until each has served one (and kept it)
        resp = await client.request("GET", "/", "echo")
        assert resp.status == 200
        seen.add(resp.headers["x-endpoint"])
    assert await idle_upstreams(waypoint) >= 3
    # The apps time out their idle keep-alive connections: the waypoint drops them as soon as it sees them end.
    assert sum(endpoints.apps[name].drop_idle() for name in ECHOES) >= 3

    async def none_idle() -> bool:
        return await idle_upstreams(waypoint) == 0

    await eventually(none_idle, "the waypoint to drop its idle upstream connections")
    for _ in range(12):
        assert (await client.request("GET", "/", "echo")).status == 200
    # The close that crosses the next request on the wire: the request meets a closed connection, is sent
    # again on a new one (once), and the client sees only the answer.
    for name in ECHOES:
        endpoints.apps[name].hang_up_after = 2
    body = b"p" * 5000
    for i in range(30):
        if i % 3:
            resp = await client.request("GET", "/", "echo")
            assert resp.status == 200, resp
        else:
            resp = await client.request("PUT", "/upload", "echo", body=body)
            assert (resp.status, resp.body.decode()) == (200, f"5000 {hashlib.sha256(body).hexdigest()}"), resp
    client.close()
    assert sum(endpoints.apps[name].hung_up for name in ECHOES) >= 5
    samples = waypoint.scrape()
    svc = fqdn("echo")
    assert total(samples, REQUESTS, destination_service=svc, response_code="503") == 0
    assert total(samples, REQUESTS, destination_service=svc, response_flags="UC") == 0


async def test_connection_close_answer_is_not_reused(
    pki: TestPki, topo: Topology, waypoint: WaypointProcess, endpoints: Endpoints
) -> None:
    app = endpoints.apps["echo-v2"]
    app.close_after = 1  # every answer says `connection: close`
    client = await client_for(pki, waypoint, topo.authority("echo"))
    for _ in range(5):
        assert (await client.request("GET", "/v2/close", "echo")).headers["x-endpoint"] == "echo-v2"
    assert app.connections == 5
    assert len(endpoints.ztunnels["echo-v2"].connects) == 5
    # Every second answer: a connection serves two requests, then a new one opens.
    app.close_after = 2
    for _ in range(6):
        assert (await client.request("GET", "/v2/close", "echo")).status == 200
    client.close()
    assert app.connections == 5 + 3
    assert app.requests == 11


async def test_grpc_calls_of_two_clients_share_one_upstream_http2_connection(
    pki: TestPki, topo: Topology, waypoint: WaypointProcess, endpoints: Endpoints
) -> None:
    for round_ in range(2):
        _, tunnel = await open_tunnel(pki, CLIENT_ID, waypoint.inbound, WAYPOINT_ID, topo.authority("grpc"))
        messages = [f"call {round_}.{i}".encode() for i in range(10)]
        results = await grpc_calls(tunnel, "grpc:50051", "/echo.Echo/Say", messages)
        assert [r.trailers["grpc-status"] for r in results] == ["0"] * 10
        assert [r.data[5:] for r in results] == messages
    assert len(endpoints.ztunnels["grpc"].connects) == 1
    assert endpoints.grpc.connections == 1


def test_access_line_is_format_text() -> None:
    """The access line the waypoint assembles from cached pieces is `format_text`'s, field for field."""
    import logging

    from mesh.accesslog import AccessLog

    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("test.waypoint.access")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(Capture())
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    telemetry = RequestTelemetry(registry, AccessLog("text", logger))
    svc = Service(name="echo", namespace="default", hostname="echo.default.svc.cluster.local")
    src = PeerLabels(workload="sleep", namespace="default", principal="spiffe://cluster.local/ns/default/sa/sleep")
    dst = PeerLabels(workload="echo", namespace="default")
    reports = [
        RequestReport(src, svc, "10.0.0.1:5555", "GET", "/a b", "echo:80", "HTTP/1.1", False, 0.0, dst,
                      route="default/echo", upstream="10.0.0.11:15008", attempts=1, response_code=200,
                      request_bytes=0, response_bytes=1024),
        RequestReport(PeerLabels(), None, "", "POST", '/q="x"', "", "HTTP/2", True, 0.0, grpc_status="14",
                      attempts=3, response_code=503, flags=["UF", "URX"], error="upstream connect error: nope"),
        RequestReport(src, svc, "10.0.0.1:5556", "GET", "/é\t", "échø", "HTTP/1.1", True, 0.0, dst,
                      grpc_status="", response_code=0, flags=["DC"]),
    ]  # fmt: skip
    stamp = re.compile(r"^\S+ ")
    for r in reports:
        for _ in range(2):  # built, then from the caches
            telemetry.record(r, 0.0123)
            fields = telemetry._fields(r, r.response_flags, 12.3)
            assert stamp.sub("", lines[-1]) == stamp.sub("", format_text(MESSAGE, fields))
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z info access request complete ", lines[-1])
    # grpc_response_status: empty for plain HTTP, the status for gRPC, `unknown` for gRPC without one.
    text = generate_latest(registry).decode()
    statuses = {(labels["request_protocol"], labels["grpc_response_status"])
                for labels, _ in metric_samples(text, "istio_requests_total")}  # fmt: skip
    assert statuses == {("http", ""), ("grpc", "14"), ("grpc", "unknown")}


# -- the pool on its own ---------------------------------------------------------------------------------------

POOL_CONFIG = """\
workloads:
- {uid: a, name: a, namespace: default, serviceAccount: s, workloadIps: ["10.0.0.11"], network: n1, protocol: HBONE,
   services: {"default/s.default.svc.cluster.local": {80: 8080}}}
- {uid: b, name: b, namespace: default, serviceAccount: s, workloadIps: ["10.0.0.12"], network: n1, protocol: HBONE,
   services: {"default/s.default.svc.cluster.local": {80: 8080}}}
services:
- {name: s, namespace: default, hostname: s.default.svc.cluster.local, vips: ["n1/10.1.0.1"], ports: {80: 8080}}
"""


class StubTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.protocol: asyncio.BaseProtocol | None = None
        self.closed = False
        self.written = bytearray()

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data


class StubDialer:
    """Opens an in-memory stream per call; the test plays the upstream by feeding its reader."""

    def __init__(self) -> None:
        self.streams: list[tuple[StubTransport, object]] = []

    async def open(self, hop: object, baggage: str, forwarded_for: str) -> object:
        from waypoint_py.streams import open_streams
        from waypoint_py.upstream_dial import UpstreamStream

        transport = StubTransport()
        reader, writer = open_streams(transport)
        up = UpstreamStream(reader, writer, hop, PeerLabels(workload=f"w{len(self.streams)}"), "addr")  # type: ignore[arg-type]
        self.streams.append((transport, reader))
        return up


async def _one_exchange(pool: object, dialer: StubDialer, hop: object, state: object,
                        answer: bytes = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n") -> object:  # fmt: skip
    lease = await pool.lease(hop, "HTTP/1.1", "bag", "client", state)  # type: ignore[attr-defined]
    await _exchange(lease, dialer, answer)
    lease.release(True)
    return lease


async def _exchange(lease: object, dialer: StubDialer,
                    answer: bytes = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n") -> None:  # fmt: skip
    """One complete request and response on a leased connection, the test playing the upstream."""
    from waypoint_py.http_types import RequestHead

    await lease.client.send_head(RequestHead("GET", "/", "s", [], False), end=True)  # type: ignore[attr-defined]
    reader = next(r for t, r in dialer.streams if t.protocol is lease.up.writer.transport.get_protocol())  # type: ignore[attr-defined]
    reader.feed_data(answer)  # type: ignore[attr-defined]
    await lease.client.response_head()  # type: ignore[attr-defined]
    while await lease.client.read_body() is not None:  # type: ignore[attr-defined]
        pass


async def test_pool_keeps_per_endpoint_and_drops_what_leaves_the_state() -> None:
    from mesh.config import parse_config
    from mesh.routing import Router
    from mesh.state import MeshState
    from waypoint_py.upstream_pool import MAX_IDLE_PER_ENDPOINT, UpstreamPool

    state = MeshState(parse_config(POOL_CONFIG, "pool.yaml"))
    service = state.service_by_hostname("s.default.svc.cluster.local")
    router = Router(state, "n1")
    hop_a = router.to_endpoint(state.workload_by_uid("a"), 8080, service, 80)  # type: ignore[arg-type]
    hop_b = router.to_endpoint(state.workload_by_uid("b"), 8080, service, 80)  # type: ignore[arg-type]
    dialer = StubDialer()
    pool = UpstreamPool(dialer)  # type: ignore[arg-type]
    first = await _one_exchange(pool, dialer, hop_a, state)
    again = await _one_exchange(pool, dialer, hop_a, state)
    assert again is first and len(dialer.streams) == 1  # kept and reused; its labels are the first's
    assert again.destination == PeerLabels(workload="w0")  # type: ignore[attr-defined]
    await _one_exchange(pool, dialer, hop_b, state)
    assert len(dialer.streams) == 2 and pool.idle_count() == 2
    # `connection: close` from the upstream: closed, not kept.
    close = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
    await _one_exchange(pool, dialer, hop_b, state, close)
    assert pool.idle_count() == 1 and dialer.streams[1][0].closed
    # The upstream ends an idle stream: it leaves the pool at once.
    dialer.streams[0][0].get_protocol().eof_received()  # type: ignore[attr-defined]
    assert pool.idle_count() == 0
    # Bounded per endpoint.
    leases = [await pool.lease(hop_a, "HTTP/1.1", "bag", "client", state) for _ in range(MAX_IDLE_PER_ENDPOINT + 3)]
    for lease in leases:
        await _exchange(lease, dialer)
    for lease in leases:
        lease.release(True)
    assert pool.idle_count() == MAX_IDLE_PER_ENDPOINT
    # A new state without endpoint `a`: its connections go when the next request comes.
    without_a = POOL_CONFIG.replace("- {uid: a,", "- {uid: gone,").replace("10.0.0.11", "10.0.0.99")
    smaller = MeshState(parse_config(without_a, "pool.yaml"))
    lease = await pool.lease(hop_b, "HTTP/1.1", "bag", "client", smaller)
    assert pool.idle_count() == 0
    lease.release(False)
    pool.close()


# -- one upstream HTTP/1.1 stream: when it can carry the next request --------------------------------------------


def _request(method: str = "GET") -> RequestHead:
    return RequestHead(method, "/p?q=1", "svc:80", [(b"x-a", b"1")], False)


async def _upstream_exchange(
    raw: bytes, method: str = "GET", eof: bool = True
) -> tuple[Http1Upstream, ResponseHead, bytes]:
    up = Http1Upstream(reader_with(raw, eof), FakeWriter())  # type: ignore[arg-type]
    await up.send_head(_request(method), end=True)
    head = await up.response_head()
    body = b""
    while (chunk := await up.read_body()) is not None:
        body += chunk
    return up, head, body


@pytest.mark.parametrize(
    ("raw", "method", "body", "trailers", "reusable"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", "GET", b"abc", None, True),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nz", "GET", b"z", None, True),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nGrpc-Status: 0\r\n\r\n",
            "GET",
            b"abc",
            [(b"grpc-status", b"0")],
            True,
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", "HEAD", b"", None, True),
        (b"HTTP/1.1 204 No Content\r\n\r\n", "GET", b"", None, True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nz", "GET", b"z", None, False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nz", "GET", b"z", None, False),
        (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", "GET", b"until the end", None, False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nzEXTRA", "GET", b"z", None, False),
    ],
)
async def test_upstream_stream_is_kept_only_after_a_clean_exchange(
    raw: bytes, method: str, body: bytes, trailers: object, reusable: bool
) -> None:
    up, head, got = await _upstream_exchange(raw, method, eof=not reusable)
    assert head.status in (200, 204)
    assert (got, up.trailers, up.reusable()) == (body, trailers, reusable)


async def test_upstream_chunked_with_content_length_drops_it_and_the_stream() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nz\r\n0\r\n\r\n"
    up, head, body = await _upstream_exchange(raw, eof=False)
    assert body == b"z" and not [h for h in head.headers if h[0] == b"content-length"]
    assert not up.reusable()


async def test_upstream_keep_alive_carries_the_next_exchange() -> None:
    reader = reader_with(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na", eof=False)
    writer = FakeWriter()
    up = Http1Upstream(reader, writer)  # type: ignore[arg-type]
    for expected in (b"a", b"b"):
        await up.send_head(_request(), end=True)
        await up.response_head()
        assert await up.read_body() == expected and await up.read_body() is None
        assert up.reusable() and not up.nothing_received
        up.next_cycle()
        assert up.nothing_received
        reader.feed_data(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb")
    assert bytes(writer.data) == b"GET /p?q=1 HTTP/1.1\r\nhost: svc:80\r\nx-a: 1\r\n\r\n" * 2  # no `connection: close`


@pytest.mark.parametrize(
    ("raw", "error", "nothing"),
    [
        # Closed (UC, not UR): a kept stream the upstream had closed, where the request may go again; a body cut.
        (b"", UpstreamClosed, True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", UpstreamClosed, False),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab", UpstreamClosed, False),
        (b"HTTX/1.1 200 OK\r\n\r\n", UpstreamProtocolError, False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", UpstreamProtocolError, False),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", UpstreamProtocolError, False),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", UpstreamProtocolError, False),
        (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000, UpstreamProtocolError, False),
        (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000 + b"\r\n\r\n", UpstreamProtocolError, False),
    ],
)
async def test_upstream_failures(raw: bytes, error: type[Exception], nothing: bool) -> None:
    up = Http1Upstream(reader_with(raw), FakeWriter())  # type: ignore[arg-type]
    await up.send_head(_request(), end=True)
    with pytest.raises(error) as info:
        await up.response_head()
        while await up.read_body() is not None:
            pass
    assert type(info.value) is error
    assert up.nothing_received is nothing
    assert not up.reusable()


async def test_upstream_abort_ends_the_wait_and_the_stream() -> None:
    """What the forwarder does when the client gives up: the wait for the response ends at once, and the stream
    closes for good."""
    writer = FakeWriter()
    up = Http1Upstream(reader_with(b"", eof=False), writer)  # type: ignore[arg-type]
    await up.send_head(_request(), end=True)
    waiting = asyncio.create_task(up.response_head())
    up.abort()
    with pytest.raises(UpstreamClosed):
        await waiting
    assert writer.closed and not up.reusable()
