"""Watching the mesh state file: a good change applies at once, a bad one is refused and the last good
state stays in force (SPEC §8)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from mesh.config import ConfigError, ConfigReadError, load_config
from mesh.state import MeshState

log = logging.getLogger("mesh.watch")


class StateWatcher:
    """Holds the current MeshState; reloads it when the file's modification time or size changes."""

    def __init__(self, path: str | Path | None, interval: float = 1.0) -> None:
        self.path = Path(path) if path else None
        self.interval = interval
        self.state = MeshState()
        self.generation = 0
        self.last_error: str | None = None
        self._stamp: tuple[int, int] | None = None
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[MeshState], None]] = []

    def load_initial(self) -> MeshState:
        """First load; a bad file here is fatal (raises ConfigError), since there is no good state yet."""
        if self.path is None:
            return self.state
        self._stamp = self._file_stamp()
        self.state = MeshState(load_config(self.path))
        self.generation = 1
        return self.state

    def on_change(self, listener: Callable[[MeshState], None]) -> None:
        self._listeners.append(listener)

    def start(self) -> None:
        if self.path is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _file_stamp(self) -> tuple[int, int] | None:
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.check()

    def check(self) -> bool:
        """Reload if the file changed; returns True when a new state took effect."""
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return False
        previous, self._stamp = self._stamp, stamp
        assert self.path is not None
        try:
            config = load_config(self.path)
        except ConfigReadError as exc:
            # Not the file's fault (out of file descriptors, say): read again at the next check, or a change
            # made meanwhile (a new DENY policy) would be ignored until the file changes once more.
            self._stamp = previous
            if str(exc) != self.last_error:  # once per cause, not every second
                log.error("cannot read mesh config (trying again), keeping the last good one: %s", exc)
            self.last_error = str(exc)
            return False
        except ConfigError as exc:
            self.last_error = str(exc)
            log.error("refused new mesh config, keeping the last good one: %s", exc)
            return False
        except OSError as exc:
            self.last_error = f"{self.path}: {exc.strerror or exc}"
            log.error("cannot read mesh config, keeping the last good one: %s", self.last_error)
            return False
        self.state = MeshState(config)
        self.generation += 1
        self.last_error = None
        log.info(
            "mesh config reloaded from %s: %d workloads, %d services, %d policies",
            self.path,
            len(config.workloads),
            len(config.services),
            len(config.policies),
        )
        for listener in self._listeners:
            try:
                listener(self.state)
            except Exception:
                log.exception("config listener failed")
        return True
