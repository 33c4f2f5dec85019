"""The deploy files as the deploy tests read them: deploy/compose.yaml, the Dockerfile's HEALTHCHECK and
pyproject.toml's console scripts. Shared by tests/test_deploy.py and tests/test_deploy_compose.py.
"""

from __future__ import annotations

import json
import re
import tomllib
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
MESH_DIR = "/var/lib/ambient"  # where the compose `mesh` volume is mounted


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def console_scripts() -> dict[str, str]:
    """{script: module} of [project.scripts], e.g. {"ztunnel-py": "ztunnel_py"}."""
    scripts = pyproject()["project"]["scripts"]
    return {name: target.split(":")[0].removesuffix(".__main__") for name, target in scripts.items()}


def load_compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's `${VAR:-default}` and `${VAR}`, from `env` (default: empty, so defaults apply)."""
    env = env or {}

    def one(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(3) or ""
        return env.get(name) or default

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}", one, value)


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "environment is written as a mapping"
    return {str(k): interpolate(str(v)) for k, v in env.items()}


def netns_owner(services: dict[str, Any], name: str) -> str:
    """The service whose network namespace `name` runs in (itself, or its `network_mode: service:X`)."""
    mode = services[name].get("network_mode", "")
    return mode.removeprefix("service:") if mode.startswith("service:") else name


def subnets(compose: dict[str, Any]) -> dict[str, IPv4Network]:
    return {name: IPv4Network(net["ipam"]["config"][0]["subnet"]) for name, net in compose["networks"].items()}


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def healthcheck_argv() -> list[str]:
    args = next(a for k, a in dockerfile_instructions(REPO / "Dockerfile") if k == "HEALTHCHECK")
    return json.loads(args[args.index("CMD") + 3 :].strip())
