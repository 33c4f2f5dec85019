"""A raw HTTP/2 client over mTLS that can send what a well-behaved client never would."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events


@dataclass
class StreamOutcome:
    status: int | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    ended_with_headers: bool = False
    data: bytes = b""
    reset_code: int | None = None
    connection_closed: bool = False
    goaway_code: int | None = None


class RawH2Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        config = h2.config.H2Configuration(client_side=True, header_encoding=None, validate_outbound_headers=False)
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        self.writer.write(self.conn.data_to_send())

    @classmethod
    async def open(cls, address: tuple[str, int], ctx: ssl.SSLContext) -> RawH2Client:
        reader, writer = await asyncio.open_connection(*address, ssl=ctx, server_hostname="")
        return cls(reader, writer)

    async def request(self, headers: list[tuple[str, str]], *, end_stream: bool = False) -> StreamOutcome:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(k.encode(), v.encode()) for k, v in headers], end_stream=end_stream)
        self.writer.write(self.conn.data_to_send())
        return await self.outcome(sid)

    async def outcome(self, sid: int, timeout: float = 5.0) -> StreamOutcome:
        out = StreamOutcome()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            data = await asyncio.wait_for(self.reader.read(65536), max(0.01, deadline - loop.time()))
            if not data:
                out.connection_closed = True
                return out
            try:
                events = self.conn.receive_data(data)
            except h2.exceptions.ProtocolError:
                out.connection_closed = True
                return out
            self.writer.write(self.conn.data_to_send())
            for ev in events:
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    out.headers = list(ev.headers)  # type: ignore[arg-type]
                    out.status = int(dict(out.headers)[b":status"])
                    out.ended_with_headers = ev.stream_ended is not None
                    if not out.ended_with_headers:
                        return out  # an open tunnel: the answer is all we wait for
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                    out.data += ev.data
                elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                    out.reset_code = ev.error_code
                    return out
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    # give a trailing RST_STREAM a moment to arrive
                    try:
                        more = await asyncio.wait_for(self.reader.read(65536), 0.1)
                        for ev2 in self.conn.receive_data(more) if more else []:
                            if isinstance(ev2, h2.events.StreamReset) and ev2.stream_id == sid:
                                out.reset_code = ev2.error_code
                    except (TimeoutError, h2.exceptions.ProtocolError):
                        pass
                    return out
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    out.goaway_code = ev.error_code
                    out.connection_closed = True
                    return out

    def close(self) -> None:
        self.writer.close()
