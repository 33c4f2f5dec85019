"""Clocks and durations: the CLI's `90s`/`30m`/`24h`/`365d` syntax and an injectable wall clock."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

Clock = Callable[[], datetime]
"""Returns the current time as a timezone-aware datetime; injected so renewal tests need no sleeping."""

# Certificates start a little in the past so a peer whose clock runs slightly behind still accepts them.
CLOCK_SKEW = timedelta(minutes=1)

_UNITS = {
    "s": timedelta(seconds=1),
    "m": timedelta(minutes=1),
    "h": timedelta(hours=1),
    "d": timedelta(days=1),
}
_PART = re.compile(r"(\d+)([smhd])")


def utc_now() -> datetime:
    return datetime.now(UTC)


def parse_duration(text: str) -> timedelta:
    """Parse `90s`, `30m`, `24h`, `365d`, or a sum of them such as `1h30m`; must be positive."""
    stripped = text.strip()
    pos = 0
    total = timedelta()
    for match in _PART.finditer(stripped):
        if match.start() != pos:
            break
        total += int(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(stripped) or not stripped:
        raise ValueError(
            f"invalid duration {text!r}: use a whole number with s, m, h or d, like 90s, 30m, 24h, 365d"
        )
    if total <= timedelta():
        raise ValueError(f"invalid duration {text!r}: it must be longer than zero")
    return total


def format_duration(value: timedelta) -> str:
    """The inverse of parse_duration for messages: the largest unit that divides the value exactly."""
    seconds = int(value.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
