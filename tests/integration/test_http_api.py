"""The HTTP API over real loopback sockets: shapes, status codes and error texts of
``spec/http-api.md``, refusals that change nothing, and blocking queries that wake only on the
writes they concern."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import shutil
import sqlite3
import time

import aiohttp
import pytest
from aiohttp import web

from dnsdisco.catalog.health import HealthChecker
from dnsdisco.catalog.persist import DB_NAME
from dnsdisco.catalog.store import Store
from dnsdisco.config import Config
from dnsdisco.http.app import make_app
from dnsdisco.http.query import MAX_QUERY_TIME, blocking_timeout
from tests.integration.conftest import HttpAgent, running_http_agent

pytestmark = pytest.mark.integration

WEB = {"name": "web", "id": "web-1", "address": "10.0.0.1", "port": 80, "tags": ["v1", "primary"],
       "meta": {"version": "1"}, "checks": [{"ttl": "30s"}]}


async def register(agent: HttpAgent, body: dict, query: str = "") -> None:
    r = await agent.put("/v1/agent/service/register" + query, body)
    assert r.status == 200, r.text
    assert r.body == b""


# -- agent services ------------------------------------------------------------------------------


async def test_register_agent_service_shapes(http_agent):
    await register(http_agent, WEB)
    r = await http_agent.get("/v1/agent/services")
    assert r.status == 200 and r.headers["Content-Type"].startswith("application/json")
    assert "X-Consul-Index" not in r.headers  # agent endpoints do not block
    svc = r.json()["web-1"]
    assert svc == {
        "ID": "web-1", "Service": "web", "Tags": ["v1", "primary"], "Meta": {"version": "1"}, "Port": 80,
        "Address": "10.0.0.1",
        "TaggedAddresses": {"lan_ipv4": {"Address": "10.0.0.1", "Port": 80},
                            "wan_ipv4": {"Address": "10.0.0.1", "Port": 80}},
        "Weights": {"Passing": 1, "Warning": 1}, "EnableTagOverride": False,
        "CreateIndex": svc["CreateIndex"], "ModifyIndex": svc["ModifyIndex"], "Datacenter": "dc1",
    }
    checks = (await http_agent.get("/v1/agent/checks")).json()
    c = checks["service:web-1"]
    assert (c["Status"], c["Name"], c["ServiceID"], c["ServiceName"], c["ServiceTags"], c["Type"]) == (
        "critical", "Service 'web' check", "web-1", "web", ["v1", "primary"], "ttl")
    assert c["Definition"] == {"TTL": "30s"} and c["Interval"] == "" and c["Node"] == "node1"
    one = await http_agent.get("/v1/agent/service/web-1")
    assert one.json()["ContentHash"] == one.headers["X-Consul-ContentHash"]
    missing = await http_agent.get("/v1/agent/service/nope")
    assert (missing.status, missing.text) == (404, "unknown service ID: nope")


async def test_pascal_case_and_check_id_numbering(http_agent):
    await register(http_agent, {"Name": "api", "Check": {"TTL": "5s"}, "Checks": [
        {"HTTP": "http://127.0.0.1:1/", "Interval": "100ms", "Status": "passing"}]})
    checks = (await http_agent.get("/v1/agent/checks")).json()
    assert set(checks) == {"service:api:1", "service:api:2"}
    # py-consul registers a 100ms HTTP check: raised to 1s, not refused.
    assert checks["service:api:2"]["Interval"] == "1s"


async def test_reregistration_keeps_status_and_replace_existing_checks(http_agent):
    await register(http_agent, WEB)
    r = await http_agent.put("/v1/agent/check/pass/service:web-1?note=all%20good")
    assert (r.status, r.body) == (200, b"")
    await register(http_agent, {**WEB, "checks": [{"ttl": "30s"}, {"ttl": "10s", "id": "extra"}]})
    checks = (await http_agent.get("/v1/agent/checks")).json()
    assert (checks["service:web-1:1"]["Status"], checks["extra"]["Status"]) == ("critical", "critical")
    assert checks["service:web-1"]["Output"] == "all good"  # kept: not in the request, no replace
    await register(http_agent, {**WEB, "checks": [{"ttl": "10s", "id": "extra"}]}, "?replace-existing-checks")
    assert set((await http_agent.get("/v1/agent/checks")).json()) == {"extra"}


async def test_deregister(http_agent):
    await register(http_agent, WEB)
    r = await http_agent.put("/v1/agent/service/deregister/web-1")
    assert (r.status, r.body) == (200, b"")
    assert (await http_agent.get("/v1/agent/services")).json() == {}
    r = await http_agent.put("/v1/agent/service/deregister/web-1")
    assert (r.status, r.text) == (
        404, 'Unknown service ID "web-1". Ensure that the service ID is passed, not the service name.')


async def test_service_maintenance(http_agent):
    await register(http_agent, WEB)
    r = await http_agent.put("/v1/agent/service/maintenance/web-1")
    assert (r.status, r.text) == (400, "Missing value for enable")
    r = await http_agent.put("/v1/agent/service/maintenance/web-1?enable=maybe")
    assert (r.status, r.text) == (400, 'Invalid value for enable: "maybe"')
    r = await http_agent.put("/v1/agent/service/maintenance/web-1?enable=True&reason=deploy")
    assert r.status == 200
    c = (await http_agent.get("/v1/agent/checks")).json()["_service_maintenance:web-1"]
    assert (c["Status"], c["Notes"], c["Name"]) == ("critical", "deploy", "Service Maintenance Mode")
    await http_agent.put("/v1/agent/service/maintenance/web-1?enable=false")
    assert "_service_maintenance:web-1" not in (await http_agent.get("/v1/agent/checks")).json()
    r = await http_agent.put("/v1/agent/service/maintenance/ghost?enable=true")
    assert (r.status, r.text) == (404, 'No service registered with ID "ghost"')


async def test_agent_health_by_id_and_name(http_agent):
    await register(http_agent, WEB)
    r = await http_agent.get("/v1/agent/health/service/id/web-1?format=text")
    assert (r.status, r.text) == (503, "critical")
    await http_agent.put("/v1/agent/check/pass/service:web-1")
    r = await http_agent.get("/v1/agent/health/service/name/web")
    assert r.status == 200 and r.json()[0]["AggregatedStatus"] == "passing"
    r = await http_agent.get("/v1/agent/health/service/id/nope?format=text")
    assert (r.status, r.text) == (404, "ServiceId nope not found")


# -- agent checks and TTL ------------------------------------------------------------------------


async def test_check_register_ttl_and_deregister(http_agent):
    await register(http_agent, WEB)
    r = await http_agent.put("/v1/agent/check/register", {"name": "mem", "ttl": "10s", "serviceid": "web-1"})
    assert (r.status, r.body) == (200, b"")
    c = (await http_agent.get("/v1/agent/checks")).json()["mem"]
    assert (c["Status"], c["ServiceName"]) == ("critical", "web")
    for verb, status in (("warn", "warning"), ("fail", "critical"), ("pass", "passing")):
        r = await http_agent.put(f"/v1/agent/check/{verb}/mem?note={verb}ed")
        assert r.status == 200
        c = (await http_agent.get("/v1/agent/checks")).json()["mem"]
        assert (c["Status"], c["Output"]) == (status, f"{verb}ed")
    r = await http_agent.put("/v1/agent/check/update/mem", {"Status": "warning", "Output": "slow"})
    assert r.status == 200
    c = (await http_agent.get("/v1/agent/checks")).json()["mem"]
    assert (c["Status"], c["Output"]) == ("warning", "slow")
    r = await http_agent.put("/v1/agent/check/update/mem", {"Status": "up"})
    assert (r.status, r.text) == (400, "Invalid check status: 'up'")
    r = await http_agent.put("/v1/agent/check/deregister/mem")
    assert r.status == 200
    r = await http_agent.put("/v1/agent/check/pass/mem")
    assert (r.status, r.text) == (404, 'Unknown check ID "mem". Ensure that the check ID is passed, not the check name.')
    r = await http_agent.put("/v1/agent/check/deregister/mem")
    assert r.status == 404


async def test_ttl_update_on_non_ttl_check_is_500(http_agent):
    r = await http_agent.put("/v1/agent/check/register",
                             {"Name": "tcp", "TCP": "127.0.0.1:1", "Interval": "1h"})
    assert r.status == 200
    r = await http_agent.put("/v1/agent/check/pass/tcp")
    assert (r.status, r.text) == (500, 'CheckID "tcp" does not have associated TTL')


async def test_check_register_refusals(http_agent):
    r = await http_agent.put("/v1/agent/check/register", {"Name": "c", "TTL": "1s", "ServiceID": "ghost"})
    assert (r.status, r.text) == (404, 'ServiceID "ghost" does not exist')
    r = await http_agent.put("/v1/agent/check/register", {"TTL": "1s"})
    assert (r.status, r.text) == (400, "Missing check name")
    r = await http_agent.put("/v1/agent/check/register", {"Name": "c", "Args": ["/bin/true"], "Interval": "1s"})
    assert r.status == 500 and r.text.startswith("Scripts are disabled on this agent")


async def test_script_checks_allowed_when_enabled():
    async with running_http_agent(config=Config(node_name="node1", enable_script_checks=True)) as agent:
        r = await agent.put("/v1/agent/check/register", {"Name": "s", "Args": ["/bin/true"], "Interval": "1h"})
        assert r.status == 200
        assert (await agent.get("/v1/agent/checks")).json()["s"]["Type"] == "script"


# -- agent self, status, probes ------------------------------------------------------------------


async def test_agent_self_and_status(http_agent):
    r = await http_agent.get("/v1/agent/self")
    body = r.json()
    assert set(body) == {"Config", "DebugConfig", "Coord", "Member", "Stats", "Meta", "xDS"}
    assert (body["Config"]["Datacenter"], body["Config"]["NodeName"]) == ("dc1", "node1")
    assert body["Config"]["Version"] and body["DebugConfig"] == {}
    assert body["Member"]["Name"] == "node1" and body["Member"]["Status"] == 1
    assert body["Meta"] == {"consul-network-segment": ""}
    leader = (await http_agent.get("/v1/status/leader")).json()
    assert leader == body["Stats"]["consul"]["leader_addr"] == "127.0.0.1:8300"
    assert (await http_agent.get("/v1/status/peers")).json() == [leader]
    r = await http_agent.get("/v1/status/leader?dc=dc2")
    assert (r.status, r.text) == (500, "No path to datacenter")


async def test_health_ready_and_reload():
    calls = []

    async def reload() -> None:
        calls.append(1)

    async with running_http_agent(reload=reload) as agent:
        assert (await agent.get("/health")).status == 200
        assert (await agent.get("/ready")).status == 200
        assert (await agent.put("/v1/agent/reload")).status == 200
        assert calls == [1]


async def test_ready_is_503_until_the_store_is_open():
    store = Store(datacenter="dc1", node_name="n", node_address="127.0.0.1", data_dir=None)
    runner = web.AppRunner(make_app(store, HealthChecker(store), Config()))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{runner.addresses[0][1]}/ready"
            async with session.get(url) as r:
                assert r.status == 503 and "catalog store not open" in await r.text()
            await store.open()
            async with session.get(url) as r:
                assert r.status == 200
    finally:
        await runner.cleanup()
        await store.close()


# -- conventions ---------------------------------------------------------------------------------


async def test_unknown_path_wrong_method_and_options(http_agent):
    r = await http_agent.get("/v1/nope/thing")
    assert (r.status, r.text) == (404, "Invalid URL path: not a recognized HTTP API endpoint")
    assert r.headers["Content-Type"].startswith("text/plain")
    r = await http_agent.call("POST", "/v1/agent/service/register")
    assert (r.status, r.text) == (405, "method POST not allowed")
    assert r.headers["Allow"] == "OPTIONS,PUT"
    for path in ("/v1/agent/service/register", "/v1/agent/service/deregister/web-1",
                 "/v1/agent/service/maintenance/web-1"):
        r = await http_agent.get(path)
        assert (r.status, r.headers["Allow"]) == (405, "OPTIONS,PUT"), path
    r = await http_agent.call("OPTIONS", "/v1/kv/x")
    assert r.status == 200 and r.headers["Allow"] == "OPTIONS,DELETE,GET,PUT"


async def test_tokens_are_accepted_in_every_place(http_agent):
    for headers, query in (({"X-Consul-Token": "t"}, ""), ({"Authorization": "Bearer t"}, ""), (None, "?token=t")):
        r = await http_agent.put("/v1/agent/service/register" + query, WEB, headers=headers)
        assert r.status == 200
        r = await http_agent.get("/v1/catalog/services" + query, headers=headers)
        assert r.status == 200 and "web" in r.json()


async def test_read_headers_and_pretty(http_agent):
    r = await http_agent.get("/v1/catalog/nodes?pretty")
    assert r.headers["X-Consul-KnownLeader"] == "true" and r.headers["X-Consul-LastContact"] == "0"
    assert r.index >= 1
    assert "\n" in r.text
    assert "\n" not in (await http_agent.get("/v1/catalog/nodes")).text


@pytest.mark.parametrize("query, message", [
    ("index=abc", "Invalid index"),
    ("index=-1", "Invalid index"),
    ("index=1&wait=60", "Invalid wait time"),
    ("index=1&wait=soon", "Invalid wait time"),
    ("stale&consistent", "Cannot specify ?stale with ?consistent, conflicting semantics."),
    ("cached&consistent", "Cannot specify ?cached with ?consistent, conflicting semantics."),
    ("max_stale=x", 'Invalid max_stale value "x"'),
])
async def test_query_parameter_refusals(http_agent, query, message):
    for path in ("/v1/catalog/services", "/v1/health/service/web", "/v1/kv/k"):
        r = await http_agent.get(f"{path}?{query}")
        assert (r.status, r.text) == (400, message)


async def test_filter_is_refused_not_ignored(http_agent):
    r = await http_agent.get("/v1/catalog/services?filter=Service%20%3D%3D%20web")
    assert (r.status, r.text) == (400, "filter expressions are not supported by dnsdisco")


# -- bad input changes nothing -------------------------------------------------------------------

BAD_REGISTRATIONS = [
    (b"{not json", 400, "Request decode failed: invalid character 'n' looking for beginning of object key string"),
    (b'{"Name": "x"', 400, "Request decode failed: unexpected EOF"),
    (b"", 400, "Request decode failed: EOF"),
    (b'{"Name": "x", "Port": "80"}', 400, "Request decode failed: json: cannot unmarshal string into Go struct "
     "field ServiceDefinition.Port of type int"),
    (b'{"Name": "x", "x": 1}', 400, 'Request decode failed: json: unknown field "x"'),
    (b'{"Name": "x", "Check": {"TTL": "10 s"}}', 400, 'Request decode failed: time: invalid duration "10 s"'),
    (b'{"Name": "x", "Port": 99999}', 400, "Invalid port 99999: must be between 0 and 65535"),
    (b'{"Name": "x", "Check": {"TTL": "1s", "Status": "fine"}}', 400,
     "Status for checks must 'passing', 'warning', 'critical'"),
    (b'{"Name": "x", "Weights": {"Passing": 0}}', 400, "Invalid Weights: Passing must be greater than 0"),
    (b'{"Name": "x", "Meta": {"consul-a": "b"}}', 400,
     "Invalid Service Meta: Couldn't load metadata pair ('consul-a', 'b'): Key prefix 'consul-' is reserved for "
     "internal use"),
    (b'{"Name": "x", "Check": {"HTTP": "http://x"}}', 400,
     "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks"),
    (b'{"Port": 1}', 400, "Missing service name"),
    (b'[{"Name": "x"}]', 400,
     "Request decode failed: json: cannot unmarshal array into Go value of type structs.ServiceDefinition"),
    (b'{"Name": NaN}', 400, "Request decode failed: invalid character 'N' looking for beginning of value"),
]


@pytest.mark.parametrize("data, status, message", BAD_REGISTRATIONS)
async def test_bad_registrations_change_nothing(http_agent, data, status, message):
    before = http_agent.store.index
    r = await http_agent.put("/v1/agent/service/register", data=data)
    assert (r.status, r.text) == (status, message)
    assert http_agent.store.index == before
    assert (await http_agent.get("/v1/agent/services")).json() == {}


# -- catalog -------------------------------------------------------------------------------------


async def test_catalog_register_read_and_deregister(http_agent):
    r = await http_agent.put("/v1/catalog/register", {
        "Node": "ext1", "Address": "10.1.0.1", "TaggedAddresses": {"wan": "1.1.1.1"}, "NodeMeta": {"rack": "r1"},
        "Service": {"Service": "redis", "ID": "redis-1", "Port": 6379, "Tags": ["Primary"], "Address": "10.1.0.2",
                    "Meta": {"m": "1"}, "Weights": {"Passing": 3, "Warning": 1},
                    "TaggedAddresses": {"lan": {"Address": "10.1.0.2", "Port": 6379}}},
        "Checks": [{"Name": "redis alive", "ServiceID": "redis-1", "Status": "passing", "Output": "PONG",
                    "Definition": {"TCP": "10.1.0.2:6379", "Interval": "10s"}}],
    })
    assert (r.status, r.json()) == (200, True)
    nodes = (await http_agent.get("/v1/catalog/nodes")).json()
    assert [n["Node"] for n in nodes] == ["ext1", "node1"]
    assert nodes[0]["TaggedAddresses"] == {"wan": "1.1.1.1"} and nodes[0]["Meta"] == {"rack": "r1"}
    assert [n["Node"] for n in (await http_agent.get("/v1/catalog/nodes?node-meta=rack:r1")).json()] == ["ext1"]
    assert (await http_agent.get("/v1/catalog/services")).json() == {"consul": [], "redis": ["Primary"]}
    assert (await http_agent.get("/v1/catalog/services?node-meta=rack:r1")).json() == {"redis": ["Primary"]}

    rows = (await http_agent.get("/v1/catalog/service/redis?tag=primary")).json()  # tags match any case
    assert len(rows) == 1
    row = rows[0]
    assert (row["Node"], row["Address"], row["ServiceID"], row["ServiceAddress"], row["ServicePort"],
            row["ServiceWeights"], row["ServiceMeta"], row["NodeMeta"]) == (
        "ext1", "10.1.0.1", "redis-1", "10.1.0.2", 6379, {"Passing": 3, "Warning": 1}, {"m": "1"}, {"rack": "r1"})
    assert row["ServiceTaggedAddresses"] == {"lan": {"Address": "10.1.0.2", "Port": 6379}}
    assert (await http_agent.get("/v1/catalog/service/redis?tag=primary&tag=other")).json() == []
    r = await http_agent.get("/v1/catalog/service/nothing")
    assert (r.status, r.json()) == (200, []) and r.index >= 1

    node = (await http_agent.get("/v1/catalog/node/ext1")).json()
    assert node["Node"]["Node"] == "ext1" and node["Services"]["redis-1"]["Port"] == 6379
    r = await http_agent.get("/v1/catalog/node/ghost")
    assert (r.status, r.text) == (200, "null") and r.index >= 1
    listed = (await http_agent.get("/v1/catalog/node-services/ext1")).json()
    assert [s["ID"] for s in listed["Services"]] == ["redis-1"]

    health = (await http_agent.get("/v1/health/service/redis?passing")).json()
    assert [c["Output"] for c in health[0]["Checks"]] == ["PONG"]
    assert health[0]["Checks"][0]["Definition"] == {"TCP": "10.1.0.2:6379", "Interval": "10s"}

    r = await http_agent.put("/v1/catalog/deregister", {"Node": "ext1", "ServiceID": "redis-1"})
    assert (r.status, r.json()) == (200, True)
    assert (await http_agent.get("/v1/catalog/service/redis")).json() == []
    assert (await http_agent.get("/v1/health/checks/redis")).json() == []
    r = await http_agent.put("/v1/catalog/deregister", {"Node": "ext1"})
    assert r.json() is True
    assert (await http_agent.get("/v1/catalog/node/ext1")).text == "null"


async def test_catalog_refusals(http_agent):
    for path, body, status, text in [
        ("/v1/catalog/register", {"Address": "a"}, 500, "Must provide node"),
        ("/v1/catalog/register", {"Node": "n", "Address": "a", "Datacenter": "dc2"}, 500, "No path to datacenter"),
        ("/v1/catalog/register", {"Node": "n", "Address": "a", "Check": {"Name": "c", "ServiceID": "s"}}, 500,
         "Unknown service ID 's' for check ID 'c'"),
        ("/v1/catalog/register", {"Node": "n", "Address": "a", "Nope": 1}, 400,
         'Request decode failed: json: unknown field "Nope"'),
        ("/v1/catalog/deregister", {"ServiceID": "x"}, 500, "Must provide node"),
    ]:
        before = http_agent.store.index
        r = await http_agent.put(path, body)
        assert (r.status, r.text) == (status, text)
        assert http_agent.store.index == before
    assert http_agent.store.node("n") is None
    assert (await http_agent.get("/v1/catalog/datacenters")).json() == ["dc1"]
    for path, text in [("/v1/catalog/service/", "Missing service name"), ("/v1/catalog/node/", "Missing node name"),
                       ("/v1/health/state/", "Missing check state"), ("/v1/health/service/", "Missing service name")]:
        r = await http_agent.get(path)
        assert (r.status, r.text) == (400, text)
    r = await http_agent.get("/v1/catalog/services?dc=dc2")
    assert (r.status, r.text) == (500, "No path to datacenter")


# -- health --------------------------------------------------------------------------------------


async def test_health_endpoints(http_agent):
    await register(http_agent, WEB)
    await register(http_agent, {**WEB, "id": "web-2", "tags": ["v2"]})
    await http_agent.put("/v1/agent/check/pass/service:web-2")
    rows = (await http_agent.get("/v1/health/service/web")).json()
    assert [r["Service"]["ID"] for r in rows] == ["web-1", "web-2"]
    assert [c["CheckID"] for c in rows[0]["Checks"]] == ["serfHealth", "service:web-1"]
    assert rows[0]["Node"]["Node"] == "node1" and rows[0]["Service"]["Tags"] == ["v1", "primary"]
    passing = (await http_agent.get("/v1/health/service/web?passing=1")).json()
    assert [r["Service"]["ID"] for r in passing] == ["web-2"]
    assert [r["Service"]["ID"] for r in (await http_agent.get("/v1/health/service/web?passing=false")).json()] == [
        "web-1", "web-2"]
    assert [r["Service"]["ID"] for r in (await http_agent.get("/v1/health/service/WEB?tag=V1")).json()] == ["web-1"]
    r = await http_agent.get("/v1/health/service/web?passing=sure")
    assert (r.status, r.text) == (400, "Invalid value for ?passing")
    assert (await http_agent.get("/v1/health/service/ghost")).json() == []

    checks = (await http_agent.get("/v1/health/checks/web")).json()
    assert [c["CheckID"] for c in checks] == ["service:web-1", "service:web-2"]  # no node checks
    critical = (await http_agent.get("/v1/health/state/critical")).json()
    assert [c["CheckID"] for c in critical] == ["service:web-1"]
    assert {c["CheckID"] for c in (await http_agent.get("/v1/health/state/any")).json()} == {
        "serfHealth", "service:web-1", "service:web-2"}
    assert (await http_agent.get("/v1/health/state/bogus")).json() == []
    node_checks = (await http_agent.get("/v1/health/node/node1")).json()
    assert [c["CheckID"] for c in node_checks] == ["serfHealth", "service:web-1", "service:web-2"]
    assert (await http_agent.get("/v1/health/node/ghost")).json() == []


# -- KV ------------------------------------------------------------------------------------------


async def test_kv_round_trip(http_agent):
    r = await http_agent.put("/v1/kv/app/config?flags=42", data=b"\x00binary\xff")
    assert (r.status, r.json()) == (200, True)
    r = await http_agent.get("/v1/kv/app/config")
    (entry,) = r.json()
    assert entry["Key"] == "app/config" and entry["Flags"] == 42 and entry["LockIndex"] == 0
    assert base64.b64decode(entry["Value"]) == b"\x00binary\xff"
    assert r.index == entry["ModifyIndex"]
    await http_agent.put("/v1/kv/app/empty", data=b"")
    assert (await http_agent.get("/v1/kv/app/empty")).json()[0]["Value"] is None
    raw = await http_agent.get("/v1/kv/app/config?raw")
    assert raw.body == b"\x00binary\xff" and raw.headers["Content-Type"].startswith("text/plain")
    assert raw.headers["X-Content-Type-Options"] == "nosniff" and raw.headers["Content-Security-Policy"] == "sandbox"

    await http_agent.put("/v1/kv/app/sub/a", data=b"1")
    await http_agent.put("/v1/kv/app/sub/b", data=b"2")
    keys = (await http_agent.get("/v1/kv/app/?keys")).json()
    assert keys == ["app/config", "app/empty", "app/sub/a", "app/sub/b"]
    assert (await http_agent.get("/v1/kv/app/?keys&separator=/")).json() == ["app/config", "app/empty", "app/sub/"]
    assert (await http_agent.get("/v1/kv/?keys=True&separator=/")).json() == ["app/"]
    rec = (await http_agent.get("/v1/kv/app/sub?recurse")).json()
    assert [e["Key"] for e in rec] == ["app/sub/a", "app/sub/b"]

    missing = await http_agent.get("/v1/kv/nothing")
    assert missing.status == 404 and missing.body == b"" and missing.index >= 1
    assert missing.headers["X-Consul-KnownLeader"] == "true"
    assert (await http_agent.get("/v1/kv/nothing/?recurse")).status == 404
    assert (await http_agent.get("/v1/kv/nothing/?keys")).status == 404

    r = await http_agent.call("DELETE", "/v1/kv/app/sub?recurse")
    assert r.json() is True
    assert (await http_agent.get("/v1/kv/app/sub/a")).status == 404
    assert (await http_agent.call("DELETE", "/v1/kv/never")).json() is True


async def test_kv_cas(http_agent):
    assert (await http_agent.put("/v1/kv/lock?cas=50", data=b"x")).json() is False
    assert (await http_agent.put("/v1/kv/lock?cas=0", data=b"x")).json() is True
    assert (await http_agent.put("/v1/kv/lock?cas=0", data=b"y")).json() is False
    idx = (await http_agent.get("/v1/kv/lock")).json()[0]["ModifyIndex"]
    assert (await http_agent.put(f"/v1/kv/lock?cas={idx}", data=b"y")).json() is True
    assert (await http_agent.call("DELETE", f"/v1/kv/lock?cas={idx}")).json() is False
    idx2 = (await http_agent.get("/v1/kv/lock")).json()[0]["ModifyIndex"]
    assert (await http_agent.call("DELETE", f"/v1/kv/lock?cas={idx2}")).json() is True


async def test_kv_refusals(http_agent):
    before = http_agent.store.index
    for method, path, data, status, text in [
        ("GET", "/v1/kv/", None, 400, "Missing key name"),
        ("PUT", "/v1/kv/", b"x", 400, "Missing key name"),
        ("DELETE", "/v1/kv/", None, 400, "Missing key name"),
        ("PUT", "/v1/kv/k?cas=1&acquire=s", b"x", 400, "Conflicting flags: acquire=s&cas=1"),
        ("DELETE", "/v1/kv/k?recurse&cas=1", None, 400, "Conflicting flags: cas=1&recurse="),
        ("PUT", "/v1/kv/k?flags=x", b"x", 500, 'strconv.ParseUint: parsing "x": invalid syntax'),
        ("PUT", "/v1/kv/k?cas=-1", b"x", 500, 'strconv.ParseUint: parsing "-1": invalid syntax'),
        ("PUT", "/v1/kv/k?acquire=abc", b"x", 500, 'invalid session "abc"'),
        ("PUT", "/v1/kv/k?dc=elsewhere", b"x", 500, "No path to datacenter"),
    ]:
        r = await http_agent.call(method, path, data=data)
        assert (r.status, r.text) == (status, text), path
    big = b"x" * (512 * 1024 + 1)
    r = await http_agent.put("/v1/kv/big", data=big)
    assert r.status == 413
    assert r.text.startswith(f"Request body({len(big)} bytes) too large, max size: 524288 bytes.")
    assert (await http_agent.put("/v1/kv/max", data=b"x" * 512 * 1024)).json() is True
    assert http_agent.store.index == before + 1  # only the last, valid write


# -- blocking queries ----------------------------------------------------------------------------


def test_blocking_timeout_clamp_default_and_jitter():
    rng = random.Random(7)
    for _ in range(100):
        t = blocking_timeout(3600, rng)
        assert MAX_QUERY_TIME <= t <= MAX_QUERY_TIME * 17 / 16
        d = blocking_timeout(0, rng)
        assert 300 <= d <= 300 * 17 / 16
        w = blocking_timeout(16, rng)
        assert 16 <= w <= 17


async def test_blocking_wakes_on_relevant_write_only(http_agent):
    await register(http_agent, WEB)
    first = await http_agent.get("/v1/health/service/web")
    index = first.index
    watcher = asyncio.create_task(http_agent.get(f"/v1/health/service/web?index={index}&wait=10s"))
    await asyncio.sleep(0.05)
    # Unrelated writes: another service, a KV key, a catalog node.
    await register(http_agent, {"name": "db", "checks": [{"ttl": "10s"}]})
    await http_agent.put("/v1/kv/x", data=b"1")
    await http_agent.put("/v1/catalog/register", {"Node": "ext", "Address": "10.9.9.9"})
    await asyncio.sleep(0.2)
    assert not watcher.done()
    assert (await http_agent.get("/v1/health/service/web")).index == index  # no change for this topic
    t0 = time.monotonic()
    await http_agent.put("/v1/agent/check/pass/service:web-1")
    r = await asyncio.wait_for(watcher, 2)
    elapsed = time.monotonic() - t0
    assert r.status == 200 and r.index > index
    assert r.json()[0]["Checks"][1]["Status"] == "passing"
    assert elapsed < 0.1, f"watcher took {elapsed * 1000:.1f} ms after the write returned"


async def test_blocking_returns_at_once_when_behind_and_times_out_with_same_index(http_agent):
    await register(http_agent, WEB)
    current = (await http_agent.get("/v1/catalog/service/web")).index
    t0 = time.monotonic()
    r = await http_agent.get(f"/v1/catalog/service/web?index={current - 1}&wait=10s")
    assert time.monotonic() - t0 < 0.5 and r.index == current
    t0 = time.monotonic()
    r = await http_agent.get(f"/v1/catalog/service/web?index={current}&wait=100ms")
    elapsed = time.monotonic() - t0
    assert r.status == 200 and r.index == current  # a timeout is a 200 with the same index
    assert 0.1 <= elapsed < 0.5


@pytest.mark.parametrize("path, trigger, unrelated", [
    ("/v1/catalog/services", ("PUT", "/v1/agent/service/register", {"name": "new"}),
     ("PUT", "/v1/kv/x", None)),
    ("/v1/catalog/nodes", ("PUT", "/v1/catalog/register", {"Node": "n2", "Address": "1.2.3.4"}),
     ("PUT", "/v1/agent/service/register", {"name": "new"})),
    ("/v1/catalog/node/node1", ("PUT", "/v1/agent/service/register", {"name": "new"}),
     ("PUT", "/v1/catalog/register", {"Node": "n2", "Address": "1.2.3.4"})),
    ("/v1/health/state/any", ("PUT", "/v1/agent/check/register", {"name": "c", "ttl": "10s"}),
     ("PUT", "/v1/kv/x", None)),
    ("/v1/health/node/node1", ("PUT", "/v1/agent/check/register", {"name": "c", "ttl": "10s"}),
     ("PUT", "/v1/catalog/register", {"Node": "n2", "Address": "1.2.3.4", "Check": {"Name": "x"}})),
    ("/v1/kv/cfg/a", ("PUT", "/v1/kv/cfg/a", None), ("PUT", "/v1/kv/cfg/ab", None)),
    ("/v1/kv/cfg/?recurse", ("PUT", "/v1/kv/cfg/z", None), ("PUT", "/v1/kv/other", None)),
])
async def test_each_read_blocks_on_its_own_topic(http_agent, path, trigger, unrelated):
    first = await http_agent.get(path)
    sep = "&" if "?" in path else "?"
    watcher = asyncio.create_task(http_agent.get(f"{path}{sep}index={first.index}&wait=5s"))
    await asyncio.sleep(0.05)
    method, upath, body = unrelated
    r = await http_agent.call(method, upath, body, data=None if body is not None else b"1")
    assert r.status == 200, r.text
    await asyncio.sleep(0.1)
    assert not watcher.done(), f"{path} woke on {upath}"
    method, tpath, body = trigger
    r = await http_agent.call(method, tpath, body, data=None if body is not None else b"1")
    assert r.status == 200, r.text
    reply = await asyncio.wait_for(watcher, 1)
    assert reply.index > first.index


async def test_kv_watch_sees_delete_through_tombstone(http_agent):
    await http_agent.put("/v1/kv/t/a", data=b"1")
    await http_agent.put("/v1/kv/t/b", data=b"2")
    first = await http_agent.get("/v1/kv/t/?recurse")
    watcher = asyncio.create_task(http_agent.get(f"/v1/kv/t/?recurse&index={first.index}&wait=5s"))
    await asyncio.sleep(0.05)
    await http_agent.call("DELETE", "/v1/kv/t/b")
    r = await asyncio.wait_for(watcher, 1)
    # The deleted key held the highest index; the prefix's index still moves forward.
    assert r.index > first.index and [e["Key"] for e in r.json()] == ["t/a"]


async def test_durable_agent_answers_after_commit(http_agent_disk):
    await register(http_agent_disk, WEB)
    # The 200 came after the commit: the row is in the files now. The agent holds the database
    # exclusively, so a copy of its files (what a crash would leave) is read instead.
    copy = f"{http_agent_disk.store.data_dir}/copy.db"
    for suffix in ("", "-wal"):
        shutil.copyfile(f"{http_agent_disk.store.data_dir}/{DB_NAME}{suffix}", copy + suffix)
    db = sqlite3.connect(copy)
    try:
        assert db.execute("SELECT id FROM services WHERE id='web-1'").fetchone() == ("web-1",)
    finally:
        db.close()


async def test_services_delta_names_only_what_changed(http_agent):
    """dnsdisco's extension for its own mirrors: with ``X-Dnsdisco-Want-Changes: delta`` a
    blocking catalog/services read gets only the services written since the index it sent (a
    hinted name missing from the body is gone); otherwise, and with a filter, the full list."""
    async def reg(sid: str, name: str, tags: list[str]) -> None:
        r = await http_agent.put("/v1/catalog/register", {
            "Node": "ext1", "Address": "10.1.0.1", "NodeMeta": {"rack": "r1"},
            "Service": {"Service": name, "ID": sid, "Port": 80, "Tags": tags}})
        assert r.status == 200

    await reg("a1", "alpha", ["x"])
    await reg("b1", "Beta", ["y"])
    since = (await http_agent.get("/v1/catalog/services")).index
    await reg("b2", "beta", ["z"])  # another spelling of the same DNS name
    r = await http_agent.put("/v1/catalog/deregister", {"Node": "ext1", "ServiceID": "a1"})
    assert r.status == 200
    want = {"X-Dnsdisco-Want-Changes": "delta"}
    r = await http_agent.get(f"/v1/catalog/services?index={since}&wait=1s", headers=want)
    assert r.index > since
    assert json.loads(r.headers["X-Dnsdisco-Changed-Services"]) == ["alpha", "beta"]
    assert r.headers["X-Dnsdisco-Services-Delta"] == "1"
    assert r.json() == {"Beta": ["y"], "beta": ["z"]}  # alpha: hinted, absent, so gone
    # Hints only ("1"), a node-meta filter, or no index: the full list, no delta header.
    for query, headers in ((f"?index={since}&wait=1s", {"X-Dnsdisco-Want-Changes": "1"}),
                           (f"?index={since}&wait=1s&node-meta=rack:r1", want), ("", want)):
        r = await http_agent.get("/v1/catalog/services" + query, headers=headers)
        assert "X-Dnsdisco-Services-Delta" not in r.headers, query
        assert r.json()["Beta"] == ["y"] and "alpha" not in r.json(), query
        assert ("consul" in r.json()) == ("node-meta" not in query), query


async def test_services_delta_with_entries_carries_each_health_body(http_agent):
    """``X-Dnsdisco-Want-Changes: entries``: the delta comes with each changed service's health
    entries as /v1/health/service answers them, with that read's index; a gone service has none."""
    await register(http_agent, {"Name": "api", "ID": "api-1", "Port": 80, "Tags": ["v1"],
                                "Check": {"CheckID": "api-ttl", "TTL": "30s", "Status": "passing"}})
    await register(http_agent, {"Name": "old", "ID": "old-1", "Port": 81})
    since = (await http_agent.get("/v1/catalog/services")).index
    await register(http_agent, {"Name": "api", "ID": "api-2", "Port": 82, "Tags": ["v2"]})
    r = await http_agent.put("/v1/agent/service/deregister/old-1")
    assert r.status == 200
    want = {"X-Dnsdisco-Want-Changes": "entries"}
    r = await http_agent.get(f"/v1/catalog/services?index={since}&wait=1s", headers=want)
    assert r.headers["X-Dnsdisco-Services-Delta"] == "entries"
    assert sorted(json.loads(r.headers["X-Dnsdisco-Changed-Services"])) == ["api", "old"]
    body = r.json()
    assert body["Services"] == {"api": ["v1", "v2"]}  # old: hinted and absent, so gone
    health = await http_agent.get("/v1/health/service/api")
    assert body["Entries"]["api"] == {"Index": health.index, "Rows": health.json()}
    assert body["Entries"]["old"]["Rows"] == []


async def test_health_state_hint_names_the_services_of_check_writes(http_agent):
    """With X-Dnsdisco-Want-Changes, a blocking health/state read that returns after a check
    write names the services it bore on; without the header (Consul's API), no such header."""
    await register(http_agent, {"Name": "web", "ID": "web-1", "Port": 80,
                                "Check": {"CheckID": "web-ttl", "TTL": "1h", "Status": "passing"}})
    since = (await http_agent.get("/v1/health/state/critical")).index
    r = await http_agent.put("/v1/agent/check/pass/web-ttl?note=still-fine")  # passing -> passing
    assert r.status == 200
    want = {"X-Dnsdisco-Want-Changes": "delta"}
    r = await http_agent.get(f"/v1/health/state/critical?index={since}&wait=1s", headers=want)
    assert r.index > since and r.json() == []
    assert json.loads(r.headers["X-Dnsdisco-Changed-Services"]) == ["web"]
    r = await http_agent.get(f"/v1/health/state/critical?index={since}&wait=1s")
    assert "X-Dnsdisco-Changed-Services" not in r.headers


async def test_services_by_node_meta_wakes_on_a_node_meta_change(http_agent):
    r = await http_agent.put("/v1/catalog/register", {
        "Node": "ext1", "Address": "10.1.0.1", "NodeMeta": {"rack": "r1"},
        "Service": {"Service": "redis", "ID": "redis-1", "Port": 6379}})
    assert r.status == 200
    r = await http_agent.get("/v1/catalog/services?node-meta=rack:r2")
    assert r.json() == {}
    since = r.index

    async def move() -> None:
        await asyncio.sleep(0.2)
        await http_agent.put("/v1/catalog/register", {"Node": "ext1", "Address": "10.1.0.1",
                                                      "NodeMeta": {"rack": "r2"}})

    mover = asyncio.create_task(move())
    t0 = time.monotonic()
    r = await http_agent.get(f"/v1/catalog/services?node-meta=rack:r2&index={since}&wait=5s")
    await mover
    # Woken by the node write (not the 5 s wait), and the answer follows the node's new meta.
    assert time.monotonic() - t0 < 3 and r.index > since and r.json() == {"redis": []}


async def test_health_service_bodies_are_reused_only_while_nothing_changed(http_agent):
    """/v1/health/service bodies are kept by (service, index, options): the same read again is
    served from the cache, a write makes the next read fresh, and other options other bodies."""
    await register(http_agent, {"Name": "api", "ID": "api-1", "Port": 80, "Tags": ["v1"]})
    first = await http_agent.get("/v1/health/service/api")
    again = await http_agent.get("/v1/health/service/api?stale")
    assert again.text == first.text and again.index == first.index
    assert (await http_agent.get("/v1/health/service/api?tag=v2")).json() == []  # not the cached body
    await register(http_agent, {"Name": "api", "ID": "api-1", "Port": 81, "Tags": ["v1"]})
    after = await http_agent.get("/v1/health/service/api")
    assert after.index > first.index and after.json()[0]["Service"]["Port"] == 81


def test_body_cache_is_bounded_and_keeps_the_recently_used():
    from dnsdisco.http.query import BodyCache

    cache = BodyCache(max_bytes=800)
    for i in range(10):
        cache.put(("s", i), "x" * 100)
    assert cache.size <= 800 and cache.get(("s", 0)) is None and cache.get(("s", 9)) == "x" * 100
    # Held: 2..9, oldest first. 3 is used again, so the next two evictions take 2 and 4.
    cache.get(("s", 3))
    cache.put(("s", 10), "x" * 100)
    cache.put(("s", 11), "x" * 100)
    assert cache.get(("s", 2)) is None and cache.get(("s", 4)) is None
    assert cache.get(("s", 3)) is not None and cache.get(("s", 5)) is not None
    cache.put(("big",), "x" * 500)  # over an eighth of the budget: never cached
    assert cache.get(("big",)) is None


async def test_check_lists_reuse_each_checks_json_until_it_changes(http_agent):
    """/v1/health/state/any is built from each check's cached JSON: the body is what encoding
    the list afresh gives, a check write shows at once, and ?pretty is still indented."""
    await register(http_agent, {"Name": "api", "ID": "api-1", "Port": 80,
                                "Check": {"CheckID": "api-ttl", "TTL": "30s", "Status": "passing"}})
    await register(http_agent, {"Name": "db", "ID": "db-1", "Port": 5432,
                                "Check": {"CheckID": "db-ttl", "TTL": "30s", "Status": "passing"}})
    first = await http_agent.get("/v1/health/state/any")
    pretty = await http_agent.get("/v1/health/state/any?pretty")
    assert json.loads(pretty.text) == first.json() and "\n    " in pretty.text
    assert first.text == json.dumps(first.json(), separators=(",", ":"))
    r = await http_agent.put("/v1/agent/check/fail/db-ttl?note=down")
    assert r.status == 200
    after = (await http_agent.get("/v1/health/state/any")).json()
    by_id = {c["CheckID"]: c for c in after}
    assert by_id["db-ttl"]["Status"] == "critical" and by_id["db-ttl"]["Output"] == "down"
    assert by_id["api-ttl"] == {c["CheckID"]: c for c in first.json()}["api-ttl"]
    assert [c["CheckID"] for c in (await http_agent.get("/v1/health/state/critical")).json()] == ["db-ttl"]
    assert [c["CheckID"] for c in (await http_agent.get("/v1/health/checks/db")).json()] == ["db-ttl"]


def test_item_json_reuses_an_items_json_only_for_the_same_object():
    from types import SimpleNamespace

    from dnsdisco.http.query import ItemJson

    calls = []

    def shape(v):
        calls.append(v.k)
        return {"K": v.k, "V": v.v}

    enc = ItemJson(shape, lambda v: v.k)
    req = SimpleNamespace(query={})
    a, b = SimpleNamespace(k="a", v=1), SimpleNamespace(k="b", v=2)
    assert enc.body(req, [a, b], limit=3, prune=True) == '[{"K":"a","V":1},{"K":"b","V":2}]'
    assert enc.body(req, [a, b], limit=3) == '[{"K":"a","V":1},{"K":"b","V":2}]' and calls == ["a", "b"]
    b2 = SimpleNamespace(k="b", v=3)  # a new value under the same key is encoded afresh
    assert enc.body(req, [a, b2], limit=3, prune=True) == '[{"K":"a","V":1},{"K":"b","V":3}]' and calls[-1] == "b"
    assert enc.body(req, [a], limit=3, prune=True) == '[{"K":"a","V":1}]' and len(enc) == 1
    enc.body(req, [SimpleNamespace(k=str(i), v=i) for i in range(5)], limit=3)  # past the limit: emptied
    assert len(enc) == 0


async def test_catalog_nodes_reuses_each_nodes_json_until_it_changes(http_agent):
    """/v1/catalog/nodes is built from each node's cached JSON: after a node write the body is
    what encoding afresh gives, and ?node-meta= still filters it."""
    for name, rack in (("n1", "r1"), ("n2", "r2")):
        r = await http_agent.put("/v1/catalog/register", {"Node": name, "Address": "10.3.0.1",
                                                          "NodeMeta": {"rack": rack}})
        assert r.status == 200
    first = await http_agent.get("/v1/catalog/nodes")
    r = await http_agent.put("/v1/catalog/register", {"Node": "n2", "Address": "10.3.0.2",
                                                      "NodeMeta": {"rack": "r2"}})
    assert r.status == 200
    after = await http_agent.get("/v1/catalog/nodes")
    assert after.text == json.dumps(after.json(), separators=(",", ":"))
    by_name = {n["Node"]: n for n in after.json()}
    assert by_name["n2"]["Address"] == "10.3.0.2"
    assert by_name["n1"] == {n["Node"]: n for n in first.json()}["n1"]
    assert [n["Node"] for n in (await http_agent.get("/v1/catalog/nodes?node-meta=rack:r1")).json()] == ["n1"]
