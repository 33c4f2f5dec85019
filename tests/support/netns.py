"""Network namespaces the tests create and always remove."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager


def sh(*args: str, ns: str | None = None) -> str:
    cmd = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")
    return done.stdout


@contextmanager
def namespace(prefix: str, addresses: list[str]) -> Iterator[str]:
    """A namespace with lo up and `addresses` (/32s) on an interface with a default route."""
    name = f"{prefix}{os.getpid()}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "link", "set", "lo", "up", ns=name)
        # A veth pair inside the namespace (the dummy driver is not everywhere), pod addresses on one end.
        sh("ip", "link", "add", "pods0", "type", "veth", "peer", "name", "pods1", ns=name)
        sh("ip", "link", "set", "pods1", "up", ns=name)
        sh("ip", "link", "set", "pods0", "up", ns=name)
        for addr in addresses:
            sh("ip", "addr", "add", f"{addr}/32", "dev", "pods0", ns=name)
        sh("ip", "route", "add", "default", "dev", "pods0", ns=name)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
