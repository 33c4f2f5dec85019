"""Certificate authorities: the mesh root, the per-cluster intermediates, and minting workload certs.

The intermediate is our in-process stand-in for istiod's CA: daemons load a cacerts folder and mint
their workloads' certificates themselves instead of asking istiod over CSR.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509

from certs import builder, layout
from certs.chain import ChainError, describe, is_root, verify_chain, without_roots
from certs.errors import CertError
from certs.pem import (
    PrivateKey,
    certificates_pem,
    ensure_folder,
    key_matches,
    private_key_pem,
    read_certificates,
    read_private_key,
    write_file,
)
from certs.times import CLOCK_SKEW, format_duration, utc_now
from certs.workload import WorkloadCert
from hbone.identity import Identity, is_ca

DEFAULT_ROOT_TTL = timedelta(days=3650)
DEFAULT_CLUSTER_TTL = timedelta(days=365)
DEFAULT_WORKLOAD_TTL = timedelta(hours=24)


@dataclass(frozen=True)
class CertificateAuthority:
    """A signing certificate and key, with what a peer needs to trust what it signs."""

    cert: x509.Certificate
    key: PrivateKey = field(repr=False)
    # This CA's certificate and any CAs above it, excluding the roots; empty when this CA is a root.
    chain: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]

    def __repr__(self) -> str:
        return f"CertificateAuthority({describe(self.cert)!r}, not_after={self.not_after.isoformat()})"

    @property
    def not_before(self) -> datetime:
        return self.cert.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.cert.not_valid_after_utc

    @property
    def root_pem(self) -> bytes:
        return certificates_pem(self.roots)

    @property
    def is_root(self) -> bool:
        return not self.chain

    # --- making CAs -------------------------------------------------------------------------------

    @classmethod
    def create_root(
        cls,
        ttl: timedelta = DEFAULT_ROOT_TTL,
        *,
        organization: str = builder.DEFAULT_ORGANIZATION,
        now: datetime | None = None,
    ) -> CertificateAuthority:
        """A fresh self-signed root. Calling it again gives an unrelated root (handy for negative tests)."""
        not_before, not_after = _validity(now, ttl)
        key = builder.new_key()
        cert = builder.build_root(key, not_before, not_after, organization)
        return cls(cert=cert, key=key, chain=(), roots=(cert,))

    def create_intermediate(
        self, cluster: str, ttl: timedelta = DEFAULT_CLUSTER_TTL, *, now: datetime | None = None
    ) -> CertificateAuthority:
        """A per-cluster CA signed by this one; clusters under the same root trust each other."""
        if not cluster.strip():
            raise CertError("the cluster name must not be empty")
        not_before, not_after = _validity(now, ttl)
        self._check_outlives(not_after, ttl)
        key = builder.new_key()
        cert = builder.build_intermediate(
            key.public_key(), cluster, self.cert, self.key, not_before, not_after
        )
        return CertificateAuthority(cert=cert, key=key, chain=(cert, *self.chain), roots=self.roots)

    # --- minting workload certificates ------------------------------------------------------------

    def issue(
        self,
        identity: Identity,
        ttl: timedelta = DEFAULT_WORKLOAD_TTL,
        *,
        now: datetime | None = None,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> WorkloadCert:
        """Mint a workload certificate for `identity`, valid from `now` minus the clock skew for `ttl`.

        `not_before`/`not_after` override the window outright and skip the "outlives the CA" check:
        they exist to build deliberately expired or not-yet-valid certificates for tests.
        """
        start, end = _validity(now, ttl)
        if not_after is None:
            self._check_outlives(end, ttl)
        start = not_before or start
        end = not_after or end
        if end <= start:
            raise CertError(
                f"not_after ({end.isoformat()}) must be later than not_before ({start.isoformat()})"
            )
        key = builder.new_key()
        leaf = builder.build_leaf(key.public_key(), identity, self.cert, self.key, start, end)
        return WorkloadCert(
            identity=identity,
            chain_pem=certificates_pem((leaf, *self.chain)),
            key_pem=private_key_pem(key),
            root_pem=self.root_pem,
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
        )

    def _check_outlives(self, not_after: datetime, ttl: timedelta) -> None:
        # A certificate that outlives its issuer would fail verification early and confusingly;
        # refusing here says why.
        if not_after > self.not_after:
            raise CertError(
                f"a certificate valid for {format_duration(ttl)} would outlive its issuing CA "
                f"{describe(self.cert)!r}, which expires {self.not_after.isoformat()}"
            )

    # --- folders ----------------------------------------------------------------------------------

    @classmethod
    def load(cls, cacerts_dir: Path | str) -> CertificateAuthority:
        """Load an Istio plug-in `cacerts` folder: ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem."""
        folder = _existing_folder(cacerts_dir, "cacerts")
        cert_path, key_path = folder / layout.CA_CERT, folder / layout.CA_KEY
        roots_path, chain_path = folder / layout.ROOT_CERT, folder / layout.CERT_CHAIN
        cert = read_certificates(cert_path)[0]
        key = read_private_key(key_path)
        roots = read_certificates(roots_path)
        chain = read_certificates(chain_path)
        if not is_ca(cert):
            raise CertError(
                f"{cert_path}: {describe(cert)!r} is not a CA certificate (basicConstraints CA:false)"
            )
        if not key_matches(key, cert):
            raise CertError(f"{key_path}: the private key does not belong to the certificate in {cert_path}")
        if chain[0] != cert:
            raise CertError(f"{chain_path}: must start with the certificate in {cert_path}")
        try:
            verify_chain(chain, roots)
        except ChainError as exc:
            raise CertError(f"{chain_path}: {exc} (roots from {roots_path})") from None
        return cls(cert=cert, key=key, chain=tuple(without_roots(chain, roots)), roots=tuple(roots))

    @classmethod
    def load_root(cls, root_dir: Path | str) -> CertificateAuthority:
        """Load a folder written by `certs root`: root-cert.pem and root-key.pem."""
        folder = _existing_folder(root_dir, "root CA")
        cert_path, key_path = folder / layout.ROOT_CERT, folder / layout.ROOT_KEY
        cert = read_certificates(cert_path)[0]
        key = read_private_key(key_path)
        if not (is_ca(cert) and is_root(cert)):
            raise CertError(f"{cert_path}: {describe(cert)!r} is not a self-signed CA certificate")
        if not key_matches(key, cert):
            raise CertError(f"{key_path}: the private key does not belong to the certificate in {cert_path}")
        return cls(cert=cert, key=key, chain=(), roots=(cert,))

    def write_root(self, out_dir: Path | str) -> None:
        if not self.is_root:
            raise CertError(f"{describe(self.cert)!r} is not a root CA")
        folder = Path(out_dir)
        ensure_folder(folder)
        write_file(folder / layout.ROOT_KEY, private_key_pem(self.key), private=True)
        write_file(folder / layout.ROOT_CERT, certificates_pem([self.cert]))

    def write_cacerts(self, out_dir: Path | str) -> None:
        """Write the Istio plug-in layout; cert-chain.pem is this CA up to and including its root."""
        folder = Path(out_dir)
        ensure_folder(folder)
        top_root = verify_chain(self.chain, self.roots) if self.chain else self.cert
        chain = (*self.chain, top_root) if self.chain else (self.cert,)
        write_file(folder / layout.CA_KEY, private_key_pem(self.key), private=True)
        write_file(folder / layout.CA_CERT, certificates_pem([self.cert]))
        write_file(folder / layout.ROOT_CERT, self.root_pem)
        write_file(folder / layout.CERT_CHAIN, certificates_pem(chain))


def _validity(now: datetime | None, ttl: timedelta) -> tuple[datetime, datetime]:
    if ttl <= timedelta():
        raise CertError(f"the certificate lifetime must be positive, got {ttl}")
    start = now or utc_now()
    if start.tzinfo is None:
        raise CertError("times must be timezone-aware (UTC)")
    # Backdated for clock skew, but the lifetime still counts from now, as the user asked.
    return start - CLOCK_SKEW, start + ttl


def _existing_folder(path: Path | str, what: str) -> Path:
    folder = Path(path)
    if not folder.exists():
        raise CertError(f"{folder}: {what} folder not found")
    if not folder.is_dir():
        raise CertError(f"{folder}: expected a {what} folder, found a file")
    return folder


def trusted_roots_pem(*authorities: CertificateAuthority) -> bytes:
    """The roots of several CAs, deduplicated: what a peer trusts during a root rotation."""
    seen: list[x509.Certificate] = []
    for cert in (root for ca in authorities for root in ca.roots):
        if cert not in seen:
            seen.append(cert)
    return certificates_pem(seen)
