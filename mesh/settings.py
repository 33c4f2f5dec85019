"""Daemon settings, declared once and read from flags, environment variables and defaults.

Each daemon lists its settings as `Setting`s (the common ones below plus its own). `load()` resolves each
one as: command-line flag, else environment variable (Istio's names where Istio has one), else default.
`--help` lists every setting with its variable and default, and a bad value stops start-up with a message
that names the flag, the variable and the expected type (exit status 2, as argparse does).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from hbone.identity import IdentityError, check_segment, check_trust_domain

# --- value types ----------------------------------------------------------------------------------------
# A setting's `type` is a parser from text. `str`, `int` and `bool` are accepted as-is for readability and
# mapped to the parsers below; `addr`, `addr_or_off`, `duration`, `path`, `trust_domain` and `workload_info` are
# parsers themselves.

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError("not one of true/false, 1/0, yes/no")


def parse_int(text: str) -> int:
    return int(text.strip(), 10)


def addr(text: str) -> tuple[str, int]:
    """`ip:port`, `[v6]:port`, `localhost:port`, or `:port` (every interface, returned as host "")."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError("an IPv6 address must look like [::1]:15000")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError("the port is missing")
        if ":" in host:
            raise ValueError("put an IPv6 address in brackets, e.g. [::1]:15000")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} is not a number from 0 to 65535")
    # A listener binds an address; any other name would only fail later, at bind time, naming no setting.
    if host and host != "localhost":
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IP address") from None
        if text.startswith("[") and ip.version != 6:
            raise ValueError("only an IPv6 address goes in brackets")
    return host, int(port_text)


OFF = "off"


def addr_or_off(text: str) -> tuple[str, int] | str:
    """An address as for `addr`, or `off` (any case) for a listener that is disabled."""
    if text.strip().lower() == OFF:
        return OFF
    return addr(text)


_DURATION_UNITS = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0,
}  # fmt: skip
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h|d)")


def duration(text: str) -> float:
    """Seconds, from Go/Istio-style durations (`500ms`, `5s`, `1h30m`) or a bare number of seconds."""
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION_PART.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise ValueError("use a number with a unit, e.g. 500ms, 5s, 5m, 24h or 1h30m") from None
        seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if seconds < 0 or seconds != seconds:
        raise ValueError("a duration cannot be negative")
    return seconds


def path(text: str) -> Path:
    if not text.strip():
        raise ValueError("the path is empty")
    return Path(text).expanduser()


@dataclass(frozen=True, slots=True)
class WorkloadInfo:
    """Who this proxy is, from PROXY_WORKLOAD_INFO `namespace/name/service-account`."""

    namespace: str
    name: str
    service_account: str


def workload_info(text: str) -> WorkloadInfo:
    parts = text.strip().split("/")
    if len(parts) != 3 or not all(parts):
        raise ValueError("expected namespace/name/service-account")
    namespace, name, service_account = parts
    # The namespace and service account name our identity: held to the rule every peer checks it by, so a
    # name that no handshake would accept stops start-up here rather than failing every connection later.
    try:
        check_segment(namespace)
        check_segment(service_account)
    except IdentityError as e:
        raise ValueError(str(e)) from None
    return WorkloadInfo(namespace, name, service_account)


def trust_domain(text: str) -> str:
    """A SPIFFE trust domain (lowercase letters, digits, '.', '-' and '_'), as peers check it in our certificate."""
    try:
        return check_trust_domain(text.strip())
    except IdentityError as e:
        raise ValueError(str(e)) from None


_DESCRIPTIONS: dict[Callable[[str], Any], tuple[str, str]] = {
    # parser: (what the error message says was expected, the metavar in --help)
    str: ("a string", "TEXT"),
    parse_int: ("an integer", "INT"),
    parse_bool: ("a boolean (true/false, 1/0, yes/no)", "BOOL"),
    addr: ("an address ip:port, [ipv6]:port, localhost:port or :port", "HOST:PORT"),
    addr_or_off: ("an address ip:port, [ipv6]:port, localhost:port or :port, or off", "HOST:PORT|off"),
    duration: ("a duration such as 500ms, 5s, 5m or 24h", "DURATION"),
    path: ("a file system path", "PATH"),
    workload_info: ("namespace/name/service-account", "NS/NAME/SA"),
    trust_domain: ("a SPIFFE trust domain", "DOMAIN"),
}
_ALIASES: dict[object, Callable[[str], Any]] = {int: parse_int, bool: parse_bool}


# --- declarations ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setting:
    env: str
    flag: str | None = None  # derived from `env` when omitted: CLUSTER_ID → --cluster-id
    default: Any = None  # text is parsed like a flag value, so --help shows it as a user would type it
    type: Callable[[str], Any] = str
    help: str = ""
    choices: tuple[str, ...] | None = None  # matched case-insensitively, stored lower-case
    minimum: int | None = None
    maximum: int | None = None
    required: bool = False

    @property
    def name(self) -> str:
        """The attribute on the loaded `Settings`: CLUSTER_ID → cluster_id."""
        return self.env.lower()

    @property
    def option(self) -> str:
        return self.flag or "--" + self.env.lower().replace("_", "-")

    @property
    def parser(self) -> Callable[[str], Any]:
        return _ALIASES.get(self.type, self.type)

    def describe_type(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        known = _DESCRIPTIONS.get(self.parser)
        if known:
            return known[0]
        doc = (self.parser.__doc__ or "").strip().splitlines()
        return doc[0] if doc else getattr(self.parser, "__name__", "a valid value")

    def convert(self, raw: str) -> Any:
        """Parse one textual value; ValueError says what was wrong (without naming the setting)."""
        if self.choices is not None:
            word = raw.strip().lower()
            if word not in self.choices:
                raise ValueError(f"{raw!r} is not {self.describe_type()}")
            return word
        try:
            value = self.parser(raw)
        except ValueError as e:
            detail = str(e)
            # int() and friends say "invalid literal for int() with base 10", which helps no operator.
            why = f" ({detail})" if detail and "literal" not in detail else ""
            raise ValueError(f"{raw!r} is not {self.describe_type()}{why}") from None
        if isinstance(value, int) and not isinstance(value, bool):
            if self.minimum is not None and value < self.minimum:
                raise ValueError(f"{value} is below the minimum of {self.minimum}")
            if self.maximum is not None and value > self.maximum:
                raise ValueError(f"{value} is above the maximum of {self.maximum}")
        return value


class Settings(SimpleNamespace):
    """Loaded values as attributes (`settings.cluster_id`); `source(name)` says where each one came from."""

    def source(self, name: str) -> str:
        return self.__dict__.get("_sources", {}).get(name, "unknown")

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


class SettingsError(ValueError):
    """A declaration mistake in code (duplicate names, a default that does not parse), not a user error."""


def load(
    settings: Sequence[Setting],
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    prog: str | None = None,
    description: str | None = None,
) -> Settings:
    """Resolve every setting: flag, else environment variable, else default. Exits 2 on a bad value.

    An empty environment variable counts as unset, so `FOO=` in a compose file means "use the default".
    """
    argv = sys.argv[1:] if argv is None else argv
    environ = os.environ if environ is None else environ
    _check_declarations(settings)
    parser = build_parser(settings, prog=prog, description=description)
    args = parser.parse_args(list(argv))

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for s in settings:
        raw: str | None = getattr(args, s.name)
        origin = f"{s.option}"
        if raw is None:
            env_value = environ.get(s.env)
            if env_value:
                raw, origin = env_value, f"environment variable {s.env}"
        if raw is None:
            if s.required:
                parser.error(f"{s.option} (environment variable {s.env}) is required: {s.help}")
            values[s.name] = _default(s)
            sources[s.name] = "default"
            continue
        try:
            values[s.name] = s.convert(raw)
        except ValueError as e:
            other = f" (or environment variable {s.env})" if origin == s.option else f" (or {s.option})"
            parser.error(f"invalid value for {origin}{other}: {e}")
        sources[s.name] = "flag" if origin == s.option else "env"
    result = Settings(**values)
    result.__dict__["_sources"] = sources
    return result


def build_parser(
    settings: Sequence[Setting], *, prog: str | None = None, description: str | None = None
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="Every option can also be set with the environment variable shown next to it; "
        "an option on the command line wins over the variable, which wins over the default.",
    )
    for s in settings:
        shown = "none" if s.default is None else _show(s.default)
        # argparse %-formats help text, so a literal % must be doubled.
        text = f"{s.help} [env {s.env}; default {shown}]".strip().replace("%", "%%")
        known = _DESCRIPTIONS.get(s.parser, ("", "VALUE"))
        metavar = "{" + ",".join(s.choices) + "}" if s.choices else known[1]
        kwargs: dict[str, Any] = {"dest": s.name, "default": None, "metavar": metavar, "help": text}
        if s.parser is parse_bool:
            # `--ambient-enable-baggage` alone means true; `--ambient-enable-baggage=false` still works.
            kwargs.update(nargs="?", const="true")
        parser.add_argument(s.option, **kwargs)
    return parser


def _show(value: Any) -> str:
    if value == "":
        return '""'
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple) and len(value) == 2:
        host, port = value
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(value)


def _default(s: Setting) -> Any:
    if isinstance(s.default, str) and s.parser is not str:
        try:
            return s.convert(s.default)
        except ValueError as e:
            raise SettingsError(f"default of {s.env} does not parse: {e}") from None
    return s.default


def _check_declarations(settings: Sequence[Setting]) -> None:
    seen: dict[str, str] = {}
    for s in settings:
        keys = {s.env, s.option, s.name}
        for key in keys:
            if key in seen:
                raise SettingsError(f"{key} is declared by both {seen[key]} and {s.env}")
        seen.update(dict.fromkeys(keys, s.env))
        _default(s)


# --- the settings every daemon has ----------------------------------------------------------------------

_MAX_WINDOW = 2**31 - 1  # RFC 9113 §6.9.1

# fmt: off
COMMON_SETTINGS: tuple[Setting, ...] = (
    Setting("CLUSTER_ID", default="Kubernetes", help="Cluster this daemon runs in (Istio's default is Kubernetes)."),
    Setting("NETWORK", default="", help="Network this daemon's node is on; empty for a single-network mesh."),
    Setting("TRUST_DOMAIN", default="cluster.local", type=trust_domain,
            help="SPIFFE trust domain of local identities."),
    Setting("LOCAL_XDS_PATH", type=path, help="Mesh state file in ztunnel's local config format (watched)."),
    Setting("CA_CERTS_DIR", type=path, help="Directory of the mesh CA used to mint workload certificates."),
    Setting("CERT_DIR", type=path, help="Load workload certificates and keys from this directory instead of "
            "minting them."),
    Setting("SECRET_TTL", default="24h", type=duration, help="Lifetime of minted workload certificates."),
    Setting("AMBIENT_ENABLE_BAGGAGE", default="false", type=bool,
            help="Send and read peer metadata in the CONNECT baggage header."),
    Setting("POOL_MAX_STREAMS_PER_CONNECTION", default="100", type=int, minimum=1,
            help="HBONE streams per pooled HTTP/2 connection before another is opened."),
    Setting("POOL_UNUSED_RELEASE_TIMEOUT", default="5m", type=duration,
            help="How long an idle pooled HBONE connection is kept."),
    Setting("HTTP2_STREAM_WINDOW_SIZE", default="4194304", type=int, minimum=1, maximum=_MAX_WINDOW,
            help="HTTP/2 initial stream flow-control window in bytes."),
    Setting("HTTP2_CONNECTION_WINDOW_SIZE", default="16777216", type=int, minimum=1, maximum=_MAX_WINDOW,
            help="HTTP/2 connection flow-control window in bytes."),
    Setting("HTTP2_FRAME_SIZE", default="1048576", type=int, minimum=16384, maximum=16777215,
            help="HTTP/2 maximum frame size in bytes."),
    Setting("STATS_ADDR", default="0.0.0.0:15020", type=addr, help="Prometheus metrics listener."),
    Setting("READINESS_ADDR", default="0.0.0.0:15021", type=addr, help="Readiness probe listener."),
    Setting("ADMIN_ADDR", default="127.0.0.1:15000", type=addr, help="Admin listener; keep it on localhost."),
    Setting("PROXY_WORKLOAD_INFO", type=workload_info,
            help="The workload this proxy acts as, namespace/name/service-account."),
    Setting("LOG_LEVEL", default="info", choices=("debug", "info", "warning", "error"), help="Log level."),
    Setting("ACCESS_LOG_FORMAT", default="text", choices=("text", "json"),
            help="Access log lines as key=value text or JSON."),
    Setting("DRAIN_DEADLINE", default="5s", type=duration,
            help="How long open connections may finish after SIGTERM before they are cut."),
)
# fmt: on


def common_settings() -> list[Setting]:
    """A fresh list of the common settings, for a daemon to extend with its own."""
    return list(COMMON_SETTINGS)
