"""mTLS relay with no HTTP/2, a bench reference: what any Python TLS proxy pair pays here before HBONE's framing.

One TCP connection, one TLS 1.3 mutual-TLS session per client connection, bytes copied both ways, with the
project's TLS layer (`hbone.tlslayer`, the one the ztunnels use over their sockets) and its contexts
(`hbone.tls`: the same suites and certificate verification). `--role client` accepts plain TCP and connects with TLS to
`--connect`; `--role server` accepts TLS and connects plain TCP to `--connect`. Started as a pair in the
ztunnels' places, it shows what the ztunnel pair's added latency would be without HTTP/2, CONNECT, pooling,
policy or metrics: the floor of this runtime (uvloop, Python's `ssl` on OpenSSL) for a TLS proxy pair.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl

from bench.workers.common import add_loop_option, host_port, run
from bench.workers.tcp_relay import Side
from certs import WorkloadCert
from hbone.tls import client_context, server_context
from hbone.tlslayer import Buffered, attach, wrap_tls

log = logging.getLogger("bench.tls_relay")


class _Side(Side):
    """`tcp_relay.Side`, except that EOF toward a TLS session (which has no half-close) closes it."""

    def eof_received(self) -> bool:
        assert self.peer is not None and self.peer.transport is not None
        if self.peer.transport.can_write_eof():
            return super().eof_received()
        self.peer.transport.close()
        return False


class Relay:
    def __init__(self, role: str, upstream: tuple[str, int], context: ssl.SSLContext) -> None:
        self.role = role
        self.upstream = upstream
        self.context = context
        self.tasks: set[asyncio.Task[None]] = set()

    def start(self, downstream: asyncio.Transport, placeholder: Buffered) -> None:
        task = asyncio.get_running_loop().create_task(self._handle(downstream, placeholder))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _handle(self, downstream: asyncio.Transport, placeholder: Buffered) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.role == "server":
                downstream, placeholder = await wrap_tls(downstream, self.context, server_side=True)
            upstream, up_placeholder = await loop.create_connection(Buffered, *self.upstream)
            if self.role == "client":
                upstream, up_placeholder = await wrap_tls(upstream, self.context, server_side=False)
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            log.warning("relay setup failed: %s", exc)
            downstream.abort()
            return
        down, up = _Side(), _Side()
        down.peer, up.peer = up, down
        attach(upstream, up_placeholder, up)
        attach(downstream, placeholder, down)  # with what the client sent meanwhile


class _Accepted(Buffered):
    """The listener's protocol: keeps what arrives until the upstream side is up."""

    def __init__(self, relay: Relay) -> None:
        super().__init__()
        self.relay = relay

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.relay.start(transport, self)  # type: ignore[arg-type]


async def serve(args: argparse.Namespace) -> None:
    cert = WorkloadCert.load(args.certs)
    context = server_context(cert) if args.role == "server" else client_context(cert)
    relay = Relay(args.role, args.connect, context)
    server = await asyncio.get_running_loop().create_server(lambda: _Accepted(relay), *args.listen, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--role", choices=["client", "server"], required=True)
    parser.add_argument("--listen", type=host_port, required=True)
    parser.add_argument("--connect", type=host_port, required=True)
    parser.add_argument("--certs", required=True, help="workload certificate folder (cert-chain.pem, key.pem, ...)")
    add_loop_option(parser)
    args = parser.parse_args()
    run(serve(args), args.loop)


if __name__ == "__main__":
    main()
