"""HBONE-to-HBONE relay: a waypoint's two HBONE ends with nothing in between (a benchmark reference).

Started in the waypoint's place (its HBONE address, a certificate for its identity from the cluster's CA), it
terminates each CONNECT as the waypoint does (`hbone.server`: mTLS, HTTP/2), opens a stream to one fixed
destination over one pooled HBONE connection (`hbone.client.dial`, `open_stream`, as the waypoint's upstream
pool does), answers 200 and relays the bytes both ways (`hbone.relay`). It never looks at what it carries:
no HTTP parsing, routing, telemetry or baggage. Its CPU per request is what the waypoint's HBONE ends cost in
this runtime, measured the same way as the waypoint's.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from bench.workers.common import add_loop_option, host_port, run
from certs import CertificateAuthority
from hbone.client import dial
from hbone.connection import HboneConnection
from hbone.gctune import tune_gc
from hbone.identity import Identity
from hbone.relay import Relay
from hbone.server import HboneServer, ServerIdentity
from hbone.tls import client_context, server_context
from hbone.tunnel import Tunnel

log = logging.getLogger("bench.hbone_relay")


class HboneRelay:
    def __init__(self, ca_dir: Path, identity: Identity, upstream: tuple[str, int], authority: str,
                 expect: Identity) -> None:  # fmt: skip
        cert = CertificateAuthority.load(ca_dir).issue(identity)
        chosen = ServerIdentity(server_context(cert), cert.identity)
        self.server = HboneServer(lambda _local: chosen, self.on_stream, name="bench-relay")
        self.client_context = client_context(cert)
        self.identity = cert.identity
        self.upstream, self.authority, self.expect = upstream, authority, expect
        self.conn: HboneConnection | None = None
        self.dialing = asyncio.Lock()
        self.tasks: set[asyncio.Task[None]] = set()

    def on_stream(self, tunnel: Tunnel) -> None:
        task = asyncio.get_running_loop().create_task(self.serve(tunnel))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def connection(self) -> HboneConnection:
        async with self.dialing:
            if self.conn is None or self.conn.is_closed:
                self.conn = await dial(self.upstream, self.client_context, [self.expect], local_identity=self.identity)
            return self.conn

    async def serve(self, tunnel: Tunnel) -> None:
        try:
            upstream = await (await self.connection()).open_stream(self.authority)
        except Exception as exc:  # any failure upstream is a 503 for this stream only
            log.warning("upstream stream to %s failed: %s", self.authority, exc)
            tunnel.respond(503)
            return
        tunnel.respond(200)
        result = await Relay().start(tunnel, upstream)  # type: ignore[arg-type]
        if result.error is not None:
            log.warning("relay ended with %s", result.error)


async def serve(args: argparse.Namespace) -> None:
    tune_gc()  # as the daemons do (mesh.runner)
    relay = HboneRelay(Path(args.ca_dir), Identity.parse(args.identity), args.upstream, args.authority,
                       Identity.parse(args.expect))  # fmt: skip
    await relay.server.listen(*args.listen)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", type=host_port, required=True, help="HBONE listener (the waypoint's)")
    parser.add_argument("--ca-dir", required=True, help="the cluster CA folder the waypoint issues its cert from")
    parser.add_argument("--identity", required=True, help="spiffe:// identity to present (the waypoint's)")
    parser.add_argument("--upstream", type=host_port, required=True, help="destination HBONE address")
    parser.add_argument("--authority", required=True, help="CONNECT authority upstream (pod IP:port)")
    parser.add_argument("--expect", required=True, help="spiffe:// identity the destination must present")
    add_loop_option(parser)
    args = parser.parse_args()
    run(serve(args), args.loop)


if __name__ == "__main__":
    main()
