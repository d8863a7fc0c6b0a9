"""The mirror: a real Consul cluster's catalog, followed with blocking queries, as catalog deltas.

:class:`Mirror` is the second producer of the DNS side's data (the embedded ``catalog.store``
is the first): it hands ``on_delta`` the same :class:`~dnsdisco.catalog.model.CatalogDelta`
values the store would for the same catalog, so the DNS side cannot tell the two apart. It owns
which endpoints are watched, how a change is found and fetched, and how stale the copy is; the
protocol rules (index, rate limit, backoff) are :mod:`dnsdisco.sync.consul`'s, the JSON is
:mod:`dnsdisco.sync.parse`'s.

How it scales. A blocking query holds an HTTP/1.1 connection for its whole wait, so one watch
per service would need one connection per service (5,000 services, 5,000 sockets into Consul,
whose own limit is 200 per client). Instead each datacenter has **four** watches on cluster-wide
lists which between them move on every change DNS answers depend on, and which stay small in a
healthy cluster:

* ``/v1/catalog/services`` - names and tags; its index moves on any service write;
* ``/v1/catalog/nodes`` - every node (address, tagged addresses, meta);
* ``/v1/health/state/critical`` and ``/v1/health/state/warning`` - the checks that are not
  passing; their index moves on any check write.

A node or a non-passing check carries its new value, so it is patched into the mirrored entries
without another request; a check that leaves both lists (passing again, or gone) is re-read with
``/v1/health/node/<node>``. A services move is attributed to the services it touched - new
names, changed tags, services whose checks or node were written in the same Raft write (same
index) - and only those are read with ``/v1/health/service/<name>``. If nothing seen explains it
(a deregistration, an instance registered with passing checks or none, an instance without checks
whose port changed), the check lists get up to ``settle`` seconds to report the same write while
a sweep runs: every node's services are read (``/v1/catalog/node-services/<node>``; a body
byte for byte the one that last agreed with the mirror is not decoded) and the services whose
instances differ (new, gone, another ModifyIndex) are read. When there are fewer services than
nodes (or the upstream predates that endpoint) the sweep reads every service instead, without
decoding it, to find those whose ``X-Consul-Index`` moved, and a read of
``/v1/health/state/any`` is tried first when checks were written with the change. Either way
the sweep only reads until the settle is over (so it can be dropped); then each service it
finds is read afresh and goes out at once, while the sweep goes on. A node new
to the nodes list has its services read at once: an instance registered with its node is found
without a sweep. A dnsdisco upstream (the embedded catalog, which the DNS workers follow) names the services
written since the index the services watch sent (``X-Dnsdisco-Changed-Services``, asked for
with ``upstream.change_hints``): those are read and nothing needs attributing, so no wait, no
``state/any`` and no sweep. Passing-only check writes (a new output) do not matter to DNS and are caught up by
a rate-limited ``state/any`` read; ``resync_interval`` re-reads everything as a safety net for
writes merged into one wake. Service and node reads run in a pool of ``fetch_concurrency`` workers,
so the connections held open are ``4 x datacenters + fetch_concurrency`` (+1 to list
datacenters) whatever the catalog's size.

Honest staleness (architecture "honest readiness", anchors 4.3): until a datacenter's first full
load it is reported stale (``on_stale(dc, True)``; the table answers SERVFAIL). Afterwards the
last good copy is served for as long as Consul is unreachable or leaderless, unless
``max_stale`` (Consul's ``dns_config.max_stale``, 10 years by default) passes, after which the
datacenter is reported stale until contact resumes.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from dnsdisco.catalog.model import CatalogDelta, Check, Node, ServiceEntry
from dnsdisco.errors import DnsdiscoError
from dnsdisco.sync.consul import (
    Backoff,
    ConsulClient,
    QueryMeta,
    TokenBucket,
    UpstreamError,
    Watch,
    split_entries,
)
from dnsdisco.sync.parse import (
    parse_check,
    parse_checks,
    parse_datacenters,
    parse_health_service,
    parse_node,
    parse_services,
)
from dnsdisco.sync.upstream import UpstreamConfig

__all__ = ["DEFAULT_MAX_STALE", "Mirror", "Seed"]

log = logging.getLogger("dnsdisco.sync.mirror")

# Consul's dns_config.max_stale default: 10 years, i.e. serve stale data forever.
DEFAULT_MAX_STALE = 87600 * 3600.0
# How long a services move waits for the nodes/checks watches to report the same write before
# it is called unexplained (their replies race with it; the same write wakes all of them).
SETTLE = 0.2
# The least time between two background reads of every check (the catch-up; see _Datacenter).
CATCH_UP_INTERVAL = 1.0
# During a long sweep, deltas go out at least this often rather than all at the end.
FLUSH_EVERY = 0.1
# A read of every check is folded in this many rows at a time, the event loop free in between.
FOLD_CHUNK = 2000
# How often ``datacenters: ["*"]`` re-reads /v1/catalog/datacenters (it cannot block).
DATACENTER_REFRESH = 60.0
# What each datacenter watches: between them they move on every change DNS answers depend on,
# and each reply is small in a healthy cluster (names; nodes; the checks that are not passing).
WATCHED = {
    "services": "/v1/catalog/services",
    "nodes": "/v1/catalog/nodes",
    "critical": "/v1/health/state/critical",
    "warning": "/v1/health/state/warning",
}

OnDelta = Callable[[CatalogDelta], None]
OnStale = Callable[[str, bool], None]
CheckKey = tuple[str, str]  # (lower-cased node name, check ID)


# -- pure helpers -----------------------------------------------------------------------------------


def tag_sets(names: Mapping[str, Iterable[str]]) -> dict[str, frozenset[str]]:
    """``/v1/catalog/services`` folded to the DNS side's keys: lower-cased name -> union of tags
    (Consul's service names are case-insensitive; ``Web`` and ``web`` are one DNS name)."""
    out: dict[str, set[str]] = {}
    for name, tags in names.items():
        out.setdefault(name.lower(), set()).update(tags)
    return {k: frozenset(v) for k, v in out.items()}


@dataclass(frozen=True, slots=True)
class Seed:
    """What a full load reads, taken from an embedded store at one instant (a DNS worker's start,
    :func:`dnsdisco.workers.seed_from_store`), so that the load needs no reads: for each watched
    list (``WATCHED``' keys) its body as the endpoint answers and its index, and every
    service's health entries with the index its read would give. The watches then start from
    those indexes, so every later write reaches the mirror as it does after a full load."""

    lists: dict[str, tuple[Any, int]]
    entries: dict[str, tuple[ServiceEntry, ...]]
    svc_index: dict[str, int]


def merge_services_replies(old: tuple[Any, QueryMeta], new: tuple[Any, QueryMeta]) -> tuple[Any, QueryMeta]:
    """One reply standing for a watch's undigested *old* reply and the hinted *new* one that
    follows it: the names written since *old*'s request are the union of both hints (no hint
    if *old* had none); for catalog/services, a delta body (only the hinted names' entries) is
    laid over the body before it, so that the result is a full list if *old* was one."""
    (old_data, old_meta), (data, meta) = old, new
    assert meta.changed is not None
    before = old_meta.changed
    changed = None if before is None else tuple({*before, *meta.changed})
    # Entries sent with the replies: the newer one's for its names, the older one's for the rest.
    hinted = set(meta.changed)
    entries = {**{k: v for k, v in (old_meta.entries or {}).items() if k not in hinted}, **(meta.entries or {})}
    if meta.delta and isinstance(old_data, dict) and isinstance(data, dict):
        data = {**{k: v for k, v in old_data.items() if k.lower() not in hinted}, **data}
        # Laid over a full list it is a full list; over a delta, a delta.
        return data, replace(meta, changed=changed, delta=old_meta.delta, entries=entries or None)
    return data, replace(meta, changed=changed, entries=entries or None)


def with_check(entry: ServiceEntry, check_id: str, check: Check | None) -> ServiceEntry:
    """*entry* with check *check_id* replaced by *check* (removed when None). A changed check
    keeps its place; a new one goes where Consul lists it (check IDs in order)."""
    checks = list(entry.checks)
    for i, c in enumerate(checks):
        if c.check_id == check_id:
            if check is None:
                del checks[i]
            elif c == check:
                return entry
            else:
                checks[i] = check
            return replace(entry, checks=tuple(checks))
    if check is None:
        return entry
    ids = [c.check_id for c in checks]
    checks.insert(bisect.bisect_right(ids, check_id), check)
    return replace(entry, checks=tuple(checks))


def _row_key(row: Any) -> tuple[CheckKey, tuple[int, int]] | None:
    """A ``HealthCheck`` row's identity and version, read without building the Check."""
    if not isinstance(row, dict):
        return None
    node, cid = row.get("Node"), row.get("CheckID")
    if not isinstance(node, str) or not isinstance(cid, str):
        return None
    return (node.lower(), cid), (row.get("CreateIndex") or 0, row.get("ModifyIndex") or 0)


class _CheckRow:
    __slots__ = ("version", "service_id", "service_name")

    def __init__(self, version: tuple[int, int], service_id: str, service_name: str) -> None:
        self.version = version
        self.service_id = service_id
        self.service_name = service_name


class _CheckRows:
    """Every check the mirror knows of, by (lower node, check ID), also listed by node: a node
    whose checks are re-read must find its own without walking all of them (20,000 at
    5,000 services, per flap)."""

    __slots__ = ("_rows", "_by_node")

    def __init__(self) -> None:
        self._rows: dict[CheckKey, _CheckRow] = {}
        self._by_node: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[CheckKey]:
        return iter(self._rows)

    def get(self, key: CheckKey) -> _CheckRow | None:
        return self._rows.get(key)

    def __setitem__(self, key: CheckKey, row: _CheckRow) -> None:
        self._rows[key] = row
        self._by_node.setdefault(key[0], set()).add(key[1])

    def pop(self, key: CheckKey) -> _CheckRow | None:
        row = self._rows.pop(key, None)
        if row is not None:
            ids = self._by_node[key[0]]
            ids.discard(key[1])
            if not ids:
                del self._by_node[key[0]]
        return row

    def on_node(self, nl: str) -> list[CheckKey]:
        return [(nl, cid) for cid in self._by_node.get(nl, ())]


# -- one datacenter ---------------------------------------------------------------------------------


class _Datacenter:
    """The mirror of one datacenter: four watches, the mirrored state, and the task that turns
    what the watches deliver into deltas (the reconciler)."""

    def __init__(self, mirror: Mirror, name: str, query_dc: str | None, seed: Seed | None = None) -> None:
        self.mirror = mirror
        self.name = name
        self.query_dc = query_dc
        self._seed = seed
        up = mirror.upstream
        self.watches = {
            key: Watch(
                mirror.client, path, name=f"{name} {path}", dc=query_dc, wait=mirror.wait,
                query_interval=up.query_interval, query_burst=up.query_burst,
                backoff_min=up.backoff_min, backoff_max=up.backoff_max,
                clock=mirror.clock, rng=mirror.rng,
            )
            for key, path in WATCHED.items()
        }
        self._pending: dict[str, tuple[Any, QueryMeta]] = {}
        # The index of the data folded in, per list. A reply below it means the upstream's
        # index went backwards (a restore, a fresh cluster): the copy is reloaded in full.
        self._list_index: dict[str, int] = {}
        self._need_full = True
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        # The mirrored state.
        self.synced = False
        self.tags: dict[str, frozenset[str]] = {}  # lower name -> tags, as catalog/services says
        self.url_names: dict[str, str] = {}  # lower name -> a name as registered, for the URL
        self.nodes: dict[str, Node] = {}
        self.node_rows: dict[str, tuple[int, int]] = {}
        self.entries: dict[str, tuple[ServiceEntry, ...]] = {}
        self.svc_index: dict[str, int] = {}  # lower name -> X-Consul-Index of its last read
        self.by_node: dict[str, dict[str, int]] = {}  # lower node -> lower name -> instances
        # lower node -> service ID -> (lower name, the instance's ModifyIndex)
        self.instances: dict[str, dict[str, tuple[str, int]]] = {}
        self._node_digests: dict[str, bytes] = {}  # lower node -> digest of its last services read
        self._new_nodes: list[str] = []  # nodes the nodes list added since the last round
        self._hinting = False  # the last services reply named what it changed (a dnsdisco upstream)
        self._node_sweeps = True  # cleared if the upstream lacks /v1/catalog/node-services
        # Every check we know of (from service reads, the lists, state/any), by version.
        self.check_rows = _CheckRows()
        # The latest rows of the critical and warning lists: together, the non-passing checks.
        self._np_rows: dict[str, dict[CheckKey, tuple[int, int]]] = {"critical": {}, "warning": {}}
        self._checks_index = 0  # the checks index the lists were last read at
        self._any_index = 0  # ... and /v1/health/state/any
        self._checks_behind = False  # a check write the lists do not show (passing only)
        self._behind_first = self._behind_last = 0  # ... the first and last such write's index
        # At least CATCH_UP_INTERVAL apart even without a rate limit (the DNS workers): each is a
        # read of every check, and one overtaken by a write is thrown away and asked again.
        self._any_bucket = TokenBucket(max(up.query_interval, CATCH_UP_INTERVAL), up.query_burst,
                                       clock=mirror.clock)
        self._any_due = 0.0
        self._any_reserved = False  # a token is taken for a catch-up read due at _any_due
        self._catch_up: asyncio.Task[None] | None = None
        # ((self.index, full_loads) at the ask, body, its index)
        self._caught_up: tuple[tuple[int, int], Any, int] | None = None
        self.index = 0
        self._services_index = 0
        # lower name -> index of the latest check or node write seen to touch it
        self._events: dict[str, int] = {}
        # lower name -> index of the latest check or node data patched into it (or queued for
        # a read of it) since its last read: entries pushed with an older index would undo it.
        self._patched_at: dict[str, int] = {}
        self._unknown: dict[str, str] = {}  # services with checks on instances we do not have
        self._loading: dict[str, tuple[Any, QueryMeta]] = {}  # the replies a full load reads from
        self._dirty: dict[str, str] = {}  # reads that failed, to retry
        self._resync_at = 0.0
        # Out-going delta being collected.
        self._out_services: dict[str, tuple[ServiceEntry, ...]] = {}
        self._out_nodes: dict[str, Node | None] = {}
        # Numbers for status().
        self.full_loads = 0
        self.sweeps = 0
        self.node_sweeps = 0  # of which along nodes
        self.fetches = 0
        self.any_reads = 0
        self.hinted = 0
        self.services_deltas = 0  # of which the upstream sent only the changed services
        self.pushed = 0  # services whose entries came with a services reply (no read)
        self.seeded = False  # the first load came from a Seed, not from reads
        self.checks_hinted = 0  # check-list moves whose services a dnsdisco upstream named
        self.node_reads = 0
        self.deltas = 0
        self.first_sync_seconds: float | None = None
        self.last_error = ""
        self._started = 0.0

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        self._started = self.mirror.clock()
        if self._seed is not None:
            # Block from the seed's indexes: the first reply is the first write after it. The
            # seed is current now, as a reply just received would be (staleness counts from here).
            now = self.mirror.clock()
            for key, watch in self.watches.items():
                watch.index = self._seed.lists[key][1]
                watch.last_ok = watch.fresh_at = now
            self._wake.set()
        for key, watch in self.watches.items():
            self._tasks.append(asyncio.create_task(watch.run(self._deliverer(key)), name=watch.name))
        self._tasks.append(asyncio.create_task(self._reconcile_loop(), name=f"{self.name} mirror"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def _deliverer(self, key: str) -> Callable[[Any, QueryMeta, bool], Any]:
        async def deliver(data: Any, meta: QueryMeta, reset: bool) -> None:
            data, meta = split_entries(data, meta)
            # Only the latest reply of each watch matters: a newer one replaces an undigested one.
            # (*reset* is not needed here: the round compares the index with the data it holds.)
            # A change hint is relative to the previous reply, so one replacing an undigested
            # reply carries the union of both (no hint if either has none).
            old = self._pending.get(key)
            # Not onto the reply a full load is reading from: the load covers it, and the new
            # reply's own hint (relative to it) must survive, or the next round would have to
            # find the change the Consul way (settle, attribution, sweep).
            if old is not None and not reset and meta.changed is not None and old is not self._loading.get(key):
                data, meta = merge_services_replies(old, (data, meta))
            self._pending[key] = (data, meta)
            self._wake.set()

        return deliver

    # -- staleness --------------------------------------------------------------------------------

    def age(self, now: float) -> float | None:
        """Seconds since the copy was last known current: the server's reported lag
        (``LastContact``) while every watch is in contact, else the time since the failing
        watches lost contact. None before the first full load."""
        if not self.synced:
            return None
        worst = 0.0
        for w in self.watches.values():
            if w.failing or w.fresh_at is None:
                if w.fresh_at is None:
                    return None
                worst = max(worst, now - w.fresh_at)
            else:
                worst = max(worst, w.last_contact)
        return worst

    # -- the reconciler ---------------------------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        backoff = self.mirror.new_backoff()
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._round()
            except DnsdiscoError as e:
                # What this round took from the watches may be half applied: start over from
                # fresh reads rather than trust the copy.
                self._need_full = True
                self.last_error = str(e)
                log.warning("%s: mirror round failed: %s (reloading)", self.name, e)
                # Try again after a pause - or as soon as a watch hears from the upstream.
                self.mirror.call_later(backoff.next(), self._wake.set)
            else:
                backoff.reset()
                if self._dirty or self._new_nodes:
                    # Reads failed in this round: try them again after a pause, not at once.
                    self.mirror.call_later(backoff.next(), self._wake.set)

    def _backwards(self) -> bool:
        return any(meta.index < self._list_index.get(k, 0) for k, (_, meta) in self._pending.items())

    def _take(self, key: str) -> tuple[Any, QueryMeta] | None:
        """The undigested reply of watch *key*, unless its index went backwards (left for the
        next round, which reloads)."""
        item = self._pending.get(key)
        if item is None or item[1].index < self._list_index.get(key, 0):
            return None
        del self._pending[key]
        self._list_index[key] = item[1].index
        return item

    async def _round(self) -> None:
        seed, self._seed = self._seed, None
        if seed is not None:
            pending = {key: (body, QueryMeta(index=index)) for key, (body, index) in seed.lists.items()}
            await self._load_from(pending, self.mirror.clock(), seed=seed)
            return
        if self._need_full or self._backwards():
            await self._full_load()
            return
        await self._take_nodes_and_checks()
        await self._take_catch_up()
        # Node and check patches go out now, not after the service reads below.
        self._flush()
        fetched: set[str] = set()
        item = self._take("services")
        if item is not None:
            fetched = await self._apply_services(*item)
        if self._unknown or self._dirty:
            extra = {**self._unknown, **self._dirty}
            self._unknown.clear()
            self._dirty.clear()
            await self._fetch(extra)
        # What DNS needs is out before the catch-up reads below.
        self._flush()
        now = self.mirror.clock()
        if self._checks_behind and now >= self._any_due:
            # A check changed without showing in the lists (a passing check's output, a passing
            # check added or removed): DNS answers do not depend on it, so catch up at the
            # watches' rate rather than read every check on every such write.
            delay = 0.0 if self._any_reserved else self._any_bucket.take()
            if delay > 0:
                self._any_reserved = True
                self._any_due = now + delay
                self.mirror.call_later(delay, self._wake.set)
            else:
                self._any_reserved = False
                self._checks_behind = False
                self._start_catch_up()
        resync = self.mirror.upstream.resync_interval
        if resync > 0 and now >= self._resync_at:
            self._resync_at = now + resync
            await self._read_all_checks()
            # Along services: it is the safety net, so it trusts no digest of an earlier read.
            await self._sweep(exclude=fetched, why="periodic resync", by_node=False)
        self._flush()
        if self._unknown:
            self._wake.set()

    def _start_catch_up(self) -> None:
        """Read every check in the background: at scale the read takes long (20,000 checks:
        hundreds of ms), and nothing DNS answers waits on it (see :meth:`_take_catch_up`)."""
        if self._catch_up is not None:
            self._checks_behind = True  # one is running: another after it
            return
        started_at = (self.index, self.full_loads)

        async def run() -> None:
            try:
                resp = await self.mirror.client.get("/v1/health/state/any", dc=self.query_dc)
                self._caught_up = (started_at, resp.data, resp.meta.index)
            except DnsdiscoError as e:
                self.last_error = str(e)
                self._checks_behind = True
            finally:
                self._catch_up = None
                self._wake.set()

        self._catch_up = asyncio.create_task(run(), name=f"{self.name} checks catch-up")
        self._tasks.append(self._catch_up)
        self._catch_up.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _take_catch_up(self) -> None:
        """Fold in a background read of every check - only if nothing moved while it was on its
        way (an older list must not undo what the watches brought since); else ask again."""
        item, self._caught_up = self._caught_up, None
        if item is None:
            return
        started_at, body, index = item
        if (self.index, self.full_loads) != started_at:
            self._checks_behind = True
            return
        await self._fold_all_checks(body, index)

    async def _take_nodes_and_checks(self) -> None:
        item = self._take("nodes")
        if item is not None:
            self._apply_nodes(*item)
        if self._new_nodes:
            await self._read_new_nodes()
        crit, warn = self._take("critical"), self._take("warning")
        if crit is not None or warn is not None:
            await self._apply_nonpassing(crit, warn)

    async def _full_load(self) -> None:
        """Read everything, replace the mirrored state, and hand over one ``full`` delta. Runs for
        the first load and whenever an index went backwards (a new or restored upstream)."""
        if not self.synced and len(self._pending) < len(WATCHED):
            return  # the first reply of every watch is on its way (index 0 does not block)
        started = self.mirror.clock()
        # Taken only once the load has succeeded: a failure must not lose a watch's reply.
        pending = self._loading = dict(self._pending)
        try:
            await self._load_from(pending, started)
        finally:
            self._loading = {}

    async def _load_from(self, pending: dict[str, tuple[Any, QueryMeta]], started: float,
                         seed: Seed | None = None) -> None:
        client = self.mirror.client
        for key, path in WATCHED.items():
            if key not in pending or pending[key][1].delta:
                # After a reset, a watch that has not seen it yet still holds the old cluster's
                # view: read the list afresh instead of waiting for its next wake. (So is a
                # services delta: it holds only the names written since the reply before it.)
                resp = await client.get(path, dc=self.query_dc)
                pending[key] = (resp.data, resp.meta)
        names = parse_services(pending["services"][0])
        self.tags = tag_sets(names)
        self.url_names = {}
        for n in names:
            self.url_names.setdefault(n.lower(), n)
        self.nodes = {}
        self.node_rows = {}
        self._digest_nodes(pending["nodes"][0])
        self.check_rows = _CheckRows()
        for key in ("critical", "warning"):
            self._np_rows[key] = self._list_rows(pending[key][0], key)
        self._checks_index = max(pending["critical"][1].index, pending["warning"][1].index)
        self._any_index = 0
        self._checks_behind = False
        self._services_index = pending["services"][1].index
        self._events.clear()
        self._patched_at.clear()
        self._unknown.clear()
        self._dirty.clear()
        self.entries = {}
        self.svc_index = {}
        self.by_node = {}
        self.instances = {}
        self._node_digests.clear()
        self._new_nodes.clear()
        todo = dict(self.url_names)
        if seed is not None:
            for lname in todo:
                self._set_entries(lname, seed.entries.get(lname, ()))
                self.svc_index[lname] = seed.svc_index.get(lname, 0)
            todo = {}
        backoff = self.mirror.new_backoff()
        while todo:
            failed = await self._fetch(todo, record=False)
            if failed:
                await asyncio.sleep(backoff.next())
            todo = failed
        self.index = max(meta.index for _, meta in pending.values())
        for key, item in pending.items():
            self._list_index[key] = item[1].index
            if self._pending.get(key) is item:
                del self._pending[key]
        self._need_full = False
        services = {k: v for k, v in self.entries.items() if v}
        self._out_services.clear()
        self._out_nodes.clear()
        self.mirror.emit(CatalogDelta(datacenter=self.name, index=self.index, services=services,
                                      nodes=dict(self.nodes), full=True))
        self.deltas += 1
        self.full_loads += 1
        elapsed = self.mirror.clock() - started
        instances = sum(len(v) for v in services.values())
        if not self.synced:
            self.synced = True
            self.first_sync_seconds = self.mirror.clock() - self._started
            self._resync_at = self.mirror.clock() + self.mirror.upstream.resync_interval
            log.info("%s: mirrored %d services, %d instances, %d nodes in %.2fs (index %d%s)",
                     self.name, len(services), instances, len(self.nodes), elapsed, self.index,
                     ", from the agent's snapshot" if seed is not None else "")
            self.seeded = seed is not None
            self.mirror.dc_synced(self)
        else:
            log.info("%s: reloaded %d services, %d instances, %d nodes in %.2fs after a reset (index %d)",
                     self.name, len(services), instances, len(self.nodes), elapsed, self.index)
        self._check_datacenter_name()
        if self._unknown:
            self._wake.set()

    def _check_datacenter_name(self) -> None:
        seen = {n.datacenter for n in self.nodes.values() if n.datacenter}
        if seen and self.name.lower() not in {s.lower() for s in seen}:
            log.warning("%s: the upstream's nodes say datacenter %s; DNS answers them as %r (set "
                        "'datacenter' to the upstream agent's datacenter)", self.name,
                        ", ".join(sorted(seen)), self.name)

    # -- nodes ------------------------------------------------------------------------------------

    def _digest_nodes(self, body: Any) -> tuple[list[Node], list[str]]:
        """Fold a ``/v1/catalog/nodes`` body into ``self.nodes``; return (changed, removed names)."""
        if not isinstance(body, list):
            raise UpstreamError("catalog/nodes: expected a list")
        changed: list[Node] = []
        seen: set[str] = set()
        rows = self.node_rows
        for row in body:
            name = row.get("Node") if isinstance(row, dict) else None
            if not isinstance(name, str) or not name:
                continue
            seen.add(name)
            version = (row.get("CreateIndex") or 0, row.get("ModifyIndex") or 0)
            if rows.get(name) == version and name in self.nodes:
                continue
            node = parse_node(row)
            rows[name] = version
            if self.nodes.get(name) != node:
                self.nodes[name] = node
                changed.append(node)
        removed = [n for n in self.nodes if n not in seen]
        for n in removed:
            del self.nodes[n]
            rows.pop(n, None)
        return changed, removed

    def _apply_nodes(self, body: Any, meta: QueryMeta) -> None:
        before = set(self.nodes)
        changed, removed = self._digest_nodes(body)
        for node in changed:
            if node.name not in before and not self._hinting:
                self._new_nodes.append(node.name)
            self._out_nodes[node.name] = node
            nl = node.name.lower()
            for lname in list(self.by_node.get(nl, ())):
                self._note_event(lname, max(node.modify_index, node.create_index))
                self._set_entries(lname, tuple(replace(e, node=node) if e.node.name.lower() == nl and e.node != node
                                               else e for e in self.entries.get(lname, ())))
        for name in removed:
            # Consul deletes a node's services and checks with it.
            self._out_nodes[name] = None
            nl = name.lower()
            for lname in list(self.by_node.get(nl, ())):
                self._note_event(lname, meta.index)
                self._set_entries(lname, tuple(e for e in self.entries.get(lname, ()) if e.node.name.lower() != nl))
        self.index = max(self.index, meta.index)

    # -- checks -----------------------------------------------------------------------------------

    @staticmethod
    def _list_rows(body: Any, what: str) -> dict[CheckKey, tuple[int, int]]:
        if not isinstance(body, list):
            raise UpstreamError(f"health/state/{what}: expected a list")
        out: dict[CheckKey, tuple[int, int]] = {}
        for row in body:
            ident = _row_key(row)
            if ident is not None:
                out[ident[0]] = ident[1]
        return out

    async def _apply_nonpassing(self, crit: tuple[Any, QueryMeta] | None,
                                warn: tuple[Any, QueryMeta] | None) -> None:
        """The critical and warning lists moved. A check in them whose version we do not have is
        patched in from its row; a check that left both is passing now (or gone): its node's
        checks are re-read. A move that changes neither list was a passing check's write."""
        before = {**self._np_rows["warning"], **self._np_rows["critical"]}
        index = self._checks_index
        touched = False
        # A dnsdisco upstream names the services the check writes bear on (both lists carry
        # the same hint): None when a reply came without one.
        hinted: set[str] | None = set()
        for key, item in (("critical", crit), ("warning", warn)):
            if item is None:
                continue
            body, meta = item
            if hinted is not None:
                hinted = None if meta.changed is None else hinted | set(meta.changed)
            index = max(index, meta.index)
            self._np_rows[key] = self._list_rows(body, key)
            for row in body:
                ident = _row_key(row)
                if ident is None:
                    continue
                known = self.check_rows.get(ident[0])
                if known is None or known.version != ident[1]:
                    self._apply_check(parse_check(row))
                    touched = True
        now = {**self._np_rows["warning"], **self._np_rows["critical"]}
        left = {k[0] for k in before if k not in now}
        moved = index > self._checks_index
        self._checks_index = index
        self.index = max(self.index, index)
        if left:
            await self._read_nodes(left)
        if moved and hinted is not None:
            # Read the named services (a passing check's write included) instead of every
            # check later: O(change). Those not known yet are read as new ones.
            self.checks_hinted += 1
            self._unknown.update((k, self._url_name(k)) for k in hinted)
            for k in hinted:
                self._note_patch(k, index)
        elif moved and not touched and not left and index != self._services_index:
            # (At the index of a services move already handled, the write was that service's:
            # the read of it, or the sweep, saw its checks.)
            if not self._checks_behind:
                self._behind_first = index
            self._checks_behind = True  # handled at the end of the round
            self._behind_last = index

    def _apply_check(self, check: Check) -> None:
        """Fold one check in (new or changed) and patch the entries it bears on."""
        nl = check.node.lower()
        self.check_rows[(nl, check.check_id)] = _CheckRow(
            (check.create_index, check.modify_index), check.service_id, check.service_name)
        if check.service_id:
            lname = self._service_of(nl, check.service_id)
            if lname is None:
                # A check on an instance we do not have: the instance is new (or this is the
                # first we hear of it). Read its service.
                if check.service_name:
                    self._unknown[check.service_name.lower()] = check.service_name
                    self._note_patch(check.service_name.lower(), max(check.modify_index, check.create_index))
                return
            self._patch_instance(lname, nl, check.service_id, check.check_id, check)
            self._note_event(lname, max(check.modify_index, check.create_index))
        else:
            for lname in list(self.by_node.get(nl, ())):
                self._patch_node_checks(lname, nl, check.check_id, check)
                self._note_patch(lname, max(check.modify_index, check.create_index))

    def _remove_check(self, key: CheckKey, index: int) -> None:
        row = self.check_rows.pop(key)
        if row is None:
            return
        nl, cid = key
        if row.service_id:
            lname = self._service_of(nl, row.service_id)
            if lname is not None:
                self._patch_instance(lname, nl, row.service_id, cid, None)
                # A vanished check often means its instance went too (deregistration).
                self._note_event(lname, index)
        else:
            for lname in list(self.by_node.get(nl, ())):
                self._patch_node_checks(lname, nl, cid, None)
                self._note_patch(lname, index)

    async def _read_nodes(self, nodes: set[str]) -> None:
        """Re-read ``/v1/health/node/<node>`` for nodes whose checks left the non-passing lists."""
        client = self.mirror.client

        async def one(nl: str) -> None:
            # Node names are case-insensitive in Consul's lookups.
            async with self.mirror.fetch_slots:
                resp = await client.get(client.url("/v1/health/node") / nl, dc=self.query_dc)
            self.node_reads += 1
            checks = parse_checks(resp.data)
            seen = set()
            for check in checks:
                key = (check.node.lower(), check.check_id)
                seen.add(key)
                known = self.check_rows.get(key)
                if known is None or known.version != (check.create_index, check.modify_index):
                    self._apply_check(check)
            for key in [k for k in self.check_rows.on_node(nl) if k not in seen]:
                self._remove_check(key, resp.meta.index)

        await asyncio.gather(*(one(nl) for nl in nodes))

    async def _read_all_checks(self) -> None:
        """Read ``/v1/health/state/any`` (every check) and fold in what differs."""
        resp = await self.mirror.client.get("/v1/health/state/any", dc=self.query_dc)
        await self._fold_all_checks(resp.data, resp.meta.index)

    async def _fold_all_checks(self, body: Any, index: int) -> None:
        self.any_reads += 1
        if not isinstance(body, list):
            raise UpstreamError("health/state/any: expected a list")
        seen: set[CheckKey] = set()
        for i, row in enumerate(body):
            if i % FOLD_CHUNK == FOLD_CHUNK - 1:
                # Tens of thousands of rows: let DNS in between (nothing else changes the
                # mirrored state outside this round meanwhile).
                await asyncio.sleep(0)
            ident = _row_key(row)
            if ident is None:
                continue
            key, version = ident
            seen.add(key)
            known = self.check_rows.get(key)
            if known is None or known.version != version:
                self._apply_check(parse_check(row))
        for key in [k for k in self.check_rows if k not in seen]:
            self._remove_check(key, index)
        self._any_index = index
        self.index = max(self.index, index)

    def _note_event(self, lname: str, index: int) -> None:
        if index > self._events.get(lname, 0):
            self._events[lname] = index
        self._note_patch(lname, index)

    def _note_patch(self, lname: str, index: int) -> None:
        if index > self._patched_at.get(lname, 0):
            self._patched_at[lname] = index

    def _patch_instance(self, lname: str, nl: str, service_id: str, check_id: str, check: Check | None) -> None:
        entries = self.entries.get(lname, ())
        out = tuple(with_check(e, check_id, check) if e.node.name.lower() == nl and e.service.id == service_id
                    else e for e in entries)
        self._set_entries(lname, out)

    def _patch_node_checks(self, lname: str, nl: str, check_id: str, check: Check | None) -> None:
        entries = self.entries.get(lname, ())
        out = tuple(with_check(e, check_id, check) if e.node.name.lower() == nl else e for e in entries)
        self._set_entries(lname, out)

    # -- services ---------------------------------------------------------------------------------

    async def _apply_services(self, body: Any, meta: QueryMeta) -> set[str]:
        """A services move: drop what is gone, read what the move is known to touch, and sweep
        if nothing seen explains it. Returns the names read."""
        names = parse_services(body)
        for n in names:
            self.url_names.setdefault(n.lower(), n)
        self._hinting = meta.changed is not None
        if meta.delta and meta.changed is not None:
            # Only the hinted names' entries (dnsdisco's services delta): a hinted name absent
            # from the body has no instance left. O(change), not O(services).
            given = tag_sets(names)
            added, removed, retagged = [], [], []
            for k in dict.fromkeys(meta.changed):
                now, was = given.get(k), self.tags.get(k)
                if now is None:
                    if was is not None:
                        removed.append(k)
                elif was is None:
                    added.append(k)
                elif now != was:
                    retagged.append(k)
            for k in removed:
                del self.tags[k]
            self.tags.update((k, given[k]) for k in (*added, *retagged))
            new_tags = self.tags
            self.services_deltas += 1
        else:
            new_tags = tag_sets(names)
            added = [k for k in new_tags if k not in self.tags]
            removed = [k for k in self.tags if k not in new_tags]
            retagged = [k for k in new_tags if k in self.tags and new_tags[k] != self.tags[k]]
            self.tags = new_tags
        for k in removed:
            self._set_entries(k, ())
            self.svc_index.pop(k, None)
            self._events.pop(k, None)
            self.url_names.pop(k, None)
        index = meta.index
        prev, self._services_index = self._services_index, index
        self.index = max(self.index, index)
        todo = {k: self._url_name(k) for k in [*added, *retagged]}
        if meta.changed is not None:
            # A dnsdisco upstream named the services written since the previous reply: read
            # just those (removed names are gone already), nothing to attribute.
            self.hinted += 1
            todo.update((k, self._url_name(k)) for k in meta.changed if k in new_tags)
            todo.update(self._unknown)
            self._unknown.clear()
            # Those whose entries came with the reply need no read (unless they do not parse).
            pushed = set()
            for k, (rows, svc_index) in (meta.entries or {}).items():
                # Not over what this round took from the check and node lists (applied first)
                # if that is newer than the pushed entries: those names are read instead.
                if k not in todo or svc_index < max(self.svc_index.get(k, 0), self._patched_at.get(k, 0)):
                    continue
                try:
                    entries = tuple(e for e in parse_health_service(rows, self.nodes) if e.service.name.lower() == k)
                except DnsdiscoError as e:
                    self.last_error = str(e)
                    continue
                del todo[k]
                pushed.add(k)
                self._set_entries(k, entries)
                self.svc_index[k] = svc_index
                self._patched_at.pop(k, None)
            self.pushed += len(pushed)
            await self._fetch(todo)
            self._forget_events(index)
            return {*todo, *pushed}
        todo.update(self._candidates(index))
        fetched = set(todo)
        await self._fetch(todo)
        if index == prev or removed or self._explained(index, fetched):
            self._services_handled(index)
            return fetched
        # Nothing seen yet explains this write. The other watches race with this one for the
        # same write: give them a moment to report it, then look again. The read half of a
        # sweep starts meanwhile (it changes nothing, so it is simply dropped if the lists
        # explain the write): a write without checks never shows in those lists, and would
        # otherwise wait out the whole settle before its sweep began.
        todo = self._sweep_todo(fetched)
        along_nodes = self._by_node(len(todo))
        found: dict[str, str] = {}
        scan = asyncio.create_task(self._scan(todo, found)) if todo else None
        try:
            await self._settle(index, scan)
            if (not along_nodes and not self._try_explain(index, fetched)
                    and self._any_index < index <= self._checks_index):
                # Still nothing, but checks were written too: the write touched no non-passing
                # check (a deregistration, a registration with passing checks). One read of
                # every check attributes it far more cheaply than re-reading every service.
                # (When the checks index stayed below, no check was written with it: that read
                # cannot help. A sweep by node is about as cheap, and unlike that one long read
                # it leaves the event loop to DNS between its small ones.)
                await self._read_all_checks()
            more = {k: v for k, v in self._candidates(index).items() if k not in fetched}
            fetched.update(more)
            await self._fetch(more)
            if not self._explained(index, fetched):
                pending, scan = scan, None
                await self._sweep(exclude=fetched, why=f"unexplained services index {index}",
                                  scan=None if pending is None else (pending, found))
                fetched.update(self.entries)
        finally:
            if scan is not None:
                scan.cancel()
                await asyncio.gather(scan, return_exceptions=True)
        self._services_handled(index)
        return fetched

    def _services_handled(self, index: int) -> None:
        """The services write at *index* has been found and read. If it is also the only check
        write the lists moved on without showing anything (a registration or deregistration
        with passing checks), the reads saw those checks: no catch-up read of every check."""
        self._forget_events(index)
        if self._checks_behind and self._behind_first == self._behind_last == index:
            self._checks_behind = False

    def _try_explain(self, index: int, fetched: set[str]) -> bool:
        return any(i == index and k not in fetched for k, i in self._events.items()) or bool(self._unknown)

    def _url_name(self, lname: str) -> str:
        return self.url_names.get(lname, lname)

    def _service_of(self, nl: str, service_id: str) -> str | None:
        """The lower name of the mirrored instance *service_id* on node *nl*, if there is one."""
        got = self.instances.get(nl, {}).get(service_id)
        return None if got is None else got[0]

    def _candidates(self, index: int) -> dict[str, str]:
        """Services a services write at *index* may have touched, by what the other watches saw:
        checks or nodes written in the same write, checks on instances we do not know."""
        out = {k: self._url_name(k) for k, i in self._events.items() if i == index}
        out.update(self._unknown)
        self._unknown.clear()
        return out

    def _explained(self, index: int, fetched: Iterable[str]) -> bool:
        """Whether the services write at *index* is accounted for: a service read now was itself
        written at *index* (an instance's ModifyIndex, or the read's own index - a write to the
        service's node or checks moves it too)."""
        for k in fetched:
            if self.svc_index.get(k) == index:
                return True
            if any(e.service.modify_index == index for e in self.entries.get(k, ())):
                return True
        return False

    def _forget_events(self, index: int) -> None:
        self._events = {k: i for k, i in self._events.items() if i > index}

    async def _settle(self, index: int, scan: asyncio.Task[Any] | None = None) -> None:
        """Give the check lists' replies for write *index* a moment (``settle``) to arrive:
        they race with the services reply. Ends as soon as both reached *index*, or *scan* (a
        sweep by node) is done, which has found the change itself. (The nodes list is not
        waited for: a node written along with a service is a new one, read on its own when
        the nodes list brings it.)"""
        deadline = self.mirror.clock() + self.mirror.settle
        lists = [self.watches[k] for k in ("critical", "warning")]
        while (any(w.index < index for w in lists) and self.mirror.clock() < deadline
               and (scan is None or not scan.done())):
            await asyncio.sleep(0.002)
        await self._take_nodes_and_checks()

    def _sweep_todo(self, exclude: Iterable[str]) -> dict[str, str]:
        skip = set(exclude)
        return {k: self._url_name(k) for k in {*self.tags, *self.entries} if k not in skip}

    async def _sweep(self, *, exclude: Iterable[str], why: str, by_node: bool = True,
                     scan: tuple[asyncio.Task[bool], dict[str, str]] | None = None) -> None:
        """Find what changed by re-reading everything but *exclude*, along the shorter axis
        (:meth:`_scan`; *scan* is one already under way, with the dict it fills), and read the
        services found as they are found."""
        started = self.mirror.clock()
        if scan is None:
            todo = self._sweep_todo(exclude)
            if not todo:
                return
            found: dict[str, str] = {}
            task = asyncio.create_task(self._scan(todo, found, by_node=by_node))
        else:
            task, found = scan
        read: set[str] = set()
        try:
            while True:
                finished = task.done()
                fresh = {k: v for k, v in found.items() if k not in read}
                if fresh:
                    # Out as soon as found: a scan of 5,000 services takes about half a second.
                    read.update(fresh)
                    await self._fetch(fresh)
                    self._flush()
                if finished:
                    break
                await asyncio.wait({task}, timeout=FLUSH_EVERY / 5)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        along_nodes = task.result()
        self.sweeps += 1
        self.node_sweeps += along_nodes
        log.debug("%s: swept %s (%s) in %.2fs: %d services changed", self.name,
                  "nodes" if along_nodes else "services", why, self.mirror.clock() - started, len(found))

    async def _scan(self, todo: Mapping[str, str], found: dict[str, str], *, by_node: bool = True) -> bool:
        """The read half of a sweep, which changes nothing it reads (so it can run while the
        check lists settle, and be dropped): fills *found* with the services that differ from
        the mirror (lower name -> URL name), to be read afresh, as it finds them; returns
        whether it went along nodes. Along nodes when *by_node* and there are fewer nodes than
        services in *todo* (and the upstream has node-services), else every service in *todo*."""
        if by_node and self._by_node(len(todo)) and await self._sweep_nodes(found):
            return True
        await self._scan_services(todo, found)
        return False

    async def _scan_services(self, todo: Mapping[str, str], found: dict[str, str]) -> None:
        """Read every service in *todo* without decoding it; into *found* go those whose
        ``X-Consul-Index`` moved since the mirror's last read (or that it never read). Reads
        that fail are queued for a re-read."""
        queue = list(todo.items())
        queue.reverse()
        client = self.mirror.client
        slots = self.mirror.fetch_slots

        async def worker() -> None:
            while queue:
                lname, url_name = queue.pop()
                try:
                    async with slots:
                        resp = await client.get(client.url("/v1/health/service") / url_name,
                                                dc=self.query_dc, decode=False)
                except DnsdiscoError as e:
                    self._dirty[lname] = url_name
                    self.last_error = str(e)
                    continue
                self.fetches += 1
                if resp.meta.index != self.svc_index.get(lname):
                    found[lname] = url_name

        workers = min(len(queue), self.mirror.upstream.fetch_concurrency)
        await asyncio.gather(*(worker() for _ in range(workers)))

    def _by_node(self, services: int) -> bool:
        """Whether a sweep reads nodes rather than *services* services: fewer requests."""
        return self._node_sweeps and 0 < len(self.nodes) < services

    async def _sweep_nodes(self, found: dict[str, str]) -> bool:
        """Read every node's services (``/v1/catalog/node-services/<node>``), putting the
        services whose instances differ from the mirror's into *found*; False if the upstream
        cannot (Consul before 1.7). A node whose body is byte for byte the one last found in
        agreement is not decoded. Nodes that could not be read are queued for a re-read."""
        names = {n.lower(): n for n in self.nodes}
        names.update((nl, nl) for nl in self.instances if nl not in names)
        ok, failed = await self._scan_nodes(list(names.values()), found)
        if not ok:
            return False
        for nl in failed:
            # Read again: what is mirrored there, and the node itself (it may hold the change).
            self._dirty.update((k, self._url_name(k)) for k in self.by_node.get(nl, ()))
            self._new_nodes.append(names.get(nl, nl))
        return True

    async def _read_new_nodes(self) -> None:
        """A node new to the nodes list may bring instances of services already mirrored,
        registered with it in one write; Consul's ``catalog/services`` moves without saying
        which service, and the services sweep may run before the node is known. Reading the
        new node's services names them directly."""
        names, self._new_nodes = self._new_nodes, []
        if not self._node_sweeps:
            return  # the upstream predates node-services: the services sweep finds them
        found: dict[str, str] = {}
        ok, failed = await self._scan_nodes(names, found)
        if ok:
            self._unknown.update(found)
            self._new_nodes.extend(failed)

    async def _scan_nodes(self, names: list[str], found: dict[str, str]) -> tuple[bool, list[str]]:
        """Read the services of every node in *names* (node names, any case) with the read
        pool, putting into *found* (lower name -> URL name) the services whose instances there
        differ from the mirror's; return (False if the endpoint is missing, the lower names of
        nodes whose read failed)."""
        failed: list[str] = []
        queue = list(reversed(names))
        client = self.mirror.client
        slots = self.mirror.fetch_slots
        missing = False

        async def worker() -> None:
            nonlocal missing
            while queue and not missing:
                name = queue.pop()
                nl = name.lower()
                known = self._node_digests.get(nl)
                try:
                    async with slots:
                        resp = await client.get(client.url("/v1/catalog/node-services") / name,
                                                dc=self.query_dc, digest=True, skip_digest=known)
                except UpstreamError as e:
                    if e.status == 404:
                        missing = True
                    else:
                        failed.append(nl)
                        self.last_error = str(e)
                    continue
                self.node_reads += 1
                if known is not None and resp.digest == known:
                    continue  # the same body as when it last agreed with the mirror
                try:
                    changed = self._node_changes(nl, resp.data)
                except UpstreamError as e:
                    failed.append(nl)
                    self.last_error = str(e)
                    continue
                if changed:
                    # Its digest is kept only once a later read agrees: the services read
                    # next may come from a server further behind (?stale) than this one.
                    self._node_digests.pop(nl, None)
                    found.update(changed)
                elif resp.digest is not None:
                    self._node_digests[nl] = resp.digest

        workers = min(len(queue), self.mirror.upstream.fetch_concurrency)
        await asyncio.gather(*(worker() for _ in range(workers)))
        if missing:
            log.warning("%s: the upstream has no /v1/catalog/node-services (Consul < 1.7): sweeps "
                        "re-read every service instead", self.name)
            self._node_sweeps = False
            return False, []
        return True, failed

    def _node_changes(self, nl: str, body: Any) -> dict[str, str]:
        """The services (lower name -> URL name) whose instances on node *nl*, as a
        ``node-services`` body lists them (``null``: no such node), differ from the mirror's:
        new, gone, renamed, or with another ModifyIndex."""
        services = body.get("Services") if isinstance(body, dict) else None
        if body is not None and not isinstance(body, dict):
            raise UpstreamError("catalog/node-services: expected an object")
        have = self.instances.get(nl, {})
        out: dict[str, str] = {}
        seen: set[str] = set()
        for row in services if isinstance(services, list) else ():
            if not isinstance(row, dict):
                continue
            sid, name = row.get("ID"), row.get("Service")
            if not isinstance(sid, str) or not isinstance(name, str) or not name:
                continue
            seen.add(sid)
            lname = name.lower()
            known = have.get(sid)
            if known is None or known != (lname, row.get("ModifyIndex") or 0):
                out[lname] = name
                if known is not None and known[0] != lname:
                    out[known[0]] = self._url_name(known[0])
        for sid, (lname, _) in have.items():
            if sid not in seen:
                out[lname] = self._url_name(lname)
        return out

    # -- reading services ---------------------------------------------------------------------------

    async def _fetch(self, todo: Mapping[str, str], *, record: bool = True) -> dict[str, str]:
        """Read ``/v1/health/service/<name>`` for every lower name in *todo* (value: the name for
        the URL) with a pool of workers sharing the mirror's read slots; fold each into the
        state as it arrives. Returns the reads that failed (also queued for retry if *record*)."""
        if not todo:
            return {}
        queue = list(todo.items())
        queue.reverse()
        failed: dict[str, str] = {}
        client = self.mirror.client
        slots = self.mirror.fetch_slots
        last_flush = self.mirror.clock()

        async def worker() -> None:
            nonlocal last_flush
            while queue:
                lname, url_name = queue.pop()
                try:
                    async with slots:
                        resp = await client.get(client.url("/v1/health/service") / url_name, dc=self.query_dc)
                    self.fetches += 1
                    entries = tuple(e for e in parse_health_service(resp.data, self.nodes)
                                    if e.service.name.lower() == lname)
                    self._set_entries(lname, entries)
                    self.svc_index[lname] = resp.meta.index
                    if self._patched_at.get(lname, 0) <= resp.meta.index:
                        self._patched_at.pop(lname, None)
                except DnsdiscoError as e:
                    failed[lname] = url_name
                    self.last_error = str(e)
                    continue
                if record and self.synced and self.mirror.clock() - last_flush >= FLUSH_EVERY:
                    last_flush = self.mirror.clock()
                    self._flush()

        workers = min(len(queue), self.mirror.upstream.fetch_concurrency)
        await asyncio.gather(*(worker() for _ in range(workers)))
        if failed:
            log.warning("%s: %d service reads failed (%s); retrying", self.name, len(failed), self.last_error)
            if record:
                self._dirty.update(failed)
        return failed

    def _set_entries(self, lname: str, entries: tuple[ServiceEntry, ...]) -> None:
        old = self.entries.get(lname, ())
        if old == entries:
            return
        instances = self.instances
        rows = self.check_rows
        for e in old:
            nl = e.node.name.lower()
            on_node = instances.get(nl)
            if on_node is not None and on_node.get(e.service.id, ("",))[0] == lname:
                del on_node[e.service.id]
                if not on_node:
                    del instances[nl]
                # Its own checks go with it (a deregistration found by a sweep reads no check
                # list); those still there come back with the new entries below.
                for c in e.checks:
                    row = rows.get((nl, c.check_id))
                    if c.service_id and row is not None and row.service_id == e.service.id:
                        rows.pop((nl, c.check_id))
            counts = self.by_node.get(nl)
            if counts is not None:
                left = counts.get(lname, 0) - 1
                if left > 0:
                    counts[lname] = left
                else:
                    counts.pop(lname, None)
                    if not counts:
                        del self.by_node[nl]
        for e in entries:
            nl = e.node.name.lower()
            on_node = instances.setdefault(nl, {})
            other = on_node.get(e.service.id)
            if other is not None and other[0] != lname:
                # The instance was renamed: the service it left still lists it until re-read.
                self._unknown[other[0]] = self._url_name(other[0])
            on_node[e.service.id] = (lname, e.service.modify_index)
            counts = self.by_node.setdefault(nl, {})
            counts[lname] = counts.get(lname, 0) + 1
            for c in e.checks:
                rows[(nl, c.check_id)] = _CheckRow((c.create_index, c.modify_index), c.service_id, c.service_name)
        if entries:
            self.entries[lname] = entries
        else:
            self.entries.pop(lname, None)
        if self.synced:
            self._out_services[lname] = entries

    def _flush(self) -> None:
        if not self._out_services and not self._out_nodes:
            return
        delta = CatalogDelta(datacenter=self.name, index=self.index, services=self._out_services,
                             nodes=self._out_nodes)
        self._out_services = {}
        self._out_nodes = {}
        self.deltas += 1
        self.mirror.emit(delta)

    def full_delta(self) -> CatalogDelta:
        return CatalogDelta(datacenter=self.name, index=self.index,
                            services={k: v for k, v in self.entries.items() if v},
                            nodes=dict(self.nodes), full=True)

    def status(self, now: float, wall: float) -> dict[str, Any]:
        age = self.age(now)
        return {
            "synced": self.synced,
            "stale": self.name.lower() in self.mirror.stale_datacenters,
            "age_seconds": None if age is None else round(age, 3),
            "last_sync": None if age is None else wall - age,
            "index": self.index,
            "services": len(self.entries),
            "instances": sum(len(v) for v in self.entries.values()),
            "nodes": len(self.nodes),
            "non_passing_checks": len({**self._np_rows["critical"], **self._np_rows["warning"]}),
            "first_sync_seconds": self.first_sync_seconds,
            "full_loads": self.full_loads,
            "sweeps": self.sweeps,
            "node_sweeps": self.node_sweeps,
            "service_reads": self.fetches,
            "node_reads": self.node_reads,
            "all_checks_reads": self.any_reads,
            "seeded": self.seeded,
            "hinted_services_moves": self.hinted,
            "services_deltas": self.services_deltas,
            "pushed_services": self.pushed,
            "hinted_checks_moves": self.checks_hinted,
            "deltas": self.deltas,
            "last_error": self.last_error,
            "watches": {
                key: {
                    "index": w.index,
                    "failing": w.failing,
                    "known_leader": w.known_leader,
                    "last_contact_ms": int(w.last_contact * 1000),
                    "replies": w.replies,
                    "errors": w.errors,
                    "resets": w.resets,
                    "last_error": w.last_error,
                }
                for key, w in self.watches.items()
            },
        }


# -- the mirror ---------------------------------------------------------------------------------------


class Mirror:
    """Follows a Consul agent's catalog - its own datacenter and those ``upstream.datacenters``
    names - and feeds ``on_delta`` the deltas the embedded store would produce for it.

    * ``on_delta(delta)`` (``AnswerTable.apply``) is called from the event loop: one ``full``
      delta per datacenter when it is first loaded (and again if the upstream's index goes
      backwards), then deltas naming what changed.
    * ``on_stale(datacenter, stale)`` (``AnswerTable.set_stale``) is called with True for each
      datacenter until its first load, and when its copy gets older than *max_stale*; with
      False once it is loaded and fresh again.
    * *local_datacenter* names the upstream agent's own datacenter (read without ``?dc=``);
      deltas for it carry this name.
    * *settle* is how long an unexplained services move waits for the check lists' replies
      of the same write (``SETTLE``; 0 turns the wait off). Only the Consul path waits: a
      dnsdisco upstream names the services it wrote (``upstream.change_hints``, on by
      default; off, a dnsdisco upstream is followed exactly as Consul is).
      The watches' token bucket is ``upstream.query_interval``/``query_burst`` (0: none).
    * *seed* (a :class:`Seed`) stands in for the reads of the local datacenter's first load.

    :meth:`start` returns at once; everything runs in background tasks until :meth:`stop`.
    Nothing here raises because Consul is away: errors are retried with backoff and reported by
    :meth:`status`.
    """

    def __init__(
        self,
        upstream: UpstreamConfig,
        *,
        local_datacenter: str,
        on_delta: OnDelta,
        on_stale: OnStale | None = None,
        max_stale: float = DEFAULT_MAX_STALE,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        settle: float = SETTLE,
        seed: Seed | None = None,
    ) -> None:
        self.upstream = upstream
        self.settle = settle
        self._seed = seed  # for the local datacenter's first load (see Seed)
        self.local_datacenter = local_datacenter
        self._on_delta = on_delta
        self._on_stale = on_stale
        self.max_stale = max_stale
        self.clock = clock
        self.wall = wall
        self.rng = rng or random.Random()
        # Contact is judged by replies; with a max_stale set, blocking waits are kept well under
        # it, so that a cluster that lost its leader (stale reads still answer, LastContact
        # grows) is noticed in time.
        self.wait = min(upstream.wait, max(max_stale / 2, 1.0))
        extra = [] if upstream.all_datacenters else [
            d for d in upstream.datacenters if d.lower() != local_datacenter.lower()]
        # The watches of each datacenter, the read pool, the datacenter list: the whole budget.
        self.max_connections = (0 if upstream.all_datacenters
                                else len(WATCHED) * (1 + len(extra)) + upstream.fetch_concurrency + 1)
        self.client = ConsulClient(upstream, limit=self.max_connections)
        self._extra = extra
        self._dcs: dict[str, _Datacenter] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._timers: set[asyncio.TimerHandle] = set()
        self.fetch_slots = asyncio.Semaphore(upstream.fetch_concurrency)
        self.stale_datacenters: set[str] = set()
        self._synced = asyncio.Event()
        self._running = False

    # -- public contract ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the session and start following; returns at once (the first load happens in the
        background: see :attr:`synced` and :meth:`wait_synced`)."""
        if self._running:
            return
        self._running = True
        await self.client.open()
        self._add(self.local_datacenter, None)
        for dc in self._extra:
            self._add(dc, dc)
        if self.upstream.all_datacenters:
            self._tasks.append(asyncio.create_task(self._discover(), name="mirror datacenters"))
        if self.max_stale < DEFAULT_MAX_STALE:
            self._tasks.append(asyncio.create_task(self._watch_staleness(), name="mirror staleness"))

    async def stop(self) -> None:
        """Stop every watch and close the connections. The last copy stays with the consumer."""
        if not self._running:
            return
        self._running = False
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for h in self._timers:
            h.cancel()
        self._timers.clear()
        await asyncio.gather(*(dc.stop() for dc in self._dcs.values()))
        await self.client.close()

    @property
    def synced(self) -> bool:
        """True once the local datacenter has been loaded in full (the table's ``synced``)."""
        dc = self._dcs.get(self.local_datacenter.lower())
        return dc is not None and dc.synced

    @property
    def all_synced(self) -> bool:
        """True once every mirrored datacenter has been loaded in full."""
        return bool(self._dcs) and all(dc.synced for dc in self._dcs.values())

    async def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait until :attr:`synced` (True), or *timeout* seconds (False)."""
        try:
            await asyncio.wait_for(self._synced.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    def instance_count(self) -> int:
        """Instances mirrored, over every datacenter (O(services))."""
        return sum(len(v) for dc in self._dcs.values() for v in dc.entries.values())

    @property
    def datacenters(self) -> list[str]:
        return [dc.name for dc in self._dcs.values()]

    def age(self, datacenter: str | None = None) -> float | None:
        """Seconds since *datacenter*'s copy (the local one by default) was last known current;
        None before its first load."""
        dc = self._dcs.get((datacenter or self.local_datacenter).lower())
        return None if dc is None else dc.age(self.clock())

    @property
    def last_sync(self) -> float | None:
        """Wall-clock time (``time.time()``) at which the local copy was last known current:
        now while Consul is answering, the moment contact was lost otherwise."""
        age = self.age()
        return None if age is None else self.wall() - age

    @property
    def stale(self) -> bool:
        """True while the local datacenter is reported stale (not loaded, or past max_stale)."""
        return self.local_datacenter.lower() in self.stale_datacenters

    def ready(self) -> tuple[bool, str]:
        """``/ready`` (the agent's ``Ready`` callable): 200 once the local datacenter is loaded
        and while it is served - after max_stale it is not (DNS answers SERVFAIL then)."""
        dc = self._dcs.get(self.local_datacenter.lower())
        where = f"{self.local_datacenter} from {self.upstream.address}"
        if dc is None or not dc.synced:
            error = ""
            if dc is not None:
                error = dc.last_error or next((w.last_error for w in dc.watches.values() if w.last_error), "")
            return False, f"not ready: first sync of {where} not complete" + (f": {error}" if error else "")
        age = dc.age(self.clock()) or 0.0
        if self.stale:
            return False, f"not ready: mirror of {where} is {age:.1f}s old, past max_stale {self.max_stale:g}s"
        return True, f"ready: mirroring {where} at index {dc.index}, {age:.1f}s old"

    def full_delta(self, datacenter: str | None = None) -> CatalogDelta:
        """The mirrored catalog of *datacenter* (the local one by default) as one ``full`` delta,
        as ``Store.full_delta()`` gives the embedded one."""
        return self._dcs[(datacenter or self.local_datacenter).lower()].full_delta()

    def status(self) -> dict[str, Any]:
        """A JSON-ready summary for ``/ready`` and operators: sync state, age, per-datacenter
        numbers, connections. Never includes the token."""
        now, wall = self.clock(), self.wall()
        age = self.age()
        return {
            "mode": "mirror",
            "upstream": self.upstream.address,
            "synced": self.synced,
            "stale": self.stale,
            "age_seconds": None if age is None else round(age, 3),
            "last_sync": None if age is None else wall - age,
            "max_stale_seconds": self.max_stale,
            "wait_seconds": self.wait,
            "datacenters": {dc.name: dc.status(now, wall) for dc in self._dcs.values()},
            "requests": self.client.requests,
            "errors": self.client.errors,
            "bytes": self.client.bytes,
            "connections_opened": self.client.connections_opened,
            "max_connections": self.max_connections or None,
        }

    # -- internals (called by _Datacenter) ------------------------------------------------------------

    def emit(self, delta: CatalogDelta) -> None:
        try:
            self._on_delta(delta)
        except Exception:
            log.exception("delta consumer failed on a delta for %s", delta.datacenter)

    def _set_stale(self, dc: str, stale: bool) -> None:
        key = dc.lower()
        if (key in self.stale_datacenters) == stale:
            return
        if stale:
            self.stale_datacenters.add(key)
        else:
            self.stale_datacenters.discard(key)
        if self._on_stale is not None:
            try:
                self._on_stale(dc, stale)
            except Exception:
                log.exception("stale consumer failed for %s", dc)

    def dc_synced(self, dc: _Datacenter) -> None:
        age = dc.age(self.clock())
        self._set_stale(dc.name, age is None or age > self.max_stale)
        if dc.name.lower() == self.local_datacenter.lower():
            self._synced.set()

    def new_backoff(self) -> Backoff:
        return Backoff(base=self.upstream.backoff_min, cap=self.upstream.backoff_max, rng=self.rng)

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()

        def run() -> None:
            self._timers.discard(handle)
            fn()

        handle = loop.call_later(delay, run)
        self._timers.add(handle)

    def _add(self, name: str, query_dc: str | None) -> None:
        key = name.lower()
        if key in self._dcs:
            return
        seed = None
        if key == self.local_datacenter.lower():
            seed, self._seed = self._seed, None
        dc = _Datacenter(self, name, query_dc, seed)
        self._dcs[key] = dc
        # Not loaded yet: names in it are not known, so they must not look absent.
        self._set_stale(name, True)
        dc.start()

    async def _remove(self, key: str) -> None:
        dc = self._dcs.pop(key)
        await dc.stop()
        self._set_stale(dc.name, False)
        self.emit(CatalogDelta(datacenter=dc.name, index=dc.index, full=True))
        log.info("%s: no longer listed by the upstream; not mirrored any more", dc.name)

    async def _discover(self) -> None:
        """``datacenters: ["*"]``: mirror every datacenter the upstream lists, re-read now and then."""
        backoff = self.new_backoff()
        while True:
            try:
                resp = await self.client.get("/v1/catalog/datacenters")
                names = parse_datacenters(resp.data)
            except DnsdiscoError as e:
                log.warning("listing datacenters failed: %s (retrying)", e)
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            local = self.local_datacenter.lower()
            wanted = {n.lower(): n for n in names if n.lower() != local}
            for key, name in wanted.items():
                if key not in self._dcs:
                    log.info("%s: found in the upstream's datacenter list; mirroring it", name)
                    self._add(name, name)
            for key in [k for k in self._dcs if k != local and k not in wanted]:
                await self._remove(key)
            await asyncio.sleep(DATACENTER_REFRESH)

    async def _watch_staleness(self) -> None:
        """Report each loaded datacenter stale once its copy is older than max_stale, and fresh
        again once it is not."""
        period = min(1.0, max(self.max_stale / 10, 0.05))
        while True:
            await asyncio.sleep(period)
            now = self.clock()
            for dc in list(self._dcs.values()):
                if not dc.synced:
                    continue
                age = dc.age(now)
                stale = age is None or age > self.max_stale
                if stale and dc.name.lower() not in self.stale_datacenters:
                    log.warning("%s: no fresh data from the upstream for %.1fs (max_stale %.1fs): "
                                "answering SERVFAIL for it", dc.name, age or 0.0, self.max_stale)
                elif not stale and dc.name.lower() in self.stale_datacenters:
                    log.info("%s: the upstream is answering again; serving the mirror", dc.name)
                self._set_stale(dc.name, stale)
