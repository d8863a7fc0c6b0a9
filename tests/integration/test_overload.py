"""Overload, short versions (issue 7 item 3; the long runs are bench/overload.py).

Real sockets on loopback against an in-process DnsServer: a UDP backlog past capacity is shed
newest-first and counted; a dnsperf flood leaves memory bounded and the server answering at
once; 1,000 idle TCP connections do not slow UDP; idle, slow-loris and non-reading TCP clients
are cut at the idle timeout; forwarding to a black-hole recursor keeps a bounded number of
queries in flight. Bounds are loose: a busy 2-core CI machine must pass them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import resource
import shutil
import socket
import struct
import time
from collections.abc import AsyncIterator

import pytest

from dnsdisco.config import Config, DnsConfig
from dnsdisco.dns import server as servermod
from dnsdisco.dns.server import DnsServer
from dnsdisco.forward import Forwarder
from dnsdisco.metrics import Metrics
from tests.dnstest import answer_table, frame, request, running_server, tcp_open, test_config, udp_exchange

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def qid(reply: bytes) -> int:
    return struct.unpack("!H", reply[:2])[0]


@contextlib.asynccontextmanager
async def catalog_server(**dns: object) -> AsyncIterator[DnsServer]:
    config = test_config(**dns)
    async with running_server(answer_table(config), config) as srv:
        yield srv


async def answers_at_once(srv: DnsServer) -> None:
    assert srv.port is not None
    reply = await udp_exchange(srv.port, request(id=4242), timeout=2.0)
    assert reply is not None and qid(reply) == 4242 and reply[3] & 0xF == 0


# --- UDP past capacity ------------------------------------------------------------------------


async def test_backlog_is_answered_newest_first_and_the_excess_shed_and_counted():
    # While the loop is blocked, one client queues N queries in the server's socket (the
    # kernel's FIFO); then the server runs: one batch from the socket, then the rest is drained
    # onto the stack (SHED_DEPTH, the oldest evicted) and answered newest first.
    n = 3000
    async with catalog_server() as srv:
        assert srv.port is not None
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        client.connect((HOST, srv.port))
        for i in range(n):  # no await: the server cannot read meanwhile
            client.send(request(id=i))
        got: list[int] = []

        def receive() -> None:  # in a thread, so that replies are read as fast as they come
            client.settimeout(1.0)
            with contextlib.suppress(TimeoutError):
                while True:
                    got.append(qid(client.recv(4096)))

        await asyncio.to_thread(receive)
        client.close()
        stats = srv.stats
        kernel = stats.dropped()["receive_buffer_full"]
        # Every datagram is accounted for: answered, shed by us, or dropped by the kernel.
        assert stats.udp_requests + kernel == n
        assert stats.udp_requests == len(got) + stats.udp_shed
        assert stats.udp_shed > 0 and stats.dropped()["shed"] == stats.udp_shed
        first, rest = got[: servermod.UDP_BATCH], got[servermod.UDP_BATCH :]
        assert first == list(range(servermod.UDP_BATCH))  # the batch that found the backlog
        assert rest == sorted(rest, reverse=True)  # then newest first
        assert len(rest) == servermod.SHED_DEPTH
        if kernel == 0:  # the receive buffer held them all (it does when rmem_max >= 4 MiB)
            assert rest[0] == n - 1 and rest[-1] == n - servermod.SHED_DEPTH
        assert srv._udp.shedding is False  # type: ignore[union-attr]  # back to the socket
        await answers_at_once(srv)


async def test_receive_buffer_drops_are_read_from_proc():
    # A socket whose buffer is tiny and never read: the kernel drops, /proc/net/udp counts.
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.bind((HOST, 0))
    drops = servermod._ReceiveDrops(sock)
    if drops() == 0 and not open("/proc/net/udp").read():  # pragma: no cover - no /proc
        pytest.skip("no /proc/net/udp")
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(500):
        sender.sendto(request(id=i), sock.getsockname())
    sender.close()
    assert drops() > 0
    sock.close()
    assert drops() > 0  # the last value seen stays: it is exported as a counter


async def test_metrics_export_the_new_drop_reasons():
    metrics = Metrics()
    async with catalog_server() as srv:
        metrics.watch_dns(srv)
        srv.stats.udp_shed = 7
        text = metrics.exposition().decode()
    assert 'dnsdisco_dns_dropped_total{reason="shed"} 7.0' in text
    assert 'dnsdisco_dns_dropped_total{reason="receive_buffer_full"}' in text


@pytest.mark.skipif(shutil.which("dnsperf") is None, reason="dnsperf is not installed")
async def test_dnsperf_flood_memory_bounded_and_answers_right_after():
    async with catalog_server() as srv:
        assert srv.port is not None
        await answers_at_once(srv)
        rss0 = rss_kib()
        path = "/tmp/dnsdisco-test-overload-queries.txt"
        with open(path, "w") as f:
            f.write("web.service.consul A\napi.service.consul A\nweb.service.consul SRV\n" * 50)
        proc = await asyncio.create_subprocess_exec(
            "dnsperf", "-s", HOST, "-p", str(srv.port), "-d", path, "-l", "3", "-c", "8", "-q", "10000",
            "-t", "1", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, out.decode()
        t0 = time.monotonic()
        await answers_at_once(srv)
        assert time.monotonic() - t0 < 1.0
        assert rss_kib() - rss0 < 50 * 1024
        assert srv.stats.udp_requests > 10_000
        assert len(srv._udp.stack) <= servermod.SHED_DEPTH  # type: ignore[union-attr]


# --- TCP ----------------------------------------------------------------------------------------


async def udp_latencies(port: int, count: int) -> list[float]:
    out = []
    for i in range(count):
        t0 = time.perf_counter()
        reply = await udp_exchange(port, request(id=i), timeout=2.0)
        assert reply is not None
        out.append(time.perf_counter() - t0)
    return sorted(out)


async def test_a_thousand_idle_tcp_connections_do_not_slow_udp():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2200:
        pytest.skip(f"needs 2,200 file descriptors; the hard limit is {hard}")
    if soft != resource.RLIM_INFINITY and soft < 2200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (2200, hard))
    try:
        async with catalog_server(tcp_idle_timeout=60.0, tcp_max_connections=2000) as srv:
            assert srv.port is not None
            without = await udp_latencies(srv.port, 200)
            conns = []
            try:
                for _ in range(1000):
                    conns.append(await tcp_open(srv.port))
                for _ in range(100):
                    if srv.tcp_open == 1000:
                        break
                    await asyncio.sleep(0.02)
                assert srv.tcp_open == 1000
                with_idle = await udp_latencies(srv.port, 200)
                assert srv.tcp_open == 1000
            finally:
                for _, writer in conns:
                    writer.close()
        p50 = (without[100], with_idle[100])
        p99 = (without[198], with_idle[198])
        assert p50[1] < max(0.005, 3 * p50[0]), (p50, p99)
        assert p99[1] < max(0.05, 5 * p99[0]), (p50, p99)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def closed_after(reader: asyncio.StreamReader, start: float, limit: float) -> float:
    """Seconds from *start* until the server closed the connection (EOF or reset)."""
    try:
        while await asyncio.wait_for(reader.read(65536), limit):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    return asyncio.get_running_loop().time() - start


async def test_idle_and_slow_loris_clients_are_cut_at_the_idle_timeout():
    async with catalog_server(tcp_idle_timeout=0.5) as srv:
        assert srv.port is not None
        loop = asyncio.get_running_loop()
        start = loop.time()
        idle_r, idle_w = await tcp_open(srv.port)
        loris_r, loris_w = await tcp_open(srv.port)
        busy_r, busy_w = await tcp_open(srv.port)
        idle_task = asyncio.create_task(closed_after(idle_r, start, 5))
        loris_task = asyncio.create_task(closed_after(loris_r, start, 5))
        query = frame(request(id=9))
        sent = 0
        answered = 0
        while not loris_task.done() and loop.time() - start < 5:
            # The slow-loris: one byte of a query every 0.1 s, more often than the timeout.
            with contextlib.suppress(ConnectionError):
                loris_w.write(query[sent % len(query) : sent % len(query) + 1])
            sent += 1
            # A normal client: a whole query every 0.1 s, answered, never cut.
            busy_w.write(frame(request(id=answered)))
            reply = await asyncio.wait_for(busy_r.readexactly(2), 2)
            await busy_r.readexactly(struct.unpack("!H", reply)[0])
            answered += 1
            await asyncio.sleep(0.1)
        idle_cut, loris_cut = await idle_task, await loris_task
        assert 0.4 <= idle_cut < 2.5
        assert 0.4 <= loris_cut < 2.5 and sent >= 4  # cut although it kept sending
        assert srv.stats.tcp_idle_closed == 2 and srv.tcp_open == 1
        assert answered >= 4
        for w in (idle_w, loris_w, busy_w):
            w.close()


async def test_a_client_pipelining_without_reading_is_bounded_then_cut():
    async with catalog_server(tcp_idle_timeout=0.5) as srv:
        assert srv.port is not None
        rss0 = rss_kib()
        sock = socket.create_connection((HOST, srv.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.setblocking(False)
        for _ in range(100):
            if srv.tcp_open:
                break
            await asyncio.sleep(0.01)
        stream = frame(request("web.service.consul.", 33, id=1)) * 400_000  # ~17 MB of SRV queries
        loop = asyncio.get_running_loop()
        start = loop.time()
        sent = 0
        peak_buffer = 0
        cut = None
        while loop.time() - start < 5:
            try:
                sent += sock.send(stream[sent : sent + (1 << 20)])
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                cut = loop.time() - start
                break
            for conn in srv._connections:
                peak_buffer = max(peak_buffer, len(conn.buffer) + conn.transport.get_write_buffer_size())  # type: ignore[union-attr]
            if srv.tcp_open == 0 and sent:
                cut = loop.time() - start
                break
            await asyncio.sleep(0.01)
        sock.close()
        assert cut is not None and cut < 3.0
        assert sent < len(stream)  # the server stopped taking them
        assert peak_buffer < 2 * 1024 * 1024  # one paused connection holds a bounded backlog
        assert rss_kib() - rss0 < 50 * 1024
        assert srv.stats.tcp_idle_closed == 1
        await answers_at_once(srv)


# --- forwarding to a black hole -----------------------------------------------------------------


async def test_forwarding_to_a_black_hole_keeps_a_bounded_number_in_flight():
    hole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # takes queries, never answers
    hole.bind((HOST, 0))
    bound = 50
    config = Config(client_addr=HOST, dns_port=0, recursors=(f"{HOST}:{hole.getsockname()[1]}",),
                    dns_config=dataclasses.replace(DnsConfig(), recursor_max_concurrent=bound,
                                                   recursor_timeout=1.0))
    fwd = Forwarder(config)
    srv = DnsServer(config, answer_table(config), forwarder=fwd)
    await srv.start()
    await fwd.start()
    try:
        assert srv.port is not None
        loop = asyncio.get_running_loop()
        rss0 = rss_kib()
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.setblocking(False)
        client.connect((HOST, srv.port))
        n = 2000
        rcodes: dict[int, int] = {}
        peak_fetching = peak_tasks = 0
        for i in range(n):
            client.send(request(f"n{i}.example.org.", id=i))
            if i % 50 == 49:
                await asyncio.sleep(0)  # let the server read
                peak_fetching = max(peak_fetching, fwd._fetching)
                peak_tasks = max(peak_tasks, len(srv._forwards))
                with contextlib.suppress(BlockingIOError):
                    while True:
                        reply = client.recv(4096)
                        rcodes[reply[3] & 0xF] = rcodes.get(reply[3] & 0xF, 0) + 1
        assert peak_fetching <= bound
        assert peak_tasks <= bound + servermod.UDP_BATCH  # tasks made in one batch before any ran
        # The excess is answered REFUSED at once (CoreDNS max_concurrent) and counted.
        await asyncio.sleep(0.3)
        with contextlib.suppress(BlockingIOError):
            while True:
                reply = client.recv(4096)
                rcodes[reply[3] & 0xF] = rcodes.get(reply[3] & 0xF, 0) + 1
        assert rcodes.get(5, 0) >= n - bound - srv.stats.udp_shed - srv.stats.dropped()["receive_buffer_full"] - 100
        assert fwd.stats.rejected + srv.stats.forwards_rejected > 0
        assert rss_kib() - rss0 < 50 * 1024
        # After the recursor timeout the in-flight ones fail (SERVFAIL) and the slots free up.
        deadline = loop.time() + 5
        while (fwd._fetching or srv._forwards) and loop.time() < deadline:
            await asyncio.sleep(0.1)
        assert fwd._fetching == 0 and not srv._forwards
        client.close()
        await answers_at_once(srv)
    finally:
        await fwd.stop()
        await srv.stop()
        hole.close()
