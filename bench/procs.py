"""Starting, watching and stopping the benchmark's OS processes, and reading their CPU time and memory.

Every process runs in its own session (so a Ctrl-C at the terminal reaches only the harness, which then
stops them in order) and asks the kernel for SIGTERM should the harness die without cleaning up.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1
TCP_LISTEN = "0A"  # the LISTEN state in /proc/net/tcp


class ProcessFailed(RuntimeError):
    """A benchmark process exited, or did not do what was expected in time; the message has its log."""


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))


def python_module(module: str, *args: object) -> list[str]:
    """argv to run `python -m module args...` with the harness's own interpreter (the venv's)."""
    return [sys.executable, "-m", module, *map(str, args)]


class Process:
    """One started program: its stdout is a pipe of JSON lines, its stderr goes to `<logdir>/<name>.log`.

    With `stdout_to_log` its stdout goes to the log too (daemons that write access logs on stdout: a pipe
    nobody reads would fill up and stall them); `read_json` and `output` are then unavailable."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        logdir: Path,
        *,
        env: dict[str, str] | None = None,
        stdout_to_log: bool = False,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = logdir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log if stdout_to_log else subprocess.PIPE,
                stderr=log,
                env={**os.environ, **(env or {})},
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self._stdout_buffer = b""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def failure(self, what: str) -> ProcessFailed:
        status = "running" if self.alive() else f"exited with {self.popen.returncode}"
        tail = self.log_tail()
        detail = f"\n--- {self.log_path} (last lines) ---\n{tail}" if tail else f" (log: {self.log_path}, empty)"
        return ProcessFailed(f"{self.name} ({status}): {what}{detail}")

    # -- /proc figures -----------------------------------------------------------------------------------
    def _stat(self) -> list[str]:
        """Fields of /proc/<pid>/stat from field 3 on (index 0 is proc(5)'s field 3)."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        # The command name (field 2) may contain spaces and parentheses: split after its closing one.
        return stat[stat.rindex(")") + 2 :].split()

    def cpu_seconds(self) -> float:
        """User + system CPU time of the whole process (all threads), from /proc/<pid>/stat."""
        fields = self._stat()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime: fields 14 and 15

    def minor_faults(self) -> int:
        """Minor page faults so far (field 10): many per GiB moved means buffers that are mapped fresh
        (and zeroed by the kernel) instead of reused."""
        return int(self._stat()[7])

    def memory(self) -> dict[str, int]:
        """Resident set now (VmRSS) and its peak (VmHWM), in bytes, from /proc/<pid>/status."""
        found = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) * 1024
        return {"rss": found.get("VmRSS", 0), "peak_rss": found.get("VmHWM", 0)}

    # -- talking to it -----------------------------------------------------------------------------------
    def read_json(self, timeout: float) -> dict[str, Any]:
        """The next JSON line the process prints on stdout; fails if it exits or stays silent too long."""
        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._stdout_buffer:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self.failure(f"no result within {timeout:g}s")
                if not sel.select(min(left, 0.5)):
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise self.failure("exited before printing its result")
                self._stdout_buffer += chunk
        line, _, self._stdout_buffer = self._stdout_buffer.partition(b"\n")
        try:
            return json.loads(line)
        except json.JSONDecodeError as exc:
            raise self.failure(f"printed something that is not JSON: {line[:200]!r}") from exc

    def output(self) -> str:
        """Everything still unread on stdout, once the process has exited (for tools that print text)."""
        assert self.popen.stdout is not None
        return (self._stdout_buffer + self.popen.stdout.read()).decode(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise self.failure(f"still running after {timeout:g}s") from exc

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds. Safe to call twice."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait()
        if self.popen.stdout is not None:
            self.popen.stdout.close()


class ProcessGroup:
    """Owns every process of a scenario and stops them all on exit, whatever happened (use with `with`)."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.processes: list[Process] = []

    def start(
        self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None, stdout_to_log: bool = False
    ) -> Process:
        """Start `argv` as `name` (made unique with -2, -3, ... for processes started once per run)."""
        taken = {p.name for p in self.processes}
        unique, n = name, 1
        while unique in taken:
            n += 1
            unique = f"{name}-{n}"
        proc = Process(unique, argv, self.logdir, env=env, stdout_to_log=stdout_to_log)
        self.processes.append(proc)
        return proc

    def stop_all(self) -> None:
        # Newest first: load generators before proxies before sinks, so nothing sees its peer vanish early.
        for proc in reversed(self.processes):
            proc.stop()

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def machine_cpu_seconds() -> float:
    """CPU time all processes of the machine used since boot (user, nice, system, irq, softirq), from
    /proc/stat: the difference over a run, minus what our processes used, is load from elsewhere."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[1:8])
    return (user + nice + system + irq + softirq) / CLOCK_TICKS


def wait_quiet(threshold: float, timeout: float, sample: float = 0.5) -> float:
    """Wait until the machine's CPU use over `sample` seconds is below `threshold` % of one core (our
    processes idle between runs, so that is load from elsewhere), at most `timeout` seconds.
    Returns the last load seen, in % of one core."""
    deadline = time.monotonic() + timeout
    while True:
        before = machine_cpu_seconds()
        time.sleep(sample)
        load = 100 * (machine_cpu_seconds() - before) / sample
        if load < threshold or time.monotonic() >= deadline:
            return load


# -- ports -----------------------------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the kernel's choice); a tiny race is acceptable on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def listening(port: int) -> bool:
    """Whether some socket listens on TCP `port`, read from /proc/net/tcp{,6}: unlike a test connection,
    this leaves no empty connection behind in the process under test."""
    hex_port = f"{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[1].rsplit(":", 1)[1] == hex_port and fields[3] == TCP_LISTEN:
                    return True
    return False


def wait_listening(port: int, proc: Process | None = None, timeout: float = 15.0) -> None:
    """Wait until `port` listens; fails early, with its log, if `proc` (the one that should listen) dies."""
    deadline = time.monotonic() + timeout
    while not listening(port):
        if proc is not None and not proc.alive():
            raise proc.failure(f"exited before listening on port {port}")
        if time.monotonic() > deadline:
            if proc is not None:
                raise proc.failure(f"not listening on port {port} after {timeout:g}s")
            raise ProcessFailed(f"nothing listens on port {port} after {timeout:g}s")
        time.sleep(0.02)
