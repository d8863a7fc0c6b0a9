"""The answer table: the catalog as the DNS interface sees it, and every in-zone reply.

:class:`AnswerTable` eats :class:`~dnsdisco.catalog.model.CatalogDelta` values (``apply``) and
answers parsed queries (``respond``) with complete reply messages. It owns what an answer *is*
- health filtering, address choice, SRV targets and glue, TTLs, rcodes (spec §1.3-§1.19 and
the Decisions table) - and leaves the wire layout and per-query fast path to
:mod:`dnsdisco.dns.render`. It is pure: no I/O, no event loop, one injectable clock and RNG.

Render once, serve many: ``apply`` only indexes the delta and marks stale the replies built
from what it touched (each reply holds a :class:`~dnsdisco.dns.render.Cell` of the data it
came from: a service, a node, a datacenter's set of names). ``respond`` looks the question up
in a bounded ``(qname, qtype) -> reply`` dict and only on a miss (or a stale reply) parses the
name and builds the reply, which is then rendered lazily and reused until the next change
that touches it. A change to one service therefore costs that service's replies, and a node
change those of the services on the node.
"""

from __future__ import annotations

import random as _random
import re
import socket
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from itertools import compress, count, islice
from operator import is_not
from dataclasses import replace

from dnsdisco.catalog.model import CRITICAL, PASSING, CatalogDelta, Node, ServiceEntry
from dnsdisco.config import Config
from dnsdisco.dns import rr as _rr
from dnsdisco.dns.memo import ReplyMemo
from dnsdisco.dns.message import Qtype, Query, Rcode
from dnsdisco.dns.names import (
    AddrLookup,
    Lookup,
    NodeLookup,
    ServiceLookup,
    addr_label,
    normalize_domain,
    parse,
    parse_reverse,
    split_zone,
)
from dnsdisco.dns.render import (
    TCP_SRV_ANSWER_CAP,
    Cell,
    Context,
    Fixed,
    LazyUnits,
    Records,
    Reply,
    Shuffles,
    SoaRecords,
    Unit,
    nodata,
    nxdomain,
)
from dnsdisco.dns.rr import RR, Name

__all__ = ["AnswerTable", "Chase"]

# Address preference per question type (Consul's "accept" flags, spec §1.6).
_ACCEPT_A, _ACCEPT_AAAA, _ACCEPT_ANY = 1, 2, 3
_GROUP_ACCEPT = {Qtype.A: _ACCEPT_A, Qtype.AAAA: _ACCEPT_AAAA}
# Service questions answered from answer sets kept up to date across changes (see _Svc).
_VIEW_QTYPES = frozenset((Qtype.A, Qtype.AAAA, Qtype.ANY, Qtype.SRV))

# Consul resolves in-domain CNAME targets itself, at most 3 levels deep (guards a service
# whose address names itself), and keeps at most 5 resolved records without EDNS (spec §1.6).
_MAX_CNAME_DEPTH = 3
_MAX_RESOLVED_NO_EDNS = 5
# NS: at most 3 servers, and only nodes whose names are plain DNS labels (spec §1.13).
_MAX_NS = 3
_NS_NODE_NAME = re.compile(r"^[A-Za-z0-9-]+$")

# Bounds on the caches (each is cleared whole when full: all are cheap to refill).
_FAST_MAX = 100_000  # (qname, qtype) -> reply
_REPLIES_MAX = 200_000  # lookup -> reply, and per-node TXT records
_IP_CACHE_MAX = 200_000  # address text -> packed address

_RR_HEAD = struct.Struct("!2sHHIH")  # owner pointer, TYPE, CLASS, TTL, RDLENGTH
_IP_CACHE: dict[str, bytes | None] = {}
_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"


def _address_rr(ttl: int, ip: bytes) -> bytes:
    """An A or AAAA record owned by the question (0xC00C), in wire form."""
    if len(ip) == 4:
        return _RR_HEAD.pack(_rr.QUESTION_POINTER, Qtype.A, 1, ttl, 4) + ip
    return _RR_HEAD.pack(_rr.QUESTION_POINTER, Qtype.AAAA, 1, ttl, 16) + ip


def _parse_ip(text: str) -> bytes | None:
    """The packed form of an IP literal (4 or 16 bytes), ``None`` for a hostname or "".

    An IPv4-mapped IPv6 address is IPv4, as Go's ``net.IP.To4`` (and so Consul) treats it.
    Memoised: the same few addresses are parsed for every reply that names them.
    """
    try:
        return _IP_CACHE[text]
    except KeyError:
        pass
    ip: bytes | None = None
    if text:
        try:
            ip = socket.inet_pton(socket.AF_INET, text)
        except OSError:
            try:
                ip = socket.inet_pton(socket.AF_INET6, text)
            except OSError:
                ip = None
            else:
                if ip[:12] == _V4_MAPPED:
                    ip = ip[12:]
    if len(_IP_CACHE) >= _IP_CACHE_MAX:
        _IP_CACHE.clear()
    _IP_CACHE[text] = ip
    return ip


def _no_unit(i: int) -> Unit:
    raise IndexError(i)


def _ttl(seconds: float) -> int:
    """A TTL field: whole seconds, 0..2^31-1 (RFC 2181 §8)."""
    return min(max(int(seconds), 0), 0x7FFFFFFF)


def _fqdn(host: str) -> str:
    return host if host.endswith(".") else host + "."


def _pick(default: str, v4: str, v6: str, accept: int) -> str:
    """Consul's address choice: a tagged address of the wanted family wins, else the default
    (which the caller then filters by family). ``ANY`` prefers IPv6 (spec §1.6)."""
    if accept == _ACCEPT_A:
        return v4 or default
    if accept == _ACCEPT_AAAA:
        return v6 or default
    return v6 or v4 or default


def _node_address(node: Node, accept: int, wan: bool) -> str:
    tagged = node.tagged_addresses
    if wan:
        return _pick(tagged.get("wan") or node.address, tagged.get("wan_ipv4", ""), tagged.get("wan_ipv6", ""), accept)
    return _pick(node.address, tagged.get("lan_ipv4", ""), tagged.get("lan_ipv6", ""), accept)


def _service_address(entry: ServiceEntry, accept: int, wan: bool) -> tuple[str, int]:
    """The service's own address for *accept* ("" = use the node's) and its port."""
    svc = entry.service
    tagged = svc.tagged_addresses
    port = svc.port
    if wan:
        wan_addr = tagged.get("wan")
        if wan_addr is not None and wan_addr.port:
            port = wan_addr.port
        v4, v6 = tagged.get("wan_ipv4"), tagged.get("wan_ipv6")
        default = wan_addr.address if wan_addr is not None and wan_addr.address else svc.address
    else:
        v4, v6 = tagged.get("lan_ipv4"), tagged.get("lan_ipv6")
        default = svc.address
    return _pick(default, v4.address if v4 else "", v6.address if v6 else "", accept), port


class _Target:
    """Where one instance points: an IP (and whether it is the node's, untranslated), or a
    hostname (a CNAME)."""

    __slots__ = ("ip", "host", "node_ip", "svc_addr", "port")

    def __init__(self, ip: bytes | None, host: str, node_ip: bool, svc_addr: str, port: int) -> None:
        self.ip = ip
        self.host = host
        self.node_ip = node_ip
        self.svc_addr = svc_addr
        self.port = port


def _target(entry: ServiceEntry, accept: int, wan: bool, qname: str) -> _Target | None:
    """Spec §1.6 cases 1-5 for one instance."""
    svc_addr, port = _service_address(entry, accept, wan)
    node = entry.node
    if svc_addr:
        ip = _parse_ip(svc_addr)
        if ip is not None:
            return _Target(ip, "", False, svc_addr, port)  # case 3: the service's own IP
        host = _fqdn(svc_addr)
        if host.lower() != qname or _parse_ip(_node_address(node, accept, wan)) is None:
            return _Target(None, host, False, svc_addr, port)  # case 5 (case 4 needs a node IP)
    node_addr = _node_address(node, accept, wan)
    ip = _parse_ip(node_addr)
    if ip is not None:
        # case 1: the node's IP; a WAN-translated one is named by .addr. rather than .node.
        return _Target(ip, "", node_addr == node.address, svc_addr, port)
    if node_addr:
        return _Target(None, _fqdn(node_addr), False, svc_addr, port)  # case 2
    return None


def _dep_flag(entry: ServiceEntry, domains: tuple[str, ...]) -> bool:
    """Whether one of *entry*'s addresses is a hostname inside our zones."""
    addrs = [entry.service.address, entry.node.address]
    addrs += [t.address for t in entry.service.tagged_addresses.values()]
    addrs += list(entry.node.tagged_addresses.values())
    for addr in addrs:
        if addr and _parse_ip(addr) is None and split_zone(_fqdn(addr.lower()), domains):
            return True
    return False


def _diff(old: Sequence[ServiceEntry], new: Sequence[ServiceEntry]) -> tuple[list[ServiceEntry], list[ServiceEntry]]:
    """The entries *old* has and *new* lacks, and the reverse, by identity.

    Both come in the producer's stable order with unchanged entries kept as they were, so the
    change is a window between a common prefix and a common suffix, found by C-speed passes;
    only the window is compared in Python.
    """
    short = min(len(old), len(new))
    head = next(compress(count(), map(is_not, old, new)), short)
    tail = next(compress(count(), map(is_not, islice(reversed(old), short - head), reversed(new))), short - head)
    old_mid = old[head : len(old) - tail]
    new_mid = new[head : len(new) - tail]
    if not old_mid or not new_mid:
        return list(old_mid), list(new_mid)
    old_ids = set(map(id, old_mid))
    new_ids = set(map(id, new_mid))
    return [e for e in old_mid if id(e) not in new_ids], [e for e in new_mid if id(e) not in old_ids]


# A change that replaces more than this share of a service's entries rebuilds its views.
_VIEW_REBUILD_SHARE = 4
_MAX_VIEWS = 16  # per service: (qtype family, tag, domain) answer sets kept up to date


class _Svc:
    """One version of one service in one datacenter: its entries, the cell its replies hang
    off, and what carries over to the next version.

    A change makes a new version (new cell: the replies go stale) from the old one and the
    entries it removed and added, found by identity (the producers keep unchanged entries'
    identity). Per-entry derived values (aggregate status, the in-zone-hostname flag) and the
    answer sets (:class:`_AView`, :class:`_SrvView`) move to the new version and are patched
    for the changed entries only, so a write into a service of 5,000 instances costs O(change).
    """

    __slots__ = ("entries", "cell", "status", "views", "_healthy", "_deps")

    def __init__(self, entries: tuple[ServiceEntry, ...]) -> None:
        # The caches below are keyed by id(entry): holding the entries keeps their ids from
        # being reused while they are here, and a removed entry leaves every cache.
        self.entries = entries
        self.cell = Cell()
        self.status: dict[int, str] = {}  # id -> aggregate status, filled on demand
        self.views: dict[tuple[object, ...], _AView | _SrvView] = {}
        self._healthy: tuple[bool, list[tuple[ServiceEntry, str]]] | None = None
        # (domains, how many entries have an in-zone hostname, id -> that flag)
        self._deps: tuple[tuple[str, ...], int, dict[int, bool]] | None = None

    def follow(self, prev: _Svc, removed: list[ServiceEntry], added: list[ServiceEntry]) -> None:
        """Take over *prev*'s per-entry caches and views, patched for the change."""
        status = prev.status
        for entry in removed:
            status.pop(id(entry), None)
        self.status = status
        deps = prev._deps
        if deps is not None:
            domains, count, flags = deps
            for entry in removed:
                count -= flags.pop(id(entry), False)
            for entry in added:
                flag = flags[id(entry)] = _dep_flag(entry, domains)
                count += flag
            self._deps = (domains, count, flags)
        if prev.views and (len(removed) + len(added)) * _VIEW_REBUILD_SHARE <= len(self.entries):
            views = prev.views
            for view in views.values():
                view.patch(self, removed, added)
            self.views = views

    def status_of(self, entry: ServiceEntry) -> str:
        key = id(entry)
        status = self.status.get(key)
        if status is None:
            status = self.status[key] = entry.status
        return status

    def healthy(self, only_passing: bool) -> list[tuple[ServiceEntry, str]]:
        """Instances that may be served, with their aggregate status (spec §1.9): critical
        (the worst of the instance's and its node's checks) is dropped, warning too with
        ``only_passing``. The list is shared: callers must not mutate it."""
        cached = self._healthy
        if cached is not None and cached[0] == only_passing:
            return cached[1]
        out = []
        status_of = self.status_of
        for entry in self.entries:
            status = status_of(entry)
            if status == CRITICAL or (only_passing and status != PASSING):
                continue
            out.append((entry, status))
        self._healthy = (only_passing, out)
        return out

    def depends_on_names(self, domains: tuple[str, ...]) -> bool:
        """Whether an instance address is a hostname inside our zones: then the answer is
        resolved through other catalog data (and may refer to the question itself)."""
        cached = self._deps
        if cached is None or cached[0] != domains:
            flags = {id(e): _dep_flag(e, domains) for e in self.entries}
            cached = self._deps = (domains, sum(flags.values()), flags)
        return cached[1] > 0


def _serves(status: str, only_passing: bool) -> bool:
    return status != CRITICAL and not (only_passing and status != PASSING)


def _has_tag(entry: ServiceEntry, tag: str | None) -> bool:
    return tag is None or any(t.lower() == tag for t in entry.service.tags)


class _AView:
    """A service's address answer (A/AAAA/ANY) for one tag, patched per changed entry.

    Holds, for the instances that may be served, the distinct plain addresses in slots (their
    records in wire form) and the :class:`~dnsdisco.render.Shuffles` over those slots, plus
    how many instances are CNAMEs (spec §1.6: any plain address drops them; a CNAME-only
    answer is built in full). Valid for one :class:`Context` (a reconfigure drops it) and
    only for services that do not depend on other catalog data (no in-zone hostnames).
    """

    __slots__ = ("ctx", "accept", "tag", "wan", "ttl", "only_passing", "contrib", "members",
                 "hosts", "refs", "slot", "ips", "blobs", "shuffles")

    def __init__(self, ctx: Context, accept: int, tag: str | None, wan: bool, ttl: int, only_passing: bool) -> None:
        self.ctx = ctx
        self.accept = accept
        self.tag = tag
        self.wan = wan
        self.ttl = ttl
        self.only_passing = only_passing
        self.contrib: dict[int, bytes | str | None] = {}  # id -> address, CNAME host or nothing
        self.members = 0  # instances that may be served (health, tag)
        self.hosts = 0  # of which CNAMEs
        self.refs: dict[bytes, int] = {}
        self.slot: dict[bytes, int] = {}
        self.ips: list[bytes] = []
        self.blobs: list[bytes] = []
        self.shuffles = Shuffles(0, ctx.shuffle, ctx.random)

    def fill(self, svc: _Svc) -> None:
        shuffles = self.shuffles
        self.shuffles = None  # type: ignore[assignment]  # shuffled once at the end
        for entry in svc.entries:
            self._add(svc, entry)
        self.shuffles = Shuffles(len(self.ips), shuffles._shuffle, shuffles._random)

    def patch(self, svc: _Svc, removed: list[ServiceEntry], added: list[ServiceEntry]) -> None:
        for entry in removed:
            self._remove(entry)
        for entry in added:
            self._add(svc, entry)

    def _add(self, svc: _Svc, entry: ServiceEntry) -> None:
        if not _serves(svc.status_of(entry), self.only_passing) or not _has_tag(entry, self.tag):
            return
        self.members += 1
        target = _target(entry, self.accept, self.wan, "")  # no in-zone names: qname moot
        c: bytes | str | None = None
        if target is not None:
            ip = target.ip
            if ip is None:
                c = target.host
                self.hosts += 1
            elif self.accept == _ACCEPT_ANY or (len(ip) == 4) == (self.accept == _ACCEPT_A):
                c = ip
                refs = self.refs.get(ip, 0)
                self.refs[ip] = refs + 1
                if not refs:
                    self.slot[ip] = len(self.ips)
                    self.ips.append(ip)
                    self.blobs.append(_address_rr(self.ttl, ip))
                    if self.shuffles is not None:
                        self.shuffles.add()
        self.contrib[id(entry)] = c

    def _remove(self, entry: ServiceEntry) -> None:
        key = id(entry)
        if key not in self.contrib:
            return
        c = self.contrib.pop(key)
        self.members -= 1
        if type(c) is str:
            self.hosts -= 1
        elif c is not None:
            left = self.refs[c] - 1
            if left:
                self.refs[c] = left
                return
            del self.refs[c]
            i = self.slot.pop(c)
            last_ip = self.ips.pop()
            last_blob = self.blobs.pop()
            if i < len(self.ips):
                self.ips[i] = last_ip
                self.blobs[i] = last_blob
                self.slot[last_ip] = i
            self.shuffles.remove(i)


class _SrvView:
    """A service's SRV answer for one tag and zone, patched per changed entry.

    Instances are grouped by what makes them one SRV record (node, address, port: spec §1.7);
    each group is a slot whose first member gives the record. Units are built on first use
    and kept across versions while the slot's first member does not change.
    """

    __slots__ = ("ctx", "tag", "wan", "ttl", "only_passing", "suffix", "contrib", "members",
                 "groups", "slot", "plan", "units", "shuffles", "version")

    def __init__(self, ctx: Context, tag: str | None, wan: bool, ttl: int, only_passing: bool, suffix: str) -> None:
        self.ctx = ctx
        self.tag = tag
        self.wan = wan
        self.ttl = ttl
        self.only_passing = only_passing
        self.suffix = suffix
        self.contrib: dict[int, tuple[str, str, int] | None] = {}  # id -> its group, if any
        self.members = 0
        self.groups: dict[tuple[str, str, int], list[tuple[ServiceEntry, str, _Target, Name | None]]] = {}
        self.slot: dict[tuple[str, str, int], int] = {}
        self.plan: list[tuple[ServiceEntry, str, _Target, Name | None]] = []
        self.units: list[Unit | None] = []
        self.shuffles = Shuffles(0, ctx.shuffle, ctx.random)
        self.version = 0

    def fill(self, svc: _Svc) -> None:
        shuffles = self.shuffles
        self.shuffles = None  # type: ignore[assignment]  # shuffled once at the end
        for entry in svc.entries:
            self._add(svc, entry)
        self.shuffles = Shuffles(len(self.plan), shuffles._shuffle, shuffles._random)

    def patch(self, svc: _Svc, removed: list[ServiceEntry], added: list[ServiceEntry]) -> None:
        self.version += 1
        for entry in removed:
            self._remove(entry)
        for entry in added:
            self._add(svc, entry)

    def _add(self, svc: _Svc, entry: ServiceEntry) -> None:
        status = svc.status_of(entry)
        if not _serves(status, self.only_passing) or not _has_tag(entry, self.tag):
            return
        self.members += 1
        key: tuple[str, str, int] | None = None
        target = _target(entry, _ACCEPT_ANY, self.wan, "")
        if target is not None:
            host: Name | None = None
            usable = True
            if target.ip is None:
                try:
                    host = self.ctx.name(target.host)
                except ValueError:
                    usable = False  # not a usable DNS name: skip the instance
            if usable:
                key = (entry.node.name, target.svc_addr, target.port)
                item = (entry, status, target, host)
                group = self.groups.get(key)
                if group is None:
                    self.groups[key] = [item]
                    self.slot[key] = len(self.plan)
                    self.plan.append(item)
                    self.units.append(None)
                    if self.shuffles is not None:
                        self.shuffles.add()
                else:
                    # The group's record comes from its first member in entry order (node, then
                    # service ID), as a fresh build takes it, whatever order they arrived in.
                    order = (entry.node.name, entry.service.id)
                    at = next((j for j, other in enumerate(group)
                               if (other[0].node.name, other[0].service.id) > order), len(group))
                    group.insert(at, item)
                    if at == 0:
                        i = self.slot[key]
                        self.plan[i] = item
                        self.units[i] = None
        self.contrib[id(entry)] = key

    def _remove(self, entry: ServiceEntry) -> None:
        ident = id(entry)
        if ident not in self.contrib:
            return
        key = self.contrib.pop(ident)
        self.members -= 1
        if key is None:
            return
        group = self.groups[key]
        at = next(j for j, item in enumerate(group) if item[0] is entry)
        del group[at]
        i = self.slot[key]
        if group:
            if at == 0:  # the group's record came from this instance
                self.plan[i] = group[0]
                self.units[i] = None
            return
        del self.groups[key]
        del self.slot[key]
        last_plan = self.plan.pop()
        last_unit = self.units.pop()
        if i < len(self.plan):
            self.plan[i] = last_plan
            self.units[i] = last_unit
            self.slot[(last_plan[0].node.name, last_plan[2].svc_addr, last_plan[2].port)] = i
        self.shuffles.remove(i)


class _Dc:
    """One datacenter's catalog, indexed for DNS."""

    __slots__ = (
        "name", "key", "services", "nodes", "nodes_lc", "node_svcs", "node_cells", "member",
        "any", "full", "node_ips", "svc_ips", "stale",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.key = name.lower()
        self.services: dict[str, _Svc] = {}
        self.nodes: dict[str, Node] = {}
        self.nodes_lc: dict[str, Node] = {}
        self.node_svcs: dict[str, dict[str, int]] = {}  # node name -> service key -> instances
        self.node_cells: dict[str, Cell] = {}  # lower-cased node name -> cell of its replies
        self.member = Cell()  # replaced when a service or node appears or goes
        self.any = Cell()  # replaced on every change to this datacenter
        self.full = False  # a full delta has been applied
        self.node_ips: dict[bytes, set[str]] = {}  # node address -> node names (PTR)
        self.svc_ips: dict[bytes, dict[str, int]] = {}  # service address -> names (PTR)
        self.stale = False  # too old to serve (mirror mode: set_stale)


def _renew(cell: Cell) -> Cell:
    cell.stale = True
    return Cell()


class Chase(bytes):
    """A complete reply (a CNAME chain) whose chain may end at a name outside our domains.

    ``respond`` returns it instead of plain ``bytes`` so that the server can resolve that name
    through the recursors and splice the records in (spec §1.6); sent as it is, it is the
    CNAME-only answer. ``targets``: the lower-case names outside our domains the chains end
    at; ``node``: a node lookup (the recursor's answer section is appended unfiltered) rather
    than a service lookup (CNAME/A/AAAA kept, TTL set to the service TTL, at most 5 without
    EDNS). Only hostname instances produce one, so the check costs the hot path one class
    comparison and the copy is made only for these replies.
    """

    targets: frozenset[str]
    node: bool


class _Chasing(Reply):
    """A reply whose rendering is returned as a :class:`Chase`."""

    __slots__ = ("inner", "targets", "node")

    def __init__(self, inner: Reply, targets: frozenset[str], node: bool) -> None:
        super().__init__(inner.cell)
        self.inner = inner
        self.targets = targets
        self.node = node

    def render(self, query: Query, ctx: Context, pick: int = -1) -> bytes:
        out = Chase(self.inner.render(query, ctx))
        out.targets = self.targets
        out.node = self.node
        return out


class AnswerTable:
    """The DNS interface's view of the catalog, answering every name inside its zones.

    ``apply`` (sync) folds a :class:`CatalogDelta` in, ``reconfigure`` swaps the config
    (SIGHUP), ``respond`` answers one :class:`~dnsdisco.dns.message.Query` with the complete
    reply message, or ``None`` when the name is not ours (outside ``domain``/``alt_domain``
    and ``arpa.``, or a reverse name we do not know while recursors are configured).
    ``synced`` is false until the first full delta of the local datacenter; until then every
    in-zone name gets SERVFAIL.
    """

    def __init__(
        self,
        config: Config,
        *,
        rng: _random.Random | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._rng = rng if rng is not None else _random.Random()
        self._clock = clock
        self._dcs: dict[str, _Dc] = {}
        self._dcs_cell = Cell()  # replaced when a datacenter appears
        self._any = Cell()  # replaced on every apply (replies resolved through other data)
        self._sync_cell = Cell()
        self._never = Cell()  # replies that depend on nothing but the config
        self._fast: dict[tuple[str, int], Reply] = {}
        # Finished replies by request bytes, read by the server before it parses (dns.memo).
        self.memo = ReplyMemo()
        self._replies: dict[tuple[object, ...], Reply] = {}
        self._renders_before = 0
        # While a CNAME reply is built: collects the targets outside our domains (see Chase).
        self._outside: list[str] | None = None
        self.reconfigure(config)

    # -- public contract -----------------------------------------------------------------

    @property
    def synced(self) -> bool:
        """True once a full delta for ``config.datacenter`` has been applied."""
        dc = self._dcs.get(self._local)
        return dc is not None and dc.full

    @property
    def renders(self) -> int:
        """How many answer orders have been rendered so far (a cost counter)."""
        return self._renders_before + self._ctx.renders

    def reconfigure(self, config: Config) -> None:
        """Adopt *config*: zones, TTLs, limits and flags. Every cached reply is dropped and
        re-rendered on demand; the catalog itself is kept."""
        old = getattr(self, "_ctx", None)
        if old is not None:
            self._renders_before += old.renders
        dns = config.dns_config
        self._config = config
        self._dns = dns
        self._local = config.datacenter.lower()
        domain = normalize_domain(config.domain) or "consul."
        alt = normalize_domain(config.alt_domain)
        self._domain = domain
        self._domains = (domain, alt) if alt and alt != domain else (domain,)
        self._domain_names = {d: Name(d) for d in self._domains}
        soa = dns.soa
        self._ctx = Context(
            ra=bool(config.recursors),
            compress=not dns.disable_compression,
            udp_answer_limit=dns.udp_answer_limit,
            enable_truncate=dns.enable_truncate,
            soa_ttl=_ttl(soa.min_ttl),
            soa_timers=(_ttl(soa.refresh), _ttl(soa.retry), _ttl(soa.expire), _ttl(soa.min_ttl)),
            random=self._rng.random,
            clock=self._clock,
            rng_shuffle=self._rng.shuffle,
        )
        self._node_ttl = _ttl(dns.node_ttl)
        self._fast.clear()
        self.memo.clear()
        self._replies.clear()
        self._never = _renew(self._never)
        self._sync_cell = _renew(self._sync_cell)

    def apply(self, delta: CatalogDelta) -> None:
        """Fold *delta* into the table; replies built from what it touches go stale.

        ``full=True`` replaces the datacenter's catalog: services and nodes it does not name
        are gone. A node change also re-points the services on that node that the delta does
        not itself restate. Unchanged services keep their rendered replies.
        """
        key = delta.datacenter.lower()
        dc = self._dcs.get(key)
        if dc is None:
            dc = self._dcs[key] = _Dc(delta.datacenter)
            self._dcs_cell = _renew(self._dcs_cell)
        services = {name.lower(): tuple(entries) for name, entries in delta.services.items()}
        changed = False
        if delta.full:
            for name in [n for n in dc.services if n not in services]:
                changed |= self._set_service(dc, name, ())
            # Nodes named by neither the delta's nodes nor its entries are gone.
            alive = set(delta.nodes)
            alive.update(e.node.name for entries in services.values() for e in entries)
            for name in [n for n in dc.nodes if n not in alive]:
                changed |= self._set_node(dc, name, None, services, cascade=False)
        for name, node in delta.nodes.items():
            changed |= self._set_node(dc, name, node, services, cascade=not delta.full)
        for name, entries in services.items():
            changed |= self._set_service(dc, name, entries)
        if changed:
            dc.any = _renew(dc.any)
            self._any = _renew(self._any)
        if delta.full and not dc.full:
            dc.full = True
            if key == self._local:
                self._sync_cell = _renew(self._sync_cell)

    def set_stale(self, datacenter: str, stale: bool) -> None:
        """Mark *datacenter*'s catalog as unfit to serve (True) or fit again (False).

        The mirror calls this for a datacenter it has not loaded yet and for one whose copy is
        older than ``dns_config.max_stale``. While the local datacenter is stale every in-zone
        name gets SERVFAIL, as before the first sync; while another one is, names in it do.
        The catalog itself is kept, and served again as soon as the flag clears.
        """
        key = datacenter.lower()
        dc = self._dcs.get(key)
        if dc is None:
            dc = self._dcs[key] = _Dc(datacenter)
            self._dcs_cell = _renew(self._dcs_cell)
        if dc.stale == stale:
            return
        dc.stale = stale
        # Cached replies do not know about the flag: drop them (cheap to refill), and renew the
        # cell the SERVFAIL replies hang off so they go when the flag clears.
        self._fast.clear()
        self.memo.clear()
        self._sync_cell = _renew(self._sync_cell)

    def _serving(self) -> bool:
        dc = self._dcs.get(self._local)
        return dc is not None and dc.full and not dc.stale

    def respond(self, query: Query, key: bytes | None = None) -> bytes | None:
        """The complete reply to *query* (header, question as sent, sections, OPT if the query
        had EDNS), or ``None`` when the name is not ours to answer.

        *key*, the request's bytes after its ID, lets the reply be kept in :attr:`memo` for
        the server to answer the same request from next time."""
        reply = self._fast.get((query.qname, query.qtype))
        if reply is None or reply.cell.stale:
            reply = self._resolve(query)
            if reply is None:
                return None
        if key is None:
            return reply.render(query, self._ctx)
        return self.memo.answer(key, query, reply, self._ctx, self._rng.random)

    # -- catalog indexing ----------------------------------------------------------------

    def _set_service(self, dc: _Dc, name: str, entries: tuple[ServiceEntry, ...]) -> bool:
        state = dc.services.get(name)
        old = state.entries if state is not None else ()
        if entries is old or entries == old:
            return False
        removed, added = _diff(old, entries)
        for entry in removed:
            node = entry.node.name
            counts = dc.node_svcs.get(node)
            if counts is not None:
                left = counts.get(name, 0) - 1
                if left > 0:
                    counts[name] = left
                else:
                    counts.pop(name, None)
                    if not counts:
                        del dc.node_svcs[node]
            ip = _parse_ip(entry.service.address)
            if ip is not None:
                names = dc.svc_ips.get(ip)
                if names is not None:
                    svc_name = entry.service.name
                    left = names.get(svc_name, 0) - 1
                    if left > 0:
                        names[svc_name] = left
                    else:
                        names.pop(svc_name, None)
                        if not names:
                            del dc.svc_ips[ip]
        for entry in added:
            node = entry.node
            counts = dc.node_svcs.setdefault(node.name, {})
            counts[name] = counts.get(name, 0) + 1
            if node.name not in dc.nodes:
                # A node known only through its services still answers node lookups.
                self._index_node(dc, node.name, None, node)
            ip = _parse_ip(entry.service.address)
            if ip is not None:
                names = dc.svc_ips.setdefault(ip, {})
                names[entry.service.name] = names.get(entry.service.name, 0) + 1
        if state is not None:
            state.cell.stale = True
        if entries:
            new = dc.services[name] = _Svc(entries)
            if state is not None:
                new.follow(state, removed, added)
        else:
            dc.services.pop(name, None)
        if not old or not entries:
            dc.member = _renew(dc.member)
        return True

    def _set_node(
        self,
        dc: _Dc,
        name: str,
        node: Node | None,
        restated: Mapping[str, tuple[ServiceEntry, ...]],
        *,
        cascade: bool,
    ) -> bool:
        old = dc.nodes.get(name)
        if node == old:
            return False
        self._index_node(dc, name, old, node)
        if cascade:
            # Re-point the services on this node that the delta does not restate.
            for svc_name in list(dc.node_svcs.get(name, {})):
                if svc_name in restated:
                    continue
                state = dc.services.get(svc_name)
                if state is None:
                    continue
                if node is None:
                    entries = tuple(e for e in state.entries if e.node.name != name)
                else:
                    entries = tuple(
                        replace(e, node=node) if e.node.name == name else e for e in state.entries
                    )
                self._set_service(dc, svc_name, entries)
        return True

    def _index_node(self, dc: _Dc, name: str, old: Node | None, node: Node | None) -> None:
        if old is not None:
            ip = _parse_ip(old.address)
            if ip is not None:
                names = dc.node_ips.get(ip)
                if names is not None:
                    names.discard(name)
                    if not names:
                        del dc.node_ips[ip]
        lname = name.lower()
        if node is None:
            dc.nodes.pop(name, None)
            if dc.nodes_lc.get(lname) is old:
                dc.nodes_lc.pop(lname, None)
        else:
            dc.nodes[name] = node
            dc.nodes_lc[lname] = node
            ip = _parse_ip(node.address)
            if ip is not None:
                dc.node_ips.setdefault(ip, set()).add(name)
        cell = dc.node_cells.pop(lname, None)
        if cell is not None:
            cell.stale = True
        if old is None or node is None:
            dc.member = _renew(dc.member)

    # -- lookups -------------------------------------------------------------------------

    def _remember(self, query: Query, reply: Reply) -> Reply:
        fast = self._fast
        if len(fast) >= _FAST_MAX:
            fast.clear()  # a cache of look-ups: cheap to refill, and a flood of names is bounded
        fast[(query.qname, query.qtype)] = reply
        return reply

    def _resolve(self, query: Query) -> Reply | None:
        qname = query.qname
        zone = split_zone(qname, self._domains)
        if zone is None:
            if qname == "arpa." or qname.endswith(".arpa."):
                return self._resolve_reverse(query)
            return None
        domain_text, rest = zone
        domain = self._domain_names[domain_text]
        if not self._serving():
            # Honest readiness: nothing in the zone is known before the first full sync.
            return self._remember(query, Fixed(self._sync_cell, Rcode.SERVFAIL))
        dwire = domain.wire
        if "\\" in qname or query.question[-4 - len(dwire) : -4].lower() != dwire:
            # A label with an escaped dot or odd bytes: the domain is not where the text says,
            # so nothing may point into the question. Not a name we serve; not cached.
            return nxdomain(self._never, domain, in_question=False)
        qtype = query.qtype
        reply: Reply
        if qtype == Qtype.SOA:
            reply = SoaRecords(self._ns_cell(), domain, self._ns_records(domain))
        elif qtype == Qtype.NS:
            ns = self._ns_records(domain)
            reply = ns if ns.units else nodata(ns.cell, domain)
        elif qtype == Qtype.AXFR:
            reply = Fixed(self._never, Rcode.NOTIMP)
        else:
            reply = self._lookup(parse(rest, qtype), qtype, domain, qname)
        return self._remember(query, reply)

    def _dc_for(self, name: str | None) -> _Dc | None:
        return self._dcs.get(self._local if name is None else name)

    def _lookup(self, lookup: Lookup | None, qtype: int, domain: Name, qname: str) -> Reply:
        if isinstance(lookup, ServiceLookup):
            dc = self._dc_for(lookup.dc)
            if dc is None:
                return nxdomain(self._dcs_cell, domain)  # "no path to datacenter"
            if dc.stale:
                return Fixed(self._sync_cell, Rcode.SERVFAIL)
            return self._service_reply(dc, lookup, qtype, domain, qname)
        if isinstance(lookup, NodeLookup):
            dc = self._dc_for(lookup.dc)
            if dc is None:
                return nxdomain(self._dcs_cell, domain)
            if dc.stale:
                return Fixed(self._sync_cell, Rcode.SERVFAIL)
            return self._node_reply(dc, lookup.node, qtype, domain)
        if isinstance(lookup, AddrLookup):
            return self._addr_reply(lookup.ip, qtype, domain)
        # Invalid names, prepared queries (the catalog has none yet), connect/ingress/
        # virtual/peer forms (out of scope, spec §1.21): not found.
        return nxdomain(self._never, domain)

    def _service_reply(self, dc: _Dc, lookup: ServiceLookup, qtype: int, domain: Name, qname: str) -> Reply:
        state = dc.services.get(lookup.service)
        if state is None:
            return nxdomain(dc.member, domain)
        depends = state.depends_on_names(self._domains)
        key = (dc.key, lookup.service, lookup.tag, qtype, domain.text, qname if depends else None)
        reply = self._replies.get(key)
        if reply is not None and not reply.cell.stale:
            return reply
        cell = self._any if depends else state.cell
        if not depends and qtype in _VIEW_QTYPES:
            # The common case, kept up to date across changes (O(change) per write).
            reply = self._view_reply(dc, state, lookup, qtype, domain, cell)
            if reply is not None:
                if len(self._replies) >= _REPLIES_MAX:
                    self._replies.clear()
                self._replies[key] = reply
                return reply
        entries = state.healthy(self._dns.only_passing)
        if lookup.tag is not None:
            tag = lookup.tag
            entries = [(e, s) for e, s in entries if any(t.lower() == tag for t in e.service.tags)]
        if not entries:
            reply = nxdomain(cell, domain)  # all unhealthy, or no instance has the tag
        else:
            reply = self._service_records(dc, lookup.service, entries, qtype, domain, qname, cell)
        if len(self._replies) >= _REPLIES_MAX:
            self._replies.clear()
        self._replies[key] = reply
        return reply

    def _view_reply(
        self, dc: _Dc, state: _Svc, lookup: ServiceLookup, qtype: int, domain: Name, cell: Cell
    ) -> Reply | None:
        """The reply from the service's kept answer set for this question (built on first
        use, then patched by ``apply``); ``None`` when the answer must be built in full (CNAME
        instances only, a datacenter name that is no DNS label)."""
        ctx = self._ctx
        ttl = _ttl(self._dns.service_ttl_for(lookup.service))
        wan = self._wan(dc)
        only_passing = self._dns.only_passing
        srv = qtype == Qtype.SRV
        vkey = (qtype, lookup.tag, domain.text if srv else "")
        view = state.views.get(vkey)
        if view is not None and view.ctx is not ctx:
            state.views.clear()  # reconfigured since: every view is stale
            view = None
        if view is None:
            if len(state.views) >= _MAX_VIEWS:
                state.views.clear()
            if srv:
                suffix = f".{dc.name}.{domain.text}"
                try:
                    ctx.name("00000000.addr" + suffix)  # the fallback target name must be valid
                except ValueError:
                    return None  # a datacenter name that is no DNS label
                view = _SrvView(ctx, lookup.tag, wan, ttl, only_passing, suffix)
            else:
                view = _AView(ctx, _GROUP_ACCEPT.get(qtype, _ACCEPT_ANY), lookup.tag, wan, ttl, only_passing)
            view.fill(state)
            state.views[vkey] = view
        if not view.members:
            return nxdomain(cell, domain)  # all unhealthy, or no instance has the tag
        if isinstance(view, _SrvView):
            if not view.plan:
                return nodata(cell, domain)
            units = LazyUnits(len(view.plan), self._srv_maker(view), view.units)
            return Records(cell, units, domain, ctx, tcp_cap=TCP_SRV_ANSWER_CAP, shuffles=view.shuffles)
        if view.ips:
            # Any plain address drops every CNAME instance (spec §1.6).
            limit = self._dns.a_record_limit
            if ctx.compress:
                return Records(cell, (), domain, ctx, limit=limit, blobs=list(view.blobs), shuffles=view.shuffles)
            units = [Unit.of(_rr.a_or_aaaa(None, view.ttl, ip)) for ip in view.ips]
            return Records(cell, units, domain, ctx, limit=limit, shuffles=view.shuffles)
        if view.hosts:
            return None  # CNAME instances only: one chain per order, built in full
        return nodata(cell, domain)

    def _srv_maker(self, view: _SrvView) -> Callable[[int], Unit]:
        """Builds slot *i*'s unit from this version of *view*, and keeps it in the view for the
        next versions while the view has not changed since."""
        plan = list(view.plan)
        version = view.version
        meta_txt = self._dns.enable_additional_node_meta_txt

        def make(i: int) -> Unit:
            unit = self._srv_unit(plan[i], view.suffix, view.ttl, meta_txt)
            if view.version == version:
                view.units[i] = unit
            return unit

        return make

    def _srv_unit(
        self, item: tuple[ServiceEntry, str, _Target, Name | None], suffix: str, ttl: int, meta_txt: bool
    ) -> Unit:
        """One SRV answer and its glue (spec §1.7)."""
        ctx = self._ctx
        entry, status, target, name = item
        weights = entry.service.weights
        weight = weights.passing if status == PASSING else weights.warning
        node = entry.node
        glue: list[RR]
        if target.ip is not None:
            name = None
            if target.node_ip:
                try:
                    name = ctx.name(node.name + ".node" + suffix)
                except ValueError:
                    pass  # a node name that is no DNS name: fall back to the .addr. form
            if name is None:
                # The service's own IP (or a WAN-translated node IP): an .addr. name.
                name = ctx.name(addr_label(target.ip) + ".addr" + suffix)
            glue = [_rr.a_or_aaaa(name, ttl, target.ip)]
        else:
            assert name is not None
            glue = self._resolve_host(target.host, ttl, 1)[:_MAX_RESOLVED_NO_EDNS]
        if meta_txt and node.meta:
            glue.extend(self._node_txt(node, suffix, ttl))
        return Unit.of(_rr.srv(None, ttl, 1, weight, target.port, name), glue)

    def _wan(self, dc: _Dc) -> bool:
        return self._config.translate_wan_addrs and dc.key != self._local

    def _service_records(
        self,
        dc: _Dc,
        service: str,
        entries: list[tuple[ServiceEntry, str]],
        qtype: int,
        domain: Name,
        qname: str,
        cell: Cell,
    ) -> Reply:
        ttl = _ttl(self._dns.service_ttl_for(service))
        ctx = self._ctx
        wan = self._wan(dc)
        if qtype == Qtype.SRV:
            units = self._srv_units(dc, entries, ttl, domain, qname, wan)
            if not units:
                return nodata(cell, domain)
            return Records(cell, units, domain, ctx, tcp_cap=TCP_SRV_ANSWER_CAP)
        if qtype == Qtype.TXT:
            # Consul answers TXT on a service with A/AAAA records; we answer NODATA (Decisions).
            return nodata(cell, domain)
        accept = _GROUP_ACCEPT.get(qtype, _ACCEPT_ANY)
        # For MX, PTR, CNAME, ... no address record qualifies, but hostname instances still
        # yield their CNAME (spec §1.5).
        addresses = qtype in (Qtype.A, Qtype.AAAA, Qtype.ANY)
        plain: dict[bytes, bytes] = {}
        hosts: dict[str, None] = {}
        for entry, _status in entries:
            target = _target(entry, accept, wan, qname)
            if target is None:
                continue
            ip = target.ip
            if ip is not None:
                if addresses and ip not in plain and (
                    accept == _ACCEPT_ANY or (len(ip) == 4) == (accept == _ACCEPT_A)
                ):
                    # Several instances on one address give one record (spec §1.6).
                    plain[ip] = _address_rr(ttl, ip)
            else:
                hosts.setdefault(target.host, None)
        if plain:
            # Any plain address drops every CNAME instance (spec §1.6).
            limit = self._dns.a_record_limit
            if ctx.compress:
                return Records(cell, (), domain, ctx, limit=limit, blobs=list(plain.values()))
            units = [Unit.of(_rr.a_or_aaaa(None, ttl, ip)) for ip in plain]
            return Records(cell, units, domain, ctx, limit=limit)
        if hosts:
            # Only one CNAME instance is returned; each order is one of them (the shuffle).
            chain_units: list[Unit] = []
            chains: list[list[int]] = []
            outside: list[str] = []
            self._outside = outside
            try:
                for host in hosts:
                    try:
                        target_name = ctx.name(host)
                    except ValueError:
                        continue
                    chain = [_rr.cname(None, ttl, target_name)]
                    chain += self._resolve_host(host, ttl, 1)
                    chains.append(list(range(len(chain_units), len(chain_units) + len(chain))))
                    chain_units.extend(Unit.of(x) for x in chain)
            finally:
                self._outside = None
            if chains:
                records = Records(
                    cell, chain_units, domain, ctx, chains=chains, noedns_limit=1 + _MAX_RESOLVED_NO_EDNS
                )
                if outside and addresses:
                    # A chain ends outside our domains: the server resolves it (spec §1.6).
                    return _Chasing(records, frozenset(outside), False)
                return records
        return nodata(cell, domain)

    def _srv_units(
        self,
        dc: _Dc,
        entries: list[tuple[ServiceEntry, str]],
        ttl: int,
        domain: Name,
        qname: str,
        wan: bool,
    ) -> LazyUnits:
        """SRV answers (spec §1.7): targets and de-duplication now, records on first use."""
        ctx = self._ctx
        meta_txt = self._dns.enable_additional_node_meta_txt
        suffix = f".{dc.name}.{domain.text}"
        try:
            ctx.name("00000000.addr" + suffix)  # the fallback target name must be valid
        except ValueError:
            return LazyUnits(0, _no_unit)  # a datacenter name that is no DNS label
        plan: list[tuple[ServiceEntry, str, _Target, Name | None]] = []
        seen: set[tuple[str, str, int]] = set()
        for entry, status in entries:
            target = _target(entry, _ACCEPT_ANY, wan, qname)
            if target is None:
                continue
            node = entry.node
            # Two instances on one node with the same address and port are one SRV (spec §1.7).
            dedup = (node.name, target.svc_addr, target.port)
            if dedup in seen:
                continue
            seen.add(dedup)
            if target.ip is None:
                try:
                    host: Name | None = ctx.name(target.host)
                except ValueError:
                    continue  # not a usable DNS name: skip the instance
            else:
                host = None  # the .node./.addr. name is made on first use (most never are)
            plan.append((entry, status, target, host))

        def make(i: int) -> Unit:
            return self._srv_unit(plan[i], suffix, ttl, meta_txt)

        return LazyUnits(len(plan), make)

    def _node_txt(self, node: Node, suffix: str, ttl: int) -> tuple[RR, ...]:
        """The node-meta TXT records for SRV Additional, owner ``<node>.node.<dc>.<domain>``,
        built once per node version and shared by every service on the node."""
        cache = self._ctx.node_txt
        key = (node.name + suffix, ttl)
        hit = cache.get(key)
        if hit is not None and hit[0] is node:
            return hit[1]
        try:
            owner = self._ctx.name(node.name + ".node" + suffix)
        except ValueError:
            records: tuple[RR, ...] = ()
        else:
            records = tuple(_rr.txt(owner, ttl, _rr.rfc1464(k, v)) for k, v in node.meta.items())
        if len(cache) >= _REPLIES_MAX:
            cache.clear()
        cache[key] = (node, records)
        return records

    def _resolve_host(self, host: str, ttl: int, depth: int) -> list[RR]:
        """Records for a CNAME target inside our zones, resolved as an internal ANY query
        (Consul keeps CNAME/A/AAAA, re-stamped with the answer's TTL). Outside the zones:
        nothing here; the name is noted in ``_outside`` when a reply is collecting them, and
        the server resolves it through the recursors (see :class:`Chase`)."""
        lname = host.lower()
        zone = split_zone(lname, self._domains)
        if zone is None or depth > _MAX_CNAME_DEPTH:
            if zone is None and self._outside is not None:
                self._outside.append(lname)  # resolved by the server through the recursors
            return []
        lookup = parse(zone[1], Qtype.ANY)
        owner = self._ctx.name(host)
        out: list[RR] = []
        if isinstance(lookup, AddrLookup):
            return [_rr.a_or_aaaa(owner, ttl, lookup.ip)]
        if isinstance(lookup, NodeLookup):
            dc = self._dc_for(lookup.dc)
            node = dc.nodes_lc.get(lookup.node) if dc is not None else None
            if node is None:
                return []
            addr = _node_address(node, _ACCEPT_ANY, self._wan(dc))
            ip = _parse_ip(addr)
            if ip is not None:
                return [_rr.a_or_aaaa(owner, ttl, ip)]
            if addr:
                return self._cname_chain(owner, _fqdn(addr), ttl, depth)
            return []
        if isinstance(lookup, ServiceLookup):
            dc = self._dc_for(lookup.dc)
            state = dc.services.get(lookup.service) if dc is not None else None
            if state is None:
                return []
            wan = self._wan(dc)
            hosts: list[str] = []
            seen: set[bytes] = set()
            for entry, _status in state.healthy(self._dns.only_passing):
                if lookup.tag is not None and not any(t.lower() == lookup.tag for t in entry.service.tags):
                    continue
                target = _target(entry, _ACCEPT_ANY, wan, lname)
                if target is None:
                    continue
                if target.ip is not None:
                    if target.ip not in seen:
                        seen.add(target.ip)
                        out.append(_rr.a_or_aaaa(owner, ttl, target.ip))
                elif not out:
                    hosts.append(target.host)
            if out:
                return out
            if hosts:
                return self._cname_chain(owner, hosts[0], ttl, depth)
        return out

    def _cname_chain(self, owner: Name, host: str, ttl: int, depth: int) -> list[RR]:
        try:
            target = self._ctx.name(host)
        except ValueError:
            return []
        return [_rr.cname(owner, ttl, target), *self._resolve_host(host, ttl, depth + 1)]

    def _node_reply(self, dc: _Dc, name: str, qtype: int, domain: Name) -> Reply:
        node = dc.nodes_lc.get(name)
        if node is None:
            return nxdomain(dc.member, domain)
        cell = dc.node_cells.get(name)
        if cell is None:
            cell = dc.node_cells[name] = Cell()
        ttl = self._node_ttl
        ctx = self._ctx
        # Node meta as TXT (spec §1.5): in Answer for TXT/ANY, in Additional for A/AAAA.
        txts = [_rr.txt(None, ttl, _rr.rfc1464(k, v)) for k, v in node.meta.items()]
        if qtype == Qtype.TXT:
            if not txts:
                return nodata(cell, domain)
            return Records(cell, [Unit.of(t) for t in txts], domain, ctx, shuffle=False)
        if qtype not in (Qtype.A, Qtype.AAAA, Qtype.ANY):
            # Consul answers NOERROR without SOA here; we add the SOA (Decisions).
            return nodata(cell, domain)
        accept = _GROUP_ACCEPT.get(qtype, _ACCEPT_ANY)
        addr = _node_address(node, accept, self._wan(dc))
        ip = _parse_ip(addr)
        extra = txts if self._dns.enable_additional_node_meta_txt and qtype != Qtype.ANY else []
        units: list[Unit] = []
        outside: list[str] = []
        if ip is not None:
            if accept == _ACCEPT_ANY or (len(ip) == 4) == (accept == _ACCEPT_A):
                units.append(Unit.of(_rr.a_or_aaaa(None, ttl, ip), extra))
        elif addr:
            host = _fqdn(addr)
            self._outside = outside
            try:
                chain = [_rr.cname(None, ttl, ctx.name(host)), *self._resolve_host(host, ttl, 1)]
            except ValueError:
                chain = []
            finally:
                self._outside = None
            if chain:
                if split_zone(host.lower(), self._domains):
                    cell = self._any  # resolved through other catalog data
                units.append(Unit.of(chain[0], extra))
                units.extend(Unit.of(x) for x in chain[1:])
        if not units:
            return nodata(cell, domain)
        if qtype == Qtype.ANY:
            units.extend(Unit.of(t) for t in txts)
        records = Records(cell, units, domain, ctx, shuffle=False)
        if outside:
            # The chain ends outside our domains: the server resolves it (spec §1.6).
            return _Chasing(records, frozenset(outside), True)
        return records

    def _addr_reply(self, ip: bytes, qtype: int, domain: Name) -> Reply:
        wanted = {Qtype.A: 4, Qtype.AAAA: 16}.get(qtype)
        if qtype == Qtype.ANY or wanted == len(ip):
            unit = Unit.of(_rr.a_or_aaaa(None, self._node_ttl, ip))
            return Records(self._never, [unit], domain, self._ctx, shuffle=False)
        # Consul puts the address in Additional for other types; we answer NODATA (Decisions).
        return nodata(self._never, domain)

    # -- SOA / NS ------------------------------------------------------------------------

    def _ns_cell(self) -> Cell:
        dc = self._dcs.get(self._local)
        if dc is None:
            return self._dcs_cell
        state = dc.services.get("consul")
        return state.cell if state is not None else dc.member

    def _ns_records(self, domain: Name) -> Records:
        """The zone's NS set: healthy instances of ``consul`` in the local DC, one per node,
        nodes with plain-label names only, at most 3 per reply, shuffled (spec §1.13)."""
        key = ("ns", domain.text)
        reply = self._replies.get(key)
        if isinstance(reply, Records) and not reply.cell.stale:
            return reply
        cell = self._ns_cell()
        units: list[Unit] = []
        dc = self._dcs.get(self._local)
        state = dc.services.get("consul") if dc is not None else None
        if dc is not None and state is not None:
            ttl = self._node_ttl
            ctx = self._ctx
            seen: set[str] = set()
            for entry, _status in state.healthy(self._dns.only_passing):
                node = entry.node
                if node.name in seen or not _NS_NODE_NAME.match(node.name):
                    continue
                try:
                    target = ctx.name(f"{node.name.lower()}.node.{dc.name}.{domain.text}")
                except ValueError:
                    continue
                seen.add(node.name)
                ip = _parse_ip(node.address)
                glue = [_rr.a_or_aaaa(target, ttl, ip)] if ip is not None else []
                units.append(Unit.of(_rr.ns(domain, ttl, target), glue))
        reply = Records(cell, units, domain, self._ctx, limit=_MAX_NS)
        self._replies[key] = reply
        return reply

    # -- reverse -------------------------------------------------------------------------

    def _resolve_reverse(self, query: Query) -> Reply | None:
        if not self._serving():
            return self._remember(query, Fixed(self._sync_cell, Rcode.SERVFAIL))
        dc = self._dcs[self._local]
        primary = self._domain_names[self._domain]
        ip = parse_reverse(query.qname)
        target: str | None = None
        if ip is not None:
            nodes = dc.node_ips.get(ip)
            if nodes:
                node = min(nodes, key=lambda n: (n.lower(), n))
                target = f"{node}.node.{dc.name}.{self._domain}"
            else:
                services = dc.svc_ips.get(ip)
                if services:
                    service = min(services, key=lambda n: (n.lower(), n))
                    target = f"{service}.service.{dc.name}.{self._domain}"
        if target is None:
            if self._config.recursors:
                return None  # not ours: the transport forwards it
            return self._remember(query, nxdomain(dc.any, primary, in_question=False))
        if query.qtype not in (Qtype.PTR, Qtype.ANY):
            # Consul answers PTR whatever the type; we answer NODATA (Decisions).
            return self._remember(query, nodata(dc.any, primary, in_question=False))
        try:
            # PTR TTL is node_ttl (Consul hard-codes 0; Decisions), always the primary domain.
            unit = Unit.of(_rr.ptr(None, self._node_ttl, self._ctx.name(target)))
        except ValueError:
            return self._remember(query, nxdomain(dc.any, primary, in_question=False))
        return self._remember(query, Records(dc.any, [unit], None, self._ctx, shuffle=False))

