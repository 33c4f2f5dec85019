"""The sample app as a real process: its HTTP routes, keep-alive, streaming bodies and the TCP echo."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import h11
import pytest

from tests.support.waiting import eventually
from topology.app import pattern, pattern_sha256

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    def __init__(self, proc: asyncio.subprocess.Process, http: int, tcp: int) -> None:
        self.proc, self.http, self.tcp = proc, http, tcp


@pytest.fixture
async def app() -> AsyncIterator[App]:
    http, tcp = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "topology.app", "--name", "echo-v2-1", "--listen", f"127.0.0.1:{http}",
        "--version", "v2", "--cluster", "cluster2", "--tcp-echo", f"127.0.0.1:{tcp}",
        env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.DEVNULL,
    )  # fmt: skip

    async def listening() -> bool:
        for port in (http, tcp):
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                return False
            w.close()
        return True

    try:
        await eventually(listening, f"the app listens on its HTTP port {http} and --tcp-echo port {tcp}", deadline=20)
    except AssertionError:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        raise
    yield App(proc, http, tcp)
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 5)


class Client:
    """An h11 client on one connection, to see keep-alive at work."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h11.Connection(h11.CLIENT)

    async def request(
        self, method: str, target: str, body_chunks: list[bytes] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        headers = [("host", "app")]
        if body_chunks is not None:
            headers.append(("transfer-encoding", "chunked"))
        self.writer.write(self.conn.send(h11.Request(method=method, target=target, headers=headers)))
        for chunk in body_chunks or []:
            self.writer.write(self.conn.send(h11.Data(data=chunk)))
        self.writer.write(self.conn.send(h11.EndOfMessage()))
        await self.writer.drain()
        status, response_headers, body = 0, {}, bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.reader.read(1 << 20))
            elif isinstance(event, h11.Response):
                status = event.status_code
                response_headers = {k.decode(): v.decode() for k, v in event.headers}
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self.conn.start_next_cycle()
                return status, response_headers, bytes(body)


async def test_routes_on_one_keep_alive_connection(app: App) -> None:
    client = Client(*await asyncio.open_connection("127.0.0.1", app.http))
    status, headers, body = await client.request("GET", "/")
    assert (status, body) == (200, b"echo-v2-1 cluster2 v2 127.0.0.1\n")
    assert (headers["x-workload"], headers["x-cluster"], headers["x-version"]) == ("echo-v2-1", "cluster2", "v2")

    n = 3 * (1 << 20) + 12345
    status, headers, body = await client.request("GET", f"/bytes/{n}")
    assert status == 200 and len(body) == n and hashlib.sha256(body).hexdigest() == pattern_sha256(n)

    chunks = [os.urandom(size) for size in (1, 70_000, 1 << 20, 5)]
    status, _, body = await client.request("POST", "/sha256", chunks)
    whole = b"".join(chunks)
    assert body.decode() == f"{hashlib.sha256(whole).hexdigest()} {len(whole)}\n"

    assert (await client.request("GET", "/status/503"))[0] == 503
    assert (await client.request("GET", "/nowhere"))[0] == 404
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, _, body = await client.request("GET", "/delay/200")
    assert status == 200 and loop.time() - started >= 0.2 and body.startswith(b"delayed 200ms echo-v2-1")
    status, _, body = await client.request("GET", "/headers")
    assert b"host: app\n" in body
    client.writer.close()


def test_pattern_is_deterministic_and_position_dependent() -> None:
    a = b"".join(pattern(3 << 20))
    assert a == b"".join(pattern(3 << 20))
    first, second = a[: 1 << 20], a[1 << 20 : 2 << 20]
    assert first != second  # a repeated or swapped MiB would change the hash
    assert b"".join(pattern(10)) == a[:10]


async def test_tcp_echo_half_closes_back(app: App) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", app.tcp)
    payload = os.urandom(2 << 20)
    writer.write(payload)
    writer.write_eof()
    received = await asyncio.wait_for(reader.read(-1), 10)  # ends only when the app half-closes
    assert received == payload
    writer.close()


async def test_sigterm_stops_the_app_cleanly(app: App) -> None:
    app.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(app.proc.wait(), 5) == 0
