"""The forwarder against fake recursors on loopback: forwarding, failover, health, the cache
and serve-stale, the in-flight bound, the recursion ACL, and loops; then end to end through a
real DnsServer (dnspython and ``dig`` as clients).

Each fake recursor is a small asyncio DNS server (UDP and TCP on one 127.0.0.1 port, replies
built with dnslib) whose behaviour is set by ``mode``: answer, nxdomain, servfail, refused,
silent, truncate (TC over UDP, the full answer over TCP), spoof (a reply for another question),
loop (relays every query to our own DNS listener, as a resolver that forwards back to us does).
The cache's clock is injected (``Clock``); upstream timeouts are real but short.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import shutil
import socket
import struct
import time
from collections.abc import AsyncIterator

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.reversename
import pytest
from dnslib import EDNS0, PTR, QTYPE, RR, SOA, A, DNSRecord

from dnsdisco import forward as forwardmod
from dnsdisco.config import Config, DnsConfig
from dnsdisco.dns.message import Query
from dnsdisco.dns.server import DnsServer
from dnsdisco.dns.wire import parse
from dnsdisco.forward import Forwarder
from tests.dnstest import answer_table, ecs_option, opt_rr, request

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
NAME = "www.example.org."


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- the fake recursor ---------------------------------------------------------------------------


class FakeUpstream:
    """A DNS server on 127.0.0.1 (UDP+TCP, one port) whose behaviour is ``mode`` (see module doc)."""

    def __init__(self, mode: str = "answer", *, ip: str = "192.0.2.1", ttl: int = 300, delay: float = 0.0,
                 relay_port: int | None = None, rewrite_id: bool = False) -> None:
        self.mode = mode
        self.ip = ip
        self.ttl = ttl
        self.delay = delay
        self.relay_port = relay_port
        self.rewrite_id = rewrite_id
        self.seen: list[tuple[str, str, int, bytes]] = []  # (proto, qname, qtype, raw request)
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def addr(self) -> str:
        return f"{HOST}:{self.port}"

    def asked(self, name: str = NAME, proto: str | None = None) -> int:
        return sum(1 for p, n, _, _ in self.seen if n == name and (proto is None or p == proto))

    async def start(self) -> FakeUpstream:
        loop = asyncio.get_running_loop()
        for _ in range(20):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((HOST, 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((HOST, port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            break
        self.port = port
        self._udp, _ = await loop.create_datagram_endpoint(lambda: _FakeUdp(self), sock=udp)
        self._tcp = await asyncio.start_server(self._tcp_client, sock=tcp)
        return self

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()

    def spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                (n,) = struct.unpack("!H", await reader.readexactly(2))
                reply = await self.reply_to(await reader.readexactly(n), "tcp")
                if reply is not None:
                    writer.write(struct.pack("!H", len(reply)) + reply)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def reply_to(self, data: bytes, proto: str) -> bytes | None:
        q = DNSRecord.parse(data)
        qname = str(q.q.qname).lower()
        self.seen.append((proto, qname, q.q.qtype, data))
        if self.delay:
            await asyncio.sleep(self.delay)
        mode = self.mode
        if mode == "silent":
            return None
        if mode == "loop":
            return await self._relay(data)
        r = q.reply(ra=1, aa=0)
        if mode == "servfail":
            r.header.rcode = 2
        elif mode == "refused":
            r.header.rcode = 5
        elif mode == "spoof":
            r = DNSRecord.question("evil.example.", "A").reply()
            r.header.id = q.header.id
            r.add_answer(RR("evil.example.", QTYPE.A, rdata=A("203.0.113.66"), ttl=86400))
        elif mode == "truncate" and proto == "udp":
            r.header.tc = 1
        elif mode == "nxdomain":
            r.header.rcode = 3
            r.add_auth(RR("example.org", QTYPE.SOA, ttl=300,
                          rdata=SOA("ns1.example.org", "hostmaster.example.org", (1, 3600, 600, 86400, 60))))
        elif q.q.qtype == QTYPE.A:
            r.add_answer(RR(q.q.qname, QTYPE.A, rdata=A(self.ip), ttl=self.ttl))
        elif q.q.qtype == QTYPE.PTR and qname.endswith(".in-addr.arpa."):
            r.add_answer(RR(q.q.qname, QTYPE.PTR, rdata=PTR("host.example.org"), ttl=self.ttl))
        opt = next((rr for rr in q.ar if rr.rtype == QTYPE.OPT), None)
        if opt is not None:
            r.add_ar(EDNS0(udp_len=1232, flags="do" if opt.ttl & 0x8000 else ""))
        return r.pack()

    async def _relay(self, data: bytes) -> bytes | None:
        """Send the query on to our own listener, as a forwarder that points back at us does."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            sock.connect((HOST, self.relay_port))
            out = (struct.pack("!H", random.getrandbits(16)) + data[2:]) if self.rewrite_id else data
            await loop.sock_sendall(sock, out)
            try:
                reply = await asyncio.wait_for(loop.sock_recv(sock, 65535), 2.0)
            except TimeoutError:
                return None
            return data[:2] + reply[2:]
        finally:
            sock.close()


class _FakeUdp(asyncio.DatagramProtocol):
    def __init__(self, fake: FakeUpstream) -> None:
        self.fake = fake
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        async def answer() -> None:
            reply = await self.fake.reply_to(data, "udp")
            if reply is not None and self.transport is not None:
                self.transport.sendto(reply, addr)

        self.fake.spawn(answer())


@contextlib.asynccontextmanager
async def upstreams(*fakes: FakeUpstream) -> AsyncIterator[tuple[FakeUpstream, ...]]:
    for fake in fakes:
        await fake.start()
    try:
        yield fakes
    finally:
        for fake in fakes:
            await fake.stop()


def fwd_config(*recursors: str, **dns: object) -> Config:
    dns.setdefault("recursor_timeout", 0.3)
    return Config(client_addr=HOST, dns_port=0, recursors=tuple(recursors),
                  dns_config=dataclasses.replace(DnsConfig(), **dns))


@contextlib.asynccontextmanager
async def forwarder(config: Config, **kw: object) -> AsyncIterator[Forwarder]:
    kw.setdefault("probe_interval", 0.05)
    fwd = Forwarder(config, **kw)  # type: ignore[arg-type]
    await fwd.start()
    try:
        yield fwd
    finally:
        await fwd.stop()


def make_query(name: str = NAME, qtype: int = 1, *, id: int = 0x1234, tcp: bool = False, client: str = HOST,
               additional: tuple[bytes, ...] = ()) -> tuple[Query, bytes]:
    raw = request(name, qtype, id=id, additional=additional)
    q = parse(raw, tcp=tcp, client=(client, 40000))
    assert isinstance(q, Query)
    return q, raw


async def ask(fwd: Forwarder, name: str = NAME, qtype: int = 1, **kw) -> dns.message.Message:
    q, raw = make_query(name, qtype, **kw)
    return dns.message.from_wire(await fwd.resolve(q, raw))


def addresses(msg: dns.message.Message) -> list[str]:
    return [rr.address for rrset in msg.answer for rr in rrset if rrset.rdtype == dns.rdatatype.A]


async def eventually(cond, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def closed_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((HOST, 0))
    port = s.getsockname()[1]
    s.close()
    return port


# --- forwarding as Consul does it --------------------------------------------------------------


async def test_forwards_with_the_clients_id_question_and_ra():
    async with upstreams(FakeUpstream()) as (up,), forwarder(fwd_config(up.addr)) as fwd:
        msg = await ask(fwd, "WWW.Example.org.", id=4321)
        assert msg.id == 4321 and msg.rcode() == dns.rcode.NOERROR
        assert msg.flags & dns.flags.RA and msg.flags & dns.flags.RD
        assert msg.question[0].name.to_text() == "WWW.Example.org."
        assert addresses(msg) == ["192.0.2.1"]
        # Our upstream query carried a fresh random ID, not the client's (one socket, many clients).
        assert all(struct.unpack("!H", raw[:2])[0] != 4321 for _, n, _, raw in up.seen if n == NAME)


async def test_opt_echoed_only_to_clients_that_sent_one():
    async with upstreams(FakeUpstream()) as (up,), forwarder(fwd_config(up.addr)) as fwd:
        assert (await ask(fwd, additional=(opt_rr(1400),))).payload == 1400
        assert (await ask(fwd)).edns == -1  # now a cache hit fetched with EDNS: still no OPT
        assert (await ask(fwd, "other.example.org.")).edns == -1
        assert (await ask(fwd, "other.example.org.", additional=(opt_rr(4000),))).payload == 4000


async def test_sequential_always_asks_the_first():
    async with upstreams(FakeUpstream(ip="192.0.2.1"), FakeUpstream(ip="192.0.2.2")) as (a, b):
        async with forwarder(fwd_config(a.addr, b.addr)) as fwd:
            for i in range(5):
                assert addresses(await ask(fwd, f"n{i}.example.org.")) == ["192.0.2.1"]
            assert sum(b.asked(f"n{i}.example.org.") for i in range(5)) == 0


async def test_random_spreads_queries_over_recursors():
    async with upstreams(FakeUpstream(ip="192.0.2.1"), FakeUpstream(ip="192.0.2.2")) as (a, b):
        config = fwd_config(a.addr, b.addr, recursor_strategy="random")
        async with forwarder(config, rng=random.Random(3)) as fwd:
            got = {addresses(await ask(fwd, f"n{i}.example.org."))[0] for i in range(20)}
            assert got == {"192.0.2.1", "192.0.2.2"}


@pytest.mark.parametrize("mode", ["servfail", "refused", "silent", "spoof", "closed"])
async def test_failover_to_the_next_recursor(mode):
    first = FakeUpstream(mode if mode != "closed" else "answer", ip="192.0.2.1")
    async with upstreams(first, FakeUpstream(ip="192.0.2.2")) as (a, b):
        first_addr = f"{HOST}:{closed_port()}" if mode == "closed" else a.addr
        async with forwarder(fwd_config(first_addr, b.addr)) as fwd:
            started = time.monotonic()
            msg = await ask(fwd)
            took = time.monotonic() - started
            assert msg.rcode() == dns.rcode.NOERROR and addresses(msg) == ["192.0.2.2"]
            if mode in ("servfail", "refused", "closed"):
                assert took < 0.25  # no timeout: the rcode (or the ICMP error) moves on at once
            if mode == "spoof":
                assert fwd.stats.mismatched_replies >= 1  # RFC 5452: the wrong question is ignored
                assert "203.0.113.66" not in addresses(await ask(fwd))


async def test_all_recursors_failing_is_servfail_with_ra():
    async with upstreams(FakeUpstream("servfail"), FakeUpstream("silent")) as (a, b):
        async with forwarder(fwd_config(a.addr, b.addr)) as fwd:
            msg = await ask(fwd, additional=(opt_rr(1232),))
            assert msg.rcode() == dns.rcode.SERVFAIL and msg.flags & dns.flags.RA
            assert msg.edns == 0  # errors keep the OPT too (RFC 6891 §7)
            assert fwd.stats.servfail == 1 and a.asked() == 1 and b.asked() == 1


async def test_truncated_reply_is_passed_on_and_tcp_clients_go_upstream_over_tcp():
    async with upstreams(FakeUpstream("truncate")) as (up,), forwarder(fwd_config(up.addr)) as fwd:
        msg = await ask(fwd)
        assert msg.flags & dns.flags.TC and not msg.answer
        msg = await ask(fwd, tcp=True)
        assert not msg.flags & dns.flags.TC and addresses(msg) == ["192.0.2.1"]
        assert up.asked(proto="udp") == 1 and up.asked(proto="tcp") == 1
        msg = await ask(fwd)  # the TC reply was not cached; the full answer fetched over TCP was
        assert addresses(msg) == ["192.0.2.1"] and up.asked() == 2


async def test_no_recursors_means_refused_without_ra():
    async with forwarder(fwd_config()) as fwd:
        msg = await ask(fwd)
        assert msg.rcode() == dns.rcode.REFUSED and not msg.flags & dns.flags.RA
        assert not fwd.enabled


# --- the cache --------------------------------------------------------------------------------


async def test_cache_hit_is_not_sent_upstream_and_ttls_count_down():
    clock = Clock()
    async with upstreams(FakeUpstream(ttl=300)) as (up,), forwarder(fwd_config(up.addr), clock=clock) as fwd:
        first = await ask(fwd, id=1)
        clock.now += 100.7
        second = await ask(fwd, "www.EXAMPLE.org.", id=2)
        assert up.asked() == 1
        assert first.answer[0].ttl == 300 and second.answer[0].ttl == 200
        assert second.id == 2 and second.question[0].name.to_text() == "www.EXAMPLE.org."
        assert second.answer[0].name.to_text() == "www.EXAMPLE.org."
        q, _ = make_query(id=3)
        assert dns.message.from_wire(fwd.lookup(q)).answer[0].ttl == 200  # the server's inline path
        assert fwd.stats.cache_hits == 2
        clock.now += 200
        await ask(fwd)
        assert up.asked() == 2  # expired: asked again


async def test_negative_answers_are_cached_for_the_soa_minimum():
    clock = Clock()
    async with upstreams(FakeUpstream("nxdomain")) as (up,), forwarder(fwd_config(up.addr), clock=clock) as fwd:
        assert (await ask(fwd)).rcode() == dns.rcode.NXDOMAIN
        clock.now += 59
        msg = await ask(fwd)
        assert msg.rcode() == dns.rcode.NXDOMAIN and up.asked() == 1
        assert msg.authority[0].ttl == 300 - 59  # the SOA's TTL counts down too
        clock.now += 1
        await ask(fwd)
        assert up.asked() == 2  # RFC 2308 §5: min(SOA TTL 300, MINIMUM 60)


async def test_ecs_queries_are_not_cached():
    async with upstreams(FakeUpstream()) as (up,), forwarder(fwd_config(up.addr)) as fwd:
        ecs = (opt_rr(1232, options=[ecs_option(1, 24, bytes([10, 1, 2]))]),)
        await ask(fwd, additional=ecs)
        await ask(fwd, additional=ecs)
        assert up.asked() == 2


async def test_servfail_is_remembered_briefly():
    clock = Clock()
    async with upstreams(FakeUpstream("servfail")) as (up,), forwarder(fwd_config(up.addr), clock=clock) as fwd:
        assert (await ask(fwd)).rcode() == dns.rcode.SERVFAIL
        assert (await ask(fwd)).rcode() == dns.rcode.SERVFAIL
        assert up.asked() == 1
        clock.now += 5
        up.mode = "answer"
        assert addresses(await ask(fwd)) == ["192.0.2.1"]


async def test_stale_answer_when_every_recursor_fails_then_fresh_again():
    clock = Clock()
    async with upstreams(FakeUpstream(ttl=60)) as (up,), forwarder(fwd_config(up.addr), clock=clock) as fwd:
        await ask(fwd)
        clock.now += 61
        up.mode = "silent"
        msg = await ask(fwd, additional=(opt_rr(1232),))
        assert msg.rcode() == dns.rcode.NOERROR and addresses(msg) == ["192.0.2.1"]
        assert msg.answer[0].ttl == 30 and msg.edns == 0  # RFC 8767 §4
        assert fwd.stats.stale_served == 1
        # The failure is remembered for a few seconds: stale again without asking.
        asked = up.asked()
        assert addresses(await ask(fwd)) == ["192.0.2.1"] and up.asked() == asked
        # The recursor is back: the next query after the recheck gets fresh data.
        up.mode, up.ip = "answer", "192.0.2.9"
        clock.now += 5
        msg = await ask(fwd)
        assert addresses(msg) == ["192.0.2.9"] and msg.answer[0].ttl == 60


async def test_stale_is_bounded_by_recursor_serve_stale():
    clock = Clock()
    async with upstreams(FakeUpstream(ttl=60)) as (up,):
        config = fwd_config(up.addr, recursor_serve_stale=600.0)
        async with forwarder(config, clock=clock) as fwd:
            await ask(fwd)
            up.mode = "servfail"
            clock.now += 60 + 599
            assert addresses(await ask(fwd)) == ["192.0.2.1"]
            clock.now += 2
            assert (await ask(fwd)).rcode() == dns.rcode.SERVFAIL


async def test_a_slow_recursor_gets_a_stale_answer_after_the_client_response_timer(monkeypatch):
    monkeypatch.setattr(forwardmod, "STALE_ANSWER_WAIT", 0.1)
    clock = Clock()
    async with upstreams(FakeUpstream(ttl=60)) as (up,):
        async with forwarder(fwd_config(up.addr, recursor_timeout=2.0), clock=clock) as fwd:
            await ask(fwd)
            clock.now += 61
            up.delay, up.ip = 0.4, "192.0.2.9"
            started = time.monotonic()
            msg = await ask(fwd)
            assert time.monotonic() - started < 0.35
            assert addresses(msg) == ["192.0.2.1"] and msg.answer[0].ttl == 30
            # The fetch went on and refreshed the cache.
            await eventually(lambda: fwd._fetching == 0)
            assert addresses(await ask(fwd)) == ["192.0.2.9"]


# --- upstream health and bounds -------------------------------------------------------------------


async def test_a_dead_first_recursor_leaves_the_rotation_and_comes_back(caplog):
    caplog.set_level(logging.INFO, logger="dnsdisco.forward")
    async with upstreams(FakeUpstream("silent", ip="192.0.2.1"), FakeUpstream(ip="192.0.2.2")) as (a, b):
        async with forwarder(fwd_config(a.addr, b.addr)) as fwd:
            for i in range(2):  # two timeouts in a row
                assert addresses(await ask(fwd, f"n{i}.example.org.")) == ["192.0.2.2"]
            assert not fwd.upstreams[0].healthy
            assert "out of rotation" in caplog.text
            started = time.monotonic()
            assert addresses(await ask(fwd, "n2.example.org.")) == ["192.0.2.2"]
            assert time.monotonic() - started < 0.2  # the dead one's timeout is not paid again
            assert a.asked("n2.example.org.") == 0
            await eventually(lambda: a.asked(".") >= 2)  # probed in the background (". NS")
            a.mode = "answer"
            await eventually(lambda: fwd.upstreams[0].healthy)
            assert "answers again" in caplog.text
            assert addresses(await ask(fwd, "n3.example.org.")) == ["192.0.2.1"]


async def test_in_flight_bound_refuses_and_counts():
    async with upstreams(FakeUpstream(delay=0.3)) as (up,):
        async with forwarder(fwd_config(up.addr, recursor_max_concurrent=2, recursor_timeout=2.0)) as fwd:
            replies = await asyncio.gather(*(ask(fwd, f"n{i}.example.org.") for i in range(3)))
            rcodes = sorted(m.rcode() for m in replies)
            assert rcodes == [dns.rcode.NOERROR, dns.rcode.NOERROR, dns.rcode.REFUSED]
            refused = next(m for m in replies if m.rcode() == dns.rcode.REFUSED)
            assert refused.flags & dns.flags.RA
            assert fwd.stats.rejected == 1


async def test_identical_queries_in_flight_share_one_upstream_query():
    async with upstreams(FakeUpstream(delay=0.2)) as (up,), forwarder(fwd_config(up.addr, recursor_timeout=2.0)) as fwd:
        replies = await asyncio.gather(*(ask(fwd, id=i) for i in range(5)))
        assert [m.id for m in replies] == list(range(5))
        assert all(addresses(m) == ["192.0.2.1"] for m in replies)
        assert up.asked() == 1 and fwd.stats.coalesced == 4


async def test_reload_changes_recursors_and_keeps_the_health_of_the_rest():
    async with upstreams(FakeUpstream("silent", ip="192.0.2.1"), FakeUpstream(ip="192.0.2.2"),
                         FakeUpstream(ip="192.0.2.3")) as (a, b, c):
        async with forwarder(fwd_config(a.addr, b.addr)) as fwd:
            await ask(fwd, "n0.example.org.")
            await ask(fwd, "n1.example.org.")
            dead = fwd.upstreams[0]
            assert not dead.healthy
            fwd.reload(fwd_config(a.addr, c.addr, recursor_strategy="random"))
            assert fwd.upstreams[0] is dead and not dead.healthy
            assert [u.text for u in fwd.upstreams] == [a.addr, c.addr]
            assert addresses(await ask(fwd, "n2.example.org.")) == ["192.0.2.3"]
            fwd.reload(fwd_config())
            assert (await ask(fwd, "n3.example.org.")).rcode() == dns.rcode.REFUSED


# --- not an open resolver -----------------------------------------------------------------------------


def test_allowed_networks():
    fwd = Forwarder(fwd_config("192.0.2.53:53"))
    for ip in ("127.0.0.1", "::1", "10.1.2.3", "172.16.0.9", "172.31.255.255", "192.168.7.7", "fd00::1",
               "::ffff:10.0.0.1", "::1%lo"):
        assert fwd.allowed(ip), ip
    for ip in ("203.0.113.9", "172.32.0.1", "8.8.8.8", "2001:db8::1", "::ffff:8.8.8.8", "", "not-an-ip"):
        assert not fwd.allowed(ip), ip
    fwd.reload(fwd_config("192.0.2.53:53", allow_recursion=("203.0.113.0/24",)))
    assert fwd.allowed("203.0.113.9") and not fwd.allowed("127.0.0.1")


def test_allow_recursion_config_is_checked_and_normalised():
    from dnsdisco import config as configmod
    from dnsdisco.errors import ConfigError

    cfg = configmod.load(overrides={"dns_config": {"allow_recursion": ["192.168.1.7/24", "2001:db8::1", "10.0.0.0/8"],
                                                   "recursor_cache_size": 0}}, dev=True)
    assert cfg.dns_config.allow_recursion == ("192.168.1.0/24", "2001:db8::1/128", "10.0.0.0/8")
    assert Forwarder(cfg).cache is None
    assert configmod.load(dev=True).dns_config.allow_recursion == configmod.DEFAULT_ALLOW_RECURSION
    with pytest.raises(ConfigError) as err:
        configmod.load(overrides={"dns_config": {"allow_recursion": ["10.0.0.0/8", "10.0.0.0/33"]}}, dev=True)
    assert "dns_config.allow_recursion" in str(err.value) and "'10.0.0.0/33' is not a CIDR" in str(err.value)
    with pytest.raises(ConfigError):
        configmod.load(overrides={"dns_config": {"allow_recursion": "10.0.0.0/8"}}, dev=True)


async def test_clients_outside_allow_recursion_are_refused():
    async with upstreams(FakeUpstream()) as (up,), forwarder(fwd_config(up.addr)) as fwd:
        msg = await ask(fwd, client="203.0.113.9")
        assert msg.rcode() == dns.rcode.REFUSED and not msg.flags & dns.flags.RA
        assert up.asked() == 0 and fwd.stats.refused_clients == 1


# --- loops ------------------------------------------------------------------------------------------


async def test_our_own_query_coming_back_is_cut_off_and_checked():
    async with upstreams(FakeUpstream(delay=0.3)) as (up,), forwarder(fwd_config(up.addr, recursor_timeout=2.0)) as fwd:
        task = asyncio.ensure_future(ask(fwd))
        await eventually(lambda: up.asked() == 1)
        sent = next(raw for _, n, _, raw in up.seen if n == NAME)
        # The same bytes arrive at our listener (an iptables redirect back to us): SERVFAIL now,
        # instead of forwarding them again, and a loop probe goes out to confirm.
        back = parse(sent, tcp=False, client=(HOST, 53))
        assert isinstance(back, Query)
        reply = dns.message.from_wire(await fwd.resolve(back, sent))
        assert reply.rcode() == dns.rcode.SERVFAIL
        assert addresses(await task) == ["192.0.2.1"]
        assert fwd.upstreams[0].loop is None  # only a hint: the probe decides


def test_a_recursor_that_is_our_own_listener_is_never_used(caplog):
    config = dataclasses.replace(fwd_config("127.0.0.1:8600", "192.0.2.53:53"), dns_port=8600)
    fwd = Forwarder(config)
    assert fwd.upstreams[0].loop and fwd.upstreams[1].loop is None
    assert "own DNS address" in caplog.text


# --- end to end through a real DnsServer -------------------------------------------------------------


@contextlib.asynccontextmanager
async def served(config: Config, fwd: Forwarder, on_listen=None) -> AsyncIterator[DnsServer]:
    table = answer_table(config)
    server = DnsServer(config, table, forwarder=fwd)
    await server.start()
    if on_listen is not None:
        started = on_listen(server)
        if asyncio.iscoroutine(started):
            await started
    await fwd.start()  # after the listener is up, so that loop probes can come back to it
    try:
        yield server
    finally:
        await fwd.stop()
        await server.stop()


async def dns_query(port: int, name: str, rdtype: str = "A", *, tcp: bool = False,
                    timeout: float = 3.0) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    if tcp:
        return await dns.asyncquery.tcp(q, HOST, port=port, timeout=timeout)
    return await dns.asyncquery.udp(q, HOST, port=port, timeout=timeout)


async def test_e2e_forwarding_over_udp_and_tcp_and_catalog_names_still_local():
    async with upstreams(FakeUpstream()) as (up,):
        config = fwd_config(up.addr)
        fwd = Forwarder(config, probe_interval=0.05)
        async with served(config, fwd) as server:
            for tcp in (False, True):
                msg = await dns_query(server.port, "www.example.org.", tcp=tcp)
                assert addresses(msg) == ["192.0.2.1"] and msg.flags & dns.flags.RA
            assert up.asked(proto="udp") == 1  # the TCP query was a cache hit
            msg = await dns_query(server.port, "web.service.consul.")
            assert msg.rcode() == dns.rcode.NOERROR and msg.flags & dns.flags.RA and msg.flags & dns.flags.AA
            assert up.asked("web.service.consul.") == 0


async def test_e2e_unknown_reverse_names_are_forwarded_known_ones_answered():
    async with upstreams(FakeUpstream()) as (up,):
        config = fwd_config(up.addr)
        async with served(config, Forwarder(config, probe_interval=0.05)) as server:
            unknown = dns.reversename.from_address("192.0.2.77").to_text()
            msg = await dns_query(server.port, unknown, "PTR")
            assert msg.answer[0][0].target.to_text() == "host.example.org."
            assert up.asked(unknown) == 1
            known = dns.reversename.from_address("10.0.0.1").to_text()  # node0 in the test catalog
            msg = await dns_query(server.port, known, "PTR")
            assert msg.answer[0][0].target.to_text().startswith("node0.node.dc1.consul")
            assert up.asked(known) == 0


@pytest.mark.parametrize("rewrite_id", [False, True])
async def test_e2e_a_recursor_that_forwards_back_to_us_is_dropped(caplog, rewrite_id):
    caplog.set_level(logging.INFO, logger="dnsdisco.forward")
    looping = FakeUpstream("loop", rewrite_id=rewrite_id)
    async with upstreams(looping, FakeUpstream(ip="192.0.2.2")) as (a, b):
        config = fwd_config(a.addr, b.addr, recursor_timeout=1.0)
        fwd = Forwarder(config, probe_interval=0.05)
        async with served(config, fwd, on_listen=lambda server: setattr(a, "relay_port", server.port)) as server:
            await eventually(lambda: fwd.upstreams[0].loop is not None)
            assert "forwarding loop through recursor" in caplog.text and fwd.stats.loops_detected == 1
            msg = await dns_query(server.port, "www.example.org.")
            assert addresses(msg) == ["192.0.2.2"]
            assert a.asked("www.example.org.") == 0
            # Fixed, and a reload says so: checked again, and back in rotation.
            a.mode = "answer"
            fwd.reload(config)
            await eventually(lambda: fwd.upstreams[0].loop_check is not None and fwd.upstreams[0].loop_check.done())
            assert fwd.upstreams[0].loop is None
            assert addresses(await dns_query(server.port, "new.example.org.")) == ["192.0.2.1"]


async def test_e2e_refuses_recursion_outside_allow_recursion():
    async with upstreams(FakeUpstream()) as (up,):
        config = fwd_config(up.addr, allow_recursion=("10.0.0.0/8",))  # loopback not allowed
        async with served(config, Forwarder(config, probe_interval=0.05)) as server:
            msg = await dns_query(server.port, "www.example.org.")
            assert msg.rcode() == dns.rcode.REFUSED
            msg = await dns_query(server.port, "web.service.consul.")
            assert msg.rcode() == dns.rcode.NOERROR and msg.answer  # catalog names still answer
            assert up.asked() == 0


@pytest.mark.skipif(shutil.which("dig") is None, reason="dig is not installed (bind9-dnsutils)")
@pytest.mark.parametrize("extra", [[], ["+tcp"], ["+dnssec"], ["+noedns"]])
async def test_e2e_dig(extra):
    async with upstreams(FakeUpstream()) as (up,):
        config = fwd_config(up.addr)
        async with served(config, Forwarder(config, probe_interval=0.05)) as server:
            proc = await asyncio.create_subprocess_exec(
                "dig", f"@{HOST}", "-p", str(server.port), "+tries=1", "+time=2", *extra, "www.example.org", "A",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )
            out = (await proc.communicate())[0].decode()
            assert "status: NOERROR" in out, out
            assert " ra" in out.split(";; flags:", 1)[1].split(";", 1)[0], out
            assert "192.0.2.1" in out
            assert ("; EDNS:" in out) == ("+noedns" not in extra), out


# --- a real forwarder as the recursor: dnsmasq ---------------------------------------------------


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 right now (dnsmasq binds it a moment later)."""
    for _ in range(20):
        port = closed_port()
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            tcp.bind((HOST, port))
            return port
        except OSError:
            continue
        finally:
            tcp.close()
    raise RuntimeError("no free port")


@contextlib.asynccontextmanager
async def dnsmasq(port: int, server_port: int) -> AsyncIterator[None]:
    """dnsmasq on *port*: example.org answered locally (192.0.2.1), everything else sent to
    127.0.0.1#*server_port*, no cache (so that every query goes through)."""
    proc = await asyncio.create_subprocess_exec(
        "dnsmasq", "--no-daemon", f"--port={port}", "--listen-address=127.0.0.1", "--bind-interfaces",
        "--no-resolv", "--no-hosts", "--conf-file=/dev/null", "--pid-file=", "--cache-size=0",
        "--address=/example.org/192.0.2.1", f"--server=127.0.0.1#{server_port}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        for _ in range(100):  # wait until it answers
            try:
                await dns_query(port, "ready.example.org.", timeout=0.1)
                break
            except Exception:
                await asyncio.sleep(0.05)
        yield
    finally:
        proc.terminate()
        await proc.wait()


needs_dnsmasq = pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq is not installed")


@needs_dnsmasq
async def test_dnsmasq_as_recursor():
    async with upstreams(FakeUpstream(ip="192.0.2.5")) as (beyond,):
        port = free_port()
        async with dnsmasq(port, beyond.port):
            config = fwd_config(f"{HOST}:{port}", recursor_timeout=1.0)
            async with served(config, Forwarder(config, probe_interval=0.05)) as server:
                assert addresses(await dns_query(server.port, "www.example.org.")) == ["192.0.2.1"]
                assert addresses(await dns_query(server.port, "elsewhere.test.")) == ["192.0.2.5"]


@needs_dnsmasq
async def test_dnsmasq_forwarding_back_to_us_is_a_loop(caplog):
    # The setup Consul's docs warn about: a local forwarder that sends names to the agent, named
    # as the agent's recursor (hashicorp/consul#1800, #5983). dnsmasq rewrites query IDs, so only
    # the probe names can tell.
    caplog.set_level(logging.INFO, logger="dnsdisco.forward")
    async with upstreams(FakeUpstream(ip="192.0.2.2")) as (other,):
        port = free_port()
        config = fwd_config(f"{HOST}:{port}", other.addr, recursor_timeout=1.0)
        fwd = Forwarder(config, probe_interval=0.05)
        async with contextlib.AsyncExitStack() as stack:

            async def start_dnsmasq(server: DnsServer) -> None:
                await stack.enter_async_context(dnsmasq(port, server.port))

            server = await stack.enter_async_context(served(config, fwd, on_listen=start_dnsmasq))
            await eventually(lambda: fwd.upstreams[0].loop is not None)
            assert "forwarding loop through recursor" in caplog.text
            # dnsmasq would have said 192.0.2.1; it is out of rotation, so the other one answers.
            assert addresses(await dns_query(server.port, "www.example.org.")) == ["192.0.2.2"]
