"""The health checker against the real store (in memory) and real loopback targets: results
flow through the store, TTL updates and expiry, thresholds, and the reaper."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable

import pytest
from aiohttp import web

from dnsdisco.catalog.health import HealthChecker
from dnsdisco.catalog.model import CRITICAL, PASSING, WARNING, Check, CheckDefinition, Service
from dnsdisco.catalog.store import Store

pytestmark = pytest.mark.integration

NODE = "node-a"


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    s = Store(datacenter="dc1", node_name=NODE, node_address="127.0.0.1", data_dir=None)
    await s.open()
    yield s
    await s.close()


class Target:
    """A loopback HTTP server that answers with whatever status the test sets."""

    def __init__(self) -> None:
        self.status = 200
        self.hits = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        return web.Response(status=self.status, text=f"status {self.status}")


@pytest.fixture
async def target() -> AsyncIterator[Target]:
    t = Target()
    app = web.Application()
    app.router.add_get("/health", t.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    t.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/health"  # type: ignore[union-attr]
    yield t
    await runner.cleanup()


@pytest.fixture
async def checker(store: Store) -> AsyncIterator[HealthChecker]:
    hc = HealthChecker(store, min_interval=0.01, reap_interval=0.05, min_deregister_after=0.01)
    await hc.start()
    yield hc
    await hc.stop()


async def register(store: Store, service_id: str, *defns: CheckDefinition,
                   status: str = CRITICAL) -> list[str]:
    """Register *service_id* with one check per definition; return the check IDs."""
    ids = [f"service:{service_id}" if len(defns) == 1 else f"service:{service_id}:{i}"
           for i in range(1, len(defns) + 1)]
    checks = [Check(NODE, cid, f"Service '{service_id}' check", status=status,
                    service_id=service_id, service_name=service_id, definition=d)
              for cid, d in zip(ids, defns)]
    await store.register_service(Service(NODE, service_id, service_id, port=80), checks)
    return ids


def status_of(store: Store, check_id: str) -> str | None:
    c = store.check(NODE, check_id)
    return None if c is None else c.status


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def wait_for(pred: Callable[[], bool], timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_http_check_follows_the_target(store, checker, target):
    (cid,) = await register(store, "web", CheckDefinition(http=target.url, interval=0.05))
    assert status_of(store, cid) == CRITICAL  # registered status until the first run
    await wait_for(lambda: status_of(store, cid) == PASSING)
    assert store.check(NODE, cid).output == f"HTTP GET {target.url}: 200 OK Output: status 200"
    target.status = 429
    await wait_for(lambda: status_of(store, cid) == WARNING)
    assert store.check(NODE, cid).output.endswith(": 429 Too Many Requests Output: status 429")
    target.status = 500
    await wait_for(lambda: status_of(store, cid) == CRITICAL)
    target.status = 200
    await wait_for(lambda: status_of(store, cid) == PASSING)


async def test_tcp_check_up_and_down(store, checker):
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    addr = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    (cid,) = await register(store, "db", CheckDefinition(tcp=addr, interval=0.05))
    await wait_for(lambda: status_of(store, cid) == PASSING)
    assert store.check(NODE, cid).output == f"TCP connect {addr}: Success"
    server.close()
    await server.wait_closed()
    await wait_for(lambda: status_of(store, cid) == CRITICAL)
    assert store.check(NODE, cid).output.startswith(f"dial tcp {addr}: ")


async def test_ttl_pass_then_expiry(store, checker):
    (cid,) = await register(store, "batch", CheckDefinition(ttl=0.2))
    await checker.ttl_update(cid, PASSING, "working")
    # ttl_update returns after the store has it.
    assert (status_of(store, cid), store.check(NODE, cid).output) == (PASSING, "working")
    await wait_for(lambda: status_of(store, cid) == CRITICAL, 1.0)
    assert store.check(NODE, cid).output == "TTL expired (last output before timeout follows): working"


async def test_thresholds_damp_flapping(store, checker, target):
    (cid,) = await register(store, "api", CheckDefinition(
        http=target.url, interval=0.03, failures_before_warning=2, failures_before_critical=4,
        success_before_passing=2))
    await wait_for(lambda: status_of(store, cid) == PASSING)  # the first result applies at once
    target.status = 500
    hits = target.hits
    await wait_for(lambda: status_of(store, cid) == WARNING)
    assert target.hits - hits >= 2
    await wait_for(lambda: status_of(store, cid) == CRITICAL)
    assert target.hits - hits >= 4
    target.status = 200
    hits = target.hits
    await wait_for(lambda: status_of(store, cid) == PASSING)
    assert target.hits - hits >= 2


async def test_reaper_removes_a_service_that_stays_critical(store, checker):
    (cid,) = await register(store, "doomed", CheckDefinition(ttl=30, deregister_critical_service_after=0.1))
    (keep,) = await register(store, "kept", CheckDefinition(ttl=30, deregister_critical_service_after=0.1),
                             status=PASSING)
    await wait_for(lambda: store.check(NODE, cid) is None, 2.0)
    assert store.check(NODE, keep) is not None
    assert status_of(store, keep) == PASSING


async def test_checks_registered_before_start_are_scheduled(store, target):
    (cid,) = await register(store, "early", CheckDefinition(http=target.url, interval=0.05))
    hc = HealthChecker(store, min_interval=0.01)
    await hc.start()
    try:
        await wait_for(lambda: status_of(store, cid) == PASSING)
    finally:
        await hc.stop()


async def test_reregistration_restarts_and_deregistration_stops_the_runner(store, checker, target):
    (cid,) = await register(store, "web", CheckDefinition(http=target.url, interval=0.03))
    await wait_for(lambda: status_of(store, cid) == PASSING)
    # Same ID, new definition: the old runner stops, the new one probes the new target.
    closed = f"127.0.0.1:{free_port()}"
    await register(store, "web", CheckDefinition(tcp=closed, interval=0.03))
    await wait_for(lambda: status_of(store, cid) == CRITICAL)
    assert store.check(NODE, cid).output.startswith(f"dial tcp {closed}")
    hits = target.hits
    await asyncio.sleep(0.1)
    assert target.hits == hits  # nothing probes the old URL any more
    await register(store, "web2", CheckDefinition(http=target.url, interval=0.03))
    await wait_for(lambda: target.hits > hits)
    await store.deregister_service(NODE, "web2")
    await asyncio.sleep(0.05)
    hits = target.hits
    await asyncio.sleep(0.1)
    assert target.hits == hits


async def test_ttl_update_returns_once_durable(tmp_path):
    s = Store(datacenter="dc1", node_name=NODE, node_address="127.0.0.1", data_dir=str(tmp_path))
    await s.open()
    hc = HealthChecker(s)
    await hc.start()
    try:
        (cid,) = await register(s, "batch", CheckDefinition(ttl=30))
        await hc.ttl_update(cid, WARNING, "slow")
        # Committed (so fsynced, with a data dir) by the time ttl_update returns.
        assert (status_of(s, cid), s.check(NODE, cid).output) == (WARNING, "slow")
    finally:
        await hc.stop()
        await s.close()
    again = Store(datacenter="dc1", node_name=NODE, node_address="127.0.0.1", data_dir=str(tmp_path))
    await again.open()
    try:
        assert (status_of(again, cid), again.check(NODE, cid).output) == (WARNING, "slow")
    finally:
        await again.close()
