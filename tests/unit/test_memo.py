"""The reply memo (dnsdisco.dns.memo): requests answered from their bytes, without a parse.

The server's hit path is reproduced here by :func:`hit` exactly as ``DnsServer`` runs it (a
lookup on ``data[2:]``, a random outcome, the ID spliced in), so these tests need no sockets.
The differential test is the guard on the memo's one invariant: whatever the catalog does,
a reply served from the memo is one the table would give now.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace

import dns.message
import dns.rcode
import pytest

from dnsdisco.catalog.model import CRITICAL, CatalogDelta, Node
from dnsdisco.config import Config, DnsConfig
from dnsdisco.dns.memo import MEMO_CHOICES, MEMO_REPLY_MAX
from dnsdisco.dns.message import Qtype
from dnsdisco.dns.table import AnswerTable
from dnsdisco.dns.wire import parse
from tests.unit.test_table import N1, N2, N3, NODES, catalog, check, inst, make_table

W = "web.service.consul."


def request(name: str, qtype: int, *, id: int = 0x1234, edns: int | None = None) -> bytes:
    msg = dns.message.make_query(name, qtype, use_edns=edns is not None, payload=edns or 512)
    msg.id = id
    return msg.to_wire()


def answer(table: AnswerTable, data: bytes, *, tcp: bool = False) -> bytes | None:
    """What the server sends for *data*: from the memo when it holds the request, else
    parsed and answered by the table (which may then keep the reply)."""
    reply = hit(table, data, tcp=tcp)
    if reply is not None:
        return reply
    query = parse(data, tcp=tcp, client=("127.0.0.1", 5353))
    assert query is not None and not isinstance(query, bytes)
    return table.respond(query, data[2:])


def hit(table: AnswerTable, data: bytes, *, tcp: bool = False) -> bytes | None:
    memo = table.memo.tcp if tcp else table.memo.udp
    m = memo.get(data[2:])
    if m is None or m.cell.stale:
        return None
    tail = m.tails[int(random.random() * len(m.tails))]
    return None if tail is None else data[:2] + tail


def records(msg: dns.message.Message) -> list[str]:
    return sorted(f"{rrset.name} {rrset.rdtype} {rd}" for rrset in msg.answer for rd in rrset)


def first_answers(table: AnswerTable, data: bytes, times: int) -> Counter[str]:
    out: Counter[str] = Counter()
    for _ in range(times):
        msg = dns.message.from_wire(answer(table, data))  # type: ignore[arg-type]
        out[msg.answer[0][0].to_text()] += 1
    return out


def test_a_warm_request_is_answered_from_the_memo_with_its_own_id() -> None:
    table = make_table()
    data = request(W, Qtype.A)
    for _ in range(200):
        answer(table, data)
    entry = table.memo.udp[data[2:]]
    assert all(t is not None for t in entry.tails), "every shuffle outcome is kept after warm-up"
    other = request(W, Qtype.A, id=0xABCD)
    reply = hit(table, other)
    assert reply is not None
    msg = dns.message.from_wire(reply)
    assert msg.id == 0xABCD
    assert reply[12 : len(other)] == other[12:]  # the question as sent
    assert sorted(r.to_text() for r in msg.answer[0]) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


def test_every_kept_reply_is_a_rendering_the_table_gives_for_that_outcome() -> None:
    table = make_table()
    for name, qtype in [(W, Qtype.A), (W, Qtype.SRV), ("db.service.consul.", Qtype.ANY), ("node1.node.consul.", Qtype.TXT)]:
        data = request(name, qtype, edns=1232)
        for _ in range(300):
            answer(table, data)
        query = parse(data, tcp=False, client=("", 0))
        reply = table._fast[(query.qname, query.qtype)]  # type: ignore[union-attr]
        entry = table.memo.udp[data[2:]]
        assert len(entry.tails) == reply.choices(query, table._ctx)  # type: ignore[arg-type]
        for pick, tail in enumerate(entry.tails):
            assert tail == reply.render(query, table._ctx, pick)[2:]  # type: ignore[arg-type]


def test_shuffle_odds_are_kept_every_instance_comes_first() -> None:
    table = make_table()
    data = request(W, Qtype.A)
    counts = first_answers(table, data, 3000)
    assert set(counts) == {"10.0.0.1", "10.0.0.2", "10.0.0.3"}
    assert min(counts.values()) > 3000 / 3 * 0.8


def test_a_catalog_change_is_seen_at_once_and_the_old_replies_are_dropped() -> None:
    table = make_table()
    data = request(W, Qtype.A, edns=4096)
    for _ in range(100):
        answer(table, data)
    down = tuple(replace(e, checks=(check(CRITICAL, "node2", e.service.id),)) if e.node.name == "node2" else e
                 for e in catalog()["web"])
    table.apply(CatalogDelta("dc1", 2, {"web": down}))
    assert hit(table, data) is None
    for _ in range(100):
        ips = {r.to_text() for r in dns.message.from_wire(answer(table, data)).answer[0]}  # type: ignore[arg-type]
        assert ips == {"10.0.0.1", "10.0.0.3"}
    n9 = Node("node9", "10.0.0.99", "dc1")
    table.apply(CatalogDelta("dc1", 3, {"web": (*down, inst(n9, "web", port=80))}, {"node9": n9}))
    ips = {r.to_text() for r in dns.message.from_wire(answer(table, data)).answer[0]}  # type: ignore[arg-type]
    assert ips == {"10.0.0.1", "10.0.0.3", "10.0.0.99"}


def test_reconfigure_and_staleness_empty_the_memo() -> None:
    table = make_table()
    data = request(W, Qtype.A)
    for _ in range(50):
        answer(table, data)
    table.set_stale("dc1", True)
    assert hit(table, data) is None
    assert dns.message.from_wire(answer(table, data)).rcode() == dns.rcode.SERVFAIL  # type: ignore[arg-type]
    table.set_stale("dc1", False)
    assert dns.message.from_wire(answer(table, data)).rcode() == dns.rcode.NOERROR  # type: ignore[arg-type]
    for _ in range(50):
        answer(table, data)
    table.reconfigure(Config(dns_config=DnsConfig(service_ttl=(("*", 30.0),))))
    assert hit(table, data) is None
    assert dns.message.from_wire(answer(table, data)).answer[0].ttl == 30  # type: ignore[arg-type]


@pytest.mark.parametrize("name,qtype", [
    ("nosuch.service.consul.", Qtype.A),  # NXDOMAIN: its SOA serial is the clock
    ("consul.", Qtype.SOA),
    (W, Qtype.AAAA),  # NODATA, also with the SOA
])
def test_replies_that_carry_the_clock_are_never_kept(name: str, qtype: int) -> None:
    table = make_table()
    data = request(name, qtype)
    for _ in range(5):
        answer(table, data)
    assert data[2:] not in table.memo.udp


def test_large_replies_and_large_shuffles_are_left_to_the_renderer() -> None:
    nodes = {f"big{i}": Node(f"big{i}", f"10.9.{i // 250}.{i % 250 + 1}", "dc1") for i in range(200)}
    services = catalog()
    services["big"] = tuple(inst(n, "big", port=80) for n in nodes.values())
    table = AnswerTable(Config(), rng=random.Random(7))
    table.apply(CatalogDelta("dc1", 1, services, {**NODES, **nodes}, full=True))
    # 3 answers out of 200 over plain UDP: 4 x 200 outcomes, more than the memo keeps.
    small = request("big.service.consul.", Qtype.A)
    query = parse(small, tcp=False, client=("", 0))
    assert table._fast.get(("big.service.consul.", Qtype.A)) is None
    answer(table, small)
    assert table._fast[("big.service.consul.", Qtype.A)].choices(query, table._ctx) > MEMO_CHOICES  # type: ignore[arg-type]
    assert small[2:] not in table.memo.udp
    # Every address over TCP: a few outcomes, but each reply far above the size kept.
    big = small
    reply = answer(table, big, tcp=True)
    assert reply is not None and len(reply) > MEMO_REPLY_MAX
    entry = table.memo.tcp.get(big[2:])
    assert entry is None or all(t is None for t in entry.tails)


def test_tcp_and_udp_are_kept_apart() -> None:
    table = make_table()
    data = request("db.service.consul.", Qtype.SRV)
    for _ in range(50):
        answer(table, data)
        answer(table, data, tcp=True)
    udp = dns.message.from_wire(hit(table, data))  # type: ignore[arg-type]
    assert udp is not None
    assert data[2:] in table.memo.tcp and data[2:] in table.memo.udp
    assert table.memo.tcp[data[2:]] is not table.memo.udp[data[2:]]


def test_differential_memo_against_a_fresh_table_under_random_changes() -> None:
    """After every random catalog change, the memo path and a table built from scratch on the
    same catalog agree on rcode and on the set of answers (EDNS 4096: nothing trimmed)."""
    rng = random.Random(3)
    services = catalog()
    nodes = dict(NODES)
    table = AnswerTable(Config(), rng=random.Random(1))
    table.apply(CatalogDelta("dc1", 1, services, nodes, full=True))
    names = [W, "db.service.consul.", "api.service.consul.", "primary.web.service.consul.",
             "_web._tcp.service.consul.", "node1.node.consul.", "node2.node.dc1.consul.", "new.service.consul."]
    qtypes = [Qtype.A, Qtype.SRV, Qtype.ANY, Qtype.TXT]
    pool = [N1, N2, N3, Node("node7", "10.0.0.7", "dc1", meta={"k": "v"})]
    for index in range(2, 80):
        kind = rng.randrange(4)
        name = rng.choice(["web", "db", "api", "new"])
        if kind == 0:  # register
            node = rng.choice(pool)
            nodes[node.name] = node
            services[name] = (*services.get(name, ()), inst(node, name, sid=f"{name}-{index}", port=index))
            delta = CatalogDelta("dc1", index, {name: services[name]}, {node.name: node})
        elif kind == 1 and services.get(name):  # deregister one
            entries = list(services[name])
            entries.pop(rng.randrange(len(entries)))
            services[name] = tuple(entries)
            delta = CatalogDelta("dc1", index, {name: services[name]})
        elif kind == 2 and services.get(name):  # health flap
            entries = list(services[name])
            i = rng.randrange(len(entries))
            status = rng.choice(["passing", "critical", "warning"])
            entries[i] = replace(entries[i], checks=(check(status, entries[i].node.name, entries[i].service.id),))
            services[name] = tuple(entries)
            delta = CatalogDelta("dc1", index, {name: services[name]})
        else:  # a node moves
            node = rng.choice(pool)
            moved = replace(node, address=f"10.0.{index}.1")
            pool[pool.index(node)] = moved
            nodes[moved.name] = moved
            for svc, entries in list(services.items()):
                services[svc] = tuple(replace(e, node=moved) if e.node.name == moved.name else e for e in entries)
            delta = CatalogDelta("dc1", index, {}, {moved.name: moved})
        table.apply(delta)
        fresh = AnswerTable(Config(), rng=random.Random(2))
        fresh.apply(CatalogDelta("dc1", index, services, nodes, full=True))
        for qname in names:
            for qtype in qtypes:
                data = request(qname, qtype, edns=4096)
                for _ in range(3):  # fill, then (often) hit
                    got = dns.message.from_wire(answer(table, data))  # type: ignore[arg-type]
                want = dns.message.from_wire(answer(fresh, data))  # type: ignore[arg-type]
                assert got.rcode() == want.rcode(), (index, qname, qtype)
                assert records(got) == records(want), (index, qname, qtype)
