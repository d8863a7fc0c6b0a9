"""Incremental maintenance: a change to a big service costs O(change), and answers stay the
same as a table (and a store) built from scratch on the same catalog.

The answer table keeps, per service, answer sets patched per changed entry (``_AView``,
``_SrvView``) and permutations patched in place (``render.Shuffles``); the store keeps each
service's sorted entry list and patches it per changed key. These tests count the per-entry
work a change causes and compare many random incremental changes against fresh builds.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import replace

import pytest

import dnsdisco.catalog.model as model
import dnsdisco.dns.table as table_mod
from dnsdisco.catalog.definition import RegisterRequest
from dnsdisco.catalog.model import CRITICAL, PASSING, WARNING, CatalogDelta, Node, ServiceEntry
from dnsdisco.catalog.store import Store
from dnsdisco.config import Config, DnsConfig
from dnsdisco.dns.message import Qtype
from dnsdisco.dns.render import Shuffles
from dnsdisco.dns.table import AnswerTable
from tests.unit.test_table import NOW, inst, lines, make_query, parse_reply

# -- the permutations --------------------------------------------------------------------------


def test_patched_permutations_stay_permutations_with_consistent_positions() -> None:
    rng = random.Random(5)
    sh = Shuffles(0, rng.shuffle, rng.random)
    n = 0
    for step in range(3000):
        if n and rng.random() < 0.45:
            sh.remove(rng.randrange(n))
            n -= 1
        else:
            sh.add()
            n += 1
        assert sh.n == n
        for perm in sh.perms:
            assert sorted(perm) == list(range(n))
        if sh._where is not None:
            for perm, where in zip(sh.perms, sh._where):
                assert [perm[where[v]] for v in range(n)] == list(range(n))
        assert all(0 <= r < max(n, 1) for r in sh.offsets)


def test_patched_permutations_are_uniform() -> None:
    # After adds and removes, every slot is equally likely at every position (here: first).
    rng = random.Random(11)
    first: Counter[int] = Counter()
    trials = 12_000
    for _ in range(trials):
        sh = Shuffles(0, rng.shuffle, rng.random)
        for _ in range(12):
            sh.add()
        for _ in range(4):
            sh.remove(rng.randrange(sh.n))
        sh.add()  # 9 slots: 2 permutations
        first[sh.perms[0][0]] += 1
    assert set(first) == set(range(9))
    for count in first.values():
        assert abs(count / trials - 1 / 9) < 0.02


# -- cost of one change --------------------------------------------------------------------------


def _big(n: int) -> tuple[list[Node], list[ServiceEntry]]:
    nodes = [Node(f"n{i}", f"10.1.{i >> 8}.{i & 255}", "dc1") for i in range(n)]
    return nodes, [inst(node, "big", port=80, status=PASSING) for node in nodes]


class _Counting:
    """Counts the per-entry derivations: targets, aggregate statuses, SRV units built."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.targets = self.statuses = self.units = 0
        target, status, unit = table_mod._target, model.aggregate_status, AnswerTable._srv_unit

        def counted_target(*a: object) -> object:
            self.targets += 1
            return target(*a)  # type: ignore[arg-type]

        def counted_status(*a: object) -> object:
            self.statuses += 1
            return status(*a)  # type: ignore[arg-type]

        def counted_unit(*a: object) -> object:
            self.units += 1
            return unit(*a)  # type: ignore[arg-type]

        monkeypatch.setattr(table_mod, "_target", counted_target)
        monkeypatch.setattr(model, "aggregate_status", counted_status)
        monkeypatch.setattr(AnswerTable, "_srv_unit", counted_unit)

    def reset(self) -> None:
        self.targets = self.statuses = self.units = 0


def test_one_change_in_a_big_service_touches_o1_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    n = 2000
    nodes, entries = _big(n)
    table = AnswerTable(Config(), rng=random.Random(3), clock=lambda: NOW)
    table.apply(CatalogDelta("dc1", 1, {"big": tuple(entries)}, {x.name: x for x in nodes}, full=True))
    queries = [make_query("big.service.consul.", Qtype.A), make_query("big.service.consul.", Qtype.SRV),
               make_query("big.service.consul.", Qtype.SRV, tcp=True),
               make_query("big.service.consul.", Qtype.A, tcp=True)]
    for _ in range(400):  # every order of the TCP replies rendered once: every unit built
        for q in queries:
            table.respond(q)
    count = _Counting(monkeypatch)
    rng = random.Random(8)
    for step in range(30):
        count.reset()
        before = table.renders
        i = rng.randrange(n)
        kind = step % 3
        if kind == 0:  # re-register with a new port
            entries[i] = inst(nodes[i], "big", port=81 + step, status=PASSING)
        elif kind == 1:  # health flap
            entries[i] = inst(nodes[i], "big", port=entries[i].service.port,
                              status=CRITICAL if entries[i].status == PASSING else PASSING)
        else:  # deregister, then register again elsewhere
            del entries[i]
            new = Node(f"x{step}", f"10.9.0.{step}", "dc1")
            entries.append(inst(new, "big", port=80, status=PASSING))
        table.apply(CatalogDelta("dc1", 2 + step, {"big": tuple(entries)}))
        for q in queries:
            parse_reply(table.respond(q), q)
        # Per-entry work is for the changed entries only: not O(n).
        assert count.targets <= 4, count.targets
        assert count.statuses <= 4, count.statuses
        assert count.units <= 4, count.units
        # One rendering per reply kind (a flat A order, UDP pieces, one TCP order each).
        assert table.renders - before <= 8


def test_store_commit_patches_the_entry_list_instead_of_rebuilding_it() -> None:
    built = 0
    orig = Store._build_entry

    def counting(self: Store, key: tuple[str, str]) -> ServiceEntry:
        nonlocal built
        built += 1
        return orig(self, key)

    async def run() -> None:
        nonlocal built
        store = Store(datacenter="dc1", node_name="agent", node_address="127.0.0.1", data_dir=None)
        await store.open()
        deltas: list[CatalogDelta] = []
        store.add_delta_listener(deltas.append)
        rng = random.Random(2)
        live: dict[tuple[str, str], int] = {}
        Store._build_entry = counting  # type: ignore[method-assign]
        try:
            for step in range(600):
                i = rng.randrange(150)
                node = Node(f"Node{i % 40}", f"10.3.0.{i % 40}", "dc1")
                sid = f"web-{i}"
                if (node.name.lower(), sid) in live and rng.random() < 0.3:
                    await store.catalog_deregister(node.name, sid)
                    del live[(node.name.lower(), sid)]
                else:
                    port = rng.randrange(1, 60000)
                    svc = model.Service(node=node.name, id=sid, name="Web" if i % 2 else "web", port=port)
                    built = 0
                    await store.catalog_register(RegisterRequest(datacenter="dc1", node=node, service=svc))
                    assert built <= 2  # the changed instance, not the whole service
                    live[(node.name.lower(), sid)] = port
                got = list(deltas[-1].services.get("web", ())) if deltas else []
                # Consul's order (node, then ID) and the same entries as a fresh build.
                assert [(e.node.name.lower(), e.service.id) for e in got] == sorted(live)
                assert [e.service.port for e in got] == [live[k] for k in sorted(live)]
            fresh = [store._build_entry(k) for k in sorted(store._state.by_name["web"])]
            assert store.health_service("web") == fresh
            assert store.full_delta().services["web"] == tuple(fresh)
        finally:
            Store._build_entry = orig  # type: ignore[method-assign]
            await store.close()

    asyncio.run(run())


# -- many incremental changes against a fresh build ---------------------------------------------

_ADDRESSES = ["", "", "", "10.7.0.{i}", "2001:db8::{i:x}", "host{i}.example.org"]
_QUESTIONS = [
    (name, qtype)
    for name in ("svc.service.consul.", "a.svc.service.consul.", "b.svc.service.consul.", "_svc._tcp.service.consul.",
                 "other.service.consul.")
    for qtype in (Qtype.A, Qtype.AAAA, Qtype.ANY, Qtype.SRV)
]


def _answers(table: AnswerTable, name: str, qtype: int) -> tuple[int, list[str], list[str]]:
    query = make_query(name, qtype, tcp=True)
    msg = parse_reply(table.respond(query), query)
    answer = lines(msg.answer)
    if any(" CNAME " in line for line in answer):
        # CNAME instances only: each reply is one of them, picked at random (spec §1.6).
        answer = ["CNAME" for line in answer if " CNAME " in line]
    return msg.rcode(), answer, lines(msg.additional)


@pytest.mark.parametrize("only_passing", [False, True])
def test_answers_after_many_incremental_changes_match_a_fresh_table(only_passing: bool) -> None:
    config = Config(dns_config=DnsConfig(only_passing=only_passing))
    rng = random.Random(17 if only_passing else 4)
    nodes = {f"m{i}": Node(f"m{i}", f"10.6.0.{i}", "dc1", meta={"k": str(i)} if i % 3 == 0 else {})
             for i in range(12)}
    services: dict[str, list[ServiceEntry]] = {"svc": [], "other": []}
    table = AnswerTable(config, rng=random.Random(1), clock=lambda: NOW)
    table.apply(CatalogDelta("dc1", 1, {}, dict(nodes), full=True))

    def key(e: ServiceEntry) -> tuple[str, str]:
        return (e.node.name, e.service.id)

    def make(name: str, node: Node, k: int) -> ServiceEntry:
        address = rng.choice(_ADDRESSES).format(i=k % 200 + 1)
        tags = tuple(t for t in ("a", "b") if rng.random() < 0.5)
        status = rng.choice([PASSING, PASSING, WARNING, CRITICAL])
        return inst(node, name, sid=f"{name}-{k}", port=rng.choice([80, 81, 82]), address=address, tags=tags,
                    status=status, node_status=PASSING if rng.random() < 0.8 else WARNING)

    for step in range(250):
        changed: dict[str, tuple[ServiceEntry, ...]] = {}
        changed_nodes: dict[str, Node | None] = {}
        name = "svc" if rng.random() < 0.85 else "other"
        entries = services[name]
        roll = rng.random()
        if roll < 0.45 or len(entries) < 3:
            node = nodes[rng.choice(sorted(nodes))]
            entries.append(make(name, node, rng.randrange(60)))
        elif roll < 0.65:
            del entries[rng.randrange(len(entries))]
        elif roll < 0.9:
            i = rng.randrange(len(entries))
            old = entries[i]
            new = make(name, old.node, 0)
            entries[i] = replace(new, service=replace(new.service, id=old.service.id))
        else:
            # A node moves: every instance on it gets the new node (the store restates them).
            nname = rng.choice(sorted(nodes))
            node = nodes[nname] = replace(nodes[nname], address=f"10.6.1.{rng.randrange(1, 250)}")
            changed_nodes[nname] = node
            for sname, es in services.items():
                if any(e.node.name == nname for e in es):
                    services[sname] = es = [replace(e, node=node) if e.node.name == nname else e for e in es]
                    changed[sname] = ()
        # Same instance key twice: keep the last (the store's row semantics), in store order.
        for sname, es in services.items():
            dedup = {key(e): e for e in es}
            services[sname] = [dedup[k] for k in sorted(dedup)]
        changed[name] = ()
        for sname in changed:
            changed[sname] = tuple(services[sname])
        table.apply(CatalogDelta("dc1", 2 + step, changed, changed_nodes))
        if step % 5 and step < 240:
            # Query only some steps, so that several changes pile up between queries too.
            for qname, qtype in _QUESTIONS[rng.randrange(4) :: 4]:
                table.respond(make_query(qname, qtype, tcp=rng.random() < 0.5))
            continue
        fresh = AnswerTable(config, rng=random.Random(step), clock=lambda: NOW)
        fresh.apply(CatalogDelta("dc1", 2 + step, {k: tuple(v) for k, v in services.items() if v}, dict(nodes),
                                 full=True))
        for qname, qtype in _QUESTIONS:
            assert _answers(table, qname, qtype) == _answers(fresh, qname, qtype), (step, qname, qtype)


def test_every_instance_still_gets_its_turn_in_front_after_incremental_changes() -> None:
    nodes, entries = _big(300)
    table = AnswerTable(Config(), rng=random.Random(9), clock=lambda: NOW)
    table.apply(CatalogDelta("dc1", 1, {"big": tuple(entries)}, {x.name: x for x in nodes}, full=True))
    query = make_query("big.service.consul.", Qtype.A)  # 512-byte UDP: 3 answers of 300
    table.respond(query)
    rng = random.Random(4)
    for step in range(40):  # add, remove and change instances, querying in between
        i = rng.randrange(len(entries))
        if step % 2:
            del entries[i]
        else:
            node = Node(f"y{step}", f"10.8.0.{step + 1}", "dc1")
            entries.insert(i, inst(node, "big", port=80, status=PASSING))
        table.apply(CatalogDelta("dc1", 2 + step, {"big": tuple(entries)}))
        table.respond(query)
    want = {e.node.address for e in entries}
    seen = set()
    for _ in range(8000):
        msg = parse_reply(table.respond(query), query)
        seen.add(msg.answer[0][0].address)
    assert seen == want


def test_a_shared_srv_record_comes_from_the_first_member_as_in_a_fresh_build():
    """Instances on one node, address and port share an SRV record, taken from the first in
    entry order (node, then service ID). After one of them is re-registered, the incremental
    table must pick the same member a fresh build does (the weight differs by health here)."""
    n = Node("n1", "10.0.0.1", "dc1")
    w = model.Weights(passing=10, warning=3)
    filler = [inst(Node(f"f{i}", f"10.2.0.{i}", "dc1"), "svc", sid=f"z{i}", port=90, status=PASSING, weights=w)
              for i in range(20)]
    a = inst(n, "svc", sid="a", port=80, status=WARNING, weights=w)
    b = inst(n, "svc", sid="b", port=80, status=PASSING, weights=w)
    q = make_query("svc.service.consul.", Qtype.SRV, tcp=True)

    def shared(tab: AnswerTable) -> list[str]:
        return [line for line in lines(parse_reply(tab.respond(q), q).answer) if "n1.node" in line]

    t = AnswerTable(Config(), rng=random.Random(1), clock=lambda: NOW)
    t.apply(CatalogDelta("dc1", 1, {"svc": (a, b, *filler)}, {n.name: n}, full=True))
    assert shared(t) == ["svc.service.consul. 0 IN SRV 1 3 80 n1.node.dc1.consul."]  # from a (warning)
    a2 = inst(n, "svc", sid="a", port=80, status=WARNING, weights=w, tags=("x",))  # re-registered
    t.apply(CatalogDelta("dc1", 2, {"svc": (a2, b, *filler)}))
    fresh = AnswerTable(Config(), rng=random.Random(1), clock=lambda: NOW)
    fresh.apply(CatalogDelta("dc1", 2, {"svc": (a2, b, *filler)}, {n.name: n}, full=True))
    assert shared(t) == shared(fresh) == ["svc.service.consul. 0 IN SRV 1 3 80 n1.node.dc1.consul."]
