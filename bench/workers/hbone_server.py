"""HBONE server proxy: terminate mTLS + HTTP/2, connect each CONNECT to its authority, relay.

Like a destination ztunnel without the mesh (no policy, no metrics): `hbone.server.HboneServer` and
`hbone.relay.Relay`, answering 200 once the TCP connection to the target is up, 503 if it cannot be.
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from bench.workers.common import add_loop_option, host_port, run
from certs import WorkloadCert
from hbone.relay import Relay
from hbone.server import HboneServer, ServerIdentity
from hbone.tls import server_context
from hbone.tlslayer import Buffered
from hbone.tunnel import Tunnel

log = logging.getLogger("bench.hbone_server")


class ServerProxy:
    def __init__(self, certs: str) -> None:
        cert = WorkloadCert.load(certs)
        chosen = ServerIdentity(server_context(cert), cert.identity)
        self.server = HboneServer(lambda _local: chosen, self.on_stream, name="bench-server")
        self.tasks: set[asyncio.Task[None]] = set()

    def on_stream(self, tunnel: Tunnel) -> None:
        task = asyncio.get_running_loop().create_task(self.serve(tunnel))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def serve(self, tunnel: Tunnel) -> None:
        assert tunnel.target is not None
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_connection(Buffered, tunnel.target.host, tunnel.target.port)
        except OSError as exc:
            log.warning("connect to %s failed: %s", tunnel.authority, exc)
            tunnel.respond(503)
            return
        tunnel.respond(200)
        result = await Relay().start(tunnel, transport)  # type: ignore[arg-type]
        if result.error is not None:
            log.warning("relay ended with %s", result.error)


async def serve(args: argparse.Namespace) -> None:
    proxy = ServerProxy(args.certs)
    await proxy.server.listen(*args.listen)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", type=host_port, required=True, help="HBONE listener")
    parser.add_argument("--certs", required=True, help="workload certificate folder (cert-chain.pem, key.pem, ...)")
    add_loop_option(parser)
    args = parser.parse_args()
    run(serve(args), args.loop)


if __name__ == "__main__":
    main()
