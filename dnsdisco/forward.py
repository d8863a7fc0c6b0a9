"""The forwarder: names outside our domains, resolved by the configured ``recursors``.

This module owns everything between "this name is not ours" and the reply bytes for the
client: who may recurse through us (``dns_config.allow_recursion``: not an open resolver,
anchors.md §4.2), the order recursors are tried in (``recursor_strategy``, Consul's
sequential|random) and when to move on (a timeout, a network error, or an rcode other than
NOERROR/NXDOMAIN: hashicorp/consul#3640, #4426), the health of each recursor (out of rotation
after repeated failures, probed in the background until it answers: CoreDNS *forward*), the
bound on forwards in flight (REFUSED past it, as CoreDNS's ``max_concurrent``), the cache with
RFC 8767 serve-stale (:mod:`dnsdisco.dns.cache`), and forwarding-loop detection (CoreDNS *loop*;
hashicorp/consul#1800, #5983).

It does not own sockets that clients talk to, nor the decision that a name is ours: the DNS
server hands over what the answer table returns None for. Upstream traffic is UDP over one
connected socket per recursor (replies matched by ID and question, RFC 5452 §9.1; the socket,
and so the source port, is replaced every :data:`CHANNEL_LIFETIME` seconds), and TCP - one
connection per query - when the client asked over TCP (Consul uses the client's transport).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dnsdisco.config import Config
from dnsdisco.dns.cache import (
    STALE_ANSWER_WAIT,
    CacheKey,
    Entry,
    MalformedReply,
    NotRewritable,
    ResponseCache,
    Stored,
    cache_key,
    parse_reply,
    question_key,
    render,
    reply_question,
)
from dnsdisco.dns.message import FLAG_RA, FLAG_RD, Qtype, Query, Rcode, header
from dnsdisco.dns.wire import error_reply
from dnsdisco.metrics import FORWARD_DURATION_BUCKETS, FixedHistogram

__all__ = ["ForwardStats", "Forwarder", "Upstream"]

log = logging.getLogger(__name__)

# A recursor that fails this many times in a row (timeouts and network errors; an answer of
# any rcode proves it is reachable) leaves the rotation until a probe gets an answer
# (CoreDNS forward's max_fails default).
MAX_FAILS = 2
# How often a recursor out of rotation is probed (CoreDNS forward: every 0.5 s).
PROBE_INTERVAL = 0.5
# The UDP socket to a recursor is replaced after this many seconds, so that its source port
# does not stay fixed for an off-path spoofer to aim at (RFC 5452 §9.2 wants unpredictable
# ports; CoreDNS expires pooled connections after 10 s).
CHANNEL_LIFETIME = 10.0
# Loop probes at most this often per recursor when they are triggered by suspicious traffic.
LOOP_CHECK_SPACING = 30.0
# Reverse zones a forwarder is often told to send back to us (Consul's dnsmasq example uses
# `rev-server=10.0.0.0/8,127.0.0.1#8600`; hashicorp/consul#1800): the loop probe asks a random
# name in the first one, and a random name outside every zone for a "forward everything" loop.
_LOOP_PROBE_REVERSE = "10.in-addr.arpa."

_TYPE_HINFO = 13
_U16 = struct.Struct("!H")
_NET = ipaddress.IPv4Network | ipaddress.IPv6Network

# What a failed exchange looks like: no answer in time, or the network said no.
_FAILURES = (TimeoutError, OSError, EOFError)  # IncompleteReadError is an EOFError


@dataclass(slots=True)
class ForwardStats:
    """Plain counters, read at scrape time."""

    requests: int = 0  # resolve() calls
    cache_hits: int = 0  # answered from a fresh cache entry
    cache_misses: int = 0
    coalesced: int = 0  # joined an identical query already in flight
    stale_served: int = 0  # RFC 8767 answers
    servfail: int = 0  # SERVFAIL sent: every recursor failed (or a cached failure)
    rejected: int = 0  # REFUSED: over recursor_max_concurrent
    refused_clients: int = 0  # REFUSED: client outside allow_recursion (when resolve() sees one)
    upstream_errors: int = 0  # timeouts and network errors, per attempt
    upstream_failovers: int = 0  # replies with an rcode other than NOERROR/NXDOMAIN, per attempt
    upstream_malformed: int = 0  # replies we could not read, per attempt
    mismatched_replies: int = 0  # replies whose ID or question matched nothing we sent (RFC 5452)
    probes_failed: int = 0
    loops_detected: int = 0
    # Per recursor ("ip:port" as configured), for dnsdisco_forward_*: exchanges that got a
    # reply, by (recursor, rcode), and exchanges that got none (probes included).
    upstream_durations: dict[tuple[str, int], FixedHistogram] = field(default_factory=dict)
    upstream_failures: dict[str, int] = field(default_factory=dict)

    def observe_upstream(self, to: str, rcode: int, seconds: float) -> None:
        hist = self.upstream_durations.get((to, rcode))
        if hist is None:
            hist = self.upstream_durations[to, rcode] = FixedHistogram(FORWARD_DURATION_BUCKETS)
        hist.observe(seconds)

    def upstream_failed(self, to: str) -> None:
        self.upstream_failures[to] = self.upstream_failures.get(to, 0) + 1


class Upstream:
    """One recursor: its address, its health, and its UDP socket."""

    __slots__ = ("text", "host", "port", "fails", "healthy", "loop", "channel", "lock", "probe", "loop_check",
                 "last_loop_check")

    def __init__(self, text: str) -> None:
        self.text = text  # "ip:port" or "[v6]:port", as config normalises it
        host, _, port = text.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self.fails = 0
        self.healthy = True
        self.loop: str | None = None  # why this recursor is a loop; it is never used while set
        self.channel: _UdpChannel | None = None
        self.lock = asyncio.Lock()
        self.probe: asyncio.Task[None] | None = None
        self.loop_check: asyncio.Task[None] | None = None
        self.last_loop_check = float("-inf")

    def __repr__(self) -> str:
        state = "loop" if self.loop else "up" if self.healthy else "down"
        return f"<Upstream {self.text} {state}>"


@dataclass(slots=True)
class _Fetched:
    """What one upstream exchange produced for everyone waiting on it."""

    stored: Stored | None  # None: not rewritable; ``raw`` goes out as it came
    raw: bytes
    entry: Entry | None  # the cache entry it became, if it was cached


class Forwarder:
    """Resolves names outside our domains through ``config.recursors``.

    ``clock`` is the cache's clock (seconds, monotonic); ``rng`` picks upstream query IDs and the
    random strategy's order (default: :class:`random.SystemRandom`, because query IDs are a
    defence against spoofed replies, RFC 5452 §9.2). Call :meth:`start` once the DNS listener is
    up (the loop probes need it to be able to come back to us) and :meth:`stop` at shutdown.
    """

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        probe_interval: float = PROBE_INTERVAL,
    ) -> None:
        self.clock = clock
        self.rng = rng if rng is not None else random.SystemRandom()
        self.probe_interval = probe_interval
        self.stats = ForwardStats()
        self.upstreams: tuple[Upstream, ...] = ()
        self.cache: ResponseCache | None = None
        self._started = False
        self._tasks: set[asyncio.Task[Any]] = set()  # probes, loop checks, fetches
        self._flights: dict[tuple[Any, ...], asyncio.Task[_Fetched | None]] = {}
        self._fetching = 0  # upstream fetches in flight (the bounded quantity)
        # (upstream query ID, qname, qtype) of every query we have out, to notice one coming
        # back to us through a packet-level loop; and the random names of loop probes.
        self._sent: dict[tuple[int, str, int], Upstream] = {}
        self._probe_names: dict[str, Upstream] = {}
        self._acl_seen: dict[str, bool] = {}
        self._apply(config)

    # --- configuration -----------------------------------------------------------------

    def _apply(self, config: Config) -> None:
        dns = config.dns_config
        self.strategy = dns.recursor_strategy
        self.timeout = float(dns.recursor_timeout) or 2.0  # "0s" would fail every query; Consul's default
        self.max_concurrent = int(dns.recursor_max_concurrent)
        self._nets: tuple[_NET, ...] = tuple(ipaddress.ip_network(c, strict=False) for c in dns.allow_recursion)
        self._acl_seen = {}
        size = int(dns.recursor_cache_size)
        stale = float(dns.recursor_serve_stale)
        cache = self.cache
        if size <= 0:
            self.cache = None
        elif cache is None or cache.maxsize != size or cache.max_stale != stale:
            self.cache = ResponseCache(size, clock=self.clock, max_stale=stale)
        old = {u.text: u for u in self.upstreams}
        ups = []
        for text in config.recursors:
            up = old.pop(text, None) or Upstream(text)
            up.loop = _self_loop(up, config)
            if up.loop:
                log.error("forward: recursor %s is this agent's own DNS address (%s); not used", text, up.loop)
            ups.append(up)
        self.upstreams = tuple(ups)
        for gone in old.values():
            self._retire(gone)

    def reload(self, config: Config) -> None:
        """Apply a new config: recursors (kept ones keep their health and sockets), strategy,
        timeout, bounds, ACL. A changed cache size or stale window empties the cache. A
        recursor dropped for a loop gets a fresh check: a reload is how an operator says "fixed".
        """
        known = {u.text for u in self.upstreams if u.loop is None}
        for up in self.upstreams:
            up.loop = None
        self._apply(config)
        if self._started:
            for up in self.upstreams:
                if not up.loop and up.text not in known:  # new, or dropped for a loop before
                    self._spawn_loop_check(up, force=True)

    @property
    def enabled(self) -> bool:
        """Whether any recursor is configured (Consul: RA and forwarding only then)."""
        return bool(self.upstreams)

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Send each recursor a loop probe (in the background; the first queries need not wait)."""
        self._started = True
        for up in self.upstreams:
            if not up.loop:
                self._spawn_loop_check(up, force=True)
                if not up.healthy and (up.probe is None or up.probe.done()):
                    up.probe = self._spawn(self._probe(up))  # out of rotation before a stop()

    async def stop(self) -> None:
        """Cancel probes and fetches in flight; close every upstream socket."""
        self._started = False
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for up in self.upstreams:
            if up.channel is not None:
                up.channel.close()
                up.channel = None

    def _retire(self, up: Upstream) -> None:
        for task in (up.probe, up.loop_check):
            if task is not None:
                task.cancel()
        if up.channel is not None:
            up.channel.retire()
            up.channel = None

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- who may recurse ---------------------------------------------------------------

    def allowed(self, client_ip: str) -> bool:
        """Whether *client_ip* may have names outside our domains resolved (``allow_recursion``).

        Catalog names are answered to everyone; recursion only to these networks, so that an
        agent reachable from the Internet is not an open resolver (amplification, cache
        poisoning: anchors.md §4.2; BIND's default is ``allow-recursion { localnets; localhost; }``).
        An IPv4-mapped IPv6 address is judged as its IPv4 address.
        """
        seen = self._acl_seen.get(client_ip)
        if seen is not None:
            return seen
        try:
            addr: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(client_ip.split("%", 1)[0])
        except ValueError:
            result = False
        else:
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
            result = any(addr in net for net in self._nets)
        if len(self._acl_seen) >= 4096:
            self._acl_seen.clear()  # bounded: a scan from many addresses only costs re-checks
        self._acl_seen[client_ip] = result
        return result

    # --- answering ---------------------------------------------------------------------

    @property
    def saturated(self) -> bool:
        """True when :attr:`max_concurrent` fetches are in flight: a new one would be REFUSED.

        Lets the server answer :meth:`reject` inline instead of making a task for the query.
        """
        return self._fetching >= self.max_concurrent

    def reject(self, query: Query) -> bytes:
        """REFUSED (with RA) for a query over the in-flight bound, counted in ``stats.rejected``.

        REFUSED rather than SERVFAIL, as CoreDNS's ``max_concurrent``: the client should ask
        another server now, and the recursors are not to blame.
        """
        self.stats.rejected += 1
        return error_reply(query, Rcode.REFUSED, ra=True)

    def lookup(self, query: Query) -> bytes | None:
        """The reply from a fresh cache entry, or None. Synchronous: the server may call it
        inline and make a task only for a miss. Does not check :meth:`allowed`."""
        cache = self.cache
        if cache is None:
            return None
        key = cache_key(query)
        if key is None:
            return None
        hit = cache.get(key)
        if hit is None or not hit[1]:
            return None
        entry = hit[0]
        if entry.stored.qlen != len(query.question):
            return None
        self.stats.requests += 1
        self.stats.cache_hits += 1
        return render(entry.stored, query, age=entry.age(self.clock()), cached=True)

    async def resolve(self, query: Query, raw: bytes) -> bytes:
        """The complete reply to *query* (whose request bytes are *raw*), for the client.

        Never raises (but may be cancelled). Always the client's ID and question; RA set;
        an OPT if and only if the client sent one. In order: REFUSED (RA clear) without
        recursors; SERVFAIL for a query that is our own come back (a loop); REFUSED (RA clear)
        for a client outside ``allow_recursion``; a fresh cache entry; a recent SERVFAIL mark (stale answer
        if there is one, else SERVFAIL); REFUSED over the in-flight bound (unless a stale answer
        can be given); the recursors in order, joined with an identical query already in flight;
        if they all fail, a stale answer (RFC 8767) or SERVFAIL.
        """
        stats = self.stats
        stats.requests += 1
        if not self.upstreams:
            # Consul without recursors: out-of-zone names are REFUSED, RA clear (spec §1.2).
            return error_reply(query, Rcode.REFUSED, ra=False)
        looped = self._came_back(query)
        if looped is not None:
            return looped
        client = query.client[0] if query.client else ""
        if client and not self.allowed(client):
            # The server should have refused already; this keeps us closed if it did not.
            stats.refused_clients += 1
            return error_reply(query, Rcode.REFUSED, ra=False)

        cache = self.cache
        key = cache_key(query) if cache is not None else None
        stale: Entry | None = None
        if key is not None and cache is not None:
            hit = cache.get(key)
            if hit is not None and hit[0].stored.qlen == len(query.question):
                entry, fresh = hit
                if fresh:
                    stats.cache_hits += 1
                    return render(entry.stored, query, age=entry.age(self.clock()), cached=True)
                stale = entry
            if cache.servfail(key):
                # Every recursor failed for this name a moment ago: do not ask again yet
                # (RFC 8767 §5 failure recheck), but never let that hide a good answer.
                return self._fail(query, stale)
        stats.cache_misses += 1

        flight = None if key is None else (*key, query.tcp, query.edns is not None)
        task = self._flights.get(flight) if flight is not None else None
        if task is None:
            if self._fetching >= self.max_concurrent:
                if stale is not None:
                    return self._serve_stale(query, stale)
                return self.reject(query)
            task = self._start_fetch(query, raw, key, flight)
        else:
            stats.coalesced += 1
        try:
            if stale is None:
                fetched = await asyncio.shield(task)
            else:
                # RFC 8767 §5: with a stale answer at hand, the client waits at most the
                # "client response timer"; the fetch goes on and refreshes the cache.
                fetched = await asyncio.wait_for(asyncio.shield(task), STALE_ANSWER_WAIT)
        except TimeoutError:
            return self._serve_stale(query, stale)  # type: ignore[arg-type]
        if fetched is None:
            return self._fail(query, stale)
        return self._reply(fetched, query)

    def _reply(self, fetched: _Fetched, query: Query) -> bytes:
        stored = fetched.stored
        if stored is not None and stored.qlen == len(query.question):
            return render(stored, query)
        # Passed through as it came (see NotRewritable), with the client's ID and question
        # spelling; RA is ours to say.
        raw = fetched.raw
        qlen = len(query.question)
        flags = _U16.unpack_from(raw, 2)[0] | FLAG_RA
        return _U16.pack(query.id) + _U16.pack(flags) + raw[4:12] + query.question + raw[12 + qlen :]

    def _serve_stale(self, query: Query, entry: Entry) -> bytes:
        self.stats.stale_served += 1
        return render(entry.stored, query, stale=True, cached=True)

    def _fail(self, query: Query, stale: Entry | None) -> bytes:
        if stale is not None:
            return self._serve_stale(query, stale)
        self.stats.servfail += 1
        # Consul: all recursors failed -> SERVFAIL with RA set (spec §1.15).
        return error_reply(query, Rcode.SERVFAIL, ra=True)

    # --- fetching ----------------------------------------------------------------------

    def _start_fetch(
        self, query: Query, raw: bytes, key: CacheKey | None, flight: tuple[Any, ...] | None
    ) -> asyncio.Task[_Fetched | None]:
        self._fetching += 1
        task = self._spawn(self._fetch(query, raw, key))
        if flight is not None:
            self._flights[flight] = task

        def done(t: asyncio.Task[Any]) -> None:
            self._fetching -= 1
            if flight is not None and self._flights.get(flight) is t:
                del self._flights[flight]

        task.add_done_callback(done)
        return task

    async def _fetch(self, query: Query, raw: bytes, key: CacheKey | None) -> _Fetched | None:
        """Ask the recursors in turn; cache and return the first usable reply, None if none."""
        qkey = question_key(query.question)
        keep_ecs = query.edns is not None and query.edns.ecs is not None
        for up in self._rotation():
            started = time.perf_counter()
            try:
                reply = await self._exchange(up, raw, qkey, query.qname, query.qtype, tcp=query.tcp)
            except _FAILURES as exc:
                self.stats.upstream_errors += 1
                self.stats.upstream_failed(up.text)
                self._failed(up, exc)
                continue
            rcode = reply[3] & 0xF
            self.stats.observe_upstream(up.text, rcode, time.perf_counter() - started)
            self._answered(up)
            if rcode != Rcode.NOERROR and rcode != Rcode.NXDOMAIN:
                # SERVFAIL, REFUSED, FORMERR, NOTIMP: the next recursor may do better
                # (hashicorp/consul#3640, #4426: Consul once returned the first one's SERVFAIL).
                self.stats.upstream_failovers += 1
                continue
            try:
                stored = parse_reply(reply, keep_ecs=keep_ecs)
            except NotRewritable:
                return _Fetched(None, reply, None)
            except MalformedReply:
                self.stats.upstream_malformed += 1
                continue
            entry = None
            if key is not None and self.cache is not None:
                entry = self.cache.put(key, stored)
            return _Fetched(stored, reply, entry)
        if key is not None and self.cache is not None:
            self.cache.mark_servfail(key)
        return None

    def _rotation(self) -> list[Upstream]:
        """The recursors to try for one query, in order.

        Config order, or a fresh random permutation per query (Consul's ``recursor_strategy``);
        those out of rotation are left out while any other is healthy, so that a dead first
        recursor does not cost every query its timeout. When none is healthy all are tried:
        one of them answering is how the rotation comes back soonest. Loops are never tried.
        """
        ups = [u for u in self.upstreams if u.loop is None]
        if self.strategy == "random" and len(ups) > 1:
            ups = self.rng.sample(ups, len(ups))
        healthy = [u for u in ups if u.healthy]
        return healthy or ups

    def _failed(self, up: Upstream, exc: BaseException) -> None:
        up.fails += 1
        if up.healthy and up.fails >= MAX_FAILS:
            up.healthy = False
            log.warning(
                "forward: recursor %s failed %d times in a row (%s); out of rotation, probing every %gs",
                up.text, up.fails, _describe(exc), self.probe_interval,
            )
            if self._started and (up.probe is None or up.probe.done()):
                up.probe = self._spawn(self._probe(up))

    def _answered(self, up: Upstream) -> None:
        up.fails = 0
        if not up.healthy:
            self._recovered(up)

    def _recovered(self, up: Upstream) -> None:
        up.healthy = True
        up.fails = 0
        log.info("forward: recursor %s answers again; back in rotation", up.text)
        if self.cache is not None:
            self.cache.clear_servfail()  # fresh answers replace stale ones from the next query on
        if up.probe is not None and up.probe is not asyncio.current_task():
            up.probe.cancel()
        up.probe = None
        if self._started:
            self._spawn_loop_check(up, force=True)

    async def _probe(self, up: Upstream) -> None:
        """Ask ``. NS`` every probe interval until *up* answers anything (CoreDNS forward)."""
        name_q = _question(".", Qtype.NS)
        qkey = question_key(name_q)
        while not up.healthy and up.loop is None:
            await asyncio.sleep(self.probe_interval)
            if up.healthy:
                return
            try:
                await self._exchange(up, _request(self._new_id(), name_q), qkey, ".", Qtype.NS, tcp=False)
            except _FAILURES:
                self.stats.probes_failed += 1
                self.stats.upstream_failed(up.text)
                continue
            self._recovered(up)
            return

    # --- upstream exchanges ------------------------------------------------------------

    def _new_id(self) -> int:
        return self.rng.getrandbits(16)

    async def _exchange(self, up: Upstream, raw: bytes, qkey: bytes, qname: str, qtype: int, *, tcp: bool) -> bytes:
        """Send *raw* (a request) to *up* under a fresh random ID; return its reply bytes.

        Raises TimeoutError after ``recursor_timeout``, OSError/EOFError on network errors.
        The reply's ID is ours, not the client's; its question matches *qkey*.
        """
        async with asyncio.timeout(self.timeout):
            if tcp:
                return await self._exchange_tcp(up, raw, qkey, qname, qtype)
            channel = up.channel
            if channel is None or not channel.usable():
                channel = await self._open_channel(up)
            uid, fut = channel.reserve(self.rng, qkey)
            sent = (uid, qname, qtype)
            self._sent[sent] = up
            try:
                channel.send(_U16.pack(uid) + raw[2:])
                return await fut
            finally:
                channel.release(uid, fut)
                if self._sent.get(sent) is up:
                    del self._sent[sent]

    async def _open_channel(self, up: Upstream) -> _UdpChannel:
        async with up.lock:  # one socket per recursor, even when many queries find it missing
            channel = up.channel
            if channel is not None and channel.usable():
                return channel
            if channel is not None:
                channel.retire()  # closes once its replies are in
            loop = asyncio.get_running_loop()
            _transport, channel = await loop.create_datagram_endpoint(
                lambda: _UdpChannel(self.stats, loop.time() + CHANNEL_LIFETIME), remote_addr=(up.host, up.port)
            )
            up.channel = channel
            return channel

    async def _exchange_tcp(self, up: Upstream, raw: bytes, qkey: bytes, qname: str, qtype: int) -> bytes:
        uid = self._new_id()
        sent = (uid, qname, qtype)
        reader, writer = await asyncio.open_connection(up.host, up.port)
        self._sent[sent] = up
        try:
            writer.write(_U16.pack(len(raw)) + _U16.pack(uid) + raw[2:])
            await writer.drain()
            while True:  # RFC 7766 §7: replies may come in any order; ours has our ID
                (length,) = _U16.unpack(await reader.readexactly(2))
                reply = await reader.readexactly(length)
                if _matches(reply, uid, qkey):
                    return reply
                self.stats.mismatched_replies += 1
        finally:
            if self._sent.get(sent) is up:
                del self._sent[sent]
            writer.close()

    # --- loops -------------------------------------------------------------------------

    def _came_back(self, query: Query) -> bytes | None:
        """SERVFAIL if *query* is one of ours come back through a recursor (a forwarding loop).

        Two signs: the random name of a loop probe (CoreDNS *loop*: nobody else asks it), which
        takes the recursor out of rotation; or the ID, name and type of a query we have out
        (a packet-level loop, an iptables redirect back to us), which is only a hint - the ID
        is 16 bits - so it answers this copy SERVFAIL, ending the loop, and sends a probe.
        """
        up = self._probe_names.get(query.qname)
        if up is not None:
            self._mark_loop(up, f"our loop probe {query.qname} came back from {query.client[0] or 'a client'}")
            return error_reply(query, Rcode.SERVFAIL, ra=True)
        up = self._sent.get((query.id, query.qname, query.qtype))
        if up is not None:
            self._spawn_loop_check(up)
            return error_reply(query, Rcode.SERVFAIL, ra=True)
        return None

    def _mark_loop(self, up: Upstream, why: str) -> None:
        if up.loop is not None:
            return
        up.loop = why
        self.stats.loops_detected += 1
        log.error(
            "forward: forwarding loop through recursor %s (%s): it sends names we forward back to this "
            "agent; dropped from rotation. Make it stop forwarding to us (e.g. a ~consul or in-addr.arpa "
            "rule sending everything here) and reload.",
            up.text, why,
        )
        if up.probe is not None:
            up.probe.cancel()
            up.probe = None

    def _spawn_loop_check(self, up: Upstream, *, force: bool = False) -> None:
        now = self.clock()
        if up.loop_check is not None and not up.loop_check.done():
            return
        if not force and now - up.last_loop_check < LOOP_CHECK_SPACING:
            return
        up.last_loop_check = now
        up.loop_check = self._spawn(self._check_loop(up))

    async def _check_loop(self, up: Upstream) -> None:
        """Ask *up* two random names we would forward ourselves: ``<r>.<r>.`` (HINFO, as CoreDNS
        does) and a random name in ``10.in-addr.arpa.`` (PTR, hashicorp/consul#1800). If either
        reaches our own listener, :meth:`_came_back` marks *up* as a loop."""
        r = self.rng
        probes = (
            (f"{r.getrandbits(64):016x}.{r.getrandbits(64):016x}.", _TYPE_HINFO),
            (f"{r.randrange(256)}.{r.randrange(256)}.{r.randrange(256)}.{_LOOP_PROBE_REVERSE}", int(Qtype.PTR)),
        )
        for name, qtype in probes:
            q = _question(name, qtype)
            self._probe_names[name] = up
            try:
                await self._exchange(up, _request(self._new_id(), q), question_key(q), name, qtype, tcp=False)
            except _FAILURES:
                pass  # health is judged by real traffic and the probes; this only looks for loops
            finally:
                self._probe_names.pop(name, None)
            if up.loop is not None:
                return


class _UdpChannel(asyncio.DatagramProtocol):
    """One connected UDP socket to one recursor; replies matched by ID and question."""

    def __init__(self, stats: ForwardStats, expires: float) -> None:
        self.stats = stats
        self.expires = expires
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: dict[int, tuple[asyncio.Future[bytes], bytes]] = {}
        self.retired = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def usable(self) -> bool:
        return (
            self.transport is not None
            and not self.retired
            and asyncio.get_running_loop().time() < self.expires
            and len(self.pending) < 60000  # IDs would get scarce; a fresh socket has all 65536
        )

    def reserve(self, rng: random.Random, qkey: bytes) -> tuple[int, asyncio.Future[bytes]]:
        pending = self.pending
        while True:
            uid = rng.getrandbits(16)
            if uid not in pending:
                break
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        pending[uid] = (fut, qkey)
        return uid, fut

    def send(self, data: bytes) -> None:
        if self.transport is None:
            raise ConnectionResetError("upstream socket closed")
        self.transport.sendto(data)

    def release(self, uid: int, fut: asyncio.Future[bytes]) -> None:
        item = self.pending.get(uid)
        if item is not None and item[0] is fut:
            del self.pending[uid]
        if self.retired and not self.pending:
            self.close()

    def retire(self) -> None:
        """Take no new queries; close once the ones out are answered or timed out."""
        self.retired = True
        if not self.pending:
            self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def datagram_received(self, data: bytes, addr: Any) -> None:  # type: ignore[override]
        # The socket is connected, so the kernel only hands us datagrams from the recursor.
        if len(data) < 12 or not data[2] & 0x80:
            return
        item = self.pending.get(data[0] << 8 | data[1])
        if item is None:
            self.stats.mismatched_replies += 1  # late (timed out) or forged
            return
        fut, qkey = item
        if not _question_matches(data, qkey):
            self.stats.mismatched_replies += 1  # RFC 5452 §9.1: ID *and* question must match
            return
        del self.pending[data[0] << 8 | data[1]]
        if not fut.done():
            fut.set_result(data)

    def error_received(self, exc: Exception) -> None:
        # On a connected socket an ICMP error (port unreachable: nothing listens there) comes
        # back as ECONNREFUSED: every query out on this socket has failed; move on at once
        # rather than wait for the timeout.
        for fut, _ in self.pending.values():
            if not fut.done():
                fut.set_exception(OSError(exc.errno if isinstance(exc, OSError) else 0, str(exc)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        for fut, _ in self.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionResetError("upstream socket closed"))


def _matches(reply: bytes, uid: int, qkey: bytes) -> bool:
    return len(reply) >= 12 and _U16.unpack_from(reply, 0)[0] == uid and reply[2] & 0x80 != 0 and (
        _question_matches(reply, qkey)
    )


def _question_matches(reply: bytes, qkey: bytes) -> bool:
    question = reply_question(reply)
    if question is None:
        # Some servers answer FORMERR/SERVFAIL/NOTIMP/REFUSED without the question. Such a
        # reply is only ever a reason to move on, never an answer, so accepting it on the ID
        # alone lets us fail over at once instead of after the timeout.
        return reply[4:6] == b"\x00\x00" and (reply[3] & 0xF) in (1, 2, 4, 5)
    return question_key(question) == qkey


def _question(name: str, qtype: int) -> bytes:
    labels = [label for label in name.rstrip(".").split(".") if label] if name != "." else []
    wire = b"".join(bytes([len(label)]) + label.encode("ascii") for label in labels) + b"\x00"
    return wire + struct.pack("!HH", qtype, 1)


def _request(uid: int, question: bytes) -> bytes:
    return header(uid, FLAG_RD, 1, 0, 0, 0) + question


def _self_loop(up: Upstream, config: Config) -> str | None:
    """Why *up* is statically this agent's own DNS listener, or None."""
    port = config.dns_port
    if port <= 0 or up.port != port:
        return None
    try:
        host = ipaddress.ip_address(up.host)
        bind = ipaddress.ip_address(config.dns_bind)
    except ValueError:
        return None
    if host == bind:
        return f"{config.dns_bind} port {port}"
    if bind.is_unspecified and (host.is_loopback or host.is_unspecified):
        return f"{config.dns_bind} port {port}, which includes {up.host}"
    return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

