"""The waypoint daemon's life: start the listeners, serve until asked to drain, drain (SPEC §3.2)."""

from __future__ import annotations

import asyncio
import logging

from hbone.server import HboneServer
from mesh.daemon import DaemonContext
from mesh.settings import Settings
from waypoint_py.proxy import Waypoint

log = logging.getLogger("waypoint")

COMPONENT = "waypoint"


async def serve(settings: Settings, drain: asyncio.Event) -> None:
    ctx = DaemonContext(COMPONENT, settings, drain)
    try:
        ctx.load_state()
        waypoint = Waypoint(ctx)
        server_identity = ctx.identities.server(waypoint.identity)  # minted or loaded now: fail early
        server = HboneServer(lambda _local: ctx.identities.server(waypoint.identity), waypoint.inbound.on_stream,
                             settings=ctx.h2, name="waypoint")  # fmt: skip
        host, port = settings.inbound_addr
        try:
            await server.listen(host, port)
        except OSError as exc:
            raise OSError(f"cannot listen for HBONE on {host}:{port} (INBOUND_ADDR): {exc.strerror or exc}") from exc
        await ctx.serve_admin(waypoint.config_dump)
        ctx.readiness.mark_ready("listeners")
        log.info("waypoint %s serving HBONE on %s:%d (baggage %s)", server_identity.identity, host, port,
                 "on" if waypoint.baggage_enabled else "off")  # fmt: skip
        await drain.wait()
        log.info("draining: GOAWAY to clients, open requests have %.1fs", settings.drain_deadline)
        waypoint.inbound.drain()
        await server.shutdown(settings.drain_deadline)
        waypoint.upstreams.close()
    finally:
        await ctx.close()
