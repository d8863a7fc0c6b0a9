#!/usr/bin/env python3
"""dnsdisco's DNS fast path against dnsmasq, the native reference, on the same data.

Both servers get the same catalog: N names ``svcK.service.consul`` with 4 instances each
(distinct 10.x addresses, distinct ports). dnsdisco reads them as Consul service definitions from
a config dir; dnsmasq reads the A records from an ``--addn-hosts`` file and the SRV records from
``srv-host=`` lines, with the SRV targets (``<hex>.addr.dc1.consul``, the names Consul uses for a
service with an explicit address) in the hosts file so that it adds the same glue.

Method (shared/design/anchors.md §2.3-2.4): the server is pinned to CPU 1 and dnsperf to CPU 0,
``dnsperf -l 10 -c 4 -q 200 -e``, servers interleaved (dnsmasq, dnsdisco, dnsmasq, ...) and the
median of 3 rounds taken; the figure that matters is the ratio dnsdisco/dnsmasq, because the
machine is shared and noisy. Then one run per dnsdisco loop at half of its median qps
(``-Q``) for the average latency of an unsaturated server.

dnsperf runs with ``-e`` (EDNS0, as every modern stub and resolver sends): without EDNS a
Consul-compatible server cuts answers to ``udp_answer_limit`` (3), which would not be the same
answer as dnsmasq's. Before measuring, dig checks that both servers give 4 answers (and 4 glue
records for SRV) with the same addresses for sample names; any difference stops the run.

The agent uses uvloop when it is importable and has no switch for it, so the default run
measures uvloop; the "asyncio" variant starts the same agent with ``uvloop`` hidden from its
imports (see _benchlib._NO_UVLOOP).

    python bench/dns_vs_dnsmasq.py             # full run, about 6 minutes
    python bench/dns_vs_dnsmasq.py --quick     # 3 s runs, 1 round: a smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchlib import (run_main, LOOPBACK, Agent, add_common_args, require_two_cpus, BenchError, ForeignLoad, Processes, Proc,  # noqa: E402
                       code_version, dnsperf, free_port, median, need_tool, sigterm_as_exit,
                       set_quiet_budget, start_agent, verdict, wait_for_quiet)

SERVER_CPU = 1
CLIENT_CPU = 0
DATACENTER = "dc1"
TARGETS = {"A": 0.7, "SRV": 1.0}  # dnsdisco qps / dnsmasq qps
LATENCY_TARGET_S = 0.001          # average latency at half of dnsdisco's max qps
NOISY = 0.15                      # cores used by other processes during a run: flag it


# --- data ---------------------------------------------------------------------------------

def instance_address(name_index: int, instance: int) -> str:
    # 10.<instance+1>.<hi>.<lo>: distinct for every (name, instance) up to 65,536 names.
    return f"10.{instance + 1}.{name_index >> 8 & 255}.{name_index & 255}"


def addr_target(address: str) -> str:
    """The SRV target Consul uses for a service with an explicit IPv4 address."""
    hexed = "".join(f"{int(octet):02x}" for octet in address.split("."))
    return f"{hexed}.addr.{DATACENTER}.consul"


@dataclass
class Data:
    config_dir: Path
    hosts_file: Path
    dnsmasq_conf: Path
    queries: dict[str, Path]
    names: list[str]


def write_data(workdir: Path, n_names: int, instances: int) -> Data:
    """The same catalog in dnsdisco's and dnsmasq's formats, plus one dnsperf query file per type."""
    config_dir = workdir / "config"
    config_dir.mkdir()
    services, hosts, srv_lines, names = [], [], [], []
    for k in range(n_names):
        name = f"svc{k}"
        names.append(f"{name}.service.consul")
        for i in range(instances):
            address = instance_address(k, i)
            port = 8000 + i
            services.append({"id": f"{name}-{i}", "name": name, "address": address, "port": port})
            hosts.append(f"{address} {name}.service.consul")
            hosts.append(f"{address} {addr_target(address)}")
            # srv-host=NAME,TARGET,PORT,PRIORITY,WEIGHT (Consul: priority 1, weight 1)
            srv_lines.append(f"srv-host={name}.service.consul,{addr_target(address)},{port},1,1")
    (config_dir / "services.json").write_text(json.dumps({"services": services}))
    hosts_file = workdir / "hosts"
    hosts_file.write_text("\n".join(hosts) + "\n")
    dnsmasq_conf = workdir / "dnsmasq.conf"
    dnsmasq_conf.write_text("\n".join(srv_lines) + "\n")
    queries = {}
    for qtype in ("A", "SRV"):
        path = workdir / f"queries-{qtype}.txt"
        path.write_text("".join(f"{n} {qtype}\n" for n in names))
        queries[qtype] = path
    os.chmod(workdir, 0o755)  # dnsmasq drops root for "nobody" and must still read its files
    return Data(config_dir, hosts_file, dnsmasq_conf, queries, names)


# --- servers ------------------------------------------------------------------------------

@dataclass
class Server:
    """One server under test; dnsmasq is two processes, one per query type (see start_dnsmasq)."""
    label: str
    ports: dict[str, int]   # qtype -> DNS port
    procs: dict[str, Proc]  # qtype -> the process answering it


def _dnsmasq(procs: Processes, name: str, conf: Path, data: Data, workdir: Path) -> tuple[int, Proc]:
    port = free_port()
    cmd = [need_tool("taskset"), "-c", str(SERVER_CPU), need_tool("dnsmasq"), "--no-daemon",
           f"--conf-file={conf}", f"--port={port}", f"--listen-address={LOOPBACK}",
           "--bind-interfaces", "--no-resolv", "--no-hosts", f"--addn-hosts={data.hosts_file}",
           "--cache-size=10000", "--pid-file=", "--log-facility=-"]
    proc = procs.start(name, cmd, workdir / f"{name}.log")
    deadline = time.monotonic() + 20
    while "read " not in proc.log_text():  # "read FILE - N names": the hosts file is loaded
        if not proc.alive() or time.monotonic() > deadline:
            raise BenchError(f"{name} did not start:\n{proc.log_tail()}")
        time.sleep(0.05)
    return port, proc


def start_dnsmasq(procs: Processes, data: Data, workdir: Path) -> Server:
    """dnsmasq at its best for each type: every query, A included, walks the srv-host list
    (measured: 4,000 srv-host lines cut its A rate about 3x), so A is measured on an instance
    with the hosts file only and SRV on one with the srv-host lines as well."""
    empty = workdir / "empty.conf"
    empty.write_text("")
    a_port, a_proc = _dnsmasq(procs, "dnsmasq-A", empty, data, workdir)
    srv_port, srv_proc = _dnsmasq(procs, "dnsmasq-SRV", data.dnsmasq_conf, data, workdir)
    return Server("dnsmasq", {"A": a_port, "SRV": srv_port}, {"A": a_proc, "SRV": srv_proc})


def start_dnsdisco(procs: Processes, data: Data, workdir: Path, *, uvloop: bool) -> Server:
    label = "dnsdisco-uvloop" if uvloop else "dnsdisco-asyncio"
    agent: Agent = start_agent(
        procs, label,
        ["-dev", "-config-dir", str(data.config_dir), "-node", "bench", "-http-port", str(free_port()),
         "-dns-port", str(free_port())],
        workdir / f"{label}.log", cpu=SERVER_CPU, uvloop=uvloop)
    assert agent.dns_port is not None
    print(f"  {label}: ready {agent.ready_after:.2f}s after start, pid {agent.proc.pid}", flush=True)
    return Server(label, {"A": agent.dns_port, "SRV": agent.dns_port},
                  {"A": agent.proc, "SRV": agent.proc})


# --- verification -------------------------------------------------------------------------

def dig_records(port: int, name: str, qtype: str) -> tuple[str, list[str], list[str]]:
    """(status, answer RRs, additional A RRs) as dig prints them, TTL and owner case dropped."""
    out = subprocess.run(
        [need_tool("dig"), f"@{LOOPBACK}", "-p", str(port), name, qtype, "+tries=1", "+time=2",
         "+noall", "+comments", "+answer", "+additional"],
        capture_output=True, text=True, timeout=10).stdout
    status, answer, additional, section = "NO REPLY", [], [], None
    for line in out.splitlines():
        if "status:" in line:
            status = line.split("status:")[1].split(",")[0].strip()
        elif line.startswith(";; ANSWER SECTION"):
            section = answer
        elif line.startswith(";; ADDITIONAL SECTION"):
            section = additional
        elif line and not line.startswith(";") and section is not None:
            f = line.split()
            if section is additional and f[3] != "A":
                continue
            section.append(" ".join([f[0].lower(), *f[3:]]))
    return status, sorted(answer), sorted(additional)


def verify(servers: list[Server], data: Data, instances: int) -> None:
    """Every server answers sample names with `instances` records (and glue), all alike."""
    sample = [data.names[0], data.names[len(data.names) // 2], data.names[-1]]
    sample += random.Random(7).sample(data.names, min(5, len(data.names)))
    for name in sample:
        for qtype in ("A", "SRV"):
            seen = {}
            for s in servers:
                status, answer, glue = dig_records(s.ports[qtype], name, qtype)
                want_glue = instances if qtype == "SRV" else 0
                if status != "NOERROR" or len(answer) != instances or len(glue) != want_glue:
                    raise BenchError(
                        f"{s.label} answered {name} {qtype} with {status}, {len(answer)} answers, "
                        f"{len(glue)} glue A (want NOERROR, {instances}, {want_glue}):\n"
                        + "\n".join(answer + glue) + f"\n--- log tail ---\n{s.procs[qtype].log_tail()}")
                seen[s.label] = (answer, glue)
            first_label, first = next(iter(seen.items()))
            for label, got in seen.items():
                if got != first:
                    raise BenchError(f"{label} and {first_label} differ for {name} {qtype}:\n"
                                     f"{got}\nvs\n{first}")
    print(f"  verified: {len(sample)} names x A/SRV, {instances} answers (+{instances} glue for SRV), "
          f"identical on {', '.join(s.label for s in servers)}", flush=True)


# --- measurement --------------------------------------------------------------------------

@dataclass
class Run:
    server: str
    qtype: str
    round: int
    qps: float
    avg_latency_ms: float
    lost: int
    cpu_us_per_query: float
    foreign_cores: float
    max_qps: float | None = None


@dataclass
class Report:
    date: str
    command: str
    code: str
    names: int
    instances: int
    seconds: int
    rounds: int
    runs: list[Run] = field(default_factory=list)


def measure(procs: Processes, server: Server, query_file: Path, qtype: str, rnd: int,
            seconds: int, quiet_wait: float, max_qps: float | None = None) -> Run:
    proc = server.procs[qtype]
    wait_for_quiet(procs, threshold=NOISY, max_wait=quiet_wait)
    foreign = ForeignLoad(procs)
    cpu0 = proc.cpu_seconds()
    r = dnsperf(server.ports[qtype], query_file, seconds=seconds, clients=4, outstanding=200,
                max_qps=max_qps, cpu=CLIENT_CPU)
    cpu = proc.cpu_seconds() - cpu0
    other = foreign.cores()
    if not proc.alive():
        raise BenchError(f"{server.label} died during dnsperf:\n{proc.log_tail()}")
    if r.completed == 0 or not (r.rcodes.startswith("NOERROR") and "(100.00%)" in r.rcodes):
        raise BenchError(f"{server.label} {qtype}: unexpected response codes: {r.rcodes}\n{r.output}")
    run = Run(server.label, qtype, rnd, r.qps, r.avg_latency_s * 1000, r.lost,
              cpu / max(r.completed, 1) * 1e6, round(other, 2), max_qps)
    tag = f"-Q {int(max_qps)}" if max_qps else f"round {rnd}"
    noisy = f"  NOISY: other processes used {other:.2f} cores" if other > NOISY else ""
    print(f"  {qtype:3} {tag:10} {server.label:17} {r.qps:>10,.0f} qps  avg {run.avg_latency_ms:7.3f} ms"
          f"  lost {r.lost:>5}  {run.cpu_us_per_query:6.1f} CPU us/q{noisy}", flush=True)
    return run


def summarize(report: Report, labels: list[str]) -> str:
    lines = []
    full = [r for r in report.runs if r.max_qps is None]
    lines.append(f"Median of {report.rounds} x {report.seconds}s dnsperf runs "
                 f"({report.names} names x {report.instances} instances):")
    lines.append(f"{'type':4} {'server':17} {'qps':>10} {'ratio':>6} {'paired':>6} {'target':>7} "
                 f"{'avg ms':>8} {'CPU us/q':>9} {'CPU ratio':>9} {'noisy':>5} verdict")
    for qtype in ("A", "SRV"):
        runs = {lab: [r for r in full if r.server == lab and r.qtype == qtype] for lab in labels}
        med = {lab: median([r.qps for r in runs[lab]]) for lab in labels}
        lat = {lab: median([r.avg_latency_ms for r in runs[lab]]) for lab in labels}
        cpu = {lab: median([r.cpu_us_per_query for r in runs[lab]]) for lab in labels}
        for lab in labels:
            # ratio: of the medians. paired: median of the per-round ratios (runs of one round
            # are adjacent in time, so they share most of the machine's noise).
            ratio = med[lab] / med["dnsmasq"]
            paired = median([a.qps / b.qps for a, b in zip(runs[lab], runs["dnsmasq"])])
            target = "" if lab == "dnsmasq" else f">={TARGETS[qtype]:.1f}x"
            v = "" if lab == "dnsmasq" else verdict(ratio >= TARGETS[qtype])
            # dnsmasq's CPU per query over ours: the qps ratio two unloaded cores would give,
            # and far steadier than qps when other processes share the machine.
            cpu_ratio = cpu["dnsmasq"] / cpu[lab]
            noisy = sum(r.foreign_cores > NOISY for r in runs[lab])
            lines.append(f"{qtype:4} {lab:17} {med[lab]:>10,.0f} {ratio:>6.2f} {paired:>6.2f} "
                         f"{target:>7} {lat[lab]:>8.3f} {cpu[lab]:>9.1f} {cpu_ratio:>9.2f} "
                         f"{noisy:>2}/{len(runs[lab])} {v}")
    half = [r for r in report.runs if r.max_qps is not None]
    if half:
        lines.append("Average latency at half of dnsdisco's median max qps (target < 1 ms); dnsmasq "
                     "at the same rate as a control for dnsperf's own pacing latency:")
        for r in half:
            v = "" if r.server == "dnsmasq" else verdict(r.avg_latency_ms < LATENCY_TARGET_S * 1000)
            lines.append(f"{r.qtype:4} {r.server:17} -Q {int(r.max_qps):>7}: {r.qps:>9,.0f} qps  "
                         f"avg {r.avg_latency_ms:.3f} ms  lost {r.lost}  {v}"
                         f"{' (noisy)' if r.foreign_cores > NOISY else ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 s runs, 1 round (a smoke test)")
    ap.add_argument("--names", type=int, default=1000, help="service names (default 1000)")
    ap.add_argument("--instances", type=int, default=4, help="instances per name (default 4)")
    ap.add_argument("--seconds", type=int, default=10, help="dnsperf -l (default 10)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--no-asyncio", action="store_true",
                    help="measure only the agent's default loop (uvloop when installed)")
    ap.add_argument("--dnsmasq-only", action="store_true",
                    help="measure only dnsmasq (checks the reference half and the machine)")
    add_common_args(ap, quiet_wait=10.0)
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.rounds = 3, 1
    require_two_cpus()

    sigterm_as_exit()
    set_quiet_budget(args.quiet_budget)
    procs = Processes()
    workdir = Path(tempfile.mkdtemp(prefix="dnsbench-"))
    report = Report(datetime.datetime.now().isoformat(timespec="seconds"),
                    " ".join([Path(sys.executable).name, *sys.argv]), code_version(),
                    args.names, args.instances, args.seconds, args.rounds)
    try:
        data = write_data(workdir, args.names, args.instances)
        print(f"dnsdisco: {report.code}", flush=True)
        print(f"data: {args.names} names x {args.instances} instances in {workdir}", flush=True)
        servers = [start_dnsmasq(procs, data, workdir)]
        if not args.dnsmasq_only:
            servers.append(start_dnsdisco(procs, data, workdir, uvloop=True))
        if not args.no_asyncio and not args.dnsmasq_only:
            servers.append(start_dnsdisco(procs, data, workdir, uvloop=False))
        verify(servers, data, args.instances)
        for qtype in ("A", "SRV"):
            for rnd in range(1, args.rounds + 1):
                for s in servers:  # interleaved: dnsmasq, dnsdisco(s), dnsmasq, ...
                    report.runs.append(measure(procs, s, data.queries[qtype], qtype, rnd,
                                               args.seconds, args.quiet_wait))
        for qtype in ("A", "SRV"):
            for s in servers[1:]:
                best = median([r.qps for r in report.runs
                               if r.server == s.label and r.qtype == qtype and r.max_qps is None])
                report.runs.append(measure(procs, s, data.queries[qtype], qtype, 0, args.seconds,
                                           args.quiet_wait, max_qps=best / 2))
                # The same rate against dnsmasq (where it can take it): dnsperf's pacing adds
                # latency of its own, and this shows how much.
                dnsmasq_best = median([r.qps for r in report.runs if r.server == "dnsmasq"
                                       and r.qtype == qtype and r.max_qps is None])
                if best / 2 < dnsmasq_best * 0.8:
                    report.runs.append(measure(procs, servers[0], data.queries[qtype], qtype, 0,
                                               args.seconds, args.quiet_wait, max_qps=best / 2))
        print()
        print(summarize(report, [s.label for s in servers]))
        if args.json:
            args.json.write_text(json.dumps(asdict(report), indent=1))
        return 0
    finally:
        procs.stop_all()
        if args.keep:
            print(f"work dir kept: {workdir}")
        else:
            subprocess.run(["rm", "-rf", str(workdir)], check=False)


if __name__ == "__main__":
    run_main(main)
