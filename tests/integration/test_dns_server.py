"""dns.server over real loopback sockets: UDP and TCP on one port, the error ladder seen from a
client, TCP framing, pipelining and bounds, overload drops, and the forwarder seam.

Transport behaviour is tested against ``StubTable`` (a few fixed answers, so that a failure
here points at the transport); the last part of the module runs catalog questions, and the
error ladder again, through the real ``AnswerTable`` fed a ``CatalogDelta``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import struct

import dns.asyncquery
import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from dnsdisco.config import Config
from dnsdisco.dns import server as servermod
from dnsdisco.dns.message import Query, Rcode, encode_opt, header, reply_flags
from dnsdisco.dns.server import DnsServer
from tests.dnstest import (
    frame,
    opt_rr,
    question,
    rcode_of,
    request,
    running_server,
    tcp_exchange,
    tcp_open,
    tcp_read_frame,
    test_config,
    udp_exchange,
)
from tests.dnstest import BIG_N, answer_table, catalog_delta

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
BIG = 60_000  # bytes of padding in the stub's "big." answer (TCP only)


class StubTable:
    """Answers ``*.consul.`` with one A record, raises for ``boom.consul.``, owns nothing else."""

    def __init__(self) -> None:
        self.calls = 0

    def respond(self, query: Query) -> bytes | None:
        self.calls += 1
        if not query.qname.endswith("consul."):
            return None
        if query.qname == "boom.consul.":
            raise RuntimeError("stub table failure")
        answers = [b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 0, 4) + bytes([10, 0, 0, 1])]
        if query.qname == "big.consul.":
            # One oversized TXT-ish record to fill TCP write buffers.
            answers = [b"\xc0\x0c" + struct.pack("!HHIH", 16, 1, 0, BIG) + b"\x00" * BIG]
        flags = reply_flags(query, Rcode.NOERROR, aa=True, ra=False)
        opt = b"" if query.edns is None else encode_opt(query.edns)
        return header(query.id, flags, 1, len(answers), 0, 1 if opt else 0) + query.question + b"".join(answers) + opt


@pytest.fixture
async def server():
    async with running_server(StubTable()) as srv:
        yield srv


@pytest.fixture(params=["direct", "protocol"])
async def udp_server(request):
    """Both UDP paths: the direct socket reader and the DatagramProtocol fallback."""
    srv = DnsServer(test_config(), StubTable())
    srv.udp_direct = request.param == "direct"
    await srv.start()
    assert isinstance(srv._udp, servermod._UdpReader) == srv.udp_direct
    try:
        yield srv
    finally:
        await srv.stop()


async def ask(server: DnsServer, qname: str, rdtype: str = "A", *, tcp: bool = False, **kw) -> dns.message.Message:
    q = dns.message.make_query(qname, rdtype, **kw)
    if tcp:
        return await dns.asyncquery.tcp(q, HOST, port=server.port, timeout=2)
    return await dns.asyncquery.udp(q, HOST, port=server.port, timeout=2)


async def exchange(server: DnsServer, data: bytes, *, tcp: bool, timeout: float = 2.0) -> bytes | None:
    if tcp:
        return await tcp_exchange(server.port, data, timeout=timeout)
    return await udp_exchange(server.port, data, timeout=timeout)


# --- listeners ---------------------------------------------------------------------------------


async def test_udp_and_tcp_share_one_ephemeral_port(udp_server):
    server = udp_server
    assert server.port and server.address == HOST
    udp = await ask(server, "web.service.consul.")
    tcp = await ask(server, "web.service.consul.", tcp=True)
    for reply in (udp, tcp):
        assert reply.rcode() == dns.rcode.NOERROR and reply.flags & dns.flags.AA
        assert [rr.address for rr in reply.answer[0]] == ["10.0.0.1"]


async def test_port_minus_one_disables():
    srv = DnsServer(Config(dns_port=-1), StubTable())
    await srv.start()
    assert srv.port is None
    await srv.stop()


async def test_a_taken_port_raises():
    async with running_server(StubTable()) as first:
        cfg = Config(client_addr=HOST, dns_port=first.port)
        with pytest.raises(OSError):
            await DnsServer(cfg, StubTable()).start()


async def test_dns_addr_wins_over_client_addr():
    cfg = Config(client_addr="0.0.0.0", dns_addr=HOST, dns_port=0)
    async with running_server(StubTable(), cfg) as srv:
        assert srv.address == HOST
        assert (await ask(srv, "web.service.consul.")).rcode() == dns.rcode.NOERROR


async def test_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    async with running_server(StubTable(), Config(client_addr="::1", dns_port=0)) as srv:
        q = dns.message.make_query("web.service.consul.", "A")
        for reply in (
            await dns.asyncquery.udp(q, "::1", port=srv.port, timeout=2),
            await dns.asyncquery.tcp(q, "::1", port=srv.port, timeout=2),
        ):
            assert reply.rcode() == dns.rcode.NOERROR


async def test_stop_then_port_is_free_again():
    async with running_server(StubTable()) as srv:
        port = srv.port
    cfg = Config(client_addr=HOST, dns_port=port)
    async with running_server(StubTable(), cfg) as again:
        assert again.port == port


# --- answers and the transport's own replies ---------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
async def test_out_of_zone_is_refused_without_ra_or_aa(udp_server, tcp):
    server = udp_server
    reply = await ask(server, "example.com.", tcp=tcp)
    assert reply.rcode() == dns.rcode.REFUSED
    assert not reply.flags & (dns.flags.RA | dns.flags.AA)
    assert [q.name.to_text() for q in reply.question] == ["example.com."]
    assert not reply.answer


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
async def test_table_exception_is_servfail_and_logged_once(udp_server, tcp, caplog):
    server = udp_server
    caplog.set_level(logging.ERROR, logger="dnsdisco.dns.server")
    for _ in range(3):
        reply = await ask(server, "boom.consul.", tcp=tcp)
        assert reply.rcode() == dns.rcode.SERVFAIL
    assert server.stats.errors == 3
    assert len([r for r in caplog.records if "SERVFAIL" in r.getMessage()]) == 1
    assert (await ask(server, "web.service.consul.", tcp=tcp)).rcode() == dns.rcode.NOERROR


# The ladder as a client sees it: (name, raw request, expected rcode or None for silence).
LADDER = [
    ("short", b"\x12\x34\x01\x00\x00", None),
    ("qr-set", request(flags=0x8100), None),
    ("opcode-2", request(flags=(2 << 11) | 0x0100), Rcode.NOTIMP),
    ("qdcount-2", request(body=question("a.consul.") * 2, counts=(2, 0, 0, 0)), Rcode.FORMERR),
    ("garbage-question", request(body=b"\x05ab\xff", id=0x4242), Rcode.FORMERR),
    ("class-ch", request("version.bind.", 16, qclass=3), Rcode.REFUSED),
    ("edns-version-1", request(additional=[opt_rr(1232, version=1)]), Rcode.BADVERS),
    ("two-opts", request(additional=[opt_rr(1232), opt_rr(1232)]), Rcode.FORMERR),
]


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
@pytest.mark.parametrize("name, data, rcode", LADDER, ids=[row[0] for row in LADDER])
async def test_error_ladder(udp_server, tcp, name, data, rcode):
    server = udp_server
    reply = await exchange(server, data, tcp=tcp, timeout=0.3 if rcode is None else 2.0)
    if rcode is None:
        assert reply is None  # dropped: the client times out
        return
    assert reply is not None
    assert reply[:2] == data[:2]  # ID echoed
    assert rcode_of(reply) == rcode
    msg = dns.message.from_wire(reply)
    assert not msg.answer
    if name == "edns-version-1":
        assert reply[3] & 0xF == 0  # BADVERS lives in the OPT: low header bits 0
        assert msg.edns == 0  # answered at version 0
    if name == "two-opts":
        assert msg.edns == 0  # FORMERR *with* an OPT (RFC 6891 §7)


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
async def test_no_opt_in_no_opt_out_and_ecs_echoed_with_scope_zero(udp_server, tcp):
    server = udp_server
    plain = await ask(server, "web.service.consul.", tcp=tcp)
    assert plain.edns == -1
    refused = await ask(server, "example.com.", tcp=tcp)
    assert refused.edns == -1
    ecs = dns.edns.ECSOption("10.1.2.0", 24)
    for name in ("web.service.consul.", "example.com."):
        reply = await ask(server, name, tcp=tcp, use_edns=0, payload=1400, options=[ecs])
        assert reply.edns == 0 and reply.payload == 1400
        (echo,) = reply.options
        assert (echo.address, echo.srclen, echo.scopelen) == ("10.1.2.0", 24, 0)


async def test_garbage_burst_then_still_answers(udp_server):
    server = udp_server
    rng = random.Random(99)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for i in range(3000):
            size = rng.choice([0, 1, 5, 11, 12, 13, 30, 60, 300, 1500])
            data = bytes(rng.randrange(256) for _ in range(size))
            if i % 3 == 0 and size >= 12:  # keep QR clear so the ladder is exercised, not just drops
                data = data[:2] + bytes([data[2] & 0x7F]) + data[3:]
            sock.sendto(data, (HOST, server.port))
            if i % 200 == 0:
                await asyncio.sleep(0)
    finally:
        sock.close()
    reader, writer = await tcp_open(server.port)
    for _ in range(20):
        writer.write(bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200))))
    writer.close()
    reply = await ask(server, "web.service.consul.")
    assert reply.rcode() == dns.rcode.NOERROR
    assert (await ask(server, "web.service.consul.", tcp=True)).rcode() == dns.rcode.NOERROR


# --- TCP ------------------------------------------------------------------------------------


async def test_tcp_pipelining_three_back_to_back(server):
    reader, writer = await tcp_open(server.port)
    names = {101: "a.service.consul.", 102: "example.org.", 103: "b.service.consul."}
    writer.write(b"".join(frame(request(name, id=i)) for i, name in names.items()))
    replies = {}
    for _ in names:
        reply = await tcp_read_frame(reader)
        assert reply is not None
        msg = dns.message.from_wire(reply)
        replies[msg.id] = msg
    writer.close()
    assert set(replies) == set(names)
    assert replies[101].rcode() == replies[103].rcode() == dns.rcode.NOERROR
    assert replies[102].rcode() == dns.rcode.REFUSED
    assert replies[103].question[0].name.to_text() == names[103]


async def test_tcp_frames_split_across_segments(server):
    reader, writer = await tcp_open(server.port)
    data = frame(request(id=7)) + frame(request(id=8))
    for i in range(len(data)):
        writer.write(data[i : i + 1])
        await writer.drain()
        if i % 5 == 0:
            await asyncio.sleep(0.001)
    ids = []
    for _ in range(2):
        reply = await tcp_read_frame(reader)
        assert reply is not None
        ids.append(struct.unpack("!H", reply[:2])[0])
    writer.close()
    assert sorted(ids) == [7, 8]


async def test_tcp_short_read_then_close_is_harmless(server):
    reader, writer = await tcp_open(server.port)
    writer.write(frame(request())[:9])  # half a frame, then hang up
    await writer.drain()
    writer.close()
    await asyncio.sleep(0.05)
    assert (await ask(server, "web.service.consul.", tcp=True)).rcode() == dns.rcode.NOERROR


async def test_tcp_zero_length_frame_is_ignored(server):
    reader, writer = await tcp_open(server.port)
    writer.write(b"\x00\x00" + frame(request(id=55)))
    reply = await tcp_read_frame(reader)
    writer.close()
    assert reply is not None and reply[:2] == b"\x00\x37"


async def test_tcp_idle_connection_is_closed():
    async with running_server(StubTable(), test_config(tcp_idle_timeout=0.3)) as srv:
        reader, writer = await tcp_open(srv.port)
        writer.write(frame(request(id=1)))
        assert await tcp_read_frame(reader) is not None
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await asyncio.wait_for(reader.read(), 3) == b""  # EOF: the server closed it
        assert 0.2 <= loop.time() - start < 2
        assert srv.stats.tcp_idle_closed == 1
        writer.close()


async def test_tcp_activity_keeps_a_connection_open():
    async with running_server(StubTable(), test_config(tcp_idle_timeout=0.3)) as srv:
        reader, writer = await tcp_open(srv.port)
        for i in range(6):  # 0.6 s of traffic, never 0.3 s idle
            writer.write(frame(request(id=i)))
            assert await tcp_read_frame(reader) is not None
            await asyncio.sleep(0.1)
        assert srv.stats.tcp_idle_closed == 0
        writer.close()


async def test_tcp_connection_bound():
    async with running_server(StubTable(), test_config(tcp_max_connections=2)) as srv:
        held = []
        for i in range(2):
            reader, writer = await tcp_open(srv.port)
            writer.write(frame(request(id=i)))
            assert await tcp_read_frame(reader) is not None
            held.append((reader, writer))
        reader, writer = await tcp_open(srv.port)
        writer.write(frame(request(id=9)))
        assert await tcp_read_frame(reader) is None  # closed at once
        writer.close()
        assert srv.stats.tcp_rejected == 1
        held[0][1].close()
        await asyncio.sleep(0.05)
        assert (await ask(srv, "web.service.consul.", tcp=True)).rcode() == dns.rcode.NOERROR
        for _, w in held:
            w.close()


async def test_tcp_slow_reader_is_paused_not_buffered(server):
    # 300 queries for a 60 kB answer, never reading: 18 MB of replies if nothing held back.
    sock = socket.create_connection((HOST, server.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.sendall(b"".join(frame(request("big.consul.", 16, id=i)) for i in range(300)))
    await asyncio.sleep(0.3)
    (conn,) = server._connections
    assert conn.write_paused
    assert conn.transport.get_write_buffer_size() < servermod.TCP_WRITE_HIGH + 2 * (BIG + 100)
    # Now read everything: reading resumes and every query is answered.
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    got = 0
    buf = b""
    while got < 300:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 5)
        assert chunk
        buf += chunk
        while len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
            buf = buf[2 + struct.unpack("!H", buf[:2])[0] :]
            got += 1
    sock.close()
    assert got == 300


async def test_tcp_frame_never_completed_is_closed_when_idle():
    async with running_server(StubTable(), test_config(tcp_idle_timeout=0.3)) as srv:
        reader, writer = await tcp_open(srv.port)
        writer.write(b"\xff\xff" + request()[:100])  # announces 65535 bytes, sends 100
        assert await asyncio.wait_for(reader.read(), 3) == b""
        assert srv.stats.tcp_idle_closed == 1 and srv.stats.tcp_requests == 0
        writer.close()


# --- UDP overload (fakes: a full kernel buffer is hard to provoke on loopback) ---------------


class FakeSocket:
    """recvfrom() yields the queued datagrams then EAGAIN; sendto() fails as told."""

    def __init__(self, datagrams, send_errors) -> None:  # type: ignore[no-untyped-def]
        self.datagrams = list(datagrams)
        self.send_errors = list(send_errors)
        self.sent: list[bytes] = []

    def recvfrom(self, size):  # type: ignore[no-untyped-def]
        if not self.datagrams:
            raise BlockingIOError
        return self.datagrams.pop(0), ("127.0.0.1", 1)

    def sendto(self, data, addr):  # type: ignore[no-untyped-def]
        error = self.send_errors.pop(0) if self.send_errors else None
        if error is not None:
            raise error
        self.sent.append(data)


async def test_udp_reader_drops_when_the_kernel_buffer_is_full():
    srv = DnsServer(test_config(), StubTable())
    sock = FakeSocket([request(id=i) for i in range(4)], [None, BlockingIOError(), ConnectionRefusedError(), None])
    reader = servermod._UdpReader(srv, sock, asyncio.get_running_loop())  # type: ignore[arg-type]
    reader.on_readable()
    assert [struct.unpack("!H", d[:2])[0] for d in sock.sent] == [0, 3]
    assert (srv.stats.udp_requests, srv.stats.udp_dropped_overload, srv.stats.udp_send_errors) == (4, 1, 1)


async def test_udp_reader_reads_at_most_one_batch_per_wakeup():
    srv = DnsServer(test_config(), StubTable())
    sock = FakeSocket([request(id=i) for i in range(servermod.UDP_BATCH + 5)], [])
    reader = servermod._UdpReader(srv, sock, asyncio.get_running_loop())  # type: ignore[arg-type]
    reader.on_readable()
    assert len(sock.sent) == servermod.UDP_BATCH  # the rest: next wake-up (shed mode: from the stack)
    assert len(sock.datagrams) + len(reader.stack) == 5


class FakeDatagramTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self.high = high

    def sendto(self, data, addr) -> None:
        self.sent.append((data, addr))

    def is_closing(self) -> bool:
        return False


async def test_udp_drops_while_the_send_buffer_is_full():
    srv = DnsServer(test_config(), StubTable())
    proto = servermod._UdpProtocol(srv)
    transport = FakeDatagramTransport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    assert transport.high == servermod.UDP_WRITE_HIGH
    proto.datagram_received(request(id=1), ("127.0.0.1", 1))
    proto.pause_writing()
    proto.datagram_received(request(id=2), ("127.0.0.1", 1))
    proto.resume_writing()
    proto.datagram_received(request(id=3), ("127.0.0.1", 1))
    assert [struct.unpack("!H", d[:2])[0] for d, _ in transport.sent] == [1, 3]
    assert srv.stats.udp_dropped_overload == 1


# --- query log and reload --------------------------------------------------------------------


async def test_query_log_only_when_enabled(caplog):
    caplog.set_level(logging.INFO, logger="dnsdisco.dns.query")
    async with running_server(StubTable()) as srv:
        await ask(srv, "web.service.consul.")
        assert not [r for r in caplog.records if r.name == "dnsdisco.dns.query"]
        srv.reload(test_config(query_log=True, tcp_idle_timeout=0.2))
        assert srv.tcp_idle_timeout == 0.2
        await ask(srv, "web.service.consul.")
        await ask(srv, "example.com.", tcp=True)
        lines = [r.getMessage() for r in caplog.records if r.name == "dnsdisco.dns.query"]
        assert len(lines) == 2
        assert "proto=udp" in lines[0] and "qname=web.service.consul." in lines[0] and "rcode=0" in lines[0]
        assert "proto=tcp" in lines[1] and "rcode=5" in lines[1]


# --- the forwarder seam ----------------------------------------------------------------------


class SlowForwarder:
    """A stand-in recursor with the server's Forwarder protocol: answers NXDOMAIN after a delay,
    or fails (raises) when told to."""

    enabled = True
    saturated = False

    def __init__(self, delay: float, reply: bool = True) -> None:
        self.delay = delay
        self.reply = reply
        self.seen: list[bytes] = []

    def allowed(self, client_ip: str) -> bool:
        return True

    def lookup(self, query: Query) -> bytes | None:
        return None

    def reject(self, query: Query) -> bytes:
        raise AssertionError("not saturated")

    async def resolve(self, query: Query, data: bytes) -> bytes:
        self.seen.append(data)
        await asyncio.sleep(self.delay)
        if not self.reply:
            raise ConnectionError("every recursor failed")
        flags = reply_flags(query, Rcode.NXDOMAIN, aa=False, ra=True)
        return header(query.id, flags, 1, 0, 0, 0) + query.question


async def test_forwarded_names_answer_out_of_order_on_tcp(server):
    server.forwarder = SlowForwarder(0.2)
    reader, writer = await tcp_open(server.port)
    writer.write(frame(request("example.org.", id=1)) + frame(request("web.service.consul.", id=2)))
    first = await tcp_read_frame(reader)
    second = await tcp_read_frame(reader)
    writer.close()
    assert first is not None and second is not None
    assert struct.unpack("!H", first[:2])[0] == 2  # the inline answer overtakes the forwarded one
    assert struct.unpack("!H", second[:2])[0] == 1 and rcode_of(second) == Rcode.NXDOMAIN
    assert server.forwarder.seen[0] == request("example.org.", id=1)  # sent on unchanged


async def test_forwarder_failure_is_servfail_with_ra(udp_server):
    server = udp_server
    server.forwarder = SlowForwarder(0.01, reply=False)
    reply = await ask(server, "example.org.")
    assert reply.rcode() == dns.rcode.SERVFAIL and reply.flags & dns.flags.RA


# --- catalog answers through the real AnswerTable ----------------------------------------------
#
# The table's own rules are tested in its unit tests; these check that they reach a client
# intact over both transports (sections, flags, sizes, EDNS) and that the transport's ladder
# and the table agree on who answers what.

@pytest.fixture
async def catalog():
    config = test_config()
    async with running_server(answer_table(config), config) as srv:
        yield srv


def rrs(section, rdtype) -> list:  # type: ignore[no-untyped-def]
    return [rr for rrset in section if rrset.rdtype == dns.rdatatype.from_text(rdtype) for rr in rrset]


TRANSPORTS = pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])


@TRANSPORTS
async def test_catalog_service_a(catalog, tcp):
    reply = await ask(catalog, "web.service.consul.", tcp=tcp)
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.flags & dns.flags.AA and not reply.flags & dns.flags.RA
    assert sorted(rr.address for rr in rrs(reply.answer, "A")) == ["10.0.0.1", "10.0.0.2"]


@TRANSPORTS
async def test_catalog_service_srv_with_glue(catalog, tcp):
    reply = await ask(catalog, "web.service.consul.", "SRV", tcp=tcp)
    assert reply.rcode() == dns.rcode.NOERROR
    srv = rrs(reply.answer, "SRV")
    assert sorted(rr.port for rr in srv) == [8080, 8081]
    targets = {rr.target.to_text() for rr in srv}
    glue = {rrset.name.to_text(): [rr.address for rr in rrset] for rrset in reply.additional if rrset.rdtype == 1}
    assert targets == set(glue)  # every target has its address in Additional


@TRANSPORTS
async def test_catalog_question_echoed_as_sent(catalog, tcp):
    reply = await ask(catalog, "WeB.Service.CONSUL.", tcp=tcp)
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.question[0].name.to_text() == "WeB.Service.CONSUL."


@TRANSPORTS
async def test_catalog_nxdomain_and_nodata_carry_the_soa(catalog, tcp):
    nx = await ask(catalog, "nosuch.service.consul.", tcp=tcp)
    assert nx.rcode() == dns.rcode.NXDOMAIN and nx.flags & dns.flags.AA and not nx.answer
    assert [rrset.rdtype for rrset in nx.authority] == [dns.rdatatype.SOA]
    nodata = await ask(catalog, "web.service.consul.", "AAAA", tcp=tcp)
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    assert [rrset.rdtype for rrset in nodata.authority] == [dns.rdatatype.SOA]


@TRANSPORTS
async def test_catalog_out_of_zone_refused_without_ra(catalog, tcp):
    reply = await ask(catalog, "example.com.", tcp=tcp)
    assert reply.rcode() == dns.rcode.REFUSED
    assert not reply.flags & (dns.flags.RA | dns.flags.AA)


@TRANSPORTS
async def test_catalog_servfail_before_sync(tcp):
    config = test_config()
    async with running_server(answer_table(config, synced=False), config) as srv:
        assert (await ask(srv, "web.service.consul.", tcp=tcp)).rcode() == dns.rcode.SERVFAIL
        assert (await ask(srv, "example.com.", tcp=tcp)).rcode() == dns.rcode.REFUSED
        srv.table.apply(catalog_delta())
        assert (await ask(srv, "web.service.consul.", tcp=tcp)).rcode() == dns.rcode.NOERROR


@TRANSPORTS
async def test_catalog_edns_echo_and_ecs_scope_zero(catalog, tcp):
    ecs = dns.edns.ECSOption("10.1.2.0", 24)
    reply = await ask(catalog, "web.service.consul.", tcp=tcp, use_edns=0, payload=12345, options=[ecs])
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.edns == 0 and reply.payload == 12345
    (echo,) = reply.options
    assert (echo.address, echo.srclen, echo.scopelen) == ("10.1.2.0", 24, 0)
    plain = await ask(catalog, "web.service.consul.", tcp=tcp)
    assert plain.edns == -1  # no OPT in, no OPT out


async def test_catalog_big_answer_trimmed_over_udp_full_over_tcp(catalog):
    plain_udp = await ask(catalog, "big.service.consul.")
    assert plain_udp.rcode() == dns.rcode.NOERROR
    assert len(rrs(plain_udp.answer, "A")) == 3  # udp_answer_limit in 512-byte mode
    assert not plain_udp.flags & dns.flags.TC  # enable_truncate is off by default (Consul)
    edns_udp = await ask(catalog, "big.service.consul.", use_edns=0, payload=1232)
    n_edns = len(rrs(edns_udp.answer, "A"))
    assert 3 < n_edns < BIG_N and len(edns_udp.to_wire()) <= 1232
    tcp = await ask(catalog, "big.service.consul.", tcp=True)
    assert len(rrs(tcp.answer, "A")) == BIG_N and not tcp.flags & dns.flags.TC


async def test_catalog_truncation_sets_tc_when_enabled():
    config = test_config(enable_truncate=True)
    async with running_server(answer_table(config), config) as srv:
        udp = await ask(srv, "big.service.consul.", use_edns=0, payload=1232)
        assert udp.flags & dns.flags.TC and len(udp.to_wire()) <= 1232
        assert udp.edns == 0  # a TC reply still carries the OPT (RFC 6891 §7)
        assert udp.question[0].name.to_text() == "big.service.consul."  # and the question
        tcp = await ask(srv, "big.service.consul.", "SRV", tcp=True)
        assert not tcp.flags & dns.flags.TC and len(rrs(tcp.answer, "SRV")) == BIG_N


async def test_catalog_tcp_pipelining(catalog):
    reader, writer = await tcp_open(catalog.port)
    asks = {201: ("web.service.consul.", 1), 202: ("nosuch.service.consul.", 1), 203: ("api.service.consul.", 33)}
    writer.write(b"".join(frame(request(name, qtype, id=i)) for i, (name, qtype) in asks.items()))
    got = {}
    for _ in asks:
        reply = await tcp_read_frame(reader)
        assert reply is not None
        msg = dns.message.from_wire(reply)
        got[msg.id] = msg
    writer.close()
    assert got[201].rcode() == dns.rcode.NOERROR and len(rrs(got[201].answer, "A")) == 2
    assert got[202].rcode() == dns.rcode.NXDOMAIN
    assert [rr.port for rr in rrs(got[203].answer, "SRV")] == [9000]


@TRANSPORTS
@pytest.mark.parametrize("name, data, rcode", LADDER, ids=[row[0] for row in LADDER])
async def test_catalog_error_ladder(catalog, tcp, name, data, rcode):
    # The same raw requests against the real table: the transport answers them, never the table.
    reply = await exchange(catalog, data, tcp=tcp, timeout=0.3 if rcode is None else 2.0)
    if rcode is None:
        assert reply is None
    else:
        assert reply is not None and reply[:2] == data[:2] and rcode_of(reply) == rcode
