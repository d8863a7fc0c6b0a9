"""Limits, trimming, TC and shuffling of table replies (spec §1.10/§1.11, Decisions), plus a
timing print (never an assertion) of cold apply and per-query cost."""

from __future__ import annotations

import gc
import random
import time
from collections import Counter

import dns.flags
import dns.rdatatype
import pytest

from dnsdisco.catalog.model import PASSING, CatalogDelta, Check, Node, Service, ServiceEntry
from dnsdisco.config import Config, DnsConfig
from dnsdisco.dns.message import Edns, Qtype
from dnsdisco.dns.render import Records
from dnsdisco.dns.table import AnswerTable
from tests.unit.test_table import NOW, ask, catalog, full_delta, inst, make_query, parse_reply


def _nodes(count: int, *, meta: dict[str, str] | None = None, prefix: str = "n") -> list[Node]:
    return [
        Node(f"{prefix}{i}", f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", "dc1",
             meta=dict(meta) if meta is not None else {"consul-network-segment": "", "rack": f"r{i % 7}"})
        for i in range(count)
    ]


def _table(name: str, nodes: list[Node], config: Config | None = None, *, seed: int = 7) -> AnswerTable:
    services = catalog()
    services[name] = tuple(inst(n, name, port=8000 + i % 5) for i, n in enumerate(nodes))
    table = AnswerTable(config or Config(), rng=random.Random(seed), clock=lambda: NOW)
    table.apply(full_delta(services))
    return table


def _check_glue(msg) -> None:
    """Additional holds exactly the glue of the kept SRV answers (and their node's TXT)."""
    targets = {rr.target.to_text().lower() for rrset in msg.answer for rr in rrset if rrset.rdtype == dns.rdatatype.SRV}
    owners = {rrset.name.to_text().lower() for rrset in msg.additional}
    glue_owners = {rrset.name.to_text().lower() for rrset in msg.additional if rrset.rdtype == dns.rdatatype.A}
    assert glue_owners == targets
    assert owners <= targets
    for rrset in msg.additional:  # every glue record once
        assert len(rrset) == len(set(rrset))


# -- 512-byte mode ---------------------------------------------------------------------------


def test_plain_udp_keeps_udp_answer_limit_answers_silently() -> None:
    table = _table("many", _nodes(10, meta={}))
    msg = ask(table, "many.service.consul.", Qtype.A)
    assert sum(len(r) for r in msg.answer) == 3 and not msg.flags & dns.flags.TC
    msg = ask(table, "many.service.consul.", Qtype.SRV)
    assert sum(len(r) for r in msg.answer) == 3 and not msg.flags & dns.flags.TC  # SRV too
    _check_glue(msg)
    # EDNS at 512 is still 512 mode
    assert sum(len(r) for r in ask(table, "many.service.consul.", Qtype.A, edns=Edns(payload=512)).answer) == 3


def test_tc_only_when_trimmed_and_enable_truncate() -> None:
    table = _table("many", _nodes(10), Config(dns_config=DnsConfig(enable_truncate=True)))
    assert ask(table, "many.service.consul.", Qtype.A).flags & dns.flags.TC
    assert ask(table, "many.service.consul.", Qtype.SRV).flags & dns.flags.TC
    assert not ask(table, "many.service.consul.", Qtype.A, edns=Edns(payload=4096)).flags & dns.flags.TC
    assert not ask(table, "web.service.consul.", Qtype.A).flags & dns.flags.TC  # 3 fit: nothing trimmed
    assert not ask(table, "nope.service.consul.", Qtype.A).flags & dns.flags.TC


@pytest.mark.parametrize(("limit", "want"), [(1, 1), (5, 5), (8, 8), (20, 8)])
def test_udp_answer_limit_is_capped_at_eight(limit: int, want: int) -> None:
    table = _table("many", _nodes(10), Config(dns_config=DnsConfig(udp_answer_limit=limit)))
    assert sum(len(r) for r in ask(table, "many.service.consul.", Qtype.A).answer) == want


def test_edns_above_512_ignores_udp_answer_limit() -> None:
    table = _table("many", _nodes(10))
    assert sum(len(r) for r in ask(table, "many.service.consul.", Qtype.A, edns=Edns(payload=4096)).answer) == 10
    assert sum(len(r) for r in ask(table, "many.service.consul.", Qtype.SRV, edns=Edns(payload=4096)).answer) == 10


def test_512_mode_measures_uncompressed_sizes() -> None:
    # 3 SRV + glue + a 60-byte TXT each: 397 bytes compressed, 571 uncompressed (> 504).
    nodes = [Node(f"n{i}", f"10.0.9.{i}", "dc1", meta={"k": "v" * 58}) for i in range(1, 4)]
    table = _table("m", nodes)
    msg = ask(table, "m.service.consul.", Qtype.SRV)
    assert sum(len(r) for r in msg.answer) == 2
    _check_glue(msg)
    msg = ask(table, "m.service.consul.", Qtype.SRV, edns=Edns(payload=1232))
    assert sum(len(r) for r in msg.answer) == 3


def test_a_single_oversized_answer_is_still_sent() -> None:
    nodes = [Node(f"fat{i}", f"10.0.8.{i}", "dc1", meta={f"k{j}": "v" * 200 for j in range(4)}) for i in range(3)]
    table = _table("fat", nodes)
    query = make_query("fat.service.consul.", Qtype.SRV)
    wire = table.respond(query)
    assert wire is not None and len(wire) > 512
    msg = parse_reply(wire, query)
    assert sum(len(r) for r in msg.answer) == 1
    _check_glue(msg)


# -- byte limits -----------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [600, 1232, 4096])
def test_edns_size_trims_answers_and_resyncs_additional(payload: int) -> None:
    table = _table("big", _nodes(300), Config(dns_config=DnsConfig(enable_truncate=True)))
    for qtype in (Qtype.SRV, Qtype.A):
        for _ in range(20):
            query = make_query("big.service.consul.", qtype, edns=Edns(payload=payload))
            wire = table.respond(query)
            assert wire is not None and len(wire) <= payload
            msg = parse_reply(wire, query)
            count = sum(len(r) for r in msg.answer)
            assert 1 <= count < 300 and msg.flags & dns.flags.TC and msg.edns == 0
            if qtype == Qtype.SRV:
                _check_glue(msg)
    # Consul keeps 8 bytes spare: nearly full, never over.
    wire = table.respond(make_query("big.service.consul.", Qtype.A, edns=Edns(payload=1232)))
    assert wire is not None and 1232 - 8 - 16 < len(wire) <= 1232


def test_tcp_five_thousand_instances_fit_in_64k() -> None:
    nodes = _nodes(5000)
    table = _table("huge", nodes, Config(dns_config=DnsConfig(enable_truncate=True)))
    for qtype, cap in ((Qtype.SRV, 1024), (Qtype.A, 4096)):
        for _ in range(5):
            query = make_query("huge.service.consul.", qtype, tcp=True)
            wire = table.respond(query)
            assert wire is not None and 60_000 < len(wire) <= 65523
            msg = parse_reply(wire, query)
            count = sum(len(r) for r in msg.answer)
            assert 100 < count <= cap
            assert msg.flags & dns.flags.TC  # trimmed, and enable_truncate is on
            if qtype == Qtype.SRV:
                _check_glue(msg)
    # Without enable_truncate the trimming is silent (Consul's default).
    table.reconfigure(Config())
    assert not ask(table, "huge.service.consul.", Qtype.SRV, tcp=True).flags & dns.flags.TC


def test_a_record_limit_applies_to_udp_and_tcp_but_not_srv() -> None:
    table = _table("many", _nodes(10), Config(dns_config=DnsConfig(a_record_limit=2, enable_truncate=True)))
    for kw in ({}, {"edns": Edns(payload=4096)}, {"tcp": True}):
        msg = ask(table, "many.service.consul.", Qtype.A, **kw)
        assert sum(len(r) for r in msg.answer) == 2
        assert not msg.flags & dns.flags.TC  # a build-time limit, not trimming
    assert sum(len(r) for r in ask(table, "many.service.consul.", Qtype.SRV, tcp=True).answer) == 10


# -- shuffling -------------------------------------------------------------------------------


def test_answers_are_shuffled_permutations_and_every_instance_leads() -> None:
    table = _table("many", _nodes(10))
    want = {f"10.0.0.{i}" for i in range(10)}
    firsts: Counter[str] = Counter()
    orders = set()
    for _ in range(2000):
        msg = ask(table, "many.service.consul.", Qtype.A, edns=Edns(payload=4096))
        got = [rr.address for rr in msg.answer[0]]
        assert sorted(got) == sorted(want)
        firsts[got[0]] += 1
        orders.add(tuple(got))
    assert set(firsts) == want
    assert len(orders) >= 20


def test_plain_udp_windows_reach_every_instance_of_a_large_service() -> None:
    table = _table("wide", _nodes(400))
    firsts: set[str] = set()
    seen: set[str] = set()
    for _ in range(6000):
        msg = ask(table, "wide.service.consul.", Qtype.A)
        got = [rr.address for rr in msg.answer[0]]
        assert len(got) == 3 == len(set(got))
        firsts.add(got[0])
        seen.update(got)
    assert len(seen) == 400
    assert len(firsts) > 350


def test_srv_orders_vary_and_lead_with_each_target() -> None:
    table = _table("many", _nodes(10))
    firsts: set[str] = set()
    for kw in ({}, {"edns": Edns(payload=4096)}):
        for _ in range(1000):
            query = make_query("many.service.consul.", Qtype.SRV, **kw)  # type: ignore[arg-type]
            msg = parse_reply(table.respond(query), query)
            _check_glue(msg)
            # dnspython keeps an RRset in wire order: its first record came first
            firsts.add(next(iter(msg.answer[0])).target.to_text())
    assert firsts == {f"n{i}.node.dc1.consul." for i in range(10)}


def test_shuffling_never_mutates_table_data() -> None:
    table = _table("many", _nodes(40))
    state = table._dcs["dc1"].services["many"]
    entries = state.entries
    snapshot = list(entries)
    ask(table, "many.service.consul.", Qtype.A)
    reply = table._fast[("many.service.consul.", Qtype.A)]
    assert isinstance(reply, Records)
    blobs = list(reply.blobs or [])
    for _ in range(500):
        ask(table, "many.service.consul.", Qtype.A, edns=Edns(payload=4096))
        ask(table, "many.service.consul.", Qtype.SRV)
    assert list(state.entries) == snapshot and state.entries is entries
    assert list(reply.blobs or []) == blobs


# -- timing (printed, never asserted) --------------------------------------------------------


def test_timing_print(capsys: pytest.CaptureFixture[str]) -> None:
    nodes = {f"node{i}": Node(f"node{i}", f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", "dc1",
                              meta={"consul-network-segment": "", "rack": f"r{i % 10}"}) for i in range(10_000)}
    node_list = list(nodes.values())
    services: dict[str, tuple[ServiceEntry, ...]] = {}
    for s in range(10_000):
        entries = []
        for j in range(10):
            n = node_list[(s * 7 + j * 13) % 10_000]
            sid = f"svc{s}-{j}"
            entries.append(ServiceEntry(n, Service(n.name, sid, f"svc{s}", tags=("primary",), port=8000 + j),
                                        (Check(n.name, sid, "c", PASSING, service_id=sid),)))
        services[f"svc{s}"] = tuple(entries)
    services["big"] = tuple(ServiceEntry(n, Service(n.name, f"big{j}", "big", port=9000)) for j, n in enumerate(node_list[:5000]))
    delta = CatalogDelta("dc1", 1, services, nodes, full=True)
    gc.collect()
    table = AnswerTable(Config(), rng=random.Random(1))
    start = time.perf_counter()
    table.apply(delta)
    cold = time.perf_counter() - start
    gc.collect()

    def per_query(query, n: int = 5000) -> tuple[float, float]:
        start = time.perf_counter()
        table.respond(query)
        first = time.perf_counter() - start
        for _ in range(20_000):  # let every shuffled order (and window piece) render once
            table.respond(query)
        start = time.perf_counter()
        for _ in range(n):
            table.respond(query)
        return first * 1e3, (time.perf_counter() - start) / n * 1e6

    rows = [
        ("A svc (10), UDP", make_query("svc5.service.consul.", Qtype.A)),
        ("SRV svc (10), UDP", make_query("svc5.service.consul.", Qtype.SRV)),
        ("SRV svc (10), EDNS 1232", make_query("svc6.service.consul.", Qtype.SRV, edns=Edns(payload=1232))),
        ("NXDOMAIN", make_query("nope.service.consul.", Qtype.A)),
        ("A big (5000), UDP", make_query("big.service.consul.", Qtype.A)),
        ("SRV big (5000), UDP", make_query("big.service.consul.", Qtype.SRV)),
        ("SRV big (5000), TCP 64K", make_query("big.service.consul.", Qtype.SRV, tcp=True)),
    ]
    with capsys.disabled():
        print(f"\n[dns timing] cold apply 100k instances / 10k services: {cold:.3f} s")
        for label, query in rows:
            first, steady = per_query(query)
            print(f"[dns timing] {label:26s} first {first:7.2f} ms, then {steady:6.2f} us/query")


# -- robustness ------------------------------------------------------------------------------


def test_random_questions_always_get_well_formed_replies() -> None:
    from tests.unit.test_table import CASES, make_table

    rng = random.Random(1234)
    table = make_table(Config(alt_domain="alt.", dns_config=DnsConfig(enable_truncate=True)))
    table.apply(full_delta({**catalog(), "wide": tuple(inst(n, "wide", port=1) for n in _nodes(300))}))
    names = [c.qname for c in CASES] + ["wide.service.consul.", "_wide._tcp.consul.", "consul.", "alt."]
    qtypes = [Qtype.A, Qtype.AAAA, Qtype.ANY, Qtype.SRV, Qtype.TXT, Qtype.MX, Qtype.PTR, Qtype.SOA,
              Qtype.NS, Qtype.CNAME, Qtype.AXFR, 99]
    for _ in range(4000):
        name = rng.choice(names)
        if rng.random() < 0.3:
            name = "".join(ch.upper() if rng.random() < 0.5 else ch for ch in name)
        if rng.random() < 0.2 and name.lower().endswith(".consul."):
            name = name[: -len("consul.")] + "alt."
        if rng.random() < 0.1:
            name = f"x{rng.randrange(100)}.{name}"
        edns = Edns(payload=rng.choice([512, 600, 1232, 4096, 65000])) if rng.random() < 0.5 else None
        tcp = rng.random() < 0.2
        query = make_query(name, rng.choice(qtypes), edns=edns, tcp=tcp, id=rng.randrange(65536))
        wire = table.respond(query)
        if wire is None:
            continue
        msg = parse_reply(wire, query)
        count = sum(len(r) for r in msg.answer)
        if count > 1:
            assert len(wire) <= (65523 if tcp else query.max_size)
        assert (msg.edns == 0) == (edns is not None)
