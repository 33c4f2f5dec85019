"""Daemon start-up: settings from flags, environment and defaults; and the runner's signal handling."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from ewgateway_py.settings import gateway_settings
from mesh.settings import (
    COMMON_SETTINGS,
    OFF,
    Setting,
    SettingsError,
    WorkloadInfo,
    addr,
    addr_or_off,
    common_settings,
    duration,
    load,
    parse_bool,
    path,
)
from waypoint_py.settings import waypoint_settings
from ztunnel_py.settings import ztunnel_settings

REPO = Path(__file__).resolve().parent.parent


def test_defaults_of_the_common_settings() -> None:
    s = load(COMMON_SETTINGS, [], {})
    assert s.trust_domain == "cluster.local"
    assert s.secret_ttl == 24 * 3600
    assert s.ambient_enable_baggage is False
    assert s.pool_max_streams_per_connection == 100
    assert s.pool_unused_release_timeout == 300
    assert (s.http2_stream_window_size, s.http2_connection_window_size, s.http2_frame_size) == (
        4194304, 16777216, 1048576)
    assert s.stats_addr == ("0.0.0.0", 15020)
    assert s.readiness_addr == ("0.0.0.0", 15021)
    assert s.admin_addr == ("127.0.0.1", 15000)
    assert s.log_level == "info" and s.access_log_format == "text"
    assert s.drain_deadline == 5.0
    assert s.local_xds_path is None and s.cert_dir is None and s.proxy_workload_info is None
    assert s.source("trust_domain") == "default"


def test_flag_beats_env_beats_default() -> None:
    env = {"CLUSTER_ID": "from-env", "NETWORK": "net-env", "POOL_MAX_STREAMS_PER_CONNECTION": "7"}
    s = load(COMMON_SETTINGS, ["--cluster-id", "from-flag", "--trust-domain=td.example"], env)
    assert s.cluster_id == "from-flag" and s.source("cluster_id") == "flag"
    assert s.network == "net-env" and s.source("network") == "env"
    assert s.pool_max_streams_per_connection == 7
    assert s.trust_domain == "td.example"
    assert s.as_dict()["cluster_id"] == "from-flag" and "_sources" not in s.as_dict()


def test_empty_env_means_default() -> None:
    assert load(COMMON_SETTINGS, [], {"TRUST_DOMAIN": "", "SECRET_TTL": ""}).secret_ttl == 86400


def test_typed_values() -> None:
    env = {
        "AMBIENT_ENABLE_BAGGAGE": "Yes",
        "STATS_ADDR": ":9090",
        "ADMIN_ADDR": "[::1]:15000",
        "PROXY_WORKLOAD_INFO": "default/curl-1/curl",
        "LOCAL_XDS_PATH": "/etc/mesh/state.yaml",
        "LOG_LEVEL": "DEBUG",
        "DRAIN_DEADLINE": "1m30s",
    }
    s = load(COMMON_SETTINGS, [], env)
    assert s.ambient_enable_baggage is True
    assert s.stats_addr == ("", 9090)
    assert s.admin_addr == ("::1", 15000)
    assert s.proxy_workload_info == WorkloadInfo("default", "curl-1", "curl")
    assert s.local_xds_path == Path("/etc/mesh/state.yaml")
    assert s.log_level == "debug"
    assert s.drain_deadline == 90.0
    # A bare boolean flag means true and beats the environment.
    s = load(COMMON_SETTINGS, ["--ambient-enable-baggage"], {"AMBIENT_ENABLE_BAGGAGE": "0"})
    assert s.ambient_enable_baggage is True


@pytest.mark.parametrize(("text", "value"), [("true", True), ("FALSE", False), ("1", True), ("0", False),
                                             ("yes", True), ("No", False)])
def test_bool_words(text: str, value: bool) -> None:
    assert parse_bool(text) is value


def test_parsers() -> None:
    assert addr("localhost:80") == ("localhost", 80)
    assert addr("0.0.0.0:0") == ("0.0.0.0", 0)
    assert addr("[::ffff:127.0.0.1]:80") == ("::ffff:127.0.0.1", 80)
    for bad in ("localhost", "::1:80", "[::1]80", "host:99999", "host:http", "nonsense:80", "[127.0.0.1]:80"):
        with pytest.raises(ValueError):
            addr(bad)
    assert addr_or_off(" Off ") == OFF and addr_or_off("127.0.0.1:15080") == ("127.0.0.1", 15080)
    assert duration("500ms") == 0.5 and duration("24h") == 86400 and duration("2.5") == 2.5
    for bad in ("5 minutes", "-1s", "s", "5x"):
        with pytest.raises(ValueError):
            duration(bad)
    assert path("~/x") == Path.home() / "x"


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        ([], {"POOL_MAX_STREAMS_PER_CONNECTION": "many"},
         ["environment variable POOL_MAX_STREAMS_PER_CONNECTION", "--pool-max-streams-per-connection",
          "'many' is not an integer"]),
        (["--stats-addr", "15020"], {},
         ["--stats-addr", "STATS_ADDR", "'15020' is not an address ip:port", "port is missing"]),
        ([], {"AMBIENT_ENABLE_BAGGAGE": "maybe"}, ["AMBIENT_ENABLE_BAGGAGE", "is not a boolean"]),
        ([], {"SECRET_TTL": "forever"}, ["SECRET_TTL", "is not a duration"]),
        ([], {"ACCESS_LOG_FORMAT": "xml"}, ["ACCESS_LOG_FORMAT", "is not one of text, json"]),
        ([], {"HTTP2_FRAME_SIZE": "100"}, ["HTTP2_FRAME_SIZE", "below the minimum of 16384"]),
        ([], {"PROXY_WORKLOAD_INFO": "default/curl"},
         ["PROXY_WORKLOAD_INFO", "namespace/name/service-account"]),
        # The parts of our own identity hold to the SPIFFE rule every peer checks it by (hbone.identity).
        ([], {"TRUST_DOMAIN": "Cluster.Local"},
         ["environment variable TRUST_DOMAIN", "--trust-domain", "'Cluster.Local' is not a SPIFFE trust domain",
          "may only hold lowercase"]),
        (["--trust-domain", "cluster.local:443"], {}, ["--trust-domain", "TRUST_DOMAIN", "may only hold lowercase"]),
        ([], {"PROXY_WORKLOAD_INFO": "default/curl/sleep%20v2"},
         ["PROXY_WORKLOAD_INFO", "no percent-encoding"]),
        ([], {"PROXY_WORKLOAD_INFO": "../curl/sleep"}, ["PROXY_WORKLOAD_INFO", "is not '.' or '..'"]),
    ],
)
def test_bad_values_exit_2_naming_the_setting_and_type(
    argv: list[str], env: dict[str, str], expected: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load(COMMON_SETTINGS, argv, env, prog="ztunnel-py")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err


def test_ztunnel_listeners_are_addresses_or_off() -> None:
    env = {"SOCKS5_ADDR": "OFF", "OUTBOUND_ADDR": "[::1]:15001", "INBOUND_ADDR": "127.0.0.1:15008"}
    s = load(ztunnel_settings(), [], env)
    assert s.socks5_addr == OFF and s.outbound_addr == ("::1", 15001) and s.inbound_addr == ("127.0.0.1", 15008)
    assert s.inbound_plaintext_addr is None  # unset: one listener per local workload IP
    s = load(ztunnel_settings(), ["--inbound-plaintext-addr", "off"], {})
    assert s.inbound_plaintext_addr == OFF
    assert (s.socks5_addr, s.outbound_addr) == (("127.0.0.1", 15080), ("0.0.0.0", 15001))


@pytest.mark.parametrize(
    ("settings", "env", "value", "why"),
    [
        (ztunnel_settings, "SOCKS5_ADDR", "127.0.0.1:notaport", "port 'notaport' is not a number"),
        (ztunnel_settings, "OUTBOUND_ADDR", "nonsense", "the port is missing"),
        (ztunnel_settings, "INBOUND_ADDR", "1.2.3.4:99999", "port '99999' is not a number from 0 to 65535"),
        (ztunnel_settings, "INBOUND_ADDR", "off", "the port is missing"),  # HBONE cannot be turned off
        (ztunnel_settings, "INBOUND_PLAINTEXT_ADDR", "nonsense:15006", "'nonsense' is not an IP address"),
        (ztunnel_settings, "STATS_ADDR", "[127.0.0.1]:15020", "only an IPv6 address goes in brackets"),
        (gateway_settings, "INBOUND_ADDR", "gateway:15008", "'gateway' is not an IP address"),
        (waypoint_settings, "READINESS_ADDR", "0.0.0.0:http", "port 'http' is not a number"),
    ],
)
def test_bad_listener_addresses_exit_2_naming_the_setting(
    settings: Callable[[], list[Setting]], env: str, value: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    required = {"PROXY_WORKLOAD_INFO": "istio-system/gw/gw"}  # the gateway's and the waypoint's
    option = "--" + env.lower().replace("_", "-")
    for argv, environ in (([], {env: value}), ([option, value], {})):
        with pytest.raises(SystemExit) as exit_info:
            load(settings(), argv, {**required, **environ}, prog="daemon")
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert option in err and env in err and f"{value!r} is not an address" in err and why in err


def test_help_lists_every_setting_with_env_and_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load(COMMON_SETTINGS, ["--help"], {}, prog="ztunnel-py")
    assert exit_info.value.code == 0
    flat = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for s in COMMON_SETTINGS:
        assert f"env {s.env};" in flat, s.env
        assert s.option in flat
    assert "default 0.0.0.0:15020" in flat and "default 24h" in flat and "default cluster.local" in flat


def test_daemons_extend_the_common_list() -> None:
    mine = common_settings()
    mine.append(Setting("ENABLE_RESPONSE_BAGGAGE", default="true", type=bool, help="Send baggage back."))
    mine.append(Setting("LISTEN", flag="--listen", default=":15008", type=addr, required=False))
    assert len(COMMON_SETTINGS) == len(mine) - 2  # the shared tuple is untouched
    s = load(mine, ["--listen", "127.0.0.1:0"], {"ENABLE_RESPONSE_BAGGAGE": "false"})
    assert s.enable_response_baggage is False and s.listen == ("127.0.0.1", 0)


def test_required_and_declaration_mistakes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load([Setting("LOCAL_XDS_PATH", type=path, required=True, help="Mesh state.")], [], {})
    assert "--local-xds-path (environment variable LOCAL_XDS_PATH) is required" in capsys.readouterr().err
    with pytest.raises(SettingsError, match="CLUSTER_ID"):
        load([*COMMON_SETTINGS, Setting("CLUSTER_ID")], [], {})
    with pytest.raises(SettingsError, match="--network"):
        load([*COMMON_SETTINGS, Setting("OTHER", flag="--network")], [], {})
    with pytest.raises(SettingsError, match="does not parse"):
        load([Setting("N", default="ten", type=int)], [], {})


# --- the runner -----------------------------------------------------------------------------------------

DAEMON = textwrap.dedent(
    """
    import asyncio, logging, sys
    from mesh.runner import run_daemon
    from mesh.settings import COMMON_SETTINGS, load

    async def main(settings, drain):
        log = logging.getLogger("test.daemon")
        log.info("started on %s", type(asyncio.get_running_loop()).__module__)
        print("started", flush=True)
        if sys.argv[1] == "fail":
            raise RuntimeError("cannot start\\nsecond line")
        await drain.wait()
        if sys.argv[1] == "stuck":
            await asyncio.sleep(3600)
        log.info("draining")

    raise SystemExit(run_daemon(main, load(COMMON_SETTINGS, [], {"DRAIN_DEADLINE": "0.2s"})))
    """
)


def spawn(mode: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", DAEMON, mode],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "started\n"
    return proc


def test_sigterm_drains_and_exits_0() -> None:
    proc = spawn("drain")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=5)
    assert proc.returncode == 0
    lines = err.splitlines()
    started = next(line for line in lines if "started on" in line)
    time_, level, logger, *message = started.split(" ")
    assert time_.endswith("Z") and "T" in time_ and level == "info" and logger == "test.daemon"
    assert message == ["started", "on", "uvloop"]
    assert any("SIGTERM: draining" in line for line in lines)
    assert any(line.endswith("test.daemon draining") for line in lines)


def test_second_signal_forces_exit_and_overrun_is_cut() -> None:
    proc = spawn("stuck")
    proc.send_signal(signal.SIGINT)
    assert proc.stderr is not None
    while "SIGINT: draining" not in (line := proc.stderr.readline()):
        assert line, "the daemon exited before it began to drain"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=5)
    assert proc.returncode == 128 + signal.SIGTERM

    # One signal only: the runner cancels main after the deadline plus grace and reports failure.
    proc = spawn("stuck")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=5)
    assert proc.returncode == 1 and "cancelling" in err


def test_main_failure_exits_1_with_one_line_traceback() -> None:
    proc = spawn("fail")
    _, err = proc.communicate(timeout=5)
    assert proc.returncode == 1
    (failure,) = [line for line in err.splitlines() if "daemon failed" in line]
    assert "RuntimeError: cannot start\\nsecond line" in failure and "Traceback" in failure
