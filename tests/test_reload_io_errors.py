"""A config or certificate change that cannot be read at the moment it is noticed (an I/O error: here the real
EMFILE of a process out of file descriptors, as a peer holding connections can cause) is read again at the
next check. Before, the change was remembered as seen and ignored until the files changed once more: a new
DENY policy, or a renewed certificate, never took effect."""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Iterator
from pathlib import Path

import yaml

from certs import CertificateAuthority, make_mesh_pki
from certs.providers import FileProvider
from hbone.identity import Identity
from mesh.watch import StateWatcher

DENY = {
    "name": "deny-sleep",
    "namespace": "default",
    "scope": "Namespace",
    "action": "Deny",
    "rules": [[[{"principals": [{"Exact": "cluster.local/ns/default/sa/sleep"}]}]]],
}
PRODUCTPAGE = Identity.parse("spiffe://cluster.local/ns/default/sa/productpage")


@contextlib.contextmanager
def out_of_file_descriptors() -> Iterator[None]:
    """This process at its file-descriptor limit (lowered to a few more than it holds, then filled), as long as
    the block runs; everything restored after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 16, hard))
    try:
        with contextlib.suppress(OSError):
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def write_config(path: Path, policies: list[dict]) -> None:
    path.write_text(yaml.safe_dump({"workloads": [], "services": [], "policies": policies}))


def test_a_config_change_unreadable_when_noticed_is_read_at_the_next_check(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    write_config(path, [])
    watcher = StateWatcher(path)
    watcher.load_initial()
    write_config(path, [DENY])
    with out_of_file_descriptors():
        assert not watcher.check()
    assert watcher.last_error is not None and "cannot read" in watcher.last_error
    assert watcher.check()  # the file has not changed since: read again all the same
    assert watcher.generation == 2 and watcher.last_error is None
    assert not watcher.check()


def test_a_renewed_certificate_unreadable_when_noticed_is_read_at_the_next_check(tmp_path: Path) -> None:
    ca = CertificateAuthority.load(make_mesh_pki(tmp_path / "ca", clusters=("c1",))["c1"])
    folder = tmp_path / "mounted"
    first = ca.issue(PRODUCTPAGE)
    first.write(folder)
    provider = FileProvider(folder)
    renewed = ca.issue(PRODUCTPAGE)
    renewed.write(folder)
    with out_of_file_descriptors():
        assert not provider.reload()
    assert provider.get(PRODUCTPAGE) == first
    assert provider.reload()  # the files have not changed since: read again all the same
    assert provider.get(PRODUCTPAGE) == renewed and provider.generation(PRODUCTPAGE) == 2
