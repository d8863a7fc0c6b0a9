"""The HTTP API application: routes of every endpoint module, and Consul's error conventions.

:func:`make_app` builds the ``aiohttp`` application around a store, a TTL updater (the health
checker) and the config; the caller runs it with ``web.AppRunner``/``web.TCPSite`` (with
``handler_cancellation=True`` so a blocking query whose client went away stops waiting). This
module owns what is common to all endpoints (``agent/http.go``): refusals become plain-text
bodies with their status, an unknown ``/v1/`` path is Consul's 404 text, a wrong method is
``405 method X not allowed`` with an ``Allow`` header, and ``OPTIONS`` answers with that header.
It also serves the Prometheus scrape (``/metrics`` and Consul's ``/v1/agent/metrics``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from dnsdisco.catalog.store import Store
from dnsdisco.config import Config
from dnsdisco.errors import CatalogError
from dnsdisco.http import agent, catalog, kv, shapes, status
from dnsdisco.http.query import (
    BODIES,
    CHECK_JSON,
    CONFIG,
    NODE_JSON,
    HEALTH,
    RELOAD,
    STORE,
    BodyCache,
    ItemJson,
    Reload,
    TTLUpdater,
    error_response,
    json_response,
)
from dnsdisco.http.status import READY, Ready
from dnsdisco.metrics import CONTENT_TYPE, Metrics

METRICS = web.AppKey("metrics", object)  # Metrics | None

log = logging.getLogger("dnsdisco.http")

# JSON bodies of register calls are small; KV values stream past this limit (512 KiB, own check).
CLIENT_MAX_SIZE = 1024 * 1024


def _allow(methods: set[str]) -> str:
    # aiohttp adds HEAD to every GET route; Consul's table has no HEAD, so it is not offered.
    return ",".join(["OPTIONS", *sorted(m for m in methods if m not in ("HEAD", "OPTIONS"))])


@web.middleware
async def consul_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn refusals into Consul's plain-text answers."""
    try:
        return await handler(request)
    except CatalogError as e:
        return error_response(e.status, e.message)
    except web.HTTPMethodNotAllowed as e:
        allow = _allow(set(e.allowed_methods))
        if request.method == "OPTIONS":
            return web.Response(status=200, headers={"Allow": allow})
        return error_response(405, f"method {request.method} not allowed", headers={"Allow": allow})
    except web.HTTPNotFound:
        if request.path.startswith("/v1/"):
            return error_response(404, "Invalid URL path: not a recognized HTTP API endpoint")
        raise
    except web.HTTPException:
        raise
    except Exception as e:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, f"internal error: {e}")


async def _common_headers(request: web.Request, response: web.StreamResponse) -> None:
    # Consul 1.9+ sends this on every response, ACLs enabled or not.
    response.headers.setdefault("X-Consul-Default-ACL-Policy", "allow")


async def _metrics(request: web.Request) -> web.Response:
    """``/metrics``: the Prometheus text format (CoreDNS *prometheus* serves the same path)."""
    metrics: Metrics | None = request.app[METRICS]  # type: ignore[assignment]
    if metrics is None:
        return error_response(404, "metrics are not enabled in this agent")
    # Rendering reads plain counters; a few ms at most, so it runs on the loop.
    return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})


async def _agent_metrics(request: web.Request) -> web.Response:
    """``/v1/agent/metrics``: ``?format=prometheus`` as ``/metrics``; otherwise a JSON summary in
    the shape of Consul's (``Gauges``, ``Counters``, ``Samples``), with our metric names."""
    if request.query.get("format") == "prometheus":
        return await _metrics(request)
    metrics: Metrics | None = request.app[METRICS]  # type: ignore[assignment]
    if metrics is None:
        return error_response(404, "metrics are not enabled in this agent")
    return json_response(request, _consul_json(metrics))


def _consul_json(metrics: Metrics) -> dict[str, Any]:
    gauges: list[dict[str, Any]] = []
    counters: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    for family in metrics.registry.collect():
        for sample in family.samples:
            labels = dict(sample.labels)
            if family.type == "gauge":
                gauges.append({"Name": sample.name, "Value": sample.value, "Labels": labels})
            elif family.type == "counter" and sample.name.endswith("_total"):
                counters.append({"Name": sample.name, "Count": sample.value, "Labels": labels})
            elif family.type == "histogram" and sample.name.endswith(("_count", "_sum")):
                samples.append({"Name": sample.name, "Value": sample.value, "Labels": labels})
    now = time.strftime("%Y-%m-%d %H:%M:%S +0000 UTC", time.gmtime())
    return {"Timestamp": now, "Gauges": gauges, "Points": [], "Counters": counters, "Samples": samples}


def make_app(store: Store, health: TTLUpdater, config: Config, *, reload: Reload | None = None,
             metrics: Metrics | None = None, ready: Ready | None = None) -> web.Application:
    """The HTTP API over *store*. *health* receives TTL updates (``/v1/agent/check/pass`` ...);
    *reload*, if given, is awaited by ``PUT /v1/agent/reload``; *metrics* is served at
    ``/metrics``; *ready* says whether ``/ready`` is 200 and what its body says (default: once
    the store is open). Tokens (``X-Consul-Token``, ``Authorization: Bearer``, ``?token=``) are
    accepted and not enforced."""
    app = web.Application(middlewares=[consul_errors], client_max_size=CLIENT_MAX_SIZE)
    app[STORE] = store
    app[HEALTH] = health
    app[CONFIG] = config
    app[RELOAD] = reload
    app[METRICS] = metrics
    app[READY] = ready
    app[BODIES] = BodyCache()
    app[CHECK_JSON] = ItemJson(shapes.check, lambda c: (c.node, c.check_id))
    app[NODE_JSON] = ItemJson(shapes.node, lambda n: n.name)
    for module in (agent, catalog, kv, status):
        app.add_routes(module.routes)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/v1/agent/metrics", _agent_metrics)
    app.on_response_prepare.append(_common_headers)
    return app


def make_ops_app(config: Config, *, metrics: Metrics | None, ready: Ready,
                 reload: Reload | None = None) -> web.Application:
    """The HTTP listener of a mirror-mode agent: it holds no catalog of its own (the Consul
    cluster it follows serves the API), so only ``/health``, ``/ready``, ``/metrics`` and
    ``PUT /v1/agent/reload``; every other ``/v1/`` path gets Consul's 404."""
    app = web.Application(middlewares=[consul_errors], client_max_size=CLIENT_MAX_SIZE)
    app[CONFIG] = config
    app[RELOAD] = reload
    app[METRICS] = metrics
    app[READY] = ready
    app.router.add_get("/health", status.health)
    app.router.add_get("/ready", status.ready)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/v1/agent/metrics", _agent_metrics)
    app.router.add_put("/v1/agent/reload", agent.reload)
    app.on_response_prepare.append(_common_headers)
    return app

