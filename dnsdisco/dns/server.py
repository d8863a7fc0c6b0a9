"""The DNS listeners: one UDP socket and one TCP socket on the same address and port.

This module owns sockets and framing, and the bounds that keep a busy or hostile network from
costing us memory: drop UDP when the send buffer is full, past capacity answer the newest UDP
queries and shed the oldest (``SHED_DEPTH``), cap TCP connections, close idle ones (a complete
query is activity, a trickle of bytes is not), stop reading from a connection whose replies
are not being read. With
``dns_config.rate_limit`` every UDP reply on its way out, whatever produced it, goes through
:meth:`dnsdisco.dns.rrl.RateLimiter.filter` (sent, slipped or dropped); TCP never does. It
knows nothing about Consul: each request goes through :func:`dnsdisco.dns.wire.parse` and then to the answer
table's ``respond(query)``; names the table does not own go to ``forwarder`` (the recursor,
plugged in later) or get REFUSED. Catalog names are answered inline, in the socket callback,
without creating a task: the table answers from pre-rendered bytes in a few microseconds and a
task per packet would cost more than the answer.

UDP is read straight from the socket in the loop's readiness callback, up to ``UDP_BATCH``
datagrams per wake-up, and answered with a non-blocking ``sendto`` whose failure (a full send
buffer) drops the reply: no transport, no write queue. asyncio's datagram transport reads one
datagram per loop iteration; measured with bench/dns_fastpath.py on one pinned core, reading
directly cuts the server's CPU per query from 15.8 to 12.1 µs on asyncio (uvloop, which already
reads in batches: 12.6 -> 12.4 µs). Loops without ``add_reader`` (Windows' proactor) fall back
to a ``DatagramProtocol`` answering inside ``datagram_received``.
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import logging
import os
import random
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
from itertools import repeat
from dataclasses import dataclass, field
from typing import Any, Protocol

from dnsdisco.config import Config
from dnsdisco.dns.message import Qtype, Query, Rcode
from dnsdisco.dns.rr import wire_name
from dnsdisco.dns.rrl import RateLimitCounters, RateLimiter
from dnsdisco.dns.table import Chase
from dnsdisco.dns.wire import error_reply, parse
from dnsdisco.metrics import DURATION_BUCKETS, SIZE_BUCKETS, SOURCES, FixedHistogram, is_named_type, type_label

__all__ = ["AnswerSource", "DnsServer", "DnsStats", "Forwarder"]

log = logging.getLogger(__name__)
query_log = logging.getLogger("dnsdisco.dns.query")

_U16 = struct.Struct("!H")

# UDP datagrams read per readiness callback: amortises the loop's wake-up over many packets
# while keeping one callback under ~0.5 ms, so TCP and HTTP on the same loop are not starved.
UDP_BATCH = 64
# Overload (a full batch and more waiting): the reader drains the socket into a stack of at
# most SHED_DEPTH datagrams, evicting the oldest, and answers it newest first, one batch per
# loop iteration (CoreDNS's shed plugin: a bounded LIFO of 1024; anchors.md §0). Reading and
# dropping a datagram costs ~1 µs, answering one ~12: past capacity, the answers go to queries
# sent a few ms ago instead of to the oldest of the kernel's queue (~100 ms of it at 80 k qps),
# and the excess is dropped and counted (``dropped_total{reason="shed"}``).
SHED_DEPTH = 1024
# Reads per drain: bounds one callback (~5 ms) should datagrams arrive as fast as we read them.
SHED_DRAIN_MAX = 8192
# Stacked datagrams older than this are dropped (counted as shed) rather than answered: LIFO
# leaves the oldest at the bottom while the overload lasts, and by now their clients have
# retried or given up (stub resolvers retry after 1-5 s; dnsperf and dig wait 5 s).
SHED_MAX_AGE = 1.0
# UDP fallback (DatagramProtocol): above this many bytes waiting in the transport's send
# buffer, new queries are dropped instead of answered: a UDP client retries, and a queue we
# cannot drain only adds latency and memory (aiohttp/CoreDNS "drop on overload"; anchors.md
# §4.3 point 5). The direct reader never queues at all: a full kernel buffer drops the reply.
UDP_WRITE_HIGH = 256 * 1024
# The kernel's receive buffer absorbs bursts while the loop is busy; the kernel caps the
# request at net.core.rmem_max, so asking for more is harmless.
UDP_RCVBUF = 4 * 1024 * 1024
# TCP: above this many unsent bytes on a connection, stop reading its queries until the client
# reads its replies; a reply is at most 64 KiB + 2, so this holds a few full-size replies.
TCP_WRITE_HIGH = 256 * 1024
TCP_BACKLOG = 512
# Distinct exception kinds logged with a traceback; later ones are only counted.
_MAX_LOGGED_KINDS = 64
_EPHEMERAL_BIND_ATTEMPTS = 20
# Distinct keys a reply-count table may grow to before it is folded (see DnsStats.fold): far
# above what real traffic makes (a few per query type in use), far below a memory concern.
REPLY_KEYS_MAX = 8192
# The DatagramProtocol fallback has no batches; it times one request in this many.
_FALLBACK_SAMPLE = 16

_clock = time.perf_counter
_random = random.random


class AnswerSource(Protocol):
    """What the server needs from the answer table (``dnsdisco.dns.table.AnswerTable``).

    A table may also have a ``memo`` (:class:`dnsdisco.dns.memo.ReplyMemo`); the server then
    answers requests found in it without parsing them, and passes ``key`` (the request's bytes
    after the ID) to ``respond`` so the table can fill it.
    """

    def respond(self, query: Query) -> bytes | None:
        """Complete reply bytes for an in-zone name, or None when the name is not ours."""
        ...


class Forwarder(Protocol):
    """What the server needs from the recursor (``dnsdisco.forward.Forwarder``).

    ``data`` is the client's request exactly as received (Consul re-sends it unchanged).
    """

    @property
    def enabled(self) -> bool: ...

    @property
    def saturated(self) -> bool: ...

    def allowed(self, client_ip: str) -> bool: ...

    def lookup(self, query: Query) -> bytes | None: ...

    def reject(self, query: Query) -> bytes: ...

    async def resolve(self, query: Query, data: bytes) -> bytes: ...


def _reply_tables() -> dict[tuple[str, str], dict[int, int]]:
    return {(proto, source): {} for proto in ("udp", "tcp") for source in SOURCES}


@dataclass(slots=True)
class DnsStats:
    """Plain counters, read at scrape time by :mod:`dnsdisco.metrics` (incrementing an int in
    a dict is all the hot path can afford; a labelled prometheus_client counter costs 10x).

    Every reply produced is counted once in ``tables[(proto, source)]`` under one int key,
    ``qtype << 24 | rcode << 16 | size`` (see :func:`reply_key`): one dict update per query
    carries the request type, the response code and the size histogram at once, and the
    labels are worked out at scrape time. Forwarded requests are also counted when they
    arrive (``forwarded``), as CoreDNS counts requests before the answer is known.
    """

    udp_requests: int = 0
    tcp_requests: int = 0
    udp_dropped_overload: int = 0  # UDP replies not sent because the send buffer was full
    udp_send_errors: int = 0  # other sendto failures (unreachable client, ...)
    errors: int = 0  # exceptions while answering, each answered SERVFAIL
    tcp_connections: int = 0  # accepted
    tcp_rejected: int = 0  # closed at once: over tcp_max_connections
    tcp_idle_closed: int = 0
    forwards_rejected: int = 0  # over the forwarder's in-flight bound, answered REFUSED
    recursion_refused: int = 0  # out-of-zone names from clients outside allow_recursion
    malformed: int = 0  # dropped unanswered: shorter than a header, or a response sent to us
    udp_shed: int = 0  # UDP requests read under overload and dropped, the oldest first (SHED_DEPTH)
    # The kernel's count of datagrams dropped because our receive buffer was full; read from
    # /proc/net/udp at scrape time (nothing on the hot path). None where there is no such file.
    receive_drops: Callable[[], int] | None = None
    # UDP replies dropped / slipped / only counted by dns_config.rate_limit (dns.rrl); kept
    # here, not in the limiter, so that a reload that rebuilds the limiter keeps the counts.
    rate_limit: RateLimitCounters = field(default_factory=RateLimitCounters)
    tables: dict[tuple[str, str], dict[int, int]] = field(default_factory=_reply_tables)
    forwarded: dict[tuple[str, str], int] = field(default_factory=dict)  # (proto, type label) -> arrivals
    durations: dict[str, FixedHistogram] = field(default_factory=dict)  # type label -> sampled seconds

    @property
    def udp_catalog(self) -> dict[int, int]:
        return self.tables["udp", "catalog"]

    @property
    def tcp_catalog(self) -> dict[int, int]:
        return self.tables["tcp", "catalog"]

    def count(self, proto: str, source: str, qtype: int, reply: bytes) -> None:
        """Count one reply outside the inline fast path (which does the same by hand)."""
        table = self.tables[proto, source]
        key = reply_key(qtype, reply)
        table[key] = table.get(key, 0) + 1
        if len(table) > REPLY_KEYS_MAX:
            self.fold()

    def count_forwarded(self, proto: str, qtype: int) -> None:
        key = (proto, type_label(qtype))
        self.forwarded[key] = self.forwarded.get(key, 0) + 1

    def observe(self, qtype: int, seconds: float) -> None:
        """One sampled request duration."""
        label = type_label(qtype)
        hist = self.durations.get(label)
        if hist is None:
            hist = self.durations[label] = FixedHistogram(DURATION_BUCKETS)
        hist.observe(seconds)

    def fold(self) -> None:
        """Bound the reply tables: query types without a label of their own become 0 ("other")
        and sizes the upper bound of their histogram bucket. What is exported does not change
        (labels and buckets are the same); only the key space shrinks, to at most
        19 types x the rcodes in use x 15 buckets, whatever a client sends."""
        for table in self.tables.values():
            if len(table) <= REPLY_KEYS_MAX // 2:
                continue
            folded: dict[int, int] = {}
            for key, n in table.items():
                qtype, rcode, size = key >> 24, key >> 16 & 0xFF, key & 0xFFFF
                if not is_named_type(qtype):
                    qtype = 0
                i = bisect.bisect_left(SIZE_BUCKETS, size)
                size = SIZE_BUCKETS[i] if i < len(SIZE_BUCKETS) else 0xFFFF
                k = qtype << 24 | rcode << 16 | size
                folded[k] = folded.get(k, 0) + n
            table.clear()
            table.update(folded)

    def replies(self) -> Iterator[tuple[str, str, int, int, int, int]]:
        """Every counted reply group: ``(proto, source, qtype, rcode, size, count)``."""
        for (proto, source), table in self.tables.items():
            for key, n in list(table.items()):
                yield proto, source, key >> 24, key >> 16 & 0xFF, key & 0xFFFF, n

    def dropped(self) -> dict[str, int]:
        """Requests or replies dropped unanswered, by reason (``dnsdisco_dns_dropped_total``)."""
        return {
            "malformed": self.malformed,
            "send_buffer_full": self.udp_dropped_overload,
            "send_error": self.udp_send_errors,
            "tcp_connection_limit": self.tcp_rejected,
            "rate_limit": self.rate_limit.dropped,
            "shed": self.udp_shed,
            "receive_buffer_full": self.receive_drops() if self.receive_drops is not None else 0,
        }


def reply_key(qtype: int, reply: bytes) -> int:
    """The reply-count key: ``qtype << 24 | rcode << 16 | size``, the rcode with its
    extended bits (BADVERS) when the reply has an OPT record."""
    return qtype << 24 | _rcode(reply) << 16 | min(len(reply), 0xFFFF)


def _rcode(reply: bytes) -> int:
    rcode = reply[3] & 0xF
    # The OPT record of our own error replies is the last 11 bytes (root name, type 41, no
    # options); its TTL's first byte holds the upper 8 bits of the rcode (RFC 6891 §6.1.3).
    if len(reply) >= 23 and reply[11] and reply[-11:-8] == b"\x00\x00\x29":
        rcode |= reply[-6] << 4
    return rcode & 0xFF  # the key has 8 bits for it; only BADVERS (16) is ever above 15 here


class DnsServer:
    """UDP and TCP DNS listeners on ``config.dns_bind`` (``addresses.dns``, else ``client_addr``)
    and ``config.dns_port``.

    Port 0 picks one free port shared by both sockets; -1 disables the server (``start`` does
    nothing and ``port`` stays None). ``table.respond`` is called for every well-formed query.
    ``forwarder`` gets the names ``respond`` returns None for, when it has recursors and the
    client is in ``allow_recursion``; otherwise those get REFUSED with RA clear, as Consul does
    without recursors.
    """

    def __init__(self, config: Config, table: AnswerSource, *, forwarder: Forwarder | None = None,
                 metrics: Any = None) -> None:
        self.table = table
        self.forwarder = forwarder
        self.stats = DnsStats()
        # The table's reply memo (dnsdisco.dns.memo), when it keeps one: requests seen before
        # are answered from it without being parsed.
        memo = getattr(table, "memo", None)
        self.memo_udp: dict[bytes, Any] | None = memo.udp if memo is not None else None
        self.memo_tcp: dict[bytes, Any] | None = memo.tcp if memo is not None else None
        self.address: str = config.dns_bind  # addresses.dns, else client_addr
        # The `family` label (CoreDNS: 1 IPv4, 2 IPv6) is the listening socket's: one family
        # per server, so nothing is worked out per query.
        self.family_label = "2" if _family(self.address) == socket.AF_INET6 else "1"
        # dnsdisco.metrics.Metrics: reads ``stats`` when Prometheus scrapes; nothing per query.
        self.metrics = metrics
        if metrics is not None:
            metrics.watch_dns(self)
        self.port: int | None = None
        self._requested_port = config.dns_port
        self._udp: _UdpReader | asyncio.DatagramTransport | None = None
        self._tcp: asyncio.AbstractServer | None = None
        self._connections: set[_TcpConnection] = set()
        self._forwards: set[asyncio.Task[Any]] = set()
        self._logged_kinds: set[tuple[str, str, int]] = set()
        # Read UDP straight from the socket (see the module docstring); False forces the
        # DatagramProtocol fallback (tests run both).
        self.udp_direct = True
        self._apply(config)

    # --- lifecycle ---

    def _apply(self, config: Config) -> None:
        dns = config.dns_config
        self.tcp_idle_timeout = float(dns.tcp_idle_timeout)
        self.tcp_max_connections = int(dns.tcp_max_connections)
        self.query_log = bool(dns.query_log)
        self.recursors = tuple(config.recursors)
        # Response rate limiting (dns.rrl): None when off, so the UDP path pays one `is None`.
        # A reload with the same settings keeps the accounts (and so a flood's penalty).
        rrl_key = (dns.rate_limit, config.domain, config.alt_domain)
        if not dns.rate_limit.enabled:
            self.rrl: RateLimiter | None = None
        elif getattr(self, "_rrl_key", None) != rrl_key or self.rrl is None:
            self.rrl = RateLimiter(dns.rate_limit, (config.domain, config.alt_domain),
                                   counters=self.stats.rate_limit)
        self._rrl_key = rrl_key

    def reload(self, config: Config) -> None:
        """Apply the transport bits of a new config (TCP bounds, query log, recursors).

        The listening address and port are not changed by a reload: that takes a restart.
        Existing TCP connections pick up the new idle timeout at their next timer check.
        """
        if config.dns_bind != self.address or config.dns_port != self._requested_port:
            log.warning("dns: the DNS address/port changed in the config; restart to apply it")
        self._apply(config)
        if isinstance(self._udp, _UdpReader):
            self._udp.query_log = self.query_log

    async def start(self, socks: tuple[socket.socket, socket.socket] | None = None) -> None:
        """Bind UDP and TCP and start serving. Raises OSError if the port cannot be bound.

        *socks* are a bound, non-blocking ``(udp, tcp)`` pair made by someone else (the worker
        pool, :mod:`dnsdisco.workers`, shares the port between processes): they are served as
        they are, and closed by :meth:`stop`.
        """
        if self._requested_port < 0 or self._udp is not None:
            return
        loop = asyncio.get_running_loop()
        family = _family(self.address)
        attempts = _EPHEMERAL_BIND_ATTEMPTS if self._requested_port == 0 else 1
        if socks is not None:
            udp_sock, tcp_sock = socks
            port = udp_sock.getsockname()[1]
            attempts = 0
        for attempt in range(attempts):
            udp_sock = _udp_socket(family, self.address, self._requested_port)
            port = udp_sock.getsockname()[1]
            try:
                tcp_sock = _tcp_socket(family, self.address, port)
            except OSError as exc:
                udp_sock.close()
                # Port 0: the kernel chose a UDP port whose TCP twin is taken; pick again.
                if exc.errno == errno.EADDRINUSE and attempt + 1 < attempts:
                    continue
                raise
            break
        try:
            reader = _UdpReader(self, udp_sock, loop)
            if self.udp_direct and reader.start():
                self._udp = reader
            else:
                udp, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self), sock=udp_sock)
                self._udp = udp  # type: ignore[assignment]
            self._tcp = await loop.create_server(
                lambda: _TcpConnection(self), sock=tcp_sock, backlog=TCP_BACKLOG, start_serving=True
            )
        except BaseException:
            if self._udp is not None:
                self._udp.close()
                self._udp = None
            udp_sock.close()
            tcp_sock.close()
            raise
        self.port = port
        log.info("dns: listening on %s port %d (udp, tcp)", self.address, port)

    async def stop(self) -> None:
        """Close both listeners and every TCP connection; cancel forwarded queries."""
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            for conn in list(self._connections):
                conn.abort()
            await self._tcp.wait_closed()
            self._tcp = None
        for task in list(self._forwards):
            task.cancel()
        if self._forwards:
            await asyncio.gather(*self._forwards, return_exceptions=True)
        # Let the transports' close callbacks run before the loop goes away.
        await asyncio.sleep(0)

    @property
    def tcp_open(self) -> int:
        """TCP connections open now."""
        return len(self._connections)

    # --- answering (shared by UDP and TCP) ---

    def answer(self, data: bytes, client: tuple[str, int], tcp: bool, send: Callable[[bytes], None],
               t0: float = 0.0) -> None:
        """Answer one request: call *send* with the reply now, later (forwarded), or never (dropped).

        A non-zero *t0* (``time.perf_counter()`` when the request was read) samples this
        request for the duration histogram.
        """
        stats = self.stats
        if not tcp and self.rrl is not None:
            send = _rate_limited(self.rrl, client[0], send)  # UDP only: TCP is never limited
        memo = None if self.query_log else self.memo_tcp if tcp else self.memo_udp
        key = None
        if memo is not None:
            key = data[2:]
            m = memo.get(key)
            if m is not None and not m.cell.stale:
                tail = m.tails[int(_random() * len(m.tails))]
                if tail is not None:
                    reply = data[:2] + tail
                    stats.count("tcp" if tcp else "udp", "catalog", m.qtype, reply)
                    send(reply)
                    if t0:
                        stats.observe(m.qtype, _clock() - t0)
                    return
        query = parse(data, tcp=tcp, client=client)
        if query is None:
            stats.malformed += 1
            return
        if query.__class__ is bytes:
            stats.count("tcp" if tcp else "udp", "server", 0, query)  # type: ignore[arg-type]
            send(query)  # type: ignore[arg-type]
            if t0:
                stats.observe(0, _clock() - t0)
            return
        assert isinstance(query, Query)
        try:
            reply = self.table.respond(query) if key is None else self.table.respond(query, key)  # type: ignore[call-arg]
        except Exception as exc:
            reply = self.servfail(query, exc)
        if reply is None:
            reply = self.not_ours(query, data, send, t0)
            if reply is None:
                return
        else:
            if reply.__class__ is Chase and self.chase(query, reply, send, t0):  # type: ignore[arg-type]
                return
            counts = stats.tcp_catalog if tcp else stats.udp_catalog
            key = query.qtype << 24 | (reply[3] & 15) << 16 | len(reply)
            counts[key] = counts.get(key, 0) + 1
            if len(counts) > REPLY_KEYS_MAX:
                stats.fold()
        send(reply)
        if t0:
            stats.observe(query.qtype, _clock() - t0)
        if self.query_log:
            self.log_query(query, reply)

    def not_ours(self, query: Query, data: bytes, send: Callable[[bytes], None], t0: float = 0.0) -> bytes | None:
        """Reply for a name outside our zones: now (REFUSED, a cached or rejected answer), or
        None when a task will send the forwarded answer through *send* (and, if *t0* is set,
        record its duration). The reply is counted here, with its source."""
        fwd = self.forwarder
        stats = self.stats
        proto = "tcp" if query.tcp else "udp"
        if fwd is None or not fwd.enabled:
            # Consul without recursors: REFUSED, no AA, RA clear (spec §1.2, §1.14).
            reply = error_reply(query, Rcode.REFUSED, ra=False)
            stats.count(proto, "server", query.qtype, reply)
            return reply
        if not fwd.allowed(query.client[0]):
            # Not an open resolver: catalog names answer everyone, recursion only the
            # allow_recursion networks (BIND's allow-recursion; anchors.md §4.2).
            stats.recursion_refused += 1
            reply = error_reply(query, Rcode.REFUSED, ra=False)
            stats.count(proto, "server", query.qtype, reply)
            return reply
        cached = fwd.lookup(query)
        if cached is not None:
            stats.count(proto, "cache", query.qtype, cached)
            return cached  # a fresh cache hit costs no task
        stats.count_forwarded(proto, query.qtype)
        if fwd.saturated:
            stats.forwards_rejected += 1
            reply = fwd.reject(query)
            stats.count(proto, "forward", query.qtype, reply)
            return reply
        self._spawn(self._forward(fwd, query, data, send, t0))
        return None

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run *coro* as a task the server tracks, so that stop() can cancel it."""
        task = asyncio.get_running_loop().create_task(coro)
        self._forwards.add(task)
        task.add_done_callback(self._forwards.discard)

    async def _forward(self, fwd: Forwarder, query: Query, data: bytes, send: Callable[[bytes], None],
                       t0: float = 0.0) -> None:
        try:
            reply = await fwd.resolve(query, data)
        except Exception as exc:
            reply = self.servfail(query, exc)
        self.stats.count("tcp" if query.tcp else "udp", "forward", query.qtype, reply)
        send(reply)
        if t0:
            self.stats.observe(query.qtype, _clock() - t0)
        if self.query_log:
            self.log_query(query, reply)

    # --- CNAME targets outside our domains (spec §1.6) ---

    def chase(self, query: Query, reply: Chase, send: Callable[[bytes], None], t0: float = 0.0) -> bool:
        """For a catalog reply whose CNAME chain may end outside our domains: True when a task
        will resolve the target through the recursors and send the completed reply through
        *send*; False when *reply* (the CNAME-only answer) is to be sent now: no recursors, a
        client outside ``allow_recursion``, a full forwarder, or a truncated reply."""
        fwd = self.forwarder
        if fwd is None or not fwd.enabled or fwd.saturated or reply[2] & 0x02:
            return False
        if query.client[0] and not fwd.allowed(query.client[0]):
            return False
        self._spawn(self._chase(fwd, query, reply, send, t0))
        return True

    async def _chase(self, fwd: Forwarder, query: Query, reply: Chase, send: Callable[[bytes], None],
                     t0: float = 0.0) -> None:
        try:
            out = await self._chased(fwd, query, reply)
        except Exception as exc:
            # Never lose the catalog answer: the CNAME alone is still right.
            self.stats.errors += 1
            log.debug("dns: resolving the CNAME target of %s failed: %r", query.qname, exc)
            out = bytes(reply)
        counts = self.stats.tcp_catalog if query.tcp else self.stats.udp_catalog
        key = query.qtype << 24 | (out[3] & 15) << 16 | len(out)
        counts[key] = counts.get(key, 0) + 1
        send(out)
        if t0:
            self.stats.observe(query.qtype, _clock() - t0)
        if self.query_log:
            self.log_query(query, out)

    async def _chased(self, fwd: Forwarder, query: Query, reply: Chase) -> bytes:
        """*reply* with the records of its chain's outside target spliced in, or *reply* as it
        is (CNAME only) when the target is not outside, or the recursors have nothing for it."""
        from dnslib import QTYPE, DNSRecord  # the slow path only

        msg = DNSRecord.parse(reply)
        end, ttl = query.qname.lower(), 0
        for _ in range(len(msg.rr)):  # follow the chain from the question name
            link = next((r for r in msg.rr if r.rtype == QTYPE.CNAME and str(r.rname).lower() == end), None)
            if link is None:
                break
            end, ttl = str(link.rdata.label).lower(), link.ttl
        if end not in reply.targets or any(
            str(r.rname).lower() == end and r.rtype in (QTYPE.A, QTYPE.AAAA) for r in msg.rr
        ):
            return reply
        qtypes = (Qtype.A, Qtype.AAAA) if query.qtype == Qtype.ANY else (query.qtype,)
        answers = await asyncio.gather(*(self._ask(fwd, query, end, t) for t in qtypes))
        added = []
        seen = set()
        for raw in answers:
            if raw is None or raw[3] & 0xF != Rcode.NOERROR:
                continue
            for r in DNSRecord.parse(raw).rr:
                same = (str(r.rname).lower(), r.rtype, str(r.rdata))
                if same in seen:
                    continue  # ANY: the A and AAAA answers repeat the upstream's CNAMEs
                seen.add(same)
                if reply.node:
                    added.append(r)  # node lookups: the recursor's answer, unfiltered (spec §1.6)
                elif r.rtype in (QTYPE.CNAME, QTYPE.A, QTYPE.AAAA):
                    r.ttl = ttl  # service lookups: the service TTL
                    added.append(r)
        if not reply.node and query.edns is None:
            added = added[:5]  # Consul: at most 5 resolved records without EDNS
        if not added:
            return reply
        # The records go right after the chain, before node-meta TXT records (ANY on a node).
        at = next((i for i, r in enumerate(msg.rr) if r.rtype != QTYPE.CNAME), len(msg.rr))
        msg.rr[at:at] = added
        out = msg.pack()
        if len(out) > query.max_size:
            return reply  # the CNAME alone still fits; the client can resolve the target itself
        return out

    async def _ask(self, fwd: Forwarder, query: Query, name: str, qtype: int) -> bytes | None:
        """The forwarder's reply for *name*/*qtype*, asked on behalf of *query*'s client
        (its cache, coalescing, bounds and ACL apply), or None."""
        raw = _U16.pack(query.id) + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
        raw += wire_name(name) + struct.pack("!HH", qtype, 1)
        sub = parse(raw, tcp=False, client=query.client)
        if not isinstance(sub, Query):
            return None
        return await fwd.resolve(sub, raw)

    def servfail(self, query: Query, exc: BaseException) -> bytes:
        """SERVFAIL for *query* after *exc*; logs each kind of failure once, counts them all."""
        self.stats.errors += 1
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = (type(exc).__qualname__, tb.tb_frame.f_code.co_filename if tb else "", tb.tb_lineno if tb else 0)
        if where not in self._logged_kinds and len(self._logged_kinds) < _MAX_LOGGED_KINDS:
            self._logged_kinds.add(where)
            log.error(
                "dns: error answering %s type %d; answering SERVFAIL (further %s here are only counted)",
                query.qname,
                query.qtype,
                where[0],
                exc_info=exc,
            )
        return error_reply(query, Rcode.SERVFAIL, ra=self.forwarder is not None and self.forwarder.enabled)

    def log_query(self, query: Query, reply: bytes) -> None:
        """One line per query; only when ``dns_config.query_log`` is on."""
        rcode = reply[3] & 0xF if len(reply) >= 4 else -1
        query_log.info(
            "client=%s:%s proto=%s id=%d qname=%s qtype=%d rcode=%d size=%d",
            query.client[0] if query.client else "",
            query.client[1] if query.client else "",
            "tcp" if query.tcp else "udp",
            query.id,
            query.qname,
            query.qtype,
            rcode,
            len(reply),
        )


def _rate_limited(rrl: RateLimiter, client_ip: str, send: Callable[[bytes], None]) -> Callable[[bytes], None]:
    """*send* behind the response rate limiter: each reply is sent, slipped or dropped."""
    def limited(reply: bytes) -> None:
        out = rrl.filter(client_ip, reply)
        if out is not None:
            send(out)

    return limited


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _udp_socket(family: socket.AddressFamily, address: str, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
        except OSError:  # pragma: no cover - some platforms refuse; the default will do
            pass
        sock.bind((address, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _tcp_socket(family: socket.AddressFamily, address: str, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # Restarting must not wait for TIME_WAIT connections of the previous process.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class _UdpReader:
    """Answers UDP straight off the socket: up to UDP_BATCH datagrams per readiness callback."""

    def __init__(self, server: DnsServer, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server
        self.sock = sock
        self.loop = loop
        self.query_log = server.query_log
        self.counts = server.stats.udp_catalog
        self.memo = server.memo_udp
        self.reading = False
        # Shed mode (overload): the drained datagrams, newest on the right; while it is on,
        # ``shedding`` is True and the reader runs from call_soon instead of the selector.
        self.stack: deque[tuple[bytes, Any]] = deque(maxlen=SHED_DEPTH)
        self.stacked_at: deque[float] = deque(maxlen=SHED_DEPTH)  # in step with ``stack``
        self.shedding = False

    def start(self) -> bool:
        """Register with the loop; False if the loop cannot watch a socket (proactor loops)."""
        try:
            self.loop.add_reader(self.sock.fileno(), self.on_readable)
        except NotImplementedError:
            return False
        self.reading = True
        self.server.stats.receive_drops = _ReceiveDrops(self.sock)
        return True

    def on_readable(self) -> None:
        # The hot path: keep it flat, with everything it touches in locals. Metrics cost one
        # dict update per reply (DnsStats: type, rcode and size in one int key) and one clock
        # read per batch: the first request of each batch is the duration sample, so an idle
        # server times every request and a saturated one 1 in UDP_BATCH.
        server = self.server
        stats = server.stats
        counts = self.counts
        respond = server.table.respond
        # Shed mode answers from the stack, newest first (see _shed); otherwise from the socket.
        recvfrom = self._pop if self.shedding else self.sock.recvfrom
        sendto = self.sock.sendto
        query_log = self.query_log  # a reload changes it between batches, never during one
        # The memo (dns.memo): replies to requests seen before, by their bytes after the ID.
        # Off while queries are logged (the log needs the parsed query).
        memo = None if query_log else self.memo
        random = _random
        # Response rate limiting (dns.rrl), None when off: one `is None` per reply.
        rrl = server.rrl
        t0 = _clock()
        i = skipped = 0
        try:
            for i in range(UDP_BATCH):
                try:
                    data, addr = recvfrom(65535)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    # An error queued on the socket (ICMP from a vanished client): not ours to fix.
                    skipped += 1
                    continue
                if memo is not None:
                    key = data[2:]
                    m = memo.get(key)
                    if m is not None and not m.cell.stale:
                        tails = m.tails
                        tail = tails[int(random() * len(tails))]
                        if tail is not None:
                            reply = data[:2] + tail
                            k = m.qtype << 24 | (tail[1] & 15) << 16 | len(reply)
                            if rrl is not None:
                                out = rrl.filter(addr[0], reply)
                                if out is None:
                                    continue  # dropped: counted by the limiter, not as a reply
                                reply = out
                            counts[k] = counts.get(k, 0) + 1
                            try:
                                sendto(reply, addr)
                            except (BlockingIOError, InterruptedError):
                                stats.udp_dropped_overload += 1
                            except OSError:
                                stats.udp_send_errors += 1
                            if t0:
                                stats.observe(m.qtype, _clock() - t0)
                                t0 = 0.0
                            continue
                else:
                    key = None
                query = parse(data, tcp=False, client=addr)
                if query is None:
                    stats.malformed += 1
                    continue
                counted = 0  # the reply's counts key, counted once it is sent (not rate-limited)
                if query.__class__ is bytes:
                    reply: bytes | None = query  # type: ignore[assignment]
                    stats.count("udp", "server", 0, reply)  # type: ignore[arg-type]
                else:
                    try:
                        reply = respond(query) if key is None else respond(query, key)  # type: ignore[arg-type,call-arg]
                    except Exception as exc:
                        reply = server.servfail(query, exc)  # type: ignore[arg-type]
                    if reply is None:
                        reply = server.not_ours(query, data, self._sender(addr), t0)  # type: ignore[arg-type]
                        if reply is None:
                            t0 = 0.0  # the forwarding task records the sample
                            continue
                    else:
                        if reply.__class__ is Chase and server.chase(query, reply, self._sender(addr), t0):  # type: ignore[arg-type]
                            t0 = 0.0  # the chasing task records the sample
                            continue
                        counted = query.qtype << 24 | (reply[3] & 15) << 16 | len(reply)  # type: ignore[union-attr]
                if rrl is not None:
                    reply = rrl.filter(addr[0], reply)  # type: ignore[arg-type]
                    if reply is None:
                        continue  # dropped by the rate limiter (counted there)
                if counted:
                    counts[counted] = counts.get(counted, 0) + 1
                try:
                    sendto(reply, addr)
                except (BlockingIOError, InterruptedError):
                    # The kernel's send buffer is full: drop. The client retries; a queue here
                    # would only add latency and memory under overload.
                    stats.udp_dropped_overload += 1
                except OSError:
                    stats.udp_send_errors += 1
                if t0:
                    stats.observe(0 if query.__class__ is bytes else query.qtype, _clock() - t0)  # type: ignore[union-attr]
                    t0 = 0.0
                if query_log and query.__class__ is not bytes:
                    server.log_query(query, reply)  # type: ignore[arg-type]
            i = UDP_BATCH
            if not self.shedding:
                self._shed()  # a full batch: more may be waiting than we can answer
        finally:
            # Datagrams read in this batch, counted once rather than per datagram.
            stats.udp_requests += i - skipped
            if len(counts) > REPLY_KEYS_MAX:
                stats.fold()

    def _sender(self, addr: tuple[str, int]) -> Callable[[bytes], None]:
        def send(reply: bytes) -> None:
            if not self.reading:
                return
            rrl = self.server.rrl
            if rrl is not None:
                out = rrl.filter(addr[0], reply)
                if out is None:
                    return
                reply = out
            try:
                self.sock.sendto(reply, addr)
            except (BlockingIOError, InterruptedError):
                self.server.stats.udp_dropped_overload += 1
            except OSError:
                self.server.stats.udp_send_errors += 1

        return send

    # --- shed mode: past capacity, answer the newest queries and drop the oldest ---

    def _shed(self) -> None:
        """After a full batch: drain the socket into the stack; if that found anything, stop
        watching the socket and answer the stack, a batch per loop iteration, until it is
        empty (``_shed_tick``). The kernel's FIFO queue would otherwise hand us its oldest
        datagrams first, each as old as the whole backlog."""
        self._drain()
        if self.stack and self.reading:
            self.shedding = True
            self.loop.remove_reader(self.sock.fileno())
            self.loop.call_soon(self._shed_tick)

    def _shed_tick(self) -> None:
        if not self.reading:
            return
        try:
            self._drain()
            self.on_readable()
        finally:
            # Even if answering raised (the loop logs it): this chain of call_soon is the only
            # thing reading the socket while shedding, so it must go on or hand back to the
            # selector, or UDP would go deaf until a restart.
            if self.reading:
                if self.stack:
                    self.loop.call_soon(self._shed_tick)  # after whatever else is ready (TCP, HTTP)
                else:
                    self.shedding = False
                    self.loop.add_reader(self.sock.fileno(), self.on_readable)

    def _drain(self) -> None:
        """Read what the socket holds (up to SHED_DRAIN_MAX) onto the stack; the datagrams that
        push the oldest ones out are counted as requests and as shed."""
        got: list[tuple[bytes, Any]] = []
        append = got.append
        recvfrom = self.sock.recvfrom
        try:
            for _ in range(SHED_DRAIN_MAX):
                append(recvfrom(65535))
        except OSError:  # EAGAIN: drained; or an ICMP error queued on the socket: next time
            pass
        stack = self.stack
        stacked_at = self.stacked_at
        now = time.monotonic()
        old = now - SHED_MAX_AGE
        shed = 0
        while stacked_at and stacked_at[0] < old:
            stack.popleft()  # the oldest first: too old to be worth an answer
            stacked_at.popleft()
            shed += 1
        shed += max(0, len(stack) + len(got) - SHED_DEPTH)  # pushed out by the newer ones
        if shed:
            stats = self.server.stats
            stats.udp_shed += shed
            stats.udp_requests += shed  # the answered ones are counted by on_readable
        stack.extend(got)
        stacked_at.extend(repeat(now, len(got)))

    def _pop(self, _size: int) -> tuple[bytes, Any]:
        """on_readable's ``recvfrom`` in shed mode: the newest datagram on the stack."""
        try:
            item = self.stack.pop()
        except IndexError:
            raise BlockingIOError from None
        self.stacked_at.pop()
        return item

    def close(self) -> None:
        if self.reading:
            self.reading = False
            if not self.shedding:
                self.loop.remove_reader(self.sock.fileno())
        self.stack.clear()
        self.stacked_at.clear()
        self.sock.close()


class _ReceiveDrops:
    """The kernel's drop count for one UDP socket (datagrams that found its receive buffer
    full), read from /proc/net/udp or udp6 at scrape time: the ``drops`` column of the row
    whose inode is the socket's. Keeps the last value seen, so that it does not fall back to 0
    when the socket is closed (the count is exported as a counter)."""

    def __init__(self, sock: socket.socket) -> None:
        self.path = "/proc/net/udp6" if sock.family == socket.AF_INET6 else "/proc/net/udp"
        try:
            self.inode = str(os.fstat(sock.fileno()).st_ino)
        except OSError:  # pragma: no cover
            self.inode = ""
        self.last = 0

    def __call__(self) -> int:
        if not self.inode:
            return self.last
        try:
            with open(self.path) as f:
                next(f, None)
                for line in f:
                    cols = line.split()
                    if len(cols) > 12 and cols[9] == self.inode:
                        self.last = max(self.last, int(cols[12]))
                        break
        except (OSError, ValueError):
            pass  # not Linux, or no /proc: 0 (the other reasons still count)
        return self.last


class _UdpProtocol(asyncio.DatagramProtocol):
    """The fallback for loops without ``add_reader``: answers inside ``datagram_received``."""

    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.stats = server.stats
        self.sample = 1
        self.transport: asyncio.DatagramTransport | None = None
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=UDP_WRITE_HIGH)  # type: ignore[attr-defined]

    # The transport tells us when its send buffer crosses the limits (flow control).
    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        # The fallback, not the hot path (the direct reader is): answer through the server's
        # shared per-request code, which TCP uses too.
        stats = self.stats
        if self.paused:
            stats.udp_dropped_overload += 1
            return
        stats.udp_requests += 1
        self.sample -= 1
        t0 = 0.0
        if not self.sample:
            self.sample = _FALLBACK_SAMPLE
            t0 = _clock()
        self.server.answer(data, addr, False, self._sender(addr), t0)

    def _sender(self, addr: tuple[str, int]) -> Callable[[bytes], None]:
        def send(reply: bytes) -> None:
            transport = self.transport
            if transport is None or transport.is_closing():
                return
            if self.paused:
                self.stats.udp_dropped_overload += 1
                return
            transport.sendto(reply, addr)

        return send

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a client that went away, and the like: nothing to do.
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class _TcpConnection(asyncio.Protocol):
    """One TCP client: 2-byte length framing (RFC 1035 §4.2.2), pipelined (RFC 7766 §6.2.1)."""

    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.peer: tuple[str, int] = ("", 0)
        self.buffer = bytearray()
        self.write_paused = False
        self.last_activity = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self.server
        if len(server._connections) >= server.tcp_max_connections:
            # Over the bound: close at once rather than hold memory for it (RFC 7766 §6.2.2
            # lets a server limit its connections; the client falls back or retries).
            server.stats.tcp_rejected += 1
            transport.abort()
            return
        self.transport = transport  # type: ignore[assignment]
        server._connections.add(self)
        server.stats.tcp_connections += 1
        peer = transport.get_extra_info("peername")
        self.peer = (peer[0], peer[1]) if peer else ("", 0)
        transport.set_write_buffer_limits(high=TCP_WRITE_HIGH)  # type: ignore[attr-defined]
        self.last_activity = self.loop.time()
        self.timer = self.loop.call_later(server.tcp_idle_timeout, self._check_idle)

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return
        # Only a complete query counts as activity (_process), not any byte: a slow-loris
        # client trickling one byte a second is cut at the idle timeout like an idle one
        # (Go's miekg/dns, under Consul, gives each whole message a read deadline).
        self.buffer += data
        self._process()

    def _process(self) -> None:
        buffer = self.buffer
        size = len(buffer)
        pos = 0
        server = self.server
        t0 = _clock()  # the first request of each read is the duration sample (as for UDP)
        # Stop when the client is not reading its replies: the rest waits in the buffer and
        # reading is paused, so one connection's backlog is bounded (resume_writing resumes).
        while not self.write_paused and self.transport is not None:
            if size - pos < 2:
                break
            end = pos + 2 + (buffer[pos] << 8 | buffer[pos + 1])
            if end > size:
                break  # a short read: the rest of the frame comes with the next segment
            message = bytes(buffer[pos + 2 : end])
            pos = end
            server.stats.tcp_requests += 1
            server.answer(message, self.peer, True, self.send, t0)
            t0 = 0.0
        if pos:
            del buffer[:pos]
            self.last_activity = self.loop.time()

    def send(self, reply: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # the client went away before a forwarded answer came back
        if len(reply) > 0xFFFF:  # pragma: no cover - the table caps TCP replies at 65535
            log.error("dns: a %d-byte TCP reply cannot be framed; dropped", len(reply))
            return
        transport.write(_U16.pack(len(reply)) + reply)

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
            self._process()

    def eof_received(self) -> bool | None:
        # The client half-closed after its last query. Every inline answer is already written;
        # close once they are flushed (forwarded answers still in flight are lost, like a
        # client that hung up).
        return None

    def _check_idle(self) -> None:
        transport = self.transport
        if transport is None:
            return
        timeout = self.server.tcp_idle_timeout
        idle = self.loop.time() - self.last_activity
        if idle < timeout:
            self.timer = self.loop.call_later(timeout - idle, self._check_idle)
            return
        # RFC 7766 §6.2.3: servers close idle connections. A client that never reads its
        # replies is idle too (reading was paused), so abort rather than wait for a flush.
        self.server.stats.tcp_idle_closed += 1
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            self.server._connections.discard(self)
            self.transport = None
        self.buffer.clear()
