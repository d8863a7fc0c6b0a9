#!/usr/bin/env python3
"""dnsdisco's catalog at scale: 10,000 services x 10 instances through the HTTP API.

Scenarios, each a function below, run against agents this script starts (pinned to CPU 1; this
script pins itself to CPU 0):

  load       bulk-register SERVICES x INSTANCES with PUT /v1/catalog/register (instance i of a
             service on a distinct node), AIOHTTP_CONCURRENCY requests in flight: instances/s
  writes     one client, sequential writes, p50/p99 latency, for PUT /v1/catalog/register and
             PUT /v1/agent/service/register (target p99 < 5 ms)
  watch      a blocking GET /v1/health/service/NAME?index=N sees a write: write-ack -> watcher
             wake-up p50/p99 (target p99 < 50 ms)
  rss        agent VmRSS / VmHWM from /proc/PID/status after the load (target < 600 MB)
  dns        registration -> visible in DNS (tight UDP loop), p50/p99 (target < 10 ms)
  big        one service with 5,000 instances: TCP A and SRV queries (answer trimmed to 64 KB),
             p50/p99 after a warm-up (target < 5 ms)
  cold       all SERVICES x INSTANCES in config-dir JSON files: time from process start until a
             DNS query for the last service is answered in full (target < 10 s)
  restart    durable mode only: stop the agent, start it on the same -data-dir, time until the
             last service is answered in full

The -dev agent runs every scenario; the -data-dir (durable) agent runs load, writes, watch, rss,
dns and restart. DNS is queried with EDNS0 (payload 4096) so that a name answers with all its
instances (without EDNS a Consul-compatible server cuts UDP answers to 3).

    python bench/catalog_scale.py            # full run: 100,000 instances, about 5-10 minutes
    python bench/catalog_scale.py --quick    # 1,000 x 10, fewer trials: a smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import dns.flags
import dns.message
import dns.query
import dns.rdatatype

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchlib import (run_main, LOOPBACK, Agent, add_common_args, BenchError, ForeignLoad, Processes,  # noqa: E402
                       code_version, free_port, percentile, set_quiet_budget, sigterm_as_exit,
                       start_agent, verdict, wait_for_quiet)

AGENT_CPU = 1
CLIENT_CPU = 0
NODE = "bench"  # the agent's own node name
TARGETS = {
    "write_p99_ms": 5.0,
    "watch_p99_ms": 50.0,
    "rss_mb": 600.0,
    "dns_p99_ms": 10.0,
    "cold_s": 10.0,
    "big_tcp_p99_ms": 5.0,
}


# --- the data -----------------------------------------------------------------------------

def svc_name(s: int) -> str:
    return f"svc{s}"


def instance_address(s: int, i: int) -> str:
    # 10.<i+1>.<hi>.<lo>, distinct for up to 250 instances x 65,536 services
    return f"10.{i + 1}.{s >> 8 & 255}.{s & 255}"


def node_of(s: int, i: int, nodes: int) -> int:
    return (s * 10 + i) % nodes  # the instances of a service sit on distinct nodes


def node_address(n: int) -> str:
    return f"172.16.{n >> 8 & 255}.{n & 255}"


def catalog_body(s: int, i: int, nodes: int) -> dict:
    n = node_of(s, i, nodes)
    return {"Node": f"node{n}", "Address": node_address(n),
            "Service": {"ID": f"{svc_name(s)}-{i}", "Service": svc_name(s),
                        "Address": instance_address(s, i), "Port": 8000 + i}}


# --- small clients ------------------------------------------------------------------------

class Http:
    def __init__(self, agent: Agent, limit: int = 100) -> None:
        self.base = agent.base_url
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=limit),
            timeout=aiohttp.ClientTimeout(total=120))

    async def close(self) -> None:
        await self.session.close()

    async def put(self, path: str, body: dict) -> None:
        async with self.session.put(self.base + path, json=body) as r:
            text = await r.text()
            if r.status != 200:
                raise BenchError(f"PUT {path} {json.dumps(body)[:200]} -> {r.status}: {text[:300]}")

    async def get(self, path: str) -> tuple[int, list | dict]:
        async with self.session.get(self.base + path) as r:
            body = await r.json()
            if r.status != 200:
                raise BenchError(f"GET {path} -> {r.status}: {body}")
            return int(r.headers["X-Consul-Index"]), body


class UdpProbe:
    """A DNS A query for one name as fixed wire bytes over a connected UDP socket: as little
    client work per poll as possible, so a tight loop measures the server."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect((LOOPBACK, port))
        self.sock.settimeout(1.0)
        self.qid = random.randrange(65536)

    def close(self) -> None:
        self.sock.close()

    def ask(self, name: str, rdtype: str = "A") -> tuple[int, int] | None:
        """(rcode, answer count), or None if nothing came back (no listener yet, timeout)."""
        self.qid = (self.qid + 1) & 0xFFFF
        q = dns.message.make_query(name, rdtype, use_edns=0, payload=4096, id=self.qid)
        try:
            self.sock.send(q.to_wire())
            while True:
                data = self.sock.recv(65535)
                qid, flags, _, ancount = struct.unpack("!HHHH", data[:8])
                if qid == self.qid:
                    return flags & 0xF, ancount
        except (ConnectionRefusedError, TimeoutError, socket.timeout):
            return None


def poll_until_answered(port: int, name: str, want: int, deadline: float) -> float | None:
    """perf_counter() when NAME first answers NOERROR with >= want records; None at deadline."""
    probe = UdpProbe(port)
    try:
        while time.perf_counter() < deadline:
            r = probe.ask(name)
            if r is not None and r[0] == 0 and r[1] >= want:
                return time.perf_counter()
            if r is None:
                time.sleep(0.002)
        return None
    finally:
        probe.close()


def check_dns(port: int, name: str, want: int) -> None:
    r = dns.query.udp(dns.message.make_query(name, "A", use_edns=0, payload=4096),
                      LOOPBACK, port=port, timeout=2)
    got = sum(len(rrset) for rrset in r.answer if rrset.rdtype == dns.rdatatype.A)
    if r.rcode() != 0 or got != want:
        raise BenchError(f"DNS {name} A: rcode {r.rcode()}, {got} A records (want {want})")


def ms(values: list[float]) -> dict:
    return {"n": len(values), "p50_ms": round(percentile(values, 50) * 1000, 3),
            "p99_ms": round(percentile(values, 99) * 1000, 3),
            "max_ms": round(max(values) * 1000, 3)}


# --- scenarios ----------------------------------------------------------------------------

async def load(agent: Agent, services: int, instances: int, nodes: int, concurrency: int) -> dict:
    """Bulk-register services x instances with `concurrency` requests in flight."""
    http = Http(agent, limit=concurrency)
    todo = ((s, i) for s in range(services) for i in range(instances))
    cpu0, t0 = agent.proc.cpu_seconds(), time.perf_counter()

    async def worker() -> None:
        for s, i in todo:
            await http.put("/v1/catalog/register", catalog_body(s, i, nodes))

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await http.close()
    wall = time.perf_counter() - t0
    agent_cpu = agent.proc.cpu_seconds() - cpu0
    check_dns(agent.dns_port, f"{svc_name(0)}.service.consul", instances)
    check_dns(agent.dns_port, f"{svc_name(services - 1)}.service.consul", instances)
    return {"instances": services * instances, "seconds": round(wall, 2),
            "per_second": round(services * instances / wall), "agent_cpu_share": round(agent_cpu / wall, 2)}


async def sequential_writes(agent: Agent, n: int, nodes: int) -> dict:
    """One client, one write at a time: new instances of 200 new services (half through the
    catalog endpoint, half through the agent endpoint)."""
    http = Http(agent, limit=1)
    out = {}
    try:
        for endpoint in ("catalog", "agent"):
            lat = []
            for k in range(n):
                s, addr = k % 200, f"10.250.{k >> 8 & 255}.{k & 255}"
                if endpoint == "catalog":
                    path = "/v1/catalog/register"
                    body = {"Node": f"node{k % nodes}", "Address": node_address(k % nodes),
                            "Service": {"ID": f"seqc-{k}", "Service": f"seqc{s}", "Address": addr,
                                        "Port": 9000}}
                else:
                    path = "/v1/agent/service/register"
                    body = {"ID": f"seqa-{k}", "Name": f"seqa{s}", "Address": addr, "Port": 9000,
                            "Tags": ["bench"]}
                t0 = time.perf_counter()
                await http.put(path, body)
                lat.append(time.perf_counter() - t0)
            out[endpoint] = ms(lat)
    finally:
        await http.close()
    return out


async def watcher_wake(agent: Agent, trials: int) -> dict:
    """A blocking health query on one service, woken by a write to that service."""
    writer, watcher = Http(agent, limit=1), Http(agent, limit=1)
    path = "/v1/health/service/watchme"
    body = {"ID": "watchme-1", "Name": "watchme", "Address": "10.251.0.1", "Port": 1}
    ack_wake, send_wake, retries = [], [], 0

    async def blocking(index: int) -> tuple[float, int, list]:
        async with watcher.session.get(f"{watcher.base}{path}?index={index}&wait=30s") as r:
            t = time.perf_counter()  # the response head is here: the watcher is awake
            data = await r.json()
            return t, int(r.headers["X-Consul-Index"]), data

    try:
        await writer.put("/v1/agent/service/register", body)
        index, _ = await watcher.get(path)
        k = 0
        while len(ack_wake) < trials:
            k += 1
            task = asyncio.create_task(blocking(index))
            await asyncio.sleep(0.01)  # let the request reach the agent and park
            if task.done():  # woke without our write (another change): start over
                retries += 1
                _, index, _ = await task
                if retries > trials:
                    raise BenchError("blocking query keeps returning at once; it does not block")
                continue
            port = 10000 + k % 50000
            t0 = time.perf_counter()
            await writer.put("/v1/agent/service/register", {**body, "Port": port})
            t_ack = time.perf_counter()
            try:
                t_wake, new_index, data = await asyncio.wait_for(task, 5)
            except asyncio.TimeoutError:
                raise BenchError(f"watcher on index {index} not woken 5 s after a write to watchme")
            ports = [e["Service"]["Port"] for e in data]
            if new_index <= index or port not in ports:
                raise BenchError(f"watcher woke with index {new_index} (had {index}) and ports {ports}, "
                                 f"want a higher index and port {port}")
            ack_wake.append(t_wake - t_ack)
            send_wake.append(t_wake - t0)
            index = new_index
    finally:
        await writer.close()
        await watcher.close()
    return {"ack_to_wake": ms(ack_wake), "send_to_wake": ms(send_wake),
            "woken_before_ack": sum(1 for v in ack_wake if v < 0), "restarts": retries}


def rss(agent: Agent) -> dict:
    status = Path(f"/proc/{agent.proc.pid}/status").read_text()
    fields = {ln.split(":")[0]: int(ln.split()[1]) for ln in status.splitlines()
              if ln.startswith(("VmRSS", "VmHWM"))}
    return {"rss_mb": round(fields["VmRSS"] / 1024, 1), "hwm_mb": round(fields["VmHWM"] / 1024, 1)}


async def registration_to_dns(agent: Agent, trials: int) -> dict:
    """Register a new service, then poll DNS for it in a tight UDP loop."""
    http = Http(agent, limit=1)
    probe = UdpProbe(agent.dns_port)
    send_vis, ack_vis, early = [], [], 0
    try:
        for k in range(trials):
            name = f"dnsvis{k}"
            t0 = time.perf_counter()
            await http.put("/v1/agent/service/register",
                           {"ID": f"{name}-1", "Name": name, "Address": f"10.252.{k >> 8 & 255}.{k & 255}",
                            "Port": 80})
            t_ack = time.perf_counter()
            deadline, first = t_ack + 2.0, True
            while True:
                r = probe.ask(f"{name}.service.consul")
                if r is not None and r[0] == 0 and r[1] == 1:
                    t_vis = time.perf_counter()
                    early += first
                    break
                first = False
                if time.perf_counter() > deadline:
                    raise BenchError(f"{name}.service.consul not in DNS 2 s after its registration "
                                     f"was acknowledged (last reply: {r})")
            send_vis.append(t_vis - t0)
            ack_vis.append(t_vis - t_ack)
    finally:
        probe.close()
        await http.close()
    return {"send_to_visible": ms(send_vis), "ack_to_visible": ms(ack_vis),
            "visible_on_first_query": early}


async def big_service(agent: Agent, n: int, nodes: int, queries: int, warmup: int,
                      concurrency: int) -> dict:
    """One service with n instances: the registration rate, 20 more sequential writes to it
    (with DNS for another name polled meanwhile), then TCP queries for A and SRV: `warmup` queries (replies are rendered lazily, one order
    of the shuffle at a time) and then `queries` measured ones."""
    http = Http(agent, limit=concurrency)
    todo = iter(range(n))
    t0 = time.perf_counter()

    async def worker() -> None:
        for i in todo:
            nn = i % nodes
            await http.put("/v1/catalog/register", {
                "Node": f"node{nn}", "Address": node_address(nn),
                "Service": {"ID": f"big-{i}", "Service": "big",
                            "Address": f"10.253.{i >> 8 & 255}.{i & 255}", "Port": 7000}})

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await http.close()
    out: dict = {"instances": n, "register_seconds": round(time.perf_counter() - t0, 2),
                 "register_per_second": round(n / (time.perf_counter() - t0))}
    # What one more write to a service this size costs, and what DNS answers for another name
    # meanwhile (a thread polls it while the writes go on).
    http = Http(agent, limit=1)
    lat, dns_lat, stop = [], [], threading.Event()

    def poll() -> None:
        probe = UdpProbe(agent.dns_port)
        try:
            while not stop.is_set():
                t = time.perf_counter()
                if probe.ask("small.service.consul") is not None:
                    dns_lat.append(time.perf_counter() - t)
        finally:
            probe.close()

    poller = threading.Thread(target=poll, daemon=True)
    try:
        await http.put("/v1/agent/service/register",
                       {"ID": "small-1", "Name": "small", "Address": "10.254.0.1", "Port": 80})
        poller.start()
        for k in range(20):
            t = time.perf_counter()
            await http.put("/v1/catalog/register", {
                "Node": "node0", "Address": node_address(0),
                "Service": {"ID": "big-0", "Service": "big", "Address": "10.253.0.0", "Port": 7001 + k}})
            lat.append(time.perf_counter() - t)
    finally:
        stop.set()
        if poller.is_alive():
            poller.join(5)
        await http.close()
    out["write_into_big"] = ms(lat)
    out["dns_during_writes"] = ms(dns_lat)
    for rdtype in ("A", "SRV"):
        wire = dns.message.make_query("big.service.consul", rdtype).to_wire()
        lat = []
        for _ in range(warmup + queries):
            t = time.perf_counter()
            reply = tcp_query(agent.dns_port, wire)
            lat.append(time.perf_counter() - t)
        # Parsed outside the timing: dnspython takes milliseconds over a 64 KB message.
        r = dns.message.from_wire(reply)
        answers = sum(len(rrset) for rrset in r.answer)
        if r.rcode() != 0 or not answers:
            raise BenchError(f"TCP big.service.consul {rdtype}: rcode {r.rcode()}, no answers")
        out[rdtype] = {**ms(lat[warmup:]), "answers": answers,
                       "additional": sum(len(x) for x in r.additional), "bytes": len(reply),
                       "tc": bool(r.flags & dns.flags.TC),
                       # the queries right after the last write, while replies are rendered
                       "first_queries": ms(lat[:warmup])}
    return out


def tcp_query(port: int, wire: bytes) -> bytes:
    """One query on a new TCP connection (what a stub does after TC); the raw reply."""
    with socket.create_connection((LOOPBACK, port), timeout=5) as s:
        s.sendall(struct.pack("!H", len(wire)) + wire)
        buf = b""
        while len(buf) < 2 or len(buf) < 2 + struct.unpack("!H", buf[:2])[0]:
            chunk = s.recv(65537)
            if not chunk:
                raise BenchError("TCP DNS connection closed before the whole reply arrived")
            buf += chunk
    return buf[2:]


def fsync_reference(directory: Path, n: int = 300) -> dict:
    """The disk's own cost: append 256 bytes and fsync, n times, in the data dir's filesystem.
    A durable write cannot be faster than one of these."""
    path = directory / "fsync-probe"
    lat = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for _ in range(n):
            t = time.perf_counter()
            os.write(fd, b"x" * 256)
            os.fsync(fd)
            lat.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        path.unlink()
    return ms(lat)


def write_config_dir(path: Path, services: int, instances: int) -> None:
    """The same catalog as config-dir JSON, 10 files (services of the agent's own node)."""
    path.mkdir()
    per_file = max(1, services // 10)
    for f, start in enumerate(range(0, services, per_file)):
        defs = [{"id": f"{svc_name(s)}-{i}", "name": svc_name(s), "address": instance_address(s, i),
                 "port": 8000 + i}
                for s in range(start, min(services, start + per_file)) for i in range(instances)]
        (path / f"services-{f:02d}.json").write_text(json.dumps({"services": defs}))


def time_to_dns(procs: Processes, label: str, args: list[str], dns_port: int, last: str,
                instances: int, workdir: Path, timeout: float, quiet_wait: float,
                cpu: int | str = AGENT_CPU) -> tuple[Agent, dict]:
    """Start an agent and time: 'agent started' logged, and LAST answering with all instances.

    The clock starts just before the process is spawned (interpreter start-up included)."""
    wait_for_quiet(procs, max_wait=quiet_wait)
    foreign = ForeignLoad(procs)
    t0 = time.perf_counter()
    agent = start_agent(procs, label, args, workdir / f"{label}.log", cpu=cpu, timeout=timeout)
    t_vis = poll_until_answered(dns_port, last, instances, t0 + timeout)
    if t_vis is None:
        raise BenchError(f"{label}: {last} not answered with {instances} records within {timeout:.0f} s"
                         f"\n{agent.proc.log_tail()}")
    return agent, {"started_log_s": round(agent.ready_after, 2),
                   "last_service_in_dns_s": round(t_vis - t0, 2),
                   "other_cores": round(foreign.cores(), 2)}


# --- driver -------------------------------------------------------------------------------

@dataclass
class Params:
    services: int
    instances: int
    nodes: int
    concurrency: int
    writes: int
    watch_trials: int
    dns_trials: int
    big: int
    big_queries: int
    big_warmup: int
    start_timeout: float
    quiet_wait: float
    cold_workers: int = 1


async def run_mode(procs: Processes, mode: str, p: Params, workdir: Path, results: dict,
                   scenarios: set[str]) -> None:
    dns_port = free_port()
    args = ["-node", NODE, "-http-port", str(free_port()), "-dns-port", str(dns_port)]
    data_dir = workdir / "data"
    args = (["-dev"] if mode == "dev" else ["-data-dir", str(data_dir)]) + args
    label = f"agent-{mode}"
    agent = start_agent(procs, label, args, workdir / f"{label}.log", cpu=AGENT_CPU,
                        timeout=p.start_timeout)
    r = results[mode] = {
        "command": f"taskset -c {AGENT_CPU} python -m dnsdisco agent {' '.join(args)}"}

    async def step(name: str, fn: Callable, gate: str | None = None) -> None:
        if (gate or name) not in scenarios:
            return
        print(f"[{mode}] {name} ...", flush=True)
        wait_for_quiet(procs, max_wait=p.quiet_wait)
        t = time.perf_counter()
        foreign = ForeignLoad(procs)
        value = fn()
        r[name] = await value if asyncio.iscoroutine(value) else value
        r[name]["other_cores"] = round(foreign.cores(), 2)
        print(f"[{mode}] {name}: {json.dumps(r[name])} ({time.perf_counter() - t:.1f} s)", flush=True)

    await step("load", lambda: load(agent, p.services, p.instances, p.nodes, p.concurrency))
    await step("rss", lambda: rss(agent))
    await step("writes", lambda: sequential_writes(agent, p.writes, p.nodes))
    if mode == "durable":
        await step("fsync", lambda: fsync_reference(workdir), gate="writes")
    await step("watch", lambda: watcher_wake(agent, p.watch_trials))
    await step("dns", lambda: registration_to_dns(agent, p.dns_trials))
    if mode == "dev":
        await step("big", lambda: big_service(agent, p.big, p.nodes, p.big_queries,
                                              p.big_warmup, p.concurrency))
        await step("rss_end", lambda: rss(agent), gate="rss")
    procs.stop(agent.proc)
    r["stop"] = {"sigterm_to_exit_s": round(agent.proc.stop_seconds, 2), "killed": agent.proc.killed,
                 "exit_code": agent.proc.popen.returncode}
    if mode == "durable" and "restart" in scenarios:
        print(f"[{mode}] restart ...", flush=True)
        last = f"{svc_name(p.services - 1)}.service.consul"
        agent2, r["restart"] = time_to_dns(procs, "agent-durable-restart", args, dns_port, last,
                                           p.instances, workdir, p.start_timeout, p.quiet_wait)
        r["restart"]["rss_mb"] = rss(agent2)["rss_mb"]
        print(f"[{mode}] restart: {json.dumps(r['restart'])}", flush=True)
        procs.stop(agent2.proc)


def run_cold(procs: Processes, p: Params, workdir: Path, results: dict) -> None:
    conf = workdir / "config"
    write_config_dir(conf, p.services, p.instances)
    dns_port = free_port()
    args = ["-dev", "-config-dir", str(conf), "-node", NODE, "-http-port", str(free_port()),
            "-dns-port", str(dns_port)]
    # With DNS workers (--cold-workers) the agent may use every core (the workers need them; this
    # process is pinned to CLIENT_CPU, and an agent started without taskset would inherit that).
    cpu: int | str = AGENT_CPU
    if p.cold_workers > 1:
        args += ["-dns-workers", str(p.cold_workers)]
        cpu = f"0-{(os.cpu_count() or 1) - 1}"
    print("[cold] start from config dir ...", flush=True)
    last = f"{svc_name(p.services - 1)}.service.consul"
    agent, r = time_to_dns(procs, "agent-cold", args, dns_port, last, p.instances, workdir,
                           p.start_timeout, p.quiet_wait, cpu=cpu)
    r["rss_mb"] = rss(agent)["rss_mb"]
    r["command"] = f"taskset -c {cpu} python -m dnsdisco agent {' '.join(args)}"
    results["cold"] = r
    print(f"[cold] {json.dumps(r)}", flush=True)
    procs.stop(agent.proc)


def summary(results: dict, p: Params) -> str:
    """One line per figure: value, target, verdict, and the cores other processes on the
    machine used meanwhile (above ~0.15 the figure is suspect)."""
    rows = [f"{'figure':56} {'value':>10} {'unit':6} {'target':>10} {'':4}  other cores"]

    def row(what: str, value: float, unit: str, target: float | None, other: float) -> None:
        t = f"< {target:g} {unit}" if target is not None else ""
        v = verdict(value < target) if target is not None else ""
        rows.append(f"{what:56} {value:>10,.2f} {unit:6} {t:>10} {v:4}  {other:.2f}")

    for mode in ("dev", "durable"):
        r = results.get(mode, {})
        if "load" in r:
            x = r["load"]
            row(f"[{mode}] bulk load (c={p.concurrency}), agent CPU share {x['agent_cpu_share']}",
                x["per_second"], "inst/s", None, x["other_cores"])
        if "rss" in r:
            row(f"[{mode}] agent VmRSS after load", r["rss"]["rss_mb"], "MB", TARGETS["rss_mb"],
                r["rss"]["other_cores"])
        if "writes" in r:
            for ep in ("catalog", "agent"):
                x = r["writes"][ep]
                row(f"[{mode}] sequential write p50, {ep} register", x["p50_ms"], "ms", None,
                    r["writes"]["other_cores"])
                row(f"[{mode}] sequential write p99, {ep} register", x["p99_ms"], "ms",
                    TARGETS["write_p99_ms"], r["writes"]["other_cores"])
        if "fsync" in r:
            row(f"[{mode}] reference: 256 B append + fsync p50, same disk", r["fsync"]["p50_ms"], "ms",
                None, r["fsync"]["other_cores"])
            row(f"[{mode}] reference: 256 B append + fsync p99, same disk", r["fsync"]["p99_ms"], "ms",
                None, r["fsync"]["other_cores"])
        if "watch" in r:
            x = r["watch"]
            row(f"[{mode}] write ack -> watcher wake p50", x["ack_to_wake"]["p50_ms"], "ms", None,
                x["other_cores"])
            row(f"[{mode}] write ack -> watcher wake p99", x["ack_to_wake"]["p99_ms"], "ms",
                TARGETS["watch_p99_ms"], x["other_cores"])
            row(f"[{mode}] write sent -> watcher wake p99", x["send_to_wake"]["p99_ms"], "ms",
                TARGETS["watch_p99_ms"], x["other_cores"])
        if "dns" in r:
            x = r["dns"]
            for k, word in (("send", "sent"), ("ack", "ack")):
                row(f"[{mode}] write {word} -> visible in DNS p50", x[f"{k}_to_visible"]["p50_ms"],
                    "ms", None, x["other_cores"])
                row(f"[{mode}] write {word} -> visible in DNS p99", x[f"{k}_to_visible"]["p99_ms"],
                    "ms", TARGETS["dns_p99_ms"], x["other_cores"])
        if "big" in r:
            x = r["big"]
            row(f"[{mode}] {p.big}-instance service: registration rate", x["register_per_second"],
                "inst/s", None, x["other_cores"])
            row(f"[{mode}] write into the {p.big}-instance service p99", x["write_into_big"]["p99_ms"],
                "ms", TARGETS["write_p99_ms"], x["other_cores"])
            row(f"[{mode}] DNS for another name during those writes, p50",
                x["dns_during_writes"]["p50_ms"], "ms", None, x["other_cores"])
            row(f"[{mode}] DNS for another name during those writes, max",
                x["dns_during_writes"]["max_ms"], "ms", None, x["other_cores"])
            for t in ("A", "SRV"):
                b = x[t]
                row(f"[{mode}] {p.big}-instance TCP {t} ({b['answers']} RRs, {b['bytes']} B) p50",
                    b["p50_ms"], "ms", None, x["other_cores"])
                row(f"[{mode}] {p.big}-instance TCP {t} p99", b["p99_ms"], "ms",
                    TARGETS["big_tcp_p99_ms"], x["other_cores"])
                row(f"[{mode}] {p.big}-instance TCP {t}, first {p.big_warmup} after a write, p99",
                    b["first_queries"]["p99_ms"], "ms", None, x["other_cores"])
        if "stop" in r:
            row(f"[{mode}] SIGTERM -> exit{' (KILLED)' if r['stop']['killed'] else ''}",
                r["stop"]["sigterm_to_exit_s"], "s", None, 0.0)
        if "rss_end" in r:
            row(f"[{mode}] agent VmRSS at the end", r["rss_end"]["rss_mb"], "MB", TARGETS["rss_mb"],
                r["rss_end"]["other_cores"])
        if "restart" in r:
            x = r["restart"]
            row(f"[{mode}] restart on its data dir -> last service in DNS", x["last_service_in_dns_s"],
                "s", TARGETS["cold_s"], x["other_cores"])
    if "cold" in results:
        x = results["cold"]
        row(f"[cold] {p.services * p.instances} instances in config dir -> last in DNS",
            x["last_service_in_dns_s"], "s", TARGETS["cold_s"], x["other_cores"])
    return "\n".join(rows)


ALL = ("load", "rss", "writes", "watch", "dns", "big", "cold", "restart")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1,000 x 10 instances and fewer trials")
    ap.add_argument("--services", type=int, default=10_000)
    ap.add_argument("--instances", type=int, default=10)
    ap.add_argument("--nodes", type=int, default=1_000, help="catalog nodes the instances spread over")
    ap.add_argument("--concurrency", type=int, default=64, help="requests in flight for bulk loads")
    ap.add_argument("--writes", type=int, default=1_000, help="sequential writes per endpoint (2 endpoints)")
    ap.add_argument("--watch-trials", type=int, default=200)
    ap.add_argument("--dns-trials", type=int, default=200)
    ap.add_argument("--big", type=int, default=5_000, help="instances of the big service")
    ap.add_argument("--big-queries", type=int, default=100)
    ap.add_argument("--big-warmup", type=int, default=100, help="TCP queries before measuring")
    ap.add_argument("--modes", default="dev,durable", help="agents to run: dev, durable or both")
    ap.add_argument("--cold-workers", type=int, default=1,
                    help="dns_workers of the cold-start agent (above 1: unpinned, as the workers need the cores)")
    ap.add_argument("--only", default=",".join(ALL), help=f"scenarios to run (of {','.join(ALL)})")
    ap.add_argument("--start-timeout", type=float, default=120.0,
                    help="seconds an agent may take to start or to answer its whole catalog")
    add_common_args(ap, quiet_wait=20.0)
    args = ap.parse_args(argv)
    if args.quick:
        args.services, args.writes, args.watch_trials, args.dns_trials = 1_000, 200, 50, 50
        args.big, args.big_queries, args.big_warmup, args.nodes = 1_000, 30, 30, 100
    scenarios = set(args.only.split(","))
    if scenarios - set(ALL):
        ap.error(f"unknown scenarios: {scenarios - set(ALL)}")
    p = Params(args.services, args.instances, args.nodes, args.concurrency, args.writes,
               args.watch_trials, args.dns_trials, args.big, args.big_queries, args.big_warmup,
               args.start_timeout, args.quiet_wait, args.cold_workers)

    sigterm_as_exit()
    set_quiet_budget(args.quiet_budget)
    try:
        os.sched_setaffinity(0, {CLIENT_CPU})
    except OSError:
        pass
    procs = Processes()
    workdir = Path(tempfile.mkdtemp(prefix="catbench-"))
    results: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                     "code": code_version(),
                     "argv": sys.argv, "params": p.__dict__}
    print(f"dnsdisco: {results['code']}", flush=True)
    try:
        for mode in args.modes.split(","):
            asyncio.run(run_mode(procs, mode, p, workdir, results, scenarios))
        if "cold" in scenarios:
            run_cold(procs, p, workdir, results)
        print()
        print(summary(results, p))
        return 0
    finally:
        procs.stop_all()
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        if args.keep:
            print(f"work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    run_main(main)
