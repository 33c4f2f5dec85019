"""Waiting, with a deadline, for something no event reports: a metric, a log line, a server's inner state."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def eventually(check: Callable[[], T | Awaitable[T]], what: str, deadline: float = 10.0) -> T:
    """Poll `check` (plain or async) until it returns something truthy, and return that; fail, saying `what` was
    awaited, after `deadline` seconds. The deadline only bounds a hang: it is never a measure of anything."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while True:
        result = check()
        value = await result if inspect.isawaitable(result) else result
        if value:
            return value
        if loop.time() > end:
            raise AssertionError(f"not within {deadline:g}s: {what}")
        await asyncio.sleep(0.02)
