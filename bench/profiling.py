"""Sampling Python processes under load with py-spy, and reducing its stacks to the hot functions.

py-spy is not a project dependency: `.venv/bin/pip install py-spy` for your own use. It attaches to a
running process by pid (root, or ptrace allowed), so the process runs exactly as in a measured run, only
observed. Profiled runs are extra runs and never count in the figures.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.procs import Process

RATE = 250  # samples per second


def py_spy_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "py-spy"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("py-spy")


class PySpy:
    """`py-spy record` on one process until `stop()`; raw collapsed stacks go to `output`."""

    def __init__(self, target: Process, output: Path, *, native: bool = False, rate: int = RATE) -> None:
        binary = py_spy_binary()
        if binary is None:
            raise RuntimeError("py-spy is not installed (.venv/bin/pip install py-spy)")
        self.output = output
        argv = [binary, "record", "--pid", str(target.pid), "--rate", str(rate), "--format", "raw"]
        argv += ["--output", str(output), "--function"]
        # Native stacks need the target paused while sampled: slower, so only when asked for.
        argv.append("--native" if native else "--nonblocking")
        self.log = output.with_suffix(".log")
        self._log = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        """Ctrl-C is how py-spy is told to write its output and exit."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._log.close()


@dataclass(frozen=True)
class HotSpot:
    function: str
    self_share: float  # of busy samples, the part whose innermost frame is this function
    total_share: float  # of busy samples, the part with this function anywhere on the stack


@dataclass(frozen=True)
class Profile:
    samples: int  # all samples taken
    idle: int  # samples waiting in epoll/select: the loop had nothing to do
    innermost: list[HotSpot]  # by innermost frame (with --native: C functions, syscalls, memcpy ...)
    by_python: list[HotSpot]  # by innermost Python function, C work below it charged to it

    @property
    def busy(self) -> int:
        return self.samples - self.idle


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
_IDLE = ("epoll_wait", "epoll_pwait", "EpollSelector.select", "select", "poll")


def _short(frame: str) -> str:
    """'data_received (hbone/connection.py:123)' -> 'connection.py:data_received'; native frames py-spy
    could not name ('0x7f... (libc.so.6)') -> 'libc.so.6:?' so that they add up per library."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    func = "?" if match["func"].startswith("0x") else match["func"]
    return f"{Path(match['file']).name}:{func}"


def _is_python(name: str) -> bool:
    return name.split(":", 1)[0].endswith(".py")


def read_profile(raw: Path, top: int = 15) -> Profile:
    """Reduce a py-spy raw (collapsed stacks) file to its hot functions, idle samples set apart."""
    own: Counter[str] = Counter()
    python_own: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    samples = idle = 0
    with contextlib.suppress(FileNotFoundError), open(raw) as f:
        for line in f:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [_short(frame) for frame in stack.split(";")]
            samples += count
            if frames[-1].split(":", 1)[1] in _IDLE:
                idle += count
                continue
            own[frames[-1]] += count
            python_own[next((f for f in reversed(frames) if _is_python(f)), frames[-1])] += count
            for name in set(frames):
                anywhere[name] += count
    busy = samples - idle
    if not busy:
        return Profile(samples, idle, [], [])

    def spots(counter: Counter[str]) -> list[HotSpot]:
        return [HotSpot(name, n / busy, anywhere[name] / busy) for name, n in counter.most_common(top)]

    return Profile(samples, idle, spots(own), spots(python_own))


def format_profile(title: str, profile: Profile, log: Path | None = None) -> str:
    if not profile.busy:
        said = log.read_text(errors="replace").strip() if log is not None and log.exists() else ""
        return f"{title}: no busy samples" + (f" (py-spy said: {said})" if said else "")
    lines = [
        f"{title}: {profile.samples} samples, {profile.idle / profile.samples:.0%} idle; shares of busy samples",
        f"  {'self':>6} {'total':>6}  innermost frame",
    ]
    lines += [f"  {s.self_share:6.1%} {s.total_share:6.1%}  {s.function}" for s in profile.innermost]
    if any(not _is_python(s.function) for s in profile.innermost):
        lines.append(f"  {'self':>6} {'total':>6}  innermost Python function (the C work it called included)")
        lines += [f"  {s.self_share:6.1%} {s.total_share:6.1%}  {s.function}" for s in profile.by_python]
    return "\n".join(lines)
