"""``/v1/kv/<key>``: the KV store's GET (blocking), PUT and DELETE.

This module owns KV's request rules (``spec/http-api.md`` b.11): presence flags (``recurse``,
``keys``, ``raw``), ``separator`` listing, ``cas``/``flags`` with Go's parse errors, the
``kv_max_value_size`` limit, conflicting-flag refusals, and base64 ``DirEntry`` replies. A miss
is a 404 with an empty body that still carries the index headers: clients read them.
"""

from __future__ import annotations

import urllib.parse

from aiohttp import web

from dnsdisco.errors import CatalogError
from dnsdisco.http import shapes
from dnsdisco.http.query import STORE, Read, check_dc, flag, json_response

# kv_max_value_size: Consul's default (512 KiB).
KV_MAX_VALUE_SIZE = 512 * 1024

routes = web.RouteTableDef()


def _uint(raw: str) -> int:
    if raw.isdigit() and int(raw) < 2**64:
        return int(raw)
    # Consul hands the strconv error back as is, as a 500.
    raise CatalogError(f'strconv.ParseUint: parsing "{raw}": invalid syntax', 500)


def _conflict(request: web.Request, names: tuple[str, ...]) -> None:
    if sum(1 for n in names if n in request.query) > 1:
        encoded = urllib.parse.urlencode(sorted(request.query.items()))
        raise CatalogError(f"Conflicting flags: {encoded}", 400)


@routes.get("/v1/kv/{key:.*}")
async def get(request: web.Request) -> web.Response:
    read = Read(request)
    store = request.app[STORE]
    key = request.match_info["key"]
    keys_only = flag(request, "keys")
    prefix = flag(request, "recurse") or keys_only
    if not key and not prefix:
        raise CatalogError("Missing key name", 400)
    topics = store.kv_topics(key, prefix=prefix)
    index = await read.block(topics, lambda: store.kv_index(key, prefix=prefix))
    headers = read.headers(index)

    if keys_only:
        sep = request.query.get("separator", request.query.get("seperator", ""))
        found: list[str] = []
        seen = set()
        for k in store.kv_keys(key):
            if sep:
                cut = k.find(sep, len(key))
                if cut >= 0:
                    k = k[: cut + len(sep)]
            if k not in seen:
                seen.add(k)
                found.append(k)
        if not found and key:
            return web.Response(status=404, headers=headers)
        return json_response(request, found, headers=headers)

    if prefix:
        entries = store.kv_list(key)
    else:
        entry = store.kv_get(key)
        entries = [entry] if entry is not None else []
    if not entries:
        return web.Response(status=404, headers=headers)
    if flag(request, "raw") and not prefix:
        # Since CVE-2020-25864 the raw value is never sniffed into HTML.
        headers.update({"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"})
        return web.Response(body=entries[0].value, content_type="text/plain", headers=headers)
    return json_response(request, [shapes.kv_entry(e) for e in entries], headers=headers)


async def _read_value(request: web.Request) -> bytes:
    length = request.content_length
    if length is not None and length > KV_MAX_VALUE_SIZE:
        raise CatalogError(_too_large(length), 413)
    data = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        data += chunk
        if len(data) > KV_MAX_VALUE_SIZE:
            raise CatalogError(_too_large(len(data)), 413)
    return bytes(data)


def _too_large(size: int) -> str:
    return (f"Request body({size} bytes) too large, max size: {KV_MAX_VALUE_SIZE} bytes. See "
            "https://developer.hashicorp.com/docs/agent/config/config-files#kv_max_value_size.")


@routes.put("/v1/kv/{key:.*}")
async def put(request: web.Request) -> web.Response:
    check_dc(request)
    key = request.match_info["key"]
    if not key:
        raise CatalogError("Missing key name", 400)
    _conflict(request, ("cas", "acquire", "release"))
    q = request.query
    flags = _uint(q["flags"]) if "flags" in q else 0
    cas = _uint(q["cas"]) if "cas" in q else None
    for op in ("acquire", "release"):
        if op in q:
            # No sessions exist here, so every session ID is invalid, as Consul says of one
            # it does not know.
            raise CatalogError(f'invalid session "{q[op]}"', 500)
    value = await _read_value(request)
    ok = await request.app[STORE].kv_put(key, value, flags=flags, cas=cas)
    return json_response(request, ok)


@routes.delete("/v1/kv/{key:.*}")
async def delete(request: web.Request) -> web.Response:
    check_dc(request)
    key = request.match_info["key"]
    recurse = flag(request, "recurse")
    if not key and not recurse:
        raise CatalogError("Missing key name", 400)
    _conflict(request, ("recurse", "cas"))
    cas = _uint(request.query["cas"]) if "cas" in request.query else None
    ok = await request.app[STORE].kv_delete(key, recurse=recurse, cas=cas)
    return json_response(request, ok)
