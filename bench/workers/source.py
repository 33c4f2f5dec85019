"""Bulk source: connect, write the same random MiB over and over as fast as the path takes it.

Stops after `--bytes` or `--seconds`, whichever comes first, half-closes, waits for the path to close,
and prints {"bytes", "seconds", "sha256", "cpu"}. Blocking sockets: the cheapest sender Python has.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import time

from bench.workers.common import emit, host_port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connect", type=host_port, required=True)
    parser.add_argument("--bytes", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--chunk", type=int, default=1 << 20)
    parser.add_argument("--hash", action="store_true", help="sha256 of what was sent (costs CPU here)")
    args = parser.parse_args()

    block = memoryview(os.urandom(args.chunk))
    digest = hashlib.sha256() if args.hash else None
    sock = socket.create_connection(args.connect)
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
