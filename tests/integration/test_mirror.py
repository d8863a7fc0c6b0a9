"""Mirror mode end to end: ``dnsdisco.sync.Mirror`` following a second dnsdisco agent's embedded
catalog over loopback - the stand-in Consul, which speaks the same blocking-query API - and
feeding a real :class:`AnswerTable`, queried as the DNS server queries it.

Covered: a registration appears and a deregistration disappears; health flaps; the mirror's
full delta equals the embedded store's own (``Store.full_delta``) for a varied catalog; an
upstream restarted with a lower index (a fresh ``-dev`` agent on the same port) is reloaded;
an upstream that dies is served stale - forever by default, SERVFAIL after ``max_stale`` - and
followed again when it returns; several datacenters behind a small ``?dc=`` router; 5,000
services / 20,000 instances loaded over a handful of connections (timings printed, not
asserted).
"""

from __future__ import annotations

import asyncio
import gc
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import aiohttp
import dns.message
import dns.rcode
import pytest
from aiohttp import web

from dnsdisco.catalog.definition import RegisterRequest
from dnsdisco.catalog.health import HealthChecker
from dnsdisco.catalog.model import CRITICAL, PASSING, CatalogDelta, Check, CheckDefinition, Node, Service
from dnsdisco.catalog.store import Store
from dnsdisco.config import Config
from dnsdisco.dns.message import Qtype
from dnsdisco.dns.table import AnswerTable
from dnsdisco.http.app import make_app
from dnsdisco.sync.mirror import DEFAULT_MAX_STALE, Mirror
from dnsdisco.sync.upstream import UpstreamConfig
from tests.integration.conftest import HttpAgent
from tests.unit.test_table import ask

pytestmark = pytest.mark.integration

# Fast loop knobs: short blocking waits, no rate limit, quick retries, no periodic resync.
FAST = {"wait": 1.0, "query_interval": 0.0, "backoff_min": 0.01, "backoff_max": 0.2, "resync_interval": 0.0}


# -- the stand-in Consul ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Upstream:
    """A dnsdisco agent's embedded catalog and HTTP API on 127.0.0.1:*port*, start/stop-able."""

    def __init__(self, *, port: int = 0, datacenter: str = "dc1", node_name: str = "consul-1") -> None:
        self.port = port
        self.datacenter = datacenter
        self.node_name = node_name
        self.agent: HttpAgent | None = None
        self._runner: web.AppRunner | None = None

    @property
    def store(self) -> Store:
        assert self.agent is not None
        return self.agent.store

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Upstream:
        config = Config(datacenter=self.datacenter, node_name=self.node_name)
        store = Store(datacenter=self.datacenter, node_name=self.node_name, node_address="127.0.0.1",
                      data_dir=None)
        await store.open()
        health = HealthChecker(store)
        await health.start()
        runner = web.AppRunner(make_app(store, health, config), handler_cancellation=True, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self.port = runner.addresses[0][1]
        self._runner = runner
        self.agent = HttpAgent(store, health, self.base, self.port, aiohttp.ClientSession())
        return self

    async def stop(self) -> None:
        assert self.agent is not None and self._runner is not None
        await self.agent.session.close()
        await self._runner.cleanup()
        await self.agent.health.stop()
        await self.agent.store.close()
        self.agent = None
        self._runner = None

    async def put(self, path: str, body: Any = None) -> None:
        assert self.agent is not None
        r = await self.agent.put(path, body)
        assert r.status == 200, (path, r.status, r.text)


@asynccontextmanager
async def upstream(**kw: Any) -> AsyncIterator[Upstream]:
    up = await Upstream(**kw).start()
    try:
        yield up
    finally:
        if up.agent is not None:
            await up.stop()


# -- the follower: a Mirror feeding an AnswerTable -------------------------------------------------


class Follower:
    """A mirror of *address* feeding a table, as mirror mode wires them (``on_delta`` =
    ``table.apply``, ``on_stale`` = ``table.set_stale``); records when each service changed."""

    def __init__(self, address: str, *, datacenter: str = "dc1", max_stale: float = DEFAULT_MAX_STALE,
                 seed: Any = None, **knobs: Any) -> None:
        self.table = AnswerTable(Config(datacenter=datacenter, node_name="mirror"))
        self.deltas: list[CatalogDelta] = []
        self.seen: dict[tuple[str, str], float] = {}  # (dc, service) -> perf_counter of its last delta
        up = UpstreamConfig(address=address, **{**FAST, **knobs})
        self.mirror = Mirror(up, local_datacenter=datacenter, on_delta=self._on_delta,
                             on_stale=self.table.set_stale, max_stale=max_stale, seed=seed)

    def _on_delta(self, delta: CatalogDelta) -> None:
        now = time.perf_counter()
        self.table.apply(delta)
        self.deltas.append(delta)
        for name in delta.services:
            self.seen[(delta.datacenter, name)] = now

    async def __aenter__(self) -> Follower:
        await self.mirror.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.mirror.stop()

    def ask(self, name: str, qtype: int = Qtype.A) -> dns.message.Message:
        return ask(self.table, name, qtype)

    def answer(self, name: str, qtype: int = Qtype.A) -> tuple[str, set[str]]:
        """(rcode text, the answer's rdata as text) for *name*."""
        msg = self.ask(name, qtype)
        return dns.rcode.to_text(msg.rcode()), {rd.to_text() for rrset in msg.answer for rd in rrset}


async def until(pred: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


def normalized(delta: CatalogDelta) -> tuple[dict, dict]:
    """A full delta's catalog, minus what cannot or need not match: the delta's own index, and
    the check thresholds (``success_before_passing`` ...) that Consul's HealthCheck JSON does not
    carry (they live in the agent's CheckType), so no mirror can see them."""
    def check(c: Check) -> Check:
        d = replace(c.definition, success_before_passing=0, failures_before_warning=0, failures_before_critical=0)
        return replace(c, definition=d)

    services = {k: tuple(replace(e, checks=tuple(check(c) for c in e.checks)) for e in v)
                for k, v in delta.services.items()}
    return services, dict(delta.nodes)


async def same_as_upstream(f: Follower, up: Upstream, timeout: float = 5.0) -> None:
    """Wait until the mirror's full delta equals the upstream store's, then assert it (for a diff)."""
    try:
        await until(lambda: normalized(f.mirror.full_delta()) == normalized(up.store.full_delta()), timeout,
                    "the mirror to equal the upstream")
    except AssertionError:
        pass
    got, want = normalized(f.mirror.full_delta()), normalized(up.store.full_delta())
    assert got[1] == want[1]
    assert sorted(got[0]) == sorted(want[0])
    for name in want[0]:
        assert got[0][name] == want[0][name], name


# -- registration, deregistration, health ---------------------------------------------------------


async def test_register_appears_deregister_disappears() -> None:
    async with upstream() as up, Follower(up.base) as f:
        assert await f.mirror.wait_synced(5)
        assert f.answer("web.service.consul") == ("NXDOMAIN", set())
        # The agent's own node answers NS, as Consul servers do: the `consul` service is mirrored.
        assert f.answer("consul.service.consul")[0] == "NOERROR"
        assert f.answer("consul.", Qtype.NS)[1] == {"consul-1.node.dc1.consul."}

        await up.put("/v1/catalog/register", {
            "Node": "ext-1", "Address": "10.1.0.5", "NodeMeta": {"rack": "a1"},
            "Service": {"ID": "web-1", "Service": "web", "Port": 8080, "Tags": ["blue"]},
        })
        await until(lambda: f.answer("web.service.consul") == ("NOERROR", {"10.1.0.5"}), what="web to appear")
        assert f.answer("blue.web.service.consul")[1] == {"10.1.0.5"}
        srv = f.answer("web.service.consul", Qtype.SRV)[1]
        assert srv == {"1 1 8080 ext-1.node.dc1.consul."}
        assert f.answer("ext-1.node.consul", Qtype.TXT)[1] == {'"rack=a1"'}

        # A second instance on another node: both addresses.
        await up.put("/v1/catalog/register", {
            "Node": "ext-2", "Address": "10.1.0.6",
            "Service": {"ID": "web-2", "Service": "web", "Port": 8080},
        })
        await until(lambda: f.answer("web.service.consul")[1] == {"10.1.0.5", "10.1.0.6"}, what="second instance")

        await up.put("/v1/catalog/deregister", {"Node": "ext-1", "ServiceID": "web-1"})
        await until(lambda: f.answer("web.service.consul")[1] == {"10.1.0.6"}, what="web-1 to go")
        await up.put("/v1/catalog/deregister", {"Node": "ext-2"})  # the node and all on it
        await until(lambda: f.answer("web.service.consul") == ("NXDOMAIN", set()), what="web to go")
        await until(lambda: f.answer("ext-2.node.consul")[0] == "NXDOMAIN", what="ext-2 to go")
        await same_as_upstream(f, up)


async def test_health_flaps() -> None:
    async with upstream() as up, Follower(up.base) as f:
        await up.put("/v1/agent/service/register", {
            "Name": "api", "ID": "api-1", "Address": "10.2.0.1", "Port": 9000,
            "Weights": {"Passing": 10, "Warning": 2}, "Check": {"CheckID": "api-ttl", "TTL": "60s"},
        })
        assert await f.mirror.wait_synced(5)
        # A new TTL check starts critical: the instance is not served.
        assert f.answer("api.service.consul") == ("NXDOMAIN", set())
        await up.put("/v1/agent/check/pass/api-ttl")
        await until(lambda: f.answer("api.service.consul") == ("NOERROR", {"10.2.0.1"}), what="passing")
        await up.put("/v1/agent/check/warn/api-ttl?note=slow")
        # Warning is served (Consul's DNS keeps it), with the warning weight.
        await until(lambda: [r.split()[:3] for r in f.answer("api.service.consul", Qtype.SRV)[1]]
                    == [["1", "2", "9000"]], what="the warning weight")
        await up.put("/v1/agent/check/fail/api-ttl")
        await until(lambda: f.answer("api.service.consul")[0] == "NXDOMAIN", what="critical")
        await up.put("/v1/agent/check/pass/api-ttl")
        await until(lambda: f.answer("api.service.consul")[0] == "NOERROR", what="passing again")
        # A node-level check (maintenance) takes every service on the node out, as in Consul.
        await up.put("/v1/agent/maintenance?enable=true&reason=patching")
        await until(lambda: f.answer("api.service.consul")[0] == "NXDOMAIN", what="node maintenance")
        await up.put("/v1/agent/maintenance?enable=false")
        await until(lambda: f.answer("api.service.consul")[0] == "NOERROR", what="maintenance off")
        await up.put("/v1/agent/service/maintenance/api-1?enable=true")
        await until(lambda: f.answer("api.service.consul")[0] == "NXDOMAIN", what="service maintenance")
        await up.put("/v1/agent/service/maintenance/api-1?enable=false")
        await until(lambda: f.answer("api.service.consul")[0] == "NOERROR", what="service maintenance off")
        await same_as_upstream(f, up)


# -- same deltas as the embedded catalog -------------------------------------------------------------


async def register_varied(up: Upstream, part: int) -> None:
    """A catalog exercising every field the DNS side reads."""
    if part == 0:
        await up.put("/v1/agent/service/register", {
            "Name": "web", "ID": "web-a", "Address": "10.3.0.1", "Port": 80, "Tags": ["v1", "edge"],
            "Meta": {"team": "frontend"}, "Weights": {"Passing": 3, "Warning": 1},
            "TaggedAddresses": {"lan_ipv4": {"Address": "10.3.0.1", "Port": 80},
                                "wan_ipv4": {"Address": "203.0.113.1", "Port": 8080}},
            "Checks": [{"CheckID": "web-a-ttl", "TTL": "30s", "Notes": "smoke"},
                       {"CheckID": "web-a-thresholds", "TTL": "30s", "SuccessBeforePassing": 2,
                        "Status": "passing"}],
        })
        await up.put("/v1/agent/service/register", {"Name": "Web", "ID": "web-upper", "Port": 81})  # same DNS name
        await up.put("/v1/catalog/register", {
            "Node": "legacy", "Address": "db.legacy.example.", "NodeMeta": {"os": "solaris", "dc-role": "db"},
            "TaggedAddresses": {"wan": "198.51.100.20", "lan_ipv6": "2001:db8::20"},
            "Service": {"ID": "db-1", "Service": "db", "Port": 5432, "Tags": ["primary"], "EnableTagOverride": True},
            "Checks": [
                {"CheckID": "db-probe", "Name": "probe", "Status": "warning", "ServiceID": "db-1",
                 "Output": "replication lag 3s",
                 "Definition": {"HTTP": "http://db.legacy.example:8008/health", "Interval": "15s",
                                "Timeout": "2s", "Header": {"X-Env": ["prod", "eu"]}, "Method": "GET"}},
                {"CheckID": "node-ping", "Name": "ping", "Status": "passing",
                 "Definition": {"TCP": "db.legacy.example:22", "Interval": "30s"}},
            ],
        })
    else:
        await up.put("/v1/catalog/register", {
            "Node": "cache-node", "Address": "10.3.0.9",
            "Service": {"ID": "redis", "Service": "redis", "Address": "redis.internal.example.", "Meta": {},
                        "SocketPath": "/run/redis.sock"},  # no port: omitted on the wire
        })
        await up.put("/v1/catalog/register", {
            "Node": "v6-node", "Address": "2001:db8::99", "TaggedAddresses": {"lan_ipv4": "10.3.0.99"},
            "Service": {"ID": "api", "Service": "api", "Port": 443, "Kind": "",
                        "TaggedAddresses": {"lan_ipv6": {"Address": "2001:db8::100", "Port": 443}}},
            "Check": {"CheckID": "api-c", "Name": "api", "Status": "critical", "ServiceID": "api",
                      "Definition": {"GRPC": "[2001:db8::100]:443", "Interval": "5s"}},
        })
        await up.put("/v1/catalog/register", {"Node": "bare-node", "Address": "10.3.0.50"})  # no services


@pytest.mark.parametrize("hints", [True, False], ids=["dnsdisco-hints", "consul-rules"])
async def test_same_delta_as_embedded_store(hints: bool) -> None:
    async with upstream() as up:
        await register_varied(up, 0)
        async with Follower(up.base, change_hints=hints) as f:
            assert await f.mirror.wait_synced(5)
            # The first load: a full delta equal to the store's own.
            assert f.deltas[0].full
            assert normalized(f.deltas[0]) == normalized(up.store.full_delta())
            # Then changes of every kind, followed incrementally.
            await register_varied(up, 1)
            await same_as_upstream(f, up)
            await up.put("/v1/agent/check/pass/web-a-ttl?note=ok")  # a check's status and output
            await same_as_upstream(f, up)
            await up.put("/v1/agent/check/pass/web-a-ttl?note=still-ok")  # passing -> passing: output only
            await up.put("/v1/catalog/register", {  # node meta and tagged addresses change
                "Node": "legacy", "Address": "db.legacy.example.", "NodeMeta": {"os": "illumos"},
                "TaggedAddresses": {"wan": "198.51.100.21"}, "SkipNodeUpdate": False})
            await up.put("/v1/catalog/register", {  # an instance without checks changes its port
                "Node": "cache-node", "Address": "10.3.0.9",
                "Service": {"ID": "redis", "Service": "redis", "Address": "redis.internal.example.", "Port": 6380}})
            await up.put("/v1/catalog/deregister", {"Node": "v6-node", "CheckID": "api-c"})  # a check goes
            await up.put("/v1/agent/service/deregister/web-upper")
            await same_as_upstream(f, up)
            # Instances whose checks were all passing go: nothing in the non-passing lists shows it.
            await up.put("/v1/catalog/register", {"Node": "n9", "Address": "10.3.0.90", "Service": {
                "ID": "q-1", "Service": "queue", "Port": 5672}, "Check": {
                "CheckID": "q-c", "Name": "q", "Status": "passing", "ServiceID": "q-1"}})
            await up.put("/v1/catalog/register", {"Node": "n10", "Address": "10.3.0.91", "Service": {
                "ID": "q-2", "Service": "queue", "Port": 5672}, "Check": {
                "CheckID": "q-c", "Name": "q", "Status": "passing", "ServiceID": "q-2"}})
            await until(lambda: len(f.answer("queue.service.consul")[1]) == 2, what="queue")
            await up.put("/v1/catalog/deregister", {"Node": "n9", "ServiceID": "q-1"})
            await until(lambda: f.answer("queue.service.consul")[1] == {"10.3.0.91"}, what="q-1 to go")
            await same_as_upstream(f, up)
            status = f.mirror.status()["datacenters"]["dc1"]
            if hints:
                # The upstream named the services each check write bore on: no read of every check.
                assert status["hinted_checks_moves"] >= 1 and status["all_checks_reads"] == 0
            else:
                assert status["all_checks_reads"] >= 1 and status["node_reads"] >= 1
            # And the DNS answers agree with a table fed straight from the store.
            direct = AnswerTable(Config(datacenter="dc1", node_name="mirror"))
            direct.apply(up.store.full_delta())
            for name, qtype in [("web.service.consul", Qtype.SRV), ("db.service.consul", Qtype.A),
                                ("legacy.node.consul", Qtype.TXT), ("api.service.consul", Qtype.AAAA),
                                ("redis.service.consul", Qtype.SRV), ("consul.", Qtype.NS)]:
                got, want = f.answer(name, qtype), (
                    dns.rcode.to_text(ask(direct, name, qtype).rcode()),
                    {rd.to_text() for rrset in ask(direct, name, qtype).answer for rd in rrset})
                assert got == want, name


# -- restarts, outages, staleness -----------------------------------------------------------------------


async def test_upstream_restart_with_lower_index_reloads() -> None:
    port = free_port()
    up = await Upstream(port=port).start()
    for i in range(30):
        await up.put("/v1/catalog/register", {"Node": f"old-{i}", "Address": f"10.4.0.{i + 1}",
                                              "Service": {"ID": "old", "Service": "old", "Port": 1}})
    high = up.store.index
    async with Follower(up.base) as f:
        assert await f.mirror.wait_synced(5)
        assert f.answer("old.service.consul")[0] == "NOERROR"
        await up.stop()
        # A fresh -dev agent on the same port: a new Raft log, a much lower index.
        up = await Upstream(port=port, node_name="consul-2").start()
        await up.put("/v1/catalog/register", {"Node": "new-1", "Address": "10.4.1.1",
                                              "Service": {"ID": "new", "Service": "new", "Port": 2}})
        assert up.store.index < high
        await until(lambda: f.answer("new.service.consul") == ("NOERROR", {"10.4.1.1"}), what="the new catalog")
        await until(lambda: f.answer("old.service.consul")[0] == "NXDOMAIN", what="the old catalog to go")
        await same_as_upstream(f, up)
        status = f.mirror.status()["datacenters"]["dc1"]
        assert status["full_loads"] >= 2
        assert sum(w["resets"] for w in status["watches"].values()) >= 1
        assert f.answer("consul.", Qtype.NS)[1] == {"consul-2.node.dc1.consul."}
    await up.stop()


async def test_upstream_dies_serves_stale_then_servfail_after_max_stale() -> None:
    port = free_port()
    up = await Upstream(port=port).start()
    await up.put("/v1/catalog/register", {"Node": "n1", "Address": "10.5.0.1",
                                          "Service": {"ID": "web", "Service": "web", "Port": 80}})
    async with Follower(up.base) as forever, Follower(up.base, max_stale=1.0) as bounded:
        assert await forever.mirror.wait_synced(5) and await bounded.mirror.wait_synced(5)
        assert bounded.mirror.status()["wait_seconds"] == 1.0  # blocking waits kept under max_stale
        await up.stop()
        t0 = time.monotonic()
        # Right after the loss both still answer from their last good copy.
        await until(lambda: bounded.mirror.status()["datacenters"]["dc1"]["watches"]["services"]["failing"],
                    what="the mirror to notice")
        assert forever.answer("web.service.consul") == ("NOERROR", {"10.5.0.1"})
        assert bounded.answer("web.service.consul") == ("NOERROR", {"10.5.0.1"})
        assert bounded.mirror.synced and not bounded.mirror.stale
        # Past max_stale the bounded one answers SERVFAIL for catalog names; the default serves on.
        await until(lambda: bounded.answer("web.service.consul")[0] == "SERVFAIL", timeout=5, what="SERVFAIL")
        assert time.monotonic() - t0 >= 0.9
        assert bounded.mirror.stale and bounded.mirror.age() > 1.0
        ok, text = bounded.mirror.ready()
        assert not ok and "past max_stale" in text
        ok, text = forever.mirror.ready()
        assert ok and text.startswith("ready: mirroring dc1")
        assert bounded.answer("consul.", Qtype.SOA)[0] == "SERVFAIL"
        assert forever.answer("web.service.consul") == ("NOERROR", {"10.5.0.1"})
        status = forever.mirror.status()
        assert status["synced"] and not status["stale"] and status["age_seconds"] > 0.9
        assert status["last_sync"] <= time.time() - 0.9
        # The upstream comes back (empty: a fresh -dev agent): both follow it again.
        up = await Upstream(port=port).start()
        await until(lambda: bounded.answer("web.service.consul")[0] == "NXDOMAIN", what="fresh again")
        await until(lambda: forever.answer("web.service.consul")[0] == "NXDOMAIN", what="fresh again")
        assert not bounded.mirror.stale and bounded.mirror.age() < 1.0
    await up.stop()


async def test_servfail_until_the_first_full_sync() -> None:
    port = free_port()
    async with Follower(f"http://127.0.0.1:{port}") as f:  # nothing listens there yet
        await asyncio.sleep(0.3)
        assert f.answer("web.service.consul")[0] == "SERVFAIL"
        assert not f.mirror.synced and f.mirror.last_sync is None
        status = f.mirror.status()
        assert status["synced"] is False and status["errors"] > 0
        ok, text = f.mirror.ready()
        assert not ok and "first sync" in text and "Connect" in text
        assert "Connect" in status["datacenters"]["dc1"]["watches"]["services"]["last_error"]
        async with upstream(port=port) as up:
            await up.put("/v1/catalog/register", {"Node": "n1", "Address": "10.6.0.1",
                                                  "Service": {"ID": "web", "Service": "web", "Port": 80}})
            await until(lambda: f.answer("web.service.consul") == ("NOERROR", {"10.6.0.1"}), what="first sync")
            assert f.mirror.synced


# -- several datacenters -------------------------------------------------------------------------------


class Federation:
    """One address answering for several datacenters, as a Consul agent does over the WAN: a
    small router sending each request to the stand-in of its ``?dc=`` (default: the first).
    Records what the mirror asked, to check the protocol on the wire."""

    def __init__(self, dcs: dict[str, Upstream], *, missing: tuple[str, ...] = ()) -> None:
        self.dcs = dcs
        self.missing = missing  # path prefixes answered 404, as a Consul that predates them
        self.local = next(iter(dcs))
        self.requests: list[tuple[str, dict[str, str], str | None]] = []
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.base = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        self.requests.append((request.path, dict(query), request.headers.get("X-Consul-Token")))
        if request.path == "/v1/catalog/datacenters":
            return web.json_response(list(self.dcs))
        if request.path.startswith(self.missing):
            return web.Response(status=404, text="404 page not found")
        dc = query.pop("dc", self.local)
        target = self.dcs.get(dc)
        if target is None:
            return web.Response(status=500, text="No path to datacenter")
        assert self._session is not None
        async with self._session.get(target.base + request.path, params=query) as r:
            body = await r.read()
            headers = {k: v for k, v in r.headers.items() if k.startswith("X-Consul-")}
            return web.Response(status=r.status, body=body, headers=headers, content_type="application/json")

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.base = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        assert self._runner is not None and self._session is not None
        await self._runner.cleanup()
        await self._session.close()


async def test_several_datacenters() -> None:
    async with upstream(datacenter="dc1", node_name="c1") as dc1, upstream(datacenter="dc2", node_name="c2") as dc2:
        await dc1.put("/v1/catalog/register", {"Node": "a", "Address": "10.7.1.1",
                                               "Service": {"ID": "web", "Service": "web", "Port": 80}})
        await dc2.put("/v1/catalog/register", {"Node": "b", "Address": "10.7.2.1",
                                               "Service": {"ID": "web", "Service": "web", "Port": 80}})
        fed = Federation({"dc1": dc1, "dc2": dc2})
        await fed.start()
        try:
            async with Follower(fed.base, datacenters=("*",), token="s3cr3t") as f:
                assert await f.mirror.wait_synced(5)
                await until(lambda: f.mirror.all_synced, what="dc2 to load")
                assert sorted(f.mirror.datacenters) == ["dc1", "dc2"]
                assert f.answer("web.service.consul")[1] == {"10.7.1.1"}
                assert f.answer("web.service.dc1.consul")[1] == {"10.7.1.1"}
                assert f.answer("web.service.dc2.consul")[1] == {"10.7.2.1"}
                assert f.answer("b.node.dc2.consul")[1] == {"10.7.2.1"}
                assert f.answer("b.node.consul")[0] == "NXDOMAIN"  # not in the local datacenter
                # Deltas carry their datacenter; a change in dc2 reaches dc2's names only.
                await dc2.put("/v1/catalog/register", {"Node": "b2", "Address": "10.7.2.2",
                                                       "Service": {"ID": "web", "Service": "web", "Port": 80}})
                await until(lambda: f.answer("web.service.dc2.consul")[1] == {"10.7.2.1", "10.7.2.2"},
                            what="dc2 change")
                assert f.answer("web.service.consul")[1] == {"10.7.1.1"}
                assert f.mirror.full_delta("dc2").datacenter == "dc2"
                assert normalized(f.mirror.full_delta("dc2")) == normalized(dc2.store.full_delta())
                assert {d.datacenter for d in f.deltas} == {"dc1", "dc2"}
        finally:
            await fed.stop()
        # On the wire: every read is ?stale with the token in the header (never the URL), the
        # remote datacenter is named with ?dc=, and index=0 is never sent.
        reads = [(p, q, t) for p, q, t in fed.requests if p != "/v1/catalog/datacenters"]
        assert reads and all("stale" in q and "token" not in q and t == "s3cr3t" for _p, q, t in reads)
        assert all(q.get("index") != "0" for _p, q, _t in reads)
        assert all("wait" in q for _p, q, _t in reads if "index" in q)
        assert {q.get("dc") for _p, q, _t in reads} == {None, "dc2"}


async def test_explicit_datacenter_list_and_unreachable_remote() -> None:
    async with upstream(datacenter="dc1") as dc1:
        fed = Federation({"dc1": dc1})  # dc3 is configured but the router has no path to it
        await fed.start()
        try:
            async with Follower(fed.base, datacenters=("dc3",)) as f:
                assert await f.mirror.wait_synced(5)  # the local one is enough to serve
                assert not f.mirror.all_synced
                # Names in a datacenter not loaded yet are not known: SERVFAIL, not NXDOMAIN.
                assert f.answer("web.service.dc3.consul")[0] == "SERVFAIL"
                assert f.answer("consul.service.consul")[0] == "NOERROR"
                status = f.mirror.status()["datacenters"]["dc3"]
                assert status["synced"] is False and status["stale"] is True
                await until(lambda: "No path to datacenter" in
                            f.mirror.status()["datacenters"]["dc3"]["watches"]["nodes"]["last_error"],
                            what="the error to show")
        finally:
            await fed.stop()


# -- scale ---------------------------------------------------------------------------------------------


async def test_5000_services_20000_instances() -> None:
    services, per_service, nodes = 5000, 4, 1000
    async with upstream() as up:
        store = up.store
        t = time.perf_counter()
        for i in range(services * per_service):
            node = Node(name=f"node{i % nodes}", address=f"10.{8 + i % nodes // 250}.{i % nodes % 250}.1",
                        datacenter="dc1")
            svc = Service(node=node.name, id=f"s{i % services}-{i // services}", name=f"s{i % services}",
                          port=8000 + i % 100, tags=("v1",))
            chk = Check(node=node.name, check_id=f"c{i}", name="alive", status=PASSING, service_id=svc.id,
                        definition=CheckDefinition(ttl=30.0))
            await store.catalog_register(RegisterRequest(datacenter="dc1", node=node, service=svc, checks=(chk,)))
        registered = time.perf_counter() - t

        # Waits as long as a real deployment would use (default 5 min): a short one only makes the
        # stand-in re-send its 20,000 checks every time it runs out.
        async with Follower(up.base, fetch_concurrency=8, wait=60.0) as f:
            t = time.perf_counter()
            assert await f.mirror.wait_synced(60)
            load = time.perf_counter() - t
            gc.collect()
            gc.freeze()  # as the agent does after its first load (a big heap stalls on full GCs)
            try:
                status = f.mirror.status()
                dc = status["datacenters"]["dc1"]
                assert dc["services"] == services + 1 and dc["instances"] == services * per_service + 1
                # The connections held do not grow with the catalog: 4 watches + the read pool.
                assert status["connections_opened"] <= status["max_connections"] == 4 + 8 + 1

                async def change(label: str, register: RegisterRequest, key: str) -> float:
                    f.seen.pop(("dc1", key), None)
                    t0 = time.perf_counter()
                    await store.catalog_register(register)
                    await until(lambda: ("dc1", key) in f.seen, timeout=20, what=label)
                    return f.seen[("dc1", key)] - t0

                flaps = []
                for j in range(12):
                    i = (j * 397) % (services * per_service)
                    node = f"node{i % nodes}"
                    old = store.check(node, f"c{i}")
                    assert old is not None
                    flipped = replace(old, status=CRITICAL if old.status == PASSING else PASSING)
                    flaps.append(await change("flap", RegisterRequest(
                        datacenter="dc1", node=store.node(node), skip_node_update=True, checks=(flipped,)),
                        f"s{i % services}"))
                # An instance without checks changes its port: nothing but the services index moves,
                # so the mirror re-reads every service (skipping the decode of unchanged ones).
                bare = Service(node="node7", id="bare", name="bare", port=1)
                await store.catalog_register(RegisterRequest(datacenter="dc1", node=store.node("node7"),
                                                             skip_node_update=True, service=bare))
                await until(lambda: ("dc1", "bare") in f.seen, timeout=20, what="bare service")
                sweep = await change("port change", RegisterRequest(
                    datacenter="dc1", node=store.node("node7"), skip_node_update=True,
                    service=replace(bare, port=2)), "bare")
                await same_as_upstream(f, up, timeout=20)
            finally:
                gc.unfreeze()
        flaps.sort()
        print(f"\n5000 services / 20000 instances / {nodes} nodes: registered upstream in {registered:.2f}s; "
              f"mirror first full sync {load:.2f}s ({dc['service_reads']} reads, "
              f"{status['connections_opened']} connections); check flap -> delta p50 {flaps[len(flaps) // 2]:.3f}s "
              f"max {flaps[-1]:.3f}s over {len(flaps)}; unexplained port change (sweep) -> delta {sweep:.3f}s")


# -- every kind of change, at a moderate scale ------------------------------------------------------


@pytest.mark.parametrize("hints", [True, False], ids=["dnsdisco-hints", "consul-rules"])
async def test_every_kind_of_change_shows_at_500_services(hints: bool) -> None:
    """500 services x 4 instances: each kind of change reaches the table. Against a dnsdisco
    upstream the services written are named by it, so nothing is swept; followed by Consul's
    rules only (hints off), the changes nothing else explains are found by a sweep. The bound
    is loose (a loaded 2-core CI box); bench/mirror_sync.py has the figures at 5,000."""
    services, per, nodes = 500, 4, 100
    bound = 10.0
    async with upstream() as up:
        store = up.store
        for k in range(services):
            for j in range(per):
                n = (k * per + j) % nodes
                node = Node(name=f"node{n}", address=f"10.9.{n}.1", datacenter="dc1")
                svc = Service(node=node.name, id=f"s{k}-{j}", name=f"s{k}", port=8000 + j, tags=("v1",))
                chk = Check(node=node.name, check_id=f"c{k}-{j}", name="alive", status=PASSING,
                            service_id=svc.id, definition=CheckDefinition(ttl=30.0))
                await store.catalog_register(RegisterRequest(datacenter="dc1", node=node, service=svc,
                                                             checks=(chk,)))
        async with Follower(up.base, change_hints=hints, wait=60.0) as f:
            assert await f.mirror.wait_synced(30)

            def ports(name: str) -> set[int]:
                return {int(r.split()[2]) for r in f.answer(name, Qtype.SRV)[1]}

            async def change(label: str, path: str, body: dict, pred: Callable[[], bool]) -> float:
                t0 = time.perf_counter()
                await up.put(path, body)
                await until(pred, timeout=bound, what=label)
                return time.perf_counter() - t0

            x = {"Node": "node7", "Address": "10.9.7.1", "SkipNodeUpdate": True}
            taken = {
                "register with check": await change("register with check", "/v1/catalog/register", {**x, "Service": {
                    "ID": "xc", "Service": "s42", "Port": 9001}, "Check": {
                    "CheckID": "xc", "Name": "x", "Status": "passing", "ServiceID": "xc"}},
                    lambda: 9001 in ports("s42.service.consul")),
                "register without check": await change("register without check", "/v1/catalog/register", {
                    **x, "Service": {"ID": "xb", "Service": "s42", "Port": 9002}},
                    lambda: 9002 in ports("s42.service.consul")),
                "port change": await change("port change", "/v1/catalog/register", {
                    **x, "Service": {"ID": "xb", "Service": "s42", "Port": 9003}},
                    lambda: 9003 in ports("s42.service.consul") and 9002 not in ports("s42.service.consul")),
                "tag change": await change("tag change", "/v1/catalog/register", {
                    **x, "Service": {"ID": "xb", "Service": "s42", "Port": 9003, "Tags": ["canary"]}},
                    lambda: ports("canary.s42.service.consul") == {9003}),
                "deregister without check": await change("deregister without check", "/v1/catalog/deregister", {
                    "Node": "node7", "ServiceID": "xb"}, lambda: 9003 not in ports("s42.service.consul")),
                "deregister with check": await change("deregister with check", "/v1/catalog/deregister", {
                    "Node": "node7", "ServiceID": "xc"}, lambda: 9001 not in ports("s42.service.consul")),
                "health flap": await change("health flap", "/v1/catalog/register", {
                    "Node": "node20", "Address": "10.9.20.1", "SkipNodeUpdate": True, "Check": {
                        "CheckID": "c5-0", "Name": "alive", "Status": "critical", "ServiceID": "s5-0"}},
                    lambda: ports("s5.service.consul") == {8001, 8002, 8003}),
                "node address": await change("node address", "/v1/catalog/register", {
                    "Node": "node20", "Address": "10.9.20.2"},
                    lambda: f.answer("node20.node.consul")[1] == {"10.9.20.2"}),
                "node meta": await change("node meta", "/v1/catalog/register", {
                    "Node": "node20", "Address": "10.9.20.2", "NodeMeta": {"rack": "r9"}},
                    lambda: '"rack=r9"' in f.answer("node20.node.consul", Qtype.TXT)[1]),
            }
            await same_as_upstream(f, up, timeout=bound)
            dc = f.mirror.status()["datacenters"]["dc1"]
            if hints:
                # Every services move was named by the upstream: no settle wait, no sweep.
                assert dc["hinted_services_moves"] >= 6 and dc["sweeps"] == 0
                # ... and sent only the changed services, not the list of all 500, with their
                # entries: the registrations needed no read of the service.
                assert dc["services_deltas"] >= 6 and dc["pushed_services"] >= 5
            else:
                assert dc["hinted_services_moves"] == 0 and dc["services_deltas"] == 0 and dc["sweeps"] >= 1
            print(f"\n500 services, hints={hints}: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in taken.items())
                  + f"; sweeps {dc['sweeps']}, state/any reads {dc['all_checks_reads']}")


@pytest.mark.parametrize("node_services", [True, False], ids=["by-node", "consul-before-1.7"])
async def test_consul_rules_sweep_along_nodes_or_services(node_services: bool) -> None:
    """Followed by Consul's rules only (the router below passes no dnsdisco header), a write
    nothing names is found by a sweep: along nodes when there are fewer nodes than services
    (``/v1/catalog/node-services``, one read per node; unchanged bodies are not decoded), along
    services when the upstream lacks that endpoint. An instance registered on a brand-new node
    is found by reading that node, without a sweep."""
    async with upstream() as up:
        for k in range(60):
            for j in range(2):
                n = (k * 2 + j) % 10
                await up.put("/v1/catalog/register", {
                    "Node": f"node{n}", "Address": f"10.9.{n}.1",
                    "Service": {"ID": f"s{k}-{j}", "Service": f"s{k}", "Port": 8000 + j},
                    "Check": {"CheckID": f"c{k}-{j}", "Name": "alive", "Status": "passing",
                              "ServiceID": f"s{k}-{j}"}})
        fed = Federation({"dc1": up}, missing=() if node_services else ("/v1/catalog/node-services",))
        await fed.start()
        try:
            async with Follower(fed.base, wait=30.0) as f:
                assert await f.mirror.wait_synced(10)

                def ports(name: str) -> set[int]:
                    return {int(r.split()[2]) for r in f.answer(name, Qtype.SRV)[1]}

                def dc() -> dict[str, Any]:
                    return f.mirror.status()["datacenters"]["dc1"]

                x = {"Node": "node3", "Address": "10.9.3.1", "SkipNodeUpdate": True}
                await up.put("/v1/catalog/register", {**x, "Service": {"ID": "xb", "Service": "s7", "Port": 9002}})
                await until(lambda: 9002 in ports("s7.service.consul"), timeout=10, what="register without check")
                swept = dc()["sweeps"]
                assert swept >= 1
                before = dc()["service_reads"]
                await up.put("/v1/catalog/register", {**x, "Service": {"ID": "xb", "Service": "s7", "Port": 9003}})
                await until(lambda: ports("s7.service.consul") == {8000, 8001, 9003}, timeout=10, what="port change")
                reads = dc()["service_reads"] - before
                if node_services:
                    # The sweep read 10 nodes and then only the service that changed.
                    assert dc()["node_sweeps"] >= 2 and reads <= 3, dc()
                else:
                    assert dc()["node_sweeps"] == 0 and reads >= 59, dc()
                await up.put("/v1/catalog/deregister", {"Node": "node3", "ServiceID": "s1-1"})
                await until(lambda: ports("s1.service.consul") == {8000}, timeout=10, what="deregister with check")
                # An existing service's instance on a node registered in the same write.
                sweeps = dc()["sweeps"]
                await up.put("/v1/catalog/register", {"Node": "fresh", "Address": "10.9.99.1", "Service": {
                    "ID": "s9-9", "Service": "s9", "Port": 9009}})
                await until(lambda: 9009 in ports("s9.service.consul"), timeout=10, what="a new node's instance")
                await same_as_upstream(f, up, timeout=10)
                if node_services:
                    # Found by reading the new node (the services move waits for the other
                    # lists a moment before it sweeps), not by a sweep.
                    assert dc()["sweeps"] == sweeps, dc()
                    assert any(p == "/v1/catalog/node-services/fresh" for p, _, _ in fed.requests)
                    # The deregistration moved the check lists without changing them, but the
                    # sweep that found it saw its check go: no read of every check followed.
                    await asyncio.sleep(0.3)
                    assert dc()["all_checks_reads"] == 0, dc()
        finally:
            await fed.stop()


async def test_a_write_during_the_first_load_keeps_its_hint() -> None:
    """A hinted reply that arrives while the full load reads from the reply before it must keep
    its own hint: merged onto that unhinted reply it lost it, and the mirror then swept every
    service to find the change (a worker's cold start while registrations still arrive)."""
    from dnsdisco.sync import mirror as mirrormod

    async with upstream() as up:
        for k in range(50):
            node = Node(name=f"node{k}", address=f"10.9.{k}.1", datacenter="dc1")
            await up.store.catalog_register(RegisterRequest(
                datacenter="dc1", node=node, service=Service(node=node.name, id=f"s{k}", name=f"s{k}", port=8000)))
        orig = mirrormod._Datacenter._fetch
        changed = False

        async def slow_first_load(self, todo, *, record=True):  # type: ignore[no-untyped-def]
            nonlocal changed
            if not record and not changed:  # the full load's reads: a port change lands meanwhile
                changed = True
                await up.put("/v1/catalog/register", {"Node": "node3", "Address": "10.9.3.1", "SkipNodeUpdate": True,
                                                      "Service": {"ID": "s3", "Service": "s3", "Port": 9999}})
                await asyncio.sleep(0.3)
            return await orig(self, todo, record=record)

        mirrormod._Datacenter._fetch = slow_first_load  # type: ignore[method-assign]
        try:
            async with Follower(up.base, change_hints=True, wait=60.0) as f:
                assert await f.mirror.wait_synced(10)
                await until(lambda: "9999" in " ".join(f.answer("s3.service.consul", Qtype.SRV)[1]), what="s3 port")
                await asyncio.sleep(0.3)
                dc = f.mirror.status()["datacenters"]["dc1"]
                assert dc["sweeps"] == 0 and dc["service_reads"] < 60, dc
        finally:
            mirrormod._Datacenter._fetch = orig  # type: ignore[method-assign]


async def test_a_seeded_mirror_reads_nothing_and_follows_every_later_write() -> None:
    """A DNS worker's start: the mirror's first load comes from a snapshot of the store (a Seed,
    pickled as the agent writes it), with no reads; its watches start from the snapshot's
    indexes, so writes after it arrive hinted, and it ends equal to the store."""
    import pickle

    from dnsdisco.workers import seed_from_store

    async with upstream() as up:
        await register_varied(up, 0)
        seed = pickle.loads(pickle.dumps(seed_from_store(up.store)))
        # Written after the snapshot and before the mirror starts: must still arrive.
        await up.put("/v1/catalog/register", {"Node": "late", "Address": "10.7.0.1", "Service": {
            "ID": "late-1", "Service": "late", "Port": 81}})
        async with Follower(up.base, seed=seed) as f:
            assert await f.mirror.wait_synced(5)
            dc = f.mirror.status()["datacenters"]["dc1"]
            assert dc["seeded"] and dc["full_loads"] == 1 and dc["first_sync_seconds"] < 2
            await until(lambda: f.answer("late.service.consul")[1] == {"10.7.0.1"}, what="late")
            await register_varied(up, 1)
            await up.put("/v1/agent/check/pass/web-a-ttl?note=seeded")
            await same_as_upstream(f, up)
            dc = f.mirror.status()["datacenters"]["dc1"]
            # Only the services written since the snapshot were read: no sweep, no full read.
            assert dc["sweeps"] == 0 and dc["all_checks_reads"] == 0
            assert dc["service_reads"] < len(up.store.service_names())
