"""``/metrics`` of a real agent after real DNS traffic: the counters move by what was sent.

One in-process agent (embedded catalog, config-dir services, a fake recursor on loopback, a
fresh CollectorRegistry) is asked over UDP and TCP with dnspython, plus a malformed datagram
and names outside the domain; the scrape is parsed with prometheus_client's own parser and
compared with a scrape taken before the traffic.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator

import aiohttp
import dns.message
import dns.query
import dns.rcode
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from dnsdisco import config as configmod
from dnsdisco.app import Agent
from dnsdisco.metrics import Metrics
from tests.integration.test_recursor import FakeUpstream

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    up = await FakeUpstream("answer", ip="192.0.2.7").start()
    try:
        yield up
    finally:
        await up.stop()


@pytest.fixture
async def agent(tmp_path, upstream) -> AsyncIterator[Agent]:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "web.json").write_text(json.dumps({"services": [
        {"id": "web-1", "name": "web", "address": "10.0.0.1", "port": 80},
        {"id": "web-2", "name": "web", "address": "10.0.0.2", "port": 80},
    ]}))
    cfg = configmod.load(dirs=[str(conf)], dev=True, overrides={
        "node_name": "node1", "ports": {"http": 0, "dns": 0}, "recursors": [upstream.addr]})
    a = Agent(cfg, metrics=Metrics(CollectorRegistry(), datacenter=cfg.datacenter))
    await a.start()
    try:
        yield a
    finally:
        await a.stop()


async def scrape(agent: Agent, path: str = "/metrics") -> tuple[str, Samples]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{agent.http_port}{path}") as r:
            assert r.status == 200
            content_type = r.headers["Content-Type"]
            text = await r.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return content_type, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def ask(port: int, name: str, rdtype: str = "A", *, tcp: bool = False) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    if tcp:
        return dns.query.tcp(q, "127.0.0.1", port=port, timeout=3)
    return dns.query.udp(q, "127.0.0.1", port=port, timeout=3)


async def test_dns_traffic_moves_the_counters(agent, upstream):
    content_type, before = await scrape(agent)
    assert content_type.startswith("text/plain; version=")
    port = agent.dns_port

    def traffic() -> None:
        for _ in range(3):
            assert ask(port, "web.service.consul").rcode() == dns.rcode.NOERROR
        assert ask(port, "web.service.consul", "SRV", tcp=True).rcode() == dns.rcode.NOERROR
        assert ask(port, "nope.service.consul").rcode() == dns.rcode.NXDOMAIN
        assert ask(port, "web.service.consul", "CAA").rcode() == dns.rcode.NOERROR  # NODATA, type "other"
        # Out of the domain: forwarded once, then answered from the recursor cache.
        assert ask(port, "www.example.org").rcode() == dns.rcode.NOERROR
        assert ask(port, "www.example.org").rcode() == dns.rcode.NOERROR
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"\x12\x34\x01", ("127.0.0.1", port))  # shorter than a header: dropped
        assert ask(port, "web.service.consul").rcode() == dns.rcode.NOERROR  # after the junk

    await asyncio.to_thread(traffic)
    _, after = await scrape(agent)

    assert moved(before, after, "dnsdisco_dns_requests_total", proto="udp", family="1", type="A") == 7
    assert moved(before, after, "dnsdisco_dns_requests_total", proto="tcp", family="1", type="SRV") == 1
    assert moved(before, after, "dnsdisco_dns_requests_total", proto="udp", family="1", type="other") == 1
    assert moved(before, after, "dnsdisco_dns_responses_total", rcode="NOERROR", source="catalog") == 6
    assert moved(before, after, "dnsdisco_dns_responses_total", rcode="NXDOMAIN", source="catalog") == 1
    assert moved(before, after, "dnsdisco_dns_responses_total", rcode="NOERROR", source="forward") == 1
    assert moved(before, after, "dnsdisco_dns_responses_total", rcode="NOERROR", source="cache") == 1
    assert moved(before, after, "dnsdisco_dns_dropped_total", reason="malformed") == 1
    assert moved(before, after, "dnsdisco_dns_response_size_bytes_count", proto="udp") == 8
    assert moved(before, after, "dnsdisco_dns_response_size_bytes_count", proto="tcp") == 1
    # The first request of each batch read from the socket is timed: here most of them, but a
    # query sent the moment the previous reply left can join that reply's batch.
    timed = sum(moved(before, after, "dnsdisco_dns_request_duration_seconds_count", type=t)
                for t in ("A", "SRV", "other"))
    assert 1 <= timed <= 9
    assert moved(before, after, "dnsdisco_dns_request_duration_seconds_sum", type="A") > 0

    to = upstream.addr
    assert moved(before, after, "dnsdisco_forward_request_duration_seconds_count", to=to, rcode="NOERROR") == 1
    assert value(after, "dnsdisco_forward_healthy", to=to) == 1
    assert value(after, "dnsdisco_forward_failures_total", to=to) == 0
    assert moved(before, after, "dnsdisco_forward_cache_hits_total") == 1
    assert moved(before, after, "dnsdisco_forward_cache_misses_total") == 1
    assert value(after, "dnsdisco_forward_cache_entries") == 1
    assert value(after, "dnsdisco_dns_panics_total") == 0


async def test_catalog_gauges_follow_registrations(agent):
    _, before = await scrape(agent)
    # web (2 instances) and the agent's own `consul` service.
    assert value(before, "dnsdisco_catalog_services") == 2
    assert value(before, "dnsdisco_catalog_instances") == 3
    assert value(before, "dnsdisco_catalog_index") == agent.store.index
    assert value(before, "dnsdisco_catalog_sync_last_success_timestamp_seconds") > 1.7e9
    assert value(before, "dnsdisco_catalog_sync_errors_total") == 0
    async with aiohttp.ClientSession() as http:
        body = {"Name": "api", "ID": "api-1", "Address": "10.0.1.1", "Port": 9000}
        async with http.put(f"http://127.0.0.1:{agent.http_port}/v1/agent/service/register", json=body) as r:
            assert r.status == 200
    _, after = await scrape(agent)
    assert value(after, "dnsdisco_catalog_services") == 3
    assert value(after, "dnsdisco_catalog_instances") == 4
    assert value(after, "dnsdisco_catalog_index") > value(before, "dnsdisco_catalog_index")


async def test_consul_metrics_endpoint_and_build_info(agent):
    content_type, samples = await scrape(agent, "/v1/agent/metrics?format=prometheus")
    assert content_type.startswith("text/plain; version=")
    build = [labels for (name, labels) in samples if name == "dnsdisco_build_info"]
    assert len(build) == 1 and {k for k, _ in build[0]} == {"version", "python"}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{agent.http_port}/v1/agent/metrics") as r:
            assert r.status == 200
            body = await r.json()
    assert {"Gauges", "Counters", "Samples"} <= set(body)
    assert any(g["Name"] == "dnsdisco_catalog_services" for g in body["Gauges"])


async def test_health_and_ready(agent):
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{agent.http_port}/health") as r:
            assert r.status == 200
        async with http.get(f"http://127.0.0.1:{agent.http_port}/ready") as r:
            assert r.status == 200 and "ready" in await r.text()
    # Before the first full load, the table is not synced: /ready says so with 503.
    agent.table = type(agent.table)(agent.config)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{agent.http_port}/ready") as r:
            assert r.status == 503
            assert "not been loaded" in await r.text()
