"""ztunnel as a real process against clients that vanish or misbehave: a connection that resets at once
costs nothing and logs no traceback, a CONNECT reset while ztunnel dials the application lets that
connection go, debug logging never shows request headers, logged values stay on one line, and SOCKS5 says
"connection refused" when it was."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import urllib.request
from pathlib import Path

import h2.errors
import h2.events
import pytest

from tests.support.daemons import Daemon
from tests.support.pki import TestPki, ident
from tests.support.rawh2 import RawH2Client
from tests.support.waiting import eventually
from tests.support.ztunnel import SOCKS5_NO_AUTH, running_ztunnel, socks_connect, socks_reply, workload

Z, SLEEP_IP, ECHO_IP, OUTSIDE_IP = "127.14.1.1", "127.14.1.10", "127.14.1.20", "127.14.1.99"
SOCKS, CAPTURE, PLAINTEXT = 15080, 15001, 15006
APP_PORT = 18080
DEADLINE = 15.0  # for what a test waits on, never a measure of anything
TROUBLE = ("Traceback", "never retrieved", "Fatal error", "Exception in callback")


@pytest.fixture
async def ztunnel(tmp_path: Path, pki: TestPki):
    config = {"workloads": [workload("sleep-1", SLEEP_IP), workload("echo-1", ECHO_IP)]}
    async with running_ztunnel(Z, tmp_path, config, pki.paths["cluster1"], NETWORK="network1",
                               SOCKS5_ADDR=f"{Z}:{SOCKS}", OUTBOUND_ADDR=f"{Z}:{CAPTURE}",
                               INBOUND_PLAINTEXT_ADDR=f"{Z}:{PLAINTEXT}", LOG_LEVEL="debug") as daemon:  # fmt: skip
        yield daemon


def open_fds(daemon: Daemon) -> int:
    assert daemon.proc is not None
    return len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))


def connect_and_reset(port: int, payload: bytes) -> None:
    sock = socket.socket()
    try:
        sock.bind((SLEEP_IP, 0))
        sock.connect((Z, port))
        if payload:
            sock.sendall(payload)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST
    finally:
        sock.close()


def closed_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]  # nothing listens there once this socket is closed


def set_log_level(level: str) -> None:
    request = urllib.request.Request(f"http://{Z}:15000/logging?level={level}", data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=5) as resp:
        assert resp.status == 200


async def test_clients_that_reset_at_once_cost_nothing(ztunnel: Daemon) -> None:
    # uvloop has no peer address for a client that is already gone when its connection is first seen. On every
    # listener that takes plain TCP such a client is let go quietly, and its descriptor with it.
    baseline = open_fds(ztunnel)
    request = SOCKS5_NO_AUTH + socks_connect(OUTSIDE_IP, closed_port(OUTSIDE_IP))
    for port, payload in ((CAPTURE, b""), (PLAINTEXT, b""), (SOCKS, request), (SOCKS, SOCKS5_NO_AUTH)):
        await asyncio.to_thread(lambda: [connect_and_reset(port, payload) for _ in range(200)])  # noqa: B023
    await eventually(lambda: open_fds(ztunnel) <= baseline, f"ztunnel is back to {baseline} descriptors", DEADLINE)
    assert not [t for t in TROUBLE if t in ztunnel.logs()], ztunnel.logs()[-3000:]
    # And it still serves: a SOCKS5 client gets its answer.
    assert await socks_reply((Z, SOCKS), SLEEP_IP, OUTSIDE_IP, closed_port(OUTSIDE_IP)) == 5


def syn_sent_to(host: str, port: int) -> bool:
    """Whether a socket on this host is still sending SYNs to host:port (/proc/net/tcp, state 02)."""
    want = f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"
    lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return any(fields[2] == want and fields[3] == "02" for fields in (line.split() for line in lines))


async def test_connect_reset_while_the_application_is_dialled(ztunnel: Daemon, pki: TestPki) -> None:
    # An application whose accept queue is full: ztunnel's SYNs are dropped, so its dial waits for a retransmit
    # (a second later) while the client resets the CONNECT. Once the dial succeeds nobody is left to talk to.
    app = socket.socket()
    app.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    app.bind((ECHO_IP, APP_PORT))
    app.listen(0)  # room for one connection that is not accepted yet
    filler = socket.create_connection((ECHO_IP, APP_PORT))
    client = await RawH2Client.open((ECHO_IP, 15008), pki.client_ctx(ident("sleep")))
    try:
        sid = client.conn.get_next_available_stream_id()
        client.conn.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", f"{ECHO_IP}:{APP_PORT}".encode())])
        client.writer.write(client.conn.data_to_send())
        await eventually(lambda: syn_sent_to(ECHO_IP, APP_PORT), "ztunnel dials the application", DEADLINE)

        client.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        client.conn.ping(b"resetnow")  # answered only once ztunnel has read the reset before it
        client.writer.write(client.conn.data_to_send())
        acked = False
        while not acked:
            data = await asyncio.wait_for(client.reader.read(65536), DEADLINE)
            assert data, "ztunnel closed the HBONE connection"
            acked = any(isinstance(e, h2.events.PingAckReceived) for e in client.conn.receive_data(data))

        queued, _ = app.accept()  # room for ztunnel's next SYN
        queued.close()
        await eventually(lambda: "the client went away while the application was dialled" in ztunnel.logs(),
                         "the connection is logged as ended by the client", DEADLINE)  # fmt: skip
        app.settimeout(DEADLINE)
        dialled, _ = await asyncio.to_thread(app.accept)
        dialled.settimeout(DEADLINE)
        assert await asyncio.to_thread(dialled.recv, 1) == b""  # ztunnel let it go at once
        dialled.close()
        line = next(x for x in ztunnel.logs().splitlines() if "went away while the application" in x)
        assert "direction=inbound" in line and "status=" not in line and "flags=-" in line
    finally:
        client.close()
        filler.close()
        app.close()


async def test_debug_logging_never_shows_request_headers(ztunnel: Daemon, pki: TestPki) -> None:
    # At debug level the HPACK codec would log every header it decodes, an Authorization header too; at start
    # (LOG_LEVEL=debug) and after the admin endpoint turns debug on again.
    async def connect_with_secret(secret: str) -> None:
        client = await RawH2Client.open((ECHO_IP, 15008), pki.client_ctx(ident("sleep")))
        try:
            outcome = await client.request([(":method", "CONNECT"), (":authority", f"{ECHO_IP}:{APP_PORT}"),
                                            ("authorization", f"Bearer {secret}")])  # fmt: skip
            assert outcome.status == 503  # nothing listens there; what counts is that the headers were read
        finally:
            client.close()

    await connect_with_secret("s3cret-at-start")
    await asyncio.to_thread(set_log_level, "error")
    await asyncio.to_thread(set_log_level, "debug")
    await connect_with_secret("s3cret-after-admin")
    logs = ztunnel.logs()
    assert " debug hbone." in logs  # debug is on...
    assert "s3cret" not in logs and "hpack" not in logs  # ...but not for the HTTP/2 libraries


async def test_control_characters_are_escaped_in_the_log(ztunnel: Daemon) -> None:
    host = b"evil\r\n\x00\x1b[2J.example"
    assert await socks_reply((Z, SOCKS), SLEEP_IP, host, 80) == 4  # no route: host unreachable
    await eventually(lambda: "evil" in ztunnel.logs(), "the refusal is logged", DEADLINE)
    raw = ztunnel.log_path.read_bytes()
    assert not any(c in raw for c in (b"\r", b"\x00", b"\x1b")), raw[-2000:]
    assert "evil\\r\\n\\x00\\x1b[2J.example" in ztunnel.logs()


async def test_refused_tcp_connect_is_socks_connection_refused(ztunnel: Daemon) -> None:
    # Not a mesh destination: a plain TCP connection to where nothing listens is reply 05, not 04.
    port = closed_port(OUTSIDE_IP)
    assert await socks_reply((Z, SOCKS), SLEEP_IP, OUTSIDE_IP, port) == 5, ztunnel.logs()
