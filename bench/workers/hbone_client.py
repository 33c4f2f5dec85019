"""HBONE client proxy: per accepted TCP connection, dial the HBONE server, CONNECT to `--target`, relay.

One HBONE connection (mTLS + HTTP/2) per accepted connection, closed when its relay ends, so a bulk run
measures one tunnel. The data path is `hbone` as the daemons use it: `client.dial`, `open_stream`,
`relay.Relay`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from bench.workers.common import add_loop_option, host_port, run
from certs import WorkloadCert
from hbone.client import dial
from hbone.identity import Identity
from hbone.relay import Relay
from hbone.tls import client_context
from hbone.tlslayer import Buffered

log = logging.getLogger("bench.hbone_client")


class Accepted(Buffered):
    """Holds the accepted socket paused until its tunnel is up; `Relay.start` then takes it over.

    A pause_reading() in connection_made is undone by the loop (uvloop, and asyncio before Python 3.12:
    cpython gh-103607), so reading is paused again when the first early chunk arrives.
    """

    def __init__(self, proxy: ClientProxy) -> None:
        super().__init__()
        self.proxy = proxy

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        transport.pause_reading()  # type: ignore[attr-defined]
        self.proxy.accepted(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        assert self.transport is not None
        self.transport.pause_reading()


class ClientProxy:
    def __init__(self, server: tuple[str, int], target: str, certs: str, expect: Identity) -> None:
        self.server = server
        self.target = target
        self.context = client_context(WorkloadCert.load(certs))
        self.expect = expect
        self.tasks: set[asyncio.Task[None]] = set()

    def accepted(self, transport: asyncio.Transport) -> None:
        task = asyncio.get_running_loop().create_task(self.handle(transport))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def handle(self, transport: asyncio.Transport) -> None:
        try:
            conn = await dial(self.server, self.context, [self.expect])
        except Exception as exc:
            log.warning("dial %s:%d failed: %s", *self.server, exc)
            transport.abort()
            return
        try:
            tunnel = await conn.open_stream(self.target)
        except Exception as exc:
            log.warning("CONNECT %s failed: %s", self.target, exc)
            transport.abort()
            conn.close()
            return
        # Resume first: replaying the early chunk may pause reading again (tunnel window full), and
        # that pause must stick.
        transport.resume_reading()
        result = await Relay().start(transport, tunnel)
        if result.error is not None:
            log.warning("relay ended with %s", result.error)
        conn.close()


async def serve(args: argparse.Namespace) -> None:
    proxy = ClientProxy(args.server, args.target, args.certs, Identity.parse(args.expect))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Accepted(proxy), *args.listen, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", type=host_port, required=True, help="plain TCP listener")
    parser.add_argument("--server", type=host_port, required=True, help="the HBONE server")
    parser.add_argument("--target", required=True, help="CONNECT authority, host:port")
    parser.add_argument("--certs", required=True, help="workload certificate folder (cert-chain.pem, key.pem, ...)")
    parser.add_argument("--expect", required=True, help="the server's SPIFFE identity")
    add_loop_option(parser)
    args = parser.parse_args()
    run(serve(args), args.loop)


if __name__ == "__main__":
    main()
