"""Where the daemons get workload certificates from, behind one small interface.

`get` is synchronous and cheap when cached so it can sit on the connection path. `generation` lets a
caller notice a renewed certificate and build a new TLS context for *new* connections; connections
already open keep the context they were made with, so renewal never drops traffic.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Protocol, runtime_checkable

from certs import layout
from certs.authority import DEFAULT_WORKLOAD_TTL, CertificateAuthority
from certs.errors import CertError, CertReadError, NoCertificateError
from certs.times import Clock, utc_now
from certs.workload import WorkloadCert
from hbone.identity import Identity

log = logging.getLogger(__name__)


@runtime_checkable
class CertProvider(Protocol):
    def get(self, identity: Identity) -> WorkloadCert:
        """The current certificate for `identity`; raises CertError if there is none."""
        ...

    def generation(self, identity: Identity) -> int:
        """Bumped each time `get` starts returning a different certificate; 0 before the first."""
        ...


class MintingProvider:
    """Mints a certificate per identity on first use and again once the cached one is past half-life."""

    def __init__(
        self, ca: CertificateAuthority, ttl: timedelta = DEFAULT_WORKLOAD_TTL, clock: Clock = utc_now
    ) -> None:
        self._ca = ca
        self._ttl = ttl
        self._clock = clock
        self._certs: dict[Identity, WorkloadCert] = {}
        self._generations: dict[Identity, int] = {}
        # Daemons are single-threaded asyncio, but a lock makes the provider safe to share with
        # worker threads for the cost of an uncontended acquire.
        self._lock = threading.Lock()

    def get(self, identity: Identity) -> WorkloadCert:
        now = self._clock()
        with self._lock:
            cached = self._certs.get(identity)
            if cached is not None and now < cached.refresh_at:
                return cached
            try:
                fresh = self._ca.issue(identity, self._ttl, now=now)
            except CertError as exc:
                # Renewal starts at half-life precisely so a failure here can be ridden out.
                if cached is not None and not cached.expired(now):
                    log.warning(
                        "cannot renew the certificate for %s, keeping the current one: %s", identity, exc
                    )
                    return cached
                raise
            self._certs[identity] = fresh
            self._generations[identity] = self._generations.get(identity, 0) + 1
            if cached is not None:
                log.info(
                    "renewed the certificate for %s, valid until %s", identity, fresh.not_after.isoformat()
                )
            return fresh

    def generation(self, identity: Identity) -> int:
        return self._generations.get(identity, 0)


class StaticProvider:
    """Serves fixed certificates, never renewed: for tests that need a particular (e.g. expired) one."""

    def __init__(self, *certs: WorkloadCert) -> None:
        self._certs = {cert.identity: cert for cert in certs}

    def get(self, identity: Identity) -> WorkloadCert:
        try:
            return self._certs[identity]
        except KeyError:
            held = ", ".join(str(i) for i in self._certs) or "none"
            raise NoCertificateError(f"no certificate for {identity} (this provider holds: {held})") from None

    def generation(self, identity: Identity) -> int:
        return 1 if identity in self._certs else 0


_Stamp = tuple[tuple[int, int, int] | None, ...]


class FileProvider:
    """Serves the one identity whose certificate is mounted in a folder, following file replacements.

    Like a Kubernetes secret mount, the files are replaced from outside; `get` notices (at most once
    per `check_interval` seconds, so the hot path costs a clock read) and reloads. A replacement that
    does not load is logged and ignored: the last good certificate keeps serving.
    """

    def __init__(
        self,
        directory: Path | str,
        *,
        check_interval: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._dir = Path(directory)
        self._paths = tuple(
            self._dir / name for name in (layout.CERT_CHAIN, layout.WORKLOAD_KEY, layout.ROOT_CERT)
        )
        self._interval = check_interval
        self._monotonic = monotonic
        self._lock = threading.Lock()
        # A failure on first load is fatal (raised); later ones are not, there is something to fall back on.
        self._stamp = self._read_stamp()
        self._cert = WorkloadCert.load(self._dir)
        self._generation = 1
        self._next_check = monotonic() + check_interval
        self._read_error: str | None = None  # the last I/O error reading the files, reported once

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def identity(self) -> Identity:
        return self._cert.identity

    def get(self, identity: Identity) -> WorkloadCert:
        if self._monotonic() >= self._next_check:
            self.reload()
        cert = self._cert
        if identity != cert.identity:
            raise NoCertificateError(
                f"{self._paths[0]}: holds the certificate of {cert.identity}, not of {identity}"
            )
        return cert

    def generation(self, identity: Identity) -> int:
        return self._generation if identity == self._cert.identity else 0

    def reload(self) -> bool:
        """Reload now if the files changed since the last attempt; True if a new certificate is served."""
        with self._lock:
            self._next_check = self._monotonic() + self._interval
            # The stamp is taken before reading, so a change landing mid-read triggers another reload.
            stamp = self._read_stamp()
            if stamp == self._stamp:
                return False
            # Remembered even on failure, so a broken file is reported once, not every second.
            previous, self._stamp = self._stamp, stamp
            try:
                fresh = WorkloadCert.load(self._dir)
            except CertReadError as exc:
                # Not the files' fault (out of file descriptors, say): they are read again at the next check, or
                # a renewed certificate would be ignored until they change once more. Reported once per cause.
                self._stamp = previous
                if str(exc) != self._read_error:
                    log.warning("cannot read the changed certificate files (trying again), still serving %s: %s",
                                self._cert, exc)  # fmt: skip
                self._read_error = str(exc)
                return False
            except CertError as exc:
                log.warning("ignoring the changed certificate files, still serving %s: %s", self._cert, exc)
                return False
            self._read_error = None
            if fresh == self._cert:
                return False  # touched or rewritten with the same content: nothing to rebuild
            if fresh.identity != self._cert.identity:
                log.warning(
                    "%s now holds the certificate of %s (was %s)",
                    self._dir,
                    fresh.identity,
                    self._cert.identity,
                )
            self._cert = fresh
            self._generation += 1
            log.info("loaded a new certificate from %s: %s", self._dir, fresh)
            return True

    def _read_stamp(self) -> _Stamp:
        # The inode catches atomic replaces even when mtime and size are unchanged.
        stamps: list[tuple[int, int, int] | None] = []
        for path in self._paths:
            try:
                st = path.stat()
            except OSError:
                stamps.append(None)
            else:
                stamps.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stamps)
