#!/usr/bin/env python3
"""The DNS fast path alone: DnsServer + the real AnswerTable, no agent, no HTTP, no catalog store.

The server (a child process of this script, pinned to CPU 1) holds 1,000 services
``svcK.service.consul`` x 4 instances, each with its own address, fed to the AnswerTable as one
full CatalogDelta; dnsperf (pinned to CPU 0) asks for them as A and as SRV (4 SRV + 4 glue A).
Each event loop (asyncio, uvloop) gets a fresh server; the figure is the median qps over
``--rounds`` runs. This measures what dns/wire.py, dns/server.py and dns/table.py cost per
query; bench/dns_vs_dnsmasq.py measures the whole agent against dnsmasq.

    python bench/dns_fastpath.py                      # 10 s runs, 3 rounds, both loops
    python bench/dns_fastpath.py --seconds 3 --rounds 1 --loops uvloop
    python bench/dns_fastpath.py --edns               # dnsperf -e (EDNS0, as resolvers send)
    python bench/dns_fastpath.py --profile out.prof   # cProfile the server (one run, slower)
    python bench/dns_fastpath.py --table fixed        # the transport's ceiling (see below)
    python bench/dns_fastpath.py --udp protocol       # the DatagramProtocol fallback, for comparison

``--table fixed`` swaps the AnswerTable for a dict of fixed replies (only the ID and question
patched in): what the transport alone costs, so the gap to the default run is the table's.

Without ``--edns`` a Consul-compatible server answers at most ``udp_answer_limit`` (3) records
over plain UDP, so A replies carry 3 of the 4 addresses and SRV replies 3 of 4 targets.
Needs ``dnsperf`` and ``taskset`` and two CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SERVER_CPU = 1
CLIENT_CPU = 0
NAMES = 1000
INSTANCES = 4


# --- the server side (runs in the child) ----------------------------------------------------


def build_table():  # type: ignore[no-untyped-def]
    from dnsdisco.catalog.model import CatalogDelta, Node, Service, ServiceEntry
    from dnsdisco.config import Config
    from dnsdisco.dns.table import AnswerTable

    table = AnswerTable(Config(datacenter="dc1"))
    nodes = {f"node{i}": Node(f"node{i}", f"192.168.0.{i + 1}", "dc1") for i in range(INSTANCES)}
    services = {}
    for k in range(NAMES):
        services[f"svc{k}"] = tuple(
            ServiceEntry(
                nodes[f"node{i}"],
                Service(
                    f"node{i}",
                    f"svc{k}-{i}",
                    f"svc{k}",
                    address=f"10.{i + 1}.{k >> 8 & 255}.{k & 255}",
                    port=8000 + i,
                ),
            )
            for i in range(INSTANCES)
        )
    table.apply(CatalogDelta("dc1", 1, services, nodes, full=True))
    assert table.synced
    return table


class FixedTable:
    """Replies rendered once from the real table's first answer per name; ID and question patched."""

    def __init__(self, table) -> None:  # type: ignore[no-untyped-def]
        from dnsdisco.dns.wire import parse

        self.replies: dict[tuple[str, int], tuple[bytes, bytes]] = {}
        for kind, qtype in (("A", 1), ("SRV", 33)):
            for k in range(NAMES):
                name = f"svc{k}.service.consul."
                q = parse(_question(name, qtype), tcp=False, client=("127.0.0.1", 0))
                reply = table.respond(q)
                self.replies[(name, qtype)] = (reply[2:4 + 8], reply[12 + len(q.question):])

    def respond(self, query):  # type: ignore[no-untyped-def]
        hit = self.replies.get((query.qname, query.qtype))
        if hit is None:
            return None
        head, body = hit
        return query.id.to_bytes(2, "big") + head + query.question + body


def _question(name: str, qtype: int) -> bytes:
    wire = b"".join(bytes([len(label)]) + label.encode() for label in name.rstrip(".").split("."))
    return b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + wire + b"\x00" + qtype.to_bytes(2, "big") + b"\x00\x01"


async def serve(port: int, table_kind: str, udp: str) -> None:
    from dnsdisco.config import Config
    from dnsdisco.dns.server import DnsServer

    table = build_table()
    if table_kind == "fixed":
        table = FixedTable(table)
    server = DnsServer(Config(client_addr="127.0.0.1", dns_port=port), table)
    server.udp_direct = udp == "direct"
    await server.start()
    print(f"ready {server.port} {type(asyncio.get_running_loop()).__module__}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await server.stop()
    stats = server.stats
    print(f"stats udp={stats.udp_requests} dropped={stats.udp_dropped_overload} errors={stats.errors}", flush=True)


def child_main(loop_name: str, port: int, profile: str | None, table_kind: str, udp: str) -> None:
    sys.path.insert(0, str(REPO))
    if loop_name == "uvloop":
        import uvloop

        uvloop.install()
    if profile:
        import cProfile

        cProfile.runctx("asyncio.run(serve(port, table_kind, udp))", globals(),
                        {"serve": serve, "port": port, "asyncio": asyncio, "table_kind": table_kind, "udp": udp},
                        filename=profile)
    else:
        asyncio.run(serve(port, table_kind, udp))


# --- the driver -----------------------------------------------------------------------------


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        sys.exit(f"{tool} is not installed")
    return path


def start_server(loop_name: str, profile: str | None, table_kind: str, udp: str) -> tuple[subprocess.Popen[str], int]:
    cmd = [need("taskset"), "-c", str(SERVER_CPU), sys.executable, __file__, "--child", loop_name, "--port", "0",
           "--table", table_kind, "--udp", udp]
    if profile:
        cmd += ["--profile", profile]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.match(r"ready (\d+)", line)
    if not m:
        stop_server(proc)
        sys.exit(f"server did not start: {line!r}")
    return proc, int(m.group(1))


def stop_server(proc: subprocess.Popen[str]) -> str:
    """TERM the child's process group (it is ours: started with start_new_session)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    return out or ""


def check_answers(port: int, edns: bool) -> None:
    """One A and one SRV question through dnspython before measuring: right rcode and counts."""
    import dns.message
    import dns.query

    want = INSTANCES if edns else 3
    for rdtype, glue in (("A", 0), ("SRV", want)):
        q = dns.message.make_query("svc7.service.consul.", rdtype, use_edns=0 if edns else None)
        r = dns.query.udp(q, "127.0.0.1", port=port, timeout=2)
        n = sum(len(rrset) for rrset in r.answer)
        extra = sum(len(rrset) for rrset in r.additional)
        if r.rcode() != 0 or n != want or extra != glue:
            sys.exit(f"wrong answer for svc7 {rdtype}: rcode {r.rcode()}, {n} answers, {extra} additional\n{r}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process *pid* so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dnsperf(port: int, path: Path, seconds: int, edns: bool) -> tuple[float, int, int, str]:
    cmd = [need("taskset"), "-c", str(CLIENT_CPU), need("dnsperf"), "-s", "127.0.0.1", "-p", str(port),
           "-d", str(path), "-l", str(seconds), "-c", "4", "-q", "200"]
    if edns:
        cmd.append("-e")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    text = out.stdout + out.stderr
    qps = re.search(r"Queries per second:\s+([\d.]+)", text)
    lost = re.search(r"Queries lost:\s+(\d+)", text)
    done = re.search(r"Queries completed:\s+(\d+)", text)
    if out.returncode != 0 or not qps or not lost or not done:
        sys.exit(f"dnsperf failed: {' '.join(cmd)}\n{text}")
    return float(qps.group(1)), int(lost.group(1)), int(done.group(1)), " ".join(cmd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--loops", default="asyncio,uvloop")
    ap.add_argument("--kinds", default="A,SRV")
    ap.add_argument("--edns", action="store_true", help="dnsperf -e")
    ap.add_argument("--profile", metavar="FILE", help="cProfile the server into FILE (first loop only, one run)")
    ap.add_argument("--table", choices=("answer", "fixed"), default="answer",
                    help="answer: the real AnswerTable (default); fixed: pre-rendered replies (transport ceiling)")
    ap.add_argument("--udp", choices=("direct", "protocol"), default="direct",
                    help="direct: DnsServer's socket reader (default); protocol: its DatagramProtocol fallback")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args.child, args.port, args.profile, args.table, args.udp)
        return
    if (os.cpu_count() or 1) < 2:
        sys.exit("needs two CPUs (server on CPU 1, dnsperf on CPU 0)")

    loops = args.loops.split(",")
    kinds = args.kinds.split(",")
    if args.profile:
        loops, args.rounds = loops[:1], 1
    results: dict[str, dict[str, list[float]]] = {lp: {k: [] for k in kinds} for lp in loops}
    # Server CPU per answered query: steadier than qps on a shared machine, where the load
    # generator's share of its core varies from run to run.
    cpu_us: dict[str, dict[str, list[float]]] = {lp: {k: [] for k in kinds} for lp in loops}
    commands = set()
    with tempfile.TemporaryDirectory(prefix="dns_fastpath.") as tmp:
        files = {}
        for kind in kinds:
            files[kind] = Path(tmp) / f"{kind}.txt"
            files[kind].write_text("".join(f"svc{k}.service.consul {kind}\n" for k in range(NAMES)))
        for rnd in range(args.rounds):
            for loop_name in loops:
                proc, port = start_server(loop_name, args.profile, args.table, args.udp)
                try:
                    if args.table == "answer":
                        check_answers(port, args.edns)
                    for kind in kinds:
                        cpu0 = cpu_seconds(proc.pid)
                        qps, lost, done, cmd = dnsperf(port, files[kind], args.seconds, args.edns)
                        per_query = (cpu_seconds(proc.pid) - cpu0) / max(done, 1) * 1e6
                        commands.add(re.sub(r"-p \d+", "-p PORT", cmd.replace(str(files[kind]), f"{kind}.txt")))
                        results[loop_name][kind].append(qps)
                        cpu_us[loop_name][kind].append(per_query)
                        print(f"round {rnd + 1} {loop_name:8s} {kind:4s} {qps:10,.0f} qps  lost {lost}  "
                              f"server CPU {per_query:5.1f} us/query", flush=True)
                        time.sleep(0.5)
                finally:
                    tail = stop_server(proc)
                    for line in tail.splitlines():
                        if line.startswith("stats"):
                            print(f"  server {line}")

    print()
    print(f"median of {args.rounds} x {args.seconds} s, {NAMES} names x {INSTANCES} records, {args.table} table, {args.udp} UDP, "
          f"server on CPU {SERVER_CPU}, dnsperf on CPU {CLIENT_CPU}{', EDNS' if args.edns else ''}:")
    # "capacity" = 1e6 / (server CPU us per query): the rate the server would sustain with its
    # core to itself. When it is well above the measured qps, the load generator (or another
    # tenant of the machine) was the bottleneck, not the server.
    print(f"{'loop':8s} " + " ".join(f"{k + ' qps':>10s} {k + ' us/q':>9s} {k + ' capacity':>12s}" for k in kinds))
    for loop_name in loops:
        cells = []
        for k in kinds:
            us = statistics.median(cpu_us[loop_name][k])
            cells.append(f"{statistics.median(results[loop_name][k]):10,.0f} {us:9.1f} {1e6 / us:12,.0f}")
        print(f"{loop_name:8s} " + " ".join(cells))
    for cmd in sorted(commands):
        print(f"  {cmd}")
    if args.profile:
        print(f"profile written to {args.profile} (python -m pstats {args.profile})")
    if args.json:
        Path(args.json).write_text(json.dumps({"edns": args.edns, "seconds": args.seconds, "table": args.table,
                                               "qps": results, "cpu_us_per_query": cpu_us}, indent=2))


if __name__ == "__main__":
    main()
