"""Response rate limiting (``dns_config.rate_limit``) seen from clients on loopback.

A real in-process agent (embedded catalog, config-dir services) is flooded over UDP from one
client address while a second client asks at the same time; both bind their own loopback
address (127.0.1.2 and 127.0.2.3: different /24s, since the default IPv4 prefix is /24 and
127.0.0.2 and 127.0.0.3 would share one account). Off by default: the same flood is answered
in full until a reload turns rate limiting on. Then the flooder gets its first second's worth
of answers, and after that drops and every second limited reply as an empty TC reply
(``slip`` 2); the second client gets every answer; TCP from the flooder is still answered; and
``/metrics`` counts exactly what the clients missed. The DatagramProtocol fallback and
forwarded (recursor cache) replies are limited the same way.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator

import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest
from prometheus_client import CollectorRegistry

from dnsdisco import config as configmod
from dnsdisco.app import Agent
from dnsdisco.config import RateLimitConfig
from dnsdisco.dns.server import DnsServer
from dnsdisco.metrics import Metrics
from tests.dnstest import answer_table, test_config
from tests.integration.test_metrics_scrape import scrape, value

pytestmark = pytest.mark.integration

FLOODER = "127.0.1.2"
OTHER = "127.0.2.3"
SERVICES = 20


def _sources_available() -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((FLOODER, 0))
        return True
    except OSError:
        return False
    finally:
        s.close()


if not _sources_available():  # pragma: no cover - Linux routes all of 127/8 to loopback
    pytest.skip("cannot bind 127.0.1.2 (needs all of 127.0.0.0/8 on loopback)", allow_module_level=True)


def udp_burst(port: int, source: str, names: list[str], *, pause: float = 0.0,
              settle: float = 0.5) -> tuple[int, list[dns.message.Message]]:
    """Send one A query per name from *source* (*pause* seconds apart); return how many were
    sent and every reply that arrived within *settle* seconds of the last send."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    replies = []
    try:
        for i, name in enumerate(names):
            q = dns.message.make_query(name, "A")
            q.id = i
            sock.sendto(q.to_wire(), ("127.0.0.1", port))
            if pause:
                time.sleep(pause)
        sock.settimeout(settle)
        while True:
            try:
                data = sock.recv(65535)
            except (TimeoutError, socket.timeout):
                break
            replies.append(dns.message.from_wire(data))
    finally:
        sock.close()
    return len(names), replies


def full(replies: list[dns.message.Message]) -> list[dns.message.Message]:
    return [r for r in replies if r.answer and not r.flags & dns.flags.TC]


def slipped(replies: list[dns.message.Message]) -> list[dns.message.Message]:
    return [r for r in replies if r.flags & dns.flags.TC and not r.answer]


@pytest.fixture
async def agent(tmp_path) -> AsyncIterator[Agent]:
    conf = tmp_path / "conf"
    conf.mkdir()
    services = [{"id": "web-1", "name": "web", "address": "10.0.0.1", "port": 80}]
    services += [{"id": f"svc{i}", "name": f"svc{i}", "address": f"10.1.0.{i + 1}", "port": 80}
                 for i in range(SERVICES)]
    (conf / "services.json").write_text(json.dumps({"services": services}))

    def load() -> configmod.Config:
        return configmod.load(dirs=[str(conf)], dev=True,
                              overrides={"node_name": "node1", "ports": {"http": 0, "dns": 0}})

    a = Agent(load(), reload_config=load, metrics=Metrics(CollectorRegistry()))
    await a.start()
    a.conf_dir = conf  # type: ignore[attr-defined]
    try:
        yield a
    finally:
        await a.stop()


async def test_off_by_default_then_a_flood_is_limited_while_another_client_is_answered(agent):
    port = agent.dns_port
    flood = ["web.service.consul."] * 200

    # Off by default: every one of 200 back-to-back queries is answered in full.
    sent, replies = await asyncio.to_thread(udp_burst, port, FLOODER, flood)
    assert len(full(replies)) == sent

    (agent.conf_dir / "rrl.json").write_text(json.dumps(
        {"dns_config": {"rate_limit": {"responses_per_second": 5, "slip": 2}}}))
    await agent.reload()
    _, before = await scrape(agent)

    # The flood and a second client asking 20 names (a normal client's pace) at the same time.
    started = time.monotonic()
    (sent, flooded), (asked, other) = await asyncio.gather(
        asyncio.to_thread(udp_burst, port, FLOODER, flood),
        asyncio.to_thread(udp_burst, port, OTHER, [f"svc{i}.service.consul." for i in range(SERVICES)],
                          pause=0.002),
    )
    elapsed = time.monotonic() - started
    # The flooder: one second's credit (5) plus what accrued while it flooded, then nothing but
    # drops and slips, alternately (slip 2).
    answered, tc = full(flooded), slipped(flooded)
    assert 5 <= len(answered) <= 5 + 5 * elapsed + 1
    limited = sent - len(answered)
    assert len(tc) in (limited // 2, (limited + 1) // 2)
    assert len(flooded) == len(answered) + len(tc)
    for r in tc:  # an empty truncated reply with the question: retry over TCP
        assert r.rcode() == dns.rcode.NOERROR and not r.additional
        assert str(r.question[0].name) == "web.service.consul."
    # The other client, in another /24: everything, in full.
    assert len(full(other)) == asked
    assert sorted(r.id for r in other) == list(range(asked))

    # TCP is never limited, not even for the flooded client.
    q = dns.message.make_query("web.service.consul.", "A")
    r = await asyncio.to_thread(dns.query.tcp, q, "127.0.0.1", port=port, timeout=2, source=FLOODER)
    assert r.answer and not r.flags & dns.flags.TC

    # The metrics count exactly what the flooder missed.
    _, after = await scrape(agent)
    dropped = sent - len(flooded)
    assert dropped >= 80
    limited_drop = value(after, "dnsdisco_dns_rate_limited_total", action="drop")
    assert limited_drop - value(before, "dnsdisco_dns_rate_limited_total", action="drop") == dropped
    assert (value(after, "dnsdisco_dns_rate_limited_total", action="slip")
            - value(before, "dnsdisco_dns_rate_limited_total", action="slip")) == len(tc)
    assert (value(after, "dnsdisco_dns_dropped_total", reason="rate_limit")
            - value(before, "dnsdisco_dns_dropped_total", reason="rate_limit")) == dropped
    # Replies counted are replies sent: the dropped ones are not among them (the TCP query and
    # the other client's are; the slipped ones went out, truncated).
    sent_replies = (value(after, "dnsdisco_dns_responses_total", rcode="NOERROR", source="catalog")
                    - value(before, "dnsdisco_dns_responses_total", rcode="NOERROR", source="catalog"))
    assert sent_replies == len(flooded) + asked + 1

    # A reload that turns it off again answers the flooder in full at once.
    (agent.conf_dir / "rrl.json").unlink()
    await agent.reload()
    sent, replies = await asyncio.to_thread(udp_burst, port, FLOODER, flood)
    assert len(full(replies)) == sent


async def test_log_only_counts_and_sends_everything(agent):
    (agent.conf_dir / "rrl.json").write_text(json.dumps(
        {"dns_config": {"rate_limit": {"responses_per_second": 5, "log_only": True}}}))
    await agent.reload()
    sent, replies = await asyncio.to_thread(udp_burst, agent.dns_port, FLOODER, ["web.service.consul."] * 100)
    assert len(full(replies)) == sent
    _, samples = await scrape(agent)
    assert value(samples, "dnsdisco_dns_rate_limited_total", action="log_only") >= sent - 5 - 5
    assert value(samples, "dnsdisco_dns_rate_limited_total", action="drop") == 0


@pytest.mark.parametrize("udp", ["direct", "protocol"])
async def test_both_udp_paths_limit_catalog_and_error_replies(udp):
    # NXDOMAIN for random names in our zone share one account; REFUSED (outside the domain,
    # no recursors) shares the client's error account.
    cfg = test_config(rate_limit=RateLimitConfig(responses_per_second=3, slip=0))
    server = DnsServer(cfg, answer_table(cfg))
    server.udp_direct = udp == "direct"
    await server.start()
    try:
        nx = [f"nope{i}.service.consul." for i in range(50)]
        _, nx_replies = await asyncio.to_thread(udp_burst, server.port, FLOODER, nx, settle=0.3)
        assert all(r.rcode() == dns.rcode.NXDOMAIN for r in nx_replies)
        assert 3 <= len(nx_replies) <= 5
        out = [f"host{i}.example.org." for i in range(50)]
        _, refused = await asyncio.to_thread(udp_burst, server.port, FLOODER, out, settle=0.3)
        assert all(r.rcode() == dns.rcode.REFUSED for r in refused)
        assert 3 <= len(refused) <= 5
        # slip 0: every limited reply is dropped, none truncated
        assert server.stats.rate_limit.dropped == 100 - len(nx_replies) - len(refused)
        assert server.stats.rate_limit.slipped == 0
        # the other client is untouched
        _, replies = await asyncio.to_thread(udp_burst, server.port, OTHER, nx[:3], settle=0.3)
        assert len(replies) == 3
    finally:
        await server.stop()


@pytest.mark.parametrize("udp", ["direct", "protocol"])
async def test_forwarded_replies_are_limited_too(udp):
    # The first reply comes back from the recursor in a task, the rest from the recursor cache
    # inline: both are UDP replies on their way out, and both go through the limiter.
    from tests.integration.test_recursor import FakeUpstream, forwarder, fwd_config

    up = await FakeUpstream("answer", ip="192.0.2.7").start()
    try:
        cfg = fwd_config(up.addr, rate_limit=RateLimitConfig(responses_per_second=2, slip=0))
        async with forwarder(cfg) as fwd:
            server = DnsServer(cfg, answer_table(cfg), forwarder=fwd)
            server.udp_direct = udp == "direct"
            assert server.rrl is not None
            server.rrl.clock = lambda: 1000.0  # frozen: no credit accrues between the two bursts
            await server.start()
            try:
                # One first query alone, answered by the recursor through a task...
                _, first = await asyncio.to_thread(udp_burst, server.port, FLOODER, ["www.example.org."], settle=0.5)
                assert len(full(first)) == 1 and up.asked() == 1
                # ... which used up one of the two credits: of 30 more, one is answered (cache).
                _, rest = await asyncio.to_thread(udp_burst, server.port, FLOODER, ["www.example.org."] * 30,
                                                  settle=0.3)
                assert len(full(rest)) == 1
                assert server.stats.rate_limit.dropped == 30 - len(rest)
            finally:
                await server.stop()
    finally:
        await up.stop()
