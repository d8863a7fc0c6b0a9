"""The per-packet front of the DNS transport: bytes in, a :class:`~dnsdisco.dns.message.Query`
(or the bytes of an error reply, or nothing) out.

This module owns the request-side error ladder (drop / NOTIMP / FORMERR / BADVERS / REFUSED, as
listed in ``design/architecture.md``) and the few replies the transport builds itself without
asking the answer table (:func:`error_reply`). It is hand-written over :mod:`struct` because it
runs for every packet: a DNS library's parser costs ~150 µs a query, ten times the whole budget.
It knows nothing about Consul or zones, and nothing about sockets. No exception ever leaves
:func:`parse`: hostile bytes become a FORMERR or silence, never a crash.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import fields

from dnsdisco.dns.message import (
    CLASS_IN,
    EDNS_OPTION_ECS,
    FLAG_CD,
    FLAG_QR,
    FLAG_RD,
    MAX_TCP_SIZE,
    MAX_UDP_SIZE,
    OPCODE_MASK,
    Edns,
    Qtype,
    Query,
    Rcode,
    encode_opt,
    header,
    reply_flags,
)

__all__ = ["CLASS_ANY", "error_reply", "new_query", "parse"]

log = logging.getLogger(__name__)

CLASS_ANY = 255  # QCLASS "*" (RFC 1035 §3.2.5): matches IN, so it is answered like IN

_HEADER = struct.Struct("!HHHHHH")
_U16 = struct.Struct("!H")
_U16X2 = struct.Struct("!HH")
_RR_FIXED = struct.Struct("!HHIH")  # TYPE, CLASS, TTL, RDLENGTH after an owner name

_MAX_NAME = 255  # RFC 1035 §2.3.4: a name is at most 255 octets on the wire
_MAX_QDCOUNT_WALKED = 4  # beyond this the packet is not worth reading: FORMERR, header only
_TYPE_OPT = int(Qtype.OPT)
_FLAG_DO = 0x8000  # in the OPT TTL: extended RCODE (8), VERSION (8), DO (1), Z (15); RFC 6891 §6.1.3

# Bytes that may appear in a label's presentation form unescaped: printable ASCII except the
# dot (a label separator) and the backslash (the escape character) (RFC 1035 §5.1).
_PLAIN = bytes(b for b in range(0x21, 0x7F) if b not in (0x2E, 0x5C))
_PLAIN_OR_DOT = _PLAIN + b"."


class _Malformed(Exception):
    """Raised inside the walk when the body cannot be read; turned into FORMERR at the edge."""


# --- building a Query without the frozen-dataclass tax -----------------------------------
#
# A frozen dataclass's __init__ goes through object.__setattr__ for every field: about 2 µs
# for Query's ten fields, a sixth of the whole per-packet budget on the UDP fast path. The slot
# descriptors set the same slots at a third of the cost; the object is indistinguishable from
# one made by Query(...) (tests/unit/test_wire.py checks equality and that no field is missed).
_QUERY_FIELDS = tuple(f.name for f in fields(Query))
_SETTERS = tuple(getattr(Query, name).__set__ for name in _QUERY_FIELDS)
if _QUERY_FIELDS != ("id", "flags", "question", "qname", "qtype", "qclass", "edns", "tcp", "max_size", "client"):
    # message.Query grew or reordered fields: fall back to the (slower) real constructor.
    _SETTERS = ()


def new_query(
    id: int,
    flags: int,
    question: bytes,
    qname: str,
    qtype: int,
    qclass: int,
    edns: Edns | None,
    tcp: bool,
    max_size: int,
    client: tuple[str, int],
) -> Query:
    """Return ``Query(id, flags, ...)`` built at a third of the cost of the dataclass __init__."""
    if not _SETTERS:
        return Query(id, flags, question, qname, qtype, qclass, edns, tcp, max_size, client)
    q = _new(Query)
    s_id, s_flags, s_question, s_qname, s_qtype, s_qclass, s_edns, s_tcp, s_max, s_client = _SETTERS
    s_id(q, id)
    s_flags(q, flags)
    s_question(q, question)
    s_qname(q, qname)
    s_qtype(q, qtype)
    s_qclass(q, qclass)
    s_edns(q, edns)
    s_tcp(q, tcp)
    s_max(q, max_size)
    s_client(q, client)
    return q


_new = object.__new__


# --- replies the transport builds itself ------------------------------------------------


def _raw_reply(id: int, req_flags: int, rcode: int, question: bytes | None, edns: Edns | None) -> bytes:
    """An empty reply: header, the question if we have one, the OPT if the request had one."""
    # RFC 1035 §4.1.1: QR set, opcode and RD copied; CD copied as RFC 6840 §5.9 asks.
    flags = FLAG_QR | (req_flags & (OPCODE_MASK | FLAG_RD | FLAG_CD)) | (rcode & 0xF)
    parts = [header(id, flags, 1 if question else 0, 0, 0, 1 if edns is not None else 0)]
    if question:
        parts.append(question)
    if edns is not None:
        # RFC 6891 §7: a request with an OPT gets a reply with an OPT, errors included.
        parts.append(encode_opt(edns, rcode))
    return b"".join(parts)


def error_reply(query: Query, rcode: int, *, ra: bool, aa: bool = False) -> bytes:
    """Return the bytes of an answerless reply to *query* with *rcode* (REFUSED, SERVFAIL, ...).

    The question is echoed as sent; an OPT (version 0, ECS echoed with scope 0) is added when the
    request carried one. RA says whether recursion is available (Consul: a recursor is set).
    """
    flags = reply_flags(query, rcode, aa=aa, ra=ra)
    edns = query.edns
    if edns is None:
        return header(query.id, flags, 1, 0, 0, 0) + query.question
    return header(query.id, flags, 1, 0, 0, 1) + query.question + encode_opt(edns, rcode)


# --- parsing ------------------------------------------------------------------------------


def parse(data: bytes, *, tcp: bool, client: tuple[str, int]) -> Query | bytes | None:
    """Read one request; return a :class:`Query`, the bytes of an error reply, or ``None``.

    ``None`` means drop: shorter than a header, or a response (QR=1) sent to us (replying to
    either would make us a reflector). Bytes are a complete reply to send as is: NOTIMP for
    an opcode other than QUERY; FORMERR for QDCOUNT != 1, too many records, or a malformed
    question, section or OPT; BADVERS for EDNS version > 0; REFUSED for a class other than IN
    (or ANY). A :class:`Query` is for the answer table. Never raises.
    """
    # Requests repeat: resolvers ask for the same few names over and over, and everything in
    # a request but the ID (and the transport) decides the result. So valid requests are
    # remembered by their bytes after the ID, and a repeat costs a dict lookup instead of a
    # walk over the labels (4 µs -> 1 µs here, a third of the whole per-packet budget).
    if data.__class__ is not bytes:
        data = bytes(data)  # bytearray/memoryview from a caller: hashable, immutable from here on
    template = _seen.get(data[2:])
    if template is not None:
        flags, question, qname, qtype, qclass, edns, max_size = template
        q = _new(Query)
        s_id, s_flags, s_question, s_qname, s_qtype, s_qclass, s_edns, s_tcp, s_max, s_client = _SETTERS
        s_id(q, data[0] << 8 | data[1])
        s_flags(q, flags)
        s_question(q, question)
        s_qname(q, qname)
        s_qtype(q, qtype)
        s_qclass(q, qclass)
        s_edns(q, edns)
        s_tcp(q, tcp)
        s_max(q, MAX_TCP_SIZE if tcp else max_size)
        s_client(q, client)
        return q
    try:
        result = _parse(data, tcp, client)
    except Exception as exc:  # pragma: no cover - a hole in the checks below; keep serving
        kind = type(exc).__qualname__
        if kind not in _logged_errors:  # once per kind: a flood of one bad packet is one line
            _logged_errors.add(kind)
            log.exception("dns: unexpected error parsing a %d-byte request; answering FORMERR", len(data))
        if len(data) < 12 or data[2] & 0x80:
            return None
        return _raw_reply(_U16.unpack_from(data, 0)[0], _U16.unpack_from(data, 2)[0], Rcode.FORMERR, None, None)
    if result.__class__ is Query and _SETTERS and len(data) <= _SEEN_MAX_BYTES:
        if len(_seen) >= _SEEN_MAX_ENTRIES:
            # Crude but O(1) and bounded: a flood of distinct names only costs re-walks.
            _seen.clear()
        q = result  # type: ignore[assignment]
        _seen[data[2:]] = (
            q.flags,
            q.question,
            q.qname,
            q.qtype,
            q.qclass,
            q.edns,
            _udp_max_size(q.edns),
        )
    return result


# Remembered valid requests: bytes after the ID -> the Query fields that depend only on them.
_seen: dict[bytes, tuple[int, bytes, str, int, int, Edns | None, int]] = {}
_SEEN_MAX_ENTRIES = 8192
_SEEN_MAX_BYTES = 512  # big (TCP) requests are rare; do not keep their bytes around
_logged_errors: set[str] = set()


def _udp_max_size(edns: Edns | None) -> int:
    if edns is None:
        return 512  # RFC 1035 §4.2.1
    # RFC 6891 §6.2.5: values below 512 are treated as 512. Consul caps at 65535-68 so the
    # datagram, IP and UDP headers included, fits in one IP packet.
    payload = edns.payload
    return 512 if payload < 512 else MAX_UDP_SIZE if payload > MAX_UDP_SIZE else payload


def _parse(data: bytes, tcp: bool, client: tuple[str, int]) -> Query | bytes | None:
    n = len(data)
    if n < 12:
        return None
    id, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data, 0)
    if flags & FLAG_QR:
        return None

    # Counts no query needs (the same bounds miekg/dns applies for Consul: one question, at
    # most one RR in Answer and Authority - NOTIFY and IXFR carry a SOA there - and at most two
    # in Additional: an OPT and a TSIG): refuse without reading the body.
    if ancount > 1 or nscount > 1 or arcount > 2 or qdcount > _MAX_QDCOUNT_WALKED:
        rcode = Rcode.NOTIMP if flags & OPCODE_MASK else Rcode.FORMERR
        return _raw_reply(id, flags, rcode, None, None)

    # --- the question (the fast path: no compression, a handful of labels) ---
    question: bytes | None = None
    qname = ""
    qtype = qclass = 0
    off = 12
    malformed = False
    if qdcount:
        labels = []
        while True:
            if off >= n:
                malformed = True
                break
            length = data[off]
            if length == 0:
                off += 1
                break
            # 0xC0 is a compression pointer and 0x40/0x80 are the retired extended label types
            # (RFC 6891 §5); the question is the first name, so a pointer has nothing valid to
            # point at. Either way: FORMERR.
            if length > 63:
                malformed = True
                break
            end = off + 1 + length
            if end > n:
                malformed = True
                break
            labels.append(data[off + 1 : end])
            off = end
        if not malformed and (off - 12 > _MAX_NAME or off + 4 > n):
            malformed = True
        if not malformed:
            qtype, qclass = _U16X2.unpack_from(data, off)
            off += 4
            question = data[12:off]
            qname = _presentation(labels)
            for _ in range(qdcount - 1):  # only to find the OPT behind them; FORMERR follows
                try:
                    off = _skip_name(data, off, n) + 4
                except _Malformed:
                    malformed = True
                    break
                if off > n:
                    malformed = True
                    break

    # --- Answer, Authority (skipped) and Additional (the OPT) ---
    edns: Edns | None = None
    opt_error = False  # a second OPT or a broken one: FORMERR *with* an OPT (RFC 6891 §7)
    if not malformed and (ancount or nscount or arcount):
        try:
            for _ in range(ancount + nscount):
                off, rtype, _rclass, _ttl, rdlen = _read_rr(data, off, n)
                if rtype == _TYPE_OPT:
                    raise _Malformed  # RFC 6891 §6.1.1: OPT only ever in Additional
                off += rdlen
            for _ in range(arcount):
                start = off
                off, rtype, rclass, ttl, rdlen = _read_rr(data, off, n)
                if rtype == _TYPE_OPT:
                    if edns is not None or data[start] != 0:
                        # RFC 6891 §6.1.1: more than one OPT MUST get FORMERR; its owner MUST
                        # be the root.
                        opt_error = True
                        edns = Edns(payload=rclass)
                    else:
                        try:
                            edns = _read_opt(data, off, rdlen, rclass, ttl)
                        except _Malformed:
                            opt_error = True
                            edns = Edns(payload=rclass)
                off += rdlen
        except _Malformed:
            malformed = True

    # --- the ladder, in order ---
    if flags & OPCODE_MASK:
        # Only QUERY is implemented (NOTIFY/UPDATE/IQUERY are for zone servers we are not).
        return _raw_reply(id, flags, Rcode.NOTIMP, question if qdcount == 1 else None, edns)
    if qdcount != 1:
        return _raw_reply(id, flags, Rcode.FORMERR, None, edns)
    if malformed or opt_error:
        return _raw_reply(id, flags, Rcode.FORMERR, question, edns)
    if edns is not None and edns.version:
        # RFC 6891 §6.1.3: a version we do not implement gets BADVERS, answered at version 0
        # (encode_opt always writes 0) and with no answer.
        return _raw_reply(id, flags, Rcode.BADVERS, question, Edns(payload=edns.payload))
    if qclass != CLASS_IN and qclass != CLASS_ANY:
        # Every record we hold is class IN; CHAOS (version.bind and friends) and the rest are
        # refused, as an authoritative server does for classes it does not serve.
        return _raw_reply(id, flags, Rcode.REFUSED, question, edns)

    max_size = MAX_TCP_SIZE if tcp else _udp_max_size(edns)
    return new_query(id, flags, question, qname, qtype, qclass, edns, tcp, max_size, client)  # type: ignore[arg-type]


def _presentation(labels: list[bytes]) -> str:
    """Lower-cased presentation form of *labels* with the trailing dot ("." for the root)."""
    if not labels:
        return "."
    raw = b".".join(labels)
    # Common case: every byte printable and no dot inside a label (the only dots are ours).
    if not raw.translate(None, _PLAIN_OR_DOT) and raw.count(b".") == len(labels) - 1:
        return raw.lower().decode("ascii") + "."
    out = []
    for label in labels:
        chars = []
        for b in label.lower():
            if b == 0x2E or b == 0x5C:
                chars.append("\\" + chr(b))
            elif 0x21 <= b < 0x7F:
                chars.append(chr(b))
            else:
                chars.append(f"\\{b:03d}")  # RFC 1035 §5.1 \DDD
        out.append("".join(chars))
    return ".".join(out) + "."


def _skip_name(data: bytes, off: int, n: int) -> int:
    """Offset just past the (possibly compressed) name at *off*; raises _Malformed."""
    start = off
    while True:
        if off >= n:
            raise _Malformed
        length = data[off]
        if length == 0:
            off += 1
            break
        if length & 0xC0 == 0xC0:
            # A pointer ends the name. It must point backwards (RFC 1035 §4.1.4: "a prior
            # occurrence"); we never follow it, so a loop cannot trap us.
            if off + 2 > n or ((length & 0x3F) << 8 | data[off + 1]) >= start:
                raise _Malformed
            off += 2
            break
        if length > 63:
            raise _Malformed
        off += 1 + length
    if off - start > _MAX_NAME + 1:
        raise _Malformed
    return off


def _read_rr(data: bytes, off: int, n: int) -> tuple[int, int, int, int, int]:
    """Read one RR's owner and fixed part; return (rdata offset, type, class, ttl, rdlength)."""
    off = _skip_name(data, off, n)
    if off + 10 > n:
        raise _Malformed
    rtype, rclass, ttl, rdlen = _RR_FIXED.unpack_from(data, off)
    off += 10
    if off + rdlen > n:
        raise _Malformed
    return off, rtype, rclass, ttl, rdlen


def _read_opt(data: bytes, off: int, rdlen: int, payload: int, ttl: int) -> Edns:
    """Decode an OPT RR's TTL and options (RFC 6891 §6.1.2-6.1.3); raises _Malformed."""
    version = (ttl >> 16) & 0xFF
    do = bool(ttl & _FLAG_DO)
    if version:
        # Options are defined per version; we do not read those of a version we do not know.
        return Edns(version=version, payload=payload, do=do)
    ecs: bytes | None = None
    end = off + rdlen
    while off < end:
        if off + 4 > end:
            raise _Malformed
        code, olen = _U16X2.unpack_from(data, off)
        off += 4
        if off + olen > end:
            raise _Malformed
        if code == EDNS_OPTION_ECS:
            if ecs is not None:
                raise _Malformed  # RFC 7871 §7.1.1: at most one ECS option per query
            ecs = data[off : off + olen]
            _check_ecs(ecs)
        off += olen
    # Unknown options (cookies, padding, ...) are read past and never echoed (RFC 6891 §6.1.2).
    return Edns(version=0, payload=payload, do=do, ecs=ecs)


def _check_ecs(ecs: bytes) -> None:
    """Validate EDNS Client Subnet option data (RFC 7871 §6); raises _Malformed."""
    if len(ecs) < 4:
        raise _Malformed
    family, source, _scope = struct.unpack_from("!HBB", ecs, 0)
    address = ecs[4:]
    if family == 0:
        # dig's "+subnet=0" sends FAMILY 0 with prefix 0 and no address: "no client data"
        # (RFC 7871 §7.1.2 asks for 0.0.0.0/0; miekg/dns accepts both, so Consul does).
        if source or address:
            raise _Malformed
        return
    if family == 1:
        max_bits = 32
    elif family == 2:
        max_bits = 128
    else:
        raise _Malformed
    # "ADDRESS ... MUST be truncated to the number of bits indicated by the SOURCE
    # PREFIX-LENGTH field, with bits set to 0 to pad up to the end of the last octet", and a
    # request with a wrongly formatted option MUST get FORMERR (RFC 7871 §6, §7.1.2).
    if source > max_bits or len(address) != (source + 7) // 8:
        raise _Malformed
    if source % 8 and address[-1] & (0xFF >> (source % 8)):
        raise _Malformed

