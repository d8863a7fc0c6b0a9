"""Fixtures for the embedded catalog's HTTP API: a real store, health checker and aiohttp app on
127.0.0.1:0, and a small client. Fixture names start with ``http_`` so that they do not collide
with the DNS tests' own fixtures."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from dnsdisco.catalog.health import HealthChecker
from dnsdisco.catalog.store import Store
from dnsdisco.config import Config
from dnsdisco.http.app import make_app


@dataclass
class Reply:
    status: int
    headers: Any
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def index(self) -> int:
        return int(self.headers["X-Consul-Index"])


@dataclass
class HttpAgent:
    """A running embedded catalog with its HTTP API; ``base`` is ``http://127.0.0.1:<port>``."""

    store: Store
    health: HealthChecker
    base: str
    port: int
    session: aiohttp.ClientSession

    async def call(self, method: str, path: str, body: Any = None, *, data: bytes | str | None = None,
                   headers: dict[str, str] | None = None) -> Reply:
        if body is not None:
            data = json.dumps(body)
        async with self.session.request(method, self.base + path, data=data, headers=headers) as r:
            return Reply(r.status, r.headers, await r.read())

    async def get(self, path: str, **kw: Any) -> Reply:
        return await self.call("GET", path, **kw)

    async def put(self, path: str, body: Any = None, **kw: Any) -> Reply:
        return await self.call("PUT", path, body, **kw)


@asynccontextmanager
async def running_http_agent(*, data_dir: str | None = None, config: Config | None = None,
                             node_name: str = "node1", reload: Any = None) -> AsyncIterator[HttpAgent]:
    """Open a store, start the health checker and serve the API on a free loopback port."""
    config = config or Config(node_name=node_name)
    store = Store(datacenter=config.datacenter, node_name=node_name, node_address="127.0.0.1",
                  data_dir=data_dir, server_port=config.server_port)
    await store.open()
    health = HealthChecker(store, enable_script_checks=config.enable_script_checks)
    await health.start()
    runner = web.AppRunner(make_app(store, health, config, reload=reload), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    session = aiohttp.ClientSession()
    try:
        yield HttpAgent(store, health, f"http://127.0.0.1:{port}", port, session)
    finally:
        await session.close()
        await runner.cleanup()
        await health.stop()
        await store.close()


@pytest.fixture
async def http_agent() -> AsyncIterator[HttpAgent]:
    """An in-memory (``-dev``) agent."""
    async with running_http_agent() as agent:
        yield agent


@pytest.fixture
async def http_agent_disk(tmp_path) -> AsyncIterator[HttpAgent]:
    """An agent with a data dir."""
    async with running_http_agent(data_dir=str(tmp_path / "data")) as agent:
        yield agent
