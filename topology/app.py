"""The sample app of the topologies: a tiny HTTP/1.1 server (asyncio + h11) and an optional TCP echo.

    python -m topology.app --name echo-v2-0 --listen 10.244.1.3:8080 [--version v2] [--cluster cluster2]
                           [--tcp-echo 10.244.1.3:9000]

HTTP (keep-alive; request bodies may be chunked):
    GET  /              one line naming the workload: `<name> <cluster> <version> <listen ip>`
    GET  /bytes/<n>     n deterministic bytes (`pattern(n)`; check with `pattern_sha256(n)`), streamed
    POST /sha256        the hex sha256 of the request body and its length, read streaming (bounded memory)
    GET  /status/<code> that status code
    GET  /delay/<ms>    answers after ms milliseconds (at most 60 s)
    GET  /headers       the request headers, one `name: value` per line
Every response carries `x-workload`, `x-cluster` and `x-version`, so a client sees who answered.
TCP echo: every byte back until the client half-closes, then a half-close back.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import os
import random
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import h11

log = logging.getLogger("topology.app")

READ_SIZE = 256 * 1024
_BLOCK = 1 << 20
_BASE = random.Random(0x5EED).randbytes(_BLOCK)
MAX_BYTES = 1 << 40
MAX_DELAY_MS = 60_000


def pattern(n: int) -> Iterator[bytes]:
    """n deterministic bytes in chunks of at most 1 MiB. Each MiB is the base block rotated by a different
    amount, so lost, repeated or reordered chunks change the hash."""
    index = 0
    while n > 0:
        shift = (index * 7919) % _BLOCK
        block = _BASE[shift:] + _BASE[:shift]
        chunk = block[: min(n, _BLOCK)]
        yield chunk
        n -= len(chunk)
        index += 1


def pattern_sha256(n: int) -> str:
    digest = hashlib.sha256()
    for chunk in pattern(n):
        digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class Identity:
    name: str
    cluster: str
    version: str
    ip: str

    def line(self) -> str:
        return f"{self.name} {self.cluster} {self.version} {self.ip}\n"

    def headers(self) -> list[tuple[str, str]]:
        return [("x-workload", self.name), ("x-cluster", self.cluster), ("x-version", self.version)]


class _Closed(Exception):
    """The client went away or broke the protocol; the connection is done."""


class HttpConnection:
    """One client connection: h11 owns the protocol, this class the socket and the routes."""

    def __init__(self, me: Identity, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.me = me
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)

    async def serve(self) -> None:
        try:
            while True:
                event = await self.next_event()
                if isinstance(event, h11.ConnectionClosed):
                    return
                if not isinstance(event, h11.Request):
                    raise _Closed
                await self.handle(event)
                if self.conn.our_state is h11.MUST_CLOSE or self.conn.their_state is h11.MUST_CLOSE:
                    return
                # Whatever body the route did not read is drained, so the next request starts clean.
                while self.conn.their_state is h11.SEND_BODY:
                    if not isinstance(await self.next_event(), h11.Data):
                        break
                if self.conn.our_state is not h11.DONE or self.conn.their_state is not h11.DONE:
                    return
                self.conn.start_next_cycle()
        except h11.RemoteProtocolError as e:
            with contextlib.suppress(Exception):
                await self.respond(e.error_status_hint, f"bad request: {e}\n")
        except (_Closed, ConnectionError):
            pass
        finally:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()

    async def next_event(self) -> h11.Event:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await self.reader.read(READ_SIZE)
            self.conn.receive_data(data)  # b"" is how h11 learns of EOF

    async def send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def respond(self, status: int, body: str | bytes, headers: list[tuple[str, str]] | None = None) -> None:
        payload = body.encode() if isinstance(body, str) else body
        await self.send(h11.Response(status_code=status, headers=[
            *self.me.headers(), ("content-type", "text/plain"), ("content-length", str(len(payload))),
            *(headers or []),
        ]))  # fmt: skip
        await self.send(h11.Data(data=payload))
        await self.send(h11.EndOfMessage())

    async def handle(self, request: h11.Request) -> None:
        method = request.method.decode()
        path = request.target.decode().split("?", 1)[0]
        parts = path.strip("/").split("/")
        if method == "GET" and path == "/":
            await self.respond(200, self.me.line())
        elif method == "GET" and len(parts) == 2 and parts[0] == "bytes" and parts[1].isdigit():
            await self.send_bytes(min(int(parts[1]), MAX_BYTES))
        elif method == "POST" and path == "/sha256":
            await self.hash_body()
        elif method == "GET" and len(parts) == 2 and parts[0] == "status" and parts[1].isdigit():
            code = int(parts[1])
            if not 200 <= code <= 599:
                await self.respond(400, "status must be 200..599\n")
            else:
                await self.respond(code, f"status {code}\n")
        elif method == "GET" and len(parts) == 2 and parts[0] == "delay" and parts[1].isdigit():
            ms = min(int(parts[1]), MAX_DELAY_MS)
            await asyncio.sleep(ms / 1000)
            await self.respond(200, f"delayed {ms}ms {self.me.line()}")
        elif method == "GET" and path == "/headers":
            lines = "".join(f"{k.decode()}: {v.decode()}\n" for k, v in request.headers)
            await self.respond(200, lines)
        else:
            await self.respond(404, f"no route for {method} {path}\n")

    async def send_bytes(self, n: int) -> None:
        await self.send(h11.Response(status_code=200, headers=[
            *self.me.headers(), ("content-type", "application/octet-stream"), ("content-length", str(n)),
        ]))  # fmt: skip
        for chunk in pattern(n):
            await self.send(h11.Data(data=chunk))
        await self.send(h11.EndOfMessage())

    async def hash_body(self) -> None:
        digest = hashlib.sha256()
        size = 0
        while True:
            event = await self.next_event()
            if isinstance(event, h11.Data):
                digest.update(event.data)
                size += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise _Closed
        await self.respond(200, f"{digest.hexdigest()} {size}\n")


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(READ_SIZE):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected ip:port, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


async def serve(me: Identity, http: tuple[str, int], tcp: tuple[str, int] | None) -> None:
    async def on_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await HttpConnection(me, reader, writer).serve()

    servers = [await asyncio.start_server(on_http, *http, limit=READ_SIZE)]
    if tcp is not None:
        servers.append(await asyncio.start_server(echo, *tcp, limit=READ_SIZE))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    where = f"http {http[0]}:{http[1]}" + (f", tcp echo {tcp[0]}:{tcp[1]}" if tcp else "")
    log.info("%s (%s %s) serving %s", me.name, me.cluster, me.version, where)
    await stop.wait()
    for s in servers:
        s.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m topology.app", description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="the workload (pod) name it reports")
    parser.add_argument("--listen", required=True, type=_address, help="HTTP address ip:port")
    parser.add_argument("--version", default="v1", help="the version it reports")
    parser.add_argument("--cluster", default=os.environ.get("CLUSTER_ID", "unknown"), help="the cluster it reports")
    parser.add_argument("--tcp-echo", type=_address, help="also echo raw TCP on ip:port")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    me = Identity(args.name, args.cluster, args.version, args.listen[0])
    try:
        asyncio.run(serve(me, args.listen, args.tcp_echo))
    except OSError as e:
        log.error("cannot listen: %s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
