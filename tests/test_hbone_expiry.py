"""No HBONE connection outlives the earlier of its two certificates: at that notAfter it drains (GOAWAY, open
streams finish, no new ones), and the pool dials a fresh connection, with the renewed certificate, for new
streams. TLS checks expiry only at the handshake; this is what holds afterwards."""

from __future__ import annotations

import asyncio
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

from certs import WorkloadCert
from hbone.client import dial
from hbone.pool import Pool, PoolKey
from hbone.tls import ALPN, client_context
from tests.support.apps import TcpApp, TunnelServer, echo, stream_pair
from tests.support.pki import TestPki, ident
from tests.support.rawpeer import bounded
from tests.support.waiting import eventually

SERVER = ident("server")
CLIENT = ident("client")
LIFETIME = timedelta(seconds=2)  # notAfter has whole seconds: these expire 1 to 2 s after they are made


def short_lived(pki: TestPki) -> WorkloadCert:
    now = datetime.now(UTC)
    return pki.cas["cluster1"].issue(CLIENT, not_before=now - timedelta(minutes=1), not_after=now + LIFETIME)


async def echoes(tunnel, data: bytes) -> bool:
    reader, writer = stream_pair(tunnel)
    writer.write(data)
    writer.write_eof()
    return await asyncio.wait_for(reader.read(), 5) == data


@bounded(15)
async def test_pooled_connection_drains_at_certificate_expiry(pki: TestPki) -> None:
    server = await TunnelServer(SERVER, lambda: pki.server_ctx(SERVER)).start()
    app = await TcpApp(echo).start()
    pool = Pool()
    key = PoolKey(CLIENT, frozenset([SERVER]), server.address)
    current = {"ctx": client_context(short_lived(pki))}
    try:
        def dialer():
            return dial(server.address, current["ctx"], [SERVER], local_identity=CLIENT)

        first = await pool.open_stream(key, dialer, f"127.0.0.1:{app.port}", [])
        old = first.connection
        reader, writer = stream_pair(first)
        writer.write(b"before expiry ")
        assert await asyncio.wait_for(reader.readexactly(14), 5) == b"before expiry "
        current["ctx"] = pki.client_ctx(CLIENT)  # renewed: new connections present the new certificate

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


def foreign_client_context(pki: TestPki, cert: WorkloadCert, folder: Path) -> ssl.SSLContext:
    """A client context that is not ours: the connection knows nothing of this certificate's expiry, as with
    another implementation that does not drain by itself, so only the server can end it."""
    (folder / "chain.pem").write_bytes(cert.chain_pem)
    (folder / "key.pem").write_bytes(cert.key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.set_alpn_protocols([ALPN])
    ctx.load_verify_locations(cadata=pki.cas["cluster1"].root_pem.decode())
    ctx.load_cert_chain(folder / "chain.pem", folder / "key.pem")
    return ctx


@bounded(15)
async def test_server_sends_goaway_when_the_client_certificate_expires(pki: TestPki, tmp_path: Path) -> None:
    server = await TunnelServer(SERVER, lambda: pki.server_ctx(SERVER)).start()
    app = await TcpApp(echo).start()
    conn = await dial(server.address, foreign_client_context(pki, short_lived(pki), tmp_path), [SERVER])
    try:
        tunnel = await conn.open_stream(f"127.0.0.1:{app.port}")
        # This client would keep the connection for ever; the server's certificate is good for an hour. So
        # the connection turning unusable while still open means the server's GOAWAY came.
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
