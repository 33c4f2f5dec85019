"""What every worker needs: the event loop choice, address parsing and JSON output."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Coroutine
from typing import Any

from hbone.allocator import tune_allocator

LOOPS = ("uvloop", "asyncio")


def add_loop_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loop", choices=LOOPS, default="uvloop", help="event loop (default: uvloop)")


def run(main: Coroutine[Any, Any, None], loop: str) -> None:
    """Run `main` on uvloop or on asyncio's default loop; SIGTERM (the harness's stop) just ends us."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    tune_allocator()  # as the daemons do (mesh.runner), for every worker alike
    if loop == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


def host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def emit(record: dict[str, Any]) -> None:
    """One result line for the harness (`Process.read_json`)."""
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()
