"""Upstream connections kept per endpoint, as Envoy's per-endpoint connection pools (SPEC §6).

Balancing stays per request: the forwarder picks the request's endpoint first, and only then asks here for
a connection to that endpoint. HTTP/1.1 takes an idle keep-alive stream to it if there is one, else a new
one, and gives it back after a complete exchange; HTTP/2 requests are streams on an HTTP/2 connection to it
that concurrent requests share, up to `H2_MAX_STREAMS`.

Each upstream connection is one HBONE CONNECT stream (or, through a gateway, a double-HBONE inner stream, or
plain TCP) to one endpoint, keyed by everything that was sent or verified when it opened: the hop (address,
authority, identities), the service named in `forwarded`, our own baggage, the upstream protocol. Its
destination peer labels are those learned when it opened (the CONNECT's response baggage) and stay with it.

A connection is never reused after a partial or failed exchange, a timeout, or when the upstream asked to
close; idle ones leave at once when the upstream ends them, after `IDLE_TIMEOUT`, and when their endpoint
changes or leaves the mesh state. A hop through a gateway to a network that stands for several endpoints
(capacity > 1) is not pooled: the gateway picks the endpoint per connection, so a kept connection would pin
requests to one remote pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Hashable
from typing import Protocol, TypeVar

from hbone.errors import HboneError
from mesh.metrics import PeerLabels
from mesh.routing import Hop, HopKind
from mesh.state import MeshState
from waypoint_py.h2_driver import H2Driver
from waypoint_py.http_types import Upstream
from waypoint_py.streams import watched
from waypoint_py.upstream_dial import UpstreamDialer, UpstreamStream
from waypoint_py.upstream_h1 import Http1Upstream
from waypoint_py.upstream_h2 import Http2Upstream

log = logging.getLogger("waypoint.pool")

MAX_IDLE_PER_ENDPOINT = 32
IDLE_TIMEOUT = 60.0
H2_MAX_STREAMS = 100

Key = tuple[Hashable, ...]
_C = TypeVar("_C")  # a pooled connection of either kind


def endpoint_key(hop: Hop, protocol: str, baggage: str) -> Key | None:
    """What a kept connection must match to carry this request; None for a hop that is never pooled."""
    if hop.kind is HopKind.DOUBLE_HBONE and (hop.workload is None or hop.workload.capacity != 1):
        return None
    if hop.kind is HopKind.PASSTHROUGH:
        return None
    return (protocol, hop.kind, hop.address, hop.authority, hop.expected, hop.inner_expected, hop.service_hostname,
            baggage)  # fmt: skip


class Lease(Protocol):
    """One request's use of an upstream connection."""

    client: Upstream
    reused: bool  # the connection carried an earlier request

    @property
    def destination(self) -> PeerLabels: ...

    @property
    def address(self) -> str: ...

    def release(self, complete: bool) -> None:
        """The exchange is over; `complete`: the whole response came back and was relayed."""


class H1Connection:
    """An HTTP/1.1 upstream stream; lent to one request at a time."""

    __slots__ = ("client", "exchanges", "hop", "idle_since", "in_use", "key", "pool", "up")

    def __init__(self, pool: UpstreamPool, key: Key | None, hop: Hop, up: UpstreamStream) -> None:
        self.pool = pool
        self.key = key
        self.hop = hop
        self.up = up
        self.client = Http1Upstream(up.reader, up.writer)
        self.exchanges = 0
        self.idle_since = 0.0
        self.in_use = True
        protocol = watched(up.writer)
        if protocol is not None and key is not None:
            protocol.on_end = self._ended

    # -- Lease ------------------------------------------------------------------------------------------
    @property
    def reused(self) -> bool:
        return self.exchanges > 0

    @property
    def destination(self) -> PeerLabels:
        return self.up.destination

    @property
    def address(self) -> str:
        return self.up.address

    def release(self, complete: bool) -> None:
        self.pool._release_h1(self, complete)

    # ---------------------------------------------------------------------------------------------------
    def usable(self) -> bool:
        """Still fit for a request: nothing arrived while idle (not even the upstream's end)."""
        reader = self.up.reader
        return (not self.up.writer.is_closing() and not reader.at_eof() and reader.exception() is None
                and not reader._buffer)  # type: ignore[attr-defined]  # fmt: skip

    def close(self) -> None:
        self.in_use = False
        protocol = watched(self.up.writer)
        if protocol is not None:
            protocol.on_end = None
        self.up.close()

    def _ended(self) -> None:
        """The upstream ended the stream (or it was lost): an idle connection leaves the pool now."""
        if not self.in_use:
            self.pool._drop_idle(self)


class H2Connection:
    """An HTTP/2 connection to one endpoint whose streams carry concurrent requests."""

    def __init__(self, pool: UpstreamPool, key: Key | None, hop: Hop, up: UpstreamStream) -> None:
        self.pool = pool
        self.key = key
        self.hop = hop
        self.up = up
        self.driver = H2Driver(up.reader, up.writer, client=True)
        self.active = 0
        self.uses = 0
        self.idle_since = time.monotonic()
        self.retired = False  # takes no new streams; closes once the open ones end
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            await self.driver.run()
        except HboneError as exc:
            # The tunnel to the endpoint was reset or lost: for this connection, the same as a lost socket (the
            # driver has failed its streams already). Nobody awaits this task, so the error ends here.
            log.debug("HTTP/2 connection to %s lost: %s", self.up.address, exc)
        finally:
            self.pool._h2_gone(self)

    def has_room(self) -> bool:
        driver = self.driver
        if self.retired or driver.closed:
            return False
        limit = min(H2_MAX_STREAMS, driver.h2.remote_settings.max_concurrent_streams)
        return self.active < limit

    def lease(self) -> H2Lease:
        lease = H2Lease(self, reused=self.uses > 0)
        self.uses += 1
        self.active += 1
        return lease

    def ended(self) -> None:
        self.active -= 1
        if self.active == 0:
            self.idle_since = time.monotonic()
            if self.retired or self.key is None:
                self.close("no longer needed")

    def retire(self) -> None:
        self.retired = True
        if self.active == 0:
            self.close("retired")

    def close(self, reason: str) -> None:
        self.retired = True
        if not self.driver.closed:
            self.driver.close(reason)


class H2Lease:
    __slots__ = ("client", "conn", "done", "reused")

    def __init__(self, conn: H2Connection, *, reused: bool) -> None:
        self.conn = conn
        self.client: Http2Upstream = Http2Upstream(conn.driver)
        self.reused = reused
        self.done = False

    @property
    def destination(self) -> PeerLabels:
        return self.conn.up.destination

    @property
    def address(self) -> str:
        return self.conn.up.address

    def release(self, complete: bool) -> None:
        if self.done:
            return
        self.done = True
        self.client.finish()
        self.conn.ended()


class UpstreamPool:
    def __init__(self, dialer: UpstreamDialer) -> None:
        self.dialer = dialer
        self._idle: dict[Key, list[H1Connection]] = {}
        self._h2: dict[Key, list[H2Connection]] = {}
        self._h2_dials: dict[Key, asyncio.Future[H2Connection]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._state: MeshState | None = None
        self._closed = False
        self.opened = 0  # upstream connections dialled

    async def lease(self, hop: Hop, protocol: str, baggage: str, forwarded_for: str, state: MeshState, *,
                    fresh: bool = False) -> Lease:  # fmt: skip
        """A connection to the hop's endpoint for one request; with `fresh`, never a kept one."""
        if state is not self._state:
            self._on_state(state)
        key = endpoint_key(hop, protocol, baggage)
        if protocol == "HTTP/2":
            return await self._lease_h2(key, hop, baggage, forwarded_for, fresh)
        if key is not None and not fresh:
            idle = self._idle.get(key)
            while idle:
                conn = idle.pop()
                if conn.usable():
                    conn.in_use = True
                    return conn
                conn.close()
        up = await self.dialer.open(hop, baggage, forwarded_for)
        self.opened += 1
        return H1Connection(self, key, hop, up)

    # -- HTTP/1.1 -----------------------------------------------------------------------------------------
    def _release_h1(self, conn: H1Connection, complete: bool) -> None:
        if not conn.in_use:
            return
        key = conn.key
        if complete and key is not None and not self._closed and conn.client.reusable():
            idle = self._idle.get(key)
            if idle is None:
                idle = self._idle[key] = []
            if len(idle) < MAX_IDLE_PER_ENDPOINT:
                conn.client.next_cycle()
                conn.exchanges += 1
                conn.in_use = False
                conn.idle_since = time.monotonic()
                idle.append(conn)
                self._ensure_sweeper()
                return
        conn.close()

    def _drop_idle(self, conn: H1Connection) -> None:
        _discard(self._idle, conn.key, conn)
        conn.close()

    # -- HTTP/2 -------------------------------------------------------------------------------------------
    async def _lease_h2(self, key: Key | None, hop: Hop, baggage: str, forwarded_for: str, fresh: bool) -> Lease:
        if key is not None and not fresh:
            for conn in self._h2.get(key, ()):
                if conn.has_room():
                    return conn.lease()
            pending = self._h2_dials.get(key)
            if pending is not None:
                try:
                    shared = await asyncio.shield(pending)  # its failure is ours too, as in the HBONE pool
                except asyncio.CancelledError:
                    if not pending.cancelled():
                        raise  # we were cancelled, not the dial
                    shared = None  # the request that dialled gave up: dial for ourselves
                if shared is not None and shared.has_room():
                    return shared.lease()
        dial: asyncio.Future[H2Connection] | None = None
        if key is not None and not fresh and key not in self._h2_dials:
            dial = self._h2_dials[key] = asyncio.get_running_loop().create_future()
        try:
            up = await self.dialer.open(hop, baggage, forwarded_for)
        except BaseException as exc:
            if dial is not None:
                del self._h2_dials[key]  # type: ignore[arg-type]
                if isinstance(exc, Exception):
                    dial.set_exception(exc)
                    dial.exception()  # retrieved: nobody waiting is fine too
                else:
                    dial.cancel()
            raise
        self.opened += 1
        conn = H2Connection(self, key, hop, up)
        if key is not None:
            self._h2.setdefault(key, []).append(conn)
            self._ensure_sweeper()
        lease = conn.lease()
        if dial is not None:
            del self._h2_dials[key]  # type: ignore[arg-type]
            dial.set_result(conn)
        return lease

    def _h2_gone(self, conn: H2Connection) -> None:
        conn.retired = True
        _discard(self._h2, conn.key, conn)

    # -- housekeeping ------------------------------------------------------------------------------------
    def _on_state(self, state: MeshState) -> None:
        """A new mesh state: connections whose endpoint left it, or changed, are dropped."""
        previous, self._state = self._state, state
        if previous is None:
            return
        for conns in list(self._idle.values()):
            for conn in list(conns):
                if not _still_there(state, conn.hop):
                    self._drop_idle(conn)
        for h2conns in list(self._h2.values()):
            for h2conn in list(h2conns):
                if not _still_there(state, h2conn.hop):
                    self._h2_gone(h2conn)
                    h2conn.retire()

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None and not self._closed:
            self._sweeper = asyncio.get_running_loop().call_later(IDLE_TIMEOUT / 2, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        cutoff = time.monotonic() - IDLE_TIMEOUT
        for conns in list(self._idle.values()):
            for conn in list(conns):
                if conn.idle_since <= cutoff or not conn.usable():
                    self._drop_idle(conn)
        for h2conns in list(self._h2.values()):
            for h2conn in list(h2conns):
                if h2conn.active == 0 and h2conn.idle_since <= cutoff:
                    log.debug("closing an idle HTTP/2 connection to %s", h2conn.up.address)
                    self._h2_gone(h2conn)
                    h2conn.close("idle")
        if self._idle or self._h2:
            self._ensure_sweeper()

    def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conns in list(self._idle.values()):
            for conn in list(conns):
                conn.close()
        self._idle.clear()
        for h2conns in list(self._h2.values()):
            for h2conn in list(h2conns):
                h2conn.close("waypoint shutting down")
        self._h2.clear()

    def idle_count(self) -> int:
        return sum(len(c) for c in self._idle.values())

    def h2_count(self) -> int:
        return sum(len(c) for c in self._h2.values())


def _still_there(state: MeshState, hop: Hop) -> bool:
    workload = hop.workload
    if workload is None:
        return True
    return state.workload_by_uid(workload.uid) == workload


def _discard(table: dict[Key, list[_C]], key: Key | None, conn: _C) -> None:
    """Take `conn` out of the list `table` keeps for `key`, and the key out of `table` with its last one."""
    conns = table.get(key) if key is not None else None
    if conns is not None:
        with contextlib.suppress(ValueError):
            conns.remove(conn)
        if not conns:
            del table[key]  # type: ignore[index]
