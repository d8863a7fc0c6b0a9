"""Test helpers for the DNS transport: raw request builders, raw UDP/TCP exchanges over
loopback, a small catalog fed to the real AnswerTable, and a ``running_server`` context
manager around :class:`DnsServer`.

Raw bytes are built here with :mod:`struct` (not with a DNS library) so that tests can send
what no well-behaved library would: bad counts, broken labels, two OPT records.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import socket
import struct
from collections.abc import AsyncIterator, Iterable

from dnsdisco.catalog.model import CatalogDelta, Node, Service, ServiceEntry
from dnsdisco.config import Config, DnsConfig
from dnsdisco.dns.server import AnswerSource, DnsServer
from dnsdisco.dns.table import AnswerTable

OPT = 41


def qname_wire(name: str) -> bytes:
    """Uncompressed wire form of a dotted *name* ("." for the root)."""
    out = b""
    for label in name.rstrip(".").split(".") if name not in (".", "") else []:
        raw = label.encode()
        out += bytes([len(raw)]) + raw
    return out + b"\x00"


def question(name: str, qtype: int = 1, qclass: int = 1) -> bytes:
    return qname_wire(name) + struct.pack("!HH", qtype, qclass)


def opt_rr(
    payload: int = 1232,
    *,
    version: int = 0,
    do: bool = False,
    options: Iterable[tuple[int, bytes]] = (),
    ext_rcode: int = 0,
) -> bytes:
    """An OPT pseudo-RR (RFC 6891 §6.1.2) with *options* as (code, data) pairs."""
    rdata = b"".join(struct.pack("!HH", code, len(data)) + data for code, data in options)
    ttl = (ext_rcode << 24) | (version << 16) | (0x8000 if do else 0)
    return b"\x00" + struct.pack("!HHIH", OPT, payload, ttl, len(rdata)) + rdata


def ecs_option(family: int, source: int, address: bytes, scope: int = 0) -> tuple[int, bytes]:
    return 8, struct.pack("!HBB", family, source, scope) + address


def request(
    name: str = "web.service.consul.",
    qtype: int = 1,
    *,
    id: int = 0x1234,
    flags: int = 0x0100,
    qclass: int = 1,
    counts: tuple[int, int, int, int] | None = None,
    body: bytes | None = None,
    additional: Iterable[bytes] = (),
) -> bytes:
    """A request: header + one question (or *body*) + *additional* RRs; *counts* overrides."""
    extra = list(additional)
    if body is None:
        body = question(name, qtype, qclass)
    qd, an, ns, ar = counts if counts is not None else (1, 0, 0, len(extra))
    return struct.pack("!HHHHHH", id, flags, qd, an, ns, ar) + body + b"".join(extra)


def rcode_of(reply: bytes) -> int:
    """The full rcode of *reply*: header low bits plus the OPT extended bits, if any."""
    import dns.message

    return dns.message.from_wire(reply).rcode()


# --- a small catalog for end-to-end answers ----------------------------------------------------

BIG_N = 120  # instances of "big": far more than 512 or 1232 bytes of answers


def catalog_delta() -> CatalogDelta:
    """dc1: web (2 instances on node addresses), api (1, own address), big (BIG_N nodes)."""
    nodes = {f"node{i}": Node(f"node{i}", f"10.0.0.{i + 1}", "dc1") for i in range(3)}
    big_nodes = {f"big{i}": Node(f"big{i}", f"10.9.{i >> 8}.{i & 255}", "dc1") for i in range(BIG_N)}
    services = {
        "web": tuple(
            ServiceEntry(nodes[f"node{i}"], Service(f"node{i}", f"web-{i}", "web", port=8080 + i)) for i in range(2)
        ),
        "api": (ServiceEntry(nodes["node2"], Service("node2", "api-1", "api", address="10.1.0.5", port=9000)),),
        "big": tuple(
            ServiceEntry(node, Service(name, f"big-{name}", "big", port=7000)) for name, node in big_nodes.items()
        ),
    }
    return CatalogDelta("dc1", 10, services, {**nodes, **big_nodes}, full=True)


def answer_table(config: Config, *, synced: bool = True) -> AnswerTable:
    """The real AnswerTable (seeded RNG, fixed clock), fed catalog_delta() unless not *synced*."""
    table = AnswerTable(config, rng=random.Random(7), clock=lambda: 1_700_000_000.0)
    if synced:
        table.apply(catalog_delta())
    return table



def test_config(**dns: object) -> Config:
    """A config listening on 127.0.0.1, an ephemeral port; *dns* overrides dns_config fields."""
    return Config(client_addr="127.0.0.1", dns_port=0, dns_config=dataclasses.replace(DnsConfig(), **dns))


test_config.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


@contextlib.asynccontextmanager
async def running_server(table: AnswerSource, config: Config | None = None) -> AsyncIterator[DnsServer]:
    server = DnsServer(config or test_config(), table)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def udp_exchange(port: int, data: bytes, *, timeout: float = 2.0, host: str = "127.0.0.1") -> bytes | None:
    """Send *data* in one datagram; return the reply datagram, or None after *timeout*."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        sock.connect((host, port))
        await loop.sock_sendall(sock, data)
        try:
            return await asyncio.wait_for(loop.sock_recv(sock, 65535), timeout)
        except asyncio.TimeoutError:
            return None
    finally:
        sock.close()


async def tcp_open(port: int, host: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(host, port)


async def tcp_read_frame(reader: asyncio.StreamReader, *, timeout: float = 2.0) -> bytes | None:
    """Read one length-prefixed reply; None on EOF or timeout."""
    try:
        head = await asyncio.wait_for(reader.readexactly(2), timeout)
        (length,) = struct.unpack("!H", head)
        return await asyncio.wait_for(reader.readexactly(length), timeout)
    except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
        return None


def frame(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


async def tcp_exchange(port: int, data: bytes, *, timeout: float = 2.0) -> bytes | None:
    reader, writer = await tcp_open(port)
    try:
        writer.write(frame(data))
        await writer.drain()
        return await tcp_read_frame(reader, timeout=timeout)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
