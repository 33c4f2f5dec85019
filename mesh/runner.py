"""Run a daemon: uvloop, one-line logging, and SIGTERM/SIGINT turned into a graceful drain.

The daemon's `main(settings, drain)` runs until it returns. The first SIGTERM or SIGINT (or anything else
that sets `drain`, such as the admin `/quitquitquit`) asks it to drain: stop accepting, let open connections
finish within DRAIN_DEADLINE, then return. A second signal exits at once, and a main that overruns its
deadline by more than a grace period is cancelled, so an orchestrator's stop never hangs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable

from hbone.allocator import tune_allocator
from hbone.gctune import tune_gc
from mesh.accesslog import configure_access_log, flush_access_log
from mesh.logs import configure_logging
from mesh.settings import Settings

log = logging.getLogger("mesh.runner")

DaemonMain = Callable[[Settings, asyncio.Event], Awaitable[None]]

DEFAULT_DRAIN_DEADLINE = 5.0
DRAIN_GRACE = 1.0  # on top of the deadline, for main's own clean-up after it cuts connections
EXIT_OK = 0
EXIT_FAILED = 1


def run_daemon(main: DaemonMain, settings: Settings, *, use_uvloop: bool = True) -> int:
    """Run `main` to completion and return the process exit code: 0 after a clean drain, 1 on failure.

    Use as `raise SystemExit(run_daemon(main, settings))`.
    """
    configure_logging(getattr(settings, "log_level", "info"))
    configure_access_log()
    tune_allocator()
    tune_gc()
    try:
        with asyncio.Runner(loop_factory=_loop_factory(use_uvloop)) as runner:
            return runner.run(_supervise(main, settings))
    finally:
        flush_access_log()


def _loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if not use_uvloop:
        return None
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not installed; using the standard asyncio event loop")
        return None
    return uvloop.new_event_loop


async def _supervise(main: DaemonMain, settings: Settings) -> int:
    loop = asyncio.get_running_loop()
    drain = asyncio.Event()
    deadline = float(getattr(settings, "drain_deadline", DEFAULT_DRAIN_DEADLINE))
    signals_seen = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1 and not drain.is_set():
            log.info("%s: draining for up to %.1fs (send it again to exit now)", sig.name, deadline)
            drain.set()
            return
        log.warning("%s again: exiting without draining", sig.name)
        for handler in logging.getLogger().handlers:
            handler.flush()
        flush_access_log()
        # os._exit, not SystemExit: the operator asked for now, and unwinding could block on the very
        # connections that are not draining.
        os._exit(128 + sig)

    handled = (signal.SIGTERM, signal.SIGINT)
    for sig in handled:
        loop.add_signal_handler(sig, on_signal, sig)
    task = asyncio.create_task(main(settings, drain), name="daemon-main")
    drain_wait = asyncio.create_task(drain.wait(), name="drain-wait")
    try:
        await asyncio.wait({task, drain_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            await asyncio.wait({task}, timeout=deadline + DRAIN_GRACE)
        if not task.done():
            log.error("still running %.1fs after the drain began; cancelling", deadline + DRAIN_GRACE)
            task.cancel()
            await asyncio.wait({task}, timeout=DRAIN_GRACE)
            return EXIT_FAILED
        if task.cancelled():
            log.error("daemon main was cancelled")
            return EXIT_FAILED
        error = task.exception()
        if error is not None:
            log.error("daemon failed: %s", error, exc_info=error)
            return EXIT_FAILED
        log.info("drained, exiting" if drain.is_set() else "main returned, exiting")
        return EXIT_OK
    finally:
        drain_wait.cancel()
        for sig in handled:
            loop.remove_signal_handler(sig)
