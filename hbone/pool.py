"""The HBONE connection pool (SPEC §3.6).

Streams with the same key share one HTTP/2 connection up to the stream limit, then another connection
opens. Only one dial per key runs at a time; callers that arrive meanwhile wait for it and use it, or get
its error. Connections idle longer than the release timeout are closed. A connection that drains (a GOAWAY
either way, or the earlier of its two certificates expiring, see `HboneConnection._check_expiry`) takes no
new streams, so the next caller dials a fresh one, with the certificate in force by then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .connection import HboneConnection
from .identity import Identity
from .tunnel import Tunnel

log = logging.getLogger("hbone.pool")

Dialer = Callable[[], Awaitable[HboneConnection]]


@dataclass(frozen=True, slots=True)
class PoolKey:
    """Source identity, the identities the server may have, the next hop, and the source IP."""

    source: Identity
    expected: frozenset[Identity]
    address: tuple[str, int]
    source_ip: str = ""


@dataclass
class _Entry:
    conns: list[HboneConnection] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    dials: int = 0
    last_error: BaseException | None = None


class Pool:
    def __init__(self, idle_timeout: float = 300.0) -> None:
        self.idle_timeout = idle_timeout
        self._entries: dict[PoolKey, _Entry] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self.connections_opened = 0

    def connections(self, key: PoolKey | None = None) -> list[HboneConnection]:
        entries = [self._entries[key]] if key is not None and key in self._entries else self._entries.values()
        return [c for e in entries for c in e.conns]

    async def acquire(self, key: PoolKey, dial: Dialer) -> HboneConnection:
        """A connection for `key` with one stream slot reserved for the caller."""
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
        conn = self._reserve(entry)
        if conn is not None:
            return conn
        seen_dials = entry.dials
        async with entry.lock:
            conn = self._reserve(entry)
            if conn is not None:
                return conn
            if entry.dials != seen_dials and entry.last_error is not None:
                # The dial we waited for failed; share its error rather than queueing another attempt.
                raise entry.last_error
            entry.dials += 1
            try:
                conn = await dial()
            except BaseException as exc:
                entry.last_error = exc
                raise
            entry.last_error = None
            self.connections_opened += 1
            entry.conns.append(conn)
            conn.closed.add_done_callback(lambda _: self._forget(key, conn))
            self._ensure_sweeper()
            if not conn.reserve():
                raise ConnectionError(f"new HBONE connection {conn!r} allows no streams")
            return conn

    async def open_stream(self, key: PoolKey, dial: Dialer, authority: str, headers: list[tuple[str, str]]) -> Tunnel:
        conn = await self.acquire(key, dial)
        try:
            return await conn.open_stream(authority, headers, reserved=True)
        except BaseException:
            conn.release_reservation()
            raise

    @staticmethod
    def _reserve(entry: _Entry) -> HboneConnection | None:
        for conn in entry.conns:
            if conn.reserve():
                return conn
        return None

    def _forget(self, key: PoolKey, conn: HboneConnection) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        with contextlib.suppress(ValueError):
            entry.conns.remove(conn)
        if not entry.conns and not entry.lock.locked():
            self._entries.pop(key, None)

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None and self.idle_timeout > 0:
            interval = max(0.05, min(30.0, self.idle_timeout / 2))
            self._sweeper = asyncio.get_running_loop().call_later(interval, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        now = time.monotonic()
        for conn in self.connections():
            if conn.idle_since is not None and now - conn.idle_since >= self.idle_timeout:
                log.debug("releasing idle HBONE connection %r", conn)
                conn.close("idle")
        if self._entries:
            self._ensure_sweeper()

    async def close(self, deadline: float = 0.0) -> None:
        """Close every pooled connection, letting open streams run up to `deadline` seconds."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        conns = self.connections()
        if deadline > 0:
            await asyncio.gather(*(c.shutdown(deadline) for c in conns), return_exceptions=True)
        for conn in conns:
            conn.abort("pool closed")
        self._entries.clear()
