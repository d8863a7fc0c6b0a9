"""DNS worker processes (``dns_workers`` > 1): several processes answer on one port, follow the
embedded catalog over loopback, are restarted when killed, are summed in ``/metrics``, reload
with the agent, and never outlive it. Real processes and sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from dnsdisco import config as configmod
from dnsdisco.app import Agent
from dnsdisco.errors import ConfigError
from dnsdisco.metrics import Metrics
# query() opens a new socket per query: a new source port, so SO_REUSEPORT hashes queries over
# the workers.
from tests.integration.test_agent import query

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load(**overrides: Any) -> configmod.Config:
    base: dict[str, Any] = {"node_name": "node1", "ports": {"http": 0, "dns": 0}, "dns_workers": 2}
    base.update(overrides)
    return configmod.load(overrides=base, dev=True)


def addresses(reply: dns.message.Message) -> set[str]:
    return {rr.address for rrset in reply.answer if rrset.rdtype == dns.rdatatype.A for rr in rrset}


def scrape(agent: Agent) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = agent.metrics.exposition().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too; it is reaped by its parent.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
async def agent() -> AsyncIterator[Agent]:
    cfg = load()
    a = Agent(cfg, metrics=Metrics(CollectorRegistry(), datacenter=cfg.datacenter))
    await a.start()
    try:
        yield a
    finally:
        await a.stop()


async def many(port: int, name: str, n: int) -> list[dns.message.Message]:
    return await asyncio.to_thread(lambda: [query(port, name) for _ in range(n)])


async def test_two_workers_answer_on_one_port_and_metrics_are_summed(agent):
    assert agent.workers is not None and agent.dns is None
    pids = agent.workers.pids()
    assert len(pids) == 2 and os.getpid() not in pids and all(alive(p) for p in pids)
    ok, why = agent._ready()
    assert ok and "2 DNS workers serving" in why

    replies = await many(agent.dns_port, "consul.service.consul", 120)
    assert all(addresses(r) == {"127.0.0.1"} for r in replies)
    tcp = await asyncio.to_thread(query, agent.dns_port, "consul.service.consul", tcp=True)
    assert addresses(tcp) == {"127.0.0.1"}

    per_worker = agent.workers.worker_stats()
    # 120 source ports hashed over two sockets: both get a share (p of all on one: 2^-119).
    assert [s.udp_requests > 0 for s in per_worker] == [True, True]
    assert sum(s.udp_requests for s in per_worker) == 120
    samples = scrape(agent)
    requests = samples["dnsdisco_dns_requests_total", (("family", "1"), ("proto", "udp"), ("type", "A"))]
    assert requests == 120
    assert samples["dnsdisco_dns_requests_total", (("family", "1"), ("proto", "tcp"), ("type", "A"))] == 1
    assert samples["dnsdisco_dns_responses_total", (("rcode", "NOERROR"), ("source", "catalog"))] == 121
    assert total(samples, "dnsdisco_dns_worker_restarts_total") == 0


async def test_a_registration_shows_up_through_the_workers(agent):
    base = f"http://127.0.0.1:{agent.http_port}"
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{base}/v1/agent/service/register",
                            json={"Name": "web", "ID": "web-1", "Address": "10.7.0.1", "Port": 80}) as r:
            assert r.status == 200
        registered = time.monotonic()
        # Every worker must have it: ask from many source ports until all agree.
        deadline = registered + 5
        while True:
            replies = await many(agent.dns_port, "web.service.consul", 20)
            if all(addresses(r) == {"10.7.0.1"} for r in replies):
                break
            assert time.monotonic() < deadline, "registration not visible through every worker in 5s"
            await asyncio.sleep(0.01)
        async with http.put(f"{base}/v1/agent/service/deregister/web-1") as r:
            assert r.status == 200
        deadline = time.monotonic() + 5
        while True:
            replies = await many(agent.dns_port, "web.service.consul", 20)
            if all(r.rcode() == dns.rcode.NXDOMAIN for r in replies):
                break
            assert time.monotonic() < deadline, "deregistration not visible through every worker in 5s"
            await asyncio.sleep(0.01)


async def test_a_killed_worker_is_restarted_and_answers_again(agent, caplog):
    assert agent.workers is not None
    await many(agent.dns_port, "consul.service.consul", 40)
    before = sum(s.udp_requests for s in agent.workers.worker_stats())
    assert before == 40
    victim = agent.workers.pids()[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while True:
        pids = agent.workers.pids()
        if len(pids) == 2 and victim not in pids and agent._ready()[0]:
            break
        assert time.monotonic() < deadline, f"worker not restarted: {pids}, {agent._ready()}"
        await asyncio.sleep(0.05)
    assert not alive(victim)
    assert any("stopped unexpectedly (killed by signal 9)" in r.getMessage() for r in caplog.records)
    # Every query gets an answer again, whichever socket the kernel hashes it to.
    replies = await many(agent.dns_port, "consul.service.consul", 40)
    assert all(addresses(r) == {"127.0.0.1"} for r in replies)
    samples = scrape(agent)
    assert total(samples, "dnsdisco_dns_worker_restarts_total") == 1
    # The dead worker's counts (as of the last scrape) are kept: sums never go back.
    assert total(samples, "dnsdisco_dns_requests_total") >= before + 40


async def test_reload_reaches_the_workers():
    ttl = {"value": "0s"}

    def current() -> configmod.Config:
        return load(dns_config={"node_ttl": ttl["value"]})

    cfg = current()
    a = Agent(cfg, reload_config=current, metrics=Metrics(CollectorRegistry(), datacenter=cfg.datacenter))
    await a.start()
    try:
        def node_ttls() -> set[int]:
            return {r.answer[0].ttl for r in [query(a.dns_port, "node1.node.consul") for _ in range(20)]}

        assert await asyncio.to_thread(node_ttls) == {0}
        ttl["value"] = "42s"
        await a.reload()
        deadline = time.monotonic() + 5
        while (got := await asyncio.to_thread(node_ttls)) != {42}:
            assert time.monotonic() < deadline, f"node TTLs after reload: {got}"
            await asyncio.sleep(0.05)
    finally:
        await a.stop()


async def test_a_port_in_use_stops_startup_before_any_worker_starts():
    # Taken without SO_REUSEPORT, and taken *with* it (another dnsdisco's workers): both refused.
    for reuse in (False, True):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
            if reuse:
                taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            taken.bind(("127.0.0.1", 0))
            port = taken.getsockname()[1]
            a = Agent(load(ports={"http": 0, "dns": port}))
            with pytest.raises(OSError) as err:
                await a.start()
            assert err.value.errno == 98  # EADDRINUSE
            assert a.workers is None and a.http_port is None


def test_dns_workers_is_validated():
    with pytest.raises(ConfigError, match="key 'dns_workers'"):
        configmod.load(overrides={"dns_workers": 0}, dev=True)
    assert configmod.load(dev=True).dns_workers == 1  # -dev: DNS in the agent process
    assert configmod.load(overrides={"data_dir": "/nonexistent"}).dns_workers == len(os.sched_getaffinity(0))
    assert configmod.load(overrides={"data_dir": "/x", "dns_workers": 3}).dns_workers == 3


# --- the real process -------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(p) for p in f.read().split()]
    return out


def start_process(tmp_path) -> tuple[subprocess.Popen[str], int, list[int]]:
    cmd = [sys.executable, "-m", "dnsdisco", "agent", "-dev", "-node", "proc1", "-dns-workers", "2",
           "-http-port", "0", "-dns-port", "0"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    for line in proc.stderr:
        m = re.search(r"agent started:.* dns=127\.0\.0\.1:(\d+)", line)
        if m:
            break
        assert time.monotonic() < deadline
    else:
        raise AssertionError(f"agent exited with {proc.wait()}")
    workers = [p for p in children(proc.pid) if "dnsdisco.workers" in open(f"/proc/{p}/cmdline").read()]
    assert len(workers) == 2
    return proc, int(m.group(1)), workers


def test_sigterm_stops_every_worker(tmp_path):
    proc, port, workers = start_process(tmp_path)
    try:
        assert addresses(query(port, "consul.service.consul")) == {"127.0.0.1"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        deadline = time.monotonic() + 5
        while any(alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(p) for p in workers), "orphaned DNS workers"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_workers_of_a_killed_agent_exit(tmp_path):
    # kill -9 gives the agent no chance to stop them: they notice their control channel close.
    proc, port, workers = start_process(tmp_path)
    try:
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(p) for p in workers), "DNS workers outlived a killed agent"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", port))  # and the port is free again
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_with_the_http_api_off_workers_follow_a_private_unix_socket():
    """``ports.http = -1``: the workers still need the API, but it must not appear on a TCP
    port: a Unix socket in a directory only this user may enter, removed at stop."""
    cfg = load(ports={"http": -1, "dns": 0})
    a = Agent(cfg, metrics=Metrics(CollectorRegistry(), datacenter=cfg.datacenter))
    await a.start()
    try:
        assert a.http_port is None and a._private_dir is not None
        assert os.stat(a._private_dir).st_mode & 0o777 == 0o700
        replies = await many(a.dns_port, "consul.service.consul", 20)
        assert all(addresses(r) == {"127.0.0.1"} for r in replies)
        private = a._private_dir
        # No TCP listener of the agent's process besides DNS: nothing else on a port.
        listening = _tcp_listening_ports(os.getpid())
        assert listening == {a.dns_port}, listening
    finally:
        await a.stop()
    assert not os.path.exists(private)


def _tcp_listening_ports(pid: int) -> set[int]:
    """The ports of this process's listening TCP sockets, from /proc (no psutil here)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    out.add(int(cols[1].rsplit(":", 1)[1], 16))
    return out
