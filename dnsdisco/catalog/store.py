"""The embedded catalog of one datacenter: state, index, durability, blocking waits, listeners.

:class:`Store` owns the nodes, services, checks and KV pairs, the single catalog index (Consul's
Raft index: monotonic, never 0), and the rules for changing them that the Consul agent and its
state store apply (default check state, status kept across re-registration, agent vs catalog
ownership, config-file layer). It does not parse requests (``catalog.definition`` does), run
checks (``catalog.health``) or speak HTTP (``dnsdisco.http``).

How a write flows. Writes are computed on the event loop against a *working* copy of the tables,
which already holds every write still on its way to disk, so back-to-back writes see each other.
The row changes then go to the :class:`~dnsdisco.catalog.persist.Journal` writer thread; once
SQLite has fsynced them, the same changes are applied to the *committed* tables, the index moves,
listeners run and blocked readers wake, all in that one event-loop step. Reads (and therefore
HTTP answers, DNS and blocking queries) only ever see committed state. If the disk refuses a
write, the write and everything queued behind it fail with :class:`StorageError` and the working
copy is reset to the committed one: nothing that was not durable was ever visible. With no data
dir (``-dev``) both copies are one and a write commits at once.

Blocking queries wait on *topics* (``svc:<name>``, ``health:<name>``, ``node:<node>``,
``services``, ``nodes``, ``checks``, KV keys and prefixes); a commit wakes only the waiters of the
topics it touched, and a topic's index is the index of its last change, so an unrelated write
neither wakes a watcher nor looks like a change to it.
"""

from __future__ import annotations

import asyncio
import bisect
import ipaddress
import itertools
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from dnsdisco.catalog.definition import RegisterRequest
from dnsdisco.catalog.model import (
    CRITICAL,
    PASSING,
    STATUSES,
    CatalogDelta,
    Check,
    KVEntry,
    Node,
    Service,
    ServiceEntry,
)
from dnsdisco.catalog.persist import Journal
from dnsdisco.errors import CatalogError, StorageError

log = logging.getLogger("dnsdisco.catalog.store")

# Where a service or check came from. Consul keeps API registrations (persisted in its data
# dir) apart from config-file ones (re-read on reload); catalog-API registrations belong to the
# catalog, not to this agent. "agent" marks what the agent registers about itself.
SOURCE_API = "api"
SOURCE_CONFIG = "config"
SOURCE_CATALOG = "catalog"
SOURCE_AGENT = "agent"
PERSISTENT_SOURCES = frozenset({SOURCE_API, SOURCE_CATALOG, SOURCE_AGENT})
# What /v1/agent/* lists and may change: the agent's local services and checks.
AGENT_SOURCES = frozenset({SOURCE_API, SOURCE_CONFIG})

SERF_CHECK_ID = "serfHealth"
SERVICE_MAINTENANCE_PREFIX = "_service_maintenance:"
NODE_MAINTENANCE_ID = "_node_maintenance"
_DEFAULT_SERVICE_REASON = (
    "Maintenance mode is enabled for this service, but no reason was provided. This is a default message."
)
_DEFAULT_NODE_REASON = (
    "Maintenance mode is enabled for this node, but no reason was provided. This is a default message."
)

# KV tombstones (the index of a key's deletion, so that a prefix's index never goes back) kept
# in memory, at most this many; older ones fold into a floor, as Consul's tombstone GC does.
MAX_TOMBSTONES = 10_000
# Service names kept for the mirrors' change hints (each of services_changed_since and
# checks_changed_since); a catalog churning through more distinct names loses the oldest half.
HINT_NAMES_MAX = 100_000

CheckListener = Callable[[Check | None, Check | None], None]
DeltaListener = Callable[[CatalogDelta], None]
SKey = tuple[str, str]  # (lower-cased node name, service or check ID)


def _same(a: Any, b: Any) -> bool:
    """Equal apart from the Raft indexes: a write that changes nothing else is no write."""
    return replace(b, create_index=a.create_index, modify_index=a.modify_index) == a


class _Tables:
    """The catalog's rows and their secondary indexes. Two of these exist when there is a data
    dir (working and committed); values are frozen and shared between them."""

    __slots__ = ("nodes", "services", "checks", "kv", "kv_keys", "by_name", "node_services",
                 "node_checks", "service_checks", "by_status")

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.services: dict[SKey, tuple[Service, str]] = {}
        self.checks: dict[SKey, tuple[Check, str]] = {}
        self.kv: dict[str, KVEntry] = {}
        self.kv_keys: list[str] = []  # sorted, for prefix scans
        self.by_name: dict[str, set[SKey]] = {}  # lower-cased service name -> instances
        self.node_services: dict[str, set[str]] = {}  # node -> service IDs
        self.node_checks: dict[str, set[str]] = {}  # node -> IDs of node-level checks only
        self.service_checks: dict[SKey, set[str]] = {}  # instance -> its check IDs
        # status -> check keys: /v1/health/state/critical costs the critical checks, not all
        # of them (every DNS worker re-reads it on every check write, as a Consul mirror does).
        self.by_status: dict[str, set[SKey]] = {}

    def copy(self) -> _Tables:
        t = _Tables()
        t.nodes = dict(self.nodes)
        t.services = dict(self.services)
        t.checks = dict(self.checks)
        t.kv = dict(self.kv)
        t.kv_keys = list(self.kv_keys)
        t.by_name = {k: set(v) for k, v in self.by_name.items()}
        t.node_services = {k: set(v) for k, v in self.node_services.items()}
        t.node_checks = {k: set(v) for k, v in self.node_checks.items()}
        t.service_checks = {k: set(v) for k, v in self.service_checks.items()}
        t.by_status = {k: set(v) for k, v in self.by_status.items()}
        return t

    def get(self, table: str, key: Any) -> Any:
        if table == "node":
            return self.nodes.get(key)
        if table == "service":
            return self.services.get(key)
        if table == "check":
            return self.checks.get(key)
        return self.kv.get(key)

    def apply(self, table: str, key: Any, value: Any) -> None:
        if table == "node":
            if value is None:
                self.nodes.pop(key, None)
            else:
                self.nodes[key] = value
        elif table == "service":
            old = self.services.get(key)
            if old is not None:
                _discard(self.by_name, old[0].name.lower(), key)
                _discard(self.node_services, key[0], key[1])
            if value is None:
                self.services.pop(key, None)
            else:
                self.services[key] = value
                self.by_name.setdefault(value[0].name.lower(), set()).add(key)
                self.node_services.setdefault(key[0], set()).add(key[1])
        elif table == "check":
            old = self.checks.get(key)
            if old is not None:
                _discard(self.by_status, old[0].status, key)
                if old[0].service_id:
                    _discard(self.service_checks, (key[0], old[0].service_id), key[1])
                else:
                    _discard(self.node_checks, key[0], key[1])
            if value is None:
                self.checks.pop(key, None)
            else:
                self.checks[key] = value
                self.by_status.setdefault(value[0].status, set()).add(key)
                if value[0].service_id:
                    self.service_checks.setdefault((key[0], value[0].service_id), set()).add(key[1])
                else:
                    self.node_checks.setdefault(key[0], set()).add(key[1])
        else:
            had = key in self.kv
            if value is None:
                if had:
                    del self.kv[key]
                    i = bisect.bisect_left(self.kv_keys, key)
                    del self.kv_keys[i]
            else:
                self.kv[key] = value
                if not had:
                    bisect.insort(self.kv_keys, key)

    def kv_prefix(self, prefix: str) -> Iterator[str]:
        i = bisect.bisect_left(self.kv_keys, prefix)
        keys = self.kv_keys
        while i < len(keys) and keys[i].startswith(prefix):
            yield keys[i]
            i += 1

    def all_checks_on(self, nl: str) -> list[str]:
        ids = list(self.node_checks.get(nl, ()))
        for sid in self.node_services.get(nl, ()):
            ids.extend(self.service_checks.get((nl, sid), ()))
        return ids


def _discard(index: dict[Any, set[Any]], key: Any, member: Any) -> None:
    s = index.get(key)
    if s is not None:
        s.discard(member)
        if not s:
            del index[key]


class _Change:
    __slots__ = ("table", "key", "before", "after")

    def __init__(self, table: str, key: Any, before: Any, after: Any) -> None:
        self.table = table
        self.key = key
        self.before = before
        self.after = after


class _Tx:
    """One catalog write being computed: every put is applied to the working tables at once (so
    later steps of the same write see it) and recorded, coalesced per row, for the commit."""

    def __init__(self, tables: _Tables, index: int) -> None:
        self.tables = tables
        self.index = index
        self._changes: dict[tuple[str, Any], _Change] = {}

    def get(self, table: str, key: Any) -> Any:
        return self.tables.get(table, key)

    def put(self, table: str, key: Any, value: Any) -> None:
        before = self.tables.get(table, key)
        if before == value:
            return
        ck = (table, key)
        change = self._changes.get(ck)
        if change is None:
            self._changes[ck] = _Change(table, key, before, value)
        else:
            change.after = value
        self.tables.apply(table, key, value)

    def rollback(self) -> None:
        for change in reversed(list(self._changes.values())):
            self.tables.apply(change.table, change.key, change.before)
        self._changes.clear()

    def changes(self) -> list[_Change]:
        return [c for c in self._changes.values() if c.before != c.after]


class Store:
    """The catalog of one datacenter, with the agent's own node registered in it.

    Reads are synchronous and see committed state only. Writes are coroutines that return once
    the change is durable (fsynced) - or at once without a data dir - and raise
    :class:`CatalogError` with Consul's status and text when refused, :class:`StorageError` when
    the disk refused. Listeners run synchronously, right after each commit, in the event-loop
    step that makes it visible.
    """

    def __init__(
        self,
        *,
        datacenter: str,
        node_name: str,
        node_address: str,
        data_dir: str | None,
        server_port: int = 8300,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.datacenter = datacenter
        self._node_name = node_name
        self._agent_key = node_name.lower()
        self.node_address = node_address
        self.data_dir = data_dir
        self.server_port = server_port
        # The store keeps no timers today; the clock is here for time-based state (KV sessions)
        # so that callers construct it one way.
        self.clock = clock
        self.node_id = ""
        self._journal: Journal | None = None
        self._state = _Tables()
        self._work = self._state
        # The first Raft entry is internal, so Consul's index is never 0; neither is ours.
        self._index = 1
        self._work_index = 1
        self._epoch = 0
        self._floor = 1  # the index of every topic that has not changed since open
        self._topic_index: dict[str, int] = {}
        # lower service name -> index of the last write to one of its service rows, oldest
        # first (a name is moved to the end when written): what services_changed_since reads.
        self._service_writes: dict[str, int] = {}
        # The same for check rows: lower service name -> index of the last write to a check that
        # bears on it (its own, or its node's), for the hint on /v1/health/state/<status>.
        self._check_writes: dict[str, int] = {}
        # Both keep a name per service ever written; past HINT_NAMES_MAX the oldest half goes and
        # this floor rises: a hint asked for since an index below it is "not known" (*).
        self._hint_floor = 0
        self._waiters: dict[str, set[asyncio.Future[bool]]] = {}
        self._tombstones: dict[str, int] = {}
        self._kv_floor = 1
        self._entries: dict[SKey, ServiceEntry] = {}
        # Per lower-cased service name, its instance keys (sorted) and their entries, built on
        # first read and then patched per changed key at each commit (bisect): a write into a
        # service of n instances costs O(log n) plus a memmove, not a sort of all n.
        self._lists: dict[str, tuple[list[SKey], list[ServiceEntry]]] = {}
        self._list_of: dict[SKey, str] = {}  # instance key -> the name whose list holds it
        # (services index, service_names()' answer, lower name -> its spellings in it)
        self._services_cache: tuple[int, dict[str, list[str]], dict[str, list[str]]] | None = None
        self._check_listeners: list[CheckListener] = []
        self._delta_listeners: list[DeltaListener] = []
        self._pending: set[asyncio.Future[BaseException | None]] = set()
        self._open = False

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def node_name(self) -> str:
        """The agent's node name, as registered."""
        return self._node_name

    @property
    def index(self) -> int:
        """The committed catalog index: >= 1, never goes back."""
        return self._index

    @property
    def is_open(self) -> bool:
        return self._open

    @property
    def storage_error(self) -> str | None:
        """Why the data dir refuses writes right now (full, read-only ...), or None. Reads and
        DNS go on from the committed state meanwhile; it clears at the next write that commits."""
        journal = self._journal
        return journal.failing if journal is not None else None

    async def open(self) -> None:
        """Load what the data dir holds (if any), then register the agent's node, its
        ``consul`` service and its ``serfHealth`` check, as a Consul server does."""
        if self._open:
            return
        if self.data_dir:
            journal = Journal(self.data_dir, persistent_sources=PERSISTENT_SOURCES)
            loaded = await asyncio.to_thread(journal.open)
            self.node_id = loaded.node_id
            if not self.node_id:
                self.node_id = str(uuid.uuid4())
                await asyncio.to_thread(journal.set_meta, "node_id", self.node_id)
            top = loaded.index
            for node in loaded.nodes:
                self._state.apply("node", node.name.lower(), node)
                top = max(top, node.modify_index)
            for svc, source in loaded.services:
                self._state.apply("service", (svc.node.lower(), svc.id), (svc, source))
                top = max(top, svc.modify_index)
            for check, source in loaded.checks:
                self._state.apply("check", (check.node.lower(), check.check_id), (check, source))
                top = max(top, check.modify_index)
            for entry in loaded.kv:
                self._state.apply("kv", entry.key, entry)
                top = max(top, entry.modify_index)
            self._index = self._work_index = max(top, 1)
            self._work = self._state.copy()
            journal.start(asyncio.get_running_loop())
            self._journal = journal
        else:
            self.node_id = str(uuid.uuid4())
        # Topics untouched since open answer with the index we came up with: never lower than
        # anything a client saw before a restart, so a watcher cannot miss a change.
        self._floor = self._kv_floor = self._index
        await self._register_agent()
        self._open = True

    async def close(self) -> None:
        """Wait for queued writes, then close the data dir."""
        await self.flush()
        self._open = False
        if self._journal is not None:
            journal, self._journal = self._journal, None
            await asyncio.to_thread(journal.close)
        for futures in self._waiters.values():
            for fut in futures:
                if not fut.done():
                    fut.set_result(False)

    async def flush(self) -> None:
        """Return once every write started before this call is committed (or failed)."""
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    def _agent_node(self, existing: Node | None) -> Node:
        addr = self.node_address
        try:
            family = "ipv6" if ipaddress.ip_address(addr).version == 6 else "ipv4"
        except ValueError:
            family = "ipv4"
        return Node(
            name=self._node_name,
            address=addr,
            datacenter=self.datacenter,
            id=self.node_id,
            tagged_addresses={"lan": addr, f"lan_{family}": addr, "wan": addr, f"wan_{family}": addr},
            meta={"consul-network-segment": ""},
            create_index=existing.create_index if existing else 0,
            modify_index=existing.modify_index if existing else 0,
        )

    async def _register_agent(self) -> None:
        with self._transaction() as tx:
            # A previous identity of this agent (another node name, same data dir) is gone.
            for (nl, sid), (svc, source) in list(tx.tables.services.items()):
                if source == SOURCE_AGENT and nl != self._agent_key:
                    self._remove_service(tx, (nl, sid))
            for (nl, cid), (_chk, source) in list(tx.tables.checks.items()):
                if source == SOURCE_AGENT and nl != self._agent_key:
                    tx.put("check", (nl, cid), None)
                    if not tx.tables.node_services.get(nl) and not tx.tables.node_checks.get(nl):
                        tx.put("node", nl, None)
            self._ensure_agent_node(tx)
            consul = Service(node=self._node_name, id="consul", name="consul", port=self.server_port)
            self._put_service(tx, consul, [], replace_checks=False, source=SOURCE_AGENT)
            serf = Check(node=self._node_name, check_id=SERF_CHECK_ID, name="Serf Health Status",
                         status=PASSING, output="Agent alive and reachable")
            self._put_check(tx, serf, SOURCE_AGENT, keep_status=False)
        await self._submit(tx)

    def _ensure_agent_node(self, tx: _Tx) -> Node:
        existing = tx.get("node", self._agent_key)
        node = self._agent_node(existing)
        if existing is None or not _same(existing, node):
            node = replace(node, create_index=existing.create_index if existing else tx.index,
                           modify_index=tx.index)
            tx.put("node", self._agent_key, node)
            return node
        return existing

    # -- listeners ----------------------------------------------------------------------------

    def add_check_listener(self, fn: CheckListener) -> None:
        """Call ``fn(before, after)`` for each check added (before None), changed, or removed
        (after None), synchronously right after the commit that made it visible."""
        self._check_listeners.append(fn)

    def add_delta_listener(self, fn: DeltaListener) -> None:
        """Call ``fn(delta)`` after each commit that touches services or nodes; the delta names
        every lower-cased service name whose entries may have changed (a node or node-check
        change touches every service on that node) and every node that changed."""
        self._delta_listeners.append(fn)

    def full_delta(self) -> CatalogDelta:
        """The whole committed catalog as one ``full=True`` delta."""
        st = self._state
        services = {ln: tuple(self._entries_for(ln)) for ln in st.by_name}
        nodes: dict[str, Node | None] = {n.name: n for n in st.nodes.values()}
        return CatalogDelta(datacenter=self.datacenter, index=self._index, services=services, nodes=nodes,
                            full=True)

    # -- reads (committed state) ----------------------------------------------------------------

    def nodes(self) -> list[Node]:
        """Every node, sorted by name (Consul's order)."""
        return sorted(self._state.nodes.values(), key=lambda n: n.name.lower())

    def node(self, name: str) -> Node | None:
        """The node called *name* (case-insensitive, as Consul's node index), or None."""
        return self._state.nodes.get(name.lower())

    def services(self) -> list[Service]:
        """Every service instance, in node then ID order."""
        st = self._state
        return [st.services[k][0] for k in sorted(st.services)]

    def service(self, node: str, service_id: str) -> Service | None:
        v = self._state.services.get((node.lower(), service_id))
        return v[0] if v else None

    def service_source(self, node: str, service_id: str) -> str | None:
        """Where a service came from: ``api``, ``config``, ``catalog`` or ``agent``."""
        v = self._state.services.get((node.lower(), service_id))
        return v[1] if v else None

    def node_services(self, node: str) -> list[Service]:
        """The services on *node*, by ID."""
        st = self._state
        nl = node.lower()
        return [st.services[(nl, sid)][0] for sid in sorted(st.node_services.get(nl, ()))]

    def service_instances(self, name: str) -> list[tuple[Node, Service]]:
        """The instances of service *name* (case-insensitive) with their nodes, node then ID order."""
        st = self._state
        return [(st.nodes[k[0]], st.services[k][0]) for k in sorted(st.by_name.get(name.lower(), ()))]

    def service_names(self) -> dict[str, list[str]]:
        """``/v1/catalog/services`` without filters: name -> deduplicated tags (sorted). The
        result is cached until the service list changes, then brought up to date from the
        names written since (O(names + their instances), not O(instances)); callers must not
        mutate it."""
        idx = self.topic_index("services")
        cache = self._services_cache
        if cache is not None and cache[0] == idx:
            return cache[1]
        changed = None if cache is None else self.services_changed_since(cache[0], HINT_NAMES_MAX)
        if cache is None or changed is None:
            out = summarise_services(svc for svc, _ in self._state.services.values())
            spellings: dict[str, list[str]] = {}
            for name in out:
                spellings.setdefault(name.lower(), []).append(name)
        else:
            # Copies: an older answer may still be on its way out.
            out, spellings = dict(cache[1]), dict(cache[2])
            for lname in changed:
                for name in spellings.pop(lname, ()):
                    del out[name]
                now = self.service_tags(lname)
                if now:
                    spellings[lname] = list(now)
                    out.update(now)
            out = dict(sorted(out.items()))
        self._services_cache = (idx, out, spellings)
        return out

    def service_tags(self, lname: str) -> dict[str, list[str]]:
        """``/v1/catalog/services``' entries for the lower-cased name *lname*: each spelling in
        use -> its deduplicated, sorted tags; empty when no instance has the name. Costs
        O(instances of the name), for the services delta (``http/catalog.py``)."""
        st = self._state
        return summarise_services(st.services[key][0] for key in st.by_name.get(lname, ()))

    def agent_services(self) -> list[Service]:
        """The agent's local services (API and config registrations), by ID."""
        st = self._state
        nl = self._agent_key
        out = []
        for sid in sorted(st.node_services.get(nl, ())):
            svc, source = st.services[(nl, sid)]
            if source in AGENT_SOURCES:
                out.append(svc)
        return out

    def checks(self) -> list[Check]:
        """Every check, in node then check ID order."""
        st = self._state
        return [st.checks[k][0] for k in sorted(st.checks)]

    def check_count(self) -> int:
        return len(self._state.checks)

    def checks_in_state(self, status: str) -> list[Check]:
        """The checks whose status is *status*, in :meth:`checks`' order; costs those checks."""
        st = self._state
        return [st.checks[k][0] for k in sorted(st.by_status.get(status, ()))]

    def check(self, node: str, check_id: str) -> Check | None:
        v = self._state.checks.get((node.lower(), check_id))
        return v[0] if v else None

    def check_source(self, node: str, check_id: str) -> str | None:
        """Where a check came from; only ``api``/``config`` checks are the agent's to run."""
        v = self._state.checks.get((node.lower(), check_id))
        return v[1] if v else None

    def agent_checks(self) -> list[Check]:
        """The agent's local checks (API and config registrations, maintenance), by ID."""
        st = self._state
        nl = self._agent_key
        out = []
        for cid in sorted(st.all_checks_on(nl)):
            chk, source = st.checks[(nl, cid)]
            if source in AGENT_SOURCES:
                out.append(chk)
        return out

    def node_checks(self, node: str) -> list[Check]:
        """Every check on *node*, node-level and service-level, by check ID."""
        st = self._state
        nl = node.lower()
        return [st.checks[(nl, cid)][0] for cid in sorted(st.all_checks_on(nl))]

    def service_checks(self, name: str) -> list[Check]:
        """The service-level checks of every instance of *name* (``/v1/health/checks``)."""
        st = self._state
        out = []
        for key in sorted(st.by_name.get(name.lower(), ())):
            out.extend(st.checks[(key[0], cid)][0] for cid in sorted(st.service_checks.get(key, ())))
        return out

    def health_service(self, name: str) -> list[ServiceEntry]:
        """``/v1/health/service/<name>``: every instance (case-insensitive name) with its node
        and the checks that bear on it - its node's checks plus its own - in Consul's order
        (node, then service ID; checks by ID). Entries are shared: do not mutate."""
        return list(self._entries_for(name.lower()))

    def _entries_for(self, lname: str) -> list[ServiceEntry]:
        """The entries of *lname* in Consul's order. The list is the store's own (patched by
        later commits): callers copy it (``tuple(...)``) and never mutate it."""
        cached = self._lists.get(lname)
        if cached is not None:
            return cached[1]
        keys = self._state.by_name.get(lname)
        if not keys:
            return []
        ordered = sorted(keys)
        entries = [self._entry(key) for key in ordered]
        self._lists[lname] = (ordered, entries)
        for key in ordered:
            self._list_of[key] = lname
        return entries

    def _entry(self, key: SKey) -> ServiceEntry:
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = self._build_entry(key)
        return entry

    def _relist(self, key: SKey) -> None:
        """After a commit that touched instance *key*: move or patch it in the cached entry
        lists (its entry was dropped from ``_entries``, so it is rebuilt here)."""
        was = self._list_of.pop(key, None)
        row = self._state.services.get(key)
        now = row[0].name.lower() if row is not None else None
        if was is not None and was != now:
            cached = self._lists.get(was)
            if cached is not None:
                keys, entries = cached
                i = bisect.bisect_left(keys, key)
                if i < len(keys) and keys[i] == key:
                    del keys[i]
                    del entries[i]
                if not keys:
                    del self._lists[was]
        if now is None:
            return
        cached = self._lists.get(now)
        if cached is None:
            return  # built in full on its first read
        keys, entries = cached
        i = bisect.bisect_left(keys, key)
        entry = self._entry(key)
        if i < len(keys) and keys[i] == key:
            entries[i] = entry
        else:
            keys.insert(i, key)
            entries.insert(i, entry)
        self._list_of[key] = now

    def _build_entry(self, key: SKey) -> ServiceEntry:
        st = self._state
        nl = key[0]
        ids = list(st.node_checks.get(nl, ()))
        ids.extend(st.service_checks.get(key, ()))
        ids.sort()
        return ServiceEntry(node=st.nodes[nl], service=st.services[key][0],
                            checks=tuple(st.checks[(nl, cid)][0] for cid in ids))

    def kv_get(self, key: str) -> KVEntry | None:
        return self._state.kv.get(key)

    def kv_list(self, prefix: str) -> list[KVEntry]:
        """The entries whose key starts with *prefix*, in key order."""
        st = self._state
        return [st.kv[k] for k in st.kv_prefix(prefix)]

    def kv_keys(self, prefix: str) -> list[str]:
        return list(self._state.kv_prefix(prefix))

    # -- blocking queries -----------------------------------------------------------------------

    def topic_index(self, *topics: str) -> int:
        """The index of the latest change to any of *topics* (>= 1). Topics: ``services``,
        ``nodes``, ``checks``, ``svc:<lower name>``, ``health:<lower name>``,
        ``node:<lower node>``, ``nodechecks:<lower node>``."""
        floor = self._floor
        get = self._topic_index.get
        return max((get(t, floor) for t in topics), default=floor)

    def services_changed_since(self, since: int, limit: int) -> list[str] | None:
        """Lower-cased names of the services with a service row written after index *since*
        (newest first), for the mirror's change hint (``X-Dnsdisco-Changed-Services``); None
        when that cannot be told (*since* predates this process's history) or more than
        *limit* changed. Costs O(names returned)."""
        return self._written_since(self._service_writes, since, limit)

    def checks_changed_since(self, since: int, limit: int) -> list[str] | None:
        """As :meth:`services_changed_since`, for the services with a check written after
        *since* that bears on them (their own checks, or their node's)."""
        return self._written_since(self._check_writes, since, limit)

    def _written_since(self, writes: dict[str, int], since: int, limit: int) -> list[str] | None:
        if since < self._floor or since < self._hint_floor:
            return None
        out: list[str] = []
        for name in reversed(writes):
            if writes[name] <= since:
                break
            if len(out) >= limit:
                return None
            out.append(name)
        return out

    def kv_index(self, key: str, *, prefix: bool) -> int:
        """The index a KV read of *key* (a prefix if *prefix*) answers with: the highest
        ModifyIndex or deletion under it, never below what a client could have seen."""
        st = self._state
        best = self._kv_floor
        if prefix:
            for k in st.kv_prefix(key):
                best = max(best, st.kv[k].modify_index)
            if self._tombstones:
                best = max([best, *(i for k, i in self._tombstones.items() if k.startswith(key))])
        else:
            entry = st.kv.get(key)
            if entry is not None:
                best = max(best, entry.modify_index)
            best = max(best, self._tombstones.get(key, 0))
        return best

    @staticmethod
    def kv_topics(key: str, *, prefix: bool) -> list[str]:
        """The topic a KV read waits on."""
        return [f"kvp:{key}" if prefix else f"kv:{key}"]

    async def wait(self, topics: Sequence[str], timeout: float) -> bool:
        """Wait until a commit touches one of *topics* (True) or *timeout* seconds pass (False)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        handle = loop.call_later(max(timeout, 0.0), _resolve, fut, False)
        for t in topics:
            self._waiters.setdefault(t, set()).add(fut)
        try:
            return await fut
        finally:
            handle.cancel()
            for t in topics:
                waiting = self._waiters.get(t)
                if waiting is not None:
                    waiting.discard(fut)
                    if not waiting:
                        del self._waiters[t]

    # -- writes -------------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[_Tx]:
        tx = _Tx(self._work, self._work_index + 1)
        try:
            yield tx
        except BaseException:
            tx.rollback()
            raise

    async def _submit(self, tx: _Tx) -> None:
        changes = tx.changes()
        if not changes:
            return
        index = tx.index
        self._work_index = index
        journal = self._journal
        if journal is None:
            self._commit(changes, index)
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[BaseException | None] = loop.create_future()
        epoch = self._epoch

        def done(exc: BaseException | None) -> None:
            try:
                if exc is None:
                    self._commit(changes, index)
                elif epoch == self._epoch:
                    # First news of this failure: everything computed on top of it is void (the
                    # journal refuses it too), so start again from what is on disk.
                    self._epoch += 1
                    self._work = self._state.copy()
                    self._work_index = self._index
            finally:
                # Whatever happened, the writer must not wait forever.
                if not fut.done():
                    fut.set_result(exc)

        self._pending.add(fut)
        fut.add_done_callback(self._pending.discard)
        journal.submit([(c.table, c.key, c.after) for c in changes], index, epoch, done)
        exc = await fut
        if exc is not None:
            raise exc

    def _commit(self, changes: list[_Change], index: int) -> None:
        """Make *changes* visible: apply, move the index, wake readers, tell listeners."""
        st = self._state
        if st is not self._work:
            for c in changes:
                st.apply(c.table, c.key, c.after)
        self._index = index
        topics: set[str] = set()
        names: set[str] = set()  # lower-cased service names whose health entries changed
        nodes: dict[str, Node | None] = {}
        stale: set[SKey] = set()
        check_changes: list[_Change] = []
        kv_keys: list[str] = []

        nodes_done: set[str] = set()
        checked: set[str] = set()  # lower-cased service names a check write bears on

        def on_node(nl: str) -> None:
            # A node (or node-check) change bears on every instance on the node: Consul's
            # health entries carry the node's checks. Costs O(instances on the node), once.
            if nl in nodes_done:
                return
            nodes_done.add(nl)
            for sid in st.node_services.get(nl, ()):
                key = (nl, sid)
                stale.add(key)
                ln = st.services[key][0].name.lower()
                names.add(ln)
                topics.add(f"health:{ln}")

        for c in changes:
            if c.table == "node":
                nl = c.key
                # Not "services": Consul's catalog/services index is its services table's, which
                # a node write leaves alone (it bumps the per-service indexes, svc:<name>).
                topics.update(("nodes", f"node:{nl}"))
                node = c.after if c.after is not None else c.before
                nodes[node.name] = c.after
                on_node(nl)
                for sid in st.node_services.get(nl, ()):
                    topics.add(f"svc:{st.services[(nl, sid)][0].name.lower()}")
            elif c.table == "service":
                nl = c.key[0]
                topics.update(("services", f"node:{nl}"))
                stale.add(c.key)
                for v in (c.before, c.after):
                    if v is not None:
                        ln = v[0].name.lower()
                        names.add(ln)
                        topics.update((f"svc:{ln}", f"health:{ln}"))
                        self._service_writes.pop(ln, None)
                        self._service_writes[ln] = index
            elif c.table == "check":
                nl = c.key[0]
                topics.update(("checks", f"nodechecks:{nl}"))
                check_changes.append(c)
                for v in (c.before, c.after):
                    if v is None:
                        continue
                    chk = v[0]
                    if chk.service_id:
                        key = (nl, chk.service_id)
                        stale.add(key)
                        owner = st.services.get(key)
                        ln = (owner[0].name if owner else chk.service_name).lower()
                        names.add(ln)
                        checked.add(ln)
                        topics.add(f"health:{ln}")
                    else:
                        on_node(nl)
                        checked.update(st.services[(nl, sid)][0].name.lower()
                                       for sid in st.node_services.get(nl, ()))
            else:
                kv_keys.append(c.key)
                if c.after is None:
                    self._tombstone(c.key, index)

        for ln in checked:
            self._check_writes.pop(ln, None)
            self._check_writes[ln] = index
        for writes in (self._service_writes, self._check_writes):
            if len(writes) > HINT_NAMES_MAX:
                for name in list(itertools.islice(writes, len(writes) // 2)):
                    self._hint_floor = max(self._hint_floor, writes.pop(name))
        for key in stale:
            self._entries.pop(key, None)
        for key in stale:
            self._relist(key)
        for t in topics:
            self._topic_index[t] = index
        for t in topics:
            self._wake(t)
        for key in kv_keys:
            self._wake(f"kv:{key}")
            for i in range(len(key) + 1):
                self._wake(f"kvp:{key[:i]}")

        for c in check_changes:
            before = c.before[0] if c.before is not None else None
            after = c.after[0] if c.after is not None else None
            for fn in self._check_listeners:
                try:
                    fn(before, after)
                except Exception:
                    log.exception("check listener %r failed", fn)
        if (names or nodes) and self._delta_listeners:
            delta = CatalogDelta(datacenter=self.datacenter, index=index,
                                 services={ln: tuple(self._entries_for(ln)) for ln in names}, nodes=nodes)
            for fn in self._delta_listeners:
                try:
                    fn(delta)
                except Exception:
                    log.exception("delta listener %r failed", fn)

    def _wake(self, topic: str) -> None:
        waiting = self._waiters.pop(topic, None)
        if waiting:
            for fut in waiting:
                if not fut.done():
                    fut.set_result(True)

    def _tombstone(self, key: str, index: int) -> None:
        self._tombstones[key] = index
        if len(self._tombstones) > MAX_TOMBSTONES:
            # Fold the oldest half into the floor: reads may then answer a higher index than
            # strictly needed (a spurious wake-up), never a lower one.
            ordered = sorted(self._tombstones.items(), key=lambda kv: kv[1])
            cut = ordered[: len(ordered) // 2]
            self._kv_floor = max(self._kv_floor, cut[-1][1])
            for k, _ in cut:
                del self._tombstones[k]

    # row helpers (all run inside a transaction on the working tables)

    def _put_service(self, tx: _Tx, service: Service, checks: Sequence[Check], *, replace_checks: bool,
                     source: str) -> Service:
        nl = service.node.lower()
        node = tx.get("node", nl)
        if node is None:
            if nl != self._agent_key:
                raise CatalogError("Missing node registration", 500)
            node = self._ensure_agent_node(tx)
        key = (nl, service.id)
        old = tx.get("service", key)
        svc = replace(service, node=node.name, create_index=old[0].create_index if old else tx.index,
                      modify_index=tx.index)
        if old is not None and old[1] == source and _same(old[0], svc):
            svc = old[0]
        else:
            tx.put("service", key, (svc, source))
        wanted = set()
        for chk in checks:
            wanted.add(chk.check_id)
            self._put_check(tx, replace(chk, node=node.name, service_id=svc.id), source, keep_status=True)
        for cid in list(tx.tables.service_checks.get(key, ())):
            if cid in wanted:
                continue
            if replace_checks:
                tx.put("check", (nl, cid), None)
            else:
                # A check the request did not mention stays, but follows the service's name/tags.
                chk, csource = tx.get("check", (nl, cid))
                self._put_check(tx, chk, csource, keep_status=True)
        return svc

    def _put_check(self, tx: _Tx, check: Check, source: str, *, keep_status: bool) -> None:
        nl = check.node.lower()
        key = (nl, check.check_id)
        prev = tx.get("check", key)
        status, output = check.status, check.output
        if keep_status and prev is not None:
            # Consul snapshots check state across re-registration and reload, so that a
            # re-register does not flap a passing check back to critical.
            status, output = prev[0].status, prev[0].output
        name, tags = "", ()
        if check.service_id:
            owner = tx.get("service", (nl, check.service_id))
            if owner is not None:
                name, tags = owner[0].name, owner[0].tags
        new = replace(check, status=status, output=output, service_name=name, service_tags=tags,
                      create_index=prev[0].create_index if prev else tx.index, modify_index=tx.index)
        if prev is not None and prev[1] == source and _same(prev[0], new):
            return
        tx.put("check", key, (new, source))

    def _remove_service(self, tx: _Tx, key: SKey) -> None:
        for cid in list(tx.tables.service_checks.get(key, ())):
            tx.put("check", (key[0], cid), None)
        tx.put("service", key, None)

    def _agent_service(self, tx: _Tx, node: str, service_id: str) -> SKey | None:
        key = (node.lower(), service_id)
        v = tx.get("service", key)
        return key if v is not None and v[1] in AGENT_SOURCES else None

    # -- agent API writes ---------------------------------------------------------------------

    async def register_service(
        self,
        service: Service,
        checks: Sequence[Check],
        *,
        replace_existing_checks: bool = False,
        source: str = SOURCE_API,
    ) -> None:
        """Register (or replace) *service* on its node with *checks*. A check that already
        exists keeps its status and output; with *replace_existing_checks* the service's checks
        missing from *checks* are removed. A registration that changes nothing writes nothing."""
        with self._transaction() as tx:
            self._put_service(tx, service, checks, replace_checks=replace_existing_checks, source=source)
        await self._submit(tx)

    async def deregister_service(self, node: str, service_id: str) -> None:
        """Remove an agent service and its checks; 404 (Consul's text) if the agent has none."""
        with self._transaction() as tx:
            key = self._agent_service(tx, node, service_id)
            if key is None:
                raise CatalogError(
                    f'Unknown service ID "{service_id}". Ensure that the service ID is passed, not the service name.',
                    404)
            self._remove_service(tx, key)
        await self._submit(tx)

    async def register_check(self, check: Check, *, source: str = SOURCE_API) -> None:
        """Register an agent check (``/v1/agent/check/register``). A ``service_id`` must name an
        agent service on the node (404 ``ServiceID "<id>" does not exist``)."""
        with self._transaction() as tx:
            nl = check.node.lower()
            node = tx.get("node", nl)
            if node is None:
                if nl != self._agent_key:
                    raise CatalogError("Missing node registration", 500)
                node = self._ensure_agent_node(tx)
            if check.service_id and self._agent_service(tx, check.node, check.service_id) is None:
                raise CatalogError(f'ServiceID "{check.service_id}" does not exist', 404)
            self._put_check(tx, replace(check, node=node.name), source, keep_status=True)
        await self._submit(tx)

    async def deregister_check(self, node: str, check_id: str) -> None:
        """Remove an agent check; 404 (Consul's text) if the agent has none by that ID."""
        with self._transaction() as tx:
            key = (node.lower(), check_id)
            v = tx.get("check", key)
            if v is None or v[1] not in AGENT_SOURCES:
                raise CatalogError(
                    f'Unknown check ID "{check_id}". Ensure that the check ID is passed, not the check name.', 404)
            tx.put("check", key, None)
        await self._submit(tx)

    async def set_check_status(self, node: str, check_id: str, status: str, output: str) -> bool:
        """Set a check's status and output. Returns True if anything changed; an identical
        result (or a check that is gone) writes nothing."""
        if status not in STATUSES:
            raise CatalogError(f"Invalid check status: '{status}'", 400)
        with self._transaction() as tx:
            key = (node.lower(), check_id)
            v = tx.get("check", key)
            if v is None or (v[0].status == status and v[0].output == output):
                return False
            tx.put("check", key, (replace(v[0], status=status, output=output, modify_index=tx.index), v[1]))
        await self._submit(tx)
        return True

    async def set_service_maintenance(self, service_id: str, enable: bool, reason: str = "") -> None:
        """Add (or remove) the critical ``_service_maintenance:<id>`` check of an agent service."""
        with self._transaction() as tx:
            if self._agent_service(tx, self._node_name, service_id) is None:
                raise CatalogError(f'No service registered with ID "{service_id}"', 404)
            key = (self._agent_key, SERVICE_MAINTENANCE_PREFIX + service_id)
            if not enable:
                tx.put("check", key, None)
            elif tx.get("check", key) is None:  # already on: Consul keeps the first reason
                self._put_check(tx, Check(
                    node=self._node_name, check_id=key[1], name="Service Maintenance Mode", status=CRITICAL,
                    notes=reason or _DEFAULT_SERVICE_REASON, service_id=service_id), SOURCE_API, keep_status=False)
        await self._submit(tx)

    async def set_node_maintenance(self, enable: bool, reason: str = "") -> None:
        """Add (or remove) the agent node's critical ``_node_maintenance`` check."""
        with self._transaction() as tx:
            key = (self._agent_key, NODE_MAINTENANCE_ID)
            if not enable:
                tx.put("check", key, None)
            elif tx.get("check", key) is None:
                self._put_check(tx, Check(
                    node=self._node_name, check_id=NODE_MAINTENANCE_ID, name="Node Maintenance Mode",
                    status=CRITICAL, notes=reason or _DEFAULT_NODE_REASON), SOURCE_API, keep_status=False)
        await self._submit(tx)

    async def sync_config_services(self, definitions: Sequence[tuple[Service, Sequence[Check]]]) -> None:
        """Replace the config-file layer with *definitions*, atomically (one index).

        Config services missing from *definitions* go away with their checks; the rest are
        registered on the agent node with exactly their listed checks. A check that existed
        keeps its status and output (Consul snapshots them across a reload). An API service
        with the same ID is replaced by the config one, as Consul purges it on reload.
        """
        with self._transaction() as tx:
            nl = self._agent_key
            wanted = {svc.id for svc, _ in definitions}
            for sid in list(tx.tables.node_services.get(nl, ())):
                _, source = tx.get("service", (nl, sid))
                if source == SOURCE_CONFIG and sid not in wanted:
                    self._remove_service(tx, (nl, sid))
            for svc, checks in definitions:
                svc = replace(svc, node=self._node_name)
                self._put_service(tx, svc, [replace(c, node=self._node_name) for c in checks],
                                  replace_checks=True, source=SOURCE_CONFIG)
        await self._submit(tx)

    # -- catalog API writes -------------------------------------------------------------------

    async def catalog_register(self, req: RegisterRequest) -> None:
        """``/v1/catalog/register``: upsert the node (unless ``skip_node_update`` and it exists),
        the service and the checks, whose status the caller sets. Refusals are Consul's 500s."""
        if req.datacenter != self.datacenter:
            raise CatalogError("No path to datacenter", 500)
        with self._transaction() as tx:
            nl = req.node.name.lower()
            existing = tx.get("node", nl)
            if existing is not None and req.skip_node_update:
                node = existing
            elif req.skip_node_update and not req.node.address:
                raise CatalogError("Missing node registration", 500)
            else:
                node = replace(req.node, id=req.node.id or (existing.id if existing else ""),
                               create_index=existing.create_index if existing else tx.index,
                               modify_index=tx.index)
                if existing is not None and _same(existing, node):
                    node = existing
                else:
                    tx.put("node", nl, node)
            if req.service is not None:
                self._put_service(tx, replace(req.service, node=node.name), [], replace_checks=False,
                                  source=SOURCE_CATALOG)
            for chk in req.checks:
                if chk.service_id and tx.get("service", (nl, chk.service_id)) is None:
                    raise CatalogError(f"Unknown service ID '{chk.service_id}' for check ID '{chk.check_id}'", 500)
                self._put_check(tx, replace(chk, node=node.name), SOURCE_CATALOG, keep_status=False)
        await self._submit(tx)

    async def catalog_deregister(self, node: str, service_id: str = "", check_id: str = "") -> None:
        """``/v1/catalog/deregister``: remove a service (with its checks), a check, or the node
        and everything on it. Removing what does not exist is not an error (Consul)."""
        with self._transaction() as tx:
            nl = node.lower()
            if service_id:
                if tx.get("service", (nl, service_id)) is not None:
                    self._remove_service(tx, (nl, service_id))
            elif check_id:
                tx.put("check", (nl, check_id), None)
            elif tx.get("node", nl) is not None:
                for cid in list(tx.tables.node_checks.get(nl, ())):
                    tx.put("check", (nl, cid), None)
                for sid in list(tx.tables.node_services.get(nl, ())):
                    self._remove_service(tx, (nl, sid))
                tx.put("node", nl, None)
        await self._submit(tx)

    # -- KV -------------------------------------------------------------------------------------

    async def kv_put(self, key: str, value: bytes, *, flags: int = 0, cas: int | None = None) -> bool:
        """Set *key*. With *cas*, only if the key's ModifyIndex equals it (0: only if absent);
        returns False when the check fails, as Consul's ``?cas=`` does."""
        with self._transaction() as tx:
            old = tx.get("kv", key)
            if cas is not None:
                if (cas == 0 and old is not None) or (cas != 0 and (old is None or old.modify_index != cas)):
                    return False
            tx.put("kv", key, KVEntry(
                key=key, value=value, flags=flags,
                lock_index=old.lock_index if old else 0, session=old.session if old else "",
                create_index=old.create_index if old else tx.index, modify_index=tx.index))
        await self._submit(tx)
        return True

    async def kv_delete(self, key: str, *, recurse: bool = False, cas: int | None = None) -> bool:
        """Delete *key* (or every key under it with *recurse*). With *cas*, only if the key's
        ModifyIndex equals it, so 0 never deletes an existing key; as in Consul, a CAS delete of a
        missing key succeeds. Deleting nothing is success, and no write."""
        with self._transaction() as tx:
            if recurse:
                for k in list(tx.tables.kv_prefix(key)):
                    tx.put("kv", k, None)
            else:
                old = tx.get("kv", key)
                if cas is not None and old is not None and old.modify_index != cas:
                    # Consul: a CAS delete of a missing key succeeds (there is nothing to
                    # protect); cas=0 never matches an existing key.
                    return False
                tx.put("kv", key, None)
        await self._submit(tx)
        return True


def _resolve(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


def summarise_services(services: Iterable[Service]) -> dict[str, list[str]]:
    """``/v1/catalog/services`` shape: name -> deduplicated, sorted tags of its instances."""
    tags: dict[str, set[str]] = {}
    for svc in services:
        tags.setdefault(svc.name, set()).update(svc.tags)
    return {name: sorted(t) for name, t in sorted(tags.items())}


__all__ = [
    "AGENT_SOURCES",
    "PERSISTENT_SOURCES",
    "SOURCE_AGENT",
    "SOURCE_API",
    "SOURCE_CATALOG",
    "SOURCE_CONFIG",
    "StorageError",
    "Store",
    "summarise_services",
]
