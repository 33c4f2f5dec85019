"""Access log: one line per proxied connection or request, on the logger named `access`.

Text lines read like ztunnel's (`<time> info access <message> key=value ...`, values quoted only when they
need it); JSON lines (ACCESS_LOG_FORMAT=json) carry the same fields for log pipelines. The access logger has
its own handler and does not follow the daemon's log level: like Envoy's access log, it is a record of
traffic, not diagnostics, so LOG_LEVEL=error must not silence it.

Lines are buffered and written together, at most `FLUSH_INTERVAL` seconds after the first one (sooner when
`FLUSH_BYTES` are waiting, at once outside an event loop, and on exit), as Envoy buffers its access-log
file: a waypoint writes one line per request, and a write of its own per line was ~5 % of its CPU.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import TextIO

ACCESS_LOGGER = "access"
NEEDS_QUOTES = re.compile(r'[\s"=\\]')  # what would break `key=value` splitting
FORMATS = ("text", "json")

_logger = logging.getLogger(ACCESS_LOGGER)


FLUSH_INTERVAL = 0.5  # seconds a line may wait in the buffer
FLUSH_BYTES = 64 * 1024


class _AccessHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Buffers lines and writes them in batches (see the module's docstring). Also marks the handler we
    installed, so configuring again replaces it instead of doubling lines."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._pending_size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.add_line(line)

    def add_line(self, line: str) -> None:
        """Queue a finished line (what `emit` does after formatting)."""
        self._pending.append(line)
        self._pending_size += len(line) + 1
        if self._pending_size >= FLUSH_BYTES:
            self.flush()
            return
        # A flush is already due on the loop that runs: nothing to arrange (asking asyncio which loop runs
        # costs a getpid system call, once per line otherwise).
        timer_loop = self._timer_loop
        if self._timer is not None and timer_loop is not None and timer_loop.is_running():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()  # no loop to flush later: write now
            return
        if self._timer is None or self._timer_loop is not loop:  # (a timer of a closed loop never fires)
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_later(FLUSH_INTERVAL, self.flush)
            self._timer_loop = loop

    def flush(self) -> None:
        self.acquire()
        try:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._pending:
                text = "\n".join(self._pending) + "\n"
                self._pending.clear()
                self._pending_size = 0
                try:
                    self.stream.write(text)
                except (OSError, ValueError):
                    return  # a closed stdout must not take the proxy down; the lines are lost
            super().flush()
        finally:
            self.release()


def flush_access_log() -> None:
    """Write out buffered access lines now (before exiting without logging's own shutdown)."""
    for handler in _logger.handlers:
        handler.flush()


def configure_access_log(stream: TextIO | None = None) -> None:
    """Send access lines, unadorned, to `stream` (stdout by default, where Envoy also writes them)."""
    for handler in list(_logger.handlers):
        if isinstance(handler, _AccessHandler):
            _logger.removeHandler(handler)
    handler = _AccessHandler(stream if stream is not None else sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    _logger.addHandler(handler)
    _logger.setLevel(logging.INFO)
    _logger.propagate = False


def timestamp(now: float | None = None) -> str:
    """RFC 3339 UTC with microseconds, the form ztunnel and Envoy use."""
    now = time.time() if now is None else now
    seconds = int(now)
    micros = int((now - seconds) * 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{micros:06d}Z"


def _text_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    # Quote only what would break `key=value` splitting; JSON string escaping keeps it one line.
    if not text or NEEDS_QUOTES.search(text) is not None or not text.isprintable():
        return json.dumps(text, ensure_ascii=False)
    return text


def format_text(message: str, fields: Mapping[str, object], now: float | None = None) -> str:
    parts = [timestamp(now), "info", ACCESS_LOGGER, message]
    parts.extend(f"{k}={_text_value(v)}" for k, v in fields.items() if v is not None)
    return " ".join(parts)


def format_json(message: str, fields: Mapping[str, object], now: float | None = None) -> str:
    record: dict[str, object] = {"time": timestamp(now), "level": "info", "scope": ACCESS_LOGGER,
                                 "message": message}  # fmt: skip
    record.update((k, v) for k, v in fields.items() if v is not None)
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str)


class AccessLog:
    """Writes access lines in the configured format. Fields keep their order; None values are left out."""

    def __init__(self, fmt: str = "text", logger: logging.Logger | None = None) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"access log format {fmt!r} is not one of {', '.join(FORMATS)}")
        self.format = fmt
        self._logger = logger or _logger
        self._render = format_json if fmt == "json" else format_text

    @property
    def enabled(self) -> bool:
        return self._logger.isEnabledFor(logging.INFO)

    def write(self, fields: Mapping[str, object], message: str = "connection complete") -> None:
        # Skip the formatting entirely when nobody listens; this runs once per connection.
        if self._logger.isEnabledFor(logging.INFO):
            self.write_line(self._render(message, fields))

    def write_line(self, line: str) -> None:
        """Write a line already rendered in this log's format. When the only handler is ours (the daemons'
        case) the line goes straight into its buffer: a waypoint writes one per request, and the logging
        module's record, filters and formatter were most of that line's cost."""
        handlers = self._logger.handlers
        if len(handlers) == 1 and type(handlers[0]) is _AccessHandler and not self._logger.filters:
            handler = handlers[0]
            handler.acquire()
            try:
                handler.add_line(line)
            finally:
                handler.release()
        else:
            self._logger.info(line)
