"""Bulk source: connect, write the same random MiB over and over as fast as the path takes it.

Stops after `--bytes` or `--seconds`, whichever comes first, half-closes, waits for the path to close,
and prints {"bytes", "seconds", "sha256", "cpu"}. Blocking sockets: the cheapest sender Python has.
`--socks5 HOST:PORT` asks that SOCKS5 proxy (a ztunnel) for `--connect` instead of connecting to it;
`--bind IP` sets the source address (a ztunnel knows the client pod by it). Neither is timed.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import os
import socket
import struct
import time

from bench.workers.common import emit, host_port


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("SOCKS5 proxy closed the connection")
        data += chunk
    return data


def socks5_connect(sock: socket.socket, host: str, port: int) -> None:
    """SOCKS5, no authentication, CONNECT host:port (an IP address or a name the proxy resolves)."""
    sock.sendall(b"\x05\x01\x00")
    if recv_exactly(sock, 2) != b"\x05\x00":
        raise ConnectionError("SOCKS5 proxy refused 'no authentication'")
    try:
        ip = ipaddress.ip_address(host)
        address = (b"\x01" if ip.version == 4 else b"\x04") + ip.packed
    except ValueError:
        address = b"\x03" + bytes([len(host)]) + host.encode()
    sock.sendall(b"\x05\x01\x00" + address + struct.pack("!H", port))
    reply = recv_exactly(sock, 4)
    if reply[1] != 0:
        raise ConnectionError(f"SOCKS5 CONNECT refused with reply {reply[1]}")
    length = {1: 4, 4: 16}.get(reply[3]) or recv_exactly(sock, 1)[0]
    recv_exactly(sock, length + 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connect", type=host_port, required=True)
    parser.add_argument("--bytes", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--chunk", type=int, default=1 << 20)
    parser.add_argument("--hash", action="store_true", help="sha256 of what was sent (costs CPU here)")
    parser.add_argument("--socks5", type=host_port, help="reach --connect through this SOCKS5 proxy")
    parser.add_argument("--bind", metavar="IP", help="source address")
    args = parser.parse_args()

    block = memoryview(os.urandom(args.chunk))
    digest = hashlib.sha256() if args.hash else None
    source = (args.bind, 0) if args.bind else None
    sock = socket.create_connection(args.socks5 or args.connect, source_address=source)
    if args.socks5:
        socks5_connect(sock, *args.connect)
    sent = 0
    start = time.monotonic()
    deadline = start + args.seconds
    while sent < args.bytes and time.monotonic() < deadline:
        piece = block[: min(args.chunk, args.bytes - sent)]
        sock.sendall(piece)
        if digest is not None:
            digest.update(piece)
        sent += len(piece)
    elapsed = time.monotonic() - start
    sock.shutdown(socket.SHUT_WR)
    # The path closes back once the sink has read everything: then the run is really over.
    sock.settimeout(60)
    while sock.recv(65536):
        pass
    sock.close()
    times = os.times()
    emit(
        {
            "bytes": sent,
            "seconds": elapsed,
            "sha256": digest.hexdigest() if digest else None,
            "cpu": times.user + times.system,
        }
    )


if __name__ == "__main__":
    main()
