"""One call to lay out a whole mesh PKI on disk, for tests and the demo."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from certs.authority import DEFAULT_CLUSTER_TTL, DEFAULT_ROOT_TTL, CertificateAuthority
from certs.errors import CertError

ROOT_FOLDER = "root"


def make_mesh_pki(
    base_dir: Path | str,
    clusters: Sequence[str] = ("cluster1", "cluster2"),
    *,
    root_ttl: timedelta = DEFAULT_ROOT_TTL,
    cluster_ttl: timedelta = DEFAULT_CLUSTER_TTL,
) -> dict[str, Path]:
    """Write `<base>/root` and one cacerts folder `<base>/<cluster>` per cluster, all under one root.

    Returns {"root": root folder, "<cluster>": its cacerts folder, ...}.
    """
    if ROOT_FOLDER in clusters:
        raise CertError(f"a cluster cannot be named {ROOT_FOLDER!r}: that folder holds the root CA")
    base = Path(base_dir)
    root = CertificateAuthority.create_root(root_ttl)
    paths = {ROOT_FOLDER: base / ROOT_FOLDER}
    root.write_root(paths[ROOT_FOLDER])
    for cluster in clusters:
        paths[cluster] = base / cluster
        root.create_intermediate(cluster, cluster_ttl).write_cacerts(paths[cluster])
    return paths


def unrelated_ca(cluster: str = "elsewhere") -> CertificateAuthority:
    """An intermediate under a brand-new root that nothing trusts: for "wrong root" tests."""
    return CertificateAuthority.create_root().create_intermediate(cluster)
