"""TLS contexts per workload identity, rebuilt when the certificate behind them is renewed.

A renewed certificate only affects new connections: live ones keep the context they were made with.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from certs import CertificateAuthority, CertProvider, FileProvider, MintingProvider
from hbone.identity import Identity
from hbone.server import ServerIdentity
from hbone.tls import client_context, server_context


class TlsIdentities:
    def __init__(self, provider: CertProvider) -> None:
        self.provider = provider
        self._server: dict[Identity, tuple[int, ServerIdentity]] = {}
        self._client: dict[Identity, tuple[int, ssl.SSLContext]] = {}

    @classmethod
    def from_settings(cls, ca_certs_dir: str | None, cert_dir: str | None, ttl_seconds: float) -> TlsIdentities:
        """Mint from the cluster's cacerts folder (our stand-in for istiod's CA), or load from files."""
        from datetime import timedelta

        if cert_dir:
            return cls(FileProvider(Path(cert_dir)))
        if not ca_certs_dir:
            raise ValueError("set CA_CERTS_DIR (the cluster's cacerts folder) or CERT_DIR (certificate files)")
        ca = CertificateAuthority.load(Path(ca_certs_dir))
        return cls(MintingProvider(ca, ttl=timedelta(seconds=ttl_seconds)))

    def server(self, identity: Identity) -> ServerIdentity:
        """The server context presenting `identity` (fetched, and minted if needed, on first use)."""
        cert = self.provider.get(identity)
        generation = self.provider.generation(identity)
        cached = self._server.get(identity)
        if cached is None or cached[0] != generation:
            cached = (generation, ServerIdentity(server_context(cert), identity))
            self._server[identity] = cached
        return cached[1]

    def client(self, identity: Identity) -> ssl.SSLContext:
        cert = self.provider.get(identity)
        generation = self.provider.generation(identity)
        cached = self._client.get(identity)
        if cached is None or cached[0] != generation:
            cached = (generation, client_context(cert))
            self._client[identity] = cached
        return cached[1]

    def describe(self) -> list[dict[str, str]]:
        """What /config_dump shows about certificates: identities and validity, never keys."""
        out = []
        for identity in sorted({*self._server, *self._client}, key=str):
            cert = self.provider.get(identity)
            out.append(
                {
                    "identity": str(identity),
                    "notBefore": cert.not_before.isoformat(),
                    "notAfter": cert.not_after.isoformat(),
                }
            )
        return out
