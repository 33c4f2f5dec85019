"""Mutual TLS for HBONE (SPEC §3.1): contexts, and the peer checks done right after the handshake.

TLS 1.3 only, AES-GCM suites only, ALPN `h2`, no resumption, no SNI from the client. Python's `ssl` has no
hook inside certificate verification, so OpenSSL checks the chain and validity during the handshake and we
check the peer's leaf (one URI SAN, a strict SPIFFE id, not a CA) and its identity (client: expected
identities; server: trust domain) immediately after it, before a single HTTP/2 byte is exchanged.
"""

from __future__ import annotations

import ctypes
import logging
import os
import ssl
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509

from .errors import TlsFailure, WrongIdentity
from .identity import Identity, IdentityError, certificate_identity

log = logging.getLogger("hbone.tls")

ALPN = "h2"
TLS13_SUITES = ("TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256")


class Credentials(Protocol):
    """What one side presents: its certificate chain (leaf first), its key, and the roots it trusts.

    `certs.WorkloadCert` is one; hbone only needs these four attributes.
    """

    @property
    def identity(self) -> Identity: ...
    @property
    def chain_pem(self) -> bytes: ...
    @property
    def key_pem(self) -> bytes: ...
    @property
    def root_pem(self) -> bytes: ...


def _restrict_tls13_suites(ctx: ssl.SSLContext) -> None:
    """Python cannot set TLS 1.3 suites, so call OpenSSL on the context's SSL_CTX.

    If that is impossible on some build, `check_cipher` still refuses any other suite after the handshake.
    """
    try:
        import _ssl

        lib = ctypes.CDLL(_ssl.__file__)
        setter = lib.SSL_CTX_set_ciphersuites
        setter.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        setter.restype = ctypes.c_int
        # PySSLContext starts with PyObject_HEAD followed by the SSL_CTX pointer.
        ssl_ctx = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
        if not setter(ssl_ctx, ":".join(TLS13_SUITES).encode()):
            raise OSError("SSL_CTX_set_ciphersuites refused the list")
    except (OSError, AttributeError) as exc:  # pragma: no cover - depends on the Python build
        log.warning("cannot restrict TLS 1.3 suites in OpenSSL (%s); checking after the handshake", exc)
        return
    suites = {c["name"] for c in ctx.get_ciphers() if c.get("protocol") == "TLSv1.3"}
    if not suites <= set(TLS13_SUITES):  # pragma: no cover - the pointer trick hit something else
        log.warning("TLS 1.3 suites are %s after restriction; checking after the handshake", suites)


def _load_chain(ctx: ssl.SSLContext, creds: Credentials) -> None:
    # ssl can only load a key from a file: write it to a private temporary folder and remove it at once.
    with tempfile.TemporaryDirectory(prefix="hbone-") as tmp:
        os.chmod(tmp, 0o700)
        chain, key = os.path.join(tmp, "chain.pem"), os.path.join(tmp, "key.pem")
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(creds.key_pem)
        with open(chain, "wb") as f:
            f.write(creds.chain_pem)
        ctx.load_cert_chain(chain, key)


def _base_context(purpose: int, creds: Credentials) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    _restrict_tls13_suites(ctx)
    ctx.set_alpn_protocols([ALPN])
    ctx.options |= ssl.OP_NO_TICKET
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=creds.root_pem.decode("ascii"))
    _load_chain(ctx, creds)
    _remember_not_after(ctx, creds.chain_pem)
    return ctx


def server_context(creds: Credentials) -> ssl.SSLContext:
    """A server context presenting `creds` and requiring a client certificate from the same roots."""
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER, creds)
    ctx.num_tickets = 0  # no resumption
    return ctx


def client_context(creds: Credentials) -> ssl.SSLContext:
    """A client context presenting `creds`; the server's identity is checked by `check_server`."""
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT, creds)
    ctx.check_hostname = False  # the SPIFFE URI SAN is checked instead, and no SNI is sent
    return ctx


@dataclass(frozen=True, slots=True)
class VerifiedPeer:
    """A peer that passed the checks: its workload identity, and its certificate's notAfter (Unix time)."""

    identity: Identity
    not_after: float


def verified_peer(ssl_object: ssl.SSLObject | ssl.SSLSocket, side: str) -> VerifiedPeer:
    """The peer the verified certificate names (workload identity and notAfter), or WrongIdentity saying why it
    names none.

    OpenSSL has checked the chain and validity; the rule for the leaf itself (exactly one URI SAN, a strict
    SPIFFE id, not a CA) is `certificate_identity`, the same one our own certificates are loaded with. The
    certificate is parsed once, here: its notAfter comes along for `session_not_after`.
    """
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise WrongIdentity(f"{side} presented no certificate")
    try:
        cert = x509.load_der_x509_certificate(der)
        return VerifiedPeer(certificate_identity(cert), cert.not_valid_after_utc.timestamp())
    except IdentityError as exc:
        raise WrongIdentity(f"{side} certificate refused: {exc}") from None
    except ValueError as exc:
        raise WrongIdentity(f"{side} certificate cannot be parsed: {exc}") from None


def check_session(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> None:
    """The negotiated session must be TLS 1.3, AES-GCM and ALPN h2, whatever the peer offered."""
    version = ssl_object.version()
    if version != "TLSv1.3":
        raise TlsFailure(f"peer negotiated {version}, only TLSv1.3 is allowed")
    cipher = ssl_object.cipher()
    if not cipher or cipher[0] not in TLS13_SUITES:
        raise TlsFailure(f"peer negotiated cipher {cipher and cipher[0]}, only AES-GCM suites are allowed")
    alpn = ssl_object.selected_alpn_protocol()
    if alpn != ALPN:
        raise TlsFailure(f"peer did not negotiate ALPN {ALPN!r} (got {alpn!r})")


def check_server(ssl_object: ssl.SSLObject | ssl.SSLSocket, expected: Iterable[Identity]) -> VerifiedPeer:
    """Client side: accept the server only if its one SPIFFE identity is one of the expected identities."""
    check_session(ssl_object)
    peer = verified_peer(ssl_object, "server")
    wanted = set(expected)
    if peer.identity in wanted:
        return peer
    names = ", ".join(sorted(str(i) for i in wanted)) or "(none)"
    raise WrongIdentity(f"server presented {peer.identity}; expected one of {names}")


def check_client(ssl_object: ssl.SSLObject | ssl.SSLSocket, trust_domain: str) -> VerifiedPeer:
    """Server side: the client certificate chained to our roots (OpenSSL checked that); its SPIFFE
    identity must be in our trust domain. Which client may do what is authorization's business."""
    check_session(ssl_object)
    peer = verified_peer(ssl_object, "client")
    if peer.identity.trust_domain != trust_domain:
        raise WrongIdentity(f"client {peer.identity} is not in trust domain {trust_domain!r}")
    return peer


def describe_ssl_error(exc: BaseException) -> str:
    """A short reason for a failed handshake, for logs and error messages."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verification failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or exc.__class__.__name__
        mapping = {
            "PEER_DID_NOT_RETURN_A_CERTIFICATE": "peer presented no client certificate",
            "TLSV13_ALERT_CERTIFICATE_REQUIRED": "server requires a client certificate and none was sent",
            "NO_APPLICATION_PROTOCOL": "no common ALPN protocol (h2 required)",
            "TLSV1_ALERT_NO_APPLICATION_PROTOCOL": "no common ALPN protocol (h2 required)",
            "SSLV3_ALERT_CERTIFICATE_EXPIRED": "peer rejected our certificate as expired",
            "TLSV1_ALERT_UNKNOWN_CA": "peer does not trust our certificate's issuer (unknown CA)",
            "SSLV3_ALERT_BAD_CERTIFICATE": "peer rejected our certificate",
            "WRONG_VERSION_NUMBER": "peer does not speak TLS (wrong version number)",
            "UNSUPPORTED_PROTOCOL": "peer does not support TLS 1.3",
            "TLSV1_ALERT_PROTOCOL_VERSION": "peer does not support TLS 1.3",
        }
        return mapping.get(reason, f"TLS error {reason}")
    if isinstance(exc, TimeoutError):
        return "TLS handshake timed out"
    if isinstance(exc, ConnectionError | EOFError):
        return f"connection closed during the TLS handshake ({exc.__class__.__name__})"
    return str(exc) or exc.__class__.__name__


# -- how long a session's authentication holds (SPEC §3.1: an expired certificate is refused) ---------------
# Both sides count by their leaf's notAfter. Python's `ssl` (before 3.13) shows us only the peer's leaf, not the
# intermediates it sent, so the leaf is all we can know of the peer; our own side is counted the same way so the
# two agree. A leaf that outlives its issuer is the issuer's mistake, which our CA refuses to make
# (`certs.authority`), and OpenSSL has checked every certificate of both chains at the handshake.
def _remember_not_after(ctx: ssl.SSLContext, chain_pem: bytes) -> None:
    """Keep on the context when the certificate it presents expires (Unix time, the leaf's notAfter): Python's
    `ssl` cannot tell us our own certificate after the fact."""
    leaf = x509.load_pem_x509_certificate(chain_pem)  # the first certificate of the chain
    ctx.hbone_not_after = leaf.not_valid_after_utc.timestamp()  # type: ignore[attr-defined]


def session_not_after(ctx: ssl.SSLContext, peer: VerifiedPeer) -> float:
    """When the session made with `ctx` stops being authenticated (Unix time): the earlier of our certificate's
    notAfter and the peer's (as `check_client`/`check_server` found it). Only the peer's for a context not
    made here."""
    ours: float | None = getattr(ctx, "hbone_not_after", None)
    return peer.not_after if ours is None else min(ours, peer.not_after)
