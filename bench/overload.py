#!/usr/bin/env python3
"""Overload: what the agent does at well past its capacity, and while it holds many TCP clients.

Three experiments against ``python -m dnsdisco agent -dev`` (pinned to CPU 1) serving the
services in ``config/services``:

1. **UDP flood.** A probe client (this process, pinned to CPU 0 with dnsperf) sends one query
   every 5 ms the whole time and waits up to 2 s for each reply. After a quiet baseline, dnsperf
   floods the agent for ``--seconds`` (default 10) with far more queries in flight than it can
   answer (``-c 8 -q 10000``); the probe keeps going for a few seconds after. Reported: dnsperf's
   answered qps and losses; the probe's answered share and latency (p50/p99) before, during and
   right after the flood (the age of the answers: a FIFO queue answers queries that have waited
   behind the whole backlog); drops by reason (``dnsdisco_dns_dropped_total`` from /metrics, and
   the kernel's own receive-buffer drops of the agent's UDP socket from /proc/net/udp); VmRSS
   before, at its peak and after; and the recovery time: from the end of the flood to the first
   probe after which every probe is answered within 3x the baseline p99 (at least 5 ms).
2. **1,000 idle TCP connections.** The probe's p50/p99 UDP latency while dnsperf asks at a
   steady half-capacity rate, without and then with 1,000 idle TCP connections open.
3. **Slow and idle TCP clients** against an agent with ``tcp_idle_timeout`` 2 s: an idle client,
   a slow-loris (one byte of a query per second), and a client that pipelines 20 MB of queries
   without reading a reply. Reported: when the agent cut each one, and its VmRSS growth.

    python bench/overload.py                   # about 1 minute
    python bench/overload.py --quick           # 3 s flood, shorter phases
    python bench/overload.py --seconds 10 --outstanding 20000
    python bench/overload.py --fifo            # also an agent patched never to shed, to compare

Needs ``dnsperf`` and ``taskset`` and two CPUs. Figures are in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _benchlib import (  # noqa: E402
    run_main,
    LOOPBACK,
    REPO,
    Agent,
    BenchError,
    ForeignLoad,
    PerfResult,
    Processes,
    add_common_args,
    code_version,
    dnsperf,
    free_port,
    need_tool,
    percentile,
    require_two_cpus,
    set_quiet_budget,
    sigterm_as_exit,
    start_agent,
    wait_for_quiet,
)

SERVER_CPU = 1
CLIENT_CPU = 0
PROBE_INTERVAL = 0.005
PROBE_TIMEOUT = 2.0
IDLE_CONNECTIONS = 1000


# --- the probe client -------------------------------------------------------------------------


def query_bytes(qid: int, name: str = "web.service.consul", qtype: int = 1) -> bytes:
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", qtype, 1)


@dataclass
class Probe:
    """One query every PROBE_INTERVAL from one UDP socket; ``sent[i]`` is (send time, latency
    or None when no reply came within PROBE_TIMEOUT)."""

    port: int
    sent: list[tuple[float, float | None]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.connect((LOOPBACK, self.port))
        pending: dict[int, int] = {}  # query id -> index in sent
        qid = 0
        next_send = time.monotonic()
        import select

        try:
            while not self.stop.is_set() or pending:
                now = time.monotonic()
                if not self.stop.is_set() and now >= next_send:
                    qid = (qid + 1) & 0xFFFF
                    try:
                        sock.send(query_bytes(qid))
                    except OSError:
                        pass
                    pending[qid] = len(self.sent)
                    self.sent.append((now, None))
                    next_send += PROBE_INTERVAL
                    if next_send < now:  # we fell behind (a busy CPU 0): do not burst
                        next_send = now + PROBE_INTERVAL
                r, _, _ = select.select([sock], [], [], max(0.0, min(next_send - time.monotonic(), 0.05)))
                if r:
                    while True:
                        try:
                            data = sock.recv(4096)
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError:
                            continue
                        t = time.monotonic()
                        i = pending.pop(struct.unpack("!H", data[:2])[0], None)
                        if i is not None:
                            sent_at = self.sent[i][0]
                            self.sent[i] = (sent_at, t - sent_at)
                now = time.monotonic()
                for k, i in list(pending.items()):
                    if now - self.sent[i][0] > PROBE_TIMEOUT:
                        del pending[k]
        finally:
            sock.close()

    def window(self, start: float, end: float) -> dict:
        got = [lat for t, lat in self.sent if start <= t < end]
        answered = sorted(lat for lat in got if lat is not None)
        out: dict = {"sent": len(got), "answered": len(answered)}
        if answered:
            out["p50_ms"] = round(percentile(answered, 50) * 1000, 2)
            out["p99_ms"] = round(percentile(answered, 99) * 1000, 2)
            out["max_ms"] = round(answered[-1] * 1000, 2)
        return out

    def recovery(self, end: float, bound: float) -> float | None:
        """Seconds from *end* to the first probe after which every probe was answered within
        *bound*; None if that never happened."""
        last_bad = end
        after = [(t, lat) for t, lat in self.sent if t >= end]
        if not after:
            return None
        for t, lat in after:
            if lat is None or lat > bound:
                last_bad = t + PROBE_INTERVAL
        if last_bad >= after[-1][0]:
            return None
        return last_bad - end


# --- what the agent reports -------------------------------------------------------------------


def scrape_dropped(http_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{LOOPBACK}:{http_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for m in re.finditer(r'^dnsdisco_dns_dropped_total\{reason="([^"]+)"\} (\S+)$', text, re.M):
        out[m.group(1)] = float(m.group(2))
    return out


def kernel_udp_drops(port: int) -> int:
    """The drops column of the UDP socket bound to 127.0.0.1:*port* (receive buffer full)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/udp") as f:
        for line in f.readlines()[1:]:
            cols = line.split()
            if cols[1] == want:
                return int(cols[12])
    raise BenchError(f"no UDP socket on 127.0.0.1:{port} in /proc/net/udp")


class RssWatch:
    """Samples the agent's VmRSS every 100 ms in a thread; ``peak`` in KiB."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.peak = agent.proc.rss_kib()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            try:
                self.peak = max(self.peak, self.agent.proc.rss_kib())
            except (OSError, BenchError):
                return

    def close(self) -> int:
        self.stop.set()
        self.thread.join()
        return self.peak


# --- the experiments --------------------------------------------------------------------------


def write_config(work: Path, name: str, dns_config: dict) -> Path:
    d = work / name
    d.mkdir()
    for src in sorted((REPO / "config" / "services").glob("*.json")):
        shutil.copy(src, d / src.name)
    (d / "00-dns.json").write_text(json.dumps({"dns_config": dns_config}))
    return d


# For the comparison run: the agent as it would be without shed mode (the UDP reader never
# leaves the socket's FIFO order), through a sitecustomize module on the agent's PYTHONPATH.
_FIFO_PATCH = """
import dnsdisco.dns.server as server
server._UdpReader._shed = lambda self: None
"""


def agent_up(procs: Processes, work: Path, name: str, dns_config: dict, *, fifo: bool = False) -> Agent:
    conf = write_config(work, name, dns_config)
    args = ["-dev", "-config-dir", str(conf), "-dns-port", str(free_port()), "-http-port", str(free_port())]
    saved = os.environ.get("PYTHONPATH")
    if fifo:
        patch = work / f"{name}-site"
        patch.mkdir()
        (patch / "sitecustomize.py").write_text(_FIFO_PATCH)
        os.environ["PYTHONPATH"] = str(patch) + (os.pathsep + saved if saved else "")
    try:
        agent = start_agent(procs, name, args, work / f"{name}.log", cpu=SERVER_CPU)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    # Warm up and check that it answers.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(query_bytes(7), (LOOPBACK, agent.dns_port))
        reply = s.recv(4096)
        if reply[:2] != b"\x00\x07" or reply[3] & 0xF != 0 or struct.unpack("!H", reply[6:8])[0] < 1:
            raise BenchError(f"{name}: bad answer to web.service.consul A: {reply!r}")
    return agent


def query_file(work: Path) -> Path:
    path = work / "queries.txt"
    path.write_text("web.service.consul A\napi.service.consul A\ndb.service.consul SRV\n" * 100)
    return path


def flood(agent: Agent, queries: Path, args: argparse.Namespace) -> dict:
    port = agent.dns_port
    assert port is not None and agent.http_port is not None
    probe = Probe(port)
    t_probe = threading.Thread(target=probe.run)
    rss0 = agent.proc.rss_kib()
    dropped0 = scrape_dropped(agent.http_port)
    kdrops0 = kernel_udp_drops(port)
    cpu0 = agent.proc.cpu_seconds()
    load = ForeignLoad(agent_procs(agent))
    t_probe.start()
    time.sleep(args.baseline)
    watch = RssWatch(agent)
    perf_box: dict = {}

    def run_perf() -> None:
        try:
            perf_box["r"] = flood_perf(port, queries, args)
        except BaseException as exc:  # noqa: BLE001 - reported in the main thread
            perf_box["e"] = exc

    t_start = time.monotonic()
    t_perf = threading.Thread(target=run_perf)
    t_perf.start()
    t_perf.join()
    t_end = t_start + args.seconds  # dnsperf stops sending here (then waits for stragglers)
    done = time.monotonic()
    time.sleep(max(0.0, t_end + args.after - done))
    probe.stop.set()
    t_probe.join()
    peak = watch.close()
    if "e" in perf_box:
        raise perf_box["e"]
    perf = perf_box["r"]
    dropped1 = scrape_dropped(agent.http_port)
    base = probe.window(t_start - args.baseline, t_start)
    bound = max(0.005, 3 * base.get("p99_ms", 1) / 1000)
    return {
        "dnsperf": f"-c {args.clients} -q {args.outstanding} -t {args.timeout} -l {args.seconds}",
        "answered_qps": round(perf.qps),
        "sent": perf.sent,
        "completed": perf.completed,
        "lost": perf.lost,
        "dnsperf_avg_latency_ms": round(perf.avg_latency_s * 1000, 2),
        "server_cpu_s": round(agent.proc.cpu_seconds() - cpu0, 2),
        "probe_baseline": base,
        "probe_during": probe.window(t_start + 0.5, t_end),
        "probe_first_second_after": probe.window(t_end, t_end + 1.0),
        "recovery_s": _round(probe.recovery(t_end, bound)),
        "recovery_bound_ms": round(bound * 1000, 2),
        "dropped": {k: int(dropped1.get(k, 0) - dropped0.get(k, 0)) for k in dropped1
                    if dropped1.get(k, 0) - dropped0.get(k, 0)},
        "kernel_receive_drops": kernel_udp_drops(port) - kdrops0,
        "rss_kib": {"before": rss0, "peak": peak, "after": agent.proc.rss_kib()},
        "other_cores": round(load.cores(), 2),
    }


def flood_perf(port: int, queries: Path, args: argparse.Namespace) -> PerfResult:
    """The flood: dnsperf as _benchlib runs it, without EDNS, with ``-t`` (see there)."""
    return dnsperf(port, queries, seconds=args.seconds, clients=args.clients, outstanding=args.outstanding,
                   cpu=CLIENT_CPU, edns=False, query_timeout=args.timeout)


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def agent_procs(agent: Agent) -> Processes:
    p = Processes()
    p.procs.append(agent.proc)
    return p


def steady(agent: Agent, queries: Path, rate: float, seconds: int) -> dict:
    port = agent.dns_port
    assert port is not None
    probe = Probe(port)
    t = threading.Thread(target=probe.run)
    t.start()
    t0 = time.monotonic()
    perf = dnsperf(port, queries, seconds=seconds, clients=4, outstanding=200, max_qps=rate, cpu=CLIENT_CPU,
                   edns=False)
    t1 = time.monotonic()
    probe.stop.set()
    t.join()
    return {"dnsperf_qps": round(perf.qps), "dnsperf_avg_latency_ms": round(perf.avg_latency_s * 1000, 3),
            "lost": perf.lost, "probe": probe.window(t0 + 0.5, t1 - 0.5)}


def idle_tcp(agent: Agent, queries: Path, rate: float, seconds: int) -> dict:
    port = agent.dns_port
    assert port is not None
    out = {"rate": rate, "without": steady(agent, queries, rate, seconds)}
    rss0 = agent.proc.rss_kib()
    conns = []
    try:
        for _ in range(IDLE_CONNECTIONS):
            conns.append(socket.create_connection((LOOPBACK, port), timeout=5))
        time.sleep(0.5)
        out["rss_kib_for_connections"] = agent.proc.rss_kib() - rss0
        out["with_1000_idle"] = steady(agent, queries, rate, seconds)
        # Still open (the agent's idle timeout is longer than the run)?
        closed = 0
        for c in conns:
            c.setblocking(False)
            try:
                if c.recv(1) == b"":
                    closed += 1
            except BlockingIOError:
                pass
        out["idle_closed_by_server"] = closed
    finally:
        for c in conns:
            c.close()
    return out


def tcp_clients(agent: Agent, timeout: float) -> dict:
    """An idle client, a slow-loris and a pipelining non-reader; when each is cut, and RSS."""
    port = agent.dns_port
    assert port is not None
    rss0 = agent.proc.rss_kib()
    t0 = time.monotonic()
    idle = socket.create_connection((LOOPBACK, port))
    loris = socket.create_connection((LOOPBACK, port))
    hog = socket.create_connection((LOOPBACK, port))
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    hog.setblocking(False)
    q = query_bytes(1)
    frame = struct.pack("!H", len(q)) + q
    stream = frame * (20_000_000 // len(frame))
    cut: dict[str, float | None] = {"idle": None, "slow_loris": None, "pipelining_non_reader": None}
    hog_sent = 0
    loris_sent = 0
    deadline = t0 + timeout * 3 + 5
    peak = rss0
    next_byte = t0
    while time.monotonic() < deadline and any(v is None for v in cut.values()):
        now = time.monotonic()
        if cut["slow_loris"] is None and now >= next_byte:
            try:
                loris.send(frame[loris_sent % len(frame):loris_sent % len(frame) + 1])
                loris_sent += 1
            except OSError:
                cut["slow_loris"] = now - t0
            next_byte += 1.0
        if cut["pipelining_non_reader"] is None and hog_sent < len(stream):
            try:
                hog_sent += hog.send(stream[hog_sent:hog_sent + (1 << 20)])
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                cut["pipelining_non_reader"] = now - t0
        for name, s in (("idle", idle), ("slow_loris", loris)):
            if cut[name] is None:
                s.setblocking(False)
                try:
                    if s.recv(4096) == b"":
                        cut[name] = now - t0
                except BlockingIOError:
                    pass
                except OSError:
                    cut[name] = now - t0
        if cut["pipelining_non_reader"] is None:
            try:
                # Peek only: the hog never reads its replies, but EOF/RST shows it was cut.
                if hog.recv(1, socket.MSG_PEEK) == b"":
                    cut["pipelining_non_reader"] = now - t0
            except BlockingIOError:
                pass
            except OSError:
                cut["pipelining_non_reader"] = now - t0
        peak = max(peak, agent.proc.rss_kib())
        time.sleep(0.02)
    for s in (idle, loris, hog):
        s.close()
    return {"tcp_idle_timeout_s": timeout, "cut_after_s": {k: _round(v) for k, v in cut.items()},
            "slow_loris_bytes_sent": loris_sent, "pipelined_bytes_accepted": hog_sent,
            "rss_kib": {"before": rss0, "peak": peak, "after": agent.proc.rss_kib()}}


# --- main -------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=10, help="length of the flood (default 10)")
    ap.add_argument("--clients", type=int, default=8, help="dnsperf -c (default 8)")
    ap.add_argument("--outstanding", type=int, default=10000, help="dnsperf -q (default 10000)")
    ap.add_argument("--timeout", type=float, default=1.0, help="dnsperf -t for the flood (default 1 s)")
    ap.add_argument("--baseline", type=float, default=2.0, help="probe-only seconds before the flood")
    ap.add_argument("--after", type=float, default=3.0, help="probe-only seconds after the flood")
    ap.add_argument("--rate", type=float, default=0, help="steady dnsperf rate for the idle-TCP runs "
                                                           "(default: half the flood's answered qps)")
    ap.add_argument("--fifo", action="store_true",
                    help="also flood an agent patched to never shed (the kernel's FIFO order), to compare")
    ap.add_argument("--skip", action="append", default=[], choices=["flood", "idle", "clients"])
    ap.add_argument("--quick", action="store_true", help="3 s flood and 3 s steady runs")
    add_common_args(ap, quiet_wait=20)
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds = min(args.seconds, 3)
    sigterm_as_exit()
    set_quiet_budget(args.quiet_budget)
    procs = Processes()
    work = Path(tempfile.mkdtemp(prefix="dnsdisco-overload-"))
    results: dict = {"version": code_version(), "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    print(f"dnsdisco {results['version']}", flush=True)
    try:
        require_two_cpus()
        need_tool("dnsperf")
        os.sched_setaffinity(0, {CLIENT_CPU})
        queries = query_file(work)
        agent = agent_up(procs, work, "agent", {"tcp_idle_timeout": "120s", "tcp_max_connections": 2000})
        rate = args.rate
        if "flood" not in args.skip:
            wait_for_quiet(procs, max_wait=args.quiet_wait)
            results["flood"] = r = flood(agent, queries, args)
            print(json.dumps({"flood": r}, indent=1), flush=True)
            rate = rate or r["answered_qps"] / 2
            if args.fifo:
                fifo = agent_up(procs, work, "agent-fifo", {}, fifo=True)
                wait_for_quiet(procs, max_wait=args.quiet_wait)
                results["flood_fifo"] = r = flood(fifo, queries, args)
                print(json.dumps({"flood_fifo (no shed mode)": r}, indent=1), flush=True)
                procs.stop(fifo.proc)
        if "idle" not in args.skip:
            wait_for_quiet(procs, max_wait=args.quiet_wait)
            results["idle_tcp"] = r = idle_tcp(agent, queries, rate or 20000, 3 if args.quick else 5)
            print(json.dumps({"idle_tcp": r}, indent=1), flush=True)
        procs.stop_all()
        if "clients" not in args.skip:
            agent2 = agent_up(procs, work, "agent-tcp", {"tcp_idle_timeout": "2s"})
            results["tcp_clients"] = r = tcp_clients(agent2, 2.0)
            print(json.dumps({"tcp_clients": r}, indent=1), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    except BenchError as exc:
        print(f"BENCHMARK FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
        if not getattr(args, "keep", False):
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work dir kept: {work}")
    return 0


if __name__ == "__main__":
    run_main(main)
