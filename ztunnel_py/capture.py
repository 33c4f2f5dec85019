"""Outbound capture on 15001: connections redirected by iptables, destination from SO_ORIGINAL_DST."""

from __future__ import annotations

import asyncio
import logging

from hbone.server import ThrottledLog
from hbone.tlslayer import Buffered
from ztunnel_py.original_dst import original_destination
from ztunnel_py.outbound import Outbound, OutboundRequest

log = logging.getLogger("ztunnel.capture")


class CaptureProtocol(Buffered):
    def __init__(self, outbound: Outbound, refused_log: ThrottledLog) -> None:
        super().__init__()
        self._outbound = outbound
        self._refused_log = refused_log  # the listener's: a connection costs its sender nothing

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        peer = transport.get_extra_info("peername")
        if peer is None or sock is None:
            # uvloop has no address for a client that reset the connection at once: it is gone already.
            transport.close()
            return
        dst = original_destination(sock)
        if dst is None:
            self._refused_log("connection from %s:%d on the capture port was not redirected; closing", peer[0], peer[1])
            transport.close()
            return
        request = OutboundRequest((peer[0], peer[1]), dst[0], dst[1], is_domain=False, via="capture")
        self._outbound.start(transport, self, request, lambda _code: None)  # type: ignore[arg-type]
