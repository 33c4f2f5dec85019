"""Checks on certificate chains that we do ourselves before handing bytes to TLS.

Loading a folder is where a mistake is cheapest to explain: a TLS handshake failure later only says
"unknown ca", while here we can name the file and the certificate that does not fit.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from hbone.identity import Identity, IdentityError, certificate_identity, uri_sans


class ChainError(ValueError):
    """A chain that does not link up; the caller adds which file it came from."""


def describe(cert: x509.Certificate) -> str:
    """A short human name for a certificate in messages: its subject, or its URI SAN if it has none."""
    if cert.subject.rfc4514_string():
        return cert.subject.rfc4514_string()
    uris = uri_sans(cert)
    return uris[0] if uris else f"serial {cert.serial_number:x}"


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def is_root(cert: x509.Certificate) -> bool:
    return issued_by(cert, cert)


def without_roots(
    certs: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]
) -> list[x509.Certificate]:
    """Drop trust anchors from a chain: peers already have them, and Istio's files sometimes include them."""
    return [cert for cert in certs if cert not in roots]


def verify_chain(chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate]) -> x509.Certificate:
    """Check each certificate is signed by the next and the last by one of `roots`; return that root.

    Validity dates are deliberately not checked: tests build expired certificates on purpose, and
    expiry is the TLS handshake's business.
    """
    links = without_roots(chain, roots)
    if not links:
        # The chain is only a root itself (a CA that is its own trust anchor).
        if chain:
            return chain[0]
        raise ChainError("the chain is empty")
    for child, parent in itertools.pairwise(links):
        if not issued_by(child, parent):
            raise ChainError(
                f"{describe(child)!r} is not signed by the next certificate, {describe(parent)!r}"
            )
    top = links[-1]
    for root in roots:
        if issued_by(top, root):
            return root
    raise ChainError(
        f"{describe(top)!r} (issuer {top.issuer.rfc4514_string()!r}) is not signed by any trusted root"
    )


def spiffe_identity(cert: x509.Certificate) -> Identity:
    """The workload identity of a leaf, by the same rule peers are checked with (`hbone.identity`)."""
    try:
        return certificate_identity(cert)
    except IdentityError as exc:
        raise ChainError(f"the first certificate, the workload's own, is refused: {exc}") from None

