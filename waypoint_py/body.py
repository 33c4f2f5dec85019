"""The request body as the forwarder reads it: streamed through once, with the first bytes kept so that a
retry can send it again (SPEC §6: retry only a body small enough to have been kept)."""

from __future__ import annotations

from waypoint_py.http_types import Downstream, Headers

RETRY_BODY_LIMIT = 64 * 1024


class RetainedBody:
    def __init__(self, source: Downstream, keep_limit: int) -> None:
        self.source = source
        self.keep_limit = keep_limit
        self.kept: list[bytes] = []
        self.kept_bytes = 0
        self.consumed = 0  # bytes read from the client so far
        self.overflowed = keep_limit <= 0
        self.ended = False

    @property
    def replayable(self) -> bool:
        """Everything read from the client so far is kept, so another attempt can start from the top."""
        return not self.overflowed or self.consumed == 0

    @property
    def trailers(self) -> Headers | None:
        return self.source.request_trailers

    def cursor(self) -> BodyCursor:
        return BodyCursor(self)


class BodyCursor:
    """One attempt's view of the body: the kept chunks first, then whatever the client sends next."""

    def __init__(self, body: RetainedBody) -> None:
        self.body = body
        self.index = 0

    async def next(self) -> bytes | None:
        body = self.body
        if not body.overflowed and self.index < len(body.kept):
            chunk = body.kept[self.index]
            self.index += 1
            return chunk
        if body.ended:
            return None
        chunk = await body.source.read_body()
        if chunk is None:
            body.ended = True
            return None
        body.consumed += len(chunk)
        if not body.overflowed:
            if body.kept_bytes + len(chunk) <= body.keep_limit:
                body.kept.append(chunk)
                body.kept_bytes += len(chunk)
                self.index += 1
            else:
                body.overflowed = True
                body.kept.clear()  # too big to retry: stop paying for the copy
        return chunk
