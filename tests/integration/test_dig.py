"""End to end through ``dig`` (BIND's client): the EDNS compliance checks of ISC's
"EDNS compatibility dig queries" (anchors.md §4.1), plus TCP, against DnsServer with the real
AnswerTable. Skipped only when ``dig`` is not installed (Debian: bind9-dnsutils).
"""

from __future__ import annotations

import asyncio
import re
import shutil
from dataclasses import dataclass

import pytest

from tests.dnstest import answer_table, running_server, test_config

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
