"""Helpers shared by the benchmark scripts in bench/: processes, ports, dnsperf, statistics.

Every process is started in its own session (its own process group) and registered with a
:class:`Processes` set, so a benchmark can kill everything it started (TERM, then KILL) from a
``finally`` block, whether it finished, failed, or was interrupted.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"


class BenchError(Exception):
    """A server did not start or did not answer correctly; the benchmark stops with exit 1."""


def code_version() -> str:
    """Which dnsdisco was measured: git HEAD, whether dnsdisco/ differs from it, and a hash of
    the package's .py files (the tree changes under a benchmark when others are at work)."""
    import hashlib

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = bool(git("diff", "--name-only", "HEAD", "--", "dnsdisco")
                 or git("ls-files", "--others", "--exclude-standard", "--", "dnsdisco"))
    h = hashlib.sha256()
    for path in sorted((REPO / "dnsdisco").rglob("*.py")):
        h.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    changes = " + uncommitted dnsdisco/ changes" if dirty else ""
    return f"{head}{changes} (dnsdisco/*.py sha256 {h.hexdigest()[:12]})"


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BenchError(f"{name} is not installed (Debian: apt-get install {name})")
    return path


def free_port() -> int:
    """A port free on loopback for both TCP and UDP right now (DNS needs both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind((LOOPBACK, 0))
            port = t.getsockname()[1]
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                    u.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    raise BenchError("no free loopback port found")


def sigterm_as_exit() -> None:
    """Turn SIGTERM into SystemExit so ``finally`` blocks run and children get cleaned up."""
    def handler(signum, frame):  # noqa: ARG001
        raise SystemExit(143)
    signal.signal(signal.SIGTERM, handler)


class Proc:
    """A child process in its own process group, with stdout+stderr going to a log file."""

    def __init__(self, name: str, cmd: Sequence[str], log_path: Path, *, cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.started = time.monotonic()
        self.popen = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, cwd=cwd, env=env,
                                      start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def rss_kib(self) -> int:
        """VmRSS of the process (not its children), in KiB, from /proc/PID/status."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise BenchError(f"{self.name}: no VmRSS in /proc/{self.pid}/status")

    def cpu_seconds(self) -> float:
        """user+system CPU time of the process so far (from /proc/PID/stat)."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    def stop(self, timeout: float = 10.0) -> None:
        """TERM the whole process group, then KILL it if it has not exited within *timeout*.
        Sets ``stop_seconds`` (TERM to exit) and ``killed`` (it needed KILL)."""
        self.killed = False
        t0 = time.monotonic()
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.killed = True
                print(f"warning: {self.name} (pid {self.pid}) still running {timeout:.0f} s after "
                      f"SIGTERM; killing it", file=sys.stderr, flush=True)
        self.stop_seconds = time.monotonic() - t0
        # The leader may be gone while others in its group live on; KILL the group regardless.
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


class Processes:
    """Every process a benchmark starts; ``stop_all`` is called from ``finally``."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def start(self, name: str, cmd: Sequence[str], log_path: Path, **kw) -> Proc:
        p = Proc(name, cmd, log_path, **kw)
        self.procs.append(p)
        return p

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        while self.procs:
            self.procs.pop().stop()


# --- the dnsdisco agent ------------------------------------------------------------------

_STARTED = re.compile(r"agent started:.*http=(\S+?):(\d+|off)\s+dns=(\S+?):(\d+|off)")

# The agent uses uvloop whenever it can import it and has no switch to turn that off. This
# wrapper makes `import uvloop` fail inside the agent process only, so the plain asyncio loop
# can be measured too without touching the agent.
_NO_UVLOOP = ("import sys; sys.modules['uvloop'] = None; "
              "from dnsdisco.cli import main; sys.exit(main(sys.argv[1:]))")


@dataclass
class Agent:
    proc: Proc
    http_port: int | None
    dns_port: int | None
    ready_after: float  # seconds from process start to the "agent started" log line

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"


# The same, with asyncio's debug mode logging every callback that holds the loop longer than
# the given seconds (its default threshold, 100 ms, is far above what matters to DNS).
_SLOW_CALLBACKS = ("import sys, asyncio.base_events as b; sys.modules['uvloop'] = None; "
                   "b.BaseEventLoop.slow_callback_duration = {seconds!r}; "
                   "from dnsdisco.cli import main; sys.exit(main(sys.argv[1:]))")
SLOW_CALLBACK = re.compile(r"Executing .* took (\d+\.\d+) seconds")


def agent_command(args: Sequence[str], *, cpu: int | str | None = None, uvloop: bool = True,
                  slow_callback: float | None = None) -> list[str]:
    """The agent's command line; *cpu* (a CPU number or a taskset list such as ``"0-1"``) pins it.
    With *slow_callback* (seconds) the agent runs asyncio in debug mode (see ``start_agent``),
    logging each callback that took longer (find them with ``SLOW_CALLBACK``)."""
    cmd = [sys.executable]
    if slow_callback is not None:
        cmd += ["-c", _SLOW_CALLBACKS.format(seconds=slow_callback)]
    else:
        cmd += ["-m", "dnsdisco"] if uvloop else ["-c", _NO_UVLOOP]
    cmd += ["agent", *args]
    if cpu is not None:
        cmd = [need_tool("taskset"), "-c", str(cpu), *cmd]
    return cmd


def start_agent(procs: Processes, name: str, args: Sequence[str], log_path: Path, *,
                cpu: int | str | None = None, uvloop: bool = True, timeout: float = 60.0,
                slow_callback: float | None = None) -> Agent:
    """Start ``python -m dnsdisco agent ARGS`` and wait for its "agent started" log line."""
    env = dict(os.environ)
    if slow_callback is not None:
        env["PYTHONASYNCIODEBUG"] = "1"
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    proc = procs.start(name, agent_command(args, cpu=cpu, uvloop=uvloop, slow_callback=slow_callback),
                       log_path, cwd=REPO, env=env)
    deadline = proc.started + timeout
    while True:
        m = _STARTED.search(proc.log_text())
        if m:
            http = None if m.group(2) == "off" else int(m.group(2))
            dns = None if m.group(4) == "off" else int(m.group(4))
            return Agent(proc, http, dns, time.monotonic() - proc.started)
        if not proc.alive():
            raise BenchError(f"{name} exited with {proc.popen.returncode} before it was ready:\n"
                             f"{proc.log_tail()}")
        if time.monotonic() > deadline:
            raise BenchError(f"{name} did not log 'agent started' within {timeout:.0f}s:\n"
                             f"{proc.log_tail()}")
        time.sleep(0.02)


# --- dnsperf -----------------------------------------------------------------------------

@dataclass
class PerfResult:
    qps: float
    avg_latency_s: float
    sent: int
    completed: int
    lost: int
    rcodes: str
    output: str


def dnsperf(port: int, query_file: Path, *, seconds: int = 10, clients: int = 4,
            outstanding: int = 200, max_qps: float | None = None, cpu: int | None = 0,
            edns: bool = True, query_timeout: float | None = None) -> PerfResult:
    """Run dnsperf and parse its summary. *query_timeout* is dnsperf's ``-t``: a query
    unanswered for that long is counted lost and frees its slot (overload runs use it so that a
    closed-loop dnsperf keeps offering more than the server answers)."""
    cmd = [need_tool("dnsperf"), "-s", LOOPBACK, "-p", str(port), "-d", str(query_file),
           "-l", str(seconds), "-c", str(clients), "-q", str(outstanding)]
    if edns:
        cmd.append("-e")
    if query_timeout is not None:
        cmd += ["-t", str(query_timeout)]
    if max_qps is not None:
        cmd += ["-Q", str(int(max_qps))]
    if cpu is not None:
        cmd = [need_tool("taskset"), "-c", str(cpu), *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    text = out.stdout + out.stderr
    if out.returncode != 0:
        raise BenchError(f"dnsperf failed ({out.returncode}): {' '.join(cmd)}\n{text}")

    def grab(pattern: str) -> str:
        m = re.search(pattern, text)
        if not m:
            raise BenchError(f"cannot parse dnsperf output ({pattern!r}):\n{text}")
        return m.group(1)

    return PerfResult(
        qps=float(grab(r"Queries per second:\s+([\d.]+)")),
        avg_latency_s=float(grab(r"Average Latency \(s\):\s+([\d.]+)")),
        sent=int(grab(r"Queries sent:\s+(\d+)")),
        completed=int(grab(r"Queries completed:\s+(\d+)")),
        lost=int(grab(r"Queries lost:\s+(\d+)")),
        rcodes=grab(r"Response codes:\s+(.*)"),
        output=text,
    )


# --- other load on this (shared) machine --------------------------------------------------

def _cpu_by_pid() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, user+system CPU seconds) for every process readable in /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
    return out


def _ours(snapshot: dict[int, tuple[int, float]], roots: set[int]) -> set[int]:
    """The given pids and all their descendants."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in snapshot.items():
        children.setdefault(ppid, []).append(pid)
    ours, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in ours:
            ours.add(pid)
            todo.extend(children.get(pid, ()))
    return ours


class ForeignLoad:
    """CPU used by processes this benchmark did not start, over a window (the machine is
    shared: another engineer's benchmark or test run on the same 2 cores skews every figure).
    Processes that start and end inside the window are missed, so this is a lower bound."""

    def __init__(self, procs: "Processes") -> None:
        self.procs = procs
        self._t0 = time.monotonic()
        self._before = _cpu_by_pid()

    def _roots(self) -> set[int]:
        return {os.getpid(), *(p.pid for p in self.procs.procs)}

    def cores(self) -> float:
        """Average number of cores the other processes kept busy since this object was made."""
        after = _cpu_by_pid()
        ours = _ours(after, self._roots()) | _ours(self._before, self._roots())
        used = 0.0
        for pid, (_, cpu) in after.items():
            if pid not in ours:
                used += cpu - self._before.get(pid, (0, 0.0))[1] if pid in self._before else cpu
        return max(0.0, used) / max(time.monotonic() - self._t0, 1e-6)


_quiet_budget = [float("inf")]


def set_quiet_budget(seconds: float) -> None:
    """Cap the total time all wait_for_quiet calls of this run may spend waiting."""
    _quiet_budget[0] = seconds


def wait_for_quiet(procs: "Processes", *, threshold: float = 0.15, max_wait: float = 30.0) -> float:
    """Wait (at most *max_wait* s, and within the run's budget) until other processes use less
    than *threshold* cores over a 1 s window; returns the last window's figure (above the
    threshold if we gave up)."""
    start = time.monotonic()
    deadline = start + max(0.0, min(max_wait, _quiet_budget[0]))
    try:
        while True:
            probe = ForeignLoad(procs)
            time.sleep(1.0)
            load = probe.cores()
            if load < threshold or time.monotonic() > deadline:
                return load
    finally:
        _quiet_budget[0] -= max(0.0, time.monotonic() - start - 1.0)


# --- statistics --------------------------------------------------------------------------

def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of *values*."""
    if not values:
        raise ValueError("no values")
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def add_common_args(ap: argparse.ArgumentParser, *, quiet_wait: float, keep: bool = True) -> None:
    """The flags every bench script shares: waiting for a quiet machine, JSON output, --keep."""
    ap.add_argument("--quiet-wait", type=float, default=quiet_wait,
                    help=f"before each run, wait up to this many seconds for other processes on the "
                         f"machine to go quiet (default {quiet_wait:g}; runs with other load are flagged)")
    ap.add_argument("--quiet-budget", type=float, default=120,
                    help="total seconds all those waits may take (default 120)")
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file")
    if keep:
        ap.add_argument("--keep", action="store_true", help="keep the work dir (data files, logs)")


def require_two_cpus() -> None:
    if os.cpu_count() and os.cpu_count() < 2:  # type: ignore[operator]
        raise BenchError("needs 2 CPUs: the server is pinned to CPU 1 and dnsperf to CPU 0")


def run_main(main: Callable[[], int]) -> None:
    """A benchmark script's entry point: exit with main()'s code; a BenchError is one line on
    stderr and exit 1, Ctrl-C exit 130 (the scripts clean up in their own ``finally``)."""
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"\nBENCHMARK FAILED: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
