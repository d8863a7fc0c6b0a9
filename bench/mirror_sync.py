"""Mirror mode at scale: first sync, connections, and change -> DNS latency per kind of change.

Starts a stand-in "Consul" (a dnsdisco agent with its embedded catalog, ``-dev``), loads it with
SERVICES services x PER_SERVICE instances on NODES nodes (each instance with one passing check)
through ``PUT /v1/catalog/register``, then, for each mode asked (``hints``: the mirror uses the
``X-Dnsdisco-Changed-Services`` extension of a dnsdisco upstream; ``consul``: it does not, and
follows the stand-in exactly as it follows Consul), a mirror-mode agent
(``-upstream http://127.0.0.1:PORT``), and measures:

* the first full sync: from the mirror's process start until the last service answers in DNS;
* the TCP connections the mirror holds open to the upstream (``/proc``), at most and at the end;
* change -> DNS latency for each kind of change (register with / without a check, port change of
  an instance without checks, deregister with / without a check, tag change, health flap both
  ways, node address change, node meta change): from the write's 200 to the first DNS answer
  (polled over TCP with dnspython: UDP answers are cut to 3 records) that shows it; p50 / p99 / max.

Changes are spaced ``--gap`` seconds apart and the mirror's watches refill one token per
``--query-interval`` (the product default is 15 s: churn then slows re-queries to one per 15 s
per watch, by design; this measures how fast one change shows, not that policy).

    python bench/mirror_sync.py [--services 5000] [--samples 8] [--modes hints,consul] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import dns.asyncquery
import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _benchlib import (  # noqa: E402
    run_main,
    LOOPBACK,
    SLOW_CALLBACK,
    BenchError,
    Processes,
    add_common_args,
    code_version,
    free_port,
    percentile,
    set_quiet_budget,
    start_agent,
    wait_for_quiet,
)

TARGET_SYNC = 10.0
TARGET_CHANGE = 1.0


# --- the upstream's data -----------------------------------------------------------------------

def node_name(n: int) -> str:
    return f"node{n}"


def node_addr(n: int, rev: int = 0) -> str:
    return f"10.{(n // 250) % 256}.{n % 250}.{1 + rev % 250}"


def register_body(k: int, j: int, nodes: int, per: int) -> dict:
    n = (k * per + j) % nodes
    return {
        "Node": node_name(n), "Address": node_addr(n),
        "Service": {"ID": f"s{k}-{j}", "Service": f"s{k}", "Port": 8000 + j, "Tags": ["v1"]},
        "Check": {"CheckID": f"c{k}-{j}", "Name": "alive", "Status": "passing", "ServiceID": f"s{k}-{j}"},
    }


async def load(session: aiohttp.ClientSession, base: str, services: int, per: int, nodes: int) -> float:
    todo = [(k, j) for k in range(services) for j in range(per)]
    todo.reverse()
    t0 = time.monotonic()

    async def worker() -> None:
        while todo:
            k, j = todo.pop()
            async with session.put(f"{base}/v1/catalog/register", json=register_body(k, j, nodes, per)) as r:
                if r.status != 200:
                    raise BenchError(f"register s{k}-{j}: HTTP {r.status}: {await r.text()}")

    await asyncio.gather(*(worker() for _ in range(64)))
    return time.monotonic() - t0


# --- DNS polling --------------------------------------------------------------------------------

class Dns:
    def __init__(self, port: int) -> None:
        self.port = port
        self.times: list[float] = []  # seconds each query took, connection included

    async def ask(self, name: str, rdtype: str) -> tuple[str, set[str]]:
        q = dns.message.make_query(name, rdtype)
        t0 = time.perf_counter()
        try:
            # TCP: over UDP the answer is cut to dns_config.udp_answer_limit (3) records.
            r = await dns.asyncquery.tcp(q, LOOPBACK, port=self.port, timeout=0.5)
        except dns.exception.Timeout:
            self.times.append(time.perf_counter() - t0)
            return "TIMEOUT", set()
        self.times.append(time.perf_counter() - t0)
        return dns.rcode.to_text(r.rcode()), {rd.to_text() for rrset in r.answer for rd in rrset}

    async def until(self, pred: Callable[[str, set[str]], bool], name: str, rdtype: str,
                    timeout: float) -> float:
        """Poll until *pred*(rcode, answers) holds; return the monotonic time it first did."""
        deadline = time.monotonic() + timeout
        while True:
            rcode, ans = await self.ask(name, rdtype)
            now = time.monotonic()
            if pred(rcode, ans):
                return now
            if now > deadline:
                raise BenchError(f"timed out after {timeout}s waiting on {name} {rdtype} (last: {rcode} {ans})")
            await asyncio.sleep(0.001)


def ports(ans: set[str]) -> set[int]:
    return {int(a.split()[2]) for a in ans}


# --- connections ----------------------------------------------------------------------------------

def connections_to(pid: int, port: int) -> int:
    """ESTABLISHED TCP connections of process *pid* to 127.0.0.1:*port* (/proc/net/tcp + fds)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        return 0
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "01" and int(f[2].rsplit(":", 1)[1], 16) == port and f[9] in inodes:
                count += 1
    return count


class ConnSampler:
    def __init__(self, pid: int, port: int) -> None:
        self.pid, self.port = pid, port
        self.max = 0
        self.last = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.last = connections_to(self.pid, self.port)
            self.max = max(self.max, self.last)
            await asyncio.sleep(0.05)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


# --- one mode -------------------------------------------------------------------------------------

class Changes:
    """The kinds of change, each a write followed by a DNS predicate that shows it."""

    def __init__(self, session: aiohttp.ClientSession, base: str, dnsq: Dns, *, services: int, per: int,
                 nodes: int, timeout: float, mode: str) -> None:
        self.session, self.base, self.dns = session, base, dnsq
        self.services, self.per, self.nodes = services, per, nodes
        self.timeout = timeout
        self.mode = mode
        self.results: dict[str, list[float]] = {}

    async def put(self, path: str, body: dict) -> float:
        async with self.session.put(self.base + path, json=body) as r:
            if r.status != 200:
                raise BenchError(f"{path}: HTTP {r.status}: {await r.text()}")
        return time.monotonic()

    async def measure(self, kind: str, path: str, body: dict, pred: Callable[[str, set[str]], bool],
                      name: str, rdtype: str) -> None:
        acked = await self.put(path, body)
        seen = await self.dns.until(pred, name, rdtype, self.timeout)
        self.results.setdefault(kind, []).append(seen - acked)

    async def one_round(self, i: int, gap: float) -> None:
        S, per, nodes = self.services, self.per, self.nodes
        # Each round works on its own services and nodes, spread over the catalog.
        k = (i * 613 + 17) % S
        svc = f"s{k}.service.consul"
        n = (k * per) % nodes
        port_c, port_b, port_b2 = 20000 + 2 * i, 20001 + 2 * i, 30000 + i
        x_node = node_name((n + 1) % nodes)
        x_addr = node_addr((n + 1) % nodes)
        steps = [
            ("register, with a passing check", "/v1/catalog/register", {
                "Node": x_node, "Address": x_addr, "SkipNodeUpdate": True,
                "Service": {"ID": f"xc{i}", "Service": f"s{k}", "Port": port_c, "Tags": ["v1"]},
                "Check": {"CheckID": f"xc{i}", "Name": "x", "Status": "passing", "ServiceID": f"xc{i}"}},
             lambda rc, a: port_c in ports(a), svc, "SRV"),
            ("register, no check", "/v1/catalog/register", {
                "Node": x_node, "Address": x_addr, "SkipNodeUpdate": True,
                "Service": {"ID": f"xb{i}", "Service": f"s{k}", "Port": port_b, "Tags": ["v1"]}},
             lambda rc, a: port_b in ports(a), svc, "SRV"),
            ("port change, instance without checks", "/v1/catalog/register", {
                "Node": x_node, "Address": x_addr, "SkipNodeUpdate": True,
                "Service": {"ID": f"xb{i}", "Service": f"s{k}", "Port": port_b2, "Tags": ["v1"]}},
             lambda rc, a: port_b2 in ports(a) and port_b not in ports(a), svc, "SRV"),
            ("tag change", "/v1/catalog/register", {
                "Node": x_node, "Address": x_addr, "SkipNodeUpdate": True,
                "Service": {"ID": f"xb{i}", "Service": f"s{k}", "Port": port_b2, "Tags": ["v1", f"t{i}"]}},
             lambda rc, a: rc == "NOERROR" and port_b2 in ports(a), f"t{i}.{svc}", "SRV"),
            ("deregister, instance without checks", "/v1/catalog/deregister", {"Node": x_node, "ServiceID": f"xb{i}"},
             lambda rc, a: port_b2 not in ports(a) and len(a) > 0, svc, "SRV"),
            ("deregister, instance with a passing check", "/v1/catalog/deregister",
             {"Node": x_node, "ServiceID": f"xc{i}"},
             lambda rc, a: port_c not in ports(a) and len(a) > 0, svc, "SRV"),
            ("health flap, passing -> critical", "/v1/catalog/register", {
                "Node": node_name(n), "Address": node_addr(n), "SkipNodeUpdate": True,
                "Check": {"CheckID": f"c{k}-0", "Name": "alive", "Status": "critical", "ServiceID": f"s{k}-0"}},
             lambda rc, a: 8000 not in ports(a) and len(a) == per - 1, svc, "SRV"),
            ("health flap, critical -> passing", "/v1/catalog/register", {
                "Node": node_name(n), "Address": node_addr(n), "SkipNodeUpdate": True,
                "Check": {"CheckID": f"c{k}-0", "Name": "alive", "Status": "passing", "ServiceID": f"s{k}-0"}},
             lambda rc, a: 8000 in ports(a) and len(a) == per, svc, "SRV"),
            ("node address change", "/v1/catalog/register", {
                "Node": node_name(n), "Address": node_addr(n, i + 1)},
             lambda rc, a: a == {node_addr(n, i + 1)}, f"{node_name(n)}.node.consul", "A"),
            ("node meta change", "/v1/catalog/register", {
                "Node": node_name(n), "Address": node_addr(n, i + 1), "NodeMeta": {"rev": str(i)}},
             lambda rc, a: f'"rev={i}"' in a, f"{node_name(n)}.node.consul", "TXT"),
        ]
        for kind, path, body, pred, name, rdtype in steps:
            await self.measure(kind, path, body, pred, name, rdtype)
            await asyncio.sleep(gap)
        # Put the node back as it was (no meta, original address) for the next rounds.
        await self.put("/v1/catalog/register", {"Node": node_name(n), "Address": node_addr(n), "NodeMeta": {}})
        await asyncio.sleep(gap)


async def run_mode(procs: Processes, work: Path, up_port: int, session: aiohttp.ClientSession, *,
                   mode: str, args: argparse.Namespace) -> dict:
    conf = work / f"mirror-{mode}.json"
    conf.write_text(json.dumps({"upstream": {
        "query_interval": f"{int(args.query_interval * 1000)}ms", "change_hints": mode == "hints"}}))
    http_port, dns_port = free_port(), free_port()
    base = f"http://{LOOPBACK}:{up_port}"
    agent = start_agent(procs, f"mirror-{mode}", [
        "-node", f"mirror-{mode}", "-http-port", str(http_port), "-dns-port", str(dns_port),
        "-upstream", base, "-config-file", str(conf)], work / f"mirror-{mode}.log", cpu=1,
        slow_callback=None if args.slow_callback_ms is None else args.slow_callback_ms / 1000)
    pid = agent.proc.pid
    sampler = ConnSampler(pid, up_port)
    sampler.start()
    dnsq = Dns(dns_port)
    last = f"s{args.services - 1}.service.consul"
    seen = await dnsq.until(lambda rc, a: rc == "NOERROR" and len(a) == args.per_service, last, "SRV", 120)
    first_sync = seen - agent.proc.started
    # Every service answers, not just the last one.
    for k in range(0, args.services, max(1, args.services // 50)):
        rc, a = await dnsq.ask(f"s{k}.service.consul", "SRV")
        if rc != "NOERROR" or len(a) != args.per_service:
            raise BenchError(f"after the first sync s{k} answers {rc} {a}")
    after_sync = sampler.last
    dnsq.times.clear()  # from here on: how long DNS takes while the mirror follows changes
    log_from = len(agent.proc.log_text())
    changes = Changes(session, base, dnsq, services=args.services, per=args.per_service, nodes=args.nodes,
                      timeout=30.0, mode=mode)
    for i in range(args.samples):
        await changes.one_round(i, args.gap)
    await sampler.stop()
    async with session.get(f"http://{LOOPBACK}:{http_port}/ready") as r:
        ready = await r.text()
    slow = [float(m.group(1)) for m in SLOW_CALLBACK.finditer(agent.proc.log_text()[log_from:])]
    procs.stop(agent.proc)
    out = {"mode": mode, "first_sync_s": first_sync, "agent_started_s": agent.ready_after,
           "connections_max": sampler.max, "connections_after_sync": after_sync,
           "connections_end": sampler.last, "ready": ready.strip()[:200], "changes": {},
           "dns_reply_ms": {"n": len(dnsq.times), "p50": percentile(dnsq.times, 50) * 1000,
                            "p99": percentile(dnsq.times, 99) * 1000,
                            "p999": percentile(dnsq.times, 99.9) * 1000, "max": max(dnsq.times) * 1000},
           "slow_callback_ms": args.slow_callback_ms,
           "slow_callbacks": {"n": len(slow), "max_ms": max(slow, default=0.0) * 1000}}
    for kind, vals in changes.results.items():
        out["changes"][kind] = {"n": len(vals), "p50_ms": percentile(vals, 50) * 1000,
                                "p99_ms": percentile(vals, 99) * 1000, "max_ms": max(vals) * 1000}
    return out


async def main_async(args: argparse.Namespace, procs: Processes, work: Path) -> dict:
    up_http, up_dns = free_port(), free_port()
    upstream = start_agent(procs, "consul", ["-dev", "-node", "consul-1", "-http-port", str(up_http),
                                             "-dns-port", str(up_dns)], work / "consul.log", cpu=0)
    base = f"http://{LOOPBACK}:{up_http}"
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector) as session:
        loaded = await load(session, base, args.services, args.per_service, args.nodes)
        print(f"loaded {args.services} services x {args.per_service} on {args.nodes} nodes in {loaded:.1f}s",
              flush=True)
        results = {"version": code_version(), "date": time.strftime("%Y-%m-%d %H:%M"),
                   "services": args.services, "instances": args.services * args.per_service,
                   "nodes": args.nodes, "load_s": loaded, "query_interval_s": args.query_interval,
                   "gap_s": args.gap, "modes": []}
        for mode in args.modes.split(","):
            other = wait_for_quiet(procs, max_wait=args.quiet_wait)
            r = await run_mode(procs, work, up_http, session, mode=mode, args=args)
            r["other_cores_before"] = other
            results["modes"].append(r)
            report_mode(r)
    procs.stop(upstream.proc)
    return results


def report_mode(r: dict) -> None:
    print(f"\n== mode {r['mode']} (other cores before: {r['other_cores_before']:.2f})")
    ok = r["first_sync_s"] < TARGET_SYNC
    print(f"first full sync (process start -> last service in DNS): {r['first_sync_s']:.2f}s "
          f"[{'PASS' if ok else 'FAIL'} < {TARGET_SYNC:g}s]; agent started after {r['agent_started_s']:.2f}s")
    print(f"connections to the upstream: max {r['connections_max']}, after sync {r['connections_after_sync']}, "
          f"end {r['connections_end']}")
    d = r["dns_reply_ms"]
    print(f"DNS replies meanwhile (TCP, connection included): {d['n']} queries, p50 {d['p50']:.2f} ms, "
          f"p99 {d['p99']:.2f} ms, p99.9 {d['p999']:.1f} ms, max {d['max']:.1f} ms")
    if r["slow_callback_ms"] is not None:
        sc = r["slow_callbacks"]
        print(f"mirror callbacks over {r['slow_callback_ms']:g} ms while following (asyncio debug mode): "
              f"{sc['n']}, longest {sc['max_ms']:.0f} ms")
    print(f"{'change':45} {'n':>3} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}")
    for kind, v in r["changes"].items():
        flag = "" if v["max_ms"] < TARGET_CHANGE * 1000 else "  (> 1 s)"
        print(f"{kind:45} {v['n']:>3} {v['p50_ms']:>9.1f} {v['p99_ms']:>9.1f} {v['max_ms']:>9.1f}{flag}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--services", type=int, default=5000)
    ap.add_argument("--per-service", type=int, default=4)
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=8, help="rounds of every kind of change (default 8)")
    ap.add_argument("--gap", type=float, default=0.3, help="seconds between changes (default 0.3)")
    ap.add_argument("--query-interval", type=float, default=0.25,
                    help="the mirror's upstream.query_interval in seconds (default 0.25)")
    ap.add_argument("--modes", default="hints,consul", help="comma-separated: hints, consul")
    ap.add_argument("--slow-callback-ms", type=float, default=None, metavar="MS",
                    help="run the mirror under asyncio's debug mode (no uvloop) and count its callbacks "
                         "longer than MS while it follows the changes (slows it down; not for timings)")
    add_common_args(ap, quiet_wait=10)
    args = ap.parse_args()
    set_quiet_budget(args.quiet_budget)
    procs = Processes()
    work = Path(tempfile.mkdtemp(prefix="mirror-sync-"))
    try:
        results = asyncio.run(main_async(args, procs, work))
    finally:
        procs.stop_all()
        if args.keep:
            print(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\ncode: {results['version']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    run_main(main)
