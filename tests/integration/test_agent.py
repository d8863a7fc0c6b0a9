"""The whole agent end to end: config dir -> catalog -> DNS, HTTP writes seen by DNS at once,
reload on SIGHUP, refusal of bad config, and kill -9 durability, over real loopback sockets."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from dnsdisco import config as configmod
from dnsdisco.app import Agent

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (DNS needs the same number for both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


def query(port: int, name: str, rdtype: str = "A", *, tcp: bool = False) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    if tcp:
        return dns.query.tcp(q, "127.0.0.1", port=port, timeout=2)
    return dns.query.udp(q, "127.0.0.1", port=port, timeout=2)


def addresses(reply: dns.message.Message) -> set[str]:
    return {rr.address for rrset in reply.answer if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
            for rr in rrset}


def write_services(path, services) -> None:
    path.write_text(json.dumps({"services": services}))


@pytest.fixture
async def agent(tmp_path):
    svc_dir = tmp_path / "conf"
    svc_dir.mkdir()
    write_services(svc_dir / "web.json", [
        {"id": "web-1", "name": "web", "address": "10.0.0.1", "port": 80, "tags": ["v1"]},
        {"id": "web-2", "name": "web", "address": "10.0.0.2", "port": 80},
    ])
    cfg = configmod.load(dirs=[str(svc_dir)], overrides={"node_name": "node1", "ports": {"http": 0, "dns": 0}},
                         dev=True)
    a = Agent(cfg, reload_config=lambda: configmod.load(
        dirs=[str(svc_dir)], overrides={"node_name": "node1", "ports": {"http": 0, "dns": 0}}, dev=True))
    await a.start()
    a.conf_dir = svc_dir
    try:
        yield a
    finally:
        await a.stop()


async def test_config_dir_services_answer_in_dns(agent):
    reply = await asyncio.to_thread(query, agent.dns_port, "web.service.consul")
    assert reply.rcode() == dns.rcode.NOERROR
    assert addresses(reply) == {"10.0.0.1", "10.0.0.2"}
    tagged = await asyncio.to_thread(query, agent.dns_port, "v1.web.service.consul")
    assert addresses(tagged) == {"10.0.0.1"}
    # The agent registers its own node with a `consul` service on the server port, like a server.
    consul = await asyncio.to_thread(query, agent.dns_port, "consul.service.consul", "SRV")
    assert [rr.port for rrset in consul.answer for rr in rrset] == [8300]


async def test_http_writes_are_visible_in_dns_when_acknowledged(agent):
    base = f"http://127.0.0.1:{agent.http_port}"
    async with aiohttp.ClientSession() as http:
        body = {"Name": "api", "ID": "api-1", "Address": "10.0.1.1", "Port": 9000,
                "Check": {"TTL": "30s", "Status": "passing"}}
        async with http.put(f"{base}/v1/agent/service/register", json=body) as r:
            assert r.status == 200, await r.text()
        # No sleep: the DNS table is updated in the same loop step as the commit.
        reply = await asyncio.to_thread(query, agent.dns_port, "api.service.consul")
        assert addresses(reply) == {"10.0.1.1"}

        async with http.put(f"{base}/v1/agent/check/fail/service:api-1?note=down") as r:
            assert r.status == 200, await r.text()
        reply = await asyncio.to_thread(query, agent.dns_port, "api.service.consul")
        assert reply.rcode() == dns.rcode.NXDOMAIN  # all instances critical -> NXDOMAIN (Consul)

        async with http.put(f"{base}/v1/agent/check/pass/service:api-1") as r:
            assert r.status == 200
        assert addresses(await asyncio.to_thread(query, agent.dns_port, "api.service.consul")) == {"10.0.1.1"}

        async with http.put(f"{base}/v1/agent/service/deregister/api-1") as r:
            assert r.status == 200
        reply = await asyncio.to_thread(query, agent.dns_port, "api.service.consul")
        assert reply.rcode() == dns.rcode.NXDOMAIN


async def test_reload_applies_services_and_dns_config_and_keeps_old_on_error(agent):
    write_services(agent.conf_dir / "web.json", [{"id": "web-3", "name": "web", "address": "10.0.0.3"}])
    (agent.conf_dir / "dns.json").write_text(json.dumps({"dns_config": {"service_ttl": {"*": "7s"}}}))
    await agent.reload()
    reply = await asyncio.to_thread(query, agent.dns_port, "web.service.consul")
    assert addresses(reply) == {"10.0.0.3"}
    assert {rrset.ttl for rrset in reply.answer} == {7}

    (agent.conf_dir / "broken.json").write_text(json.dumps({"dns_config": {"node_ttl": "soon"}}))
    with pytest.raises(configmod.ConfigError, match=r"broken\.json: key 'dns_config\.node_ttl'"):
        await agent.reload()
    reply = await asyncio.to_thread(query, agent.dns_port, "web.service.consul")
    assert addresses(reply) == {"10.0.0.3"} and {rrset.ttl for rrset in reply.answer} == {7}


# --- the real process -------------------------------------------------------------------------

class AgentProcess:
    def __init__(self, args: list[str]) -> None:
        self.http_port = free_port()
        self.dns_port = free_port()
        # One DNS process, as with -dev (test_workers.py covers dns_workers > 1).
        cmd = [sys.executable, "-m", "dnsdisco", "agent", "-node", "proc1", "-dns-workers", "1",
               "-http-port", str(self.http_port), "-dns-port", str(self.dns_port), *args]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        self.log: list[str] = []

    def wait_ready(self, timeout: float = 15.0) -> None:
        self.wait_log("agent started", timeout)

    def wait_log(self, pattern: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no log line matching {pattern!r} (exit code {self.proc.poll()}):\n"
                             + "".join(self.log))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)


def wait_dns(port: int, name: str, want: set[str], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    got: set[str] = set()
    while time.monotonic() < deadline:
        try:
            got = addresses(query(port, name))
        except Exception:
            got = set()
        if got == want:
            return
        time.sleep(0.02)
    raise AssertionError(f"{name}: wanted {want}, last saw {got}")


def test_sighup_reloads_and_a_bad_file_keeps_the_running_config(tmp_path):
    conf = tmp_path / "conf"
    conf.mkdir()
    write_services(conf / "web.json", [{"id": "web-1", "name": "web", "address": "10.0.0.1"}])
    agent = AgentProcess(["-dev", "-config-dir", str(conf)])
    try:
        agent.wait_ready()
        wait_dns(agent.dns_port, "web.service.consul", {"10.0.0.1"})
        write_services(conf / "web.json", [{"id": "web-1", "name": "web", "address": "10.0.0.9"}])
        agent.proc.send_signal(signal.SIGHUP)
        agent.wait_log("configuration reloaded")
        wait_dns(agent.dns_port, "web.service.consul", {"10.0.0.9"})

        (conf / "zz-bad.json").write_text(json.dumps({"service": {"name": "x", "port": "eighty"}}))
        agent.proc.send_signal(signal.SIGHUP)
        line = agent.wait_log("reload refused")
        assert "zz-bad.json" in line and "port" in line
        wait_dns(agent.dns_port, "web.service.consul", {"10.0.0.9"})
        assert agent.stop() == 0
    finally:
        agent.stop()


def test_bad_config_stops_startup_with_the_file_and_key(tmp_path):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "agent.json").write_text(json.dumps({"dns_config": {"only_passing": "yes"}}))
    proc = subprocess.run([sys.executable, "-m", "dnsdisco", "agent", "-dev", "-config-dir", str(conf)],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert proc.returncode == 1
    assert "agent.json: key 'dns_config.only_passing'" in proc.stderr


def test_kill_9_loses_no_acknowledged_registration(tmp_path):
    data = tmp_path / "data"
    agent = AgentProcess(["-data-dir", str(data)])
    acked: list[str] = []
    try:
        agent.wait_ready()
        base = f"http://127.0.0.1:{agent.http_port}"

        async def write_until_killed() -> int:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"{base}/v1/catalog/services") as r:
                    first_index = int(r.headers["X-Consul-Index"])
                for i in range(400):
                    body = {"Name": f"svc{i}", "ID": f"svc{i}", "Address": f"10.2.{i // 250}.{i % 250 + 1}"}
                    try:
                        async with http.put(f"{base}/v1/agent/service/register", json=body) as r:
                            if r.status == 200:
                                acked.append(f"svc{i}")
                    except aiohttp.ClientError:
                        break
                    if i == 150:
                        os.kill(agent.proc.pid, signal.SIGKILL)
                return first_index

        first_index = asyncio.run(write_until_killed())
        agent.proc.wait(10)
    finally:
        agent.stop()
    assert len(acked) >= 150

    again = AgentProcess(["-data-dir", str(data)])
    try:
        again.wait_ready()

        async def check() -> int:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{again.http_port}/v1/agent/services") as r:
                    services = await r.json()
                async with http.get(f"http://127.0.0.1:{again.http_port}/v1/catalog/services") as r:
                    index = int(r.headers["X-Consul-Index"])
            missing = [name for name in acked if name not in services]
            assert not missing, f"acknowledged but lost after kill -9: {missing}"
            return index

        index = asyncio.run(check())
        assert index > first_index + len(acked) - 1  # the index kept growing across the crash
        wait_dns(again.dns_port, f"{acked[-1]}.service.consul", {f"10.2.{(len(acked) - 1) // 250}.{(len(acked) - 1) % 250 + 1}"})
    finally:
        again.stop()


async def test_agent_forwards_other_names_through_its_recursor(tmp_path):
    from tests.integration.test_recursor import FakeUpstream

    upstream = await FakeUpstream(ip="192.0.2.7").start()
    try:
        cfg = configmod.load(overrides={"node_name": "node1", "ports": {"http": -1, "dns": 0},
                                        "recursors": [upstream.addr]}, dev=True)
        agent = Agent(cfg)
        await agent.start()
        try:
            reply = await asyncio.to_thread(query, agent.dns_port, "www.example.org")
            assert addresses(reply) == {"192.0.2.7"}
            assert reply.flags & dns.flags.RA and not reply.flags & dns.flags.AA
            # Catalog names still come from the catalog, never from the recursor.
            consul = await asyncio.to_thread(query, agent.dns_port, "consul.service.consul")
            assert addresses(consul) == {"127.0.0.1"} and consul.flags & dns.flags.AA
        finally:
            await agent.stop()
    finally:
        await upstream.stop()


async def test_mirror_mode_agent_serves_dns_from_an_upstream_catalog(tmp_path):
    # Agent A runs the embedded catalog and stands in for a Consul cluster; agent B mirrors it.
    upstream = Agent(configmod.load(overrides={"node_name": "server1", "ports": {"http": 0, "dns": -1}},
                                    dev=True))
    await upstream.start()
    try:
        base = f"http://127.0.0.1:{upstream.http_port}"
        async with aiohttp.ClientSession() as http:
            async with http.put(f"{base}/v1/agent/service/register",
                                json={"Name": "web", "ID": "web-1", "Address": "10.9.0.1", "Port": 80}) as r:
                assert r.status == 200
            cfg = configmod.load(overrides={"node_name": "mirror1", "ports": {"http": 0, "dns": 0},
                                            "dns_workers": 1,
                                            "upstream": {"address": base, "query_interval": "0s"}},
                                 environ={})
            assert cfg.upstream is not None and cfg.data_dir == ""
            mirror = Agent(cfg)
            await mirror.start()
            try:
                assert mirror.store is None and await mirror.mirror.wait_synced(10)
                assert addresses(await asyncio.to_thread(query, mirror.dns_port, "web.service.consul")) == {"10.9.0.1"}
                async with http.get(f"http://127.0.0.1:{mirror.http_port}/ready") as r:
                    assert r.status == 200, await r.text()
                async with http.get(f"http://127.0.0.1:{mirror.http_port}/v1/catalog/services") as r:
                    assert r.status == 404  # the mirror serves DNS, not the catalog API

                async with http.put(f"{base}/v1/agent/service/register",
                                    json={"Name": "web", "ID": "web-2", "Address": "10.9.0.2", "Port": 80}) as r:
                    assert r.status == 200
                wanted = {"10.9.0.1", "10.9.0.2"}
                deadline = time.monotonic() + 5
                got: set[str] = set()
                while time.monotonic() < deadline and got != wanted:
                    got = addresses(await asyncio.to_thread(query, mirror.dns_port, "web.service.consul"))
                    await asyncio.sleep(0.02)
                assert got == wanted
            finally:
                await mirror.stop()
    finally:
        await upstream.stop()
