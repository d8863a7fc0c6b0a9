#!/usr/bin/env python3
"""Forwarded names (outside our domains): dnsdisco's recursor cache against a dnsmasq forwarder.

An upstream authoritative server on loopback (dnsmasq with one ``--host-record`` per name,
``N`` names ``hostK.example.test``, ``--local-ttl=3600`` so that the answers can be cached) is
the recursor of both servers under test:

- ``taskset -c 1 python -m dnsdisco agent -dev -recursor 127.0.0.1:UP ...``;
- ``taskset -c 1 dnsmasq --server=127.0.0.1#UP --no-resolv --no-hosts --cache-size=10000 ...``.

Both are warmed (every name queried once, so the measurement is of the warm cache: the upstream
sees no traffic), then measured as in dns_vs_dnsmasq.py: ``taskset -c 0 dnsperf -e -l 10 -c 4
-q 200``, interleaved (dnsmasq, dnsdisco, dnsmasq, ...), the median of 3 rounds. The upstream is
pinned to CPU 0 with dnsperf; it only answers during the warm-up.

    python bench/forward_vs_dnsmasq.py            # 3 rounds of 10 s, about 2 minutes
    python bench/forward_vs_dnsmasq.py --quick    # 3 s runs, 1 round
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import socket
import struct
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchlib import (run_main, LOOPBACK, BenchError, Processes, Proc, add_common_args,  # noqa: E402
                       code_version, free_port, require_two_cpus, median, need_tool, set_quiet_budget, sigterm_as_exit, start_agent)
from dns_vs_dnsmasq import (CLIENT_CPU, NOISY, SERVER_CPU, Report, Server, dig_records,  # noqa: E402
                            measure)

DOMAIN = "example.test"
UPSTREAM_TTL = 3600


def host_address(k: int) -> str:
    return f"10.77.{k >> 8 & 255}.{k & 255}"


def _wait_dnsmasq(proc: Proc, port: int, probe: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        if not proc.alive() or time.monotonic() > deadline:
            raise BenchError(f"{proc.name} did not start:\n{proc.log_tail()}")
        if "started" in proc.log_text() and dig_records(port, probe, "A")[0] == "NOERROR":
            return
        time.sleep(0.1)


def start_upstream(procs: Processes, workdir: Path, names: list[str]) -> tuple[int, Proc]:
    conf = workdir / "upstream.conf"
    conf.write_text("".join(f"host-record={n},{host_address(k)}\n" for k, n in enumerate(names)))
    port = free_port()
    cmd = [need_tool("taskset"), "-c", str(CLIENT_CPU), need_tool("dnsmasq"), "--no-daemon",
           f"--conf-file={conf}", f"--port={port}", f"--listen-address={LOOPBACK}",
           "--bind-interfaces", "--no-resolv", "--no-hosts", f"--local-ttl={UPSTREAM_TTL}",
           "--pid-file=", "--log-facility=-"]
    proc = procs.start("upstream", cmd, workdir / "upstream.log")
    _wait_dnsmasq(proc, port, names[0])
    return port, proc


def start_forwarder(procs: Processes, workdir: Path, upstream: int, probe: str) -> Server:
    port = free_port()
    cmd = [need_tool("taskset"), "-c", str(SERVER_CPU), need_tool("dnsmasq"), "--no-daemon",
           "--conf-file=/dev/null", f"--port={port}", f"--listen-address={LOOPBACK}",
           "--bind-interfaces", "--no-resolv", "--no-hosts", f"--server={LOOPBACK}#{upstream}",
           "--cache-size=10000", "--pid-file=", "--log-facility=-"]
    proc = procs.start("dnsmasq", cmd, workdir / "dnsmasq.log")
    _wait_dnsmasq(proc, port, probe)
    return Server("dnsmasq", {"A": port}, {"A": proc})


def start_dnsdisco(procs: Processes, workdir: Path, upstream: int) -> Server:
    agent = start_agent(procs, "dnsdisco",
                        ["-dev", "-node", "bench", "-http-port", str(free_port()),
                         "-dns-port", str(free_port()), "-recursor", f"{LOOPBACK}:{upstream}"],
                        workdir / "dnsdisco.log", cpu=SERVER_CPU)
    assert agent.dns_port is not None
    print(f"  dnsdisco: ready {agent.ready_after:.2f}s after start, pid {agent.proc.pid}", flush=True)
    return Server("dnsdisco", {"A": agent.dns_port}, {"A": agent.proc})


def warm(port: int, names: list[str], window: int = 100) -> int:
    """Query every name once (up to *window* in flight); returns how many got an answer."""
    answered: set[int] = set()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2.0)
        for attempt in range(3):
            todo = [i for i in range(len(names)) if i not in answered]
            for start in range(0, len(todo), window):
                batch = todo[start:start + window]
                for i in batch:
                    q = struct.pack("!HHHHHH", i, 0x0100, 1, 0, 0, 0)
                    q += b"".join(bytes([len(p)]) + p.encode() for p in names[i].split(".")) + b"\0"
                    s.sendto(q + struct.pack("!HH", 1, 1), (LOOPBACK, port))
                pending = set(batch)
                try:
                    while pending:
                        data = s.recv(4096)
                        uid = struct.unpack_from("!H", data)[0]
                        if uid in pending and data[3] & 0xF == 0 and struct.unpack_from("!H", data, 6)[0]:
                            answered.add(uid)
                        pending.discard(uid)
                except socket.timeout:
                    pass
            if len(answered) == len(names):
                break
    return len(answered)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 s runs, 1 round (a smoke test)")
    ap.add_argument("--names", type=int, default=1000, help="forwarded names (default 1000)")
    ap.add_argument("--seconds", type=int, default=10, help="dnsperf -l (default 10)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    add_common_args(ap, quiet_wait=10.0, keep=False)
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.rounds = 3, 1
    require_two_cpus()
    sigterm_as_exit()
    set_quiet_budget(args.quiet_budget)
    procs = Processes()
    workdir = Path(tempfile.mkdtemp(prefix="fwdbench-"))
    os.chmod(workdir, 0o755)  # dnsmasq drops root for "nobody" and must still read its files
    report = Report(datetime.datetime.now().isoformat(timespec="seconds"),
                    " ".join([Path(sys.executable).name, *sys.argv]), code_version(),
                    args.names, 1, args.seconds, args.rounds)
    try:
        names = [f"host{k}.{DOMAIN}" for k in range(args.names)]
        queries = workdir / "queries-A.txt"
        queries.write_text("".join(f"{n} A\n" for n in names))
        print(f"dnsdisco: {report.code}", flush=True)
        upstream, _ = start_upstream(procs, workdir, names)
        servers = [start_forwarder(procs, workdir, upstream, names[0]),
                   start_dnsdisco(procs, workdir, upstream)]
        for s in servers:
            got = warm(s.ports["A"], names)
            if got != len(names):
                raise BenchError(f"{s.label}: only {got}/{len(names)} names answered while warming")
        for name in random.Random(7).sample(names, min(8, len(names))):
            seen = {s.label: dig_records(s.ports["A"], name, "A")[:2] for s in servers}
            want = ("NOERROR", [f"{name}. A {host_address(names.index(name))}"])
            for label, got in seen.items():
                if got != want:
                    raise BenchError(f"{label} answered {name}: {got}, want {want}")
        print(f"  warmed and verified: {len(names)} names on {', '.join(s.label for s in servers)}",
              flush=True)
        for rnd in range(1, args.rounds + 1):
            for s in servers:
                report.runs.append(measure(procs, s, queries, "A", rnd, args.seconds, args.quiet_wait))
        runs = {s.label: [r for r in report.runs if r.server == s.label] for s in servers}
        med = {k: median([r.qps for r in v]) for k, v in runs.items()}
        cpu = {k: median([r.cpu_us_per_query for r in v]) for k, v in runs.items()}
        paired = median([a.qps / b.qps for a, b in zip(runs["dnsdisco"], runs["dnsmasq"])])
        print(f"\nMedian of {args.rounds} x {args.seconds}s dnsperf runs, {args.names} forwarded "
              f"names, warm cache:")
        for label in ("dnsmasq", "dnsdisco"):
            noisy = sum(r.foreign_cores > NOISY for r in runs[label])
            print(f"  {label:9} {med[label]:>10,.0f} qps  {cpu[label]:6.1f} CPU us/q  "
                  f"noisy {noisy}/{len(runs[label])}")
        print(f"  ratio dnsdisco/dnsmasq: {med['dnsdisco'] / med['dnsmasq']:.2f} (paired {paired:.2f}), "
              f"CPU ratio {cpu['dnsmasq'] / cpu['dnsdisco']:.2f}")
        if args.json:
            args.json.write_text(json.dumps(asdict(report), indent=1))
        return 0
    finally:
        procs.stop_all()
        import shutil
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    run_main(main)
