"""The waypoint's settings: every daemon's common ones plus where it listens for HBONE."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from mesh.settings import Setting, Settings, addr, common_settings, load

DESCRIPTION = (
    "The ambient waypoint: terminates HBONE (mTLS + HTTP/2 CONNECT), routes each HTTP/1.1 or HTTP/2 request "
    "inside the tunnels on its own, and forwards it over HBONE to an endpoint."
)


def waypoint_settings() -> list[Setting]:
    settings = []
    for s in common_settings():
        if s.env == "PROXY_WORKLOAD_INFO":
            # The waypoint's identity (its certificate, its baggage) comes from here, so it cannot be absent.
            s = dataclasses.replace(s, required=True, help="The waypoint's own workload, "
                                    "namespace/name/service-account; its identity and peer metadata.")  # fmt: skip
        settings.append(s)
    settings.append(
        Setting("INBOUND_ADDR", default="0.0.0.0:15008", type=addr,
                help="HBONE listener (mTLS + HTTP/2 CONNECT) that ztunnels send this waypoint's traffic to.")
    )  # fmt: skip
    return settings


def load_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    return load(waypoint_settings(), argv, environ, prog="waypoint-py", description=DESCRIPTION)
