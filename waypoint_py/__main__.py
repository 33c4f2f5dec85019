"""`python -m waypoint_py` / `waypoint-py`: run the waypoint until SIGTERM, then drain."""

from __future__ import annotations

from collections.abc import Sequence

from mesh.runner import run_daemon
from waypoint_py.daemon import serve
from waypoint_py.settings import load_settings


def main(argv: Sequence[str] | None = None) -> None:
    settings = load_settings(argv)
    raise SystemExit(run_daemon(serve, settings))


if __name__ == "__main__":
    main()
