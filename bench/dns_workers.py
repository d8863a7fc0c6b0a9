"""DNS worker processes: A-lookup throughput with 1 and 2 workers, and register -> DNS latency
through the workers.

For each worker count W (``-dns-workers W``; 1 is DNS in the agent process itself) the agent
runs ``-dev`` with 100 services of 4 instances from a config dir, unpinned (the workers need
both cores), and ``dnsperf`` (pinned to CPU 0) sends A lookups for 5 s, in interleaved rounds.
On a 2-core machine dnsperf itself takes most of a core, so 2 workers share the cores with it:
the figure says what a second worker buys when the load generator is on the same machine, not
what 2 workers do on 2 free cores. Server CPU per query (agent + workers) is reported too.

Freshness: a service is registered through the HTTP API and 8 UDP sockets (fixed source ports,
so that the kernel hashes them over the workers; with 2 workers all 8 land on one with
probability 1/128) poll its name until every one of them sees the new address. The time from
sending the registration to that moment is one sample: "visible in DNS through every worker".
With ``--burners N``, N busy-loop processes (unpinned) run during the freshness samples: a
repeatable stand-in for the other processes of a loaded machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _benchlib import (  # noqa: E402
    run_main,
    LOOPBACK,
    BenchError,
    ForeignLoad,
    Processes,
    _cpu_by_pid,
    _ours,
    add_common_args,
    code_version,
    dnsperf,
    free_port,
    median,
    need_tool,
    percentile,
    require_two_cpus,
    set_quiet_budget,
    sigterm_as_exit,
    start_agent,
    wait_for_quiet,
)

SERVICES = 100
INSTANCES = 4
POLLERS = 8


def write_data(work: Path) -> tuple[Path, Path]:
    conf = work / "conf"
    conf.mkdir()
    services = [{"id": f"svc{i}-{j}", "name": f"svc{i}", "address": f"10.{i // 250}.{i % 250}.{j + 1}",
                 "port": 80} for i in range(SERVICES) for j in range(INSTANCES)]
    (conf / "services.json").write_text(json.dumps({"services": services}))
    queries = work / "queries.txt"
    queries.write_text("".join(f"svc{i}.service.consul A\n" for i in range(SERVICES)))
    return conf, queries


def tree_cpu(root: int) -> float:
    snap = _cpu_by_pid()
    return sum(snap[p][1] for p in _ours(snap, {root}) if p in snap)


def a_query(qid: int, name: str) -> bytes:
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    wire = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    return header + wire + struct.pack("!HH", 1, 1)


def answers_with(reply: bytes, ip: bytes) -> bool:
    return len(reply) > 12 and reply[3] & 0xF == 0 and ip in reply[12:]


def freshness(http_port: int, dns_port: int, samples: int, first: int = 0) -> list[float]:
    """Seconds from sending a registration to every poller seeing it in DNS."""
    socks = []
    for _ in range(POLLERS):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((LOOPBACK, 0))
        s.connect((LOOPBACK, dns_port))
        s.settimeout(1.0)
        socks.append(s)
    conn = http.client.HTTPConnection(LOOPBACK, http_port, timeout=5)
    out = []
    try:
        for i in range(first, first + samples):
            name = f"fresh{i}"
            addr = f"10.200.{i // 250}.{i % 250 + 1}"
            ip = socket.inet_aton(addr)
            body = json.dumps({"Name": name, "ID": name, "Address": addr, "Port": 80})
            t0 = time.perf_counter()
            conn.request("PUT", "/v1/agent/service/register", body=body)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                raise BenchError(f"register {name}: HTTP {resp.status}")
            pending = list(socks)
            qid = 0
            while pending:
                still = []
                for s in pending:
                    qid = (qid + 1) & 0xFFFF
                    s.send(a_query(qid, f"{name}.service.consul"))
                    while True:  # skip late replies to earlier polls
                        reply = s.recv(4096)
                        if reply[:2] == struct.pack("!H", qid):
                            break
                    if not answers_with(reply, ip):
                        still.append(s)
                pending = still
                if time.perf_counter() - t0 > 5:
                    raise BenchError(f"{name} not visible through every worker within 5 s")
            out.append(time.perf_counter() - t0)
            time.sleep(0.005)
    finally:
        conn.close()
        for s in socks:
            s.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", default="1,2", help="worker counts to compare (default 1,2)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5, help="dnsperf run length")
    ap.add_argument("--samples", type=int, default=200, help="freshness samples per worker count")
    ap.add_argument("--burners", type=int, default=0,
                    help="busy-loop processes running during the freshness samples (default 0)")
    add_common_args(ap, quiet_wait=10)
    args = ap.parse_args()
    sigterm_as_exit()
    require_two_cpus()
    need_tool("dnsperf")
    set_quiet_budget(args.quiet_budget)
    counts = [int(w) for w in args.workers.split(",")]
    procs = Processes()
    results: dict[str, object] = {"code": code_version(), "runs": {}}
    print(f"code: {results['code']}")
    with tempfile.TemporaryDirectory(prefix="dnsdisco-workers-") as tmp:
        work = Path(tmp)
        conf, queries = write_data(work)
        try:
            agents = {}
            for w in counts:
                a = start_agent(procs, f"dnsdisco-w{w}", [
                    "-dev", "-dns-workers", str(w), "-config-dir", str(conf), "-node", "bench",
                    "-http-port", str(free_port()), "-dns-port", str(free_port())], work / f"w{w}.log")
                agents[w] = a
                print(f"W={w}: agent started in {a.ready_after:.2f}s "
                      f"(python -m dnsdisco agent -dev -dns-workers {w} -config-dir DIR ...)")
            runs: dict[int, list[dict[str, float]]] = {w: [] for w in counts}
            for r in range(args.rounds):
                for w in counts:
                    a = agents[w]
                    wait_for_quiet(procs, max_wait=args.quiet_wait)
                    other = ForeignLoad(procs)
                    cpu0 = tree_cpu(a.proc.pid)
                    perf = dnsperf(a.dns_port, queries, seconds=args.seconds, cpu=0)
                    cpu = tree_cpu(a.proc.pid) - cpu0
                    row = {"qps": perf.qps, "lost": perf.lost, "cpu_us_per_q": cpu / max(perf.completed, 1) * 1e6,
                           "server_cores": cpu / args.seconds, "other_cores": other.cores()}
                    runs[w].append(row)
                    print(f"round {r + 1} W={w}: {perf.qps:,.0f} qps, lost {perf.lost}, "
                          f"{row['cpu_us_per_q']:.1f} µs CPU/q, server {row['server_cores']:.2f} cores, "
                          f"other {row['other_cores']:.2f} cores, rcodes {perf.rcodes}")
            fresh = {}
            lats: dict[int, list[float]] = {w: [] for w in counts}
            for w in counts:  # warm-up, not recorded (first blocking reads, first renders)
                freshness(agents[w].http_port, agents[w].dns_port, 20, first=10_000)
            # Interleaved halves, so that both counts see the same (noisy) machine.
            for half in range(2):
                for w in counts:
                    wait_for_quiet(procs, max_wait=args.quiet_wait)
                    burners = [procs.start(f"burner{i}", [sys.executable, "-c", "while True: pass"],
                                           work / f"burner{i}.log") for i in range(args.burners)]
                    try:
                        lats[w] += freshness(agents[w].http_port, agents[w].dns_port, args.samples // 2,
                                             first=half * args.samples)
                    finally:
                        for b in burners:
                            procs.stop(b)
            for w in counts:
                lat = lats[w]
                fresh[w] = {"p50_ms": percentile(lat, 50) * 1e3, "p99_ms": percentile(lat, 99) * 1e3,
                            "max_ms": max(lat) * 1e3, "samples": len(lat)}
                print(f"W={w}{f' with {args.burners} busy loops' if args.burners else ''}: "
                      f"register -> visible in every worker: p50 {fresh[w]['p50_ms']:.2f} ms, "
                      f"p99 {fresh[w]['p99_ms']:.2f} ms, max {fresh[w]['max_ms']:.2f} ms ({len(lat)} samples)")
            print("\n| workers | median qps | vs 1 worker | CPU µs/q | server cores | register -> DNS p50 | p99 |")
            print("|---|---|---|---|---|---|---|")
            base = median([x["qps"] for x in runs[counts[0]]])
            for w in counts:
                q = median([x["qps"] for x in runs[w]])
                print(f"| {w} | {q:,.0f} | {q / base:.2f} | {median([x['cpu_us_per_q'] for x in runs[w]]):.1f} | "
                      f"{median([x['server_cores'] for x in runs[w]]):.2f} | {fresh[w]['p50_ms']:.2f} ms | "
                      f"{fresh[w]['p99_ms']:.2f} ms |")
            results["runs"] = {str(w): runs[w] for w in counts}
            results["freshness"] = {str(w): fresh[w] for w in counts}
            results["burners"] = args.burners
        finally:
            procs.stop_all()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    run_main(main)
