"""The ztunnel daemon: listeners (SPEC §2), kept in step with the local workloads as the config changes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

from hbone.server import HboneServer, ServerIdentity, ThrottledLog
from mesh.daemon import DaemonContext
from mesh.model import DEFAULT_HBONE_PORT
from mesh.state import MeshState
from ztunnel_py import capture, inbound_plaintext
from ztunnel_py.capture import CaptureProtocol
from ztunnel_py.inbound import Inbound
from ztunnel_py.inbound_plaintext import PlaintextProtocol
from ztunnel_py.node import Node
from ztunnel_py.outbound import Outbound
from ztunnel_py.settings import OFF, PLAINTEXT_PORT
from ztunnel_py.socks5_listener import socks5_factory

log = logging.getLogger("ztunnel")


def _open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


class Ztunnel:
    def __init__(self, ctx: DaemonContext) -> None:
        self.ctx = ctx
        ctx.load_state()
        self.node = Node(ctx)
        self.inbound = Inbound(self.node)
        self.outbound = Outbound(self.node)
        self.hbone = HboneServer(self._identity_at, self.inbound.on_stream, settings=ctx.h2, name="ztunnel")
        self._per_ip: dict[tuple[str, str], asyncio.Server] = {}
        self._fixed: list[asyncio.Server] = []
        # Warnings about connections refused on the plaintext and capture ports: rate-limited, shared by all
        # listeners of a kind (a connection costs its sender nothing).
        self._plaintext_log = ThrottledLog(inbound_plaintext.log, logging.WARNING)
        self._capture_log = ThrottledLog(capture.log, logging.WARNING)
        ctx.watcher.on_change(self._state_changed)

    def _identity_at(self, local: tuple[str, int]) -> ServerIdentity | None:
        workload = self.node.local_workload(local[0])
        if workload is None:
            return None
        return self.ctx.identities.server(workload.identity)

    # -- listeners ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.ctx.settings
        loop = asyncio.get_running_loop()
        # Addresses were parsed when the settings were loaded: (host, port), or OFF.
        if s.inbound_addr:
            self._fixed.append(await self.hbone.listen(*s.inbound_addr))
        if s.inbound_plaintext_addr and s.inbound_plaintext_addr != OFF:
            self._fixed.append(
                await loop.create_server(
                    lambda: PlaintextProtocol(self.node, self._plaintext_log),
                    *s.inbound_plaintext_addr,
                    reuse_address=True,
                )
            )
        if s.socks5_addr != OFF:
            self._fixed.append(
                await loop.create_server(
                    lambda: socks5_factory(self.outbound), *s.socks5_addr, reuse_address=True, backlog=1024
                )
            )
        if s.outbound_addr != OFF:
            self._fixed.append(
                await loop.create_server(
                    lambda: CaptureProtocol(self.outbound, self._capture_log),
                    *s.outbound_addr,
                    reuse_address=True,
                    backlog=1024,
                )
            )
        # A listener on port 0 got its port from the kernel: that one is ours too (no loops through it).
        self.node.own_ports |= {sock.getsockname()[1] for server in self._fixed for sock in server.sockets}
        await self._reconcile()
        await self.ctx.serve_admin(self._config_dump)
        self.ctx.readiness.mark_ready("listeners")
        log.info(
            "ztunnel ready: node=%s network=%r cluster=%s local workloads: %s",
            self.node.node_name,
            self.ctx.network,
            self.ctx.cluster_id,
            ", ".join(w.name for w in self.node.local_workloads()) or "none",
        )

    async def _reconcile(self) -> None:
        """One HBONE (and plaintext) listener per local workload IP, unless fixed addresses are set."""
        s = self.ctx.settings
        wanted: dict[tuple[str, str], Callable[[str], Any]] = {}
        loop = asyncio.get_running_loop()
        for ip in self.node.local_ips():
            if not s.inbound_addr:
                wanted[("hbone", ip)] = lambda ip: self.hbone.listen(ip, DEFAULT_HBONE_PORT)
            if not s.inbound_plaintext_addr:
                wanted[("plaintext", ip)] = lambda ip: loop.create_server(
                    lambda: PlaintextProtocol(self.node, self._plaintext_log), ip, PLAINTEXT_PORT, reuse_address=True
                )
        for key in list(self._per_ip):
            if key not in wanted:
                self._per_ip.pop(key).close()
                log.info("stopped %s listener on %s (workload gone)", *key)
        for key, open_listener in wanted.items():
            if key in self._per_ip:
                continue
            try:
                self._per_ip[key] = await open_listener(key[1])
            except OSError as exc:
                log.error("cannot listen for %s on %s: %s", key[0], key[1], exc.strerror or exc)

    def _state_changed(self, state: MeshState) -> None:
        self.node.refresh(state)
        task = asyncio.get_running_loop().create_task(self._reconcile())
        self.node.track(task)

    def _config_dump(self) -> dict[str, Any]:
        return {
            "node": self.node.node_name,
            "localWorkloads": [w.uid for w in self.node.local_workloads()],
            "listeners": sorted(f"{kind} {ip}" for kind, ip in self._per_ip),
            "responseBaggage": self.node.response_baggage,
            "pool": [repr(c) for c in self.ctx.pool.connections()],
            "tasks": len(asyncio.all_tasks()),
            "openFds": _open_fds(),
        }

    # -- drain --------------------------------------------------------------------------------------------
    async def drain(self) -> None:
        """SIGTERM: stop accepting, GOAWAY on inbound connections, let connections finish up to the deadline."""
        deadline = self.ctx.settings.drain_deadline
        log.info("draining (deadline %.1fs)", deadline)
        for server in [*self._fixed, *self._per_ip.values()]:
            server.close()
        self.ctx.readiness.mark_pending("draining")
        await asyncio.gather(self.hbone.shutdown(deadline), self._finish_outbound(deadline))
        await self.ctx.pool.close(0)
        await self.ctx.close()

    async def _finish_outbound(self, deadline: float) -> None:
        pending = [t for t in self.node.tasks if not t.done()]
        if pending:
            _done, still = await asyncio.wait(pending, timeout=deadline)
            for task in still:
                task.cancel()


async def run(settings: Any, drain: asyncio.Event) -> None:
    ctx = DaemonContext("ztunnel", settings, drain)
    proxy = Ztunnel(ctx)
    await proxy.start()
    await drain.wait()
    with contextlib.suppress(Exception):
        await proxy.drain()
