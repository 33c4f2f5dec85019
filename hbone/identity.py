"""SPIFFE identities as Istio writes them: spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.

One definition of a valid id and of the identity a certificate carries, used for our own certificates
(`certs`) and for every peer (`hbone.tls`), so what we issue and what we accept cannot drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography import x509

SPIFFE_PREFIX = "spiffe://"
DEFAULT_TRUST_DOMAIN = "cluster.local"
MAX_ID_LENGTH = 2048  # SPIFFE-ID §2.3
MAX_TRUST_DOMAIN_LENGTH = 255  # SPIFFE-ID §2.1

# SPIFFE-ID §2: a trust domain is lowercase letters, digits, '.', '-' and '_'; a path segment may add
# uppercase letters and is never '.' or '..'. So no percent-encoding, query, fragment, port or user info:
# ids are compared as strings, and one name must have exactly one spelling.
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


class IdentityError(ValueError):
    """A string that is not an Istio SPIFFE identity, or a certificate that does not carry exactly one."""


def check_trust_domain(trust_domain: str) -> str:
    """`trust_domain` if SPIFFE-ID §2.1 allows it, else IdentityError saying why."""
    if not trust_domain:
        raise IdentityError("the trust domain is empty")
    if len(trust_domain) > MAX_TRUST_DOMAIN_LENGTH:
        raise IdentityError(f"a trust domain is at most {MAX_TRUST_DOMAIN_LENGTH} characters")
    if not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise IdentityError("the trust domain may only hold lowercase letters, digits, '.', '-' and '_'")
    return trust_domain


def check_segment(segment: str) -> str:
    """`segment` if SPIFFE-ID §2.2 allows it as a path segment (a namespace or service account), else
    IdentityError saying why."""
    if not segment:
        raise IdentityError("a namespace or service account is empty")
    if segment in (".", "..") or not _SEGMENT.fullmatch(segment):
        raise IdentityError(
            "a namespace or service account may only hold letters, digits, '.', '-' and '_', and is not '.' or"
            " '..' (no percent-encoding, query or fragment)"
        )
    return segment


@dataclass(frozen=True, slots=True)
class Identity:
    """A workload identity. `parse` (a peer's) and `of` (one we issue) check it by the same rules; the bare
    constructor does not, for callers that already did (and tests that forge a bad certificate on purpose)."""

    trust_domain: str
    namespace: str
    service_account: str

    @classmethod
    def parse(cls, text: str) -> Identity:
        """Parse `spiffe://td/ns/NS/sa/SA` strictly; anything else raises IdentityError saying why."""
        if not text.startswith(SPIFFE_PREFIX):
            raise IdentityError(f"{text!r} is not a SPIFFE id: it must start with {SPIFFE_PREFIX!r}")
        if len(text) > MAX_ID_LENGTH:
            raise IdentityError(f"SPIFFE id of {len(text)} characters is longer than {MAX_ID_LENGTH}")
        parts = text[len(SPIFFE_PREFIX) :].split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            raise IdentityError(f"{text!r} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<sa>")
        trust_domain, _, namespace, _, service_account = parts
        try:
            return cls._checked(trust_domain, namespace, service_account)
        except IdentityError as exc:
            raise IdentityError(f"{text!r}: {exc}") from None

    @classmethod
    def of(cls, namespace: str, service_account: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> Identity:
        """The identity of a workload we issue a certificate for or present: refused (IdentityError) by the rule
        `parse` applies to peers, so that no name is accepted here only to fail every handshake later."""
        return cls._checked(trust_domain or DEFAULT_TRUST_DOMAIN, namespace, service_account or "default")

    @classmethod
    def _checked(cls, trust_domain: str, namespace: str, service_account: str) -> Identity:
        size = len(SPIFFE_PREFIX) + len(trust_domain) + len(namespace) + len(service_account) + len("/ns//sa/")
        if size > MAX_ID_LENGTH:
            raise IdentityError(f"SPIFFE id of {size} characters is longer than {MAX_ID_LENGTH}")
        return cls(check_trust_domain(trust_domain), check_segment(namespace), check_segment(service_account))

    @property
    def principal(self) -> str:
        """The identity without `spiffe://`, as authorization policies match it."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return SPIFFE_PREFIX + self.principal


def is_ca(cert: x509.Certificate) -> bool:
    """basicConstraints CA:TRUE. Raises what `cryptography` raises for extensions it cannot read."""
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def uri_sans(cert: x509.Certificate) -> list[str]:
    """Every URI in the subjectAltName, in order. Raises what `cryptography` raises for extensions it cannot read."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def certificate_identity(cert: x509.Certificate) -> Identity:
    """The workload identity of a leaf certificate (SPEC §3.1), or IdentityError saying why there is none.

    The leaf must not be a CA, and must carry exactly one URI SAN, a strict SPIFFE id. Taking "the first URI
    that parses" or "any URI that matches" would let one certificate speak for several identities.
    """
    try:
        ca = is_ca(cert)
        uris = uri_sans(cert)
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise IdentityError(f"the certificate's extensions cannot be read: {exc}") from None
    if ca:
        raise IdentityError("the certificate is a CA (basicConstraints CA:TRUE), not a workload certificate")
    if len(uris) != 1:
        shown = ", ".join(repr(u) for u in uris[:4]) + (", ..." if len(uris) > 4 else "")
        raise IdentityError(
            f"the certificate must have exactly one URI SAN (its SPIFFE id), found {len(uris)}"
            + (f": {shown}" if uris else "")
        )
    return Identity.parse(uris[0])
