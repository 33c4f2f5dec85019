"""SOCKS5 on 15080: negotiate, then answer with the outcome of the upstream connection."""

from __future__ import annotations

import asyncio

from hbone.tlslayer import Buffered
from ztunnel_py.outbound import Outbound, OutboundRequest
from ztunnel_py.socks5 import SUCCEEDED, Socks5Protocol, Socks5Request, reply


def socks5_factory(outbound: Outbound) -> Socks5Protocol:
    def on_request(transport: asyncio.Transport, placeholder: Buffered, request: Socks5Request) -> None:
        peer = transport.get_extra_info("peername")
        if peer is None:
            # uvloop has no address for a client that reset the connection at once: it is gone already.
            transport.close()
            return

        def outcome(code: int | None) -> None:
            # We answer once the upstream is up (or not), so the client sees a real error code.
            if not transport.is_closing():
                transport.write(reply(SUCCEEDED if code is None else code))

        outbound.start(
            transport,
            placeholder,
            OutboundRequest((peer[0], peer[1]), request.host, request.port, request.is_domain, via="socks5"),
            outcome,
        )

    # The same deadline as an HBONE client's handshake: negotiating SOCKS5 is a few bytes each way.
    return Socks5Protocol(on_request, outbound.node.ctx.h2.handshake_timeout)
