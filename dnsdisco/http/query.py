"""What every endpoint module shares: app state keys, query parameters, blocking reads, replies.

This module owns Consul's request conventions (``agent/http.go``): the ``index``/``wait``
blocking protocol with its clamp and jitter, the consistency flags and their conflicts, ``?dc=``,
Go-style boolean parameters, request bodies decoded with Go's error texts, minified JSON (or
``?pretty``), and the ``X-Consul-*`` headers of a read. Endpoints describe *what* they read
(topics and an index function); this module does the waiting.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from aiohttp import web

from dnsdisco.catalog.store import Store
from dnsdisco.config import Config
from dnsdisco.duration import parse_duration
from dnsdisco.errors import CatalogError, DecodeError


class TTLUpdater(Protocol):
    """What the TTL endpoints need from the health checker (``HealthChecker.ttl_update``):
    set the status, reset the TTL timer, return once the store has it. Raises CatalogError."""

    async def ttl_update(self, check_id: str, status: str, output: str) -> None: ...


Reload = Callable[[], Awaitable[None]]

STORE = web.AppKey("store", Store)
HEALTH = web.AppKey("health", TTLUpdater)
CONFIG = web.AppKey("config", Config)
RELOAD = web.AppKey("reload", object)  # Reload | None
BODIES = web.AppKey("bodies", object)  # BodyCache
CHECK_JSON = web.AppKey("check_json", object)  # ItemJson of checks
NODE_JSON = web.AppKey("node_json", object)  # ItemJson of nodes

# agent/config defaults: max_query_time and default_query_time.
MAX_QUERY_TIME = 600.0
DEFAULT_QUERY_TIME = 300.0


# -- parameters ----------------------------------------------------------------------------------


def flag(request: web.Request, name: str) -> bool:
    """A presence flag (``?recurse``, ``?keys``, ``?raw``): the value is ignored, as in Consul."""
    return name in request.query


def check_dc(request: web.Request) -> None:
    """Refuse ``?dc=`` naming another datacenter: there is no WAN federation to reach it."""
    dc = request.query.get("dc", "")
    if dc and dc.lower() != request.app[STORE].datacenter.lower():
        raise CatalogError("No path to datacenter", 500)


def node_meta_filter(request: web.Request) -> list[tuple[str, str]]:
    """``?node-meta=k:v`` (repeatable, all must match)."""
    out = []
    for raw in request.query.getall("node-meta", []):
        k, _, v = raw.partition(":")
        out.append((k, v))
    return out


def meta_matches(meta: Any, wanted: Sequence[tuple[str, str]]) -> bool:
    return all(meta.get(k) == v for k, v in wanted)


def refuse_filter(request: web.Request) -> None:
    # Consul's ?filter is a bexpr language; answering unfiltered data to a filtered question
    # would be wrong in a way the client cannot see, so say so instead.
    if request.query.get("filter"):
        raise CatalogError("filter expressions are not supported by dnsdisco", 400)


def _consistency(request: web.Request) -> str:
    q = request.query
    if "stale" in q and "consistent" in q:
        raise CatalogError("Cannot specify ?stale with ?consistent, conflicting semantics.", 400)
    if "cached" in q and "consistent" in q:
        raise CatalogError("Cannot specify ?cached with ?consistent, conflicting semantics.", 400)
    if "max_stale" in q:
        try:
            parse_duration(q["max_stale"])
        except ValueError:
            raise CatalogError(f'Invalid max_stale value "{q["max_stale"]}"', 400) from None
    if "consistent" in q:
        return "consistent"
    if "stale" in q or "max_stale" in q:
        return "stale"
    return "leader"


def _blocking_params(request: web.Request) -> tuple[int, float]:
    q = request.query
    index = 0
    if "index" in q:
        raw = q["index"]
        if not raw.isdigit() or int(raw) >= 2**64:
            raise CatalogError("Invalid index", 400)
        index = int(raw)
    wait = 0.0
    if "wait" in q:
        try:
            wait = parse_duration(q["wait"])
        except ValueError:
            raise CatalogError("Invalid wait time", 400) from None
    return index, wait


def blocking_timeout(wait: float, rng: random.Random | None = None) -> float:
    """Consul's effective wait: clamp to max_query_time, default when unset, plus up to
    wait/16 of jitter so that many watchers do not all come back at once."""
    if wait <= 0:
        wait = DEFAULT_QUERY_TIME
    wait = min(wait, MAX_QUERY_TIME)
    return wait + (rng or random).uniform(0, wait / 16)


class Read:
    """The read half of a catalog, health or KV request: parsed options, then :meth:`block`."""

    __slots__ = ("request", "index", "wait", "consistency")

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.index, self.wait = _blocking_params(request)
        self.consistency = _consistency(request)
        check_dc(request)

    async def block(self, topics: Sequence[str], current: Callable[[], int]) -> int:
        """Wait, if the client asked to, until ``current()`` exceeds the client's index or the
        wait runs out; return the index to answer with (>= 1)."""
        idx = current()
        if self.index and idx <= self.index:
            store = self.request.app[STORE]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + blocking_timeout(self.wait)
            while idx <= self.index:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await store.wait(topics, remaining)
                idx = current()
        return max(idx, 1)

    def headers(self, index: int) -> dict[str, str]:
        return {
            # setIndex rewrites 0 as 1: index 0 never blocks, so a client fed 0 would spin.
            "X-Consul-Index": str(max(index, 1)),
            "X-Consul-KnownLeader": "true",
            "X-Consul-LastContact": "0",
            "X-Consul-Effective-Consistency": self.consistency,
        }


# -- bodies --------------------------------------------------------------------------------------

_GO_JSON_CONTEXT = {
    "Expecting value": "looking for beginning of value",
    "Expecting ':' delimiter": "after object key",
    "Expecting ',' delimiter": "after object key:value pair",
    "Expecting property name enclosed in double quotes": "looking for beginning of object key string",
    "Extra data": "after top-level value",
}


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def decode_json(data: bytes) -> Any:
    """Parse a request body as Go's decoder would, with its error texts (400)."""
    text = data.decode("utf-8", errors="replace")
    if not text.strip():
        raise DecodeError("Request decode failed: EOF")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        if e.pos >= len(text.rstrip()):
            raise DecodeError("Request decode failed: unexpected EOF") from None
        context = _GO_JSON_CONTEXT.get(e.msg, "looking for beginning of value")
        ch = text[e.pos]
        raise DecodeError(f"Request decode failed: invalid character {ch!r} {context}") from None
    except ValueError as e:  # NaN / Infinity: not JSON
        raise DecodeError(f"Request decode failed: invalid character {str(e)[0]!r} looking for beginning of value"
                          ) from None


async def read_json(request: web.Request) -> Any:
    return decode_json(await request.read())


# -- replies -------------------------------------------------------------------------------------


class BodyCache:
    """Encoded bodies of reads whose answer is fixed by a topic index (``/v1/health/service``):
    many watchers of one service, the DNS workers and a mirror's sweep ask for the same body at
    the same index, and building it (shapes and JSON, ~40 µs per instance) costs more than the
    rest of the request. Keyed by what the body depends on, including the index, so a write
    simply makes new keys; the least recently used go past *max_bytes*."""

    def __init__(self, max_bytes: int = 32 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._bodies: OrderedDict[tuple[Any, ...], str] = OrderedDict()

    def get(self, key: tuple[Any, ...]) -> str | None:
        body = self._bodies.get(key)
        if body is not None:
            self._bodies.move_to_end(key)
        return body

    def put(self, key: tuple[Any, ...], body: str) -> None:
        if len(body) > self.max_bytes // 8:
            return  # one huge service would push out everything else
        old = self._bodies.pop(key, None)
        if old is not None:
            self.size -= len(old)
        self._bodies[key] = body
        self.size += len(body)
        while self.size > self.max_bytes:
            _, dropped = self._bodies.popitem(last=False)
            self.size -= len(dropped)


class ItemJson:
    """The minified JSON of each immutable model value (a ``Check``, a ``Node``) of lists that
    are read whole and change an item at a time (``/v1/health/state/any``: every check, re-read
    after any check write; ``/v1/catalog/nodes``, after any node write). A list's body is its items' cached JSON joined, so a read costs a lookup
    per item, not shapes and encoding (~20 µs each: 20,000 checks took 0.45 s, the server
    deaf meanwhile). An entry is used only while it was made from the very object listed (the
    store replaces a value on every write); *prune* reads (whole lists) drop entries not listed,
    and past *limit* entries (the caller's bound: about twice what exists) the table is emptied,
    so values deleted since are not kept alive by it."""

    def __init__(self, shape: Callable[[Any], Any], key: Callable[[Any], Any]) -> None:
        self._shape = shape
        self._key = key
        self._items: dict[Any, tuple[Any, str]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def body(self, request: web.Request, items: list[Any], *, limit: int, prune: bool = False) -> str:
        if "pretty" in request.query:
            return encode_json(request, [self._shape(v) for v in items])
        cache = self._items
        keep: dict[Any, tuple[Any, str]] = {} if prune else cache
        parts = []
        for v in items:
            k = self._key(v)
            hit = cache.get(k)
            if hit is None or hit[0] is not v:
                hit = (v, json.dumps(self._shape(v), separators=(",", ":")))
            keep[k] = hit
            parts.append(hit[1])
        if prune:
            self._items = keep
        elif len(cache) > limit:
            cache.clear()
        return "[" + ",".join(parts) + "]"


def encode_json(request: web.Request, data: Any) -> str:
    """Minified JSON (``?pretty``: indented), as Consul's ``encoding/json`` writes it."""
    if "pretty" in request.query:
        return json.dumps(data, indent=4)
    return json.dumps(data, separators=(",", ":"))


def json_body_response(body: str, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=body, status=status, content_type="application/json", headers=headers)


def json_response(request: web.Request, data: Any, *, status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    """Minified JSON (``?pretty``: indented), as Consul's ``encoding/json`` writes it."""
    return json_body_response(encode_json(request, data), status=status, headers=headers)


def empty_response() -> web.Response:
    """Consul's agent writes answer 200 with no body; clients only look at the status."""
    return web.Response(status=200)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """Consul's error bodies are plain text, not JSON."""
    return web.Response(status=status, text=message, content_type="text/plain", headers=headers)
