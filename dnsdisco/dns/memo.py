"""Finished replies keyed by the request bytes: the transport's shortcut for repeated questions.

A cached answer (:mod:`dnsdisco.dns.render`) still costs a parse of the request, a lookup, a
window choice and a header pack per query, about 4 µs of Python on the hot path. But a given
request (everything after its ID: flags, question as spelled, EDNS payload and options) can only
ever get one of a small, known set of replies: the reply's
:meth:`~dnsdisco.dns.render.Reply.choices`, one per shuffle outcome. So the first time each
outcome is drawn its bytes (minus the ID) are kept here, and later the server answers the same
request straight from the datagram: one dict lookup on ``data[2:]``, one random index, the ID
spliced back in. Shuffling keeps exactly the odds :meth:`Reply.render` gives, because the
outcome is drawn the same way, only by us.

What may be kept: replies that depend on nothing but the request and the catalog (positive
answers and fixed errors; not NXDOMAIN/NODATA or SOA, whose serial is the clock, nor replies
that chase a CNAME through the recursors). Each entry holds the validity :class:`Cell` of the
answer it was cut from, so a catalog change drops it the same way it drops the answer; the
table clears the whole memo on reconfiguration and when a datacenter's staleness flips.

Bounds: at most :data:`MEMO_CHOICES` outcomes per request (larger shuffles, e.g. 3 answers of a
5,000-instance service, are left to the renderer's own caches), replies up to
:data:`MEMO_REPLY_MAX` bytes (large TCP replies cost the kernel far more than the render), and
:data:`MEMO_BYTES` in all, past which the memo starts again empty. A flood of distinct
spellings (0x20 case randomization, random names) therefore costs bounded memory and at worst
the renderer's speed.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from dnsdisco.dns.message import Query
from dnsdisco.dns.render import Cell, Context, Reply

__all__ = ["MEMO_BYTES", "MEMO_CHOICES", "MEMO_REPLY_MAX", "Memo", "ReplyMemo"]

MEMO_CHOICES = 32
MEMO_REPLY_MAX = 1232  # the DNS Flag Day 2020 EDNS size: every UDP reply resolvers ask for
MEMO_BYTES = 32 * 1024 * 1024
_ENTRY_OVERHEAD = 200  # dict slot, Memo, list: a rough per-entry cost for the byte budget

_ID = struct.Struct("!H")


class Memo:
    """The replies known so far for one request: ``tails[pick]`` is the reply to outcome
    *pick* without its 2-byte ID, or None until that outcome is first drawn."""

    __slots__ = ("cell", "qtype", "tails")

    def __init__(self, cell: Cell, qtype: int, choices: int) -> None:
        self.cell = cell
        self.qtype = qtype
        self.tails: list[bytes | None] = [None] * choices


class ReplyMemo:
    """Two maps of ``request[2:] -> Memo``, one per transport (their size limits differ).

    The server reads ``udp``/``tcp`` inline on its hot path; :meth:`answer` fills them.
    """

    __slots__ = ("udp", "tcp", "size")

    def __init__(self) -> None:
        self.udp: dict[bytes, Memo] = {}
        self.tcp: dict[bytes, Memo] = {}
        self.size = 0  # bytes held, roughly

    def clear(self) -> None:
        # Cleared in place: the server holds references to both maps.
        self.udp.clear()
        self.tcp.clear()
        self.size = 0

    def answer(self, key: bytes, query: Query, reply: Reply, ctx: Context, random: Callable[[], float]) -> bytes:
        """*reply* rendered for *query* (whose bytes after the ID are *key*), kept for next
        time when it may be."""
        choices = reply.choices(query, ctx)
        if not 0 < choices <= MEMO_CHOICES:
            return reply.render(query, ctx)
        memo = self.tcp if query.tcp else self.udp
        entry = memo.get(key)
        if entry is None or entry.cell is not reply.cell or len(entry.tails) != choices:
            if self.size > MEMO_BYTES:
                self.clear()
            entry = memo[key] = Memo(reply.cell, query.qtype, choices)
            self.size += len(key) + _ENTRY_OVERHEAD
        pick = int(random() * choices)
        tail = entry.tails[pick]
        if tail is not None:
            return _ID.pack(query.id) + tail
        out = reply.render(query, ctx, pick)
        if len(out) <= MEMO_REPLY_MAX:
            entry.tails[pick] = out[2:]
            self.size += len(out)
        return out
