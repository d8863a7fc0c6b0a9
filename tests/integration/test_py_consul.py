"""py-consul 1.8.0, unmodified, against the embedded catalog: the registration and discovery
workflow its users run (register, TTL pass, catalog and health reads with blocking ``index``,
KV with cas/recurse/keys, deregister). py-consul is synchronous, so each call runs in a thread
while the agent serves on this test's event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import consul
import pytest

from tests.integration.conftest import HttpAgent

pytestmark = pytest.mark.integration


@pytest.fixture
def client(http_agent: HttpAgent, monkeypatch) -> consul.Consul:
    for var in ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_SSL", "CONSUL_HTTP_SSL_VERIFY"):
        monkeypatch.delenv(var, raising=False)
    return consul.Consul(host="127.0.0.1", port=http_agent.port, token="any-token")


async def call(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    return await asyncio.to_thread(fn, *args, **kw)


async def test_register_ttl_pass_and_discover(client):
    ok = await call(client.agent.service.register, "web", service_id="web-1", address="10.0.0.1", port=8080,
                    tags=["v1"], meta={"version": "1.0"}, check=consul.Check.ttl("30s"),
                    weights={"passing": 10, "warning": 1}, tagged_addresses={"wan": {"address": "1.2.3.4",
                                                                                       "port": 80}})
    assert ok is True
    services = await call(client.agent.services)
    assert services["web-1"]["Weights"] == {"Passing": 10, "Warning": 1}
    assert services["web-1"]["TaggedAddresses"]["wan"] == {"Address": "1.2.3.4", "Port": 80}
    checks = await call(client.agent.checks)
    assert checks["service:web-1"]["Status"] == "critical"  # initial status, as py-consul's tests expect

    _, nodes = await call(client.health.service, "web", passing=True)
    assert nodes == []
    assert await call(client.agent.check.ttl_pass, "service:web-1", "all good") is True
    index, nodes = await call(client.health.service, "web", passing=True)
    assert [n["Service"]["ID"] for n in nodes] == ["web-1"]
    assert int(index) >= 1
    assert nodes[0]["Checks"][-1]["Output"] == "all good"

    assert await call(client.agent.check.ttl_warn, "service:web-1") is True
    assert await call(client.agent.check.ttl_fail, "service:web-1") is True
    _, nodes = await call(client.health.service, "web")
    assert nodes[0]["Checks"][-1]["Status"] == "critical"

    _, catalog_nodes = await call(client.catalog.service, "web", tag="v1")
    assert [n["ServiceID"] for n in catalog_nodes] == ["web-1"]
    _, services = await call(client.catalog.services)
    assert services == {"consul": [], "web": ["v1"]}

    assert await call(client.agent.service.deregister, "web-1") is True
    assert await call(client.agent.service.deregister, "web-1") is False  # 404 is "not 200"
    assert "web-1" not in await call(client.agent.services)


async def test_blocking_health_query_wakes_on_ttl_pass(client):
    await call(client.agent.service.register, "api", service_id="api-1", check=consul.Check.ttl("30s"))
    index, _ = await call(client.health.service, "api")
    waiter = asyncio.ensure_future(call(client.health.service, "api", index=index, wait="10s"))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    t0 = time.monotonic()
    await call(client.agent.check.ttl_pass, "service:api-1")
    new_index, nodes = await asyncio.wait_for(waiter, 5)
    assert time.monotonic() - t0 < 1
    assert int(new_index) > int(index)
    assert nodes[0]["Checks"][-1]["Status"] == "passing"


async def test_agent_http_check_runs_against_the_agent(client, http_agent):
    url = f"http://127.0.0.1:{http_agent.port}/v1/status/leader"
    await call(client.agent.service.register, "self", service_id="self-1",
               check=consul.Check.http(url, "100ms", timeout="1s"))
    deadline = time.monotonic() + 5
    status = None
    while time.monotonic() < deadline:
        status = (await call(client.agent.checks))["service:self-1"]["Status"]
        if status == "passing":
            break
        await asyncio.sleep(0.05)
    assert status == "passing"


async def test_agent_check_register_and_maintenance(client):
    await call(client.agent.service.register, "db", service_id="db-1")
    assert await call(client.agent.check.register, "db-ttl", consul.Check.ttl("10s"), service_id="db-1",
                      notes="n") is True
    checks = await call(client.agent.checks)
    assert checks["db-ttl"]["ServiceID"] == "db-1" and checks["db-ttl"]["Notes"] == "n"
    assert await call(client.agent.service.maintenance, "db-1", True, "upgrade") is True
    checks = await call(client.agent.checks)
    assert checks["_service_maintenance:db-1"]["Notes"] == "upgrade"
    assert await call(client.agent.service.maintenance, "db-1", False) is True
    assert await call(client.agent.check.deregister, "db-ttl") is True
    assert "db-ttl" not in await call(client.agent.checks)


async def test_catalog_register_external_node(client):
    ok = await call(client.catalog.register, "ext1", "10.2.0.1",
                    service={"service": "redis", "port": 6379, "tags": ["primary"]},
                    check={"name": "redis alive", "status": "passing", "serviceid": "redis"},
                    node_meta={"ignored": "by consul"}, tagged_addresses={"wan": "1.1.1.1"})
    assert ok is True
    index, nodes = await call(client.catalog.nodes)
    assert {n["Node"] for n in nodes} == {"node1", "ext1"}
    ext = next(n for n in nodes if n["Node"] == "ext1")
    # py-consul puts node_meta in the query string, where Consul ignores it.
    assert ext["Meta"] is None and ext["TaggedAddresses"] == {"wan": "1.1.1.1"}
    _, node = await call(client.catalog.node, "ext1")
    assert node["Services"]["redis"]["Port"] == 6379
    _, missing = await call(client.catalog.node, "ghost")
    assert missing is None
    _, healthy = await call(client.health.service, "redis", passing=True)
    assert [n["Node"]["Node"] for n in healthy] == ["ext1"]
    _, state = await call(client.health.state, "passing")
    assert {c["CheckID"] for c in state} == {"serfHealth", "redis alive"}
    _, node_checks = await call(client.health.node, "ext1")
    assert [c["CheckID"] for c in node_checks] == ["redis alive"]
    _, svc_checks = await call(client.health.checks, "redis")
    assert [c["CheckID"] for c in svc_checks] == ["redis alive"]

    waiter = asyncio.ensure_future(call(client.catalog.nodes, index=index, wait="10s"))
    await asyncio.sleep(0.1)
    assert await call(client.catalog.deregister, "ext1") is True
    new_index, nodes = await asyncio.wait_for(waiter, 5)
    assert int(new_index) > int(index) and [n["Node"] for n in nodes] == ["node1"]


async def test_kv(client):
    assert await call(client.kv.put, "app/a", "1") is True
    assert await call(client.kv.put, "app/b", b"\x00\x01", flags=7) is True
    assert await call(client.kv.put, "app/empty", "") is True
    index, item = await call(client.kv.get, "app/b")
    assert item["Value"] == b"\x00\x01" and item["Flags"] == 7
    _, empty = await call(client.kv.get, "app/empty")
    assert empty["Value"] is None
    missing_index, missing = await call(client.kv.get, "app/missing")
    assert missing is None and int(missing_index) >= 1
    _, items = await call(client.kv.get, "app/", recurse=True)
    assert [i["Key"] for i in items] == ["app/a", "app/b", "app/empty"]
    _, keys = await call(client.kv.get, "", keys=True, separator="/")
    assert keys == ["app/"]
    assert await call(client.kv.put, "app/a", "2", cas=50) is False
    assert await call(client.kv.put, "app/new", "x", cas=0) is True
    _, a = await call(client.kv.get, "app/a")
    assert await call(client.kv.put, "app/a", "3", cas=a["ModifyIndex"]) is True

    waiter = asyncio.ensure_future(call(client.kv.get, "app/a", index=index, wait="10s"))
    assert int((await asyncio.wait_for(waiter, 5))[0]) > int(index)  # already behind: at once

    _, a = await call(client.kv.get, "app/a")
    waiter = asyncio.ensure_future(call(client.kv.get, "app/a", index=a["ModifyIndex"], wait="10s"))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    await call(client.kv.put, "app/a", "4")
    _, woke = await asyncio.wait_for(waiter, 5)
    assert woke["Value"] == b"4"

    assert await call(client.kv.delete, "app/", recurse=True) is True
    _, gone = await call(client.kv.get, "app/", recurse=True)
    assert gone is None


async def test_status_self_and_datacenters(client):
    leader = await call(client.status.leader)
    assert leader == "127.0.0.1:8300"
    assert await call(client.status.peers) == [leader]
    me = await call(client.agent.self)
    assert set(me) == {"Member", "xDS", "Stats", "Config", "Coord", "DebugConfig", "Meta"}
    assert me["Stats"]["consul"]["leader_addr"] == leader
    assert await call(client.catalog.datacenters) == ["dc1"]
    with pytest.raises(consul.ConsulException):
        await call(client.catalog.nodes, dc="dc2")
