"""The answer table, table-driven (CoreDNS test.Case style): a fixture catalog, queries built
as the transport builds them, replies parsed by dnspython and compared as sorted zone text.

The helpers at the top (``catalog``, ``make_query``, ``ask``, ``lines``) are reused by the
other ``test_dns_*`` modules.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import dns.flags
import dns.message
import dns.rcode
import pytest

from dnsdisco.catalog.model import (
    CRITICAL,
    PASSING,
    WARNING,
    CatalogDelta,
    Check,
    Node,
    Service,
    ServiceEntry,
    TaggedAddress,
    Weights,
)
from dnsdisco.config import Config, DnsConfig
from dnsdisco.dns.message import EDNS_OPTION_ECS, Edns, Qtype, Query
from dnsdisco.dns.rr import wire_name
from dnsdisco.dns.table import AnswerTable

NOW = 1_700_000_000.0
SOA = "consul. 0 IN SOA ns.consul. hostmaster.consul. 1700000000 3600 600 86400 0"

# -- helpers (shared) ------------------------------------------------------------------------


def make_query(
    name: str,
    qtype: int,
    *,
    edns: Edns | None = None,
    tcp: bool = False,
    id: int = 0xBEEF,
    flags: int = 0x0100,
) -> Query:
    """A Query as the transport makes it: question bytes as sent, lower-cased qname."""
    if not name.endswith("."):
        name += "."
    question = wire_name(name) + struct.pack("!HH", qtype, 1)
    if tcp:
        max_size = 65535
    elif edns is not None:
        max_size = max(512, min(edns.payload, 65467))
    else:
        max_size = 512
    return Query(
        id=id, flags=flags, question=question, qname=name.lower(), qtype=qtype, edns=edns,
        tcp=tcp, max_size=max_size,
    )


def parse_reply(wire: bytes | None, query: Query) -> dns.message.Message:
    """dnspython parses the reply (an independent check of the encoding); ID and question echo."""
    assert wire is not None, "the table declined a name it should answer"
    msg = dns.message.from_wire(wire)
    assert msg.id == query.id
    assert wire[12 : 12 + len(query.question)] == query.question  # the question as sent
    return msg


def ask(table: AnswerTable, name: str, qtype: int, **kw: object) -> dns.message.Message:
    query = make_query(name, qtype, **kw)  # type: ignore[arg-type]
    return parse_reply(table.respond(query), query)


def lines(section: Iterable[object]) -> list[str]:
    """Sorted zone-text lines of a message section (OPT excluded)."""
    return sorted(line for rrset in section for line in rrset.to_text().splitlines())  # type: ignore[attr-defined]


def check(status: str, node: str, service_id: str = "") -> Check:
    return Check(node=node, check_id=f"{node}:{service_id or 'node'}", name="c", status=status, service_id=service_id)


def inst(
    node: Node,
    name: str,
    *,
    sid: str = "",
    port: int = 0,
    address: str = "",
    tags: tuple[str, ...] = (),
    status: str | None = None,
    node_status: str | None = None,
    weights: Weights = Weights(),
    tagged: dict[str, TaggedAddress] | None = None,
) -> ServiceEntry:
    sid = sid or f"{name}-{node.name}-{port}"
    checks = []
    if status:
        checks.append(check(status, node.name, sid))
    if node_status:
        checks.append(check(node_status, node.name))
    svc = Service(node=node.name, id=sid, name=name, tags=tags, address=address, port=port,
                  weights=weights, tagged_addresses=tagged or {})
    return ServiceEntry(node, svc, tuple(checks))


def group(entries: Iterable[ServiceEntry]) -> dict[str, tuple[ServiceEntry, ...]]:
    out: dict[str, list[ServiceEntry]] = {}
    for e in entries:
        out.setdefault(e.service.name.lower(), []).append(e)
    return {k: tuple(v) for k, v in out.items()}


N1 = Node("node1", "10.0.0.1", "dc1", meta={"consul-network-segment": "", "rack": "r1"})
N2 = Node("node2", "10.0.0.2", "dc1")
N3 = Node("node3", "10.0.0.3", "dc1")
N6 = Node("node6", "2001:db8::6", "dc1")
NH = Node("nodeh", "nodeh.example.com", "dc1")
NDUAL = Node("dual", "10.0.0.7", "dc1", tagged_addresses={"lan_ipv4": "10.0.0.7", "lan_ipv6": "2001:db8::7"})
NMIX = Node("Mixed.Case", "10.0.0.9", "dc1")
NSICK = Node("sick", "10.0.0.66", "dc1")
SERVERS = [Node(f"srv{i}", f"10.0.1.{i}", "dc1") for i in range(1, 5)]
SRV_BAD = Node("srv_bad", "10.0.1.9", "dc1")
N2A = Node("n2a", "10.2.0.1", "dc2", tagged_addresses={"wan": "198.51.100.1"})


def catalog() -> dict[str, tuple[ServiceEntry, ...]]:
    """The fixture catalog of dc1, by lower-cased service name."""
    return group(
        [
            inst(N1, "web", port=80, tags=("primary", "v1")),
            inst(N2, "web", port=80, tags=("secondary",)),
            inst(N3, "web", port=8080, tags=("Primary",)),
            inst(N1, "db", port=5432, address="10.0.5.1", tags=("primary",)),
            inst(N2, "db", port=5432, tags=("replica",), status=WARNING),
            inst(N3, "db", port=5432, status=CRITICAL),
            inst(N6, "api", port=443),
            inst(N2, "ext", port=443, address="ext.example.com"),
            inst(N3, "alias", port=80, address="web.service.consul"),
            inst(N3, "loop", port=80, address="loop.service.consul"),
            *[inst(n, "consul", port=8300) for n in [*SERVERS, SRV_BAD]],
            inst(N1, "weighted", port=1, weights=Weights(10, 1), status=PASSING),
            inst(N2, "weighted", port=2, weights=Weights(10, 1), status=WARNING),
            inst(N1, "down", port=1, status=CRITICAL),
            inst(NSICK, "nc", port=1, node_status=CRITICAL),
            inst(NH, "hosty", port=80),
            inst(NDUAL, "dualsvc", port=80),
            inst(N1, "two", sid="two-a", port=80),
            inst(N1, "two", sid="two-b", port=81),
            inst(N1, "two", sid="two-c", port=80),
        ]
    )


NODES = {n.name: n for n in [N1, N2, N3, N6, NH, NDUAL, NMIX, NSICK, *SERVERS, SRV_BAD]}


def full_delta(services: dict[str, tuple[ServiceEntry, ...]] | None = None, index: int = 1) -> CatalogDelta:
    return CatalogDelta("dc1", index, catalog() if services is None else services, dict(NODES), full=True)


def dc2_delta() -> CatalogDelta:
    return CatalogDelta("dc2", 1, group([inst(N2A, "web", port=80)]), {"n2a": N2A}, full=True)


def make_table(config: Config | None = None, *, seed: int = 42, sync: bool = True) -> AnswerTable:
    table = AnswerTable(config or Config(), rng=random.Random(seed), clock=lambda: NOW)
    if sync:
        table.apply(full_delta())
        table.apply(dc2_delta())
    return table


# -- table-driven cases ----------------------------------------------------------------------


@dataclass
class Case:
    qname: str
    qtype: int
    rcode: int = dns.rcode.NOERROR
    answer: list[str] = field(default_factory=list)
    ns: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    edns: bool = False

    def __str__(self) -> str:
        return f"{self.qname}/{Qtype(self.qtype).name}"


def glue(node: str, ip: str) -> str:
    return f"{node}.node.dc1.consul. 0 IN A {ip}"


N1_TXT = ['node1.node.dc1.consul. 0 IN TXT "consul-network-segment="', 'node1.node.dc1.consul. 0 IN TXT "rack=r1"']
NX = dns.rcode.NXDOMAIN
W = "web.service.consul."
WEB_A = [f"{W} 0 IN A 10.0.0.1", f"{W} 0 IN A 10.0.0.2", f"{W} 0 IN A 10.0.0.3"]
WEB_SRV = [
    f"{W} 0 IN SRV 1 1 80 node1.node.dc1.consul.",
    f"{W} 0 IN SRV 1 1 80 node2.node.dc1.consul.",
    f"{W} 0 IN SRV 1 1 8080 node3.node.dc1.consul.",
]
WEB_GLUE = [glue("node1", "10.0.0.1"), glue("node2", "10.0.0.2"), glue("node3", "10.0.0.3"), *N1_TXT]

CASES = [
    # service lookups: A / AAAA / ANY / SRV / TXT / other
    Case(W, Qtype.A, answer=WEB_A),
    Case(W, Qtype.ANY, answer=WEB_A),
    Case(W, Qtype.AAAA, ns=[SOA]),
    Case(W, Qtype.SRV, answer=WEB_SRV, extra=WEB_GLUE),
    Case(W, Qtype.TXT, ns=[SOA]),  # Consul: A records; we: NODATA (Decisions)
    Case(W, Qtype.MX, ns=[SOA]),
    Case(W, Qtype.PTR, ns=[SOA]),
    Case("WEB.Service.CONSUL.", Qtype.A, answer=[x.replace(W, "WEB.Service.CONSUL.") for x in WEB_A]),
    Case(
        "Web.Service.Consul.", Qtype.SRV,
        answer=[x.replace(W, "Web.Service.Consul.").replace("dc1.consul.", "dc1.Consul.") for x in WEB_SRV],
        extra=[x.replace("dc1.consul.", "dc1.Consul.") for x in WEB_GLUE],
    ),
    # locality forms
    Case("web.service.dc1.consul.", Qtype.A, answer=[x.replace(W, "web.service.dc1.consul.") for x in WEB_A]),
    Case("web.service.dc1.dc.consul.", Qtype.A, answer=[x.replace(W, "web.service.dc1.dc.consul.") for x in WEB_A]),
    Case("web.service.DC1.consul.", Qtype.A, answer=[x.replace(W, "web.service.DC1.consul.") for x in WEB_A]),
    Case("web.service.dc2.consul.", Qtype.A, answer=["web.service.dc2.consul. 0 IN A 10.2.0.1"]),
    Case("web.service.dc2.consul.", Qtype.SRV, answer=["web.service.dc2.consul. 0 IN SRV 1 1 80 n2a.node.dc2.consul."],
         extra=["n2a.node.dc2.consul. 0 IN A 10.2.0.1"]),
    Case("web.service.dc9.consul.", Qtype.A, NX, ns=[SOA]),
    Case("web.service.dc9.dc.consul.", Qtype.A, NX, ns=[SOA]),
    Case("web.service.peer1.peer.consul.", Qtype.A, NX, ns=[SOA]),
    Case("web.service.dc1.extra.more.consul.", Qtype.A, NX, ns=[SOA]),
    # tags (case-insensitive), RFC 2782
    Case("primary.web.service.consul.", Qtype.A,
         answer=["primary.web.service.consul. 0 IN A 10.0.0.1", "primary.web.service.consul. 0 IN A 10.0.0.3"]),
    Case("v1.web.service.consul.", Qtype.A, answer=["v1.web.service.consul. 0 IN A 10.0.0.1"]),
    Case("dummy.primary.web.service.consul.", Qtype.A, NX, ns=[SOA]),
    Case("nosuchtag.web.service.consul.", Qtype.A, NX, ns=[SOA]),
    Case("_web._primary.service.consul.", Qtype.SRV,
         answer=["_web._primary.service.consul. 0 IN SRV 1 1 80 node1.node.dc1.consul.",
                 "_web._primary.service.consul. 0 IN SRV 1 1 8080 node3.node.dc1.consul."],
         extra=[glue("node1", "10.0.0.1"), glue("node3", "10.0.0.3"), *N1_TXT]),
    Case("_web._tcp.service.consul.", Qtype.SRV, answer=[x.replace(W, "_web._tcp.service.consul.") for x in WEB_SRV],
         extra=WEB_GLUE),
    Case("_web._tcp.consul.", Qtype.SRV, answer=[x.replace(W, "_web._tcp.consul.") for x in WEB_SRV], extra=WEB_GLUE),
    Case("_web._primary.dc1.consul.", Qtype.SRV,
         answer=["_web._primary.dc1.consul. 0 IN SRV 1 1 80 node1.node.dc1.consul.",
                 "_web._primary.dc1.consul. 0 IN SRV 1 1 8080 node3.node.dc1.consul."],
         extra=[glue("node1", "10.0.0.1"), glue("node3", "10.0.0.3"), *N1_TXT]),
    Case("_web._tcp.consul.", Qtype.A, NX, ns=[SOA]),
    Case("_web._udp.service.consul.", Qtype.SRV, NX, ns=[SOA]),  # tag "udp" matches nothing
    # health: warning kept, critical dropped (service or node check), all down -> NXDOMAIN
    Case("db.service.consul.", Qtype.A,
         answer=["db.service.consul. 0 IN A 10.0.0.2", "db.service.consul. 0 IN A 10.0.5.1"]),
    Case("db.service.consul.", Qtype.SRV,
         answer=["db.service.consul. 0 IN SRV 1 1 5432 0a000501.addr.dc1.consul.",
                 "db.service.consul. 0 IN SRV 1 1 5432 node2.node.dc1.consul."],
         extra=["0a000501.addr.dc1.consul. 0 IN A 10.0.5.1", glue("node2", "10.0.0.2"), *N1_TXT]),
    Case("down.service.consul.", Qtype.A, NX, ns=[SOA]),
    Case("nc.service.consul.", Qtype.A, NX, ns=[SOA]),
    Case("nope.service.consul.", Qtype.A, NX, ns=[SOA]),
    Case("nope.service.consul.", Qtype.SRV, NX, ns=[SOA]),
    # SRV weights by health; same-node de-duplication; shared glue written once
    Case("weighted.service.consul.", Qtype.SRV,
         answer=["weighted.service.consul. 0 IN SRV 1 10 1 node1.node.dc1.consul.",
                 "weighted.service.consul. 0 IN SRV 1 1 2 node2.node.dc1.consul."],
         extra=[glue("node1", "10.0.0.1"), glue("node2", "10.0.0.2"), *N1_TXT]),
    Case("two.service.consul.", Qtype.SRV,
         answer=["two.service.consul. 0 IN SRV 1 1 80 node1.node.dc1.consul.",
                 "two.service.consul. 0 IN SRV 1 1 81 node1.node.dc1.consul."],
         extra=[glue("node1", "10.0.0.1"), *N1_TXT]),
    Case("two.service.consul.", Qtype.A, answer=["two.service.consul. 0 IN A 10.0.0.1"]),
    # IPv6
    Case("api.service.consul.", Qtype.AAAA, answer=["api.service.consul. 0 IN AAAA 2001:db8::6"]),
    Case("api.service.consul.", Qtype.A, ns=[SOA]),
    Case("api.service.consul.", Qtype.SRV, answer=["api.service.consul. 0 IN SRV 1 1 443 node6.node.dc1.consul."],
         extra=["node6.node.dc1.consul. 0 IN AAAA 2001:db8::6"]),
    Case("dualsvc.service.consul.", Qtype.A, answer=["dualsvc.service.consul. 0 IN A 10.0.0.7"]),
    Case("dualsvc.service.consul.", Qtype.AAAA, answer=["dualsvc.service.consul. 0 IN AAAA 2001:db8::7"]),
    Case("dualsvc.service.consul.", Qtype.ANY, answer=["dualsvc.service.consul. 0 IN AAAA 2001:db8::7"]),
    # hostnames: CNAME; outside the domain CNAME only; inside resolved; self-reference bounded
    Case("ext.service.consul.", Qtype.A, answer=["ext.service.consul. 0 IN CNAME ext.example.com."]),
    Case("ext.service.consul.", Qtype.AAAA, answer=["ext.service.consul. 0 IN CNAME ext.example.com."]),
    Case("ext.service.consul.", Qtype.MX, answer=["ext.service.consul. 0 IN CNAME ext.example.com."]),
    Case("ext.service.consul.", Qtype.SRV, answer=["ext.service.consul. 0 IN SRV 1 1 443 ext.example.com."]),
    Case("hosty.service.consul.", Qtype.A, answer=["hosty.service.consul. 0 IN CNAME nodeh.example.com."]),
    Case("alias.service.consul.", Qtype.SRV, answer=["alias.service.consul. 0 IN SRV 1 1 80 web.service.consul."],
         extra=WEB_A),
    # loop.service.consul points at itself; asked by that very name the node address is used
    Case("loop.service.consul.", Qtype.A, answer=["loop.service.consul. 0 IN A 10.0.0.3"]),
    # nodes: health ignored; meta TXT in Additional for A/AAAA, in Answer for ANY/TXT
    Case("node1.node.consul.", Qtype.A, answer=["node1.node.consul. 0 IN A 10.0.0.1"],
         extra=['node1.node.consul. 0 IN TXT "consul-network-segment="', 'node1.node.consul. 0 IN TXT "rack=r1"']),
    Case("node1.node.consul.", Qtype.ANY,
         answer=["node1.node.consul. 0 IN A 10.0.0.1", 'node1.node.consul. 0 IN TXT "consul-network-segment="',
                 'node1.node.consul. 0 IN TXT "rack=r1"']),
    Case("node1.node.consul.", Qtype.TXT,
         answer=['node1.node.consul. 0 IN TXT "consul-network-segment="', 'node1.node.consul. 0 IN TXT "rack=r1"']),
    Case("node1.node.consul.", Qtype.AAAA, ns=[SOA]),  # Consul: no SOA; we: SOA (Decisions)
    Case("node1.node.consul.", Qtype.SRV, ns=[SOA]),
    Case("node1.node.consul.", Qtype.MX, ns=[SOA]),
    Case("node2.node.consul.", Qtype.TXT, ns=[SOA]),
    Case("node2.node.dc1.consul.", Qtype.A, answer=["node2.node.dc1.consul. 0 IN A 10.0.0.2"]),
    Case("node3.node.dc1.dc.consul.", Qtype.A, answer=["node3.node.dc1.dc.consul. 0 IN A 10.0.0.3"]),
    Case("sick.node.consul.", Qtype.A, answer=["sick.node.consul. 0 IN A 10.0.0.66"]),
    Case("node6.node.consul.", Qtype.AAAA, answer=["node6.node.consul. 0 IN AAAA 2001:db8::6"]),
    Case("dual.node.consul.", Qtype.ANY, answer=["dual.node.consul. 0 IN AAAA 2001:db8::7"]),
    Case("mixed.case.node.consul.", Qtype.A, answer=["mixed.case.node.consul. 0 IN A 10.0.0.9"]),
    Case("nodeh.node.consul.", Qtype.A, answer=["nodeh.node.consul. 0 IN CNAME nodeh.example.com."]),
    Case("n2a.node.dc2.consul.", Qtype.A, answer=["n2a.node.dc2.consul. 0 IN A 10.2.0.1"]),
    Case("nonode.node.consul.", Qtype.A, NX, ns=[SOA]),
    Case("node1.node.dc9.consul.", Qtype.A, NX, ns=[SOA]),
    # addr
    Case("0a000001.addr.consul.", Qtype.A, answer=["0a000001.addr.consul. 0 IN A 10.0.0.1"]),
    Case("0a000001.addr.dc1.consul.", Qtype.ANY, answer=["0a000001.addr.dc1.consul. 0 IN A 10.0.0.1"]),
    Case("0a000001.addr.consul.", Qtype.AAAA, ns=[SOA]),
    Case("0a000001.addr.consul.", Qtype.SRV, ns=[SOA]),  # Consul: A in Additional; we: NODATA
    Case("20010db8000000000000000000000001.addr.consul.", Qtype.AAAA,
         answer=["20010db8000000000000000000000001.addr.consul. 0 IN AAAA 2001:db8::1"]),
    Case("0a0000.addr.consul.", Qtype.A, NX, ns=[SOA]),
    # invalid names and forms we do not serve
    Case("consul.", Qtype.A, NX, ns=[SOA]),
    Case("service.consul.", Qtype.A, NX, ns=[SOA]),
    Case("node.consul.", Qtype.A, NX, ns=[SOA]),
    Case("query.consul.", Qtype.A, NX, ns=[SOA]),
    Case("nonexisting.consul.", Qtype.A, NX, ns=[SOA]),
    Case("geo.query.consul.", Qtype.A, NX, ns=[SOA]),
    Case("web.connect.consul.", Qtype.A, NX, ns=[SOA]),
    Case("web.virtual.consul.", Qtype.A, NX, ns=[SOA]),
    # AXFR
    Case("consul.", Qtype.AXFR, dns.rcode.NOTIMP),
    Case("web.service.consul.", Qtype.AXFR, dns.rcode.NOTIMP),
    # reverse
    Case("1.0.0.10.in-addr.arpa.", Qtype.PTR, answer=["1.0.0.10.in-addr.arpa. 0 IN PTR node1.node.dc1.consul."]),
    Case("1.0.0.10.in-addr.arpa.", Qtype.ANY, answer=["1.0.0.10.in-addr.arpa. 0 IN PTR node1.node.dc1.consul."]),
    Case("9.0.0.10.in-addr.arpa.", Qtype.PTR, answer=["9.0.0.10.in-addr.arpa. 0 IN PTR Mixed.Case.node.dc1.consul."]),
    Case("1.5.0.10.in-addr.arpa.", Qtype.PTR, answer=["1.5.0.10.in-addr.arpa. 0 IN PTR db.service.dc1.consul."]),
    Case("1.0.0.10.in-addr.arpa.", Qtype.A, ns=[SOA]),  # Consul: PTR anyway; we: NODATA
    Case("9.9.9.10.in-addr.arpa.", Qtype.PTR, NX, ns=[SOA]),
    Case("0.10.in-addr.arpa.", Qtype.PTR, NX, ns=[SOA]),
    Case(".".join(reversed("20010db8000000000000000000000006")) + ".ip6.arpa.", Qtype.PTR,
         answer=[".".join(reversed("20010db8000000000000000000000006")) + ".ip6.arpa. 0 IN PTR node6.node.dc1.consul."]),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cases(case: Case) -> None:
    table = make_table()
    msg = ask(table, case.qname, case.qtype)
    assert msg.rcode() == case.rcode
    assert msg.flags & dns.flags.AA
    assert not msg.flags & dns.flags.RA
    assert not msg.flags & dns.flags.TC
    assert msg.edns == -1
    assert lines(msg.answer) == sorted(case.answer)
    assert lines(msg.authority) == sorted(case.ns)
    assert lines(msg.additional) == sorted(case.extra)


def test_every_case_also_parses_with_edns_and_over_tcp() -> None:
    table = make_table()
    for case in CASES:
        for kw in ({"edns": Edns(payload=4096)}, {"tcp": True}):
            msg = ask(table, case.qname, case.qtype, **kw)
            assert msg.rcode() == case.rcode, case
            assert lines(msg.answer) == sorted(case.answer), case


# -- SOA / NS --------------------------------------------------------------------------------


@pytest.mark.parametrize("qname", ["consul.", "web.service.consul.", "nonexisting.consul.", "a.b.c.consul."])
def test_soa_for_any_name_in_the_zone(qname: str) -> None:
    table = make_table()
    msg = ask(table, qname, Qtype.SOA, edns=Edns(payload=1232))
    assert msg.rcode() == dns.rcode.NOERROR and msg.flags & dns.flags.AA
    assert lines(msg.answer) == [SOA]
    ns = lines(msg.authority)
    assert len(ns) == 3
    targets = [line.split()[-1] for line in ns]
    assert all(line.startswith("consul. 0 IN NS srv") for line in ns)
    assert set(targets) <= {f"srv{i}.node.dc1.consul." for i in range(1, 5)}  # srv_bad skipped
    assert lines(msg.additional) == sorted(
        f"{t} 0 IN A 10.0.1.{t[3]}" for t in targets
    )


def test_ns_answers_with_up_to_three_shuffled_servers_and_glue() -> None:
    table = make_table()
    seen: set[str] = set()
    for _ in range(200):
        msg = ask(table, "consul.", Qtype.NS)
        answer = lines(msg.answer)
        assert len(answer) == 3 and len({a.split()[-1] for a in answer}) == 3
        assert len(msg.additional) == 3
        seen.update(a.split()[-1] for a in answer)
        assert not msg.authority
    assert seen == {f"srv{i}.node.dc1.consul." for i in range(1, 5)}


@pytest.mark.parametrize("qname", ["web.service.consul.", "nonexisting.consul.", "node1.node.consul."])
def test_ns_for_any_name_in_the_zone_is_the_zone_ns_set(qname: str) -> None:
    msg = ask(make_table(), qname, Qtype.NS)
    assert msg.rcode() == dns.rcode.NOERROR
    answer = lines(msg.answer)
    assert len(answer) == 3 and all(a.startswith("consul. 0 IN NS srv") for a in answer)


def test_ns_targets_are_lower_cased_and_without_servers_the_answer_is_nodata() -> None:
    services = catalog()
    services["consul"] = (inst(Node("SRV-Up", "10.0.1.7", "dc1"), "consul", port=8300),)
    table = AnswerTable(Config(), clock=lambda: NOW)
    table.apply(full_delta(services))
    assert lines(ask(table, "consul.", Qtype.NS).answer) == ["consul. 0 IN NS srv-up.node.dc1.consul."]
    del services["consul"]
    table.apply(full_delta(services, index=2))
    msg = ask(table, "consul.", Qtype.NS)
    assert not msg.answer and lines(msg.authority) == [SOA]
    msg = ask(table, "consul.", Qtype.SOA)
    assert lines(msg.answer) == [SOA] and not msg.authority


def test_soa_timers_and_serial_follow_config_and_clock() -> None:
    from dnsdisco.config import SoaConfig

    clock = [NOW]
    config = Config(dns_config=DnsConfig(soa=SoaConfig(refresh=1, retry=2, expire=3, min_ttl=4)))
    table = AnswerTable(config, clock=lambda: clock[0])
    table.apply(full_delta())
    soa = "consul. 4 IN SOA ns.consul. hostmaster.consul. {} 1 2 3 4"
    assert lines(ask(table, "nope.service.consul.", Qtype.A).authority) == [soa.format(int(NOW))]
    clock[0] += 5
    assert lines(ask(table, "nope.service.consul.", Qtype.A).authority) == [soa.format(int(NOW) + 5)]
    assert lines(ask(table, "consul.", Qtype.SOA).answer) == [soa.format(int(NOW) + 5)]


# -- zones, flags, EDNS ----------------------------------------------------------------------


def test_names_outside_the_zones_are_not_ours() -> None:
    table = make_table()
    for name in ["example.com.", "consul.service.", "xconsul.", "."]:
        assert table.respond(make_query(name, Qtype.A)) is None


def test_servfail_for_every_in_zone_name_before_the_first_full_sync() -> None:
    table = make_table(sync=False)
    assert not table.synced
    for name, qtype in [("web.service.consul.", Qtype.A), ("consul.", Qtype.SOA), ("consul.", Qtype.NS),
                        ("1.0.0.10.in-addr.arpa.", Qtype.PTR), ("nope.consul.", Qtype.A)]:
        msg = ask(table, name, qtype, edns=Edns(payload=1232))
        assert msg.rcode() == dns.rcode.SERVFAIL and msg.flags & dns.flags.AA
        assert not msg.answer and not msg.authority and msg.edns == 0
    assert table.respond(make_query("example.com.", Qtype.A)) is None
    # A delta for another DC, or an incremental one, does not make us ready.
    table.apply(dc2_delta())
    table.apply(CatalogDelta("dc1", 1, {"web": catalog()["web"]}))
    assert not table.synced
    assert ask(table, "web.service.consul.", Qtype.A).rcode() == dns.rcode.SERVFAIL
    table.apply(full_delta())
    assert table.synced
    assert lines(ask(table, "web.service.consul.", Qtype.A).answer) == WEB_A


def test_header_flags_id_and_question_echo() -> None:
    table = make_table()
    query = make_query("Web.SERVICE.consul.", Qtype.A, id=0x1234, flags=0x0110)  # RD + CD
    wire = table.respond(query)
    assert wire is not None
    msg = parse_reply(wire, query)
    assert msg.flags & dns.flags.QR and msg.flags & dns.flags.AA and msg.flags & dns.flags.RD
    assert msg.flags & dns.flags.CD and not msg.flags & dns.flags.RA
    no_rd = make_query("web.service.consul.", Qtype.A, flags=0)
    assert not parse_reply(table.respond(no_rd), no_rd).flags & dns.flags.RD


def test_ra_with_recursors_and_unknown_reverse_names_are_left_to_them() -> None:
    table = make_table(Config(recursors=("192.0.2.53",)))
    msg = ask(table, "web.service.consul.", Qtype.A)
    assert msg.flags & dns.flags.RA and msg.flags & dns.flags.AA
    assert table.respond(make_query("9.9.9.10.in-addr.arpa.", Qtype.PTR)) is None
    assert lines(ask(table, "1.0.0.10.in-addr.arpa.", Qtype.PTR).answer)


def test_edns_opt_echoes_size_and_ecs_with_scope_zero() -> None:
    table = make_table()
    ecs = bytes([0, 1, 24, 16, 192, 0, 2])  # family 1, source /24, scope 16 (ignored), 192.0.2
    msg = ask(table, "web.service.consul.", Qtype.A, edns=Edns(payload=12345, ecs=ecs))
    assert msg.edns == 0 and msg.payload == 12345
    (option,) = msg.options
    assert option.otype == EDNS_OPTION_ECS
    assert option.to_text().startswith("ECS 192.0.2.0/24 scope/0")
    nx = ask(table, "nope.service.consul.", Qtype.A, edns=Edns(payload=1232))
    assert nx.rcode() == NX and nx.edns == 0 and nx.payload == 1232
    assert ask(table, "web.service.consul.", Qtype.A).edns == -1


@pytest.mark.parametrize("alt", ["alt.", "ALT", "test.consul."])
def test_alt_domain_answers_use_the_domain_of_the_question(alt: str) -> None:
    table = make_table(Config(alt_domain=alt))
    zone = alt.lower().rstrip(".") + "."
    msg = ask(table, f"web.service.{zone}", Qtype.SRV)
    assert lines(msg.answer) == sorted(x.replace(W, f"web.service.{zone}").replace("dc1.consul.", f"dc1.{zone}") for x in WEB_SRV)
    assert lines(msg.additional) == sorted(x.replace("dc1.consul.", f"dc1.{zone}") for x in WEB_GLUE)
    nx = ask(table, f"nope.service.{zone}", Qtype.A)
    assert lines(nx.authority) == [SOA.replace("consul.", zone)]
    assert lines(ask(table, zone, Qtype.SOA).answer) == [SOA.replace("consul.", zone)]
    ns = lines(ask(table, zone, Qtype.NS).answer)
    assert all(line.startswith(f"{zone} 0 IN NS ") and line.endswith(f".node.dc1.{zone}") for line in ns)
    # the primary domain still answers as itself, and PTR always names the primary domain
    assert lines(ask(table, W, Qtype.SRV).answer) == WEB_SRV
    assert lines(ask(table, "1.0.0.10.in-addr.arpa.", Qtype.PTR).answer) == [
        "1.0.0.10.in-addr.arpa. 0 IN PTR node1.node.dc1.consul."
    ]


def test_custom_domain() -> None:
    table = make_table(Config(domain="Disco", datacenter="dc1"))
    assert lines(ask(table, "web.service.disco.", Qtype.A).answer) == sorted(
        x.replace(W, "web.service.disco.") for x in WEB_A
    )
    assert table.respond(make_query("web.service.consul.", Qtype.A)) is None


def test_escaped_labels_in_the_zone_are_nxdomain() -> None:
    table = make_table()
    query = Query(id=1, flags=0, question=b"\x0aweb.servic\x06consul\x00" + struct.pack("!HH", 1, 1),
                  qname="web\\.servic.consul.", qtype=1)
    msg = parse_reply(table.respond(query), query)
    assert msg.rcode() == NX and lines(msg.authority) == [SOA]


# -- TTLs, meta, WAN, only_passing -------------------------------------------------------------


def test_service_ttl_node_ttl_and_ptr_ttl() -> None:
    dns_config = DnsConfig(node_ttl=7, service_ttl=(("d*", 42), ("db", 10), ("db*", 66), ("*", 5)))
    assert [dns_config.service_ttl_for(n) for n in ("db", "dblb", "dk", "api")] == [10, 66, 42, 5]
    table = make_table(Config(dns_config=dns_config))
    assert {r.ttl for r in ask(table, "db.service.consul.", Qtype.A).answer} == {10}
    msg = ask(table, "web.service.consul.", Qtype.SRV)
    assert {r.ttl for r in msg.answer} == {5} and {r.ttl for r in msg.additional} == {5}
    assert {r.ttl for r in ask(table, "alias.service.consul.", Qtype.A).answer} == {5}
    msg = ask(table, "node1.node.consul.", Qtype.A)
    assert {r.ttl for r in msg.answer} == {7} and {r.ttl for r in msg.additional} == {7}
    assert {r.ttl for r in ask(table, "0a000001.addr.consul.", Qtype.A).answer} == {7}
    assert {r.ttl for r in ask(table, "1.0.0.10.in-addr.arpa.", Qtype.PTR).answer} == {7}
    msg = ask(table, "consul.", Qtype.NS)
    assert {r.ttl for r in msg.answer} == {7} and {r.ttl for r in msg.additional} == {7}


def test_node_meta_txt_can_be_disabled() -> None:
    table = make_table(Config(dns_config=DnsConfig(enable_additional_node_meta_txt=False)))
    assert lines(ask(table, W, Qtype.SRV).additional) == sorted(WEB_GLUE[:3])
    assert not ask(table, "node1.node.consul.", Qtype.A).additional
    assert len(ask(table, "node1.node.consul.", Qtype.TXT).answer) == 1  # TXT questions still answered


def test_only_passing_drops_warning_instances() -> None:
    table = make_table(Config(dns_config=DnsConfig(only_passing=True)))
    assert lines(ask(table, "db.service.consul.", Qtype.A).answer) == ["db.service.consul. 0 IN A 10.0.5.1"]
    assert lines(ask(table, "weighted.service.consul.", Qtype.SRV).answer) == [
        "weighted.service.consul. 0 IN SRV 1 10 1 node1.node.dc1.consul."
    ]


def test_translate_wan_addrs_for_other_datacenters() -> None:
    wan_svc = inst(N2A, "api", port=80, tagged={"wan": TaggedAddress("198.51.100.2", 8080)})
    table = make_table(Config(translate_wan_addrs=True))
    table.apply(CatalogDelta("dc2", 2, {"api": (wan_svc,)}))
    assert lines(ask(table, "web.service.dc2.consul.", Qtype.A).answer) == ["web.service.dc2.consul. 0 IN A 198.51.100.1"]
    # a translated node address is named by .addr., not by the node
    assert lines(ask(table, "web.service.dc2.consul.", Qtype.SRV).answer) == [
        "web.service.dc2.consul. 0 IN SRV 1 1 80 c6336401.addr.dc2.consul."
    ]
    assert lines(ask(table, "api.service.dc2.consul.", Qtype.SRV).answer) == [
        "api.service.dc2.consul. 0 IN SRV 1 1 8080 c6336402.addr.dc2.consul."
    ]
    assert lines(ask(table, "n2a.node.dc2.consul.", Qtype.A).answer) == ["n2a.node.dc2.consul. 0 IN A 198.51.100.1"]
    # the local DC is never translated
    assert lines(ask(table, W, Qtype.A).answer) == WEB_A


def test_in_domain_hostname_is_resolved_internally() -> None:
    table = make_table()
    msg = ask(table, "alias.service.consul.", Qtype.A, edns=Edns(payload=1232))
    assert lines(msg.answer) == sorted(["alias.service.consul. 0 IN CNAME web.service.consul.", *WEB_A])
    # Plain UDP keeps udp_answer_limit (3) answers: the CNAME first, then two of the addresses.
    msg = ask(table, "alias.service.consul.", Qtype.A)
    assert [r.rdtype for r in msg.answer][0] == Qtype.CNAME and sum(len(r) for r in msg.answer) == 3
    # The target changes: the alias follows (its reply depends on other catalog data).
    table.apply(CatalogDelta("dc1", 2, {"web": catalog()["web"][:1]}))
    msg = ask(table, "alias.service.consul.", Qtype.A)
    assert lines(msg.answer) == ["alias.service.consul. 0 IN CNAME web.service.consul.", WEB_A[0]]


def test_hostname_chain_is_capped_at_five_records_without_edns() -> None:
    many = [inst(Node(f"m{i}", f"10.9.0.{i}", "dc1"), "many", port=1) for i in range(8)]
    services = catalog()
    services["many"] = tuple(many)
    services["pointer"] = (inst(N1, "pointer", port=1, address="many.service.consul."),)
    table = AnswerTable(Config(), clock=lambda: NOW)
    table.apply(full_delta(services))
    plain = ask(table, "pointer.service.consul.", Qtype.A)
    assert len(plain.answer) == 2 and sum(len(r) for r in plain.answer) == 3  # 512-mode: 3 answers
    edns = ask(table, "pointer.service.consul.", Qtype.A, edns=Edns(payload=4096))
    assert sum(len(r) for r in edns.answer) == 1 + 8
    tcp = ask(table, "pointer.service.consul.", Qtype.A, tcp=True)
    assert sum(len(r) for r in tcp.answer) == 1 + 5


# -- incremental apply, reconfigure ----------------------------------------------------------


def warm(table: AnswerTable, name: str, qtype: int, times: int = 300) -> None:
    """Ask often enough that every shuffled order of a small answer has been rendered."""
    for _ in range(times):
        table.respond(make_query(name, qtype))


def test_register_deregister_and_health_change_rerender_only_that_service() -> None:
    table = make_table()
    warm(table, W, Qtype.A)
    warm(table, "db.service.consul.", Qtype.SRV)
    before = table.renders
    # register a new instance of web
    n9 = Node("node9", "10.0.0.99", "dc1")
    web = catalog()["web"] + (inst(n9, "web", port=80),)
    table.apply(CatalogDelta("dc1", 2, {"web": web}, {"node9": n9}))
    warm(table, "db.service.consul.", Qtype.SRV)
    assert table.renders == before  # db untouched: served from its rendering
    assert "web.service.consul. 0 IN A 10.0.0.99" in lines(
        ask(table, W, Qtype.A, edns=Edns(payload=4096)).answer
    )
    assert table.renders > before
    # health change: node2's web instance goes critical
    web = tuple(replace(e, checks=(check(CRITICAL, "node2", e.service.id),)) if e.node.name == "node2" else e for e in web)
    table.apply(CatalogDelta("dc1", 3, {"web": web}))
    assert "web.service.consul. 0 IN A 10.0.0.2" not in lines(ask(table, W, Qtype.A, edns=Edns(payload=4096)).answer)
    # deregister every instance: NXDOMAIN; the node stays
    table.apply(CatalogDelta("dc1", 4, {"web": ()}))
    assert ask(table, W, Qtype.A).rcode() == NX
    assert lines(ask(table, "node9.node.consul.", Qtype.A).answer) == ["node9.node.consul. 0 IN A 10.0.0.99"]
    # a new service name appears: NXDOMAIN answers for it go stale
    assert ask(table, "fresh.service.consul.", Qtype.A).rcode() == NX
    table.apply(CatalogDelta("dc1", 5, {"fresh": (inst(N1, "fresh", port=1),)}))
    assert lines(ask(table, "fresh.service.consul.", Qtype.A).answer) == ["fresh.service.consul. 0 IN A 10.0.0.1"]


def test_node_change_repoints_the_services_on_that_node() -> None:
    table = make_table()
    assert "node1.node.dc1.consul. 0 IN A 10.0.0.1" in lines(ask(table, W, Qtype.SRV).additional)
    moved = replace(N1, address="10.0.0.111", meta={"rack": "r9"})
    table.apply(CatalogDelta("dc1", 2, nodes={"node1": moved}))
    msg = ask(table, W, Qtype.SRV)
    assert "node1.node.dc1.consul. 0 IN A 10.0.0.111" in lines(msg.additional)
    assert 'node1.node.dc1.consul. 0 IN TXT "rack=r9"' in lines(msg.additional)
    assert "web.service.consul. 0 IN A 10.0.0.111" in lines(ask(table, W, Qtype.A).answer)
    assert lines(ask(table, "node1.node.consul.", Qtype.A).answer) == ["node1.node.consul. 0 IN A 10.0.0.111"]
    assert lines(ask(table, "111.0.0.10.in-addr.arpa.", Qtype.PTR).answer) == [
        "111.0.0.10.in-addr.arpa. 0 IN PTR node1.node.dc1.consul."
    ]
    assert ask(table, "1.0.0.10.in-addr.arpa.", Qtype.PTR).rcode() == NX
    # the node goes: its services' instances on it go too
    table.apply(CatalogDelta("dc1", 3, nodes={"node1": None}))
    assert ask(table, "node1.node.consul.", Qtype.A).rcode() == NX
    assert lines(ask(table, "primary.web.service.consul.", Qtype.A).answer) == [
        "primary.web.service.consul. 0 IN A 10.0.0.3"
    ]
    assert ask(table, "two.service.consul.", Qtype.A).rcode() == NX


def test_full_delta_replaces_the_datacenter() -> None:
    table = make_table()
    only = {"web": catalog()["web"]}
    table.apply(CatalogDelta("dc1", 9, only, {"node1": N1, "node2": N2}, full=True))
    assert lines(ask(table, W, Qtype.A).answer) == WEB_A  # node3 still known through web
    assert ask(table, "db.service.consul.", Qtype.A).rcode() == NX
    assert ask(table, "node6.node.consul.", Qtype.AAAA).rcode() == NX
    assert lines(ask(table, "node3.node.consul.", Qtype.A).answer) == ["node3.node.consul. 0 IN A 10.0.0.3"]
    # other datacenters are untouched
    assert lines(ask(table, "web.service.dc2.consul.", Qtype.A).answer) == ["web.service.dc2.consul. 0 IN A 10.2.0.1"]


def test_unchanged_services_keep_their_rendering_across_a_full_resync() -> None:
    table = make_table()
    warm(table, W, Qtype.SRV)
    before = table.renders
    table.apply(full_delta(index=2))  # equal content, new objects
    warm(table, W, Qtype.SRV)
    assert table.renders == before


def test_reconfigure_rerenders_with_the_new_config() -> None:
    table = make_table()
    assert {r.ttl for r in ask(table, W, Qtype.A).answer} == {0}
    table.reconfigure(Config(dns_config=DnsConfig(service_ttl=(("web", 30),)), recursors=("192.0.2.1",)))
    msg = ask(table, W, Qtype.A)
    assert {r.ttl for r in msg.answer} == {30} and msg.flags & dns.flags.RA
    assert table.synced
    table.reconfigure(Config(datacenter="dc2"))
    assert lines(ask(table, W, Qtype.A).answer) == ["web.service.consul. 0 IN A 10.2.0.1"]
    table.reconfigure(Config(datacenter="dc3"))
    assert not table.synced
    assert ask(table, W, Qtype.A).rcode() == dns.rcode.SERVFAIL


def test_replies_are_fresh_bytes_and_ids_are_patched() -> None:
    table = make_table()
    one = table.respond(make_query(W, Qtype.A, id=1))
    two = table.respond(make_query(W, Qtype.A, id=2))
    assert one is not None and two is not None
    assert one[:2] == b"\x00\x01" and two[:2] == b"\x00\x02"


def test_disable_compression_still_parses() -> None:
    table = make_table(Config(dns_config=DnsConfig(disable_compression=True)))
    for case in CASES:
        msg = ask(table, case.qname, case.qtype, edns=Edns(payload=4096))
        assert msg.rcode() == case.rcode, case
        # Without compression synthesized names use the configured spelling of the domain.
        assert [x.lower() for x in lines(msg.answer)] == sorted(x.lower() for x in case.answer), case
    wire = table.respond(make_query(W, Qtype.SRV))
    assert wire is not None and b"\xc0" not in wire[12:]
