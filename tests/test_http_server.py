"""The stats/readiness/admin HTTP server over real sockets: routes, status codes, limits, bad clients."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator

import pytest

from mesh.http_server import (
    MAX_REQUEST_BYTES,
    Readiness,
    Request,
    Response,
    admin_routes,
    readiness_routes,
    serve_http,
)


async def start(routes: dict) -> tuple[asyncio.Server, int]:
    server = await serve_http("127.0.0.1", 0, routes, name="test")
    return server, server.sockets[0].getsockname()[1]


@pytest.fixture
async def servers() -> AsyncIterator[list[asyncio.Server]]:
    started: list[asyncio.Server] = []
    yield started
    for server in started:
        server.close()
        await server.wait_closed()


Reply = tuple[int, str, dict[str, str]]  # status, body, headers with lower-case names


async def fetch(port: int, path: str, method: str = "GET", body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Reply:  # fmt: skip
    """One request through urllib, in a thread because the server runs on this test's event loop."""

    def call() -> Reply:
        req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method,
                                     headers=headers or {})  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, resp.read().decode(), {k.lower(): v for k, v in resp.headers.items()}
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(), {k.lower(): v for k, v in e.headers.items()}

    return await asyncio.to_thread(call)


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Send bytes, read until the server closes; the server must close on its own for this to return."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    received = await asyncio.wait_for(reader.read(-1), 5)
    writer.close()
    return received


@pytest.fixture
def root_level() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in ("", "hpack", "h2")]
    levels = [logger.level for logger in loggers]
    yield
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


async def test_readiness(servers: list[asyncio.Server]) -> None:
    readiness = Readiness({"state", "certificates"})
    server, port = await start(readiness_routes(readiness))
    servers.append(server)

    status, body, headers = await fetch(port, "/healthz/ready")
    assert (status, body) == (500, "not ready, pending: certificates, state\n")
    assert headers["content-type"] == "text/plain; charset=utf-8"
    readiness.mark_ready("certificates")
    assert (await fetch(port, "/healthz/ready"))[:2] == (500, "not ready, pending: state\n")
    readiness.mark_ready("state")
    assert (await fetch(port, "/healthz/ready"))[:2] == (200, "ready\n")
    assert readiness.is_ready

    status, _, headers = await fetch(port, "/healthz/ready", method="POST", body=b"")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    assert (await fetch(port, "/healthz/live"))[0] == 404
    assert (await fetch(port, "/"))[0] == 404


async def test_admin_config_dump_quit_and_logging(servers: list[asyncio.Server], root_level: None) -> None:
    quits: list[bool] = []
    state = {"workloads": [{"name": "curl", "ips": {"10.0.0.1"}}], "version": 3}
    root = logging.getLogger()
    root.setLevel(logging.INFO)  # the level `reset` goes back to
    server, port = await start(admin_routes(lambda: state, lambda: quits.append(True)))
    servers.append(server)

    status, body, headers = await fetch(port, "/config_dump")
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body) == {"workloads": [{"name": "curl", "ips": ["10.0.0.1"]}], "version": 3}

    assert (await fetch(port, "/quitquitquit"))[0] == 405
    assert quits == []
    assert (await fetch(port, "/quitquitquit", method="POST", body=b""))[0] == 200
    assert quits == [True]

    assert (await fetch(port, "/logging"))[:2] == (200, "current log level is info\n")
    assert (await fetch(port, "/logging?level=debug", method="POST", body=b""))[:2] == (
        200, "current log level is debug\n")
    assert root.level == logging.DEBUG
    # The HTTP/2 libraries never log at debug: hpack would write every decoded header, secrets included.
    assert not any(logging.getLogger(name).isEnabledFor(logging.DEBUG) for name in ("hpack", "h2"))
    status, body, _ = await fetch(port, "/logging?level=loud", method="POST", body=b"")
    assert status == 400 and "loud" in body
    assert root.level == logging.DEBUG
    await fetch(port, "/logging?level=error", method="POST", body=b"")
    assert not logging.getLogger("hpack").isEnabledFor(logging.WARNING)  # and they follow a stricter level
    await fetch(port, "/logging?level=reset", method="POST", body=b"")
    assert root.level == logging.INFO
    assert (await fetch(port, "/logging", method="DELETE"))[0] == 405
    assert (await fetch(port, "/debug/pprof/heap"))[0] == 404


async def test_admin_takes_no_browser_requests(servers: list[asyncio.Server]) -> None:
    # A page in a browser on this machine can reach localhost: a form POST carries an Origin, and after DNS
    # rebinding its Host is the attacker's name. Neither may stop the daemon or read its state.
    quits: list[bool] = []
    server, port = await start(admin_routes(lambda: {"secret": "state"}, lambda: quits.append(True)))
    servers.append(server)
    form = {"Origin": "http://attacker.example", "Content-Type": "application/x-www-form-urlencoded"}
    assert (await fetch(port, "/quitquitquit", method="POST", body=b"", headers=form))[0] == 403
    status, body, _ = await fetch(port, "/config_dump", headers={"Host": "attacker.example:15000"})
    assert status == 403 and "secret" not in body
    assert (await fetch(port, "/logging?level=debug", method="POST", body=b"",
                        headers={"Host": "rebound.example"}))[0] == 403  # fmt: skip
    assert quits == []
    # An operator's curl names an address.
    for host in ("127.0.0.1:15000", "localhost:15000", "[::1]:15000", "localhost"):
        assert (await fetch(port, "/config_dump", headers={"Host": host}))[0] == 200, host


async def test_handler_errors_and_async_handlers(servers: list[asyncio.Server]) -> None:
    async def slow(request: Request) -> Response:
        await asyncio.sleep(0)
        return Response.text(200, f"hello {request.param('name')} {len(request.body)}\n")

    def broken(_: Request) -> Response:
        raise RuntimeError("boom")

    server, port = await start({"/hello": {"POST": slow}, "/broken": {"GET": broken}})
    servers.append(server)
    assert (await fetch(port, "/hello?name=mesh", method="POST", body=b"abc"))[:2] == (200, "hello mesh 3\n")
    assert (await fetch(port, "/broken"))[:2] == (500, "internal error\n")
    # The server is still fine afterwards.
    assert (await fetch(port, "/hello", method="POST", body=b""))[0] == 200


async def test_keep_alive_serves_several_requests_on_one_connection(servers: list[asyncio.Server]) -> None:
    server, port = await start(readiness_routes(Readiness()))
    servers.append(server)

    def three_requests() -> list[tuple[int, bytes]]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        results = []
        for _ in range(3):
            conn.request("GET", "/healthz/ready")
            resp = conn.getresponse()
            results.append((resp.status, resp.read()))
        sock = conn.sock
        conn.close()
        assert sock is not None
        return results

    assert await asyncio.to_thread(three_requests) == [(200, b"ready\n")] * 3

    # Pipelined in one write, answered in order on the same connection.
    both = (b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = await raw_exchange(port, both)
    assert answer.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 404 " in answer


async def test_oversized_requests_get_413(servers: list[asyncio.Server]) -> None:
    seen: list[int] = []

    def sink(request: Request) -> Response:
        seen.append(len(request.body))
        return Response.text(200, "ok\n")

    server, port = await start({"/sink": {"POST": sink}})
    servers.append(server)

    assert (await fetch(port, "/sink", method="POST", body=b"x" * MAX_REQUEST_BYTES))[0] == 200
    status, _, headers = await fetch(port, "/sink", method="POST", body=b"x" * (MAX_REQUEST_BYTES + 1))
    assert status == 413 and headers["connection"] == "close"

    # A chunked body has no length up front; it is cut off once it passes the bound.
    chunk = b"x" * 16384
    chunked = b"POST /sink HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunked += (b"4000\r\n" + chunk + b"\r\n") * 5 + b"0\r\n\r\n"
    assert (await raw_exchange(port, chunked)).startswith(b"HTTP/1.1 413 ")

    # Headers alone over the bound.
    huge = b"GET /sink HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_REQUEST_BYTES + 10) + b"\r\n\r\n"
    assert (await raw_exchange(port, huge)).startswith(b"HTTP/1.1 413 ")
    assert seen == [MAX_REQUEST_BYTES]


async def test_garbage_closes_only_that_connection(
    servers: list[asyncio.Server], caplog: pytest.LogCaptureFixture
) -> None:
    server, port = await start(readiness_routes(Readiness()))
    servers.append(server)

    # A well-behaved client with a keep-alive connection open before, during and after the garbage.
    good_reader, good_writer = await asyncio.open_connection("127.0.0.1", port)
    request = b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n\r\n"

    async def good_roundtrip() -> bytes:
        good_writer.write(request)
        head = await asyncio.wait_for(good_reader.readuntil(b"\r\n\r\n"), 5)
        body = await asyncio.wait_for(good_reader.readexactly(6), 5)
        return head + body

    assert (await good_roundtrip()).endswith(b"ready\n")
    caplog.set_level(logging.INFO, logger="mesh.http")
    caplog.clear()
    answer = await raw_exchange(port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 ")  # and then the server closed it (raw_exchange returned)
    assert (await good_roundtrip()).endswith(b"ready\n")
    lines = [r for r in caplog.records if r.name == "mesh.http"]
    assert len(lines) == 1 and "bad request" in lines[0].getMessage()

    # A client that just connects and leaves (a TCP probe) is not an error worth a log line.
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.close()
    await asyncio.sleep(0.05)
    assert len([r for r in caplog.records if r.name == "mesh.http"]) == 1
    good_writer.close()


async def test_stalled_request_is_dropped(servers: list[asyncio.Server]) -> None:
    server = await serve_http("127.0.0.1", 0, readiness_routes(Readiness()), request_timeout=0.2)
    servers.append(server)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz/ready HTTP/1.1\r\nHo")
    assert await asyncio.wait_for(reader.read(-1), 2) == b""
    writer.close()


async def test_head_gets_the_headers_without_the_body(
    servers: list[asyncio.Server], caplog: pytest.LogCaptureFixture
) -> None:
    server, port = await start({**readiness_routes(Readiness()), "/quitquitquit": {"POST": lambda _: Response(200)}})
    servers.append(server)
    caplog.set_level(logging.INFO)

    def head_then_get() -> list[tuple[int, str | None, bytes]]:
        # One keep-alive connection: after the HEAD the next request must still be read and answered.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        results = []
        for method in ("HEAD", "GET", "HEAD"):
            conn.request(method, "/healthz/ready")
            resp = conn.getresponse()
            results.append((resp.status, resp.getheader("content-length"), resp.read()))
        conn.close()
        return results

    assert await asyncio.to_thread(head_then_get) == [(200, "6", b""), (200, "6", b"ready\n"), (200, "6", b"")]
    # On the wire: the HEAD's answer is the head alone, so the GET's answer follows it at once.
    answer = await raw_exchange(port, b"HEAD /healthz/ready HTTP/1.1\r\nHost: x\r\n\r\n"
                                      b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, rest = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 ") and b"content-length: 6" in head
    assert rest.startswith(b"HTTP/1.1 200 ") and rest.endswith(b"\r\n\r\nready\n")
    # Where GET is not served, neither is HEAD; error answers to a HEAD have no body either.
    status, body, headers = await fetch(port, "/quitquitquit", method="HEAD")
    assert (status, body, headers["allow"]) == (405, "", "POST")
    assert (await fetch(port, "/nope", method="HEAD"))[:2] == (404, "")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


async def test_a_response_h11_refuses_closes_only_that_connection(
    servers: list[asyncio.Server], caplog: pytest.LogCaptureFixture
) -> None:
    bad = Response(200, b"x", headers=[("x-broken", "line\r\nbreak")])  # h11 will not send this header
    server, port = await start({"/bad": {"GET": lambda _: bad}, **readiness_routes(Readiness())})
    servers.append(server)
    caplog.set_level(logging.INFO, logger="mesh.http")
    assert await raw_exchange(port, b"GET /bad HTTP/1.1\r\nHost: x\r\n\r\n") == b""
    lines = [r.getMessage() for r in caplog.records if r.name == "mesh.http"]
    assert len(lines) == 1 and "cannot send the response" in lines[0], lines
    assert (await fetch(port, "/healthz/ready"))[:2] == (200, "ready\n")
