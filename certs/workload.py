"""A workload's certificate as the daemons consume it: plain PEM bytes plus the facts needed to renew.

Plain bytes because `hbone` must not import this package; it builds its TLS contexts from these.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from certs import layout
from certs.chain import ChainError, spiffe_identity, verify_chain, without_roots
from certs.errors import CertError
from certs.pem import (
    certificates_pem,
    ensure_folder,
    key_matches,
    parse_certificates,
    parse_private_key,
    read_bytes,
    write_file,
)
from hbone.identity import Identity


@dataclass(frozen=True)
class WorkloadCert:
    identity: Identity
    chain_pem: bytes  # the leaf, then the intermediates up to (not including) a root
    key_pem: bytes
    root_pem: bytes  # the trust roots, possibly several concatenated
    not_before: datetime  # timezone-aware UTC
    not_after: datetime

    def __repr__(self) -> str:
        # Never the key: reprs end up in logs and tracebacks.
        return (
            f"WorkloadCert(identity={self.identity}, not_before={self.not_before.isoformat()}, "
            f"not_after={self.not_after.isoformat()})"
        )

    @property
    def lifetime(self) -> timedelta:
        return self.not_after - self.not_before

    @property
    def refresh_at(self) -> datetime:
        """Renew at half the lifetime, as Istio does, leaving the other half to ride out a CA outage."""
        return self.not_before + self.lifetime / 2

    def expired(self, now: datetime) -> bool:
        return now >= self.not_after

    @classmethod
    def from_pem(
        cls, chain_pem: bytes, key_pem: bytes, root_pem: bytes, *, sources: tuple[str, str, str] | None = None
    ) -> WorkloadCert:
        """Parse and check a workload's three PEM blobs; `sources` names them (file paths) in errors.

        Checks: the leaf is not a CA, has one SPIFFE URI SAN, matches the key, and chains to a root.
        """
        chain_src, key_src, root_src = sources or ("certificate chain", "private key", "root certificates")
        chain = parse_certificates(chain_pem, chain_src)
        key = parse_private_key(key_pem, key_src)
        roots = parse_certificates(root_pem, root_src)
        leaf = chain[0]
        try:
            identity = spiffe_identity(leaf)  # not a CA, one SPIFFE URI SAN: the rule peers are held to
        except ChainError as exc:
            raise CertError(f"{chain_src}: {exc}") from None
        try:
            verify_chain(chain, roots)
        except ChainError as exc:
            raise CertError(f"{chain_src}: {exc} (roots from {root_src})") from None
        if not key_matches(key, leaf):
            raise CertError(f"{key_src}: the private key does not belong to the certificate in {chain_src}")
        return cls(
            identity=identity,
            chain_pem=certificates_pem(without_roots(chain, roots)),
            key_pem=key_pem,
            root_pem=certificates_pem(roots),
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
        )

    @classmethod
    def load(cls, directory: Path | str) -> WorkloadCert:
        """Read a folder as `certs workload` writes it: cert-chain.pem, key.pem, root-cert.pem."""
        folder = Path(directory)
        if not folder.is_dir():
            raise CertError(f"{folder}: workload certificate folder not found")
        paths = (folder / layout.CERT_CHAIN, folder / layout.WORKLOAD_KEY, folder / layout.ROOT_CERT)
        chain_pem, key_pem, root_pem = (read_bytes(path) for path in paths)
        return cls.from_pem(
            chain_pem, key_pem, root_pem, sources=(str(paths[0]), str(paths[1]), str(paths[2]))
        )

    def write(self, directory: Path | str) -> None:
        folder = Path(directory)
        ensure_folder(folder)
        # Each file is replaced atomically; a watcher that catches the set half-replaced sees a key/cert
        # mismatch, keeps its last good certificate, and retries when the next file lands.
        write_file(folder / layout.WORKLOAD_KEY, self.key_pem, private=True)
        write_file(folder / layout.CERT_CHAIN, self.chain_pem)
        write_file(folder / layout.ROOT_CERT, self.root_pem)
