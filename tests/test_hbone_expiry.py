"""No HBONE connection outlives the earlier of its two certificates: at that notAfter it drains (GOAWAY, open
streams finish, no new ones), and the pool dials a fresh connection, with the renewed certificate, for new
streams. TLS checks expiry only at the handshake; this is what holds afterwards.

The certificates here are good for minutes: a connection is checked to take their real notAfter, and is then
told that moment is a fraction of a second away, so nothing depends on how fast a handshake runs."""

from __future__ import annotations

import asyncio
import ssl
import time
from datetime import UTC, datetime, timedelta

from certs import WorkloadCert
from hbone.client import dial
from hbone.pool import Pool, PoolKey
from hbone.tls import check_client, check_server, client_context, server_context, session_not_after
from tests.support.apps import TcpApp, TunnelServer, echo, stream_pair
from tests.support.pki import TestPki, ident
from tests.support.rawpeer import bounded
from tests.support.waiting import eventually

SERVER = ident("server")
CLIENT = ident("client")
SOON = 0.2  # seconds from "now" to the expiry a test moves a connection's notAfter to


def expiring(pki: TestPki, identity, minutes: int) -> WorkloadCert:
    """A certificate whose notAfter is `minutes` from now, to the second (certificates hold whole seconds)."""
    now = datetime.now(UTC).replace(microsecond=0)
    return pki.cas["cluster1"].issue(identity, not_before=now - timedelta(minutes=1),
                                     not_after=now + timedelta(minutes=minutes))  # fmt: skip


async def echoes(tunnel, data: bytes) -> bool:
    reader, writer = stream_pair(tunnel)
    writer.write(data)
    writer.write_eof()
    return await asyncio.wait_for(reader.read(), 5) == data


def handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A TLS session between two contexts in memory (no sockets): the client's and the server's SSLObject."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_side=False)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done: set[ssl.SSLObject] = set()
    for _ in range(10):
        for side in (client, server):
            try:
                side.do_handshake()
                done.add(side)
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if len(done) == 2:
            return client, server
    raise AssertionError("the in-memory handshake did not finish")


def test_session_expiry_is_the_earlier_leaf_notafter_of_the_two_sides(pki: TestPki) -> None:
    """Both sides count by their leaf, the peer's as the TLS checks parsed it: our intermediate expiring before
    our leaf (a mistake our CA refuses to make, forced here) changes nothing, as the peer's cannot be seen."""
    now = datetime.now(UTC).replace(microsecond=0)
    intermediate_end = pki.cas["cluster1"].not_after
    client_cert = expiring(pki, CLIENT, 30)
    server_cert = pki.cas["cluster1"].issue(SERVER, not_before=now - timedelta(minutes=1),
                                            not_after=intermediate_end + timedelta(days=1))  # fmt: skip
    client_ctx, server_ctx = client_context(client_cert), server_context(server_cert)
    client_side, server_side = handshake(client_ctx, server_ctx)

    server_peer = check_server(client_side, [SERVER])
    assert server_peer.identity == SERVER
    assert server_peer.not_after == server_cert.not_after.timestamp()
    client_peer = check_client(server_side, "cluster.local")
    assert client_peer.identity == CLIENT
    assert client_peer.not_after == client_cert.not_after.timestamp()

    # Each side: the client's certificate is the earlier, whether it is ours or the peer's.
    assert session_not_after(client_ctx, server_peer) == client_cert.not_after.timestamp()
    assert session_not_after(server_ctx, client_peer) == client_cert.not_after.timestamp()
    # Our own leaf, not our chain's earliest date (the intermediate's, here).
    assert server_ctx.hbone_not_after == server_cert.not_after.timestamp()  # type: ignore[attr-defined]
    # A context not made by hbone.tls: the peer's date alone.
    assert session_not_after(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), client_peer) == client_peer.not_after


@bounded(15)
async def test_pooled_connection_drains_at_certificate_expiry(pki: TestPki) -> None:
    server = await TunnelServer(SERVER, lambda: pki.server_ctx(SERVER)).start()
    app = await TcpApp(echo).start()
    pool = Pool()
    key = PoolKey(CLIENT, frozenset([SERVER]), server.address)
    ours = expiring(pki, CLIENT, 30)  # the server's certificate is good for an hour: ours is the earlier
    current = {"ctx": client_context(ours)}
    try:
        def dialer():
            return dial(server.address, current["ctx"], [SERVER], local_identity=CLIENT)

        first = await pool.open_stream(key, dialer, f"127.0.0.1:{app.port}", [])
        old = first.connection
        assert old.not_after == ours.not_after.timestamp()
        reader, writer = stream_pair(first)
        writer.write(b"before expiry ")
        assert await asyncio.wait_for(reader.readexactly(14), 5) == b"before expiry "
        current["ctx"] = pki.client_ctx(CLIENT)  # renewed: new connections present the new certificate

        old.not_after = time.time() + SOON  # as if that notAfter were now
        await eventually(lambda: not old.usable, "no new streams on the connection once its certificate expired",
                         deadline=5)  # fmt: skip
        assert not old.is_closed  # drained, not cut: the stream opened before expiry is still open

        second = await pool.open_stream(key, dialer, f"127.0.0.1:{app.port}", [])
        assert second.connection is not old and pool.connections_opened == 2
        assert await echoes(second, b"on the new connection")

        writer.write(b"after expiry")  # the stream opened before expiry goes on to its end
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b"after expiry"
        await asyncio.wait_for(old.closed, 5)
        assert pool.connections(key) == [second.connection]
    finally:
        await pool.close()
        await server.close()
        await app.close()


@bounded(15)
async def test_server_sends_goaway_when_the_client_certificate_expires(pki: TestPki) -> None:
    server = await TunnelServer(SERVER, lambda: pki.server_ctx(SERVER)).start()
    app = await TcpApp(echo).start()
    theirs = expiring(pki, CLIENT, 30)
    conn = await dial(server.address, client_context(theirs), [SERVER])
    try:
        tunnel = await conn.open_stream(f"127.0.0.1:{app.port}")
        (at_server,) = server.server.connections
        assert at_server.not_after == theirs.not_after.timestamp()  # the client's, the earlier of the two
        at_server.not_after = time.time() + SOON
        # The client would keep the connection for another half hour. So the connection turning unusable
        # while still open means the server's GOAWAY came.
        await eventually(lambda: not conn.usable, "the server's GOAWAY after the client certificate expired",
                         deadline=5)  # fmt: skip
        assert not conn.is_closed
        assert await echoes(tunnel, b"finishes after the GOAWAY")
        await asyncio.wait_for(conn.closed, 5)
        await eventually(lambda: not server.server.connections, "the server to close the drained connection",
                         deadline=5)  # fmt: skip
    finally:
        conn.close()
        await server.close()
        await app.close()
