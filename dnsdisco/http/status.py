"""``/v1/status/*`` and the process probes ``/health`` and ``/ready``.

This module owns the answers that say who leads (the embedded catalog is its own single-server
cluster, so the leader and the only peer are this agent's RPC address, the same value as
``/v1/agent/self`` ``Stats.consul.leader_addr``) and whether the process is alive and ready.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from dnsdisco.http.agent import leader_addr
from dnsdisco.http.query import STORE, check_dc, json_response

# What /ready asks: (ready?, what to say). The agent passes one that knows the first catalog
# load (embedded) or the mirror's sync and staleness; without one, an open store is ready.
Ready = Callable[[], tuple[bool, str]]
READY = web.AppKey("ready", object)  # Ready | None

routes = web.RouteTableDef()


@routes.get("/v1/status/leader")
async def leader(request: web.Request) -> web.Response:
    check_dc(request)
    return json_response(request, leader_addr(request))


@routes.get("/v1/status/peers")
async def peers(request: web.Request) -> web.Response:
    check_dc(request)
    return json_response(request, [leader_addr(request)])


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """Liveness: the event loop answers."""
    return web.Response(text="alive\n")


@routes.get("/ready")
async def ready(request: web.Request) -> web.Response:
    """Readiness: 200 once the catalog is loaded; otherwise 503 naming what is missing."""
    check: Ready | None = request.app.get(READY)  # type: ignore[assignment]
    if check is not None:
        ok, why = check()
        return web.Response(status=200 if ok else 503, text=f"{why}\n")
    if request.app[STORE].is_open:
        return web.Response(text="ready\n")
    return web.Response(status=503, text="not ready: catalog store not open\n")


@routes.get("/")
async def index(request: web.Request) -> web.Response:
    return web.Response(text="dnsdisco agent: Consul-compatible HTTP API under /v1/\n")
