"""A tiny, fast HTTP/1.1 server for request benchmarks: every request gets `200` and `--size` bytes.

Keep-alive and pipelining (answers in order), `Connection: close` and HTTP/1.0 honoured, request bodies
with Content-Length read and ignored; chunked request bodies are refused (501, close): load generators
do not send them. One asyncio Protocol, the answer pre-built, so that the server costs little next to the
proxies in front of it.
"""

from __future__ import annotations

import argparse
import asyncio

from bench.workers.common import add_loop_option, host_port, run

MAX_HEAD = 64 * 1024


def response(size: int, close: bool) -> bytes:
    head = (
        f"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {size}\r\n"
        f"{'connection: close' if close else 'connection: keep-alive'}\r\n\r\n"
    )
    return head.encode() + b"x" * size


class HttpServer(asyncio.Protocol):
    def __init__(self, keep_alive: bytes, close: bytes) -> None:
        self.keep_alive = keep_alive
        self.close = close
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.body_left = 0  # bytes of the current request's body still to skip

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        out = []
        closing = False
        while not closing:
            if self.body_left:
                skip = min(self.body_left, len(self.buffer))
                del self.buffer[:skip]
                self.body_left -= skip
                if self.body_left:
                    break
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    out.append(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n")
                    closing = True
                break
            head = bytes(self.buffer[:end]).lower()
            del self.buffer[: end + 4]
            request_line, _, headers = head.partition(b"\r\n")
            closing = request_line.endswith(b"http/1.0") and b"connection: keep-alive" not in headers
            closing = closing or b"connection: close" in headers
            if b"transfer-encoding: chunked" in headers:
                out.append(b"HTTP/1.1 501 Not Implemented\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                closing = True
                break
            for line in headers.split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    self.body_left = int(line[15:].strip() or 0)
            out.append(self.close if closing else self.keep_alive)
        if out:
            self.transport.write(b"".join(out))
        if closing:
            self.transport.close()

    def eof_received(self) -> bool:
        return False


async def serve(listen: tuple[str, int], size: int) -> None:
    keep_alive, close = response(size, close=False), response(size, close=True)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: HttpServer(keep_alive, close), *listen, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", type=host_port, required=True)
    parser.add_argument("--size", type=int, default=1024, help="response body bytes (default 1024)")
    add_loop_option(parser)
    args = parser.parse_args()
    run(serve(args.listen, args.size), args.loop)


if __name__ == "__main__":
    main()
