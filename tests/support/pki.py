"""The mesh PKI for tests: issue workload credentials and TLS contexts in one call."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from certs import CertificateAuthority, WorkloadCert, make_mesh_pki
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

    def server_ctx(self, identity: Identity, cluster: str = "cluster1") -> ssl.SSLContext:
        return server_context(self.cert(identity, cluster))

    def client_ctx(self, identity: Identity, cluster: str = "cluster1") -> ssl.SSLContext:
        return client_context(self.cert(identity, cluster))
