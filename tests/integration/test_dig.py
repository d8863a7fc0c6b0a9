"""End to end through ``dig`` (BIND's client): the EDNS compliance checks of ISC's
"EDNS compatibility dig queries" (anchors.md §4.1; RFC 6891 §7, RFC 8906), plus TCP, against
DnsServer with the real AnswerTable. Skipped only when ``dig`` is not installed (Debian:
bind9-dnsutils). The malformed-OPT cases, which no well-behaved client sends, go over a raw UDP
socket to the same server and are read back with dnspython.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import struct
from dataclasses import dataclass

import dns.message
import dns.rcode
import pytest

from tests.dnstest import answer_table, opt_rr, question, request, running_server, test_config, udp_exchange

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("dig") is None, reason="dig is not installed (bind9-dnsutils)"),
]


@dataclass
class Dig:
    status: str
    flags: set[str]
    opt: str | None  # the "; EDNS: ..." line, None when the reply had no OPT
    answers: list[str]
    text: str

    @property
    def edns_version(self) -> int | None:
        m = re.search(r"version: (\d+)", self.opt or "")
        return int(m.group(1)) if m else None


async def dig(port: int, *args: str) -> Dig:
    proc = await asyncio.create_subprocess_exec(
        "dig", "@127.0.0.1", "-p", str(port), "+tries=1", "+time=2", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    text = out.decode()
    status = re.search(r"status: (\w+)", text)
    flags = re.search(r";; flags: ([a-z ]*);", text)
    opt = re.search(r"^; EDNS: .*$", text, re.M)
    answers = []
    section = ""
    for line in text.splitlines():
        if line.startswith(";; ") and line.endswith("SECTION:"):
            section = line
        elif line and not line.startswith(";") and section.startswith(";; ANSWER"):
            answers.append(" ".join(line.split()))
    assert status, text
    return Dig(status.group(1), set(flags.group(1).split()) if flags else set(), opt.group(0) if opt else None,
               answers, text)


@pytest.fixture
async def port():
    config = test_config()
    async with running_server(answer_table(config), config) as srv:
        yield srv.port


async def test_plain_query(port):
    r = await dig(port, "web.service.consul", "A")
    assert r.status == "NOERROR" and "aa" in r.flags and "ra" not in r.flags
    assert sorted(a.split()[-1] for a in r.answers) == ["10.0.0.1", "10.0.0.2"]
    assert r.edns_version == 0  # dig sends EDNS (with a cookie) by default: OPT v0 back


async def test_tcp(port):
    r = await dig(port, "+tcp", "web.service.consul", "SRV")
    assert r.status == "NOERROR" and len(r.answers) == 2 and "(TCP)" in r.text


async def test_noedns_gets_no_opt(port):
    r = await dig(port, "+noedns", "web.service.consul")
    assert r.status == "NOERROR" and r.opt is None and len(r.answers) == 2


async def test_edns1_gets_badvers_at_version_0(port):
    r = await dig(port, "+edns=1", "+noednsneg", "web.service.consul")
    assert r.status == "BADVERS" and r.edns_version == 0 and not r.answers


async def test_edns100_gets_badvers(port):
    r = await dig(port, "+edns=100", "+noednsneg", "+noad", "web.service.consul")
    assert r.status == "BADVERS" and r.edns_version == 0 and not r.answers


async def test_bufsize_512(port):
    r = await dig(port, "+bufsize=512", "big.service.consul")
    assert r.status == "NOERROR" and r.edns_version == 0 and "udp: 512" in (r.opt or "")
    assert 0 < len(r.answers) <= 3 or "tc" in r.flags  # fits in 512 bytes (or says it did not)
    m = re.search(r"MSG SIZE\s+rcvd: (\d+)", r.text)
    assert m and int(m.group(1)) <= 512


async def test_unknown_option_not_echoed(port):
    r = await dig(port, "+ednsopt=100", "web.service.consul")
    assert r.status == "NOERROR" and r.edns_version == 0
    assert "OPT=100" not in r.text


async def test_unknown_ednsflag_not_echoed(port):
    r = await dig(port, "+ednsflags=0x80", "web.service.consul")
    assert r.status == "NOERROR"
    assert "MBZ" not in (r.opt or "") and "0x0080" not in (r.opt or "")


async def test_dnssec_ok_bit_not_echoed(port):
    # Consul does not echo DO (it does not sign); spec §1.16.
    r = await dig(port, "+dnssec", "web.service.consul")
    assert r.status == "NOERROR" and r.opt is not None and "do" not in r.opt.split("flags:")[1].split(";")[0]


async def test_client_subnet_echoed_with_scope_0(port):
    r = await dig(port, "+subnet=10.1.2.0/24", "web.service.consul")
    assert r.status == "NOERROR"
    assert "CLIENT-SUBNET: 10.1.2.0/24/0" in r.text


async def test_out_of_zone_refused(port):
    r = await dig(port, "example.com")
    assert r.status == "REFUSED" and "aa" not in r.flags and "ra" not in r.flags


async def test_chaos_class_refused(port):
    r = await dig(port, "-c", "CH", "-t", "TXT", "version.bind")
    assert r.status == "REFUSED"


async def test_nxdomain_has_soa(port):
    r = await dig(port, "nosuch.service.consul")
    assert r.status == "NXDOMAIN" and "aa" in r.flags
    assert re.search(r"AUTHORITY SECTION:\n.*\sSOA\s", r.text)


# --- ISC's EDNS compatibility checks, as ISC writes them (SOA of the zone, +norec) -------------
#
# Each line of kb.isc.org's "EDNS Compatibility dig Queries" as a test; the expected outcome is
# the one the page (and RFC 6891 §7) gives for a server that does EDNS version 0 only and does
# not sign (so DO is not echoed: spec §1.16, as Consul).


def soa_lines(r: Dig) -> list[str]:
    return [a for a in r.answers if a.split()[3] == "SOA"]


async def test_isc_plain_dns(port):
    r = await dig(port, "+norec", "+noedns", "soa", "consul")
    assert r.status == "NOERROR" and "aa" in r.flags
    assert r.opt is None  # no OPT in -> no OPT out
    assert len(soa_lines(r)) == 1 and r.answers[0].startswith("consul. ")


async def test_isc_plain_edns(port):
    r = await dig(port, "+norec", "+edns=0", "soa", "consul")
    assert r.status == "NOERROR" and r.edns_version == 0 and len(soa_lines(r)) == 1


async def test_isc_edns_version_1(port):
    r = await dig(port, "+norec", "+edns=1", "+noednsneg", "soa", "consul")
    assert r.status == "BADVERS" and r.edns_version == 0 and not r.answers


async def test_isc_unknown_option(port):
    r = await dig(port, "+norec", "+ednsopt=100", "soa", "consul")
    assert r.status == "NOERROR" and r.edns_version == 0 and len(soa_lines(r)) == 1
    assert "OPT=100" not in r.text  # dig prints an echoed unknown option as "; OPT=100: ..."


async def test_isc_unknown_flag(port):
    r = await dig(port, "+norec", "+ednsflags=0x80", "soa", "consul")
    assert r.status == "NOERROR" and r.edns_version == 0 and len(soa_lines(r)) == 1
    assert r.opt is not None and "MBZ" not in r.opt


async def test_isc_unknown_flag_and_version_1(port):
    r = await dig(port, "+norec", "+ednsflags=0x80", "+edns=1", "+noednsneg", "soa", "consul")
    assert r.status == "BADVERS" and r.edns_version == 0 and not r.answers
    assert r.opt is not None and "MBZ" not in r.opt


async def test_isc_dnssec(port):
    r = await dig(port, "+norec", "+dnssec", "soa", "consul")
    assert r.status == "NOERROR" and r.edns_version == 0 and len(soa_lines(r)) == 1


async def test_isc_tcp(port):
    r = await dig(port, "+norec", "+tcp", "soa", "consul")
    assert r.status == "NOERROR" and "(TCP)" in r.text and len(soa_lines(r)) == 1


@pytest.fixture
async def truncating_port():
    # Consul trims UDP answers silently unless enable_truncate is set; with it (and no answer
    # limit below what 512 bytes hold), an answer too big for the client's buffer sets TC.
    config = test_config(enable_truncate=True, udp_answer_limit=1000)
    async with running_server(answer_table(config), config) as srv:
        yield srv.port


async def test_isc_bufsize_512_big_answer_is_truncated_with_opt(truncating_port):
    # "+ignore": dig shows the truncated UDP reply instead of retrying over TCP.
    r = await dig(truncating_port, "+norec", "+bufsize=512", "+ignore", "big.service.consul", "SRV")
    assert r.status == "NOERROR" and "tc" in r.flags
    assert r.edns_version == 0 and "udp: 512" in (r.opt or "")  # RFC 6891 §7: a TC reply keeps OPT
    m = re.search(r"MSG SIZE\s+rcvd: (\d+)", r.text)
    assert m and int(m.group(1)) <= 512


async def test_isc_bufsize_512_without_ignore_retries_over_tcp(truncating_port):
    r = await dig(truncating_port, "+norec", "+bufsize=512", "big.service.consul", "SRV")
    assert r.status == "NOERROR" and "tc" not in r.flags and "(TCP)" in r.text and len(r.answers) > 3


# --- malformed OPT -> FORMERR (RFC 6891 §6.1.1, §7), over a real socket ---------------------


def _truncated_option() -> bytes:
    good = opt_rr(1232, options=[(100, b"abcdefgh")])
    return good[:-10] + struct.pack("!HH", 100, 50) + b"abcdefgh"  # OPTION-LENGTH past RDATA


def _partial_option_header() -> bytes:
    # RDLENGTH 2: an option code with no OPTION-LENGTH.
    return b"\x00" + struct.pack("!HHIH", 41, 1232, 0, 2) + b"\x00\x64"


MALFORMED_OPT = {
    "two-opts": (request(additional=[opt_rr(1232), opt_rr(1232)]), True),
    "opt-not-at-root": (request(additional=[b"\x01a\x00" + opt_rr(1232)[1:]]), True),
    "opt-in-answer": (request(counts=(1, 1, 0, 0)) + opt_rr(1232), False),
    "opt-in-authority": (request(counts=(1, 0, 1, 0)) + opt_rr(1232), False),
    "truncated-option-data": (request(additional=[_truncated_option()]), True),
    "partial-option-header": (request(additional=[_partial_option_header()]), True),
    "rdata-past-the-end": (request(additional=[opt_rr(1232, options=[(100, b"abcdefgh")])[:-3]]), False),
}


@pytest.mark.parametrize("name", list(MALFORMED_OPT))
async def test_malformed_opt_is_formerr(port, name):
    data, with_opt = MALFORMED_OPT[name]
    out = await udp_exchange(port, data)
    assert out is not None, "a malformed request must be answered (RFC 8906), not dropped"
    msg = dns.message.from_wire(out)
    assert msg.id == 0x1234 and msg.rcode() == dns.rcode.FORMERR and not msg.answer
    assert out[12 : 12 + len(question("web.service.consul."))] == question("web.service.consul.")
    # Where the OPT itself could be read (it is in Additional), the FORMERR carries one
    # (RFC 6891 §7); where it could not, the reply has none rather than a guessed one.
    assert (msg.edns == 0) is with_opt
    if with_opt:
        assert not msg.options  # nothing of the broken OPT is echoed
