"""`python -m ewgateway_py` / `ewgateway-py`: load settings, run until SIGTERM, drain, exit."""

from __future__ import annotations

from collections.abc import Sequence

from ewgateway_py.daemon import run
from ewgateway_py.settings import load_settings
from mesh.runner import run_daemon


def main(argv: Sequence[str] | None = None) -> None:
    settings = load_settings(argv)
    raise SystemExit(run_daemon(run, settings))


if __name__ == "__main__":
    main()
