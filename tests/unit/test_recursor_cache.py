"""dns.cache without sockets: what a forwarded reply becomes in the cache, how long it lives
(injected clock), and what each client gets back from it.

Upstream replies are built with dnslib (an independent encoder); the replies we render are read
back with dnspython (an independent parser).
"""

from __future__ import annotations

import struct

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import pytest
from dnslib import AAAA, EDNS0, QTYPE, RR, SOA, A, DNSRecord, EDNSOption

from dnsdisco.dns import cache as cachemod
from dnsdisco.dns.cache import (
    MIN_TTL,
    SERVFAIL_TTL,
    STALE_TTL,
    MalformedReply,
    NotRewritable,
    ResponseCache,
    cache_key,
    parse_reply,
    render,
)
from dnsdisco.dns.message import Query
from dnsdisco.dns.wire import parse
from tests.dnstest import ecs_option, opt_rr, request


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def query(name: str = "www.example.org.", qtype: int = 1, *, id: int = 0x4242, flags: int = 0x0100,
          tcp: bool = False, additional: tuple[bytes, ...] = ()) -> Query:
    q = parse(request(name, qtype, id=id, flags=flags, additional=additional), tcp=tcp, client=("127.0.0.1", 5353))
    assert isinstance(q, Query)
    return q


def upstream_reply(name: str = "www.example.org", qtype: str = "A", *, ttls: tuple[int, ...] = (300,),
                   rcode: int = 0, soa: tuple[int, int] | None = None, edns: EDNS0 | None = None,
                   aa: bool = False, ad: bool = False, tc: bool = False, extra_ttl: int | None = None) -> bytes:
    """A reply as an upstream sends it: one A (or AAAA) per TTL in *ttls*; *soa* = (ttl, minimum)."""
    q = DNSRecord.question(name, qtype)
    r = q.reply(ra=1, aa=int(aa))
    r.header.rcode = rcode
    r.header.ad = int(ad)
    r.header.tc = int(tc)
    for i, ttl in enumerate(ttls):
        rdata = A(f"192.0.2.{i + 1}") if qtype == "A" else AAAA(f"2001:db8::{i + 1}")
        r.add_answer(RR(name, getattr(QTYPE, qtype), rdata=rdata, ttl=ttl))
    if soa is not None:
        r.add_auth(RR("example.org", QTYPE.SOA, ttl=soa[0],
                      rdata=SOA("ns1.example.org", "hostmaster.example.org", (1, 3600, 600, 86400, soa[1]))))
    if extra_ttl is not None:
        r.add_ar(RR("ns1.example.org", QTYPE.A, rdata=A("192.0.2.53"), ttl=extra_ttl))
    if edns is not None:
        r.add_ar(edns)
    return r.pack()


def read(reply: bytes) -> dns.message.Message:
    return dns.message.from_wire(reply)


# --- keys ------------------------------------------------------------------------------------


def test_key_is_name_type_class_and_the_bits_that_change_the_answer():
    plain = cache_key(query())
    assert plain == ("www.example.org.", 1, 1, 0x0100)
    assert cache_key(query("WWW.Example.ORG.")) == plain  # case-insensitive (RFC 4343)
    assert cache_key(query(qtype=28)) != plain
    assert cache_key(query(additional=(opt_rr(1232),))) == plain  # EDNS without DO: same answer
    do = cache_key(query(additional=(opt_rr(1232, do=True),)))
    cd = cache_key(query(flags=0x0110))
    norec = cache_key(query(flags=0x0000))
    assert len({plain, do, cd, norec}) == 4


def test_a_query_with_client_subnet_is_never_shared():
    q = query(additional=(opt_rr(1232, options=[ecs_option(1, 24, bytes([10, 1, 2]))]),))
    assert cache_key(q) is None


# --- what a reply becomes ----------------------------------------------------------------------


def test_positive_ttl_is_the_smallest_of_all_records():
    stored = parse_reply(upstream_reply(ttls=(300, 120), extra_ttl=60))
    assert stored.ttl == 60 and not stored.negative
    assert sorted(t for _, t in stored.ttls) == [60, 120, 300]


def test_negative_ttl_is_min_of_soa_ttl_and_minimum():
    nx = parse_reply(upstream_reply(ttls=(), rcode=3, soa=(300, 60)))
    assert nx.negative and nx.ttl == 60
    nodata = parse_reply(upstream_reply(ttls=(), soa=(30, 900)))
    assert nodata.negative and nodata.ttl == 30


def test_negative_without_soa_is_not_cached():
    # RFC 2308 §5: negative answers without a SOA SHOULD NOT be cached.
    assert parse_reply(upstream_reply(ttls=(), rcode=3)).ttl is None
    assert ResponseCache(10).put(cache_key(query()), parse_reply(upstream_reply(ttls=(), rcode=3))) is None


def test_errors_and_truncated_replies_are_not_cached():
    assert parse_reply(upstream_reply(ttls=(), rcode=2)).ttl is None
    tc = parse_reply(upstream_reply(tc=True))
    assert tc.ttl is None and tc.truncated


def test_top_bit_ttl_reads_as_zero():
    raw = bytearray(upstream_reply(ttls=(300,)))
    stored = parse_reply(bytes(raw))
    at = 12 + stored.qlen + stored.ttls[0][0]
    struct.pack_into("!I", raw, at, 0x80000001)
    assert parse_reply(bytes(raw)).ttls[0][1] == 0  # RFC 2181 §8


def test_malformed_replies_are_rejected():
    good = upstream_reply()
    with pytest.raises(MalformedReply):
        parse_reply(good[:-3])
    with pytest.raises(MalformedReply):
        parse_reply(good[:11])
    with pytest.raises(MalformedReply):
        parse_reply(good[:2] + bytes([good[2] & 0x7F]) + good[3:])  # QR clear: a query


def test_opt_not_last_is_passed_through_not_rewritten():
    q = DNSRecord.question("www.example.org", "A")
    r = q.reply()
    r.add_ar(EDNS0(udp_len=1232))
    r.add_ar(RR("ns1.example.org", QTYPE.A, rdata=A("192.0.2.53"), ttl=60))
    with pytest.raises(NotRewritable):
        parse_reply(r.pack())


# --- rendering for a client --------------------------------------------------------------------


def test_render_uses_the_clients_id_and_question_spelling():
    stored = parse_reply(upstream_reply("www.example.org"))
    q = query("WwW.eXample.ORG.", id=7)
    msg = read(render(stored, q))
    assert msg.id == 7
    assert msg.question[0].name.to_text() == "WwW.eXample.ORG."
    # The answer's owner is compressed against the question, so it echoes the client's spelling.
    assert msg.answer[0].name.to_text() == "WwW.eXample.ORG."
    assert msg.flags & dns.flags.RA and msg.flags & dns.flags.RD and msg.flags & dns.flags.QR
    assert [r.address for r in msg.answer[0]] == ["192.0.2.1"]


def test_render_decrements_ttls_by_age_and_never_below_zero():
    stored = parse_reply(upstream_reply(ttls=(300, 10), extra_ttl=100))
    reply = render(stored, query(), age=42)
    base = 12 + stored.qlen
    # Each record's own TTL field (dnspython would fold the two A records into one RRset).
    assert [struct.unpack_from("!I", reply, base + at)[0] for at, _ in stored.ttls] == [258, 0, 58]
    assert render(stored, query(), age=0)[base:] == stored.body  # age 0: the bytes as they came


def test_stale_render_sets_ttl_30():
    stored = parse_reply(upstream_reply(ttls=(300,), extra_ttl=10))
    msg = read(render(stored, query(), stale=True))
    assert msg.answer[0].ttl == STALE_TTL  # RFC 8767 §4
    assert msg.additional[0].ttl == 10  # never raised


def test_opt_only_for_clients_that_sent_one():
    with_opt = parse_reply(upstream_reply(edns=EDNS0(udp_len=4096)))
    without = parse_reply(upstream_reply())
    plain = query()
    edns = query(additional=(opt_rr(1400),))
    for stored in (with_opt, without):
        assert read(render(stored, plain)).edns == -1  # RFC 6891 §7: no OPT without one in the request
        msg = read(render(stored, edns))
        assert msg.edns == 0 and msg.payload == 1400  # the client's size echoed, like our own answers


def test_opt_keeps_do_and_answer_options_but_drops_per_hop_ones():
    options = [
        EDNSOption(10, b"\x01" * 16),  # COOKIE: ours to the client is not the upstream's
        EDNSOption(12, b"\x00" * 8),  # PADDING
        EDNSOption(15, b"\x00\x12"),  # Extended DNS Error 18 (Prohibited): about the answer
    ]
    stored = parse_reply(upstream_reply(edns=EDNS0(udp_len=1232, flags="do", opts=options)))
    msg = read(render(stored, query(additional=(opt_rr(1232, do=True),))))
    assert msg.ednsflags & dns.flags.DO
    assert [o.otype for o in msg.options] == [dns.edns.EDE]


def test_ad_only_when_the_client_asked_with_ad_or_do():
    stored = parse_reply(upstream_reply(ad=True))
    assert not read(render(stored, query())).flags & dns.flags.AD
    assert read(render(stored, query(flags=0x0120))).flags & dns.flags.AD  # RD+AD
    assert read(render(stored, query(additional=(opt_rr(do=True),)))).flags & dns.flags.AD


def test_aa_only_on_a_fresh_reply():
    stored = parse_reply(upstream_reply(aa=True))
    assert read(render(stored, query())).flags & dns.flags.AA
    assert not read(render(stored, query(), cached=True)).flags & dns.flags.AA


def test_too_big_for_a_udp_client_becomes_tc():
    stored = parse_reply(upstream_reply(ttls=tuple(range(100, 140)), edns=EDNS0(udp_len=4096)))
    small = query()  # no EDNS: 512 bytes
    reply = render(stored, small)
    msg = read(reply)
    assert msg.flags & dns.flags.TC and not msg.answer and len(reply) <= 512
    assert msg.question[0].name.to_text() == "www.example.org."
    big = query(additional=(opt_rr(4096),))
    assert len(read(render(stored, big)).answer[0]) == 40
    assert len(read(render(stored, query(tcp=True))).answer[0]) == 40


def test_upstream_tc_is_passed_on():
    stored = parse_reply(upstream_reply(ttls=(), tc=True))
    assert read(render(stored, query())).flags & dns.flags.TC


# --- the cache's life cycle ----------------------------------------------------------------------


def test_fresh_then_stale_then_gone():
    clock = Clock()
    cache = ResponseCache(100, clock=clock, max_stale=3600)
    key = cache_key(query())
    entry = cache.put(key, parse_reply(upstream_reply(ttls=(60,))))
    assert entry is not None and entry.expires == clock.now + 60
    clock.now += 59.5
    assert cache.get(key)[1] is True
    assert entry.age(clock.now) == 59
    clock.now += 1
    hit = cache.get(key)
    assert hit is not None and hit[1] is False  # stale, still there for RFC 8767
    clock.now += 3600
    assert cache.get(key) is None  # past the maximum stale age


def test_no_stale_window_when_disabled():
    clock = Clock()
    cache = ResponseCache(100, clock=clock, max_stale=0)
    key = cache_key(query())
    cache.put(key, parse_reply(upstream_reply(ttls=(60,))))
    clock.now += 60
    assert cache.get(key) is None


def test_ttl_caps_and_floor():
    clock = Clock()
    cache = ResponseCache(100, clock=clock)
    key = cache_key(query())
    long = cache.put(key, parse_reply(upstream_reply(ttls=(86400 * 7,))))
    assert long.expires - clock.now == cachemod.SUCCESS_TTL_CAP
    zero = cache.put(key, parse_reply(upstream_reply(ttls=(0,))))
    assert zero.expires - clock.now == MIN_TTL
    clock.now += 3
    assert read(render(zero.stored, query(), age=zero.age(clock.now))).answer[0].ttl == 0
    denial = cache.put(key, parse_reply(upstream_reply(ttls=(), rcode=3, soa=(86400, 86400))))
    assert denial.expires - clock.now == cachemod.DENIAL_TTL_CAP


def test_servfail_mark_is_short_and_never_hides_a_good_answer():
    clock = Clock()
    cache = ResponseCache(100, clock=clock)
    key = cache_key(query())
    cache.put(key, parse_reply(upstream_reply(ttls=(60,))))
    cache.mark_servfail(key)
    assert cache.servfail(key)
    assert cache.get(key)[1] is True  # the good answer is still there, and fresh
    clock.now += SERVFAIL_TTL
    assert not cache.servfail(key)
    cache.mark_servfail(key)
    cache.put(key, parse_reply(upstream_reply(ttls=(60,))))
    assert not cache.servfail(key)  # a good answer clears the mark
    cache.mark_servfail(key)
    cache.clear_servfail()
    assert not cache.servfail(key)


def test_bounded_least_recently_used_go_first():
    clock = Clock()
    cache = ResponseCache(3, clock=clock)
    keys = [cache_key(query(f"n{i}.example.org.")) for i in range(4)]
    for k in keys[:3]:
        cache.put(k, parse_reply(upstream_reply(ttls=(60,))))
    assert cache.get(keys[0]) is not None  # touch n0: n1 is now the least recently used
    cache.put(keys[3], parse_reply(upstream_reply(ttls=(60,))))
    assert len(cache) == 3
    assert cache.get(keys[1]) is None and cache.get(keys[0]) is not None


def test_a_cached_reply_serves_clients_with_and_without_edns():
    clock = Clock()
    cache = ResponseCache(10, clock=clock)
    fetched_by = query(additional=(opt_rr(1232),))
    cache.put(cache_key(fetched_by), parse_reply(upstream_reply(edns=EDNS0(udp_len=1232))))
    clock.now += 10
    entry, fresh = cache.get(cache_key(query()))
    assert fresh
    plain = read(render(entry.stored, query(id=1), age=entry.age(clock.now), cached=True))
    assert plain.edns == -1 and plain.id == 1 and plain.answer[0].ttl == 290
    other = read(render(entry.stored, query(id=2, additional=(opt_rr(4000),)), age=10, cached=True))
    assert other.edns == 0 and other.payload == 4000 and other.id == 2
