"""Scenarios register themselves with `@bench.framework.scenario` when imported: add new modules here."""

from bench.scenarios import double_hbone, hbone_throughput, waypoint_http, ztunnel_http

__all__ = ["double_hbone", "hbone_throughput", "waypoint_http", "ztunnel_http"]
