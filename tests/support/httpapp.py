"""A small HTTP/1.1 application for end-to-end tests, served from the test's own event loop.

GET /            -> "<name>\n"
GET /bytes/<n>   -> n bytes of seeded data (streamed)
POST /sha256     -> "<bytes> <sha256 hex>" of the body (streamed, Content-Length bodies)
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from dataclasses import dataclass, field


def body_chunks(n: int, seed: int = 42):  # type: ignore[no-untyped-def]
    """What GET /bytes/<n> sends, chunk by chunk."""
    rng, left = random.Random(seed), n
    while left:
        chunk = rng.randbytes(min(left, 1 << 20))
        left -= len(chunk)
        yield chunk


def body_sha256(n: int, seed: int = 42) -> str:
    digest = hashlib.sha256()
    for chunk in body_chunks(n, seed):
        digest.update(chunk)
    return digest.hexdigest()


@dataclass
class HttpApp:
    name: str
    server: asyncio.Server | None = None
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, peer ip)

    async def start(self, host: str, port: int) -> HttpApp:
        self.server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[0]
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                self.requests.append((method, path, peer))
                if method == "POST" and path == "/sha256":
                    length = int(headers.get("content-length", "0"))
                    digest, left = hashlib.sha256(), length
                    while left:
                        chunk = await reader.read(min(left, 1 << 20))
                        if not chunk:
                            return
                        digest.update(chunk)
                        left -= len(chunk)
                    await self._reply(writer, f"{length} {digest.hexdigest()}\n".encode())
                elif method == "GET" and path.startswith("/bytes/"):
                    n = int(path.removeprefix("/bytes/"))
                    writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n".encode())
                    for chunk in body_chunks(n):
                        writer.write(chunk)
                        await writer.drain()
                else:
                    await self._reply(writer, f"{self.name}\n".encode())
                if headers.get("connection", "").lower() == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, body: bytes) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Type: text/plain\r\n\r\n" % len(body) + body)
        await writer.drain()


def main() -> None:
    """`python -m tests.support.httpapp --name NAME --listen IP:PORT`, for apps inside network namespaces."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--listen", required=True)
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")

    async def serve() -> None:
        app = await HttpApp(args.name).start(host, int(port))
        print("ready", flush=True)
        assert app.server is not None
        await app.server.serve_forever()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
