"""A small, fast encoder for the resource records the answer table serves.

Owns the wire form of names and records (RFC 1035 §3.1, §3.2, §4.1.3 and §4.1.4; SRV RFC 2782;
AAAA RFC 3596) and the RFC 1464 text of node meta, nothing else: no lookups, no policy, no
message layout beyond a record at a time. It exists because building replies with a general
DNS library costs ~150 µs each (anchors §2.4); everything here is ``struct.pack`` over bytes
and dict look-ups, and the pieces that do not depend on where a record lands in a message
(type, class, TTL, fixed RDATA) are packed once when a record is built, not when it is written.

Compression (RFC 1035 §4.1.4) is case-insensitive on lookup and keyed by the lower-cased text
of every suffix of a name; a pointer can only address the first 16 KiB of a message (14 bits),
so names written beyond that are not registered as targets.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dnsdisco.dns.message import CLASS_IN, Qtype

_U16 = struct.Struct("!H")
_TCT = struct.Struct("!HHI")  # TYPE, CLASS, TTL (RDLENGTH follows)
_TCTL = struct.Struct("!HHIH")  # TYPE, CLASS, TTL, RDLENGTH
_SRV = struct.Struct("!HHH")  # priority, weight, port
_SOA_TIMERS = struct.Struct("!IIII")  # refresh, retry, expire, minimum (serial packed apart)

MAX_POINTER = 0x3FFF  # the largest offset a 14-bit compression pointer can address
QUESTION_OFFSET = 12  # the question's name always starts right after the header
QUESTION_POINTER = b"\xc0\x0c"

_BQ = "`"


def pointer(offset: int) -> bytes:
    """A compression pointer to *offset* (RFC 1035 §4.1.4)."""
    return _U16.pack(0xC000 | offset)


class Name:
    """A domain name prepared for repeated encoding.

    Holds the length-prefixed wire form of every label (spelling kept), the whole uncompressed
    wire form, and the compression key of every suffix (the lower-cased presentation text,
    e.g. ``"node.dc1.consul."``). Build it once and reuse it: writing a name is then a few
    dict look-ups. Raises :class:`ValueError` for a label over 63 bytes or a name over 255.
    """

    __slots__ = ("labels", "keys", "wire", "text")

    def __init__(self, text: str) -> None:
        text = text if text.endswith(".") else text + "."
        parts = text[:-1].split(".") if text != "." else []
        labels: list[bytes] = []
        for part in parts:
            raw = part.encode("utf-8")
            if not 0 < len(raw) <= 63:
                raise ValueError(f"bad label {part!r} in {text!r}")
            labels.append(bytes((len(raw),)) + raw)
        wire = b"".join(labels) + b"\x00"
        if len(wire) > 255:
            raise ValueError(f"name too long: {text!r}")
        keys: list[str] = []
        suffix = "."
        for part in reversed(parts):
            suffix = part.lower() + ("." + suffix if suffix != "." else ".")
            keys.append(suffix)
        keys.reverse()
        self.labels = tuple(labels)
        self.keys = tuple(keys)
        self.wire = wire
        self.text = text

    def __repr__(self) -> str:
        return f"Name({self.text!r})"


def wire_name(text: str) -> bytes:
    """The uncompressed wire form of presentation name *text*."""
    return Name(text).wire


def put_name(buf: bytearray, name: Name, table: dict[str, int] | None, at: int) -> int:
    """Append *name* to *buf*, compressed against *table*; return the offset it can be found at.

    *at* is the message offset of ``buf[0]``, or -1 when *buf* is not at a fixed place in the
    message (then nothing written is registered and the returned offset is -1 unless the
    whole name became a pointer). With *table* ``None`` the name is written uncompressed.
    New suffixes that start below :data:`MAX_POINTER` are registered in *table*.
    """
    if table is None:
        buf += name.wire
        return -1
    keys = name.keys
    labels = name.labels
    start = -1
    for i, key in enumerate(keys):
        off = table.get(key)
        if off is not None:
            if i == 0:
                buf += pointer(off)
                return off
            buf += pointer(off)
            return start
        if at >= 0:
            pos = at + len(buf)
            if i == 0 and pos <= MAX_POINTER:
                start = pos
            if pos <= MAX_POINTER:
                table[key] = pos
        buf += labels[i]
    buf += b"\x00"
    return start


@dataclass(frozen=True, slots=True)
class RR:
    """One record, ready to write.

    ``owner`` ``None`` means the question name, written as a pointer to offset 12 (which
    echoes the question's spelling in every answer, as Consul does). ``fixed`` is the RDATA
    before ``target`` (all of it when there is no target); ``target`` is a name that ends
    the RDATA (CNAME, NS, PTR, SRV). ``key`` identifies the record for de-duplication.
    """

    owner: Name | None
    rtype: int
    ttl: int
    fixed: bytes
    target: Name | None = None

    @property
    def key(self) -> tuple[str, int, bytes, str]:
        return (
            self.owner.keys[0] if self.owner is not None and self.owner.keys else "",
            self.rtype,
            self.fixed,
            self.target.keys[0] if self.target is not None and self.target.keys else "",
        )

    def raw_size(self, qname_len: int) -> int:
        """Uncompressed size; *qname_len* is the wire length of the question name."""
        owner = qname_len if self.owner is None else len(self.owner.wire)
        target = 0 if self.target is None else len(self.target.wire)
        return owner + 10 + len(self.fixed) + target


def write_rr(
    buf: bytearray, rr: RR, table: dict[str, int] | None, at: int, qwire: bytes
) -> int:
    """Append *rr* to *buf* (see :func:`put_name` for *table*/*at*); return the target's offset.

    *qwire* is the question name as sent, used for question-owned records when compression
    is off (``table is None``).
    """
    owner = rr.owner
    if owner is None:
        buf += QUESTION_POINTER if table is not None else qwire
    else:
        put_name(buf, owner, table, at)
    target = rr.target
    if target is None:
        buf += _TCTL.pack(rr.rtype, CLASS_IN, rr.ttl, len(rr.fixed))
        buf += rr.fixed
        return -1
    buf += _TCT.pack(rr.rtype, CLASS_IN, rr.ttl)
    lenpos = len(buf)
    buf += b"\x00\x00"
    buf += rr.fixed
    off = put_name(buf, target, table, at)
    buf[lenpos : lenpos + 2] = _U16.pack(len(buf) - lenpos - 2)
    return off


# -- record builders -------------------------------------------------------------------------


def a_or_aaaa(owner: Name | None, ttl: int, ip: bytes) -> RR:
    """An A (4-byte *ip*) or AAAA (16-byte *ip*) record."""
    return RR(owner, Qtype.A if len(ip) == 4 else Qtype.AAAA, ttl, ip)


def cname(owner: Name | None, ttl: int, target: Name) -> RR:
    return RR(owner, Qtype.CNAME, ttl, b"", target)


def ns(owner: Name | None, ttl: int, target: Name) -> RR:
    return RR(owner, Qtype.NS, ttl, b"", target)


def ptr(owner: Name | None, ttl: int, target: Name) -> RR:
    return RR(owner, Qtype.PTR, ttl, b"", target)


def srv(owner: Name | None, ttl: int, priority: int, weight: int, port: int, target: Name) -> RR:
    """An SRV record (RFC 2782). The target is never compressed by RFC 2782's letter, but
    RFC 3597 §4 allows decoders to accept it and every resolver does; Consul compresses it."""
    return RR(owner, Qtype.SRV, ttl, _SRV.pack(priority & 0xFFFF, weight & 0xFFFF, port & 0xFFFF), target)


def txt(owner: Name | None, ttl: int, text: str) -> RR:
    """A TXT record holding *text* as character-strings of at most 255 bytes (RFC 1035 §3.3.14)."""
    raw = text.encode("utf-8")
    chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
    return RR(owner, Qtype.TXT, ttl, b"".join(bytes((len(c),)) + c for c in chunks))


def soa_parts(
    owner: Name | None,
    mname: Name,
    rname: Name,
    ttl: int,
    refresh: int,
    retry: int,
    expire: int,
    minimum: int,
    table: dict[str, int] | None,
    at: int,
    qwire: bytes,
) -> tuple[bytes, bytes]:
    """An SOA record split around its SERIAL: ``(before, after)``.

    The serial is the current time (Consul's behaviour), so callers render the record once
    and splice ``struct.pack("!I", serial)`` between the two halves per reply. Names are
    compressed against *table* as in :func:`write_rr`.
    """
    buf = bytearray()
    if owner is None:
        buf += QUESTION_POINTER if table is not None else qwire
    else:
        put_name(buf, owner, table, at)
    buf += _TCT.pack(Qtype.SOA, CLASS_IN, ttl)
    lenpos = len(buf)
    buf += b"\x00\x00"
    put_name(buf, mname, table, at)
    put_name(buf, rname, table, at)
    rdlen = len(buf) - lenpos - 2 + 20
    buf[lenpos : lenpos + 2] = _U16.pack(rdlen)
    after = _SOA_TIMERS.pack(refresh & 0xFFFFFFFF, retry & 0xFFFFFFFF, expire & 0xFFFFFFFF, minimum & 0xFFFFFFFF)
    return bytes(buf), after


# -- RFC 1464 --------------------------------------------------------------------------------


def rfc1464(key: str, value: str) -> str:
    """Render a node-meta pair as one RFC 1464 TXT string, the way Consul does.

    In the key, the back-quote escapes itself, ``=`` and each leading or trailing space
    (RFC 1464 §2: "`" quotes the next character, ``=`` ends the attribute name, and leading
    and trailing white space in a name is otherwise ignored). In the value only the
    back-quote is doubled. Keys starting with ``rfc1035-`` (any case) carry a raw RFC 1035
    string: the value alone, without the key.
    """
    if key.lower().startswith("rfc1035-"):
        return value
    escaped = key.replace(_BQ, _BQ + _BQ).replace("=", _BQ + "=")
    core = escaped.lstrip(" ")
    lead = len(escaped) - len(core)
    body = core.rstrip(" ")
    trail = len(core) - len(body)
    return (_BQ + " ") * lead + body + (_BQ + " ") * trail + "=" + value.replace(_BQ, _BQ + _BQ)
