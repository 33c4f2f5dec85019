"""Bulk sink: accept connections, read each to EOF, print {"bytes", "seconds", "sha256", "cpu"} each.

`seconds` runs from the first byte to EOF, so connection set-up (TLS, HTTP/2, CONNECT) is not counted as
transfer time. Connections that carry no byte (a port probe) print nothing. Blocking sockets, one thread
per connection (`cpu` is that thread's CPU seconds), a 1 MiB receive buffer reused.
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import socket
import threading
import time

from bench.workers.common import emit

BUFFER = 1 << 20
_emit_lock = threading.Lock()


def drain(conn: socket.socket, hashing: bool) -> None:
    buf = bytearray(BUFFER)
    view = memoryview(buf)
    digest = hashlib.sha256() if hashing else None
    total = 0
    first = 0.0
    with conn:
        while n := conn.recv_into(buf):
            if not total:
                first = time.monotonic()
            total += n
            if digest is not None:
                digest.update(view[:n])
    elapsed = time.monotonic() - first
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    if total:
        with _emit_lock:
            emit(
                {
                    "bytes": total,
                    "seconds": elapsed,
                    "sha256": digest.hexdigest() if digest else None,
                    "cpu": usage.ru_utime + usage.ru_stime,
                }
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--hash", action="store_true", help="sha256 of what arrived (costs CPU here)")
    args = parser.parse_args()
    with socket.create_server((args.host, args.port), backlog=1024) as server:
        while True:
            conn, _ = server.accept()
            threading.Thread(target=drain, args=(conn, args.hash), daemon=True).start()


if __name__ == "__main__":
    main()
