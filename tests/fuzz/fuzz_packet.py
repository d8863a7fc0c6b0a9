"""Coverage-guided fuzzing (atheris, libFuzzer) of the DNS packet entry point: what
``DnsServer.answer`` does with every datagram or TCP frame, ``wire.parse`` and then the answer
table's ``respond``, over a populated table.

The first input byte picks the case: bit 0 the transport (TCP when set), the next bits one of
the tables of ``tests.unit.test_wire.populated_tables`` (default config; alt domain, recursors
and truncation; no compression, an A limit and only passing). The rest is the request. No
exception may escape, and every reply must parse with dnspython, echo the ID and the question as
sent, copy the opcode, fit the client's size on UDP, and carry an OPT iff the request did (the
checks of ``tests.unit.test_wire.check_answer_path``, shared with the Hypothesis tests).

Run it through ``tests/fuzz/run.py`` (bounded time, seed corpus in ``corpus/packet``), or by
hand with libFuzzer flags: ``python3 tests/fuzz/fuzz_packet.py -max_total_time=600 DIR
tests/fuzz/corpus/packet``.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import atheris  # noqa: E402

with atheris.instrument_imports(include=["dnsdisco"]):
    import dnsdisco.dns.render  # noqa: F401
    import dnsdisco.dns.table  # noqa: F401
    import dnsdisco.dns.wire  # noqa: F401

from tests.unit.test_wire import TABLES, check_answer_path  # noqa: E402


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode = data[0]
    check_answer_path(TABLES[(mode >> 1) % len(TABLES)], data[1:], bool(mode & 1))


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
