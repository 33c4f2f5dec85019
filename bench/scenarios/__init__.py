"""Scenarios register themselves with `@bench.framework.scenario` when imported: add new modules here."""

from bench.scenarios import hbone_throughput

__all__ = ["hbone_throughput"]
