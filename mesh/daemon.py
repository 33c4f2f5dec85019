"""What every daemon sets up the same way: settings-derived parts, the mesh state watcher, certificates,
metrics, and the stats (15020), readiness (15021) and admin (15000) servers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from hbone.identity import Identity
from hbone.pool import Pool
from mesh.accesslog import AccessLog
from mesh.credentials import TlsIdentities
from mesh.http_server import Readiness, admin_routes, readiness_routes, serve_http, stats_routes
from mesh.metrics import BaggageMetrics, build_info, new_registry
from mesh.settings import Settings
from mesh.upstream import Connector, h2_settings
from mesh.version import VERSION
from mesh.watch import StateWatcher

log = logging.getLogger("mesh.daemon")


class DaemonContext:
    """The shared parts of a daemon, built from its settings."""

    def __init__(self, component: str, settings: Settings, drain: asyncio.Event) -> None:
        self.component = component
        self.settings = settings
        self.drain = drain
        self.registry = new_registry()
        build_info(self.registry, component, VERSION)
        self.baggage_metrics = BaggageMetrics(self.registry)
        self.readiness = Readiness(pending=("state", "listeners"))
        self.watcher = StateWatcher(settings.local_xds_path)
        self.identities = TlsIdentities.from_settings(settings.ca_certs_dir, settings.cert_dir, settings.secret_ttl)
        self.h2 = h2_settings(settings)
        self.pool = Pool(idle_timeout=settings.pool_unused_release_timeout)
        self.connector = Connector(self.identities, self.h2, self.pool)
        self.access_log = AccessLog(settings.access_log_format)
        self.baggage_enabled: bool = settings.ambient_enable_baggage
        self._servers: list[asyncio.Server] = []

    @property
    def network(self) -> str:
        return self.settings.network

    @property
    def cluster_id(self) -> str:
        return self.settings.cluster_id

    def proxy_identity(self) -> Identity | None:
        """The identity named by PROXY_WORKLOAD_INFO (namespace/name/service-account), if set."""
        info = self.settings.proxy_workload_info
        if info is None:
            return None
        return Identity.of(info.namespace, info.service_account, self.settings.trust_domain)

    def load_state(self) -> None:
        self.watcher.load_initial()
        self.watcher.start()
        self.readiness.mark_ready("state")

    async def serve_admin(self, config_dump: Callable[[], dict[str, Any]]) -> None:
        """Start the stats, readiness and admin servers on their configured addresses."""
        s = self.settings
        plan = [
            (s.stats_addr, stats_routes(self.registry), "stats"),
            (s.readiness_addr, readiness_routes(self.readiness), "readiness"),
            (s.admin_addr, admin_routes(lambda: self._dump(config_dump), self.drain.set), "admin"),
        ]
        for (host, port), routes, name in plan:
            if port == 0 and host == "":
                continue
            self._servers.append(await serve_http(host, port, routes, name=name))

    def _dump(self, config_dump: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        dump = {
            "component": self.component,
            "version": VERSION,
            "config": {k: str(v) if v is not None else None for k, v in self.settings.as_dict().items()},
            "certificates": self.identities.describe(),
            "stateGeneration": self.watcher.generation,
            "lastConfigError": self.watcher.last_error,
            **self.watcher.state.to_dict(),
        }
        dump.update(config_dump())
        return dump

    async def close(self) -> None:
        await self.watcher.stop()
        await self.pool.close()
        for server in self._servers:
            server.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
