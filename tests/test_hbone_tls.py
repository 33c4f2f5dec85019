"""mTLS on HBONE (SPEC §3.1): every refused handshake names its reason; the good ones keep working."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import ssl
from datetime import UTC, datetime, timedelta

import pytest

from certs import unrelated_ca
from hbone.client import client_over, dial, open_first_stream
from hbone.connection import H2Settings
from hbone.errors import H2HandshakeFailure, TlsFailure, WrongIdentity
from hbone.identity import Identity, IdentityError
from hbone.tls import ALPN, _restrict_tls13_suites, client_context, server_context
from hbone.tlslayer import Buffered
from tests.support.apps import TcpApp, TunnelServer, echo, stream_pair
from tests.support.pki import TestPki, ident
from tests.support.waiting import eventually

SERVER = ident("server")
CLIENT = ident("client")


@pytest.fixture
async def server(pki: TestPki):
    srv = await TunnelServer(SERVER, lambda: pki.server_ctx(SERVER)).start()
    yield srv
    await srv.close()


async def assert_still_serving(pki: TestPki, server: TunnelServer, app: TcpApp) -> None:
    conn = await dial(server.address, pki.client_ctx(CLIENT), [SERVER])
    tunnel = await conn.open_stream(f"127.0.0.1:{app.port}")
    reader, writer = stream_pair(tunnel)
    writer.write(b"still here")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b"still here"
    conn.close()


def server_log(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "hbone.server")


async def wait_for_log(caplog: pytest.LogCaptureFixture, text: str) -> str:
    """The server's log once `text` is in it; the test fails, saying so, if it never comes."""
    return await eventually(lambda: text in (log := server_log(caplog)) and log, f"{text!r} in the server's log")


def bare_client_context(pki: TestPki, *, alpn: bool = True) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=pki.cas["cluster1"].root_pem.decode())
    if alpn:
        ctx.set_alpn_protocols([ALPN])
    return ctx


async def test_client_without_certificate_is_refused(pki, server, echo_app, caplog) -> None:
    caplog.set_level(logging.INFO)
    reader, writer = await asyncio.open_connection(*server.address, ssl=bare_client_context(pki), server_hostname="")
    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    try:
        data = await asyncio.wait_for(reader.read(100), 5)
    except (ssl.SSLError, ConnectionError):
        data = b""  # the server's alert
    assert data == b""  # refused: an alert or a bare close, never an HTTP/2 SETTINGS frame
    writer.close()
    assert "no client certificate" in await wait_for_log(caplog, "no client certificate")
    await assert_still_serving(pki, server, echo_app)


async def test_client_certificate_from_another_root_is_refused(pki, server, echo_app, caplog) -> None:
    caplog.set_level(logging.INFO)
    foreign = unrelated_ca().issue(CLIENT)
    # It trusts our root (so it accepts the server) but presents a certificate our root did not sign.
    creds = dataclasses.replace(foreign, root_pem=pki.cas["cluster1"].root_pem)
    with pytest.raises(TlsFailure) as info:
        await dial(server.address, client_context(creds), [SERVER])
    assert "refused" in str(info.value)
    log = await wait_for_log(caplog, "certificate verification failed")
    assert "certificate verification failed: unable to get local issuer certificate" in log
    await assert_still_serving(pki, server, echo_app)


async def test_expired_client_certificate_is_refused(pki, server, echo_app, caplog) -> None:
    caplog.set_level(logging.INFO)
    now = datetime.now(UTC)
    expired = pki.cas["cluster1"].issue(CLIENT, not_before=now - timedelta(days=2), not_after=now - timedelta(days=1))
    with pytest.raises(TlsFailure) as info:
        await dial(server.address, client_context(expired), [SERVER])
    assert info.value.flag == "TLS_FAILURE"
    assert "certificate has expired" in await wait_for_log(caplog, "expired")
    await assert_still_serving(pki, server, echo_app)


async def test_expired_server_certificate_is_refused(pki) -> None:
    now = datetime.now(UTC)
    expired = pki.cas["cluster2"].issue(SERVER, not_before=now - timedelta(days=2), not_after=now - timedelta(hours=1))
    srv = await TunnelServer(SERVER, lambda: server_context(expired)).start()
    with pytest.raises(TlsFailure) as info:
        await dial(srv.address, pki.client_ctx(CLIENT), [SERVER])
    assert info.value.flag == "TLS_FAILURE"
    assert "certificate has expired" in str(info.value)
    await srv.close()


async def test_server_with_unexpected_identity_is_refused(pki, server) -> None:
    with pytest.raises(WrongIdentity) as info:
        await dial(server.address, pki.client_ctx(CLIENT), [ident("reviews"), ident("ratings")])
    message = str(info.value)
    assert info.value.flag == "IDENTITY_ERROR"
    assert "spiffe://cluster.local/ns/default/sa/server" in message
    assert "spiffe://cluster.local/ns/default/sa/reviews" in message


async def test_server_matching_any_expected_identity_is_accepted(pki, server) -> None:
    conn = await dial(server.address, pki.client_ctx(CLIENT), [ident("reviews"), SERVER])
    assert conn.peer_identity == SERVER
    conn.close()


async def test_client_from_another_trust_domain_is_refused(pki, server, echo_app, caplog) -> None:
    caplog.set_level(logging.INFO)
    outsider = Identity("evil.example", "default", "client")
    with pytest.raises(TlsFailure):
        await dial(server.address, pki.client_ctx(outsider), [SERVER])
    assert "not in trust domain 'cluster.local'" in await wait_for_log(caplog, "trust domain")
    await assert_still_serving(pki, server, echo_app)


# SPEC §3.1: a workload certificate carries exactly one URI SAN, its SPIFFE id, and is not a CA. Each of
# these leaves is signed by the real cluster intermediate, so only our check after the handshake stands
# between it and a connection.
OTHER = "spiffe://evil.example/ns/kube-system/sa/admin"
BAD_PEER_LEAVES = [
    pytest.param({"uris": [OTHER, "{me}"]}, "exactly one URI SAN", id="foreign-uri-first"),
    pytest.param({"uris": ["{me}", OTHER]}, "exactly one URI SAN", id="foreign-uri-second"),
    pytest.param({"uris": ["https://example.com/x", "{me}"]}, "exactly one URI SAN", id="non-spiffe-uri-first"),
    pytest.param(
        {"uris": ["spiffe://cluster.local/ns/a/sa/b/c", "{me}"]}, "exactly one URI SAN", id="malformed-spiffe-first"
    ),
    pytest.param({"uris": ["{me}?x=1"]}, "no percent-encoding, query", id="query"),
    pytest.param({"uris": ["{me_pct}"]}, "no percent-encoding, query", id="percent-encoded"),
    pytest.param({"uris": ["{me_upper}"]}, "trust domain may only hold lowercase", id="uppercase-trust-domain"),
    pytest.param({"uris": ["{me}"], "ca": True}, "is a CA", id="leaf-is-a-ca"),
]


def _forge(pki: TestPki, me: Identity, spec: dict) -> object:
    spellings = {
        "me": str(me),
        "me_pct": str(me).replace("/ns/default/", "/ns/def%61ult/"),
        "me_upper": str(me).replace("cluster.local", "CLUSTER.LOCAL"),
    }
    return pki.forged([u.format(**spellings) for u in spec["uris"]], ca=spec.get("ca", False))


@pytest.mark.parametrize(("spec", "reason"), BAD_PEER_LEAVES)
async def test_client_leaf_breaking_the_one_spiffe_uri_rule_is_refused(
    pki, server, echo_app, caplog, spec, reason
) -> None:
    caplog.set_level(logging.INFO)
    forged = _forge(pki, CLIENT, spec)
    with pytest.raises(TlsFailure):
        await dial(server.address, client_context(forged), [SERVER])
    log = await wait_for_log(caplog, reason)
    assert "client certificate refused: " in log and reason in log, log
    await assert_still_serving(pki, server, echo_app)


@pytest.mark.parametrize(("spec", "reason"), BAD_PEER_LEAVES)
async def test_server_leaf_breaking_the_one_spiffe_uri_rule_is_refused(pki, spec, reason) -> None:
    forged = _forge(pki, SERVER, spec)
    srv = await TunnelServer(SERVER, lambda: server_context(forged)).start()
    try:
        with pytest.raises(WrongIdentity) as info:
            await dial(srv.address, pki.client_ctx(CLIENT), [SERVER])
        assert info.value.flag == "IDENTITY_ERROR"
        assert "server certificate refused: " in str(info.value) and reason in str(info.value)
    finally:
        await srv.close()


@pytest.mark.parametrize(
    "text",
    [
        "spiffe://cluster.local/ns/default/sa/client?x=1",
        "spiffe://cluster.local/ns/default/sa/client#frag",
        "spiffe://cluster.local/ns/def%61ult/sa/client",
        "spiffe://CLUSTER.LOCAL/ns/default/sa/client",
        "spiffe://cluster.local:443/ns/default/sa/client",
        "spiffe://user@cluster.local/ns/default/sa/client",
        "spiffe://cluster.local/ns/../sa/client",
        "spiffe://cluster.local/ns/default/sa/cli ent",
        "spiffe://cluster.local/ns/default/sa/" + "a" * 2048,
    ],
)
def test_identity_parse_is_strict(text: str) -> None:
    with pytest.raises(IdentityError):
        Identity.parse(text)


def test_identity_parse_takes_what_istio_writes() -> None:
    assert Identity.parse("spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway.v2_x") == Identity(
        "cluster.local", "istio-system", "istio-eastwestgateway.v2_x"
    )


@pytest.mark.parametrize(
    ("namespace", "service_account", "trust_domain", "reason"),
    [
        ("default", "client", "Cluster.Local", "trust domain may only hold lowercase"),
        ("default", "client", "cluster.local:443", "trust domain may only hold lowercase"),
        ("default", "client", "c" * 256, "at most 255 characters"),
        ("def%61ult", "client", "cluster.local", "no percent-encoding"),
        ("..", "client", "cluster.local", "is not '.' or '..'"),
        ("default", "cli ent", "cluster.local", "may only hold letters"),
        ("default", "a/sa/b", "cluster.local", "may only hold letters"),
        ("", "client", "cluster.local", "is empty"),
    ],
)
def test_identities_we_issue_follow_the_rule_for_identities_we_accept(
    namespace: str, service_account: str, trust_domain: str, reason: str
) -> None:
    """`Identity.of` (what we present) refuses what `Identity.parse` (what a peer presents) refuses, for the
    same reason: otherwise every handshake with such an identity fails at run time."""
    with pytest.raises(IdentityError, match=re.escape(reason)):
        Identity.of(namespace, service_account, trust_domain)
    bogus = f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
    with pytest.raises(IdentityError, match=re.escape(reason) if "/" not in service_account else "of the form"):
        Identity.parse(bogus)
    assert Identity.of("istio-system", "istio-eastwestgateway.v2_x", "td.example") == Identity.parse(
        "spiffe://td.example/ns/istio-system/sa/istio-eastwestgateway.v2_x"
    )
    assert Identity.of("default", "", "") == Identity("cluster.local", "default", "default")  # Istio's defaults


async def open_at_once(pki: TestPki, address: tuple[str, int], source: Identity, settings: H2Settings | None = None):
    """A client connection that sends its CONNECT without waiting for the server's SETTINGS."""
    transport, _ = await asyncio.get_running_loop().create_connection(Buffered, *address)
    conn = await client_over(transport, pki.client_ctx(source), [SERVER], settings=settings, wait_for_settings=False)
    return conn, await open_first_stream(conn, "127.0.0.1:9")


async def test_refusal_of_a_connect_sent_before_settings_is_a_tls_failure(pki, server, echo_app, caplog) -> None:
    """Our TLS is done before the server has judged our certificate; a CONNECT sent at once (double HBONE's
    inner one) meets the refusal, which must still be reported as the TLS failure it is."""
    caplog.set_level(logging.INFO)
    with pytest.raises(TlsFailure) as info:
        await open_at_once(pki, server.address, Identity("evil.example", "default", "client"))
    assert "server" in str(info.value)
    assert "not in trust domain 'cluster.local'" in await wait_for_log(caplog, "trust domain")
    await assert_still_serving(pki, server, echo_app)


async def test_silence_after_tls_is_a_settings_timeout_for_a_connect_sent_at_once(pki) -> None:
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # TLS, then not one HTTP/2 byte
        writer.close()

    silent = await asyncio.start_server(mute, "127.0.0.1", 0, ssl=pki.server_ctx(SERVER))
    try:
        with pytest.raises(H2HandshakeFailure, match="no HTTP/2 SETTINGS from the server in time"):
            await open_at_once(pki, silent.sockets[0].getsockname()[:2], CLIENT, H2Settings(handshake_timeout=0.3))
    finally:
        silent.close()


async def test_server_without_alpn_h2_is_refused(pki) -> None:
    cert = pki.cert(SERVER)
    ctx = server_context(cert)
    ctx.set_alpn_protocols(["http/1.1"])  # speaks TLS fine, but not HTTP/2

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    srv = await asyncio.start_server(hold, "127.0.0.1", 0, ssl=ctx)
    port = srv.sockets[0].getsockname()[1]
    with pytest.raises(TlsFailure) as info:
        await dial(("127.0.0.1", port), pki.client_ctx(CLIENT), [SERVER])
    assert "ALPN 'h2'" in str(info.value)
    srv.close()


async def test_client_without_alpn_h2_is_refused(pki, server, echo_app, caplog) -> None:
    caplog.set_level(logging.INFO)
    ctx = bare_client_context(pki, alpn=False)
    cert = pki.cert(CLIENT)
    ctx.load_cert_chain(*_write_pair(cert))
    reader, writer = await asyncio.open_connection(*server.address, ssl=ctx, server_hostname="")
    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert await asyncio.wait_for(reader.read(100), 5) == b""
    writer.close()
    assert "did not negotiate ALPN 'h2'" in await wait_for_log(caplog, "ALPN")
    await assert_still_serving(pki, server, echo_app)


async def test_only_tls13_aes_gcm_no_sni_no_tickets(pki) -> None:
    seen_sni: list[str | None] = []
    ctx = pki.server_ctx(SERVER)
    ctx.sni_callback = lambda sslobj, name, _ctx: seen_sni.append(name)  # type: ignore[assignment]
    srv = await TunnelServer(SERVER, lambda: ctx).start()
    conn = await dial(srv.address, pki.client_ctx(CLIENT), [SERVER])
    sslobj = conn.get_extra_info("ssl_object")
    assert sslobj.version() == "TLSv1.3"
    assert sslobj.cipher()[0] in ("TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256")
    assert sslobj.selected_alpn_protocol() == "h2"
    assert seen_sni == [None]
    await asyncio.sleep(0.05)
    assert not sslobj.session.has_ticket
    conn.close()
    await srv.close()


async def test_chacha20_only_client_is_refused(pki, server) -> None:
    ctx = pki.client_ctx(CLIENT)
    import _ssl
    import ctypes

    setter = ctypes.CDLL(_ssl.__file__).SSL_CTX_set_ciphersuites
    setter.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    setter(ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value, b"TLS_CHACHA20_POLY1305_SHA256")
    with pytest.raises(TlsFailure):
        await dial(server.address, ctx, [SERVER])
    # and our own contexts never offer it
    offered = {c["name"] for c in pki.client_ctx(CLIENT).get_ciphers() if c["protocol"] == "TLSv1.3"}
    assert offered == {"TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256"}
    assert _restrict_tls13_suites  # the mechanism under test


def _write_pair(cert) -> tuple[str, str]:
    import os
    import tempfile

    folder = tempfile.mkdtemp()
    chain, key = os.path.join(folder, "chain.pem"), os.path.join(folder, "key.pem")
    with open(chain, "wb") as f:
        f.write(cert.chain_pem)
    with open(key, "wb") as f:
        f.write(cert.key_pem)
    return chain, key


def test_socket_reads_go_straight_into_the_tls_buffer_under_uvloop(pki, monkeypatch) -> None:
    """The socket side of our TLS layer is a BufferedProtocol, and nothing else: uvloop (like asyncio)
    calls data_received on a protocol that is also an asyncio.Protocol, and the buffered read is then
    silently skipped. Under uvloop, the reads of an HBONE connection must arrive via buffer_updated."""
    import uvloop

    from hbone import tlslayer

    buffered_reads = []
    original = tlslayer._SocketLower.buffer_updated

    def counting(self: tlslayer._SocketLower, nbytes: int) -> None:
        buffered_reads.append(nbytes)
        original(self, nbytes)

    monkeypatch.setattr(tlslayer._SocketLower, "buffer_updated", counting)
    payload = bytes(range(256)) * 4096  # 1 MiB

    async def scenario() -> bytes:
        srv = await TunnelServer(SERVER, lambda: pki.server_ctx(SERVER)).start()
        app = await TcpApp(echo).start()
        try:
            conn = await dial(srv.address, pki.client_ctx(CLIENT), [SERVER])
            lower = conn._transport._lower  # type: ignore[union-attr]
            assert isinstance(lower.get_protocol(), asyncio.BufferedProtocol)
            assert not isinstance(lower.get_protocol(), asyncio.Protocol)
            tunnel = await conn.open_stream(f"127.0.0.1:{app.port}")
            reader, writer = stream_pair(tunnel)
            writer.write(payload)
            writer.write_eof()
            echoed = await asyncio.wait_for(reader.read(), 10)
            conn.close()
            return echoed
        finally:
            await app.close()
            await srv.close()

    assert uvloop.run(scenario()) == payload
    assert sum(buffered_reads) >= len(payload)  # at least the echo came back through buffered reads
