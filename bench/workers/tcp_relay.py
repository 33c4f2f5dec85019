"""Plain TCP relay, the baseline: per accepted connection, connect to `--connect` and copy both ways.

The least an asyncio relay can do: protocol callbacks, each chunk written to the other side in the same
callback, back-pressure as pause/resume, half-close passed on. Deliberately independent of `hbone.relay`,
so that the baseline stays put while the code under test changes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

from bench.workers.common import add_loop_option, host_port, run

log = logging.getLogger("bench.tcp_relay")


class Side(asyncio.Protocol):
    """One socket of a relayed pair; what it reads goes to `peer`'s socket."""

    def __init__(self, peer: Side | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer = peer
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None and self.peer.transport is not None
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        assert self.peer is not None and self.peer.transport is not None
        if self.peer.eof:
            self.peer.transport.close()
            return False
        self.peer.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            if exc is None:
                self.peer.transport.close()
            else:
                self.peer.transport.abort()

    def pause_writing(self) -> None:
        # Our socket's send buffer is full: stop reading what would be written to it.
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()


class Downstream(Side):
    """The accepted side, paused until the upstream connection is up.

    A pause_reading() in connection_made is undone by the loop (uvloop, and asyncio before Python 3.12:
    cpython gh-103607), so the first early chunk is kept and reading paused again from data_received.
    On connect, reading resumes *before* the early data is forwarded, so that a pause caused by
    forwarding it sticks."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__()
        self.upstream = upstream
        self.early: list[bytes] = []
        self.early_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        transport.pause_reading()  # type: ignore[attr-defined]
        asyncio.get_running_loop().create_task(self._connect())

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.early.append(data)
            assert self.transport is not None
            self.transport.pause_reading()
        else:
            super().data_received(data)

    def eof_received(self) -> bool:
        if self.peer is None:
            self.early_eof = True
            return True
        return super().eof_received()

    async def _connect(self) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        try:
            _, up = await loop.create_connection(lambda: Side(peer=self), *self.upstream)
        except OSError as exc:
            log.warning("connect to %s:%d failed: %s", *self.upstream, exc)
            self.transport.abort()
            return
        self.peer = up
        with contextlib.suppress(RuntimeError):
            self.transport.resume_reading()
        for data in self.early:
            super().data_received(data)
        self.early.clear()
        if self.early_eof:
            super().eof_received()


async def serve(listen: tuple[str, int], upstream: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Downstream(upstream), *listen, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", type=host_port, required=True)
    parser.add_argument("--connect", type=host_port, required=True)
    add_loop_option(parser)
    args = parser.parse_args()
    run(serve(args.listen, args.connect), args.loop)


if __name__ == "__main__":
    main()
