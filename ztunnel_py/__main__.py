"""`python -m ztunnel_py` / `ztunnel-py`: the node proxy."""

from __future__ import annotations

import sys

from mesh.runner import run_daemon
from mesh.settings import load
from ztunnel_py.proxy import run
from ztunnel_py.settings import ztunnel_settings


def main(argv: list[str] | None = None) -> None:
    settings = load(
        ztunnel_settings(),
        sys.argv[1:] if argv is None else argv,
        prog="ztunnel-py",
        description="The ambient node proxy: captures workloads' TCP and carries it over HBONE.",
    )
    raise SystemExit(run_daemon(run, settings))


if __name__ == "__main__":
    main()
