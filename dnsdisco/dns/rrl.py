"""Response rate limiting (RRL) for UDP replies, after BIND's ``rate-limit``: pure logic, no I/O.

UDP DNS can be aimed at a victim by forging its address: every small query we answer becomes
a larger reply sent to the victim. RRL bounds how many *identical* replies one client network
gets per second, without limiting legitimate traffic from everyone else (BIND 9 ARM
"Response Rate Limiting"; ISC TN-2012-1; anchors.md §4.2). This module owns the accounts, the
verdict for one reply and the truncated "slip" reply; :mod:`dnsdisco.dns.server` calls
:meth:`RateLimiter.filter` just before a UDP ``sendto`` when ``dns_config.rate_limit`` is on.
TCP is never limited: a TCP client has proved its address by the handshake.

The accounting follows BIND:

* Each (client prefix, response identity) has an account, a token bucket that earns the
  class's per-second rate continuously, is capped at +rate (one second's burst) and at
  ``-window x rate``, and is debited by one per reply. A reply is limited while the account is
  negative, so a client that floods and then stops waits about ``window`` seconds before it is
  answered again; an account idle for longer than ``window`` starts afresh.
* The client prefix is the address cut to ``ipv4_prefix_length`` (24) or
  ``ipv6_prefix_length`` (56) bits: one spoofed flood cannot dodge by varying the low bits.
* The identity depends on the reply (its rcode and answer count, read from the bytes):
  a positive answer is keyed by question name, type and class (``responses_per_second``);
  NODATA (``nodata_per_second``) and NXDOMAIN (``nxdomains_per_second``) by the zone when the
  name is in one of ours, so a random-subdomain flood shares one account, else by the name;
  every other rcode (REFUSED, SERVFAIL, FORMERR, ...) by the client prefix alone
  (``errors_per_second``). A rate of 0 leaves that class unlimited.
* Every ``slip``-th limited reply of an account is not dropped but "slipped": a positive,
  NODATA or NXDOMAIN reply becomes an empty truncated one (TC=1, the question only), so a real
  client whose address is being forged retries over TCP and gets its answer; an error reply
  is small already and is sent as it is ("leaked"), as BIND does. ``slip`` 0 never slips,
  1 slips every limited reply.
* ``exempt_clients`` are never limited; ``log_only`` counts what would be limited and sends
  everything.
* The table holds at most ``max_table_size`` accounts, least recently used first out.

Not implemented from BIND: ``all-per-second``, ``referrals-per-second`` (we never refer),
``qps-scale``, ``min-table-size``, per-view settings, and logging each limited burst (the
counters in :class:`RateLimitCounters` are exported as metrics instead).
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from dnsdisco.config import RateLimitConfig

__all__ = ["Kind", "RateLimitCounters", "RateLimiter", "Verdict", "client_prefix", "slip_reply"]

# Exemption answers cached per address; cleared when full (the check only runs for replies
# about to be limited, so this bounds work under a flood, not memory in normal operation).
_EXEMPT_CACHE_MAX = 4096
# Client prefixes cached per address, cleared the same way.
_PREFIX_CACHE_MAX = 4096


class Verdict(IntEnum):
    """What to do with one reply. ``ALLOW`` is 0 so a caller can test ``if verdict:``."""

    ALLOW = 0
    DROP = 1
    SLIP = 2


class Kind(IntEnum):
    """BIND's response classes that dnsdisco can produce (no referrals)."""

    RESPONSE = 0
    NODATA = 1
    NXDOMAIN = 2
    ERROR = 3


# As module globals: looking a member up on its Enum class costs more than a dict lookup. The
# kinds are plain ints inside account keys: an Enum member hashes through a Python-level
# __hash__, which would cost more than the rest of the key.
_ALLOW, _DROP, _SLIP = Verdict.ALLOW, Verdict.DROP, Verdict.SLIP
_RESPONSE, _NODATA, _NXDOMAIN, _ERROR = (int(k) for k in Kind)


@dataclass(slots=True)
class RateLimitCounters:
    """Replies limited so far, kept by the server across reloads (exported as metrics)."""

    dropped: int = 0  # not sent
    slipped: int = 0  # sent truncated (or, for errors, leaked as they were)
    logged: int = 0  # log_only: would have been dropped or slipped, sent anyway


def client_prefix(ip: str, v4_bits: int, v6_bits: int) -> str | bytes:
    """The client's network as a hashable key: the address cut to *v4_bits* or *v6_bits*.

    The common IPv4 /24 is a string cut (``"192.0.2"``) and /32 the address itself; other
    lengths go through the packed address. An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``,
    from a dual-stack socket) counts as its IPv4 address.
    """
    if "." in ip:
        if ":" in ip:
            ip = ip.rpartition(":")[2]
        if v4_bits == 24:
            return ip.rpartition(".")[0]
        if v4_bits == 32:
            return ip
        family, bits, width, tag = socket.AF_INET, v4_bits, 32, b"4"
    else:
        family, bits, width, tag = socket.AF_INET6, v6_bits, 128, b"6"
    try:
        packed = socket.inet_pton(family, ip.partition("%")[0])  # drop an IPv6 zone index
    except OSError:
        return ip
    # The family tag keeps an IPv4 /16 and an IPv6 /16 with the same bits apart.
    if bits % 8 == 0:
        return tag + packed[: bits // 8]
    n = int.from_bytes(packed, "big") >> (width - bits)
    return tag + n.to_bytes(width // 8, "big") + bytes([bits])


def _name_end(message: bytes) -> int:
    """Offset of the root label ending the first question's name, or -1 if it is not a plain
    name (no question, a compression pointer, a label over 63 bytes, a name over 255).

    The labels are walked, not searched for a zero byte: a zero *inside* a label
    (``rnd.\\000x.service.consul``) would otherwise end the key early, outside the zone, and buy
    each random name an account of its own.
    """
    if len(message) < 17 or not (message[4] or message[5]):
        return -1
    i, n = 12, len(message)
    limit = min(n, 12 + 255)
    while i < limit:
        length = message[i]
        if not length:
            return i if i + 5 <= n else -1
        if length > 63:
            return -1
        i += length + 1
    return -1


def _question_end(message: bytes) -> int:
    """Offset just past the first question's QTYPE and QCLASS, or -1 if there is none."""
    z = _name_end(message)
    return -1 if z < 0 else z + 5


def slip_reply(reply: bytes) -> bytes:
    """What a slipped reply becomes: an error reply unchanged (it is as small as a reply gets:
    BIND "leaks" those), anything else the header with TC set and no records, and the question.
    """
    rcode = reply[3] & 0xF
    if rcode not in (0, 3):
        return reply
    end = _question_end(reply)
    if end < 0:
        return reply[:2] + bytes([reply[2] | 0x02, reply[3]]) + b"\x00" * 8
    # Flags: keep QR, opcode, AA, RD, RA, the rcode; set TC (RFC 1035 §4.1.1). Counts: 1 question.
    return reply[:2] + bytes([reply[2] | 0x02, reply[3]]) + b"\x00\x01\x00\x00\x00\x00\x00\x00" + reply[12:end]


def _wire_zone(domain: str) -> bytes:
    name = domain.lower().rstrip(".")
    out = b"".join(bytes([len(label)]) + label.encode("ascii") for label in name.split(".") if label)
    return out + b"\x00"


class RateLimiter:
    """The accounts of one ``dns_config.rate_limit`` configuration.

    *zones* are the domains we answer (``consul.`` and the alt domain): NODATA and NXDOMAIN
    replies for names inside them share one account per zone. *clock* returns seconds
    (monotonic); tests pass their own. *counters* outlive the limiter (the server keeps them
    across reloads).
    """

    def __init__(self, config: RateLimitConfig, zones: tuple[str, ...] = (), *,
                 counters: RateLimitCounters | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        rps = config.responses_per_second
        # Rates by Kind; BIND: the other classes default to responses-per-second.
        self.rates: tuple[float, ...] = (
            float(rps),
            float(rps if config.nodata_per_second is None else config.nodata_per_second),
            float(rps if config.nxdomains_per_second is None else config.nxdomains_per_second),
            float(rps if config.errors_per_second is None else config.errors_per_second),
        )
        self.window = float(config.window)
        self.slip = config.slip
        self.log_only = config.log_only
        self.max_table_size = config.max_table_size
        self.v4_bits = config.ipv4_prefix_length
        self.v6_bits = config.ipv6_prefix_length
        self.zones = tuple(_wire_zone(z) for z in zones if z)
        self.exempt = tuple(ipaddress.ip_network(c) for c in config.exempt_clients)
        self.counters = counters if counters is not None else RateLimitCounters()
        self.clock = clock
        # key -> [balance, last update, limited replies so far]; dict order is recency (LRU).
        # Least recently used first. An OrderedDict, not a dict: evicting a dict's first key
        # steps over every deleted slot before it, O(table) per reply under a spoofed flood.
        self.table: OrderedDict[tuple[object, ...], list[float]] = OrderedDict()
        self._exempt_cache: dict[str, bool] = {}
        self._prefixes: dict[str, str | bytes] = {}  # client address -> its prefix key

    @property
    def enabled(self) -> bool:
        """Whether any class is limited (a configuration with every rate 0 limits nothing)."""
        return any(self.rates)

    def identity(self, reply: bytes) -> tuple[int, bytes]:
        """The reply's class (a :class:`Kind` value) and the name part of its account key (see the module docstring),
        from the reply bytes alone: the rcode and answer count in its header and the question
        it echoes, so a reply served without a parsed query (the memo, a forwarded answer) is
        accounted like any other."""
        if len(reply) < 12:
            return _ERROR, b""  # not a reply we make; never an exception on the UDP path
        rcode = reply[3] & 0xF
        if rcode == 0:
            kind = _RESPONSE if reply[6] or reply[7] else _NODATA
        elif rcode == 3:
            kind = _NXDOMAIN
        else:
            return _ERROR, b""
        z = _name_end(reply)
        if z < 0:
            return _ERROR, b""
        # Names compare case-insensitively (RFC 4343): lower-case the name, not the type/class.
        # A label length byte is at most 63, so bytes.lower() never changes one.
        if kind is _RESPONSE:
            first = 13 + reply[12]
            if reply[first : first + 5].lower() == b"\x04addr":
                # HEX.addr.<dc>.<domain> answers for any address, as a wildcard would: one
                # account for the form (BIND counts wildcard answers under the wildcard's name).
                return kind, reply[first:z].lower() + reply[z : z + 5]
            return kind, reply[12:z].lower() + reply[z : z + 5]
        name = reply[12 : z + 1].lower()
        for zone in self.zones:
            if name.endswith(zone):
                return kind, zone
        return kind, name

    def check(self, client_ip: str, kind: Kind, name: bytes, now: float) -> Verdict:
        """Debit the account of (*client_ip*'s prefix, *kind*, *name*) at time *now* and say
        whether the reply may go (ALLOW), is dropped (DROP) or slipped (SLIP). Exemptions and
        ``log_only`` are applied by :meth:`filter`, not here."""
        rate = self.rates[kind]
        if not rate:
            return _ALLOW
        return self._debit((self._prefix(client_ip), int(kind), name), rate, now)

    def _prefix(self, client_ip: str) -> str | bytes:
        prefixes = self._prefixes
        prefix = prefixes.get(client_ip)
        if prefix is None:
            if len(prefixes) >= _PREFIX_CACHE_MAX:
                prefixes.clear()
            prefix = prefixes[client_ip] = client_prefix(client_ip, self.v4_bits, self.v6_bits)
        return prefix

    def _debit(self, key: tuple[object, ...], rate: float, now: float) -> Verdict:
        table = self.table
        account = table.get(key)
        if account is None or now - account[1] > self.window:
            # New, or idle for longer than the window: a fresh account with one second's credit.
            if account is None:
                if len(table) >= self.max_table_size:
                    table.popitem(last=False)  # the least recently used account
                account = table[key] = [rate - 1.0, now, 0.0]
            else:
                account[:] = [rate - 1.0, now, 0.0]
                table.move_to_end(key)
            return _ALLOW if rate >= 1.0 else self._limited(account)
        table.move_to_end(key)  # most recently used
        balance = account[0] + (now - account[1]) * rate
        if balance > rate:
            balance = rate  # at most one second's worth of credit
        balance -= 1.0
        account[1] = now
        if balance >= 0:
            account[0] = balance
            return _ALLOW
        floor = -self.window * rate
        account[0] = balance if balance > floor else floor
        return self._limited(account)

    def _limited(self, account: list[float]) -> Verdict:
        account[2] += 1
        slip = self.slip
        if slip and int(account[2]) % slip == 0:
            return _SLIP
        return _DROP

    def filter(self, client_ip: str, reply: bytes) -> bytes | None:
        """The UDP reply to send to *client_ip*: *reply* itself, its slipped form, or None
        (drop). Counts what it limits in :attr:`counters`."""
        kind, name = self.identity(reply)
        rate = self.rates[kind]
        if not rate:
            return reply
        if self.exempt and self._exempt(client_ip):
            # Before any accounting (as BIND): an exempt resolver's traffic must not fill the
            # table and push limited clients' debts out of it.
            return reply
        prefix = self._prefixes.get(client_ip)
        if prefix is None:
            prefix = self._prefix(client_ip)
        verdict = self._debit((prefix, kind, name), rate, self.clock())
        if verdict is _ALLOW:
            return reply
        counters = self.counters
        if self.log_only:
            counters.logged += 1
            return reply
        if verdict is _DROP:
            counters.dropped += 1
            return None
        counters.slipped += 1
        return slip_reply(reply)

    def _exempt(self, client_ip: str) -> bool:
        cache = self._exempt_cache
        hit = cache.get(client_ip)
        if hit is not None:
            return hit
        try:
            addr = ipaddress.ip_address(client_ip.partition("%")[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        out = any(addr in net for net in self.exempt)
        if len(cache) >= _EXEMPT_CACHE_MAX:
            cache.clear()
        cache[client_ip] = out
        return out
