"""Certificates for benchmark processes, from our own mesh PKI, written as files every tool can read."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from certs import CertificateAuthority, make_mesh_pki
from certs.layout import CERT_CHAIN, ROOT_CERT, WORKLOAD_KEY
from hbone.identity import Identity

TRUST_DOMAIN = "cluster.local"
NAMESPACE = "bench"


@dataclass(frozen=True)
class CertFiles:
    """One workload's folder as `certs workload` writes it."""

    identity: Identity
    folder: Path

    @property
    def chain(self) -> Path:  # leaf then intermediate
        return self.folder / CERT_CHAIN

    @property
    def key(self) -> Path:
        return self.folder / WORKLOAD_KEY

    @property
    def root(self) -> Path:
        return self.folder / ROOT_CERT


class BenchPki:
    """A root and one cluster CA under `base`; `issue(name)` mints spiffe://cluster.local/ns/bench/sa/<name>."""

    def __init__(self, base: Path, cluster: str = "cluster1") -> None:
        self.base = base
        paths = make_mesh_pki(base / "ca", clusters=(cluster,))
        self.ca = CertificateAuthority.load(paths[cluster])

    def issue(self, name: str) -> CertFiles:
        identity = Identity(TRUST_DOMAIN, NAMESPACE, name)
        files = CertFiles(identity, self.base / name)
        self.ca.issue(identity).write(files.folder)
        return files
