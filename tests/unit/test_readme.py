"""README.md stays true to the code: its configuration table lists every key with the default the
code uses, and its Quick start is exactly two commands."""

from __future__ import annotations

import json
import os
import re
from dataclasses import fields

from dnsdisco import config as configmod

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def config_table() -> dict[str, str]:
    section = readme().split("## Configuration reference", 1)[1]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `([a-z0-9_.]+)`(?:, `[a-z_]+`)? \|[^|]*\|([^|]*)\|", line)
        if m:
            rows[m.group(1)] = m.group(2).strip()
    return rows


def every_key() -> set[str]:
    keys = set(configmod._TOP_KEYS) | {"service"}
    keys |= {f"ports.{k}" for k in configmod._PORT_KEYS} | {f"addresses.{k}" for k in configmod._ADDRESS_KEYS}
    keys |= {f"dns_config.{k}" for k in configmod._DNS_KEYS} | {f"dns_config.soa.{k}" for k in configmod._SOA_KEYS}
    keys |= {f"dns_config.rate_limit.{k}" for k in configmod._RATE_LIMIT_KEYS}
    from dnsdisco.sync.upstream import _KEYS as upstream_keys

    keys |= {"upstream"} | {f"upstream.{k}" for k in upstream_keys}
    return keys | {"recursors"}


def test_config_table_lists_exactly_the_keys_the_loader_accepts():
    assert set(config_table()) == every_key()


def test_config_table_defaults_match_the_code():
    from dnsdisco.duration import format_duration, parse_duration

    table = config_table()
    dns = configmod.DnsConfig()
    for f in fields(configmod.DnsConfig):
        if f.name in ("soa", "service_ttl", "rate_limit"):
            continue
        value = getattr(dns, f.name)
        doc = table[f"dns_config.{f.name}"].strip("`")
        if isinstance(value, tuple):
            assert json.loads(doc) == list(value), f.name
        elif isinstance(value, bool):
            assert doc == str(value).lower(), f.name
        elif isinstance(value, float):
            # Long durations are written in hours, as Consul's docs do ("87600h", "24h").
            hours = doc.endswith("h") and doc[:-1].isdigit() and float(doc[:-1]) * 3600 == value
            assert doc == format_duration(value) or hours, (f.name, doc)
        else:
            assert doc == str(value), f.name
    for f in fields(configmod.SoaConfig):
        assert table[f"dns_config.soa.{f.name}"].strip("`") == str(getattr(dns.soa, f.name))
    for f in fields(configmod.RateLimitConfig):
        value, doc = getattr(dns.rate_limit, f.name), table[f"dns_config.rate_limit.{f.name}"].strip("`")
        if value is None:
            assert doc == "responses_per_second", f.name  # BIND: the other rates default to it
        elif isinstance(value, bool):
            assert doc == str(value).lower(), f.name
        elif isinstance(value, float):
            assert doc == format_duration(value), (f.name, doc)
        elif isinstance(value, tuple):
            assert json.loads(doc) == list(value), f.name
        else:
            assert doc == str(value), f.name
    from dnsdisco.sync.upstream import UpstreamConfig

    up = UpstreamConfig()
    for f in fields(UpstreamConfig):
        value, doc = getattr(up, f.name), table[f"upstream.{f.name}"]
        if isinstance(value, bool):
            assert doc == f"`{str(value).lower()}`", f.name
        elif isinstance(value, float):
            assert parse_duration(doc.strip("`")) == value, (f.name, doc)
        elif isinstance(value, tuple):
            assert json.loads(doc.strip("`")) == list(value), f.name
        elif value in ("", None):
            assert doc == "none", f.name
        else:
            assert doc == f"`{value}`", f.name
    cfg = configmod.Config()
    assert table["datacenter"] == f"`{cfg.datacenter}`"
    assert table["ports.http"] == f"`{cfg.http_port}`" and table["ports.dns"] == f"`{cfg.dns_port}`"
    assert table["ports.server"] == f"`{cfg.server_port}`"
    assert table["client_addr"] == f"`{cfg.client_addr}`" and table["domain"] == f"`{cfg.domain}`"


def test_quick_start_is_two_commands_and_ci_runs_the_second():
    quick = readme().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```\n(.*?)```", quick, re.S)
    commands = [line for block in blocks for line in block.splitlines() if line.strip()]
    assert len(commands) == 2, commands
    assert "dnsdisco agent" in commands[0] and "config/services" in commands[0]
    assert "pytest" in commands[1]
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        assert "test-command" in f.read()
