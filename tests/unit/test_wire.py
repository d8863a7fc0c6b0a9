"""dns.wire: the request parser's error ladder, EDNS/ECS handling, sizes, and error replies.

Replies are checked with dnspython's parser (an independent reading of the wire format) as well
as byte by byte where the RFCs pin the bytes down.
"""

from __future__ import annotations

import random
import struct

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dnsdisco.dns import wire
from dnsdisco.dns.message import Edns, Query, Rcode
from tests.dnstest import ecs_option, opt_rr, qname_wire, question, request

CLIENT = ("127.0.0.1", 5353)


def parse(data: bytes, *, tcp: bool = False) -> Query | bytes | None:
    return wire.parse(data, tcp=tcp, client=CLIENT)


def reply_of(data: bytes, *, tcp: bool = False) -> dns.message.Message:
    out = parse(data, tcp=tcp)
    assert isinstance(out, bytes), out
    return dns.message.from_wire(out)


def header_of(reply: bytes) -> tuple[int, int, int, int, int, int]:
    return struct.unpack("!HHHHHH", reply[:12])


# --- Query construction --------------------------------------------------------------------


def test_new_query_equals_the_dataclass_constructor():
    args = (7, 0x0100, question("a."), "a.", 1, 1, Edns(payload=1232), False, 1232, CLIENT)
    assert wire.new_query(*args) == Query(*args)
    assert wire._SETTERS, "message.Query changed shape: update wire.new_query"


def test_plain_query():
    q = parse(request("Web.Service.CONSUL.", 33, id=0xBEEF))
    assert isinstance(q, Query)
    assert (q.id, q.qname, q.qtype, q.qclass, q.edns, q.tcp, q.max_size, q.client) == (
        0xBEEF,
        "web.service.consul.",
        33,
        1,
        None,
        False,
        512,
        CLIENT,
    )
    assert q.question == question("Web.Service.CONSUL.", 33)  # as sent: case preserved
    assert q.flags == 0x0100


def test_repeats_get_their_own_id_and_transport():
    first = parse(request(id=1))
    again = parse(request(id=2), tcp=True)
    assert isinstance(first, Query) and isinstance(again, Query)
    assert (first.id, first.tcp, first.max_size) == (1, False, 512)
    assert (again.id, again.tcp, again.max_size) == (2, True, 65535)
    assert first.qname == again.qname


def test_accepts_bytearray_and_memoryview():
    for data in (bytearray(request()), memoryview(request())):
        q = wire.parse(data, tcp=False, client=CLIENT)  # type: ignore[arg-type]
        assert isinstance(q, Query) and q.qname == "web.service.consul."


def test_root_and_escaped_names():
    root = parse(request(body=b"\x00\x00\x02\x00\x01"))
    assert isinstance(root, Query) and root.qname == "."
    odd = parse(request(body=b"\x03a.b\x02\x00Z\x06consul\x00\x00\x01\x00\x01"))
    assert isinstance(odd, Query)
    assert odd.qname == "a\\.b.\\000z.consul."  # a dot inside a label must not look like two labels


def test_trailing_bytes_are_ignored():
    q = parse(request() + b"\x00\x01junk")
    assert isinstance(q, Query) and q.qname == "web.service.consul."


# --- the ladder ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 11])
def test_shorter_than_a_header_is_dropped(size):
    assert parse(request()[:size]) is None


def test_a_response_is_dropped():
    assert parse(request(flags=0x8100)) is None


@pytest.mark.parametrize("opcode", [1, 2, 4, 5, 15])
def test_opcode_other_than_query_is_notimp(opcode):
    data = request(flags=(opcode << 11) | 0x0100, id=77, additional=[opt_rr(1232)])
    out = parse(data)
    assert isinstance(out, bytes)
    id, flags, qd, an, ns, ar = header_of(out)
    assert (id, flags & 0xF, (flags >> 11) & 0xF, flags & 0x8000) == (77, Rcode.NOTIMP, opcode, 0x8000)
    assert (qd, an, ns, ar) == (1, 0, 0, 1)  # question and OPT kept
    assert out[12:].startswith(question("web.service.consul."))


@pytest.mark.parametrize("qdcount", [0, 2, 3])
def test_qdcount_not_one_is_formerr(qdcount):
    body = question("a.") * qdcount
    data = request(body=body, counts=(qdcount, 0, 0, 1), additional=[opt_rr(4096)], id=9)
    out = parse(data)
    assert isinstance(out, bytes)
    id, flags, qd, an, ns, ar = header_of(out)
    assert (id, flags & 0xF, qd, an, ns, ar) == (9, Rcode.FORMERR, 0, 0, 0, 1)
    reply = dns.message.from_wire(out)
    assert reply.edns == 0 and reply.payload == 4096


def test_huge_qdcount_is_formerr_without_reading_the_body():
    out = parse(request(counts=(5000, 0, 0, 0)))
    assert isinstance(out, bytes) and header_of(out)[1] & 0xF == Rcode.FORMERR and len(out) == 12


@pytest.mark.parametrize("counts", [(1, 2, 0, 0), (1, 0, 2, 0), (1, 0, 0, 3)])
def test_record_counts_no_query_needs_are_formerr(counts):
    out = parse(request(counts=counts, id=5))
    assert isinstance(out, bytes)
    assert header_of(out)[:2] == (5, 0x8100 | Rcode.FORMERR)


@pytest.mark.parametrize(
    "body",
    [
        b"",  # no question at all
        b"\x03web\x07serv",  # label runs past the end
        b"\x03web\x00\x00\x01",  # qtype/qclass cut short
        b"\xc0\x0c\x00\x01\x00\x01",  # compression pointer in the question
        b"\x41abc\x00\x00\x01\x00\x01",  # extended label type (0x40)
        b"\x3f" + b"a" * 63 + b"\x3f" + b"b" * 63 + b"\x3f" + b"c" * 63 + b"\x3f" + b"d" * 63 + b"\x00\x00\x01\x00\x01",
    ],
    ids=["empty", "label-overrun", "short-type", "pointer", "ext-label", "name-over-255"],
)
def test_malformed_question_is_formerr_with_id(body):
    out = parse(request(body=body, id=0xABCD))
    assert isinstance(out, bytes)
    id, flags, qd, an, ns, ar = header_of(out)
    assert (id, flags & 0xF, flags & 0x8000, qd, an, ns, ar) == (0xABCD, Rcode.FORMERR, 0x8000, 0, 0, 0, 0)


def test_malformed_additional_keeps_the_question():
    data = request(counts=(1, 0, 0, 1)) + b"\x00\x00\x29"  # OPT cut short
    msg = reply_of(data)
    assert msg.rcode() == dns.rcode.FORMERR
    assert [q.name.to_text() for q in msg.question] == ["web.service.consul."]


def test_opt_outside_additional_is_formerr():
    data = request(counts=(1, 1, 0, 0)) + opt_rr()
    assert reply_of(data).rcode() == dns.rcode.FORMERR


def test_answer_section_rr_is_skipped():
    # A well-formed (if pointless) RR in Answer, with a backward pointer to the question name.
    rr = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 4) + b"\x0a\x00\x00\x01"
    q = parse(request(counts=(1, 1, 0, 1), additional=[rr, opt_rr(2048)]))
    assert isinstance(q, Query) and q.edns is not None and q.edns.payload == 2048


def test_forward_pointer_in_a_record_is_formerr():
    rr = b"\xc0\xff" + struct.pack("!HHIH", 1, 1, 0, 0)
    assert reply_of(request(counts=(1, 1, 0, 0), additional=[rr])).rcode() == dns.rcode.FORMERR


def test_class_ch_is_refused_with_question():
    out = parse(request("version.bind.", 16, qclass=3, id=3))
    assert isinstance(out, bytes)
    id, flags, qd, an, ns, ar = header_of(out)
    assert (id, flags & 0xF, flags & 0x0400, flags & 0x0080, qd, an, ar) == (3, Rcode.REFUSED, 0, 0, 1, 0, 0)
    assert out[12:] == question("version.bind.", 16, 3)


def test_class_any_is_answered_like_in():
    q = parse(request(qclass=255))
    assert isinstance(q, Query) and q.qclass == 255


# --- EDNS (RFC 6891) -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload, tcp, expected",
    [(None, False, 512), (100, False, 512), (512, False, 512), (4096, False, 4096), (65535, False, 65467),
     (None, True, 65535), (1232, True, 65535)],
)
def test_max_size(payload, tcp, expected):
    extra = [] if payload is None else [opt_rr(payload)]
    q = parse(request(additional=extra), tcp=tcp)
    assert isinstance(q, Query) and q.max_size == expected
    if payload is not None:
        assert q.edns is not None and q.edns.payload == payload  # recorded as sent


def test_do_bit_and_unknown_options_are_read():
    q = parse(request(additional=[opt_rr(1232, do=True, options=[(10, b"\x01" * 8), (100, b"")])]))
    assert isinstance(q, Query)
    assert q.edns == Edns(version=0, payload=1232, do=True, ecs=None)


def test_edns_version_1_is_badvers_with_opt_version_0():
    data = request(additional=[opt_rr(1232, version=1)], id=44)
    out = parse(data)
    assert isinstance(out, bytes)
    id, flags, qd, an, ns, ar = header_of(out)
    assert (id, flags & 0xF, qd, an, ns, ar) == (44, 0, 1, 0, 0, 1)  # low rcode bits 0
    opt = out[12 + len(question("web.service.consul.")) :]
    owner, rtype, payload, ext, version, _z, rdlen = struct.unpack("!BHHBBHH", opt)
    assert (owner, rtype, payload, ext, version, rdlen) == (0, 41, 1232, 1, 0, 0)
    msg = dns.message.from_wire(out)
    assert msg.rcode() == dns.rcode.BADVERS and msg.edns == 0 and not msg.answer


def test_two_opts_is_formerr_with_opt():
    msg = reply_of(request(additional=[opt_rr(1232), opt_rr(1232)]))
    assert msg.rcode() == dns.rcode.FORMERR and msg.edns == 0
    assert [q.name.to_text() for q in msg.question] == ["web.service.consul."]


def test_opt_with_non_root_owner_is_formerr_with_opt():
    bad = b"\x01a\x00" + opt_rr(1232)[1:]
    msg = reply_of(request(additional=[bad]))
    assert msg.rcode() == dns.rcode.FORMERR and msg.edns == 0


def test_option_overrunning_the_opt_is_formerr_with_opt():
    good = opt_rr(1232, options=[(10, b"12345678")])
    bad = good[:-10] + struct.pack("!HH", 10, 200) + b"12345678"
    msg = reply_of(request(additional=[bad]))
    assert msg.rcode() == dns.rcode.FORMERR and msg.edns == 0


def test_ecs_is_kept_for_the_echo():
    opt = opt_rr(1232, options=[ecs_option(1, 24, b"\x0a\x01\x02")])
    q = parse(request(additional=[opt]))
    assert isinstance(q, Query) and q.edns is not None
    assert q.edns.ecs == b"\x00\x01\x18\x00\x0a\x01\x02"


def test_ecs_family_zero_prefix_zero_is_accepted():
    # dig +subnet=0 sends FAMILY 0 with no address.
    q = parse(request(additional=[opt_rr(1232, options=[ecs_option(0, 0, b"")])]))
    assert isinstance(q, Query) and q.edns is not None and q.edns.ecs == b"\x00\x00\x00\x00"


@pytest.mark.parametrize(
    "option",
    [
        (8, b"\x00\x01\x18"),  # shorter than FAMILY + prefixes
        ecs_option(3, 8, b"\x0a"),  # unknown family
        ecs_option(1, 33, b"\x0a\x00\x00\x00\x00"),  # prefix longer than IPv4
        ecs_option(2, 129, b"\x20" + b"\x00" * 16),  # prefix longer than IPv6
        ecs_option(1, 24, b"\x0a\x01"),  # address shorter than the prefix
        ecs_option(1, 16, b"\x0a\x01\x02"),  # address longer than the prefix
        ecs_option(1, 20, b"\x0a\x01\x0f"),  # bits set beyond the prefix
        ecs_option(0, 8, b"\x0a"),  # family 0 with a prefix
    ],
    ids=["short", "family", "v4-prefix", "v6-prefix", "addr-short", "addr-long", "padding", "family0"],
)
def test_malformed_ecs_is_formerr_with_opt(option):
    msg = reply_of(request(additional=[opt_rr(1232, options=[option])]))
    assert msg.rcode() == dns.rcode.FORMERR and msg.edns == 0
    assert not msg.options  # the broken ECS is not echoed


def test_two_ecs_options_are_formerr():
    ecs = ecs_option(1, 24, b"\x0a\x01\x02")
    assert reply_of(request(additional=[opt_rr(1232, options=[ecs, ecs])])).rcode() == dns.rcode.FORMERR


def test_opt_payload_of_error_replies_echoes_the_client():
    msg = reply_of(request(qclass=3, additional=[opt_rr(12345)]))
    assert msg.rcode() == dns.rcode.REFUSED and msg.payload == 12345


# --- error_reply -----------------------------------------------------------------------------


def test_error_reply_without_opt():
    q = parse(request("Out.Of.Zone.", 1, id=99))
    assert isinstance(q, Query)
    out = wire.error_reply(q, Rcode.REFUSED, ra=False)
    assert out == struct.pack("!HHHHHH", 99, 0x8100 | 5, 1, 0, 0, 0) + question("Out.Of.Zone.")


def test_error_reply_with_opt_and_ecs_scope_zero():
    opt = opt_rr(4000, do=True, options=[ecs_option(1, 24, b"\xc0\x00\x02", scope=0), (100, b"x")])
    q = parse(request(additional=[opt], flags=0x0110))  # RD + CD
    assert isinstance(q, Query)
    msg = dns.message.from_wire(wire.error_reply(q, Rcode.SERVFAIL, ra=True))
    assert msg.rcode() == dns.rcode.SERVFAIL
    assert msg.flags & dns.flags.RA and msg.flags & dns.flags.RD and msg.flags & dns.flags.CD
    assert not msg.flags & dns.flags.AA
    assert msg.edns == 0 and msg.payload == 4000 and not msg.ednsflags & dns.flags.DO
    assert len(msg.options) == 1  # option 100 not echoed
    ecs = msg.options[0]
    assert isinstance(ecs, dns.edns.ECSOption)
    assert (ecs.address, ecs.srclen, ecs.scopelen) == ("192.0.2.0", 24, 0)


# --- any bytes at all ------------------------------------------------------------------------


def _check_any(data: bytes) -> None:
    out = wire.parse(data, tcp=False, client=CLIENT)
    assert out is None or isinstance(out, (bytes, Query))
    if isinstance(out, bytes):
        assert out[:2] == data[:2]  # the ID is echoed
        assert out[2] & 0x80  # QR set
        # A well-formed message. (Opcode cleared for the check: dnspython reads an UPDATE's
        # question as a zone section with rules of its own.)
        dns.message.from_wire(out[:2] + bytes([out[2] & 0x87]) + out[3:])


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_raise(data):
    _check_any(data)


@settings(max_examples=1500, deadline=None)
@given(st.data())
def test_mutated_requests_never_raise(data):
    base = bytearray(
        request(
            "web.service.consul.",
            33,
            additional=[opt_rr(1232, options=[ecs_option(1, 24, b"\x0a\x01\x02"), (10, b"c" * 8)])],
        )
    )
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(base) - 1))
        base[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(base)))
    _check_any(bytes(base[:cut]))


def test_random_headers_with_valid_bodies():
    rng = random.Random(1234)
    body = question("web.service.consul.") + opt_rr(1232)
    for _ in range(3000):
        head = bytes(rng.randrange(256) for _ in range(12))
        _check_any(head + body)


def test_qname_wire_helper():
    assert qname_wire(".") == b"\x00"
    assert qname_wire("a.b.") == b"\x01a\x01b\x00"


# --- the whole answer path: parse, then the populated AnswerTable --------------------------
#
# What the server does with every packet (DnsServer.answer): wire.parse, and for a Query the
# table's respond. Requests are drawn from the query forms of the spec (service, tag, RFC 2782,
# node, addr, PTR, SOA, NS, other datacenters, names that do not exist, names outside the
# zones) with random case, qtypes, flags, transports and EDNS (sizes, versions, DO, ECS and
# unknown options), then optionally mutated. Every reply must parse with dnspython, echo the
# ID and the question as sent, fit the client's size on UDP, and carry an OPT iff the request
# did.

_NAMES = [
    "web.service.consul.", "db.service.consul.", "api.service.consul.", "ext.service.consul.",
    "alias.service.consul.", "loop.service.consul.", "consul.service.consul.", "weighted.service.consul.",
    "down.service.consul.", "nc.service.consul.", "hosty.service.consul.", "dualsvc.service.consul.",
    "two.service.consul.", "nosuch.service.consul.", "primary.web.service.consul.", "v1.web.service.consul.",
    "replica.db.service.consul.", "nosuchtag.web.service.consul.", "_web._primary.service.consul.",
    "_web._tcp.service.consul.", "_db._replica.dc1.consul.", "web.service.dc1.consul.",
    "web.service.dc2.consul.", "web.service.dc9.consul.", "web.service.dc1.dc.consul.",
    "node1.node.consul.", "node1.node.dc1.consul.", "Mixed.Case.node.consul.", "nodeh.node.consul.",
    "dual.node.consul.", "nosuch.node.consul.", "0a000001.addr.consul.", "0a000001.addr.dc1.consul.",
    "20010db8000000000000000000000006.addr.consul.", "zz.addr.consul.", "1.0.0.10.in-addr.arpa.",
    "2.0.0.10.in-addr.arpa.", "9.9.9.9.in-addr.arpa.", "in-addr.arpa.",
    "6.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.",
    "consul.", "service.consul.", "node.consul.", "query.consul.", "x.query.consul.", "example.com.", ".",
]
_QTYPES = [1, 2, 5, 6, 12, 15, 16, 28, 33, 41, 99, 251, 252, 255, 65535]


def _mixed_case(name: str, rnd: random.Random) -> bytes:
    raw = qname_wire(name)
    return bytes(b ^ 0x20 if 0x61 <= (b | 0x20) <= 0x7A and rnd.random() < 0.3 else b for b in raw)


@st.composite
def _requests(draw: st.DrawFn) -> tuple[bytes, bool]:
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    name = draw(st.sampled_from(_NAMES) | st.lists(st.sampled_from(["a", "web", "service", "node", "_x", "dc2", "consul"]), max_size=6).map(lambda ls: ".".join(ls) + "."))
    qname = _mixed_case(name, rnd)
    qtype = draw(st.sampled_from(_QTYPES) | st.integers(0, 65535))
    qclass = draw(st.sampled_from([1, 1, 1, 255, 3]))
    flags = draw(st.sampled_from([0x0000, 0x0100, 0x0110, 0x0120, 0x0130]) | st.integers(0, 0x7FFF))
    extra: list[bytes] = []
    if draw(st.booleans()):
        options: list[tuple[int, bytes]] = []
        if draw(st.booleans()):
            prefix = draw(st.integers(0, 32))
            addr = bytes(rnd.randrange(256) for _ in range((prefix + 7) // 8))
            if prefix % 8 and addr:
                addr = addr[:-1] + bytes([addr[-1] & (0xFF << (8 - prefix % 8)) & 0xFF])
            options.append(ecs_option(1, prefix, addr) if prefix or draw(st.booleans()) else ecs_option(0, 0, b""))
        for _ in range(draw(st.integers(0, 2))):
            options.append((draw(st.sampled_from([3, 10, 12, 100, 65001])), draw(st.binary(max_size=12))))
        extra.append(opt_rr(
            draw(st.sampled_from([0, 511, 512, 1232, 4096, 65535]) | st.integers(0, 65535)),
            version=draw(st.sampled_from([0, 0, 0, 1])),
            do=draw(st.booleans()),
            options=options,
        ))
    data = bytearray(request(id=draw(st.integers(0, 0xFFFF)), flags=flags, body=qname + struct.pack("!HH", qtype, qclass), additional=extra))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data), draw(st.booleans())


def populated_tables() -> list[object]:
    """Answer tables over the fixture catalog of test_table, in three configurations (the
    defaults; alt domain, recursors and truncation; no compression, A limit, only passing).
    Also used by tests/fuzz/fuzz_packet.py."""
    from dnsdisco.config import Config, DnsConfig
    from tests.unit.test_table import make_table

    return [
        make_table(),
        make_table(Config(alt_domain="disco.", recursors=("192.0.2.53",),
                          dns_config=DnsConfig(enable_truncate=True, udp_answer_limit=100))),
        make_table(Config(dns_config=DnsConfig(disable_compression=True, a_record_limit=2, only_passing=True))),
    ]


TABLES = populated_tables()


def _question_len(msg: bytes) -> int:
    """Length of the (uncompressed) question at offset 12 of *msg*."""
    off = 12
    while msg[off]:
        off += 1 + msg[off]
    return off + 1 + 4 - 12


_FAMILY0_ECS = struct.pack("!HHHBB", 8, 4, 0, 0, 0)  # ECS echo of "dig +subnet=0": FAMILY 0, /0, scope 0


def _without_family0_ecs(reply: bytes) -> bytes:
    """*reply* with a FAMILY 0 ECS echo cut from its OPT, when that is its last RR.

    dig's +subnet=0 sends FAMILY 0 and we echo it as sent (wire._check_ecs), but dnspython
    refuses to read an ECS option of a family other than 1 or 2.
    """
    n = len(_FAMILY0_ECS)
    if len(reply) < 12 + 11 + n or not reply.endswith(_FAMILY0_ECS):
        return reply
    opt = reply[-n - 11 : -n]  # owner (root), TYPE, CLASS, TTL, RDLENGTH
    if opt[:3] != b"\x00\x00\x29" or opt[-2:] != struct.pack("!H", n):
        return reply
    return reply[: -n - 2] + b"\x00\x00"


def check_answer_path(table: object, data: bytes, tcp: bool) -> None:
    """Run *data* through parse and *table* as the server does; check the reply (if any)."""
    out = wire.parse(data, tcp=tcp, client=CLIENT)
    if out is None:
        return
    if isinstance(out, Query):
        reply = table.respond(out)  # type: ignore[attr-defined]
        if reply is None:  # not ours: the forwarder's business
            return
        assert isinstance(reply, bytes)
        assert reply[12 : 12 + len(out.question)] == out.question  # the question as sent
        assert header_of(reply)[2] == 1
        if not tcp:
            assert len(reply) <= out.max_size, (len(reply), out.max_size)
        assert len(reply) <= 65535
        msg = dns.message.from_wire(_without_family0_ecs(reply))
        assert msg.edns == (-1 if out.edns is None else 0)  # OPT iff the request had one
    else:
        reply = out
        # Opcode cleared for dnspython (it reads an UPDATE's question as a zone section).
        msg = dns.message.from_wire(_without_family0_ecs(reply[:2] + bytes([reply[2] & 0x87]) + reply[3:]))
        if header_of(reply)[2]:
            qlen = _question_len(reply)
            assert data[12 : 12 + qlen] == reply[12 : 12 + qlen]  # the question as sent
    assert reply[:2] == data[:2]  # the ID
    assert reply[2] & 0x80  # QR
    assert (reply[2] & 0x78) == (data[2] & 0x78)  # the opcode is copied


@settings(max_examples=1500, deadline=None)
@given(_requests(), st.integers(0, len(TABLES) - 1))
def test_any_request_through_the_answer_table(req, which):
    data, tcp = req
    check_answer_path(TABLES[which], data, tcp)


@pytest.mark.parametrize("name", _NAMES)
def test_every_spec_form_gets_an_answer_through_the_table(name):
    # The strategy above relies on these names being answered (not declined): a table that
    # declined them all would make the property test vacuous.
    table = TABLES[0]
    data = request(name, 1 if "arpa" not in name else 12, id=0x4242, additional=[opt_rr(1232)])
    q = parse(data)
    assert isinstance(q, Query)
    reply = table.respond(q)  # type: ignore[attr-defined]
    if name in ("example.com.", "."):
        assert reply is None  # outside our zones: for the forwarder
        return
    assert reply is not None, name
    check_answer_path(table, data, False)
