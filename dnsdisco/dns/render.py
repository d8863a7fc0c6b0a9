"""Pre-rendered replies: answer sets turned into wire bytes once and served many times.

This module owns the layout of a reply and the per-query fast path; :mod:`dnsdisco.dns.table`
decides *what* the answer is (catalog, health, addresses) and hands the records here.

How one rendering serves many questions:

* Records owned by the question name are written as a pointer to offset 12 (``0xC00C``), and
  names in the domain are compressed against the domain's labels *inside the question*, whose
  offset follows from the question's length. So a rendering depends on the question only
  through its length: every spelling (case, ``.dc1.``/``.dc1.dc.``, alias) of the same length
  shares it, and the question bytes are spliced in as sent.
* Shuffling (Consul shuffles every answer) picks, per query, one of a bounded set of orders:
  a few random permutations of the answer units, each rotated so that every instance comes
  first in some order. The shared unit lists are never mutated (copy-and-shuffle, as the
  CoreDNS loadbalance plugin does).
* Answers owned by the question with nothing in Additional (A, AAAA) do not depend on
  where they sit, so a permutation is rendered once, doubled, and any rotation cut to any
  count or byte limit is one slice.
* Other answers (SRV with glue, CNAME chains, NS) are rendered as an :class:`Order`, lazily
  and incrementally: answer records go to one buffer and the Additional records they pull
  in to another, interleaved so that an Additional record only ever points at answers that
  come before it (never into the Additional section). The first *k* answers plus a prefix
  of the Additional bytes is then itself a valid body, and trimming to any count or byte
  limit is a binary search over per-answer end offsets plus two slices.
* A few answers taken from a large set (512-byte UDP, 3 of 5,000) would need an order per
  rotation; instead each unit is rendered on its own (pointing only into the question) and
  a reply joins the pieces of its window.
* The SOA serial is the current time (as Consul), so SOA records are kept in two halves and
  the serial is spliced in per reply.
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate

from dnsdisco.dns import rr as _rr
from dnsdisco.dns.message import FLAG_AA, FLAG_QR, FLAG_RA, FLAG_TC, Edns, Query, Rcode, encode_opt
from dnsdisco.dns.rr import RR, Name

_HEADER = struct.Struct("!HHHHHH")
_SERIAL = struct.Struct("!I")
_COPY_FLAGS = 0x7910  # opcode, RD, CD copied from the request (RFC 1035 §4.1.1)

# Consul caps: at most 8 answers in 512-byte mode whatever udp_answer_limit says; TCP replies
# at most 65523 bytes and 4096 answers (1024 SRV) before byte trimming (spec §1.11).
MAX_UDP_ANSWERS = 8
MAX_TCP_SIZE = 65523
TCP_ANSWER_CAP = 4096
TCP_SRV_ANSWER_CAP = 1024
# Consul keeps 8 bytes of head-room under the UDP limit when trimming (spec §1.11).
UDP_SLACK = 8

# Shuffle variety: how many base permutations, and how many rotation offsets serve replies
# that hold many answers (each such order may be up to 64 KiB rendered). Replies that hold
# few answers (512-byte UDP: 3 by default) may use every rotation: they are cheap to render,
# and every instance must get its turn in front, or a client that takes the first 3 of 5,000
# would only ever see a few dozen (consul#2335).
SMALL_WINDOW = 16
_PERMS_SMALL = 4
_PERMS_LARGE = 2
_BIG_OFFSETS = 8
_MAX_ORDERS = 64
_MAX_BASES = 4
_MAX_WINDOWS = 1024
_MAX_FITS = 16


@dataclass(frozen=True, slots=True)
class Unit:
    """One answer record and the Additional records it needs (glue, node-meta TXT).

    ``keys`` de-duplicate Additional records across units: a glue record shared by two SRV
    answers is written once (our choice; Consul repeats it, spec Decisions).
    """

    answer: RR
    extra: tuple[RR, ...] = ()
    keys: tuple[object, ...] = ()

    @staticmethod
    def of(answer: RR, extra: Sequence[RR] = ()) -> Unit:
        extra = tuple(extra)
        return Unit(answer, extra, tuple(x.key for x in extra))


class LazyUnits(Sequence[Unit]):
    """Units built on first use: a 5,000-instance service answered over 512-byte UDP only
    ever needs the few units its orders start with. *items* pre-fills units already built
    (by an earlier version of the same answer set); it is copied."""

    __slots__ = ("_make", "_items")

    def __init__(self, count: int, make: Callable[[int], Unit], items: Sequence[Unit | None] | None = None) -> None:
        self._make = make
        self._items: list[Unit | None] = list(items) if items is not None else [None] * count

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):  # type: ignore[override]
        unit = self._items[i]
        if unit is None:
            unit = self._items[i] = self._make(i)
        return unit


def perm_count(n: int) -> int:
    """How many base permutations an answer set of *n* units is served from (0: unshuffled).
    Enough that rotations of them give varied orders, few enough that rendering each once
    stays cheap."""
    if n <= 1:
        return 0
    return 1 if n <= 2 else 2 if n <= 8 else _PERMS_SMALL if n <= 256 else _PERMS_LARGE


def base_perms(n: int, shuffle: Callable[[list[int]], None]) -> list[list[int]]:
    """``perm_count(n)`` shuffled orders of ``range(n)``: copy-and-shuffle (CoreDNS
    loadbalance), so the unit list itself is never reordered."""
    perms = []
    for _ in range(perm_count(n)):
        perm = list(range(n))
        shuffle(perm)
        perms.append(perm)
    return perms


def spread_offsets(n: int) -> list[int]:
    """The rotation offsets that replies holding many answers start at."""
    spread = min(n, _BIG_OFFSETS)
    return [(j * n) // spread for j in range(spread)] if spread else [0]


class Shuffles:
    """The base permutations (and big-reply offsets) of an answer set that changes in place.

    The owner keeps its units in slots ``0..n-1``: :meth:`add` appends slot ``n``;
    :meth:`remove` drops slot *i* and renames the last slot to *i* (the owner moves its last
    unit there too). Each step costs O(1) Python work plus a C-speed scan per permutation,
    instead of reshuffling all *n*, and keeps every permutation uniformly random: dropping one
    element of a uniform permutation (the last element fills the hole) leaves a uniform
    permutation of the rest, and putting a new element at a uniform position (the element
    there moves to the end) is one step of the inside-out Fisher-Yates shuffle. The offsets
    stay put while *n* drifts by less than an eighth, so most kept orders stay valid.
    """

    __slots__ = ("n", "perms", "offsets", "_where", "_n0", "_shuffle", "_random")

    def __init__(self, n: int, shuffle: Callable[[list[int]], None], random: Callable[[], float]) -> None:
        self._shuffle = shuffle
        self._random = random
        self._reset(n)

    def _reset(self, n: int) -> None:
        self.n = n
        self.perms = base_perms(n, self._shuffle)
        # Per permutation, the position of each slot (built on the first removal).
        self._where: list[list[int]] | None = None
        self.offsets = spread_offsets(n)
        self._n0 = n

    def _respread(self) -> None:
        n = self.n
        offsets = self.offsets
        if (
            len(offsets) != max(1, min(n, _BIG_OFFSETS))
            or offsets[-1] >= max(n, 1)
            or abs(n - self._n0) * _BIG_OFFSETS > self._n0
        ):
            self.offsets = spread_offsets(n)
            self._n0 = n

    def add(self) -> None:
        """A unit was appended at slot ``n``."""
        n = self.n
        if perm_count(n + 1) != perm_count(n):
            self._reset(n + 1)
            return
        wheres = self._where
        for p, perm in enumerate(self.perms):
            j = int(self._random() * (n + 1))
            if j >= n:
                perm.append(n)
            else:
                moved = perm[j]
                perm.append(moved)
                perm[j] = n
            if wheres is not None:
                where = wheres[p]
                if j < n:
                    where[moved] = n
                where.append(min(j, n))
        self.n = n + 1
        self._respread()

    def remove(self, i: int) -> None:
        """Slot *i* is gone and the last slot now answers to *i*."""
        last = self.n - 1
        if perm_count(last) != perm_count(last + 1):
            self._reset(last)
            return
        wheres = self._where
        if wheres is None:
            wheres = self._where = []
            for perm in self.perms:
                where = [0] * len(perm)
                for pos, v in enumerate(perm):
                    where[v] = pos
                wheres.append(where)
        for perm, where in zip(self.perms, wheres):
            pos = where[i]
            tail = perm.pop()
            if pos < last:
                perm[pos] = tail
                where[tail] = pos
            if i != last:
                at = where[last]
                perm[at] = i
                where[i] = at
            where.pop()
        self.n = last
        self._respread()


class Context:
    """What every reply needs from the configuration, plus the small shared caches.

    Built by the table on (re)configuration; replies hold no configuration of their own, so
    a reconfigure swaps this object and clears the table's caches in one step.
    """

    def __init__(
        self,
        *,
        ra: bool,
        compress: bool,
        udp_answer_limit: int,
        enable_truncate: bool,
        soa_ttl: int,
        soa_timers: tuple[int, int, int, int],
        random: Callable[[], float],
        clock: Callable[[], float],
        rng_shuffle: Callable[[list[int]], None],
    ) -> None:
        self.ra = FLAG_RA if ra else 0
        self.compress = compress
        # udp_answer_limit < 1 is refused at config load (spec Decisions); never serve 0 here.
        self.udp_limit = max(1, min(MAX_UDP_ANSWERS, udp_answer_limit))
        self.truncate = enable_truncate
        self.soa_ttl = soa_ttl
        self.soa_timers = soa_timers
        self.random = random
        self.clock = clock
        self.shuffle = rng_shuffle
        self.renders = 0  # answers rendered so far (a cost counter for tests and metrics)
        self._opts: dict[tuple[int, bytes | None], bytes] = {}
        self._soas: dict[tuple[str, int, bool], tuple[bytes, bytes]] = {}
        self._names: dict[str, Name] = {}
        # Per-node Additional TXT records, shared by every service on the node.
        self.node_txt: dict[tuple[str, int], tuple[object, tuple[RR, ...]]] = {}

    # -- helpers shared by the replies -----------------------------------------------------

    def name(self, text: str) -> Name:
        """A cached :class:`Name` for *text* (bounded: cleared when it grows large)."""
        name = self._names.get(text)
        if name is None:
            if len(self._names) > 200_000:
                self._names.clear()
            name = self._names[text] = Name(text)
        return name

    def seed(self, domain: Name | None, base: int) -> dict[str, int] | None:
        """A compression table whose only entry is *domain* inside the question.

        *base* is ``12 + len(question)``; the question name ends with the domain, four bytes
        (QTYPE, QCLASS) before the end of the question. ``None`` when compression is off.
        """
        if not self.compress:
            return None
        if domain is None:
            return {}
        return {domain.keys[0]: base - 4 - len(domain.wire)} if domain.keys else {}

    def opt(self, edns: Edns) -> bytes:
        key = (edns.payload, edns.ecs)
        opt = self._opts.get(key)
        if opt is None:
            if len(self._opts) > 4096:
                self._opts.clear()
            opt = self._opts[key] = encode_opt(edns)
        return opt

    def finish(self, query: Query, flags: int, an: int, ns: int, ar: int, body: bytes) -> bytes:
        """Header + question (as sent) + *body* (+ OPT when the query had one).

        *flags* carries the rcode and TC; QR and AA are set here (every reply the table
        makes is for a name in its zones: Consul sets AA on all of them, NXDOMAIN included),
        RA iff recursors are configured, and opcode/RD/CD are copied from the query.
        """
        flags |= FLAG_QR | FLAG_AA | (query.flags & _COPY_FLAGS) | self.ra
        edns = query.edns
        if edns is None:
            return _HEADER.pack(query.id, flags, 1, an, ns, ar) + query.question + body
        return _HEADER.pack(query.id, flags, 1, an, ns, ar + 1) + query.question + body + self.opt(edns)

    def soa(self, domain: Name, base: int, in_question: bool, qwire: bytes) -> bytes:
        """The zone's SOA record with the current serial, placed right after the question.

        With *in_question* the owner and the MNAME/RNAME suffixes point at the domain inside
        the question (so one rendering per question length serves every name).
        """
        # Within the SOA, MNAME and RNAME point at its owner, so the rendering depends on
        # where it starts (*base*) unless compression is off.
        key = (domain.text, base if self.compress else -1, in_question)
        halves = self._soas.get(key)
        if halves is None:
            table = self.seed(domain if in_question else None, base)
            refresh, retry, expire, minimum = self.soa_timers
            halves = _rr.soa_parts(
                domain,
                self.name("ns." + domain.text),
                self.name("hostmaster." + domain.text),
                self.soa_ttl,
                refresh,
                retry,
                expire,
                minimum,
                table,
                base,
                qwire,
            )
            if len(self._soas) > 4096:
                self._soas.clear()
            self._soas[key] = halves
        return halves[0] + _SERIAL.pack(int(self.clock()) & 0xFFFFFFFF) + halves[1]

    def rooms(self, query: Query, opt_len: int) -> tuple[int, int, bool]:
        """``(room, raw_room, mode512)``: the bytes the answer body may take.

        UDP: the reply must fit ``max_size`` and (as Consul) leave 8 bytes spare; in
        "512 mode" (no EDNS or EDNS size <= 512) Consul measures the *uncompressed* size, so
        ``raw_room`` bounds that (-1 otherwise). TCP: 65523 bytes.
        """
        fixed = 12 + len(query.question)
        size = query.max_size
        if query.tcp:
            return min(size, MAX_TCP_SIZE) - opt_len - fixed, -1, False
        room = min(size - UDP_SLACK, size - opt_len) - fixed
        if size <= 512:
            return room, size - UDP_SLACK - fixed, True
        return room, -1, False


class Cell:
    """A validity flag shared by every reply built from one version of some catalog data."""

    __slots__ = ("stale",)

    def __init__(self) -> None:
        self.stale = False


class Reply:
    """A cached answer to one lookup; :meth:`render` makes the reply bytes for a query."""

    __slots__ = ("cell",)

    def __init__(self, cell: Cell) -> None:
        self.cell = cell

    def render(self, query: Query, ctx: Context, pick: int = -1) -> bytes:  # pragma: no cover - abstract
        """The reply bytes for *query*. Where the reply is shuffled, *pick* (``0 <= pick <
        choices(query, ctx)``) names which of its orders to use; -1 draws one at random."""
        raise NotImplementedError

    def choices(self, query: Query, ctx: Context) -> int:
        """How many different replies :meth:`render` can make for *query* (one per shuffle
        outcome, each named by a *pick*), so that a caller may keep them all and choose among
        them itself with the same odds; 0 when the bytes also depend on the time (the SOA
        serial) and must be rendered per query."""
        return 0


class Fixed(Reply):
    """A reply with no records: SERVFAIL before the first sync, NOTIMP for AXFR."""

    __slots__ = ("rcode",)

    def __init__(self, cell: Cell, rcode: int) -> None:
        super().__init__(cell)
        self.rcode = rcode

    def render(self, query: Query, ctx: Context, pick: int = -1) -> bytes:
        return ctx.finish(query, self.rcode, 0, 0, 0, b"")

    def choices(self, query: Query, ctx: Context) -> int:
        return 1


class Negative(Reply):
    """NXDOMAIN or NODATA (NOERROR, no answers): the zone's SOA in Authority, always
    (RFC 2308 §3; our choice where Consul sometimes omits it, spec Decisions)."""

    __slots__ = ("rcode", "domain", "in_question")

    def __init__(self, cell: Cell, rcode: int, domain: Name, in_question: bool = True) -> None:
        super().__init__(cell)
        self.rcode = rcode
        self.domain = domain
        self.in_question = in_question

    def render(self, query: Query, ctx: Context, pick: int = -1) -> bytes:
        base = 12 + len(query.question)
        soa = ctx.soa(self.domain, base, self.in_question, query.question[:-4])
        return ctx.finish(query, self.rcode, 0, 1, 0, soa)


class Order:
    """One sequence of answer units, rendered incrementally for one question length.

    ``ends[k]`` is the compressed size of the first *k* answers plus the Additional records
    they need, ``raw[k]`` the same uncompressed; :meth:`body` slices a prefix.
    """

    __slots__ = (
        "_units", "_perm", "_rot", "_n", "_table", "_base", "_qwire", "_qlen", "_seen",
        "ans", "add", "ans_ends", "add_ends", "ends", "raw", "counts", "fits",
    )

    def __init__(
        self,
        units: Sequence[Unit],
        perm: Sequence[int] | None,
        rot: int,
        table: dict[str, int] | None,
        base: int,
        qwire: bytes,
    ) -> None:
        self._units = units
        self._perm = perm
        self._rot = rot
        self._n = len(units) if perm is None else len(perm)
        self._table = table
        self._base = base
        self._qwire = qwire
        self._qlen = len(qwire)
        self._seen: set[object] = set()
        self.ans = bytearray()
        self.add = bytearray()
        self.ans_ends = [0]
        self.add_ends = [0]
        self.ends = [0]
        self.raw = [0]
        self.counts = [0]
        self.fits: dict[tuple[int, int, int], tuple[int, bytes, int]] = {}

    def _next(self) -> None:
        i = len(self.ends) - 1
        perm = self._perm
        if perm is None:
            unit = self._units[i]
        else:
            unit = self._units[perm[(self._rot + i) % self._n]]
        ans, add, table, qwire = self.ans, self.add, self._table, self._qwire
        _rr.write_rr(ans, unit.answer, table, self._base, qwire)
        raw = self.raw[-1] + unit.answer.raw_size(self._qlen)
        count = self.counts[-1]
        seen = self._seen
        for extra, key in zip(unit.extra, unit.keys):
            if key in seen:
                continue
            seen.add(key)
            # Additional records sit at no fixed offset (the answers before them may be
            # trimmed), so they register nothing and only point into the answers.
            _rr.write_rr(add, extra, table, -1, qwire)
            raw += extra.raw_size(self._qlen)
            count += 1
        self.ans_ends.append(len(ans))
        self.add_ends.append(len(add))
        self.ends.append(len(ans) + len(add))
        self.raw.append(raw)
        self.counts.append(count)

    def fit(self, count: int, room: int, raw_room: int) -> int:
        """The most answers (at most *count*) whose body fits *room* (and *raw_room* when
        it is not -1); never fewer than one if there is one: Consul sends a single
        oversized answer rather than none (spec §1.11)."""
        ends, raw = self.ends, self.raw
        n = min(count, self._n)
        while len(ends) - 1 < n and ends[-1] <= room and (raw_room < 0 or raw[-1] <= raw_room):
            self._next()
        hi = min(n, len(ends) - 1)
        k = bisect_right(ends, room, 0, hi + 1) - 1
        if raw_room >= 0:
            k = min(k, bisect_right(raw, raw_room, 0, hi + 1) - 1)
        if k < 1 and hi >= 1:
            k = 1
        return k

    def body(self, k: int) -> bytes:
        return bytes(self.ans[: self.ans_ends[k]]) + bytes(self.add[: self.add_ends[k]])


def flat_rr(record: RR) -> bytes:
    """Wire form of a record owned by the question with no name in its RDATA (A, AAAA, TXT):
    the same bytes wherever it lands in a compressed reply."""
    buf = bytearray()
    _rr.write_rr(buf, record, {}, -1, b"")
    return bytes(buf)


class _Piece:
    """One unit rendered on its own: compressed only against the question, so its bytes are
    valid at any position in a reply to a question of the same length."""

    __slots__ = ("answer", "size", "raw", "keys", "extras", "extra_bytes", "extra_size", "extra_raw")

    def __init__(self, unit: Unit, seed: dict[str, int] | None, qwire: bytes, qlen: int) -> None:
        buf = bytearray()
        _rr.write_rr(buf, unit.answer, seed, -1, qwire)
        self.answer = bytes(buf)
        self.size = len(buf)
        self.raw = unit.answer.raw_size(qlen)
        extras = []
        for extra, key in zip(unit.extra, unit.keys):
            buf = bytearray()
            _rr.write_rr(buf, extra, seed, -1, qwire)
            extras.append((key, bytes(buf), extra.raw_size(qlen)))
        self.keys = frozenset(unit.keys)
        self.extras = tuple(extras)
        self.extra_bytes = b"".join(x for _, x, _ in extras)
        self.extra_size = len(self.extra_bytes)
        self.extra_raw = sum(r for _, _, r in extras)


class Records(Reply):
    """A positive answer: a list of units served in shuffled orders, trimmed per query.

    ``limit`` caps the answers at build time (``a_record_limit``, the NS maximum of 3);
    ``noedns_limit`` caps them when the query has no EDNS (Consul keeps at most 5 records
    resolved behind a CNAME then); ``tcp_cap`` is Consul's TCP pre-cut (4096, 1024 for SRV).
    ``domain`` is the zone the question used (``None`` for reverse names), whose labels in
    the question are the compression target of every synthesized name. With ``chains``
    each order is one of the given index lists instead of a shuffle (one CNAME instance per
    reply, spec §1.6).

    Three ways to serve, cheapest first:

    * *flat* answers (A/AAAA/TXT owned by the question, nothing in Additional) do not depend
      on their position, so each permutation is rendered once, doubled, and any rotation and
      any count is one slice: every instance takes its turn in front at no per-query cost;
    * 512-byte UDP (a few answers, possibly from a large set): each unit is rendered once
      per question length on its own, compressed only against the question, and a reply
      joins the pieces of its window; the joined replies are cached (bounded). Consul
      measures these replies uncompressed anyway, so the lost compression changes nothing
      about what fits;
    * otherwise an :class:`Order` per (permutation, rotation, question length) is kept and
      extended as far as the largest limit asked of it.
    """

    __slots__ = (
        "units", "domain", "limit", "noedns_limit", "tcp_cap", "chains", "perms", "offsets",
        "orders", "pieces", "windows", "flat", "blobs", "_n",
    )

    def __init__(
        self,
        cell: Cell,
        units: Sequence[Unit],
        domain: Name | None,
        ctx: Context,
        *,
        shuffle: bool = True,
        limit: int = 0,
        noedns_limit: int = 0,
        tcp_cap: int = TCP_ANSWER_CAP,
        chains: Sequence[Sequence[int]] | None = None,
        blobs: Sequence[bytes] | None = None,
        shuffles: Shuffles | None = None,
    ) -> None:
        """*blobs*, instead of *units*, gives flat answers already in wire form (see
        :func:`flat_rr`); *units* is then ignored. *shuffles* gives the permutations of an
        answer set kept up to date across changes (copied), instead of fresh ones."""
        super().__init__(cell)
        if blobs is not None:
            units = blobs  # type: ignore[assignment]
        self.units = units
        self.domain = domain
        n = len(units)
        self._n = n
        self.limit = min(limit, n) if limit > 0 else n
        self.noedns_limit = noedns_limit
        self.tcp_cap = tcp_cap
        self.chains = chains
        self.orders: dict[tuple[int, int, int | bytes], Order] = {}
        self.pieces: dict[int | bytes, list[_Piece | None]] = {}
        self.windows: dict[tuple[object, ...], tuple[int, bytes, int]] = {}
        self.perms: list[list[int]] | None = None
        self.offsets: list[int] = [0]
        self.flat: list[tuple[bytes, list[int]] | None] | None = None
        if shuffles is not None and chains is None and shuffle and n > 1:
            assert shuffles.n == n
            self.perms = [list(perm) for perm in shuffles.perms]
            self.offsets = list(shuffles.offsets)
        elif chains is None and shuffle and n > 1:
            self.perms = base_perms(n, ctx.shuffle)
            self.offsets = spread_offsets(n)
        self.blobs: Sequence[bytes] | None = None
        if blobs is not None:
            self.blobs = blobs
        elif chains is None and ctx.compress and not isinstance(units, LazyUnits) and all(
            not u.extra and u.answer.owner is None and u.answer.target is None for u in units
        ):
            self.blobs = [flat_rr(u.answer) for u in units]
        if self.blobs is not None:
            self.flat = [None] * (len(self.perms) if self.perms is not None else 1)

    def choices(self, query: Query, ctx: Context) -> int:
        # The same draw as render's: a chain, or a (permutation, rotation) pair.
        if self.chains is not None:
            return len(self.chains)
        perms = self.perms
        if perms is None:
            return 1
        n = self._n
        avail = self.limit
        if query.edns is None and self.noedns_limit:
            avail = min(avail, self.noedns_limit)
        mode512 = not query.tcp and query.max_size <= 512  # as Context.rooms
        if n <= SMALL_WINDOW or self._cap(query, ctx, avail, mode512) <= SMALL_WINDOW:
            return len(perms) * n
        return len(perms) * len(self.offsets)

    def _cap(self, query: Query, ctx: Context, avail: int, mode512: bool) -> int:
        """How many of *avail* answers a reply to *query* may keep before byte trimming."""
        if query.tcp:
            return min(avail, self.tcp_cap)
        if mode512:
            return min(avail, ctx.udp_limit)
        return avail

    def render(self, query: Query, ctx: Context, pick: int = -1) -> bytes:
        base = 12 + len(query.question)
        edns = query.edns
        opt_len = 0 if edns is None else len(ctx.opt(edns))
        room, raw_room, mode512 = ctx.rooms(query, opt_len)

        # How many answers the reply may keep before byte trimming.
        chains = self.chains
        if chains is not None:
            c = pick if pick >= 0 else int(ctx.random() * len(chains))
            avail = len(chains[c])
        else:
            c = 0
            avail = self.limit
        if edns is None and self.noedns_limit:
            avail = min(avail, self.noedns_limit)
        count = self._cap(query, ctx, avail, mode512)

        # Which order (the shuffle). A reply that keeps few answers may start anywhere;
        # one that keeps many starts at one of a few spaced offsets (each such order is a
        # large rendering worth keeping).
        perms = self.perms
        n = self._n
        if chains is not None or perms is None:
            p, r = c, 0
            small = False
        elif count <= SMALL_WINDOW or n <= SMALL_WINDOW:
            p, r = divmod(pick if pick >= 0 else int(ctx.random() * len(perms) * n), n)
            # Consul measures 512-byte replies uncompressed, so per-unit pieces (compressed
            # only against the question) keep exactly as many answers as full compression.
            small = raw_room >= 0
        else:
            offsets = self.offsets
            p, j = divmod(pick if pick >= 0 else int(ctx.random() * len(perms) * len(offsets)), len(offsets))
            r = offsets[j]
            small = False

        if self.flat is not None or small:
            # Replies cut from flat answers or joined from pieces: cached per window and limits.
            wkey = (p, r, base if ctx.compress else query.question, count, room, raw_room)
            fit = self.windows.get(wkey)
            if fit is None:
                if self.flat is not None:
                    fit = self._flat(p, r, count, room, raw_room, len(query.question) - 4, ctx)
                else:
                    fit = self._window(p, r, count, room, raw_room, base, query, ctx)
                if len(self.windows) >= _MAX_WINDOWS:
                    self.windows.clear()
                self.windows[wkey] = fit
            k, body, ar = fit
        else:
            order = self.orders.get((p, r, base if ctx.compress else query.question))
            if order is None:
                order = self._order(p, r, base, query, ctx, keep=True)
            fkey = (count, room, raw_room)
            fit = order.fits.get(fkey)
            if fit is None:
                k = order.fit(count, room, raw_room)
                fit = (k, order.body(k), order.counts[k])
                if len(order.fits) < _MAX_FITS:
                    order.fits[fkey] = fit
            k, body, ar = fit
        flags = FLAG_TC if k < avail and ctx.truncate else 0
        return ctx.finish(query, flags, k, 0, ar, body)

    def _flat(
        self, p: int, r: int, count: int, room: int, raw_room: int, qname_len: int, ctx: Context
    ) -> tuple[int, bytes, int]:
        flat = self.flat
        assert flat is not None
        entry = flat[p]
        if entry is None:
            blobs = self.blobs
            assert blobs is not None
            # C-speed passes only: this runs on the first query after a change, over every
            # answer of the set (5,000 for a big service).
            parts = blobs if self.perms is None else list(map(blobs.__getitem__, self.perms[p]))
            ends = list(accumulate(map(len, parts), initial=0))
            total = ends[-1]
            ends += map(total.__add__, ends[1:])
            joined = b"".join(parts)
            entry = flat[p] = (joined + joined, ends)
            ctx.renders += 1
        buf, ends = entry
        n = self._n
        count = min(count, n)
        start = ends[r]
        # Largest k <= count whose bytes fit (each record is 2 bytes compressed owner).
        k = bisect_right(ends, start + room, r, r + count + 1) - 1 - r
        if raw_room >= 0:
            while k > 0 and ends[r + k] - start + k * (qname_len - 2) > raw_room:
                k -= 1
        if k < 1 and count >= 1:
            k = 1
        return k, buf[start : ends[r + k]], 0

    def _window(
        self, p: int, r: int, count: int, room: int, raw_room: int, base: int, query: Query, ctx: Context
    ) -> tuple[int, bytes, int]:
        # Uncompressed, records owned by the question spell it out: key by its spelling.
        bkey = base if ctx.compress else query.question
        pieces = self.pieces.get(bkey)
        if pieces is None:
            if len(self.pieces) >= _MAX_BASES:
                del self.pieces[next(iter(self.pieces))]
            pieces = self.pieces[bkey] = [None] * self._n
        perm = self.perms[p] if self.perms is not None else range(self._n)
        n = self._n
        qwire = query.question[:-4]
        qlen = len(qwire)
        seed = ctx.seed(self.domain, base)
        answers: list[bytes] = []
        extras: list[bytes] = []
        seen: set[object] = set()
        size = raw = 0
        k = ar = 0
        for i in range(min(count, n)):
            idx = perm[(r + i) % n]
            piece = pieces[idx]
            if piece is None:
                piece = pieces[idx] = _Piece(self.units[idx], seed, qwire, qlen)
                ctx.renders += 1
            if seen.isdisjoint(piece.keys):
                more = piece.extra_bytes
                add_size = piece.size + piece.extra_size
                add_raw = piece.raw + piece.extra_raw
                added = len(piece.extras)
            else:
                # Glue shared with an earlier answer is written once.
                fresh = [(x, xr) for key, x, xr in piece.extras if key not in seen]
                more = b"".join(x for x, _ in fresh)
                add_size = piece.size + len(more)
                add_raw = piece.raw + sum(xr for _, xr in fresh)
                added = len(fresh)
            if k and (size + add_size > room or (raw_room >= 0 and raw + add_raw > raw_room)):
                break
            size += add_size
            raw += add_raw
            answers.append(piece.answer)
            extras.append(more)
            seen |= piece.keys
            k += 1
            ar += added
        return k, b"".join(answers) + b"".join(extras), ar

    def _order(self, p: int, r: int, base: int, query: Query, ctx: Context, *, keep: bool) -> Order:
        if self.chains is not None:
            perm: Sequence[int] | None = self.chains[p]
            r = 0
        elif self.perms is not None:
            perm = self.perms[p]
        else:
            perm = None
        order = Order(self.units, perm, r, ctx.seed(self.domain, base), base, query.question[:-4])
        if keep:
            if len(self.orders) >= _MAX_ORDERS:
                del self.orders[next(iter(self.orders))]
            self.orders[(p, r, base if ctx.compress else query.question)] = order
        ctx.renders += 1
        return order


class SoaRecords(Reply):
    """The answer to an SOA question: SOA in Answer, the NS set in Authority, glue in
    Additional (spec §1.13). Trimming drops Authority and Additional whole."""

    __slots__ = ("domain", "ns", "_cache")

    def __init__(self, cell: Cell, domain: Name, ns: Records) -> None:
        super().__init__(cell)
        self.domain = domain
        self.ns = ns
        self._cache: dict[tuple[int, int, int], tuple[bytes, bytes, int, int]] = {}

    def render(self, query: Query, ctx: Context, pick: int = -1) -> bytes:
        base = 12 + len(query.question)
        ns = self.ns
        if ns.perms is None:
            p = r = 0
        else:
            n = ns._n
            p, r = divmod(int(ctx.random() * len(ns.perms) * n), n)
        key = (p, r, base)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._render(key, query, ctx)
        pre, post, nscount, arcount = cached
        serial = _SERIAL.pack(int(ctx.clock()) & 0xFFFFFFFF)
        edns = query.edns
        opt_len = 0 if edns is None else len(ctx.opt(edns))
        room, raw_room, _ = ctx.rooms(query, opt_len)
        if nscount and len(pre) + 4 + len(post) > room:
            # Consul drops the whole Authority section first (spec §1.11).
            return ctx.finish(query, 0, 1, 0, 0, pre + serial + post[:16])
        return ctx.finish(query, 0, 1, nscount, arcount, pre + serial + post)

    def _render(self, key: tuple[int, int, int], query: Query, ctx: Context) -> tuple[bytes, bytes, int, int]:
        p, r, base = key
        qwire = query.question[:-4]
        table = ctx.seed(self.domain, base)
        refresh, retry, expire, minimum = ctx.soa_timers
        pre, timers = _rr.soa_parts(
            self.domain,
            ctx.name("ns." + self.domain.text),
            ctx.name("hostmaster." + self.domain.text),
            ctx.soa_ttl, refresh, retry, expire, minimum, table, base, qwire,
        )
        ns = self.ns
        units = ns.units
        count = min(ns.limit, len(units))
        buf = bytearray(timers)
        at = base + len(pre) + 4  # where `timers` starts in the message
        extras: list[RR] = []
        seen: set[object] = set()
        for i in range(count):
            unit = units[ns.perms[p][(r + i) % len(units)]] if ns.perms else units[i]
            _rr.write_rr(buf, unit.answer, table, at, qwire)
            for extra, xkey in zip(unit.extra, unit.keys):
                if xkey not in seen:
                    seen.add(xkey)
                    extras.append(extra)
        for extra in extras:
            _rr.write_rr(buf, extra, table, at, qwire)
        result = (pre, bytes(buf), count, len(extras))
        if len(self._cache) < _MAX_ORDERS:
            self._cache[key] = result
        ctx.renders += 1
        return result


def nxdomain(cell: Cell, domain: Name, in_question: bool = True) -> Negative:
    return Negative(cell, Rcode.NXDOMAIN, domain, in_question)


def nodata(cell: Cell, domain: Name, in_question: bool = True) -> Negative:
    return Negative(cell, Rcode.NOERROR, domain, in_question)
