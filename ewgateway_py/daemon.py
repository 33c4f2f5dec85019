"""The gateway process: settings → shared daemon parts → HBONE listener presenting the gateway's identity,
until a drain (SIGTERM, /quitquitquit) sends GOAWAY and lets open streams finish up to DRAIN_DEADLINE."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ewgateway_py.gateway import Gateway
from ewgateway_py.settings import COMPONENT
from hbone.server import HboneServer
from mesh.daemon import DaemonContext
from mesh.settings import Settings

log = logging.getLogger("ewgateway")


async def run(settings: Settings, drain: asyncio.Event) -> None:
    ctx = DaemonContext(COMPONENT, settings, drain)
    identity = ctx.proxy_identity()
    if identity is None:  # the setting is required; this only guards a caller that built Settings by hand
        raise ValueError("set PROXY_WORKLOAD_INFO to the gateway's namespace/name/service-account")
    # Fetch (or mint) the certificate now, so a bad CA_CERTS_DIR/CERT_DIR stops start-up with its reason
    # rather than failing every handshake later.
    ctx.identities.server(identity)
    ctx.load_state()
    gateway = Gateway(ctx)
    server = HboneServer(
        # Per connection, so a renewed certificate is presented to new clients.
        lambda _local: ctx.identities.server(identity),
        gateway.on_stream,
        settings=ctx.h2,
        name="ewgateway",
    )
    host, port = settings.inbound_addr

    def config_dump() -> dict[str, Any]:
        return {"gateway": {"identity": str(identity), "network": ctx.network, "inboundAddr": f"{host}:{port}",
                            **gateway.describe()}}  # fmt: skip

    try:
        await ctx.serve_admin(config_dump)
        await server.listen(host, port)  # host "" listens on every interface
        ctx.readiness.mark_ready("listeners")
        log.info("east-west gateway %s on network %r listening for HBONE on %s:%d", identity,
                 ctx.network, host or "*", port)  # fmt: skip
        await drain.wait()
        ctx.readiness.mark_pending("draining")
        log.info("draining: GOAWAY sent, open streams have %.1fs to finish", settings.drain_deadline)
        await server.shutdown(settings.drain_deadline)
    finally:
        await gateway.close()
        await ctx.close()
