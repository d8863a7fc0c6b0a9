"""CNAME targets outside our domains (spec §1.6): a service or node whose address is a hostname
outside the Consul domains answers A/AAAA/ANY with the CNAME plus the target's records,
resolved through the recursors; without recursors (or for a client outside
``allow_recursion``, or when the recursors fail) the CNAME alone.

Upstream failure gives the CNAME alone rather than SERVFAIL: the CNAME is our own,
authoritative catalog data and is right whatever the recursors do, and a client (or its
resolver) can still follow it itself; a SERVFAIL would hide a good answer behind someone
else's outage (Consul, too, keeps the CNAME when the recursor query fails).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator

import dns.asyncquery
import dns.flags
import dns.message
import dns.rdatatype
import pytest

from dnsdisco.catalog.model import CatalogDelta, Node, Service, ServiceEntry
from dnsdisco.config import Config, DnsConfig
from dnsdisco.dns.server import DnsServer
from dnsdisco.dns.table import AnswerTable, Chase
from dnsdisco.forward import Forwarder
from tests.integration.test_recursor import HOST, FakeUpstream, closed_port, upstreams

pytestmark = pytest.mark.integration

EXTERNAL = "db.example.org."
SERVICE_TTL = 30


def delta() -> CatalogDelta:
    nodes = {
        "n1": Node("n1", "10.0.0.1", "dc1"),
        "ext": Node("ext", "host.example.org", "dc1"),  # a node named by an outside hostname
    }
    services = {
        "db": (ServiceEntry(nodes["n1"], Service("n1", "db-1", "db", address="db.example.org", port=5432)),),
        "web": (ServiceEntry(nodes["n1"], Service("n1", "web-1", "web", port=80)),),
    }
    return CatalogDelta("dc1", 10, services, nodes, full=True)


def config(*recursors: str, **dns: object) -> Config:
    dns.setdefault("recursor_timeout", 0.3)
    dns.setdefault("service_ttl", (("*", float(SERVICE_TTL)),))
    return Config(client_addr=HOST, dns_port=0, recursors=tuple(recursors),
                  dns_config=dataclasses.replace(DnsConfig(), **dns))


@contextlib.asynccontextmanager
async def served(cfg: Config) -> AsyncIterator[DnsServer]:
    table = AnswerTable(cfg, clock=lambda: 1_700_000_000.0)
    table.apply(delta())
    fwd = Forwarder(cfg, probe_interval=0.05)
    server = DnsServer(cfg, table, forwarder=fwd)
    await server.start()
    await fwd.start()
    try:
        yield server
    finally:
        await fwd.stop()
        await server.stop()


async def query(port: int, name: str, rdtype: str = "A", *, tcp: bool = False, edns: bool = False,
                timeout: float = 3.0) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, use_edns=0 if edns else False)
    if tcp:
        return await dns.asyncquery.tcp(q, HOST, port=port, timeout=timeout)
    return await dns.asyncquery.udp(q, HOST, port=port, timeout=timeout)


def records(msg: dns.message.Message) -> list[tuple[str, str, int, str]]:
    return [(str(rrset.name).lower(), dns.rdatatype.to_text(rrset.rdtype), rrset.ttl, rr.to_text())
            for rrset in msg.answer for rr in rrset]


async def test_service_cname_plus_resolved_a_with_the_service_ttl():
    async with upstreams(FakeUpstream(ip="192.0.2.7", ttl=300)) as (up,):
        async with served(config(up.addr)) as server:
            for tcp in (False, True):
                msg = await query(server.port, "db.service.consul.", tcp=tcp)
                assert msg.rcode() == 0
                assert records(msg) == [
                    ("db.service.consul.", "CNAME", SERVICE_TTL, EXTERNAL),
                    (EXTERNAL, "A", SERVICE_TTL, "192.0.2.7"),  # the service TTL, not the upstream's
                ]
                assert msg.flags & dns.flags.AA
            # The second time came from the forwarder's cache: the upstream was asked once.
            assert up.asked(EXTERNAL) == 1


async def test_node_cname_plus_upstream_answer_unfiltered():
    async with upstreams(FakeUpstream(ip="192.0.2.8", ttl=300)) as (up,):
        async with served(config(up.addr)) as server:
            msg = await query(server.port, "ext.node.consul.")
            got = records(msg)
            assert got[0][:2] == ("ext.node.consul.", "CNAME") and got[0][3] == "host.example.org."
            assert got[1][0:2] == ("host.example.org.", "A") and got[1][3] == "192.0.2.8"
            assert got[1][2] <= 300 and got[1][2] > SERVICE_TTL  # the upstream's TTL is kept


async def test_without_recursors_cname_only():
    async with served(config()) as server:
        msg = await query(server.port, "db.service.consul.")
        assert msg.rcode() == 0
        assert records(msg) == [("db.service.consul.", "CNAME", SERVICE_TTL, EXTERNAL)]


async def test_upstream_down_gives_cname_only():
    async with served(config(f"{HOST}:{closed_port()}")) as server:
        msg = await query(server.port, "db.service.consul.")
        assert msg.rcode() == 0  # not SERVFAIL: the CNAME is ours and right (module doc)
        assert records(msg) == [("db.service.consul.", "CNAME", SERVICE_TTL, EXTERNAL)]


async def test_upstream_servfail_gives_cname_only():
    async with upstreams(FakeUpstream("servfail")) as (up,):
        async with served(config(up.addr)) as server:
            msg = await query(server.port, "db.service.consul.")
            assert msg.rcode() == 0
            assert records(msg) == [("db.service.consul.", "CNAME", SERVICE_TTL, EXTERNAL)]


async def test_client_outside_allow_recursion_gets_cname_only():
    async with upstreams(FakeUpstream()) as (up,):
        async with served(config(up.addr, allow_recursion=("192.0.2.0/24",))) as server:
            msg = await query(server.port, "db.service.consul.")
            assert records(msg) == [("db.service.consul.", "CNAME", SERVICE_TTL, EXTERNAL)]
            assert up.asked(EXTERNAL) == 0


async def test_any_and_edns_and_plain_names_untouched():
    async with upstreams(FakeUpstream(ip="192.0.2.9")) as (up,):
        async with served(config(up.addr)) as server:
            msg = await query(server.port, "db.service.consul.", "ANY", edns=True)
            kinds = [(r[0], r[1]) for r in records(msg)]
            assert kinds == [("db.service.consul.", "CNAME"), (EXTERNAL, "A")]  # fake has no AAAA
            assert msg.edns == 0
            # A name with a plain address never goes near the recursors.
            msg = await query(server.port, "web.service.consul.")
            assert records(msg) == [("web.service.consul.", "A", SERVICE_TTL, "10.0.0.1")]
            # SRV is not chased (its target's records are not spliced in here).
            msg = await query(server.port, "db.service.consul.", "SRV")
            assert msg.answer[0].rdtype == dns.rdatatype.SRV
            assert sorted(t for _, n, t, _ in up.seen if n == EXTERNAL) == [1, 28]  # ANY: A and AAAA
            assert up.asked("web.service.consul.") == 0


def test_table_marks_only_outside_chains():
    from tests.dnstest import request
    from dnsdisco.dns.wire import parse

    table = AnswerTable(config(), clock=lambda: 1_700_000_000.0)
    table.apply(delta())

    def respond(name: str, qtype: int) -> bytes | None:
        q = parse(request(name, qtype), tcp=False, client=(HOST, 1))
        return table.respond(q)  # type: ignore[arg-type]

    chased = respond("db.service.consul.", 1)
    assert isinstance(chased, Chase) and chased.targets == {EXTERNAL} and not chased.node
    node = respond("ext.node.consul.", 28)
    assert isinstance(node, Chase) and node.targets == {"host.example.org."} and node.node
    assert respond("web.service.consul.", 1).__class__ is bytes
    assert respond("db.service.consul.", 33).__class__ is bytes  # SRV
    assert respond("db.service.consul.", 15).__class__ is bytes  # MX: CNAME, no chase
