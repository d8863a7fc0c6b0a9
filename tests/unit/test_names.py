"""Question names to lookups (spec §1.3/§1.4), as tables in the style of CoreDNS parse_test.go."""

from __future__ import annotations

import pytest

from dnsdisco.dns.message import Qtype
from dnsdisco.dns.names import (
    AddrLookup,
    NodeLookup,
    PreparedQueryLookup,
    ServiceLookup,
    UnsupportedLookup,
    addr_label,
    in_domain,
    normalize_domain,
    parse,
    parse_reverse,
    split_zone,
)

A, SRV = Qtype.A, Qtype.SRV


@pytest.mark.parametrize(
    ("rest", "qtype", "want"),
    [
        # service forms
        ("web.service", A, ServiceLookup("web")),
        ("web.service.dc1", A, ServiceLookup("web", None, "dc1")),
        ("web.service.dc1.dc", A, ServiceLookup("web", None, "dc1")),
        ("primary.web.service", A, ServiceLookup("web", "primary")),
        ("v1.primary.db.service", A, ServiceLookup("db", "v1.primary")),
        ("primary.web.service.dc2", A, ServiceLookup("web", "primary", "dc2")),
        ("consul.service", A, ServiceLookup("consul")),
        # keywords are found right to left: earlier keyword labels are query parts
        ("node.service", A, ServiceLookup("node")),
        ("service.web.service", A, ServiceLookup("web", "service")),
        # RFC 2782
        ("_web._tcp.service", A, ServiceLookup("web")),
        ("_web._tcp.service", SRV, ServiceLookup("web")),
        ("_web._primary.service", SRV, ServiceLookup("web", "primary")),
        ("_web._udp.service.dc1", SRV, ServiceLookup("web", "udp", "dc1")),
        ("_db._tcp", SRV, ServiceLookup("db")),
        ("_db._primary.dc1", SRV, ServiceLookup("db", "primary", "dc1")),
        ("_db._tcp", A, None),  # the keyword is optional for SRV only
        ("_._tcp.service", SRV, None),
        ("_a._b._c.service", SRV, ServiceLookup("_c", "_a._b")),
        # node forms
        ("foo.node", A, NodeLookup("foo")),
        ("foo.bar.node", A, NodeLookup("foo.bar")),
        ("foo.node.dc2", A, NodeLookup("foo", "dc2")),
        ("foo.node.dc2.dc", A, NodeLookup("foo", "dc2")),
        # addr
        ("7f000001.addr", A, AddrLookup(bytes([127, 0, 0, 1]))),
        ("7f000001.addr.dc1", A, AddrLookup(bytes([127, 0, 0, 1]))),
        ("7F000001.addr".lower(), A, AddrLookup(bytes([127, 0, 0, 1]))),
        ("20010db8000000000000000000000001.addr", A, AddrLookup(bytes.fromhex("20010db8" + "0" * 23 + "1"))),
        ("7f0000.addr", A, None),
        ("7f00000g.addr", A, None),
        ("a.7f000001.addr", A, None),
        # prepared queries
        ("geo.query", A, PreparedQueryLookup("geo")),
        ("some.query.we.like.query", A, PreparedQueryLookup("some.query.we.like")),
        ("geo.query.dc2", A, PreparedQueryLookup("geo", "dc2")),
        ("_geo._tcp.query", SRV, PreparedQueryLookup("geo")),
        ("geo.query.dc2.dc", A, None),
        # out of scope forms
        ("web.connect", A, UnsupportedLookup("connect")),
        ("web.ingress", A, UnsupportedLookup("ingress")),
        ("web.virtual", A, UnsupportedLookup("virtual")),
        ("web.service.peer1.peer", A, UnsupportedLookup("peer")),
        # invalid
        ("", A, None),
        ("service", A, None),
        ("node", A, None),
        ("query", A, None),
        ("nonexisting", A, None),
        ("foo.service.dc1.extra.more", A, None),
        ("foo.service.a.b.c", A, None),
        ("foo.service.a.dc.b.peer", A, None),
        ("foo.service.a.ns", A, None),
        ("foo.service.a.dc.b.dc", A, None),
    ],
)
def test_parse(rest: str, qtype: int, want: object) -> None:
    assert parse(rest, qtype) == want


@pytest.mark.parametrize(
    ("qname", "domains", "want"),
    [
        ("web.service.consul.", ("consul.",), ("consul.", "web.service")),
        ("consul.", ("consul.",), ("consul.", "")),
        ("xconsul.", ("consul.",), None),
        ("web.service.example.", ("consul.",), None),
        ("web.service.test.consul.", ("consul.", "test.consul."), ("test.consul.", "web.service")),
        ("web.service.test.consul.", ("test.consul.", "consul."), ("test.consul.", "web.service")),
        ("web.service.alt.", ("consul.", "alt."), ("alt.", "web.service")),
        ("web.service.consul.", ("consul.", ""), ("consul.", "web.service")),
    ],
)
def test_split_zone(qname: str, domains: tuple[str, ...], want: object) -> None:
    assert split_zone(qname, domains) == want


def test_domain_normalisation() -> None:
    assert normalize_domain("CONSUL.") == normalize_domain("consul") == "consul."
    assert normalize_domain("") == ""
    assert in_domain("consul.", "consul.") and in_domain("a.consul.", "consul.")
    assert not in_domain("aconsul.", "consul.")


@pytest.mark.parametrize(
    ("qname", "want"),
    [
        ("1.0.0.10.in-addr.arpa.", bytes([10, 0, 0, 1])),
        ("255.2.168.192.in-addr.arpa.", bytes([192, 168, 2, 255])),
        ("0.0.10.in-addr.arpa.", None),
        ("256.0.0.10.in-addr.arpa.", None),
        ("01.0.0.10.in-addr.arpa.", None),
        ("x.0.0.10.in-addr.arpa.", None),
        (".".join("10000000000000000000000000000000"[::-1][i] for i in range(32)) + ".ip6.arpa.",
         bytes.fromhex("10000000000000000000000000000000")),
        ("1.ip6.arpa.", None),
        ("in-addr.arpa.", None),
        ("arpa.", None),
    ],
)
def test_parse_reverse(qname: str, want: bytes | None) -> None:
    assert parse_reverse(qname) == want


def test_addr_label() -> None:
    assert addr_label(bytes([127, 0, 0, 1])) == "7f000001"
    assert addr_label(bytes(16)) == "0" * 32
