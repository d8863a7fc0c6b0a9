"""The cache of forwarded answers: upstream reply bytes in, per-client reply bytes out.

This module owns what the forwarder remembers and how a remembered reply is re-served: the cache
key, the TTL an entry lives for (RFC 2181 §8 minimum over the RRsets, RFC 2308 §5 for negative
answers, capped and floored as CoreDNS's *cache* does), the short-lived SERVFAIL marks, the
RFC 8767 stale window, and :func:`render`, which turns a stored reply into the reply for one
client: the client's ID and question spelling, TTLs decremented by the time spent in the cache
(RFC 1035 §4.1.3 / RFC 2181 §8), and an OPT record that matches the client's request (RFC 6891
§7: one if and only if the client sent one).

It is pure: no sockets, no event loop; time comes from the clock the caller injects. Upstream
replies are walked by hand over :mod:`struct` (like :mod:`dnsdisco.dns.wire`) and kept as bytes:
the section bodies are re-served untouched except for their TTL fields, so a cache hit costs a
copy and a few ``pack_into`` calls, not a DNS library's parse and build.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import TLRUCache, TTLCache

from dnsdisco.dns.message import (
    EDNS_OPTION_ECS,
    FLAG_AA,
    FLAG_CD,
    FLAG_QR,
    FLAG_RA,
    FLAG_RD,
    FLAG_TC,
    OPCODE_MASK,
    Qtype,
    Query,
    Rcode,
    header,
)

__all__ = [
    "CacheKey",
    "Entry",
    "MalformedReply",
    "NotRewritable",
    "ResponseCache",
    "Stored",
    "cache_key",
    "parse_reply",
    "question_key",
    "render",
    "reply_question",
    "truncated",
]

# Bounds, after CoreDNS's cache plugin defaults (plugin/cache/README.md) and RFC 8767.
SUCCESS_TTL_CAP = 3600  # a positive answer lives at most an hour, whatever its TTL says
DENIAL_TTL_CAP = 1800  # NXDOMAIN/NODATA at most 30 minutes (RFC 2308 §5 suggests 1-3 hours max)
MIN_TTL = 5  # the floor: a TTL-0 answer still spares the upstreams for 5 s under a query flood
SERVFAIL_TTL = 5.0  # RFC 2308 §7.1: cache server failures for at most 5 minutes; we keep it short
STALE_TTL = 30  # RFC 8767 §4: stale answers are served with TTL 30
STALE_ANSWER_WAIT = 1.8  # RFC 8767 §5 "client response timer": answer stale after this long

FLAG_AD = 0x0020
_FLAG_DO = 0x8000  # in the OPT TTL (RFC 3225)
_TYPE_OPT = int(Qtype.OPT)
_TYPE_SOA = int(Qtype.SOA)
# OPT options that describe one hop, never the answer: a cookie belongs to the client/server
# pair (RFC 7873), padding to the message it pads (RFC 7830), keepalive to the TCP connection
# (RFC 7828). They are not passed on from the upstream's OPT to our client.
_HOP_OPTIONS = frozenset({10, 11, 12})

_HEADER = struct.Struct("!HHHHHH")
_RR_FIXED = struct.Struct("!HHIH")
_U16X2 = struct.Struct("!HH")
_U32 = struct.Struct("!I")
_SOA_TIMERS = struct.Struct("!IIIII")  # serial, refresh, retry, expire, minimum

# The cache key: lower-cased qname, qtype, qclass and the request bits that change what an
# upstream answers. DO (RFC 3225) adds RRSIGs; CD (RFC 4035 §3.2.2) lets through data that
# failed validation; RD=0 asks for the upstream's cache only. Serving an answer fetched with any
# of them to a client without it (or the other way round) would be wrong.
CacheKey = tuple[str, int, int, int]


class MalformedReply(ValueError):
    """The upstream's reply cannot be read: treated as a failure of that upstream."""


class NotRewritable(ValueError):
    """A valid reply we cannot re-serve piecewise (an OPT that is not the last record): it is
    passed through as it came, with the client's ID, and never cached."""


def cache_key(query: Query) -> CacheKey | None:
    """The cache key of *query*, or None when its answer must not be shared.

    A query with an EDNS Client Subnet option gets an answer tailored to that subnet (RFC 7871
    §7.3: caches must then key by the scope, which we do not), so it is neither cached nor
    coalesced with other clients' queries.
    """
    edns = query.edns
    bits = query.flags & (FLAG_RD | FLAG_CD)
    if edns is not None:
        if edns.ecs is not None:
            return None
        if edns.do:
            bits |= 1
    return (query.qname, query.qtype, query.qclass, bits)


def question_key(question: bytes) -> bytes:
    """*question* (name + type + class on the wire) with the name case-folded (RFC 4343).

    Label length octets are at most 63, below 'A' (65), so ``bytes.lower`` only folds letters;
    the type and class octets are compared exactly.
    """
    return question[:-4].lower() + question[-4:]


def reply_question(data: bytes) -> bytes | None:
    """The question section of a one-question message, or None if it has none or is broken."""
    if len(data) < 12 or data[4:6] != b"\x00\x01":
        return None
    try:
        end = _skip_name(data, 12, len(data)) + 4
    except MalformedReply:
        return None
    if end > len(data):
        return None
    return data[12:end]


@dataclass(frozen=True, slots=True)
class Stored:
    """An upstream reply taken apart for re-serving.

    ``body`` is everything after the question with the OPT record cut out; its compression
    pointers still work because the header and question it follows keep their lengths (a
    client's question differs from the upstream's only in letter case). ``ttls`` are the
    (offset in body, TTL) of every record. ``ttl`` is how long the reply may be cached (None:
    not cacheable) before the caps and floor of :class:`ResponseCache`.
    """

    rcode: int  # the header's 4 bits
    flags: int  # the upstream's AA, TC and AD bits
    qlen: int  # length of the question section
    body: bytes
    ancount: int
    nscount: int
    arcount: int  # without the OPT
    ttls: tuple[tuple[int, int], ...]
    ttl: int | None
    negative: bool
    opt_present: bool
    ext_rcode: int = 0  # the OPT's upper 8 rcode bits
    do: bool = False  # the upstream's OPT DO bit (RFC 3225: copied from the query)
    options: bytes = b""  # the upstream's OPT options worth passing on, as wire bytes

    @property
    def truncated(self) -> bool:
        return bool(self.flags & FLAG_TC)


def parse_reply(data: bytes, *, keep_ecs: bool = False) -> Stored:
    """Take an upstream reply apart. Raises :class:`MalformedReply` or :class:`NotRewritable`.

    *keep_ecs*: pass an ECS option on (the client sent one, so the scope is the client's).
    """
    n = len(data)
    if n < 12:
        raise MalformedReply("shorter than a header")
    _id, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data, 0)
    if not flags & FLAG_QR or qdcount != 1:
        raise MalformedReply("not a reply to one question")
    off = _skip_name(data, 12, n) + 4
    if off > n:
        raise MalformedReply("question cut short")
    body_start = off
    ttls: list[tuple[int, int]] = []
    min_ttl: int | None = None
    min_answer_ttl: int | None = None
    soa_ttl: int | None = None
    opt_start = -1
    ext_rcode = 0
    do = False
    options = b""
    total = ancount + nscount + arcount
    for i in range(total):
        start = off
        off = _skip_name(data, off, n)
        if off + 10 > n:
            raise MalformedReply("record cut short")
        rtype, _rclass, ttl, rdlen = _RR_FIXED.unpack_from(data, off)
        ttl_at = off + 4
        rdata = off + 10
        off = rdata + rdlen
        if off > n:
            raise MalformedReply("record data cut short")
        if rtype == _TYPE_OPT:
            if i < ancount + nscount or opt_start >= 0:
                raise MalformedReply("misplaced or second OPT")  # RFC 6891 §6.1.1
            if i != total - 1:
                raise NotRewritable("OPT is not the last record")
            opt_start = start
            ext_rcode = ttl >> 24
            do = bool(ttl & _FLAG_DO)
            options = _pass_on_options(data, rdata, off, keep_ecs)
            continue
        if ttl > 0x7FFFFFFF:
            ttl = 0  # RFC 2181 §8: a TTL with the top bit set is read as zero
        ttls.append((ttl_at - body_start, ttl))
        min_ttl = ttl if min_ttl is None or ttl < min_ttl else min_ttl
        if i < ancount:
            min_answer_ttl = ttl if min_answer_ttl is None or ttl < min_answer_ttl else min_answer_ttl
        elif i < ancount + nscount and rtype == _TYPE_SOA:
            minimum = _soa_minimum(data, rdata, off)
            # RFC 2308 §5: a negative answer lives min(SOA TTL, SOA MINIMUM).
            soa_ttl = min(ttl, minimum)
    rcode = flags & 0xF
    # NXDOMAIN, or NOERROR with an empty answer section (NODATA, RFC 2308 §2.2).
    negative = rcode == Rcode.NXDOMAIN or (rcode == Rcode.NOERROR and ancount == 0)
    if rcode not in (Rcode.NOERROR, Rcode.NXDOMAIN) or flags & FLAG_TC:
        cache_ttl: int | None = None  # errors and truncated replies are never cached (CoreDNS does the same)
    elif negative:
        # RFC 2308 §5: negative responses without a SOA SHOULD NOT be cached (referrals too).
        cache_ttl = None if soa_ttl is None else min(soa_ttl, min_answer_ttl) if min_answer_ttl is not None else soa_ttl
    else:
        cache_ttl = min_ttl
    end = opt_start if opt_start >= 0 else off  # trailing bytes after the last record are dropped
    return Stored(
        rcode=rcode,
        flags=flags & (FLAG_AA | FLAG_TC | FLAG_AD),
        qlen=body_start - 12,
        body=data[body_start:end],
        ancount=ancount,
        nscount=nscount,
        arcount=arcount - (1 if opt_start >= 0 else 0),
        ttls=tuple(ttls),
        ttl=cache_ttl,
        negative=negative,
        opt_present=opt_start >= 0,
        ext_rcode=ext_rcode,
        do=do,
        options=options,
    )


def _skip_name(data: bytes, off: int, n: int) -> int:
    """Offset just past the (possibly compressed) name at *off*; raises MalformedReply."""
    start = off
    while True:
        if off >= n:
            raise MalformedReply("name runs off the end")
        length = data[off]
        if length == 0:
            return off + 1
        if length & 0xC0 == 0xC0:
            # RFC 1035 §4.1.4: a pointer to a prior occurrence; it ends the name. We never
            # follow it, so a pointer loop cannot trap us.
            if off + 2 > n:
                raise MalformedReply("pointer cut short")
            return off + 2
        if length > 63:
            raise MalformedReply("bad label type")
        off += 1 + length
        if off - start > 255:
            raise MalformedReply("name too long")


def _soa_minimum(data: bytes, rdata: int, end: int) -> int:
    off = _skip_name(data, rdata, end)  # MNAME
    off = _skip_name(data, off, end)  # RNAME
    if off + 20 > end:
        raise MalformedReply("SOA cut short")
    minimum = _SOA_TIMERS.unpack_from(data, off)[4]
    return 0 if minimum > 0x7FFFFFFF else minimum


def _pass_on_options(data: bytes, off: int, end: int, keep_ecs: bool) -> bytes:
    out = []
    while off < end:
        if off + 4 > end:
            raise MalformedReply("OPT option cut short")
        code, olen = _U16X2.unpack_from(data, off)
        stop = off + 4 + olen
        if stop > end:
            raise MalformedReply("OPT option cut short")
        if code not in _HOP_OPTIONS and (code != EDNS_OPTION_ECS or keep_ecs):
            out.append(data[off:stop])
        off = stop
    return b"".join(out)


def _opt(payload: int, ext_rcode: int, do: bool, options: bytes) -> bytes:
    # Version 0; the UDP size echoes the client's, as dns.message.encode_opt does for our own
    # answers (so a forwarded reply looks like any other reply of ours).
    ttl = (ext_rcode & 0xFF) << 24 | (_FLAG_DO if do else 0)
    return b"\x00" + struct.pack("!HHIH", _TYPE_OPT, max(payload, 512), ttl, len(options)) + options


def render(stored: Stored, query: Query, *, age: int = 0, stale: bool = False, cached: bool = False) -> bytes:
    """The reply to *query* built from *stored*: a new message, *stored* is not changed.

    Header: the client's ID, QR, the client's opcode/RD/CD, RA (we recurse for this client),
    the upstream's rcode and TC; AA only for a reply fresh from the upstream (a cached answer
    is not authoritative, RFC 1035 §6.1.3); AD only if the client asked with AD or DO (RFC 6840
    §5.8). The question is the client's, byte for byte (so owner names compressed against it
    echo the client's spelling). TTLs are lowered by *age* seconds, or set to 30 (never raised)
    when *stale* (RFC 8767 §4). An OPT is added if and only if the client sent one (RFC 6891 §7). A UDP
    reply larger than the client can take becomes an empty one with TC (RFC 2181 §9), so that
    the client retries over TCP.
    """
    if len(query.question) != stored.qlen:  # pragma: no cover - callers match questions first
        raise ValueError("question length differs from the stored reply's")
    flags = (
        FLAG_QR
        | (query.flags & (OPCODE_MASK | FLAG_RD | FLAG_CD))
        | FLAG_RA
        | (stored.flags & FLAG_TC)
        | stored.rcode
    )
    if not cached:
        flags |= stored.flags & FLAG_AA
    edns = query.edns
    if stored.flags & FLAG_AD and (query.flags & FLAG_AD or (edns is not None and edns.do)):
        flags |= FLAG_AD
    body: bytes | bytearray = stored.body
    if (age > 0 or stale) and stored.ttls:
        buf = bytearray(body)
        pack = _U32.pack_into
        for at, ttl in stored.ttls:
            pack(buf, at, min(ttl, STALE_TTL) if stale else ttl - age if ttl > age else 0)
        body = buf
    opt = b"" if edns is None else _opt(edns.payload, stored.ext_rcode, stored.do, stored.options)
    reply = b"".join(
        (
            header(query.id, flags, 1, stored.ancount, stored.nscount, stored.arcount + (1 if opt else 0)),
            query.question,
            body,
            opt,
        )
    )
    if not query.tcp and len(reply) > query.max_size:
        return truncated(query, flags, stored)
    return reply


def truncated(query: Query, flags: int, stored: Stored) -> bytes:
    """An empty reply with TC set: what a UDP client gets when the answer does not fit."""
    edns = query.edns
    opt = b"" if edns is None else _opt(edns.payload, stored.ext_rcode, stored.do, b"")
    return header(query.id, (flags | FLAG_TC) & ~FLAG_AA, 1, 0, 0, 1 if opt else 0) + query.question + opt


@dataclass(frozen=True, slots=True)
class Entry:
    """A cached reply: what came back, when, and until when it is fresh."""

    stored: Stored
    at: float
    expires: float

    def age(self, now: float) -> int:
        return int(now - self.at) if now > self.at else 0


class ResponseCache:
    """Forwarded replies by :data:`CacheKey`, plus short SERVFAIL marks.

    Bounded to *maxsize* entries (least recently used go first, cachetools ``TLRUCache``). An
    entry is *fresh* until ``expires`` and then *stale* for *max_stale* seconds more, during
    which :meth:`get` still returns it so that the forwarder can serve it when every upstream
    fails (RFC 8767 §5 "maximum stale timer"). SERVFAIL marks live apart, for
    :data:`SERVFAIL_TTL` seconds: a failure never replaces or hides a good answer
    (coredns/coredns#7956), and a good answer clears the mark.
    """

    def __init__(
        self,
        maxsize: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_stale: float = 86400.0,
        servfail_ttl: float = SERVFAIL_TTL,
    ) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self.max_stale = max_stale
        self.clock = clock
        self._entries: TLRUCache[CacheKey, Entry] = TLRUCache(maxsize, ttu=self._until, timer=clock)
        # SERVFAIL marks are few and short-lived; a quarter of the entries bounds a flood of
        # failing names without costing much.
        self._servfail: TTLCache[CacheKey, bool] = TTLCache(max(16, maxsize // 4), ttl=servfail_ttl, timer=clock)

    def _until(self, _key: CacheKey, entry: Entry, _now: float) -> float:
        return entry.expires + self.max_stale

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey) -> tuple[Entry, bool] | None:
        """``(entry, fresh)`` for *key*, or None. A stale entry is returned with ``fresh`` False."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        return entry, self.clock() < entry.expires

    def put(self, key: CacheKey, stored: Stored) -> Entry | None:
        """Remember *stored* if it is cacheable; return the entry (None if it was not kept).

        The TTL is the reply's own (see :func:`parse_reply`) capped at an hour (30 minutes for a
        negative answer) and floored at :data:`MIN_TTL`. The caps only shorten; the floor only
        keeps a TTL-0 answer for a few seconds, and its records are then served with TTL 0.
        """
        if stored.ttl is None:
            return None
        cap = DENIAL_TTL_CAP if stored.negative else SUCCESS_TTL_CAP
        ttl = max(min(stored.ttl, cap), MIN_TTL)
        now = self.clock()
        entry = Entry(stored, now, now + ttl)
        self._entries[key] = entry
        self._servfail.pop(key, None)
        return entry

    def mark_servfail(self, key: CacheKey) -> None:
        """Every upstream failed for *key*: stop asking for a few seconds."""
        self._servfail[key] = True

    def servfail(self, key: CacheKey) -> bool:
        """Whether *key* failed less than :data:`SERVFAIL_TTL` seconds ago."""
        return key in self._servfail

    def clear_servfail(self) -> None:
        """Forget every SERVFAIL mark (an upstream came back: ask it again at once)."""
        self._servfail.clear()

    def clear(self) -> None:
        self._entries.clear()
        self._servfail.clear()
