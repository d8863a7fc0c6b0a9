"""The RR encoder, checked against dnspython's parser (an independent implementation)."""

from __future__ import annotations

import struct

import dns.message
import dns.rdatatype
import pytest

from dnsdisco.dns import rr
from dnsdisco.dns.rr import Name, put_name, rfc1464, write_rr


def _message(question: str, answers: list[rr.RR]) -> dns.message.Message:
    """A reply with *answers* after a question for *question* A, compressed, parsed back."""
    qwire = Name(question).wire
    body = bytearray()
    table: dict[str, int] = {}
    base = 12 + len(qwire) + 4
    for record in answers:
        write_rr(body, record, table, base, qwire)
    wire = struct.pack("!HHHHHH", 7, 0x8400, 1, len(answers), 0, 0) + qwire + b"\x00\x01\x00\x01" + bytes(body)
    return dns.message.from_wire(wire)


def _texts(msg: dns.message.Message) -> list[str]:
    return sorted(line for rrset in msg.answer for line in rrset.to_text().splitlines())


def test_name_wire_and_keys() -> None:
    name = Name("Node1.node.DC1.consul")
    assert name.wire == b"\x05Node1\x04node\x03DC1\x06consul\x00"
    assert name.keys == ("node1.node.dc1.consul.", "node.dc1.consul.", "dc1.consul.", "consul.")
    assert name.text == "Node1.node.DC1.consul."
    assert Name(".").wire == b"\x00" and Name(".").keys == ()


@pytest.mark.parametrize("bad", ["a" * 64 + ".consul", ".".join(["abcdefghi"] * 30), "a..b"])
def test_name_rejects_bad_names(bad: str) -> None:
    with pytest.raises(ValueError):
        Name(bad)


def test_compression_reuses_suffixes_and_spelling() -> None:
    table = {"consul.": 12}
    buf = bytearray()
    first = put_name(buf, Name("a.node.dc1.consul."), table, 100)
    assert first == 100
    # "a" "node" "dc1" then a pointer to offset 12
    assert bytes(buf) == b"\x01a\x04node\x03dc1\xc0\x0c"
    buf2 = bytearray()
    put_name(buf2, Name("B.node.DC1.consul."), table, 200)
    assert bytes(buf2) == b"\x01B" + rr.pointer(102)  # "node.dc1.consul." at 102, case-insensitive
    buf3 = bytearray()
    assert put_name(buf3, Name("A.NODE.dc1.consul."), table, -1) == 100
    assert bytes(buf3) == rr.pointer(100)


def test_compression_never_points_beyond_16k() -> None:
    table: dict[str, int] = {}
    buf = bytearray()
    put_name(buf, Name("far.example."), table, 0x4000)
    assert table == {}
    assert put_name(bytearray(), Name("far.example."), table, 0) == 0  # registered now, low


def test_uncompressed_when_table_is_none() -> None:
    buf = bytearray()
    assert put_name(buf, Name("x.consul."), None, 50) == -1
    assert bytes(buf) == Name("x.consul.").wire


def test_records_parse_with_dnspython() -> None:
    target = Name("node1.node.dc1.consul.")
    answers = [
        rr.a_or_aaaa(None, 30, bytes([10, 0, 0, 1])),
        rr.a_or_aaaa(None, 30, bytes.fromhex("20010db8000000000000000000000001")),
        rr.cname(None, 5, Name("ext.example.com.")),
        rr.srv(None, 7, 1, 10, 8080, target),
        rr.a_or_aaaa(target, 7, bytes([10, 0, 0, 1])),
        rr.txt(target, 7, "rack=r1"),
        rr.ns(Name("consul."), 0, Name("srv1.node.dc1.consul.")),
        rr.ptr(None, 0, target),
    ]
    msg = _message("web.service.consul.", answers)
    assert _texts(msg) == sorted(
        [
            "web.service.consul. 30 IN A 10.0.0.1",
            "web.service.consul. 30 IN AAAA 2001:db8::1",
            "web.service.consul. 5 IN CNAME ext.example.com.",
            "web.service.consul. 7 IN SRV 1 10 8080 node1.node.dc1.consul.",
            "node1.node.dc1.consul. 7 IN A 10.0.0.1",
            'node1.node.dc1.consul. 7 IN TXT "rack=r1"',
            "consul. 0 IN NS srv1.node.dc1.consul.",
            "web.service.consul. 0 IN PTR node1.node.dc1.consul.",
        ]
    )


def test_long_txt_is_split_into_character_strings() -> None:
    record = rr.txt(None, 0, "k=" + "v" * 600)
    msg = _message("n.node.consul.", [record])
    strings = msg.answer[0][0].strings
    assert [len(s) for s in strings] == [255, 255, 92]
    assert b"".join(strings) == b"k=" + b"v" * 600


def test_soa_parts_splice_the_serial() -> None:
    qwire = Name("consul.").wire
    table = {"consul.": 12}
    before, after = rr.soa_parts(
        Name("consul."), Name("ns.consul."), Name("hostmaster.consul."), 0, 3600, 600, 86400, 5,
        table, 12 + len(qwire) + 4, qwire,
    )
    record = before + struct.pack("!I", 1700000000) + after
    wire = struct.pack("!HHHHHH", 1, 0x8400, 1, 0, 1, 0) + qwire + b"\x00\x06\x00\x01" + record
    msg = dns.message.from_wire(wire)
    assert msg.authority[0].to_text() == "consul. 0 IN SOA ns.consul. hostmaster.consul. 1700000000 3600 600 86400 5"
    assert before.startswith(b"\xc0\x0c")  # owner points at the question


def test_raw_size_counts_every_name_in_full() -> None:
    target = Name("node1.node.dc1.consul.")
    record = rr.srv(None, 0, 1, 1, 80, target)
    assert record.raw_size(20) == 20 + 10 + 6 + len(target.wire)


# TestDNS_EncodeKVasRFC1464's vectors (spec §1.8); "`" is the back-quote.
@pytest.mark.parametrize(
    ("key", "value", "want"),
    [
        ("color", "blue", "color=blue"),
        ("equation", "a=4", "equation=a=4"),
        ("a=a", "true", "a`=a=true"),
        ("a\\=a", "false", "a\\`=a=false"),
        ("=", "\\=", "`==\\="),
        ("string", '"Cat"', 'string="Cat"'),
        ("string2", "`abc`", "string2=``abc``"),
        ("novalue", "", "novalue="),
        ("a b", "c d", "a b=c d"),
        ("abc ", "123 ", "abc` =123 "),
        (" abc", " 321", "` abc= 321"),
        ("`a", "b", "``a=b"),
        ("rfc1035-00", "value0", "value0"),
        ("RFC1035-x", "raw", "raw"),
        ("  two", "x", "` ` two=x"),
    ],
)
def test_rfc1464(key: str, value: str, want: str) -> None:
    assert rfc1464(key, value) == want


def test_rfc1464_round_trips_through_the_wire() -> None:
    msg = _message("n.node.consul.", [rr.txt(None, 0, rfc1464("a=a", "`x"))])
    assert msg.answer[0][0].strings == (b"a`=a=``x",)
    assert msg.answer[0].rdtype == dns.rdatatype.TXT
