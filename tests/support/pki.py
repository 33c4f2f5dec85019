"""The mesh PKI for tests: issue workload credentials and TLS contexts in one call."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from certs import CertificateAuthority, WorkloadCert, make_mesh_pki
from certs.pem import certificates_pem, private_key_pem
from hbone.identity import Identity
from hbone.tls import client_context, server_context


def ident(name: str, namespace: str = "default", trust_domain: str = "cluster.local") -> Identity:
    return Identity(trust_domain, namespace, name)


@dataclass
class TestPki:
    __test__ = False  # not a test class, despite the name

    paths: dict[str, Path]
    cas: dict[str, CertificateAuthority] = field(default_factory=dict)

    @classmethod
    def create(cls, base: Path) -> TestPki:
        paths = make_mesh_pki(base)
        pki = cls(paths)
        for cluster in ("cluster1", "cluster2"):
            pki.cas[cluster] = CertificateAuthority.load(paths[cluster])
        return pki

    def cert(
        self, identity: Identity, cluster: str = "cluster1", ttl: timedelta = timedelta(hours=1)
    ) -> WorkloadCert:
        return self.cas[cluster].issue(identity, ttl)

    def forged(self, uris: list[str], *, ca: bool = False, cluster: str = "cluster1") -> WorkloadCert:
        """A leaf signed by the cluster's real intermediate, with exactly the URI SANs given and, with
        `ca`, basicConstraints CA:TRUE: what a peer could present if it got hold of a signing mistake.
        `from_pem` would refuse it, so it is assembled by hand; `identity` is only a placeholder."""
        authority = self.cas[cluster]
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        usage = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                              data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                              encipher_only=False, decipher_only=False)  # fmt: skip
        issuer_ski = authority.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(authority.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
                           critical=True)
        )  # fmt: skip
        leaf = builder.sign(authority.key, hashes.SHA256())
        return WorkloadCert(
            identity=ident("forged"),
            chain_pem=certificates_pem((leaf, *authority.chain)),
            key_pem=private_key_pem(key),
            root_pem=authority.root_pem,
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
        )

    def server_ctx(self, identity: Identity, cluster: str = "cluster1") -> ssl.SSLContext:
        return server_context(self.cert(identity, cluster))

    def client_ctx(self, identity: Identity, cluster: str = "cluster1") -> ssl.SSLContext:
        return client_context(self.cert(identity, cluster))
