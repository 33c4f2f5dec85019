"""HTTP/1.1 load generator that can go through SOCKS5 (the way into a ztunnel), where `wrk` cannot.

`--connections` clients each send GET, wait for the whole answer, and repeat until `--seconds` are up:
over one keep-alive connection each (opened before the clock starts), or (`--new-connection`) over a
fresh connection per request, whose latency then includes connect (and the SOCKS5 exchange). Closed loop
by default (as fast as answers come); with `--rate R` the clients together start R requests per second
on a fixed schedule (each client every connections/R seconds) and a request's latency counts from its
scheduled start, so a path that falls behind shows it in the latency instead of quietly sending less (no
coordinated omission). `--bind IP` sets the source address of the first hop (a ztunnel identifies the
client pod by it). Prints one JSON line:
{"requests", "errors", "seconds", "rps", "p50_ms", "p90_ms", "p99_ms", "max_ms", "statuses", "cpu"}.

`--hold N` instead opens N connections, makes one request on each, prints {"open": N, ...} and keeps
them open until stopped: for memory per open connection.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable

from bench.workers.common import add_loop_option, emit, host_port, run


class LoadError(Exception):
    pass


class Client(asyncio.Protocol):
    """One connection: optional SOCKS5 CONNECT, then request/response exchanges."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._ready: Callable[[], bool] = lambda: True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._check()

    def eof_received(self) -> bool:
        self.eof = True
        self._check()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self._check()

    def _check(self) -> None:
        if self._waiter is not None and not self._waiter.done() and (self._ready() or self.eof):
            self._waiter.set_result(None)

    async def until(self, ready: Callable[[], bool]) -> None:
        """Wait until `ready()` holds for the buffer; EOF first is an error."""
        if ready():
            return
        self._ready = ready
        self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter
        self._waiter = None
        if not ready():
            raise LoadError("connection closed early")

    async def take(self, n: int) -> bytes:
        await self.until(lambda: len(self.buffer) >= n)
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    async def socks5(self, host: str, port: int) -> None:
        assert self.transport is not None
        self.transport.write(b"\x05\x01\x00")
        if await self.take(2) != b"\x05\x00":
            raise LoadError("SOCKS5 server refused 'no authentication'")
        try:
            ip = ipaddress.ip_address(host)
            address = (b"\x01" if ip.version == 4 else b"\x04") + ip.packed
        except ValueError:
            address = b"\x03" + bytes([len(host)]) + host.encode()
        self.transport.write(b"\x05\x01\x00" + address + struct.pack("!H", port))
        reply = await self.take(4)
        if reply[1] != 0:
            raise LoadError(f"SOCKS5 CONNECT refused with reply {reply[1]}")
        kind = reply[3]
        length = 4 if kind == 1 else 16 if kind == 4 else (await self.take(1))[0]
        await self.take(length + 2)

    async def exchange(self, request: bytes) -> int:
        """Send one request, read the whole response (Content-Length bodies); returns the status."""
        assert self.transport is not None
        self.transport.write(request)
        await self.until(lambda: b"\r\n\r\n" in self.buffer)
        end = self.buffer.index(b"\r\n\r\n") + 4
        head = bytes(self.buffer[:end]).lower()
        length = 0
        for line in head.split(b"\r\n"):
            if line.startswith(b"content-length:"):
                length = int(line[15:])
        await self.until(lambda: len(self.buffer) >= end + length)
        del self.buffer[: end + length]
        return int(head[9:12])


IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


def bound_socket(bind: str) -> socket.socket:
    """A TCP socket with source address `bind`; the port is picked at connect time (IP_BIND_ADDRESS_NO_PORT),
    per destination, so that thousands of short connections do not run out of ports bound at bind()."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((bind, 0))
    except OSError:
        sock.close()
        raise
    return sock


async def connect(args: argparse.Namespace) -> Client:
    loop = asyncio.get_running_loop()
    first_hop = args.socks5 or args.connect or args.target
    if args.bind:
        sock = bound_socket(args.bind)
        try:
            await loop.sock_connect(sock, first_hop)
        except OSError:
            sock.close()
            raise
        transport, client = await loop.create_connection(Client, sock=sock)
    else:
        transport, client = await loop.create_connection(Client, *first_hop)
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if args.socks5:
        await client.socks5(*args.target)
    return client


def request_bytes(args: argparse.Namespace) -> bytes:
    host = args.host or f"{args.target[0]}:{args.target[1]}"
    close = "connection: close\r\n" if args.new_connection else ""
    return f"GET {args.path} HTTP/1.1\r\nhost: {host}\r\nuser-agent: bench\r\n{close}\r\n".encode()


async def load(args: argparse.Namespace) -> None:
    request = request_bytes(args)
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors = 0
    # Keep-alive: connect every client before the clock starts, so that connection set-up (SOCKS5, a new
    # HBONE stream, an inner TLS handshake on a double-HBONE path) is not counted as request latency.
    ready: list[Client | None] = [None] * args.connections
    if not args.new_connection:
        opened = await asyncio.gather(*(connect(args) for _ in range(args.connections)), return_exceptions=True)
        for i, outcome in enumerate(opened):
            if isinstance(outcome, Client):
                ready[i] = outcome
            elif isinstance(outcome, OSError | LoadError | ValueError):
                errors += 1
            else:
                raise outcome
    start = time.perf_counter()
    deadline = start + args.seconds
    # --rate: client i starts its k-th request at start + (i + k * connections) / rate.
    interval = args.connections / args.rate if args.rate else 0.0

    async def one_client(index: int) -> None:
        nonlocal errors
        slot = start + index / args.rate if args.rate else start

        async def next_start() -> float:
            """Wait for this client's next slot (fixed rate) and return the time its latency counts from:
            the slot if the client is behind schedule, else when the timer woke it (event loop timers are
            late by up to a millisecond, which is not the path's doing)."""
            nonlocal slot
            if not interval:
                return time.perf_counter()
            scheduled = slot
            slot += interval
            if scheduled - time.perf_counter() <= 0:
                return scheduled
            await asyncio.sleep(scheduled - time.perf_counter())
            return time.perf_counter()

        while time.perf_counter() < deadline:
            client, ready[index] = ready[index], None
            try:
                began = await next_start()
                if began >= deadline:
                    break
                if client is None:
                    client = await connect(args)
                while True:
                    status = await client.exchange(request)
                    latencies.append(time.perf_counter() - began)
                    statuses[status] += 1
                    if args.new_connection:
                        break
                    began = await next_start()
                    if began >= deadline:
                        break
            except (OSError, LoadError, ValueError):
                errors += 1
                await asyncio.sleep(0.01)
            finally:
                if client is not None and client.transport is not None:
                    client.transport.close()

    await asyncio.gather(*(one_client(i) for i in range(args.connections)))
    for unused in ready:
        if unused is not None and unused.transport is not None:
            unused.transport.close()
    elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(q: float) -> float | None:
        return 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None

    emit(
        {
            "requests": len(latencies),
            "errors": errors,
            "seconds": elapsed,
            "rps": len(latencies) / elapsed,
            "p50_ms": pct(0.50),
            "p90_ms": pct(0.90),
            "p99_ms": pct(0.99),
            "max_ms": 1000 * latencies[-1] if latencies else None,
            "statuses": {str(k): v for k, v in statuses.items()},
            "cpu": sum(os.times()[:2]),
        }
    )


async def hold(args: argparse.Namespace) -> None:
    request = request_bytes(args)
    clients: list[Client] = []
    errors = 0
    gate = asyncio.Semaphore(100)  # do not flood the listener's backlog

    async def open_one() -> None:
        nonlocal errors
        async with gate:
            try:
                client = await connect(args)
                await client.exchange(request)
                clients.append(client)
            except (OSError, LoadError, ValueError):
                errors += 1

    await asyncio.gather(*(open_one() for _ in range(args.hold)))
    emit({"open": len(clients), "errors": errors})
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=host_port, required=True, help="the HTTP server (SOCKS5 destination)")
    parser.add_argument("--connect", type=host_port, help="TCP address to connect to, if not the target")
    parser.add_argument("--socks5", type=host_port, help="reach the target through this SOCKS5 proxy")
    parser.add_argument("--bind", metavar="IP", help="source address of the first hop (the client pod's IP)")
    parser.add_argument("--rate", type=float, help="requests per second in all, on a fixed schedule")
    parser.add_argument("--host", help="Host header (default: the target)")
    parser.add_argument("--path", default="/")
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--new-connection", action="store_true", help="one request per connection")
    parser.add_argument("--hold", type=int, metavar="N", help="open N connections and keep them open")
    add_loop_option(parser)
    args = parser.parse_args()
    run(hold(args) if args.hold else load(args), args.loop)


if __name__ == "__main__":
    main()
