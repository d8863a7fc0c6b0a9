"""Consul's blocking-query protocol, client side: index rules, rate limit, backoff, the HTTP client.

This module owns *how* the mirror talks to Consul, and nothing about *what* it does with the
answers (that is :mod:`dnsdisco.sync.mirror`). Its rules come from Consul's blocking-query docs
(``api-docs/features/blocking``, ``spec/http-api.md`` a.1-a.5):

* **Index sanity** (:func:`next_index`): an index that goes backwards resets the loop to 0 (a
  snapshot restore, or a new server with a fresh Raft log); an index of 0 is never sent back,
  because ``index=0`` does not block and the loop would spin.
* **Rate-limit the loop, do not sleep** (:class:`TokenBucket`): burst 2, then about one re-query
  per 15 s while the data churns; quiet data is delivered at once.
* **Back off on errors** (:class:`Backoff`): 100 ms doubling to 30 s, jittered so that many
  mirrors do not retry in step. A 429 (the server's rate limiter) is an error like any other.
* **Time out above the server's own wait** (:func:`http_timeout`): the server adds up to
  ``wait/16`` of jitter, so the read timeout is ``wait + wait/16`` plus a margin.
* **Stale reads**: every read carries ``?stale`` so any server answers - reads scale, and keep
  working without a leader, which is what Consul's own DNS does (``dns_config.allow_stale``).
  ``X-Consul-KnownLeader`` and ``X-Consul-LastContact`` say how fresh an answer is.
* The ACL token travels in ``X-Consul-Token``, never in the URL (where it would be logged).

Pure functions for the rules (tested with an injected clock and random source); one
:class:`ConsulClient` holding the only aiohttp session, whose connections are shared by every
watch and read; :class:`Watch`, one blocking-query loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
from yarl import URL

from dnsdisco.errors import DnsdiscoError
from dnsdisco.sync.upstream import UpstreamConfig

__all__ = [
    "Backoff",
    "ConsulClient",
    "QueryMeta",
    "Response",
    "TokenBucket",
    "UpstreamError",
    "Watch",
    "backoff_delay",
    "format_wait",
    "http_timeout",
    "next_index",
    "parse_changed",
    "parse_meta",
]

log = logging.getLogger("dnsdisco.sync.consul")

# The read timeout's margin over wait + wait/16: py-consul uses 30 s; a margin this size covers a
# slow server and a large body without leaving a dead connection unnoticed for long.
TIMEOUT_MARGIN = 10.0
# Non-blocking reads (one service, the datacenter list) still may carry a big body.
READ_TIMEOUT = 30.0
# A dnsdisco extension (``dnsdisco/http/catalog.py``): asked for with the request header, a
# dnsdisco upstream names the services written since the index sent in the reply header of a
# blocking ``/v1/catalog/services`` read (and, on ``/v1/health/state/<status>``, the services
# whose checks were written). Consul ignores the request header and sends nothing.
WANT_CHANGES_HEADER = "X-Dnsdisco-Want-Changes"
CHANGED_SERVICES_HEADER = "X-Dnsdisco-Changed-Services"
# Asked for with WANT_CHANGES_HEADER: delta: a reply that names the changed services then holds
# only their entries (a name in the hint and not in the body has no instance left), marked so.
SERVICES_DELTA_HEADER = "X-Dnsdisco-Services-Delta"
WANT_DELTA = "delta"  # the WANT_CHANGES_HEADER value that allows a delta body
# ... and the one that also asks for the changed services' health entries in it: the body is
# then {"Services": <the delta>, "Entries": {<lower name>: {"Index": i, "Rows": <what
# /v1/health/service/<name> answers at its index i>}}}, marked with SERVICES_DELTA_HEADER
# "entries", so that a follower applies a write without a second request.
WANT_ENTRIES = "entries"


class UpstreamError(DnsdiscoError):
    """A read from Consul failed: transport error (``status`` 0), an HTTP error status with
    Consul's plain-text body, or a body that is not what the endpoint documents."""

    def __init__(self, message: str, *, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


# -- the rules (pure) -------------------------------------------------------------------------


def next_index(prev: int, got: int) -> int:
    """The ``index`` to send on a watch's next request, given the one sent (*prev*, 0 for the
    first) and the ``X-Consul-Index`` received (*got*).

    * *got* below 1 counts as 1: Consul itself never sends 0 (the first Raft entry is internal),
      and feeding 0 back would make every request return at once.
    * *got* below *prev* means the index went backwards (snapshot restore, a fresh cluster,
      the KV item holding the highest index deleted): start again from 0, which reads the
      current data without blocking.
    """
    got = max(got, 1)
    if got < prev:
        return 0
    return got


def went_backwards(prev: int, got: int) -> bool:
    """Whether a reply's index is below the one the request waited on (see :func:`next_index`)."""
    return prev > 0 and max(got, 1) < prev


def http_timeout(wait: float, margin: float = TIMEOUT_MARGIN) -> float:
    """The client read timeout for a blocking query with *wait*: the server may hold it for
    ``wait`` plus up to ``wait/16`` of jitter (``lib.RandomStagger``), then it needs time to
    answer."""
    return wait + wait / 16 + margin


def format_wait(seconds: float) -> str:
    """*seconds* as a Go duration string for ``?wait=`` (a bare number is a 400 there)."""
    return f"{max(int(round(seconds * 1000)), 1)}ms"


def backoff_delay(attempt: int, u: float, *, base: float = 0.1, cap: float = 30.0) -> float:
    """The pause after the *attempt*-th consecutive failure (0-based): ``base * 2**attempt``
    capped at *cap*, then jittered into ``[d/2, d]`` by *u* in ``[0, 1]``, so that mirrors that
    failed together do not all come back in the same instant, yet the delay still grows."""
    d = cap if attempt >= 64 else min(cap, base * (2.0 ** attempt))
    return d / 2 + d / 2 * u


class Backoff:
    """Consecutive-failure counter for :func:`backoff_delay`; :meth:`reset` after a success."""

    def __init__(self, *, base: float = 0.1, cap: float = 30.0, rng: random.Random | None = None) -> None:
        self.base = base
        self.cap = cap
        self._rng = rng or random.Random()
        self.attempt = 0

    def next(self) -> float:
        """The pause before the next try; counts one more failure."""
        delay = backoff_delay(self.attempt, self._rng.random(), base=self.base, cap=self.cap)
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


class TokenBucket:
    """A token bucket: *burst* tokens, refilled at one per *interval* seconds (0: no limit).

    :meth:`take` always grants a token and returns how long the caller must wait before using
    it; a token taken in advance leaves the bucket in debt, so a caller that waits as told is
    held to the rate. Quiet periods refill the bucket, so the first changes after one are
    delivered at once - the behaviour Consul's docs recommend over a fixed sleep.
    """

    def __init__(self, interval: float, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.burst = max(burst, 1)
        self._clock = clock
        self._tokens = float(self.burst)
        self._at = clock()

    @property
    def tokens(self) -> float:
        """Tokens available now (negative while in debt)."""
        self._refill()
        return self._tokens

    def _refill(self) -> None:
        now = self._clock()
        if self.interval > 0:
            self._tokens = min(float(self.burst), self._tokens + (now - self._at) / self.interval)
        else:
            self._tokens = float(self.burst)
        self._at = now

    def take(self) -> float:
        """Take one token; return the seconds to wait before acting on it (0: act now)."""
        if self.interval <= 0:
            return 0.0
        self._refill()
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens * self.interval


@dataclass(frozen=True, slots=True)
class QueryMeta:
    """What a read's headers say (``setMeta`` in Consul's ``agent/http.go``).

    ``index`` is 0 when there was no ``X-Consul-Index`` (the endpoint cannot be watched), and
    never 0 otherwise.
    ``last_contact`` is seconds since the answering server last heard from the leader (0 from the
    leader itself); ``known_leader`` false means the cluster had no leader at the time.
    """

    index: int = 0
    known_leader: bool = True
    last_contact: float = 0.0
    filtered_by_acls: bool = False
    # A dnsdisco upstream's hint (``X-Dnsdisco-Changed-Services``, not Consul's): the lower-cased
    # names whose service rows were written since the index the request sent. None: no hint.
    changed: tuple[str, ...] | None = None
    # With the hint, the body holds only the changed services (``X-Dnsdisco-Services-Delta``).
    delta: bool = False
    # ... and their health entries too (the header says ``entries``): the reply's body is then
    # the WANT_ENTRIES object, which the consumer splits (see ``split_entries``).
    with_entries: bool = False
    # After the split: lower name -> (health/service rows, their index), for names in changed.
    entries: Mapping[str, tuple[Any, int]] | None = None


def parse_meta(headers: Mapping[str, str]) -> QueryMeta:
    """Read the ``X-Consul-*`` headers of a reply. Bad or missing values take their defaults."""
    raw = headers.get("X-Consul-Index", "").strip()
    # A present index of 0 counts as 1, as Consul's own setIndex writes it: 0 fed back would
    # never block. Absent (or garbage) is 0: "this endpoint cannot be watched".
    index = max(int(raw), 1) if raw.isdigit() else 0
    leader = headers.get("X-Consul-KnownLeader", "true").strip().lower() != "false"
    contact_raw = headers.get("X-Consul-LastContact", "0").strip()
    try:
        contact = max(int(contact_raw), 0) / 1000.0
    except ValueError:
        contact = 0.0
    filtered = headers.get("X-Consul-Results-Filtered-By-ACLs", "").strip().lower() == "true"
    changed = parse_changed(headers.get(CHANGED_SERVICES_HEADER))
    marked = headers.get(SERVICES_DELTA_HEADER, "").strip() if changed is not None else ""
    return QueryMeta(index=index, known_leader=leader, last_contact=contact, filtered_by_acls=filtered,
                     changed=changed, delta=marked in ("1", WANT_ENTRIES), with_entries=marked == WANT_ENTRIES)


def split_entries(data: Any, meta: QueryMeta) -> tuple[Any, QueryMeta]:
    """A WANT_ENTRIES body as (the services delta, meta carrying the entries); any other reply
    as it is. Raises :class:`UpstreamError` on a body not of that shape."""
    if not meta.with_entries:
        return data, meta
    services = data.get("Services") if isinstance(data, dict) else None
    given = data.get("Entries") if isinstance(data, dict) else None
    if not isinstance(services, dict) or not isinstance(given, dict):
        raise UpstreamError("catalog/services: an entries delta without Services and Entries objects")
    entries: dict[str, tuple[Any, int]] = {}
    for name, item in given.items():
        index = item.get("Index") if isinstance(item, dict) else None
        rows = item.get("Rows") if isinstance(item, dict) else None
        if not isinstance(index, int) or isinstance(index, bool) or not isinstance(rows, list):
            raise UpstreamError(f"catalog/services: a bad entry for {name!r}")
        entries[name.lower()] = (rows, max(index, 1))
    return services, replace(meta, with_entries=False, entries=entries)


def parse_changed(raw: str | None) -> tuple[str, ...] | None:
    """A ``X-Dnsdisco-Changed-Services`` value: a JSON list of names, lower-cased; ``*``, absent
    or anything malformed is None ("not known": the mirror finds the changes itself)."""
    if not raw or raw.strip() == "*":
        return None
    try:
        names = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None
    return tuple(n.lower() for n in names)


@dataclass(frozen=True, slots=True)
class Response:
    """A successful read: the decoded body (``None`` when skipped, see ``ConsulClient.get``),
    the headers' meta, the body's size in bytes, and its digest when asked for."""

    data: Any
    meta: QueryMeta
    size: int
    digest: bytes | None = None


# -- the client ---------------------------------------------------------------------------------


def _ssl_context(upstream: UpstreamConfig) -> ssl.SSLContext | bool:
    if not upstream.tls:
        return True
    ctx = ssl.create_default_context(cafile=upstream.ca_file or None)
    if upstream.cert_file:
        ctx.load_cert_chain(upstream.cert_file, upstream.key_file or None)
    if upstream.tls_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class ConsulClient:
    """Reads from one Consul agent over one aiohttp session.

    Every request is a ``GET`` with ``?stale``, the token in ``X-Consul-Token``, and ``?dc=``
    when a datacenter is named. The session's connection pool is shared by all watches and
    reads; how many connections exist at once is bounded by how many requests are in flight
    (each watch has one, reads are bounded by the caller), never by the catalog's size.
    Counters (``requests``, ``errors``, ``connections_opened``, ``bytes``) feed ``status()``.
    """

    def __init__(self, upstream: UpstreamConfig, *, limit: int = 0) -> None:
        self.upstream = upstream
        self._limit = limit
        self._session: aiohttp.ClientSession | None = None
        self._base = URL(upstream.base_url)
        self.requests = 0
        self.errors = 0
        self.connections_opened = 0
        self.bytes = 0

    async def open(self) -> None:
        if self._session is not None:
            return
        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(self._on_connection)
        ctx = _ssl_context(self.upstream)
        connector: aiohttp.BaseConnector
        if self.upstream.unix_path:
            connector = aiohttp.UnixConnector(path=self.upstream.unix_path, limit=self._limit)
        else:
            connector = aiohttp.TCPConnector(limit=self._limit, ssl=ctx)
        headers = {"User-Agent": "dnsdisco-mirror"}
        if self.upstream.token:
            headers["X-Consul-Token"] = self.upstream.token
        if self.upstream.change_hints:
            headers[WANT_CHANGES_HEADER] = WANT_ENTRIES
        self._session = aiohttp.ClientSession(connector=connector, headers=headers, trace_configs=[trace])

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def _on_connection(self, session: Any, ctx: Any, params: Any) -> None:
        self.connections_opened += 1

    def url(self, path: str) -> URL:
        """*path* is a list of segments joined by ``/`` (a service name is one segment, encoded)."""
        url = self._base
        for part in path.strip("/").split("/"):
            url = url / part
        return url

    async def get(
        self,
        path: str | URL,
        *,
        dc: str | None = None,
        index: int = 0,
        wait: float = 0.0,
        skip_index: int | None = None,
        digest: bool = False,
        skip_digest: bytes | None = None,
        decode: bool = True,
    ) -> Response:
        """``GET`` *path* (``/v1/...``, or a prepared URL) and decode the JSON body.

        With *index* > 0 the read blocks server-side for up to *wait* seconds; ``index=0`` is
        never sent. With *skip_index*, a reply whose ``X-Consul-Index`` equals it is not decoded
        (``data`` is None): the caller already holds that version. With *digest*, the reply
        carries a digest of the body, and one whose digest equals *skip_digest* is not decoded
        either (for reads whose index says nothing per item, such as a node's services); without
        *decode*, no reply is (the caller wants the headers only). Raises :class:`UpstreamError`
        on a transport error, a non-200 status (with Consul's text), or a body that is not JSON.
        """
        session = self._session
        if session is None:
            raise UpstreamError("client is closed")
        params: dict[str, str] = {"stale": ""}
        if dc:
            params["dc"] = dc
        if index > 0:
            params["index"] = str(index)
            params["wait"] = format_wait(wait)
            timeout = http_timeout(wait)
        else:
            timeout = READ_TIMEOUT
        url = path if isinstance(path, URL) else self.url(path)
        self.requests += 1
        try:
            async with session.get(url, params=params, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                body = await resp.read()
                self.bytes += len(body)
                if resp.status != 200:
                    text = body.decode("utf-8", "replace").strip()[:200]
                    raise UpstreamError(f"{url.path}: HTTP {resp.status}: {text}", status=resp.status)
                meta = parse_meta(resp.headers)
        except UpstreamError:
            self.errors += 1
            raise
        except asyncio.TimeoutError:
            self.errors += 1
            raise UpstreamError(f"{url.path}: no answer within {timeout:.0f}s") from None
        except (aiohttp.ClientError, OSError) as e:
            self.errors += 1
            raise UpstreamError(f"{url.path}: {type(e).__name__}: {e}") from None
        if not decode or (skip_index is not None and meta.index == skip_index):
            return Response(None, meta, len(body))
        sums = hashlib.blake2b(body, digest_size=16).digest() if digest else None
        if sums is not None and sums == skip_digest:
            return Response(None, meta, len(body), sums)
        try:
            data = json.loads(body)
        except ValueError as e:
            self.errors += 1
            raise UpstreamError(f"{url.path}: body is not JSON: {e}") from None
        return Response(data, meta, len(body), sums)


# -- one blocking-query loop ------------------------------------------------------------------------

Deliver = Callable[[Any, QueryMeta, bool], Awaitable[None]]


class Watch:
    """One blocking query kept open on one endpoint, following Consul's rules.

    :meth:`run` loops until cancelled: take a token from the bucket (only after a reply that
    moved the index: a wait that ran out is not churn), send the query with the last index,
    and hand every reply whose index moved (or went backwards) to ``deliver(data, meta,
    reset)``; *reset* is true when the index went backwards, i.e. anything derived from earlier
    indexes is void. Errors back off with jitter and never end the loop. The first request after
    an error does not block (no ``index``; a reply at the index we hold is still skipped): the
    server that answers may be a rebuilt cluster whose index is below ours, and a Consul server
    holds a query whose index is ahead of its own for the whole ``wait`` (minutes) before it
    answers with the lower index that says so. The attributes
    (``index``, ``failing``, ``last_ok``, ``fresh_at``, ``last_error``, ...) are for
    staleness and ``status()``.
    """

    def __init__(
        self,
        client: ConsulClient,
        path: str,
        *,
        name: str,
        dc: str | None,
        wait: float,
        query_interval: float,
        query_burst: int,
        backoff_min: float,
        backoff_max: float,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.client = client
        self.path = path
        self.name = name
        self.dc = dc
        self.wait = wait
        self._bucket = TokenBucket(query_interval, query_burst, clock=clock)
        self._backoff = Backoff(base=backoff_min, cap=backoff_max, rng=rng)
        self._clock = clock
        self._sleep = sleep
        self.index = 0
        self.failing = False
        self.last_ok: float | None = None  # clock() of the last good reply
        # When the data was last known current: the last reply (or the moment contact was lost)
        # minus the server's LastContact.
        self.fresh_at: float | None = None
        self.last_contact = 0.0
        self.known_leader = True
        self.last_error = ""
        self.errors = 0
        self.replies = 0
        self.resets = 0
        self._warned_acl = False

    async def run(self, deliver: Deliver) -> None:
        charge = False
        probe = False  # after an error: ask once without blocking (see the class docstring)
        while True:
            if charge:
                delay = self._bucket.take()
                if delay > 0:
                    await self._sleep(delay)
            try:
                # A reply at the index we hold is a wait that ran out (or, probing, nothing
                # new): nothing to decode.
                resp = await self.client.get(self.path, dc=self.dc, index=0 if probe else self.index,
                                             wait=self.wait, skip_index=self.index or None)
                probe = False
                if resp.meta.index == 0:
                    # Consul sends an index on every read that can block; none means this
                    # endpoint cannot be watched (node-consul: "Watch not supported").
                    raise UpstreamError(f"{self.path}: no X-Consul-Index header: cannot watch this endpoint")
            except UpstreamError as e:
                charge = False
                probe = self.index > 0
                self._failed(str(e))
                await self._sleep(self._backoff.next())
                continue
            meta = resp.meta
            now = self._clock()
            if self.failing:
                log.info("%s: upstream answering again (index %d)", self.name, meta.index)
            self._backoff.reset()
            self.failing = False
            self.last_error = ""
            self.replies += 1
            self.last_ok = now
            self.last_contact = meta.last_contact
            self.known_leader = meta.known_leader
            self.fresh_at = now - meta.last_contact
            if meta.filtered_by_acls and not self._warned_acl:
                self._warned_acl = True
                log.warning("%s: the ACL token cannot read everything; the mirror is missing what it hides "
                            "(it needs node_prefix \"\" and service_prefix \"\" read)", self.name)
            prev = self.index
            reset = went_backwards(prev, meta.index)
            self.index = next_index(prev, meta.index)
            if reset:
                self.resets += 1
                log.warning("%s: index went backwards (%d -> %d): the upstream's state was reset; "
                            "reloading", self.name, prev, meta.index)
            changed = reset or prev == 0 or meta.index != prev
            # A reply that only ran out its wait is not churn: it costs no token.
            charge = changed
            if changed:
                try:
                    await deliver(resp.data, meta, reset)
                except DnsdiscoError as e:
                    # A body the consumer cannot read: ask again from where we were.
                    self.index = prev
                    charge = False
                    self._failed(f"{self.path}: {e}")
                    await self._sleep(self._backoff.next())

    def _failed(self, message: str) -> None:
        self.errors += 1
        self.last_error = message
        if not self.failing and self.last_ok is not None:
            # Contact ends now, not at the last reply: a blocking query open on a live
            # connection hears of every change, so the copy was current until it broke. (A
            # silent partition is noticed only at the read timeout, wait + wait/16 + margin.)
            self.fresh_at = self._clock() - self.last_contact
        if not self.failing:
            # One line when it starts failing and one when it recovers; repeats go to debug.
            log.warning("%s: %s (retrying with backoff)", self.name, message)
        else:
            log.debug("%s: %s", self.name, message)
        self.failing = True
