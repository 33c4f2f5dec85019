"""The HBONE side facing clients: each CONNECT names the original destination; the tunnel then carries
HTTP/1.1 or HTTP/2, which is handed to a session of that protocol (SPEC §6)."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING

from hbone.authority import format_authority
from hbone.errors import HboneError
from hbone.identity import Identity
from hbone.server import ThrottledLog
from hbone.tunnel import Tunnel
from mesh.metrics import PeerLabels
from mesh.peers import peer_from_baggage
from waypoint_py.destination import UnknownDestination, resolve
from waypoint_py.forward import Downstreamer
from waypoint_py.h1_server import Http1Exchange, Http1Session
from waypoint_py.h2_server import Http2Exchange, Http2Session
from waypoint_py.streams import is_h2, open_streams, sniff
from waypoint_py.view import WaypointView

if TYPE_CHECKING:
    from waypoint_py.proxy import Waypoint

log = logging.getLogger("waypoint.inbound")

_FORWARDED_FOR = re.compile(r'for="?([^";,]+)"?')

Session = Http1Session | Http2Session


class Inbound:
    def __init__(self, waypoint: Waypoint) -> None:
        self.wp = waypoint
        self.sessions: set[Session] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.draining = False
        self._unknown_log = ThrottledLog(log, logging.INFO)  # a CONNECT costs its sender a few bytes

    def on_stream(self, tunnel: Tunnel) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(tunnel))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def drain(self) -> None:
        self.draining = True
        for session in list(self.sessions):
            session.drain()

    async def _serve(self, tunnel: Tunnel) -> None:
        view = self.wp.view()
        where = f"{tunnel.connection.peer_name} ({tunnel.connection.peer_identity})"
        assert tunnel.target is not None
        try:
            original = resolve(view.state, self.wp.network, tunnel.target)
        except UnknownDestination as exc:
            self._unknown_log("CONNECT %s from %s: 503, unknown destination: %s", tunnel.authority, where, exc)
            tunnel.respond(503)
            return
        principal = tunnel.connection.peer_identity
        peer = tunnel.get_extra_info("peername")
        peer_address = format_authority(peer[0], peer[1]) if isinstance(peer, tuple) else ""
        conn = Downstreamer(
            source=self._source(tunnel, view, principal, peer[0] if isinstance(peer, tuple) else ""),
            principal=principal,
            address=peer_address,
            forwarded_for=_forwarded_for(tunnel) or peer_address,
            original=original,
        )
        tunnel.respond(200, [("baggage", view.baggage)] if self.wp.baggage_enabled and view.baggage else [])
        reader, writer = open_streams(tunnel)
        session: Session | None = None
        try:
            first_bytes = await sniff(reader)
            if not first_bytes:
                return
            if is_h2(first_bytes):
                session = Http2Session(reader, writer, first_bytes, self._handler(conn))
            else:
                session = Http1Session(reader, writer, first_bytes, self._handler(conn),
                                       lambda status, why: self.wp.forwarder.report_bad_request(
                                           conn, "HTTP/1.1", status, why))  # fmt: skip
            self.sessions.add(session)
            if self.draining:
                session.drain()
            await session.run()
        except (ConnectionError, OSError, HboneError) as exc:
            # The client went away: it closed or reset the tunnel, or lost the connection that carried it.
            log.debug("CONNECT %s from %s ended: %s", tunnel.authority, where, exc or type(exc).__name__)
        except Exception:
            log.exception("session for CONNECT %s from %s failed", tunnel.authority, where)
        finally:
            if session is not None:
                self.sessions.discard(session)
            if not writer.is_closing():
                writer.close()

    def _handler(self, conn: Downstreamer):  # type: ignore[no-untyped-def]
        async def handle(exchange: Http1Exchange | Http2Exchange) -> None:
            await self.wp.forwarder.handle(conn, exchange)

        return handle

    def _source(self, tunnel: Tunnel, view: WaypointView, principal: Identity | None, peer_ip: str) -> PeerLabels:
        """The client's peer labels: its baggage with the flag on (the namespace always its verified identity's),
        else the local workload with both its verified identity and its IP (a peer from elsewhere stays
        unknown but for its verified identity)."""
        if self.wp.baggage_enabled:
            # No usable baggage (none, or refused whole): fall through to the state as if none had been sent.
            described = peer_from_baggage(tunnel.header_values("baggage"), principal, self.wp.baggage_metrics)
            if described is not None:
                return described
        if principal is None:
            return PeerLabels()
        via = tunnel.header("x-forwarded-network")
        if via is not None and via.lower() != self.wp.network.lower():
            # Came through a gateway from another network: a local workload with the same identity is not
            # this client, so only the verified identity is known (SPEC §4.3).
            return PeerLabels(principal=str(principal))
        # Never a guess from the identity alone: several workloads often share a service account (reviews
        # v1/v2/v3), so without the IP as well we would name the wrong one (as ztunnel's inbound does).
        candidates = view.local_by_identity.get(principal, ())
        chosen = next((w for w in candidates if any(str(ip) == peer_ip for ip in w.workload_ips)), None)
        if chosen is None:
            return PeerLabels(principal=str(principal))
        return PeerLabels.of_workload(chosen, principal=principal)


def _forwarded_for(tunnel: Tunnel) -> str:
    value = tunnel.header("forwarded")
    if not value:
        return ""
    match = _FORWARDED_FOR.search(value)
    return match.group(1) if match else ""
