"""Property tests of the HTTP API's request decoding (Hypothesis).

Two levels. The decoders of ``dnsdisco.catalog.definition`` (agent service and check
registration, check update, catalog register and deregister), on JSON bodies that have the right
shape with random types and values, and on arbitrary JSON: each returns a value or raises the
project's ``CatalogError`` (``DecodeError``: 400 with Consul's text; catalog writes also use
Consul's RPC refusals, 500), never another exception. And the real aiohttp app on a loopback
socket, over the same bodies (and raw bytes for KV): a bad body gets Consul's plain-text
refusal, never an ``internal error`` 500, and what the catalog held before is still there.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dnsdisco.catalog import definition
from dnsdisco.catalog.health import HealthChecker
from dnsdisco.catalog.model import Check, CheckDefinition, Service
from dnsdisco.catalog.store import Store
from dnsdisco.config import Config
from dnsdisco.errors import CatalogError, DecodeError
from dnsdisco.http.app import make_app
from dnsdisco.http.query import decode_json

# -- strategies ---------------------------------------------------------------------------------

SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8)
ANY_JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


def good_or_any(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a value of the right type, sometimes any JSON at all."""
    return st.one_of(good, good, good, ANY_JSON)


# Names never collide with what the agent holds before the test (``keep``, the agent's node).
NAMES = st.text(st.characters(codec="ascii", exclude_characters="/"), min_size=1, max_size=10).filter(
    lambda s: not s.lower().startswith(("keep", "node1")))
DURATIONS = st.one_of(
    st.sampled_from(["10s", "1m30s", "0", "-5s", "250ms", "", "10", "1e3s", "9999999999999999999999h", "2562048h"]),
    st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
)
STATUS = st.sampled_from(["passing", "warning", "critical", "maintenance", "", "ok"])
INTS = st.one_of(st.integers(-5, 70000), st.integers(-(2**70), 2**70))
META = st.dictionaries(st.text(max_size=12), good_or_any(st.text(max_size=6)), max_size=3)
# Check kinds that run nothing (TTL) or fail at once (no listener on 127.0.0.1:9), so no probe
# leaves loopback.
CHECK = st.fixed_dictionaries({}, optional={
    "Name": good_or_any(NAMES), "CheckID": good_or_any(NAMES), "TTL": DURATIONS, "Status": good_or_any(STATUS),
    "TCP": good_or_any(st.just("127.0.0.1:9")), "HTTP": good_or_any(st.just("http://127.0.0.1:9/")),
    "Interval": DURATIONS, "Timeout": DURATIONS, "DeregisterCriticalServiceAfter": DURATIONS,
    "Args": good_or_any(st.lists(st.text(max_size=4), max_size=2)), "Notes": good_or_any(st.text(max_size=5)),
    "SuccessBeforePassing": good_or_any(INTS), "Header": good_or_any(st.dictionaries(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=2), max_size=2)),
    "OutputMaxSize": good_or_any(INTS),
})
SERVICE = st.fixed_dictionaries({}, optional={
    "Name": good_or_any(NAMES), "ID": good_or_any(NAMES), "Port": good_or_any(INTS),
    "Address": good_or_any(st.sampled_from(["10.0.0.1", "::", "0.0.0.0", "host.example", "", "::1"])),
    "Tags": good_or_any(st.lists(st.text(max_size=5), max_size=3)), "Meta": good_or_any(META),
    "Weights": good_or_any(st.fixed_dictionaries({}, optional={"Passing": INTS, "Warning": INTS})),
    "TaggedAddresses": good_or_any(st.dictionaries(st.sampled_from(["lan", "wan", "lan_ipv4"]), st.fixed_dictionaries(
        {}, optional={"Address": st.text(max_size=8), "Port": INTS}), max_size=2)),
    "Check": good_or_any(CHECK), "Checks": good_or_any(st.lists(CHECK, max_size=2)),
    "EnableTagOverride": good_or_any(st.booleans()), "Kind": good_or_any(st.text(max_size=4)),
    "Connect": good_or_any(st.fixed_dictionaries({}, optional={"Native": st.booleans()})),
})
UPDATE = st.fixed_dictionaries({}, optional={"Status": good_or_any(STATUS), "Output": good_or_any(st.text(max_size=8))})
NODE_CHECK = st.fixed_dictionaries({}, optional={
    "Node": good_or_any(NAMES), "CheckID": good_or_any(NAMES), "Name": good_or_any(NAMES),
    "Status": good_or_any(STATUS), "ServiceID": good_or_any(NAMES), "Output": good_or_any(st.text(max_size=5)),
    "Definition": good_or_any(st.fixed_dictionaries({}, optional={"TTL": DURATIONS, "Interval": DURATIONS})),
})
REGISTER = st.fixed_dictionaries({}, optional={
    "Node": good_or_any(NAMES), "Address": good_or_any(st.sampled_from(["10.0.0.9", "", "::", "n.example"])),
    "ID": good_or_any(st.sampled_from(["", "not-a-uuid", "40e4a748-2192-161a-0510-9bf59fe950b5"])),
    "Datacenter": good_or_any(st.sampled_from(["", "dc1", "DC1", "dc2"])), "SkipNodeUpdate": good_or_any(st.booleans()),
    "NodeMeta": good_or_any(META), "TaggedAddresses": good_or_any(st.dictionaries(st.text(max_size=3), st.text(max_size=5), max_size=2)),
    "Service": good_or_any(st.fixed_dictionaries({}, optional={
        "Service": good_or_any(NAMES), "ID": good_or_any(NAMES), "Port": good_or_any(INTS),
        "Address": good_or_any(st.sampled_from(["", "::", "10.0.0.1"])), "Tags": good_or_any(st.lists(st.text(max_size=3), max_size=2)),
        "Weights": good_or_any(st.fixed_dictionaries({}, optional={"Passing": INTS, "Warning": INTS})),
        "Meta": good_or_any(META),
    })),
    "Check": good_or_any(NODE_CHECK), "Checks": good_or_any(st.lists(NODE_CHECK, max_size=2)),
})
DEREGISTER = st.fixed_dictionaries({}, optional={
    "Node": good_or_any(NAMES), "ServiceID": good_or_any(NAMES), "CheckID": good_or_any(NAMES),
    "Datacenter": good_or_any(st.sampled_from(["", "dc1", "dc2"])),
})

DECODERS = {
    "service": (SERVICE, lambda b: definition.decode_service_definition(b, node="n1", enable_script_checks=False)),
    "check": (CHECK, lambda b: definition.decode_check_definition(b, node="n1", enable_script_checks=False)),
    "update": (UPDATE, definition.decode_check_update),
    "register": (REGISTER, lambda b: definition.decode_register_request(b, datacenter="dc1")),
    "deregister": (DEREGISTER, lambda b: definition.decode_deregister_request(b, datacenter="dc1")),
}


# -- the decoders ---------------------------------------------------------------------------


def _decode(kind: str, body: Any) -> None:
    decode = DECODERS[kind][1]
    try:
        decode(body)
    except CatalogError as e:
        # Consul's refusals: 400 for a body it cannot read, 500 for an RPC-level refusal (and
        # for a script check on an agent that does not run them). Always with a text.
        assert e.status in (400, 500) and e.message and not e.message.startswith("internal error")
        if kind in ("service", "check", "update"):
            assert isinstance(e, DecodeError)


@pytest.mark.parametrize("kind", list(DECODERS))
@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_decoders_on_shaped_bodies(kind, data):
    _decode(kind, data.draw(DECODERS[kind][0]))


@pytest.mark.parametrize("kind", list(DECODERS))
@settings(max_examples=80, deadline=None)
@given(body=ANY_JSON)
def test_decoders_on_any_json(kind, body):
    _decode(kind, body)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40) | ANY_JSON.map(lambda v: json.dumps(v).encode()))
def test_body_parsing_refuses_with_consuls_text(raw):
    try:
        decode_json(raw)
    except DecodeError as e:
        assert e.status == 400 and e.message.startswith("Request decode failed: ")


# Regressions found by the fuzzers (tests/fuzz): each was an exception other than DecodeError,
# so a 500 "internal error" from the API.


@pytest.mark.parametrize("ttl", [10**30, -(10**30), 10**400, 1e300, -1e300])
def test_duration_out_of_int64_is_refused(ttl):
    # int too large for a float (OverflowError) / seconds past what a Go Duration holds.
    with pytest.raises(DecodeError, match="invalid duration"):
        definition.decode_service_definition({"Name": "x", "Check": {"TTL": ttl}}, node="n", enable_script_checks=False)


@pytest.mark.parametrize("field, value", [("SuccessBeforePassing", 2**63), ("OutputMaxSize", -(2**63) - 1)])
def test_int_out_of_int64_is_refused(field, value):
    with pytest.raises(DecodeError, match=f"cannot unmarshal number {value} into Go struct field"):
        definition.decode_service_definition(
            {"Name": "x", "Check": {"TTL": "10s", field: value}}, node="n", enable_script_checks=False)


def test_uint_out_of_range_is_refused():
    body = {"Node": "n", "Address": "a", "Check": {"CheckID": "c", "ModifyIndex": 2**64}}
    with pytest.raises(DecodeError, match="of type uint64"):
        definition.decode_register_request(body, datacenter="dc1")


def test_int64_edges_are_accepted():
    service, checks = definition.decode_service_definition(
        {"Name": "x", "Check": {"TTL": 2**63 - 1, "SuccessBeforePassing": 2**63 - 1}}, node="n",
        enable_script_checks=False)
    assert checks[0].definition.success_before_passing == 2**63 - 1
    assert math.isclose(checks[0].definition.ttl, (2**63 - 1) / 1e9)


# -- through the real app on a loopback socket ---------------------------------------------------


class Agent:
    """The embedded catalog's HTTP API on 127.0.0.1, driven from synchronous Hypothesis tests
    through a private event loop, with a few things registered that must survive every body."""

    def __init__(self) -> None:
        self.runner = asyncio.Runner()
        self.loop = self.runner.get_loop()
        self.run(self._start())

    def run(self, coro: Any) -> Any:
        return self.runner.run(coro)

    async def _start(self) -> None:
        self.store = Store(datacenter="dc1", node_name="node1", node_address="127.0.0.1", data_dir=None)
        await self.store.open()
        self.health = HealthChecker(self.store, enable_script_checks=False)
        await self.health.start()
        self.web = web.AppRunner(make_app(self.store, self.health, Config(node_name="node1")))
        await self.web.setup()
        site = web.TCPSite(self.web, "127.0.0.1", 0)
        await site.start()
        self.base = f"http://127.0.0.1:{self.web.addresses[0][1]}"
        self.session = aiohttp.ClientSession()
        keep = Service(node="node1", id="keep-1", name="keep", port=80, tags=("a",))
        ttl = Check(node="node1", check_id="keepttl", name="k", service_id="keep-1", service_name="keep",
                    definition=CheckDefinition(ttl=3600.0))
        await self.store.register_service(keep, [ttl])
        req = definition.decode_register_request(
            {"Node": "keepnode", "Address": "10.9.9.9", "Service": {"Service": "keepsvc", "Port": 1}}, datacenter="dc1")
        await self.store.catalog_register(req)
        await self.store.kv_put("keep/key", b"v")

    async def call(self, method: str, path: str, data: bytes) -> tuple[int, str, str]:
        async with self.session.request(method, self.base + path, data=data) as r:
            return r.status, r.headers.get("Content-Type", ""), await r.text(errors="replace")

    def held(self) -> tuple[object, ...]:
        """What was registered before the test, as the store now has it."""
        services = {s.id: (s.name, s.port) for s in self.store.agent_services()}
        checks = {c.check_id for c in self.store.agent_checks()}
        nodes = {n.name: n.address for n in self.store.nodes()}
        kv = self.store.kv_get("keep/key")
        return (services.get("keep-1"), "keepttl" in checks, nodes.get("keepnode"),
                kv.value if kv is not None else None, [s.id for s in self.store.node_services("keepnode")])

    def close(self) -> None:
        async def stop() -> None:
            await self.session.close()
            await self.web.cleanup()
            await self.health.stop()
            await self.store.close()

        self.run(stop())
        self.runner.close()


@pytest.fixture(scope="module")
def agent() -> Iterator[Agent]:
    a = Agent()
    try:
        yield a
    finally:
        a.close()


EXPECTED_HELD = (("keep", 80), True, "10.9.9.9", b"v", ["keepsvc"])

# Consul answers these catalog-write refusals with 500 and its RPC text (agent/structs checks).
RPC_REFUSALS = (
    "Must provide node", "Bad node ID", "Must provide address", "Invalid node metadata",
    "Must provide service name", "Invalid service address", "Invalid Service Meta", "Missing check ID",
    "Node '", "No path to datacenter", "Missing node registration", "Unknown service ID",
    definition.SCRIPTS_DISABLED,
)

ENDPOINTS = {
    "service": ("PUT", "/v1/agent/service/register"),
    "check": ("PUT", "/v1/agent/check/register"),
    "update": ("PUT", "/v1/agent/check/update/keepttl"),
    "register": ("PUT", "/v1/catalog/register"),
    "deregister": ("PUT", "/v1/catalog/deregister"),
}


def _through_the_app(agent: Agent, kind: str, raw: bytes) -> None:
    method, path = ENDPOINTS[kind]
    status, ctype, text = agent.run(agent.call(method, path, raw))
    assert status in (200, 400, 404, 500), (status, text)
    if status != 200:
        assert ctype.startswith("text/plain") and text, (status, text)
        assert not text.startswith("internal error"), text
        if status == 500:
            assert text.startswith(RPC_REFUSALS), text
    assert agent.held() == EXPECTED_HELD, (kind, raw)


@pytest.mark.parametrize("kind", list(ENDPOINTS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_app_on_shaped_and_arbitrary_bodies(agent, kind, data):
    body = data.draw(st.one_of(DECODERS[kind][0], ANY_JSON))
    _through_the_app(agent, kind, json.dumps(body).encode())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(list(ENDPOINTS)), raw=st.binary(max_size=30))
def test_app_on_raw_bytes(agent, kind, raw):
    _through_the_app(agent, kind, raw)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.binary(max_size=64), flags=st.none() | st.sampled_from(["0", "42", "-1", "x", "18446744073709551616"]))
def test_kv_put_stores_any_bytes(agent, value, flags):
    path = "/v1/kv/fuzz/k" + (f"?flags={flags}" if flags is not None else "")
    status, _ctype, text = agent.run(agent.call("PUT", path, value))
    if flags in (None, "0", "42"):
        assert (status, text.strip()) == (200, "true")
        entry = agent.store.kv_get("fuzz/k")
        assert entry is not None and entry.value == value and entry.flags == int(flags or 0)
    else:
        # Consul hands strconv's error back as a 500 (kvs_endpoint.go); never our "internal error".
        assert status == 500 and text.startswith("strconv.ParseUint: parsing "), (status, text)
    assert agent.held() == EXPECTED_HELD


@pytest.mark.parametrize("text", ["9999999999999999999999h", "2562048h", "1e3s"])
def test_duration_string_past_int64_is_refused(text):
    # time.ParseDuration refuses what overflows an int64 of nanoseconds (2562047h47m16s is the
    # most); we used to accept 3.6e25 s.
    with pytest.raises(DecodeError, match="time: invalid duration"):
        definition.decode_service_definition({"Name": "x", "Check": {"TTL": text}}, node="n", enable_script_checks=False)


def test_duration_string_at_the_int64_edge_is_accepted():
    _service, checks = definition.decode_service_definition(
        {"Name": "x", "Check": {"TTL": "2562047h"}}, node="n", enable_script_checks=False)
    assert checks[0].definition.ttl == 2562047 * 3600.0
