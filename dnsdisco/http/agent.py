"""``/v1/agent/*``: the agent's own services and checks, TTL updates, maintenance, self, reload.

This module owns the agent endpoints (``spec/http-api.md`` b.1-b.7): it decodes bodies with
:mod:`dnsdisco.catalog.definition`, writes through the store (which answers only once the write
is durable), and sends TTL updates through the health checker so that its timer is reset. Agent
writes answer 200 with an empty body; agent reads carry no index (they do not block).
"""

from __future__ import annotations

import hashlib
import json

from aiohttp import web

from dnsdisco import __version__
from dnsdisco.catalog.definition import (
    decode_check_definition,
    decode_check_update,
    decode_service_definition,
)
from dnsdisco.catalog.model import CRITICAL, PASSING, WARNING, aggregate_status
from dnsdisco.catalog.store import (
    AGENT_SOURCES,
    NODE_MAINTENANCE_ID,
    SERVICE_MAINTENANCE_PREFIX,
    SOURCE_API,
)
from dnsdisco.errors import CatalogError, DnsdiscoError
from dnsdisco.http import shapes
from dnsdisco.http.query import (
    CONFIG,
    HEALTH,
    RELOAD,
    STORE,
    Reload,
    empty_response,
    error_response,
    json_response,
    read_json,
    refuse_filter,
)
from dnsdisco.values import go_bool

# The Consul version whose HTTP API this agent follows; clients gate features on it.
CONSUL_API_VERSION = "1.20.6"
SERF_LAN_PORT = 8301

routes = web.RouteTableDef()


def leader_addr(request: web.Request) -> str:
    """The embedded "server" RPC address: ``/v1/status/leader`` and ``Stats.consul.leader_addr``."""
    store = request.app[STORE]
    host = store.node_address
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{store.server_port}"


# -- services ----------------------------------------------------------------------------------


@routes.put("/v1/agent/service/register")
async def register_service(request: web.Request) -> web.Response:
    store = request.app[STORE]
    body = await read_json(request)
    service, checks = decode_service_definition(
        body, node=store.node_name, enable_script_checks=request.app[CONFIG].enable_script_checks)
    raw = request.query.get("replace-existing-checks")
    # Present and empty, or "true" in any case, as Consul reads it.
    replace = raw is not None and (raw == "" or raw.lower() == "true")
    await store.register_service(service, checks, replace_existing_checks=replace, source=SOURCE_API)
    return empty_response()


@routes.put("/v1/agent/service/deregister/{service_id:.*}")
async def deregister_service(request: web.Request) -> web.Response:
    store = request.app[STORE]
    await store.deregister_service(store.node_name, request.match_info["service_id"])
    return empty_response()


def _enable_param(request: web.Request) -> bool:
    raw = request.query.get("enable")
    if raw is None:
        raise CatalogError("Missing value for enable", 400)
    value = go_bool(raw)
    if value is None:
        raise CatalogError(f'Invalid value for enable: "{raw}"', 400)
    return value


@routes.put("/v1/agent/service/maintenance/{service_id:.*}")
async def service_maintenance(request: web.Request) -> web.Response:
    enable = _enable_param(request)
    await request.app[STORE].set_service_maintenance(
        request.match_info["service_id"], enable, request.query.get("reason", ""))
    return empty_response()


@routes.put("/v1/agent/maintenance")
async def node_maintenance(request: web.Request) -> web.Response:
    enable = _enable_param(request)
    await request.app[STORE].set_node_maintenance(enable, request.query.get("reason", ""))
    return empty_response()


@routes.get("/v1/agent/services")
async def services(request: web.Request) -> web.Response:
    refuse_filter(request)
    store = request.app[STORE]
    return json_response(request, {s.id: shapes.agent_service(s, store.datacenter) for s in store.agent_services()})


# Not the PUT-only paths beside it: a GET there is Consul's 405, not an unknown service.
@routes.get("/v1/agent/service/{service_id:(?!register$|deregister/|maintenance/).*}")
async def service(request: web.Request) -> web.Response:
    store = request.app[STORE]
    sid = request.match_info["service_id"]
    svc = store.service(store.node_name, sid)
    if svc is None or store.service_source(store.node_name, sid) not in AGENT_SOURCES:
        raise CatalogError(f"unknown service ID: {sid}", 404)
    out = shapes.agent_service(svc, store.datacenter)
    content_hash = hashlib.sha256(json.dumps(out, sort_keys=True).encode()).hexdigest()[:16]
    out["ContentHash"] = content_hash
    return json_response(request, out, headers={"X-Consul-ContentHash": content_hash})


def _aggregate(request: web.Request, sids: list[str]) -> tuple[str, list[dict]]:
    store = request.app[STORE]
    results = []
    worst = PASSING
    for sid in sids:
        svc = store.service(store.node_name, sid)
        assert svc is not None
        entry = next(e for e in store.health_service(svc.name) if e.service.id == sid
                     and e.node.name.lower() == store.node_name.lower())
        status = aggregate_status(entry.checks)
        if any(c.check_id == NODE_MAINTENANCE_ID or c.check_id.startswith(SERVICE_MAINTENANCE_PREFIX)
               for c in entry.checks):
            status = "maintenance"
        results.append({"AggregatedStatus": status,
                        "Service": shapes.agent_service(svc, store.datacenter),
                        "Checks": [shapes.check(c) for c in entry.checks]})
        worst = _worse(worst, status)
    return worst, results


_ORDER = {PASSING: 0, WARNING: 1, CRITICAL: 2, "maintenance": 3}
_CODE = {PASSING: 200, WARNING: 429, CRITICAL: 503, "maintenance": 503}


def _worse(a: str, b: str) -> str:
    return a if _ORDER[a] >= _ORDER[b] else b


@routes.get("/v1/agent/health/service/id/{service_id:.*}")
async def health_by_id(request: web.Request) -> web.Response:
    store = request.app[STORE]
    sid = request.match_info["service_id"]
    text = request.query.get("format") == "text"
    if sid not in {s.id for s in store.agent_services()}:
        msg = f"ServiceId {sid} not found"
        return error_response(404, msg) if text else json_response(request, msg, status=404)
    status, results = _aggregate(request, [sid])
    if text:
        return error_response(_CODE[status], status)
    return json_response(request, results[0], status=_CODE[status])


@routes.get("/v1/agent/health/service/name/{name:.*}")
async def health_by_name(request: web.Request) -> web.Response:
    store = request.app[STORE]
    name = request.match_info["name"]
    text = request.query.get("format") == "text"
    sids = [s.id for s in store.agent_services() if s.name == name]
    if not sids:
        msg = f"ServiceName {name} Not Found"
        return error_response(404, msg) if text else json_response(request, msg, status=404)
    status, results = _aggregate(request, sids)
    if text:
        return error_response(_CODE[status], status)
    return json_response(request, results, status=_CODE[status])


# -- checks ------------------------------------------------------------------------------------


@routes.put("/v1/agent/check/register")
async def register_check(request: web.Request) -> web.Response:
    store = request.app[STORE]
    body = await read_json(request)
    check = decode_check_definition(
        body, node=store.node_name, enable_script_checks=request.app[CONFIG].enable_script_checks)
    await store.register_check(check, source=SOURCE_API)
    return empty_response()


@routes.put("/v1/agent/check/deregister/{check_id:.*}")
async def deregister_check(request: web.Request) -> web.Response:
    store = request.app[STORE]
    await store.deregister_check(store.node_name, request.match_info["check_id"])
    return empty_response()


async def _ttl(request: web.Request, status: str) -> web.Response:
    await request.app[HEALTH].ttl_update(request.match_info["check_id"], status, request.query.get("note", ""))
    return empty_response()


@routes.put("/v1/agent/check/pass/{check_id:.*}")
async def check_pass(request: web.Request) -> web.Response:
    return await _ttl(request, PASSING)


@routes.put("/v1/agent/check/warn/{check_id:.*}")
async def check_warn(request: web.Request) -> web.Response:
    return await _ttl(request, WARNING)


@routes.put("/v1/agent/check/fail/{check_id:.*}")
async def check_fail(request: web.Request) -> web.Response:
    return await _ttl(request, CRITICAL)


@routes.put("/v1/agent/check/update/{check_id:.*}")
async def check_update(request: web.Request) -> web.Response:
    status, output = decode_check_update(await read_json(request))
    await request.app[HEALTH].ttl_update(request.match_info["check_id"], status, output)
    return empty_response()


@routes.get("/v1/agent/checks")
async def checks(request: web.Request) -> web.Response:
    refuse_filter(request)
    return json_response(request, {c.check_id: shapes.check(c) for c in request.app[STORE].agent_checks()})


# -- self, members, reload ---------------------------------------------------------------------


def _member(request: web.Request) -> dict:
    store = request.app[STORE]
    return {
        "Name": store.node_name,
        "Addr": store.node_address,
        "Port": SERF_LAN_PORT,
        "Tags": {
            "role": "consul",
            "dc": store.datacenter,
            "port": str(store.server_port),
            "id": store.node_id,
            "build": f"{CONSUL_API_VERSION}:dnsdisco-{__version__}",
            "bootstrap": "1",
            "vsn": "2",
            "vsn_min": "2",
            "vsn_max": "3",
        },
        "Status": 1,  # alive
        "ProtocolMin": 1,
        "ProtocolMax": 5,
        "ProtocolCur": 2,
        "DelegateMin": 2,
        "DelegateMax": 5,
        "DelegateCur": 4,
    }


@routes.get("/v1/agent/self")
async def agent_self(request: web.Request) -> web.Response:
    store = request.app[STORE]
    node = store.node(store.node_name)
    return json_response(request, {
        "Config": {
            "Datacenter": store.datacenter,
            "PrimaryDatacenter": store.datacenter,
            "NodeName": store.node_name,
            "NodeID": store.node_id,
            "Revision": f"dnsdisco-{__version__}",
            "Server": True,
            "Version": CONSUL_API_VERSION,
            "BuildDate": "",
        },
        "DebugConfig": {},
        "Coord": None,
        "Member": _member(request),
        "Stats": {
            "consul": {
                "leader": "true",
                "leader_addr": leader_addr(request),
                "server": "true",
                "bootstrap": "true",
                "known_datacenters": "1",
            },
            "dnsdisco": {"version": __version__, "catalog_index": str(store.index)},
        },
        "Meta": dict(node.meta) if node else {},
        # Present on a Consul agent with gRPC enabled; dnsdisco serves no xDS (port -1).
        "xDS": {"SupportedProxies": {}, "Port": -1, "Ports": {"Plaintext": -1, "TLS": -1}},
    })


@routes.get("/v1/agent/members")
async def members(request: web.Request) -> web.Response:
    return json_response(request, [_member(request)])


@routes.put("/v1/agent/reload")
async def reload(request: web.Request) -> web.Response:
    fn: Reload | None = request.app[RELOAD]  # type: ignore[assignment]
    if fn is not None:
        try:
            await fn()
        except CatalogError:
            raise
        except DnsdiscoError as e:
            raise CatalogError(f"Failed reloading: {e}", 500) from e
    return empty_response()
