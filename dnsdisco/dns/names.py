"""Question names to lookups: which zone a name is in and what it asks for.

Pure functions over lower-cased presentation names (trailing dot), no catalog and no I/O, so
every rule of the DNS spec §1.3/§1.4 can be tested as a table. The answer table calls these
on a cache miss and caches the result per name.

The rules are Consul's: strip the longest matching domain; scan the remaining labels right to
left for the first kind keyword (``service``, ``connect``, ``virtual``, ``ingress``, ``node``,
``query``, ``addr``); labels left of it are the query parts, labels right of it the locality
suffix. For SRV questions a label starting with ``_`` also ends the scan and implies
``service``, so RFC 2782 names work without the keyword (``_db._tcp.consul``).
"""

from __future__ import annotations

from dataclasses import dataclass

from dnsdisco.dns.message import Qtype

_KINDS = frozenset({"service", "connect", "virtual", "ingress", "node", "query", "addr"})
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True, slots=True)
class ServiceLookup:
    """``[TAG.]NAME.service[.DC]`` or ``_NAME._TAG.service[.DC]``: healthy instances.

    ``tag`` ``None`` means no tag filter (including the RFC 2782 ``_tcp`` pseudo-tag);
    ``dc`` ``None`` means the local datacenter.
    """

    service: str
    tag: str | None = None
    dc: str | None = None


@dataclass(frozen=True, slots=True)
class NodeLookup:
    """``NODE.node[.DC]``: a node's address and meta, health ignored. Node names may hold dots."""

    node: str
    dc: str | None = None


@dataclass(frozen=True, slots=True)
class AddrLookup:
    """``HEX.addr[.DC]``: a synthetic address, 4 or 16 bytes (the DC label is ignored)."""

    ip: bytes


@dataclass(frozen=True, slots=True)
class PreparedQueryLookup:
    """``NAME_OR_ID.query[.DC]`` (or ``_NAME._tcp.query``): a prepared query."""

    name: str
    dc: str | None = None


@dataclass(frozen=True, slots=True)
class UnsupportedLookup:
    """A well-formed name of a form dnsdisco does not serve yet: ``connect``, ``ingress``,
    ``virtual``, or any ``.peer`` locality (spec §1.21). Answered as "not found"."""

    kind: str


Lookup = ServiceLookup | NodeLookup | AddrLookup | PreparedQueryLookup | UnsupportedLookup


def normalize_domain(domain: str) -> str:
    """Lower-case FQDN form of a configured domain (``"CONSUL"`` -> ``"consul."``); "" stays ""."""
    domain = domain.strip().lower().strip(".")
    return domain + "." if domain else ""


def in_domain(qname: str, domain: str) -> bool:
    """Whether lower-cased *qname* is *domain* (a normalised FQDN) or below it."""
    return qname == domain or qname.endswith("." + domain)


def split_zone(qname: str, domains: tuple[str, ...]) -> tuple[str, str] | None:
    """``(domain, rest)`` for the longest of *domains* that *qname* lies in, else ``None``.

    *rest* is the part before the domain without its trailing dot (``""`` at the apex).
    The longest match wins so that an ``alt_domain`` below the domain (``test.consul.`` vs
    ``consul.``) is stripped whole (spec §1.3).
    """
    best = ""
    for domain in domains:
        if domain and len(domain) > len(best) and in_domain(qname, domain):
            best = domain
    if not best:
        return None
    return best, qname[: len(qname) - len(best)].rstrip(".")


def parse(rest: str, qtype: int) -> Lookup | None:
    """The lookup named by *rest* (a name with its domain stripped), or ``None`` if invalid.

    ``None`` means the name is in the zone but does not name anything: NXDOMAIN.
    """
    if not rest:
        return None
    labels = rest.split(".")
    kind = ""
    parts: list[str] = []
    suffixes: list[str] = []
    for i in range(len(labels) - 1, -1, -1):
        label = labels[i]
        if label in _KINDS:
            kind, parts, suffixes = label, labels[:i], labels[i + 1 :]
            break
        if qtype == Qtype.SRV and label.startswith("_"):
            # RFC 2782 form without ``.service``: the ``_`` label is the last query part.
            kind, parts, suffixes = "service", labels[: i + 1], labels[i + 1 :]
            break
    if not kind or not parts or "" in parts:
        return None

    if kind == "addr":
        # Exactly one label before ``addr``; any suffix is ignored (spec §1.3).
        return _parse_addr(parts)

    if kind == "query":
        if len(suffixes) > 1:
            return None
        dc = suffixes[0] if suffixes else None
        if len(parts) >= 2 and parts[0].startswith("_") and parts[-1].startswith("_"):
            # RFC 2782 form for prepared queries: the last part (``_tcp``) is ignored.
            name = ".".join(parts[:-1])[1:]
        else:
            name = ".".join(parts)
        return PreparedQueryLookup(name, dc) if name else None

    locality = _locality(suffixes)
    if locality is None:
        return None
    dc, peer = locality

    if kind == "virtual":
        return UnsupportedLookup(kind)
    if peer is not None:
        return UnsupportedLookup("peer")
    if kind == "node":
        return NodeLookup(".".join(parts), dc)
    if kind in ("connect", "ingress"):
        return UnsupportedLookup(kind)

    # service
    if len(parts) == 2 and parts[0].startswith("_") and parts[1].startswith("_"):
        service, tag = parts[0][1:], parts[1][1:]
        if not service or not tag:
            return None
        # RFC 2782: ``_tcp`` is the protocol, not a tag; every other ``_x`` filters by tag x.
        return ServiceLookup(service, None if tag == "tcp" else tag, dc)
    tag = ".".join(parts[:-1]) if len(parts) > 1 else None
    return ServiceLookup(parts[-1], tag, dc)


def _locality(suffixes: list[str]) -> tuple[str | None, str | None] | None:
    """``(dc, peer)`` from the labels right of the kind keyword, or ``None`` if malformed.

    No label: local DC. One label: a datacenter. Otherwise pairs ``<x>.dc`` / ``<x>.peer``;
    both together, an unknown keyword, a repeated keyword or an odd count is invalid.
    """
    n = len(suffixes)
    if n == 0:
        return None, None
    if n == 1:
        return suffixes[0], None
    if n % 2 or n > 6:
        return None
    found: dict[str, str] = {}
    for i in range(0, n, 2):
        value, keyword = suffixes[i], suffixes[i + 1]
        if keyword not in ("dc", "peer") or keyword in found:
            return None
        found[keyword] = value
    if len(found) > 1:
        return None
    return found.get("dc"), found.get("peer")


def _parse_addr(parts: list[str]) -> AddrLookup | None:
    if len(parts) != 1:
        return None
    label = parts[0]
    if len(label) not in (8, 32) or not _HEX.issuperset(label):
        return None
    return AddrLookup(bytes.fromhex(label))


def addr_label(ip: bytes) -> str:
    """The ``.addr.`` label of an address: lower-case hex, 8 or 32 characters (spec §1.6)."""
    return ip.hex()


def parse_reverse(qname: str) -> bytes | None:
    """The address a reverse name asks about, or ``None`` if it is not a full one.

    ``d.c.b.a.in-addr.arpa.`` (four decimal octets, RFC 1035 §3.5) and the 32-nibble
    ``ip6.arpa.`` form (RFC 3596 §2.5); partial names such as ``10.in-addr.arpa.`` name no
    single address.
    """
    if qname.endswith(".in-addr.arpa."):
        labels = qname[: -len(".in-addr.arpa.")].split(".")
        if len(labels) != 4:
            return None
        octets = []
        for label in reversed(labels):
            if not label.isdigit() or len(label) > 3 or (len(label) > 1 and label[0] == "0"):
                return None
            value = int(label)
            if value > 255:
                return None
            octets.append(value)
        return bytes(octets)
    if qname.endswith(".ip6.arpa."):
        labels = qname[: -len(".ip6.arpa.")].split(".")
        if len(labels) != 32 or any(len(x) != 1 or x not in _HEX for x in labels):
            return None
        return bytes.fromhex("".join(reversed(labels)))
    return None
