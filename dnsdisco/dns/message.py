"""The DNS vocabulary shared by the transport and the answering side: a parsed query, its EDNS
options, rcodes and record types, and the few wire pieces every reply needs (header, OPT).

Names follow the RFCs (``qname``, ``qtype``, ``rcode``). Nothing here knows about Consul or
sockets. The transport (``dns.server`` / ``dns.wire``) turns bytes into a :class:`Query`; the
answering side (``dns.table``) turns a :class:`Query` into reply bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum


class Rcode(IntEnum):
    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5
    BADVERS = 16  # extended rcode (RFC 6891): low 4 bits 0 in the header, 1 in the OPT TTL


class Qtype(IntEnum):
    A = 1
    NS = 2
    CNAME = 5
    SOA = 6
    PTR = 12
    MX = 15
    TXT = 16
    AAAA = 28
    SRV = 33
    OPT = 41
    IXFR = 251
    AXFR = 252
    ANY = 255


CLASS_IN = 1

# Header flag bits (RFC 1035 §4.1.1).
FLAG_QR = 0x8000
FLAG_AA = 0x0400
FLAG_TC = 0x0200
FLAG_RD = 0x0100
FLAG_RA = 0x0080
FLAG_CD = 0x0010
OPCODE_MASK = 0x7800

# Largest replies: Consul caps UDP at 65535-68 (IP+UDP headers) and TCP at 65535.
MAX_UDP_SIZE = 65467
MAX_TCP_SIZE = 65535

EDNS_OPTION_ECS = 8

_HEADER = struct.Struct("!HHHHHH")


@dataclass(frozen=True, slots=True)
class Edns:
    """The requester's OPT record (RFC 6891)."""

    version: int = 0
    payload: int = 512  # advertised UDP payload size, as sent
    do: bool = False
    ecs: bytes | None = None  # raw ECS option data (RFC 7871), to echo with scope 0


@dataclass(frozen=True, slots=True)
class Query:
    """One parsed question, with what the reply must honour.

    ``question`` is the question section exactly as sent (name spelling preserved), so that a
    reply can echo it byte for byte; ``qname`` is its lower-cased presentation form with the
    trailing dot, used for lookups. ``max_size`` is how many bytes the reply may take: 65535 on
    TCP; on UDP 512 without EDNS, else the advertised payload (at least 512, at most 65467).
    """

    id: int
    flags: int
    question: bytes
    qname: str
    qtype: int
    qclass: int = CLASS_IN
    edns: Edns | None = None
    tcp: bool = False
    max_size: int = 512
    client: tuple[str, int] = ("", 0)


def header(id: int, flags: int, qdcount: int, ancount: int, nscount: int, arcount: int) -> bytes:
    """Pack a 12-byte DNS header."""
    return _HEADER.pack(id, flags, qdcount, ancount, nscount, arcount)


def reply_flags(query: Query, rcode: int, *, aa: bool, ra: bool, tc: bool = False) -> int:
    """Header flags of a reply to *query*: QR set, opcode and RD/CD copied (RFC 1035 §4.1.1)."""
    flags = FLAG_QR | (query.flags & (OPCODE_MASK | FLAG_RD | FLAG_CD)) | (rcode & 0xF)
    if aa:
        flags |= FLAG_AA
    if ra:
        flags |= FLAG_RA
    if tc:
        flags |= FLAG_TC
    return flags


def encode_opt(edns: Edns, rcode: int = 0) -> bytes:
    """The OPT RR of a reply to a query that carried *edns*.

    As Consul does, the UDP size echoes the client's advertised size; version is 0; the DO bit
    is not echoed (we do not sign). An ECS option is echoed with SCOPE 0 (RFC 7871 §7.2.1:
    the answer is valid for every client subnet). Unknown options are not echoed (RFC 6891 §7).
    The extended rcode's upper 8 bits go in the OPT TTL (BADVERS = 16 -> 1).
    """
    rdata = b""
    if edns.ecs is not None and len(edns.ecs) >= 4:
        family_prefix = edns.ecs[:3]  # FAMILY (2) + SOURCE PREFIX-LENGTH (1)
        data = family_prefix + b"\x00" + edns.ecs[4:]
        rdata = struct.pack("!HH", EDNS_OPTION_ECS, len(data)) + data
    ttl = ((rcode >> 4) & 0xFF) << 24
    return b"\x00" + struct.pack("!HHIH", Qtype.OPT, max(edns.payload, 512), ttl, len(rdata)) + rdata
