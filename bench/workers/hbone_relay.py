"""HBONE-to-HBONE relay: a waypoint's two HBONE ends with nothing (or only h11) in between, a bench reference.

Started in the waypoint's place (its HBONE address, a certificate for its identity from the cluster's CA), it
terminates each CONNECT as the waypoint does (`hbone.server`: mTLS, HTTP/2), opens a stream to one fixed
destination over one pooled HBONE connection (`hbone.client.dial`, `open_stream`, as the waypoint's upstream
pool does) and answers 200. Then, by `--http`:

- `none`: relays the bytes both ways (`hbone.relay`) without looking at them: no HTTP parsing, routing,
  telemetry or baggage. Its CPU per request is what the waypoint's HBONE ends cost in this runtime.
- `h11`: proxies HTTP/1.1 through two kept-alive `h11.Connection`s, in callbacks: the client's request is
  parsed and written upstream, the answer parsed and written back, each side's output in one write per
  batch (the waypoint's eleven h11 events per request, as `bench/h11cost.py` drives them). Keep-alive GETs
  and their answers only; anything else closes the stream. Its CPU per request is the least an h11 waypoint
  can cost here: the HBONE ends plus h11, with nothing else around it.
- `llhttp`: the same proxy with `httptools` (Node's llhttp parser, in C) parsing both directions and the heads
  written as they were received (names and values as llhttp passed them, the request's `host` set to the
  destination). Only for comparison: `httptools` is not a project dependency (`.venv/bin/pip install
  httptools`), and the scenario skips this row without it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h11

from bench.workers.common import add_loop_option, host_port, run
from certs import CertificateAuthority
from hbone.client import dial
from hbone.connection import HboneConnection
from hbone.gctune import tune_gc
from hbone.identity import Identity
from hbone.relay import Relay
from hbone.server import HboneServer, ServerIdentity
from hbone.tls import client_context, server_context
from hbone.tlslayer import Buffered
from hbone.tunnel import Tunnel

log = logging.getLogger("bench.hbone_relay")


class _Side(asyncio.Protocol):
    """Hands what one tunnel delivers to a callback; an end or an error on it ends the pair."""

    def __init__(self, on_data: Callable[[bytes], None], on_end: Callable[[], None]) -> None:
        self.on_data, self.on_end = on_data, on_end

    def data_received(self, data: bytes) -> None:
        self.on_data(data)

    def eof_received(self) -> bool:
        self.on_end()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_end()


class _Proxy:
    """An HTTP/1.1 proxy between the client's tunnel (`down`) and the upstream's (`up`); `host` is the `host`
    header its requests get upstream. Subclasses set up their parsers, then call this `__init__`."""

    def __init__(self, down: Tunnel, up: Tunnel, host: bytes) -> None:
        self.down, self.up, self.host = down, up, host
        earlier = down.get_protocol()
        down.set_protocol(_Side(self.from_client, self.end))
        up.set_protocol(_Side(self.from_upstream, self.end))
        if isinstance(earlier, Buffered) and earlier.chunks:
            self.from_client(earlier.take())  # what the client sent before we took over

    def from_client(self, data: bytes) -> None:
        raise NotImplementedError

    def from_upstream(self, data: bytes) -> None:
        raise NotImplementedError

    def end(self) -> None:
        for tunnel in (self.down, self.up):
            if not tunnel.is_closing():
                tunnel.close()


class H11Proxy(_Proxy):
    """HTTP/1.1 between two tunnels through two h11 connections kept alive from request to request."""

    def __init__(self, down: Tunnel, up: Tunnel, host: bytes) -> None:
        self.server = h11.Connection(h11.SERVER)  # the client's side
        self.client = h11.Connection(h11.CLIENT)  # the upstream's side
        super().__init__(down, up, host)

    def from_client(self, data: bytes) -> None:
        self.server.receive_data(data)
        self.requests()

    def requests(self) -> None:
        """Forward what h11 has of the client's requests."""
        out: list[bytes] = []
        while (event := self.server.next_event()) is not h11.NEED_DATA and event is not h11.PAUSED:
            kind = type(event)
            if kind is h11.Request:
                headers = [(b"host", self.host), *((k, v) for k, v in event.headers if k != b"host")]
                out.append(self.client.send(h11.Request(method=event.method, target=event.target, headers=headers)))
            elif kind is h11.EndOfMessage:
                out.append(self.client.send(event))
            else:  # a request body, or the client closed: not what this reference measures
                self.end()
                return
        if out:
            self.up.write(b"".join(out))

    def from_upstream(self, data: bytes) -> None:
        self.client.receive_data(data)
        out: list[bytes] = []
        while (event := self.client.next_event()) is not h11.NEED_DATA and event is not h11.PAUSED:
            kind = type(event)
            if kind is h11.Response:
                reply = h11.Response(status_code=event.status_code, headers=list(event.headers), reason=event.reason)
                out.append(self.server.send(reply))
            elif kind is h11.Data:
                out.extend(self.server.send_with_data_passthrough(h11.Data(data=event.data)))
            elif kind is h11.EndOfMessage:
                out.append(self.server.send(event))
                self.server.start_next_cycle()
                self.client.start_next_cycle()
            else:
                self.end()
                return
        if out:
            self.down.write(b"".join(out))
        if self.server.our_state is h11.IDLE and self.server.their_state is h11.IDLE:
            self.requests()  # a pipelined request waiting in h11's buffer


class LlhttpProxy(_Proxy):
    """`H11Proxy` with httptools: its parsers call back for each part, and each side's output goes in one write."""

    def __init__(self, down: Tunnel, up: Tunnel, host: bytes) -> None:
        import httptools  # not a project dependency: only this reference uses it

        self.requests = httptools.HttpRequestParser(self)
        self.responses = httptools.HttpResponseParser(self)
        self.out: list[bytes] = []
        self.fields: list[tuple[bytes, bytes]] = []
        self.url = b""
        self.reason = b""
        super().__init__(down, up, host)

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_status(self, reason: bytes) -> None:
        self.reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        if self.url:  # a request
            head = [b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (self.requests.get_method(), self.url, self.host)]
            head += [b"%s: %s\r\n" % field for field in self.fields if field[0].lower() != b"host"]
        else:
            head = [b"HTTP/1.1 %d %s\r\n" % (self.responses.get_status_code(), self.reason)]
            head += [b"%s: %s\r\n" % field for field in self.fields]
        head.append(b"\r\n")
        self.out.append(b"".join(head))
        self.fields, self.url = [], b""

    def on_body(self, body: bytes) -> None:
        self.out.append(body)

    def from_client(self, data: bytes) -> None:
        self._feed(self.requests, data, self.up)

    def from_upstream(self, data: bytes) -> None:
        self._feed(self.responses, data, self.down)

    def _feed(self, parser: Any, data: bytes, to: Tunnel) -> None:
        try:
            parser.feed_data(data)
        except Exception:  # httptools.HttpParserError and its kin: not what this reference measures
            self.end()
            return
        if self.out:
            to.write(b"".join(self.out))
            self.out = []


PROXIES = {"h11": H11Proxy, "llhttp": LlhttpProxy}


class HboneRelay:
    def __init__(self, ca_dir: Path, identity: Identity, upstream: tuple[str, int], authority: str,
                 expect: Identity, http: str = "none") -> None:  # fmt: skip
        cert = CertificateAuthority.load(ca_dir).issue(identity)
        chosen = ServerIdentity(server_context(cert), cert.identity)
        self.server = HboneServer(lambda _local: chosen, self.on_stream, name="bench-relay")
        self.client_context = client_context(cert)
        self.identity = cert.identity
        self.upstream, self.authority, self.expect, self.http = upstream, authority, expect, http
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
        if self.http in PROXIES:
            PROXIES[self.http](tunnel, upstream, self.authority.encode())
            return
        result = await Relay().start(tunnel, upstream)  # type: ignore[arg-type]
        if result.error is not None:
            log.warning("relay ended with %s", result.error)


async def serve(args: argparse.Namespace) -> None:
    tune_gc()  # as the daemons do (mesh.runner)
    relay = HboneRelay(Path(args.ca_dir), Identity.parse(args.identity), args.upstream, args.authority,
                       Identity.parse(args.expect), args.http)  # fmt: skip
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
    parser.add_argument("--http", choices=("none", *PROXIES), default="none", help="what runs between the two ends")
    add_loop_option(parser)
    args = parser.parse_args()
    run(serve(args), args.loop)


if __name__ == "__main__":
    main()
