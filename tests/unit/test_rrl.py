"""Response rate limiting (dnsdisco.dns.rrl): BIND's token-bucket accounting, client prefixes,
response identities, slip, exemptions, log-only and the bounded table, on an injected clock;
and the ``dns_config.rate_limit`` configuration keys."""

from __future__ import annotations

import json

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest

from dnsdisco import config as configmod
from dnsdisco.config import RateLimitConfig
from dnsdisco.dns.rrl import Kind, RateLimitCounters, RateLimiter, Verdict, client_prefix, slip_reply
from dnsdisco.errors import ConfigError


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(**kw) -> tuple[RateLimiter, Clock]:  # type: ignore[no-untyped-def]
    clock = Clock()
    cfg = RateLimitConfig(**kw)
    return RateLimiter(cfg, ("consul.", "alt.example."), clock=clock), clock


def request(name: str, rdtype: str = "A", *, edns: bool = False) -> bytes:
    q = dns.message.make_query(name, rdtype, use_edns=0 if edns else None)
    q.id = 4242
    return q.to_wire()


def reply(req: bytes, rcode: int = 0, answers: int = 1) -> bytes:
    r = dns.message.make_response(dns.message.from_wire(req))
    r.set_rcode(rcode)
    for i in range(answers):
        r.answer.append(dns.rrset.from_text(r.question[0].name, 0, "IN", "A", f"10.0.0.{i + 1}"))
    r.flags |= dns.flags.AA
    return r.to_wire()


def run(rl: RateLimiter, ip: str, rep: bytes, n: int) -> list[bytes | None]:
    return [rl.filter(ip, rep) for _ in range(n)]


# --- accounting -----------------------------------------------------------------------------


def test_a_burst_gets_rate_answers_then_drops_and_slips_every_nth():
    rl, clock = limiter(responses_per_second=5, slip=2)
    req = request("web.service.consul.")
    rep = reply(req)
    out = run(rl, "192.0.2.7", rep, 15)
    assert out[:5] == [rep] * 5
    limited = out[5:]
    assert limited.count(None) == 5
    slipped = [r for r in limited if r is not None]
    assert len(slipped) == 5
    # every second limited reply is the truncated one: drop, slip, drop, slip, ...
    assert [r is None for r in limited] == [True, False] * 5
    assert rl.counters.dropped == 5 and rl.counters.slipped == 5 and rl.counters.logged == 0


def test_credit_comes_back_at_the_rate_and_is_capped_at_one_second():
    rl, clock = limiter(responses_per_second=4, slip=0)
    rep = reply(request("web.service.consul."))
    assert run(rl, "192.0.2.7", rep, 4) == [rep] * 4
    assert rl.filter("192.0.2.7", rep) is None  # balance now -1
    clock.now += 0.5  # +2 credits: -1 -> 1
    assert rl.filter("192.0.2.7", rep) == rep
    assert rl.filter("192.0.2.7", rep) is None
    clock.now += 10  # well past one second's worth: capped at +4, not +40
    assert run(rl, "192.0.2.7", rep, 6).count(rep) == 4


def test_a_flood_is_penalised_for_about_the_window_after_it_stops():
    rl, clock = limiter(responses_per_second=2, window=10.0, slip=0)
    rep = reply(request("web.service.consul."))
    for _ in range(100):  # 10 s at 100 qps: the account sinks to its floor, -window x rate
        run(rl, "192.0.2.7", rep, 10)
        clock.now += 0.1
    assert rl.table[next(iter(rl.table))][0] == pytest.approx(-20.0, abs=2.5)
    clock.now += 8.0  # silence shorter than the window: still negative
    assert rl.filter("192.0.2.7", rep) is None
    clock.now += 11.0  # and longer than the window (measured from the last reply): a fresh account
    assert rl.filter("192.0.2.7", rep) == rep


def test_the_client_prefix_shares_an_account_and_other_clients_are_untouched():
    rl, _ = limiter(responses_per_second=3, slip=0)
    rep = reply(request("web.service.consul."))
    # 192.0.2.0/24 is one account, however the flood spreads its source addresses
    out = [rl.filter(f"192.0.2.{i}", rep) for i in range(1, 11)]
    assert out.count(rep) == 3
    # another /24 is answered in full at the same moment
    assert run(rl, "198.51.100.9", rep, 3) == [rep] * 3


def test_identities_positive_by_name_and_type_negative_by_zone_errors_by_client():
    rl, _ = limiter(responses_per_second=1, slip=0)
    ip = "192.0.2.7"
    a = request("web.service.consul.")
    srv = request("web.service.consul.", "SRV")
    assert rl.filter(ip, reply(a)) is not None
    assert rl.filter(ip, reply(srv)) is not None  # another type: another account
    assert rl.filter(ip, reply(a)) is None
    # names compare case-insensitively (0x20 randomisation must not buy fresh accounts)
    upper = reply(request("WEB.Service.CONSUL."))
    assert b"WEB" in upper and rl.filter(ip, upper) is None
    # NXDOMAIN: random names in one zone share the zone's account
    nx1, nx2 = request("x1.service.consul."), request("x2.service.consul.")
    assert rl.filter(ip, reply(nx1, 3, 0)) is not None
    assert rl.filter(ip, reply(nx2, 3, 0)) is None
    # ... and the alt domain is a zone of its own
    alt = request("x3.service.alt.example.")
    assert rl.filter(ip, reply(alt, 3, 0)) is not None
    # NODATA is its own class, also per zone
    nd1, nd2 = request("web.service.consul.", "TXT"), request("db.service.consul.", "TXT")
    assert rl.filter(ip, reply(nd1, 0, 0)) is not None
    assert rl.filter(ip, reply(nd2, 0, 0)) is None
    # errors: one account per client, whatever the name
    e1, e2 = request("example.org."), request("example.net.")
    assert rl.filter(ip, reply(e1, 5, 0)) is not None
    assert rl.filter(ip, reply(e2, 2, 0)) is None
    # names outside our zones: NXDOMAIN by name
    o1, o2 = request("a.example.org."), request("b.example.org.")
    assert rl.filter(ip, reply(o1, 3, 0)) is not None
    assert rl.filter(ip, reply(o2, 3, 0)) is not None


def test_identity_reads_the_class_from_the_reply_bytes():
    rl, _ = limiter(responses_per_second=1)
    req = request("web.service.consul.", edns=True)
    assert rl.identity(reply(req))[0] == Kind.RESPONSE
    assert rl.identity(reply(req, 0, 0)) == (Kind.NODATA, b"\x06consul\x00")
    assert rl.identity(reply(req, 3, 0)) == (Kind.NXDOMAIN, b"\x06consul\x00")
    assert rl.identity(reply(req, 5, 0)) == (Kind.ERROR, b"")
    # the EDNS OPT after the question is not part of the key (its options could vary)
    kind, name = rl.identity(reply(req))
    assert name == b"\x03web\x07service\x06consul\x00\x00\x01\x00\x01"
    # no question (a FORMERR to a header-only request): an error identity, never an exception
    assert rl.identity(b"\x00\x01\x81\x01" + bytes(8))[0] == Kind.ERROR


def test_per_class_rates_default_to_responses_per_second_and_zero_means_unlimited():
    rl, _ = limiter(responses_per_second=2)
    assert rl.rates == (2.0, 2.0, 2.0, 2.0)
    rl, _ = limiter(responses_per_second=0, errors_per_second=1, slip=0)
    assert rl.enabled
    ok = request("web.service.consul.")
    assert run(rl, "192.0.2.7", reply(ok), 50).count(None) == 0
    bad = request("example.org.")
    assert run(rl, "192.0.2.7", reply(bad, 5, 0), 5).count(None) == 4
    assert not RateLimiter(RateLimitConfig()).enabled


# --- slip -----------------------------------------------------------------------------------


def test_slip_reply_is_an_empty_truncated_reply_with_the_question():
    req = request("web.service.consul.", edns=True)
    rep = reply(req, 0, 3)
    out = dns.message.from_wire(slip_reply(rep))
    assert out.id == 4242 and out.flags & dns.flags.TC and out.flags & dns.flags.QR
    assert out.rcode() == dns.rcode.NOERROR
    assert str(out.question[0].name) == "web.service.consul." and not out.answer and not out.additional
    assert len(slip_reply(rep)) < len(rep)
    nx = reply(req, 3, 0)
    assert dns.message.from_wire(slip_reply(nx)).rcode() == dns.rcode.NXDOMAIN
    # errors are "leaked" unchanged: they are as small as a reply gets
    refused = reply(req, 5, 0)
    assert slip_reply(refused) is refused


@pytest.mark.parametrize("slip,pattern", [(0, "DDDDDD"), (1, "SSSSSS"), (3, "DDSDDS")])
def test_slip_setting(slip, pattern):
    rl, _ = limiter(responses_per_second=1, slip=slip)
    verdicts = [rl.check("192.0.2.1", Kind.RESPONSE, b"k", 0.0) for _ in range(7)][1:]
    assert "".join("S" if v is Verdict.SLIP else "D" for v in verdicts) == pattern


# --- exemptions, log-only, table bound ------------------------------------------------------


def test_exempt_clients_and_log_only():
    rl, _ = limiter(responses_per_second=1, exempt_clients=("192.0.2.128/25",), slip=0)
    rep = reply(request("web.service.consul."))
    assert run(rl, "192.0.2.200", rep, 10) == [rep] * 10
    assert run(rl, "::ffff:192.0.2.201", rep, 3) == [rep] * 3  # v4-mapped counts as v4
    assert len(rl.table) == 0  # exempt replies are not accounted at all (as BIND)
    # Same /24, not exempt: limited, from a fresh account (the exempt replies did not drain it).
    assert run(rl, "192.0.2.10", rep, 3) == [rep, None, None]
    rl, _ = limiter(responses_per_second=1, log_only=True)
    assert run(rl, "192.0.2.7", rep, 10) == [rep] * 10
    assert rl.counters.logged == 9 and rl.counters.dropped == rl.counters.slipped == 0


def test_the_table_is_bounded_and_evicts_the_least_recently_used():
    rl, clock = limiter(responses_per_second=1, max_table_size=3, slip=0)
    for i in range(3):
        assert rl.check(f"10.0.{i}.1", Kind.RESPONSE, b"k", clock.now) is Verdict.ALLOW
    assert rl.check("10.0.0.1", Kind.RESPONSE, b"k", clock.now) is Verdict.DROP  # 10.0.0 is now newest
    rl.check("10.0.9.1", Kind.RESPONSE, b"k", clock.now)  # evicts 10.0.1, the least recent
    assert len(rl.table) == 3
    assert [k[0] for k in rl.table] == ["10.0.2", "10.0.0", "10.0.9"]
    for i in range(1000):
        rl.check(f"10.{i // 256}.{i % 256}.1", Kind.RESPONSE, b"k", clock.now)
    assert len(rl.table) == 3


def test_counters_outlive_a_limiter():
    counters = RateLimitCounters()
    cfg = RateLimitConfig(responses_per_second=1, slip=0)
    rep = reply(request("web.service.consul."))
    for _ in range(2):
        rl = RateLimiter(cfg, counters=counters, clock=lambda: 0.0)
        run(rl, "192.0.2.7", rep, 3)
    assert counters.dropped == 4


# --- prefixes -------------------------------------------------------------------------------


def test_client_prefix():
    assert client_prefix("192.0.2.77", 24, 56) == "192.0.2"
    assert client_prefix("192.0.2.77", 32, 56) == "192.0.2.77"
    assert client_prefix("192.0.2.77", 16, 56) == client_prefix("192.0.9.1", 16, 56)
    assert client_prefix("192.0.2.77", 16, 56) != client_prefix("192.1.2.77", 16, 56)
    assert client_prefix("192.0.2.77", 20, 56) == client_prefix("192.0.15.1", 20, 56)
    assert client_prefix("192.0.2.77", 20, 56) != client_prefix("192.0.16.1", 20, 56)
    assert client_prefix("::ffff:192.0.2.77", 24, 56) == "192.0.2"
    a = client_prefix("2001:db8:1:2ff::1", 24, 56)
    assert a == client_prefix("2001:db8:1:200::9", 24, 56)
    assert a != client_prefix("2001:db8:1:300::1", 24, 56)
    assert client_prefix("2001:db8::1", 24, 60) == client_prefix("2001:db8:0:f::1", 24, 60)
    assert client_prefix("2001:db8::1", 24, 60) != client_prefix("2001:db8:0:10::1", 24, 60)
    assert client_prefix("fe80::1%eth0", 24, 64) == client_prefix("fe80::2", 24, 64)
    # an IPv4 /16 and an IPv6 /16 with the same bits are different networks
    assert client_prefix("32.1.0.1", 16, 16) != client_prefix("2001::1", 16, 16)


# --- configuration --------------------------------------------------------------------------


def test_rate_limit_config_keys(tmp_path):
    path = tmp_path / "rrl.json"
    path.write_text(json.dumps({"dns_config": {"rate_limit": {
        "responses_per_second": 5, "nxdomains_per_second": 2, "errors_per_second": 1,
        "nodata_per_second": 3, "window": "30s", "slip": 3, "ipv4_prefix_length": 32,
        "ipv6_prefix_length": 64, "exempt_clients": ["10.0.0.1", "fd00::/8"], "log_only": True,
        "max_table_size": 100}}}))
    cfg = configmod.load([str(path)], dev=True).dns_config.rate_limit
    assert cfg == RateLimitConfig(5, 3, 2, 1, 30.0, 3, 32, 64, ("10.0.0.1/32", "fd00::/8"), True, 100)
    assert cfg.enabled
    default = configmod.load(dev=True).dns_config.rate_limit
    assert default == RateLimitConfig() and not default.enabled


def test_rate_limit_later_files_override_single_keys(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"dns_config": {"rate_limit": {"responses_per_second": 5, "slip": 0}}}))
    b.write_text(json.dumps({"dns_config": {"rate_limit": {"slip": 4}}}))
    cfg = configmod.load([str(a), str(b)], dev=True).dns_config.rate_limit
    assert (cfg.responses_per_second, cfg.slip) == (5, 4)


@pytest.mark.parametrize("raw,key,message", [
    ({"slip": 11}, "slip", "between 0 and 10"),
    ({"window": "0s"}, "window", "between 1s and 1h"),
    ({"window": "2h"}, "window", "between 1s and 1h"),
    ({"window": 15}, "window", "duration string"),
    ({"responses_per_second": -1}, "responses_per_second", "between 0 and 1000"),
    ({"ipv4_prefix_length": 33}, "ipv4_prefix_length", "between 0 and 32"),
    ({"exempt_clients": "10.0.0.0/8"}, "exempt_clients", "list of CIDRs"),
    ({"exempt_clients": ["nope"]}, "exempt_clients", "not a CIDR"),
    ({"log_only": "yes"}, "log_only", "true or false"),
    ({"max_table_size": 0}, "max_table_size", "between 1"),
    ({"per_second": 1}, "per_second", "unknown key"),
])
def test_rate_limit_config_errors_name_the_key(tmp_path, raw, key, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"dns_config": {"rate_limit": raw}}))
    with pytest.raises(ConfigError) as e:
        configmod.load([str(path)], dev=True)
    assert f"'dns_config.rate_limit.{key}'" in str(e.value) and message in str(e.value)
    assert str(path) in str(e.value)


def test_rate_limit_must_be_an_object(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"dns_config": {"rate_limit": 5}}))
    with pytest.raises(ConfigError, match="dns_config.rate_limit"):
        configmod.load([str(path)], dev=True)


def test_a_zero_byte_inside_a_label_does_not_buy_a_fresh_account():
    """NXDOMAIN replies are accounted per zone; a name with a zero byte inside a label
    (rnd.\\000x.service.consul) must still be seen as in the zone, not cut at that byte."""
    rl, _ = limiter(responses_per_second=5, slip=0)
    out = []
    for i in range(50):
        name = b"".join(bytes([len(p)]) + p for p in (f"r{i}".encode(), b"\x00x", b"service", b"consul")) + b"\x00"
        query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + name + b"\x00\x01\x00\x01"
        nx = query[:2] + b"\x81\x83" + query[4:]  # the same message as an NXDOMAIN reply
        assert rl.identity(nx)[1] == b"\x06consul\x00"
        out.append(rl.filter("192.0.2.7", nx))
    assert out.count(None) == 45  # one zone account: 5 go, the rest are dropped


def test_addr_answers_share_one_account_per_form():
    """HEX.addr.consul answers for any address: a flood of distinct HEX names is one account."""
    rl, _ = limiter(responses_per_second=5, slip=0)
    out = []
    for i in range(40):
        name = f"0a{i:06x}.addr.consul."
        rep = reply(request(name))
        rep = rep[:6] + b"\x00\x01" + rep[8:]  # one answer: a positive reply
        out.append(rl.filter("192.0.2.7", rep))
    assert out.count(None) == 35
