"""The daemons' logging: one line per record on stderr, the log levels the admin `/logging` endpoint accepts,
and the protocol libraries kept quiet below info.

Both the runner (at start) and the admin server (when an operator changes the level) use it, so the admin
server does not depend on the daemon runner.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "warn": logging.WARNING,
              "error": logging.ERROR}  # fmt: skip
# At debug level the HPACK codec logs every header it decodes: CONNECT headers, and in the waypoint the
# application's own (authorization, cookies). Secrets must not reach the log, and our own debug lines say
# what matters, so these libraries never log below info.
QUIET_LIBRARIES = ("hpack", "h2")


# Control characters in a record (a SOCKS5 domain name, a peer's header) are shown escaped: a raw CR or
# line break would split or overwrite a line, NUL truncates it in some viewers, ESC drives terminals. Tab
# is harmless; U+2028/9 are line breaks to some readers (Python's splitlines among them).
_CONTROLS = (*range(0x09), *range(0x0A, 0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)
_ESCAPES = {c: f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}" for c in _CONTROLS}
_ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r"})


class _OneLineFormatter(logging.Formatter):
    """`time level logger message`, and never more than one line, so log collectors keep records whole."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(level)s %(name)s %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        ms = int(record.msecs)
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{ms:03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        record.level = record.levelname.lower()  # a new attribute: other handlers keep their levelname
        # A traceback stays in the record, with its line breaks escaped.
        line = super().format(record)
        return line if line.isprintable() else line.translate(_ESCAPES)  # the test is the cheap common case


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Root logger to stderr at `level`, replacing whatever handlers were there.

    Our format prints neither the caller's file and line nor the process, thread or task, so records do not
    look them up: the access log writes one record per request or connection, and a stack walk plus getpid
    and thread/process name lookups per record cost more than the formatting itself."""
    logging.logProcesses = False
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # Python 3.12+; harmless before
    logging._srcfile = None  # no findCaller() stack walk (the logging HOWTO's "Optimization" section)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(_OneLineFormatter())
    root.addHandler(handler)
    set_log_level(LOG_LEVELS.get(level.lower(), logging.INFO))


def set_log_level(level: int) -> None:
    """The daemon's log level (at start, and when the admin /logging endpoint changes it)."""
    logging.getLogger().setLevel(level)
    for name in QUIET_LIBRARIES:
        # Their own level, not the root's: a logger with a level is not affected by the root's later changes.
        logging.getLogger(name).setLevel(max(logging.INFO, level))
