"""``/v1/catalog/*`` and ``/v1/health/*``: the catalog as the rest of the cluster sees it.

This module owns the catalog and health endpoints (``spec/http-api.md`` b.9, b.10): reads that
block on the store's topics and answer with that topic's index, and the catalog register /
deregister writes used by external health checkers. Unknown services answer ``[]`` and unknown
nodes ``null``, both 200 with an index, as Consul does.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from dnsdisco.catalog.definition import decode_deregister_request, decode_register_request
from dnsdisco.catalog.model import PASSING, STATUSES, Check
from dnsdisco.catalog.store import Store, summarise_services
from dnsdisco.errors import CatalogError
from dnsdisco.http import shapes
from dnsdisco.http.query import (
    BODIES,
    CHECK_JSON,
    NODE_JSON,
    STORE,
    Read,
    check_dc,
    encode_json,
    json_body_response,
    json_response,
    meta_matches,
    node_meta_filter,
    read_json,
    refuse_filter,
)
from dnsdisco.sync.consul import (
    CHANGED_SERVICES_HEADER,
    SERVICES_DELTA_HEADER,
    WANT_CHANGES_HEADER,
    WANT_DELTA,
    WANT_ENTRIES,
)
from dnsdisco.values import go_bool

routes = web.RouteTableDef()


def _tags(request: web.Request) -> list[str]:
    # Consul matches tags without regard to case; an instance must carry every tag asked for.
    return [t.lower() for t in request.query.getall("tag", []) if t]


def _has_tags(tags: tuple[str, ...], wanted: list[str]) -> bool:
    if not wanted:
        return True
    have = {t.lower() for t in tags}
    return all(w in have for w in wanted)


# -- catalog reads -----------------------------------------------------------------------------


def _path_name(request: web.Request, param: str, missing: str) -> str:
    name = request.match_info[param]
    if not name:
        raise CatalogError(missing, 400)
    return name


async def _blocking(request: web.Request, topic: str, *more: str) -> tuple[Read, int]:
    """Parse the read options, then block on *topic* (and *more*); return them and the index to
    answer (the highest of theirs)."""
    read = Read(request)
    refuse_filter(request)
    store = request.app[STORE]
    topics = [topic, *more]
    return read, await read.block(topics, lambda: max(store.topic_index(t) for t in topics))


@routes.get("/v1/catalog/datacenters")
async def datacenters(request: web.Request) -> web.Response:
    return json_response(request, [request.app[STORE].datacenter])


@routes.get("/v1/catalog/nodes")
async def nodes(request: web.Request) -> web.Response:
    read, index = await _blocking(request, "nodes")
    wanted = node_meta_filter(request)
    everyone = request.app[STORE].nodes()
    chosen = [n for n in everyone if meta_matches(n.meta, wanted)] if wanted else everyone
    # Every node, read again after each node write (mirrors): each node's JSON is reused
    # while it is unchanged; a read of all of them drops the rest.
    body = request.app[NODE_JSON].body(request, chosen, limit=_json_limit(len(everyone)), prune=not wanted)
    return json_body_response(body, headers=read.headers(index))


@routes.get("/v1/catalog/services")
async def services(request: web.Request) -> web.Response:
    wanted = node_meta_filter(request)
    # With ?node-meta= the answer depends on the nodes too (Consul's ServicesByNodeMeta index
    # covers both tables): a node's meta changing must wake the read.
    read, index = await _blocking(request, "services", *(("nodes",) if wanted else ()))
    store = request.app[STORE]
    headers = read.headers(index)
    want = request.headers.get(WANT_CHANGES_HEADER)
    if want and read.index and index > read.index:
        names = store.services_changed_since(read.index, CHANGED_SERVICES_LIMIT)
        headers[CHANGED_SERVICES_HEADER] = _names_header(names)
        if want in (WANT_DELTA, WANT_ENTRIES) and names is not None and not wanted:
            # Only the named services' entries (a name absent from the body is gone): the
            # write costs what it touched, not a list of every service per follower per write.
            delta: dict[str, list[str]] = {}
            for lname in names:
                delta.update(store.service_tags(lname))
            if want == WANT_DELTA:
                headers[SERVICES_DELTA_HEADER] = "1"
                return json_response(request, delta, headers=headers)
            # ... with their health entries as /v1/health/service answers them (the follower
            # would read each next): one hand-off per write instead of two.
            entries = ",".join(
                '{}:{{"Index":{},"Rows":{}}}'.format(json.dumps(lname), *_health_body(request, lname))
                for lname in names)
            headers[SERVICES_DELTA_HEADER] = WANT_ENTRIES
            return json_body_response(f'{{"Services":{encode_json(request, delta)},"Entries":{{{entries}}}}}',
                                      headers=headers)
    if wanted:
        out = summarise_services(s for s in store.services()
                                 if meta_matches(getattr(store.node(s.node), "meta", {}), wanted))
    else:
        out = store.service_names()
    return json_response(request, out, headers=headers)


# A dnsdisco extension, not Consul's (the header names are dnsdisco.sync.consul's, the client
# side): a blocking catalog/services read that sends ``X-Dnsdisco-Want-Changes`` gets, when the
# index moved, the lower-cased names whose service rows were written since the index it sent -
# a JSON list, or ``*`` when that is not known. Consul has nothing like it (a mirror of Consul
# must find the service itself); a mirror of dnsdisco (the DNS workers) reads just those
# services. Consul ignores the request header. With the value ``delta``, a reply that can name
# them carries only those names' entries (``X-Dnsdisco-Services-Delta: 1``), not every service;
# with ``entries``, also each one's health entries (``X-Dnsdisco-Services-Delta: entries``;
# the body's shape is dnsdisco.sync.consul.WANT_ENTRIES'), so the mirror reads nothing more.
# /v1/health/state/<status> carries the same header for check writes (see health_state).
CHANGED_SERVICES_LIMIT = 256


def _names_header(names: list[str] | None) -> str:
    # ensure_ascii: a header is latin-1 on the wire, and JSON escapes any CR/LF in a name.
    return "*" if names is None else json.dumps(names, separators=(",", ":"))


@routes.get("/v1/catalog/service/{name:.*}")
async def service(request: web.Request) -> web.Response:
    name = _path_name(request, "name", "Missing service name")
    read, index = await _blocking(request, f"svc:{name.lower()}")
    tags = _tags(request)
    wanted = node_meta_filter(request)
    out = [shapes.service_node(n, s) for n, s in request.app[STORE].service_instances(name)
           if _has_tags(s.tags, tags) and meta_matches(n.meta, wanted)]
    return json_response(request, out, headers=read.headers(index))


def _body_key(request: web.Request, *what: Any) -> tuple[Any, ...]:
    """The BodyCache key of a read: *what* (the endpoint, the lower name, the topic index)
    and every query option but the blocking and consistency ones."""
    return (*what, tuple(sorted((k, v) for k, v in request.query.items() if k not in _NOT_IN_BODY)))


async def _node(request: web.Request, *, as_list: bool) -> web.Response:
    name = _path_name(request, "node", "Missing node name")
    read, index = await _blocking(request, f"node:{name.lower()}")
    # A mirror's sweep reads every node's services: most are as they were at this index.
    key = _body_key(request, "node-services" if as_list else "node", name.lower(), index)
    cache = request.app[BODIES]
    body = cache.get(key)
    if body is None:
        store = request.app[STORE]
        n = store.node(name)
        out = None  # an unknown node is a 200 with null: py-consul returns None
        if n is not None:
            listed = [shapes.node_service(s) for s in store.node_services(name)]
            out = {"Node": shapes.node(n), "Services": listed if as_list else {s["ID"]: s for s in listed}}
        body = encode_json(request, out)
        cache.put(key, body)
    return json_body_response(body, headers=read.headers(index))


@routes.get("/v1/catalog/node/{node:.*}")
async def node(request: web.Request) -> web.Response:
    return await _node(request, as_list=False)


@routes.get("/v1/catalog/node-services/{node:.*}")
async def node_services(request: web.Request) -> web.Response:
    return await _node(request, as_list=True)


# -- catalog writes ----------------------------------------------------------------------------


@routes.put("/v1/catalog/register")
async def register(request: web.Request) -> web.Response:
    check_dc(request)
    store = request.app[STORE]
    req = decode_register_request(await read_json(request), datacenter=store.datacenter)
    await store.catalog_register(req)
    return json_response(request, True)


@routes.put("/v1/catalog/deregister")
async def deregister(request: web.Request) -> web.Response:
    check_dc(request)
    store = request.app[STORE]
    req = decode_deregister_request(await read_json(request), datacenter=store.datacenter)
    if req.datacenter != store.datacenter:
        raise CatalogError("No path to datacenter", 500)
    await store.catalog_deregister(req.node, service_id=req.service_id, check_id=req.check_id)
    return json_response(request, True)


# -- health ------------------------------------------------------------------------------------


def _passing(request: web.Request) -> bool:
    if "passing" not in request.query:
        return False
    raw = request.query["passing"]
    if raw == "":
        return True
    value = go_bool(raw)
    if value is None:
        raise CatalogError("Invalid value for ?passing", 400)
    return value


@routes.get("/v1/health/service/{name:.*}")
async def health_service(request: web.Request) -> web.Response:
    passing = _passing(request)
    name = _path_name(request, "name", "Missing service name")
    read, index = await _blocking(request, f"health:{name.lower()}")
    # What the body depends on besides the index: the name as asked (Service.Service echoes
    # the stored spelling, but filters below read the query) and every option but the
    # blocking and consistency ones.
    key = _body_key(request, "health", name.lower(), index)
    cache = request.app[BODIES]
    body = cache.get(key)
    if body is None:
        rows = _health_rows(request.app[STORE], name, tags=_tags(request), wanted=node_meta_filter(request),
                            passing=passing)
        body = encode_json(request, rows)
        cache.put(key, body)
    return json_body_response(body, headers=read.headers(index))


def _health_rows(store: Store, name: str, *, tags: list[str] | None = None,
                 wanted: list[tuple[str, str]] | None = None, passing: bool = False) -> list[dict[str, Any]]:
    out = []
    for entry in store.health_service(name):
        if not _has_tags(entry.service.tags, tags or []) or not meta_matches(entry.node.meta, wanted or []):
            continue
        # ?passing drops an instance with any non-passing check, node checks and warnings
        # included; the index still covers everything (Consul filters after the RPC).
        if passing and any(c.status != PASSING for c in entry.checks):
            continue
        out.append({"Node": shapes.node(entry.node), "Service": shapes.node_service(entry.service),
                    "Checks": [shapes.check(c) for c in entry.checks]})
    return out


def _health_body(request: web.Request, lname: str) -> tuple[int, str]:
    """``/v1/health/service/<lname>``'s index and body without options, through the body
    cache (the key a plain read of it uses)."""
    store = request.app[STORE]
    index = max(store.topic_index(f"health:{lname}"), 1)
    key = ("health", lname, index, ())
    cache = request.app[BODIES]
    body = cache.get(key)
    if body is None:
        body = json.dumps(_health_rows(store, lname), separators=(",", ":"))
        cache.put(key, body)
    return index, body


# Query options that do not change a read's body (blocking, consistency, the token).
_NOT_IN_BODY = frozenset(("index", "wait", "stale", "consistent", "cached", "token", "hash"))


def _on_matching_node(store: Store, checks: list[Check], wanted: list[tuple[str, str]]) -> list[Check]:
    if not wanted:
        return checks
    out = []
    for c in checks:
        n = store.node(c.node)
        if n is not None and meta_matches(n.meta, wanted):
            out.append(c)
    return out


@routes.get("/v1/health/checks/{name:.*}")
async def health_checks(request: web.Request) -> web.Response:
    name = _path_name(request, "name", "Missing service name")
    read, index = await _blocking(request, f"health:{name.lower()}")
    store = request.app[STORE]
    chosen = _on_matching_node(store, store.service_checks(name), node_meta_filter(request))
    return json_body_response(request.app[CHECK_JSON].body(request, chosen, limit=_check_json_limit(store)),
                              headers=read.headers(index))


def _check_json_limit(store: Store) -> int:
    return _json_limit(store.check_count())


def _json_limit(count: int) -> int:
    # An ItemJson's bound: twice the items there are, room for those replaced since the last
    # whole read.
    return 2 * count + 1024


@routes.get("/v1/health/state/{state:.*}")
async def health_state(request: web.Request) -> web.Response:
    state = _path_name(request, "state", "Missing check state")
    read, index = await _blocking(request, "checks")
    store = request.app[STORE]
    headers = read.headers(index)
    if request.headers.get(WANT_CHANGES_HEADER) and read.index and index > read.index:
        # The change hint of catalog/services, for checks: the services a check write since the
        # request's index bears on, so that a mirror reads those instead of every check.
        names = store.checks_changed_since(read.index, CHANGED_SERVICES_LIMIT)
        headers[CHANGED_SERVICES_HEADER] = _names_header(names)
    if state == "any":
        chosen = store.checks()
    elif state in STATUSES:
        chosen = store.checks_in_state(state)
    else:
        chosen = []  # Consul answers an unknown state with nothing, not an error
    wanted = node_meta_filter(request)
    chosen = _on_matching_node(store, chosen, wanted)
    # Every check, read again after each check write (a mirror's catch-up, exporters): each
    # check's JSON is reused while it is unchanged; a read of all of them drops the rest.
    body = request.app[CHECK_JSON].body(request, chosen, limit=_check_json_limit(store),
                                        prune=state == "any" and not wanted)
    return json_body_response(body, headers=headers)


@routes.get("/v1/health/node/{node:.*}")
async def health_node(request: web.Request) -> web.Response:
    name = _path_name(request, "node", "Missing node name")
    read, index = await _blocking(request, f"nodechecks:{name.lower()}")
    store = request.app[STORE]
    body = request.app[CHECK_JSON].body(request, store.node_checks(name), limit=_check_json_limit(store))
    return json_body_response(body, headers=read.headers(index))
