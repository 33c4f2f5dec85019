"""The mesh PKI: a root, one intermediate CA per cluster (Istio's plug-in `cacerts` layout), workload
certificates with a single SPIFFE URI SAN, and the providers the daemons get certificates from.

`hbone` never imports this package: it receives plain PEM bytes through `WorkloadCert`.
"""

from certs.authority import CertificateAuthority, trusted_roots_pem
from certs.errors import CertError, NoCertificateError
from certs.mesh_pki import make_mesh_pki, unrelated_ca
from certs.providers import CertProvider, FileProvider, MintingProvider, StaticProvider
from certs.times import Clock, parse_duration, utc_now
from certs.workload import WorkloadCert

__all__ = [
    "CertError",
    "CertProvider",
    "CertificateAuthority",
    "Clock",
    "FileProvider",
    "MintingProvider",
    "NoCertificateError",
    "StaticProvider",
    "WorkloadCert",
    "make_mesh_pki",
    "parse_duration",
    "trusted_roots_pem",
    "unrelated_ca",
    "utc_now",
]
