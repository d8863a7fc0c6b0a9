"""Every exported metric follows Prometheus's naming rules and the README documents it; the plain
counters behind them (DnsStats, FixedHistogram, CatalogCounts) stay bounded and export the same
totals however they are stored.

The lint is CoreDNS's ``test/metric_naming_test.go`` idea (promlint) written out for our rules
(anchors.md §5): one ``dnsdisco_`` prefix, snake_case, ``_total`` on counters and only on them,
base units (``_seconds``, ``_bytes``), help text on every family, no unbounded label.
"""

from __future__ import annotations

import os
import re

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from dnsdisco.catalog.model import CatalogDelta, Node, Service, ServiceEntry
from dnsdisco.config import Config
from dnsdisco.dns.server import REPLY_KEYS_MAX, DnsServer, DnsStats, reply_key
from dnsdisco.forward import Forwarder
from dnsdisco.metrics import (
    DURATION_BUCKETS,
    METRICS,
    SIZE_BUCKETS,
    TYPE_LABELS,
    CatalogCounts,
    FixedHistogram,
    Metrics,
    rcode_label,
    type_label,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NAME = re.compile(r"^dnsdisco_[a-z][a-z0-9]*(_[a-z0-9]+)+$")
LABEL = re.compile(r"^[a-z][a-z0-9_]*$")
# Labels whose values would be unbounded (one series per client or per name).
FORBIDDEN_LABELS = {"name", "qname", "client", "ip", "addr", "address", "node", "service", "id"}
# Units spelled other than in base units.
NON_BASE_UNITS = ("_ms", "_milliseconds", "_microseconds", "_us", "_kb", "_kilobytes", "_mb", "_minutes", "_hours")


class _Table:
    """Answers nothing: enough for a DnsServer whose counters are filled by hand."""

    def respond(self, query):  # type: ignore[no-untyped-def]
        return None


def metrics_with_sources() -> Metrics:
    metrics = Metrics(CollectorRegistry(), process=True)
    config = Config(client_addr="127.0.0.1", dns_port=0, recursors=("192.0.2.53:53",))
    server = DnsServer(config, _Table(), metrics=metrics)
    stats = server.stats
    stats.count("udp", "catalog", 1, _reply(0, 60))
    stats.count("tcp", "server", 0, _reply(1, 12))
    stats.count_forwarded("udp", 28)
    stats.count("udp", "forward", 28, _reply(0, 90))
    stats.observe(1, 0.00002)
    forwarder = Forwarder(config)
    forwarder.stats.observe_upstream("192.0.2.53:53", 0, 0.004)
    forwarder.stats.upstream_failed("192.0.2.53:53")
    metrics.watch_forwarder(forwarder)
    return metrics


def _reply(rcode: int, size: int) -> bytes:
    return b"\x00\x00\x81" + bytes([0x80 | rcode]) + bytes(size - 4)


def collected(metrics: Metrics):  # type: ignore[no-untyped-def]
    return [f for f in metrics.registry.collect() if f.name.startswith("dnsdisco_")]


def test_every_metric_name_follows_the_naming_rules():
    families = collected(metrics_with_sources())
    assert families
    for family in families:
        info = {m.name: m for m in METRICS}[family.name + ("_total" if family.type == "counter" else "")]
        name = info.name
        assert NAME.match(name), name
        assert "__" not in name, name
        assert family.documentation.strip(), f"{name}: no help text"
        assert family.documentation.endswith("."), f"{name}: help text should be a sentence"
        if family.type == "counter":
            assert name.endswith("_total"), name
        else:
            assert not name.endswith("_total"), f"{name}: only counters end in _total"
        assert not name.endswith(NON_BASE_UNITS) and not any(u + "_" in name for u in NON_BASE_UNITS), name
        if "duration" in name or "timestamp" in name:
            assert name.endswith("_seconds"), f"{name}: time is in seconds"
        if "size" in name:
            assert name.endswith("_bytes"), f"{name}: sizes are in bytes"
        if name.endswith("_info"):
            assert family.type == "gauge"
        for sample in family.samples:
            for label in sample.labels:
                assert LABEL.match(label), (name, label)
                assert label not in FORBIDDEN_LABELS, (name, label)
                assert label == "le" or label in info.labels, (name, label)


def test_every_declared_metric_is_exported_and_the_registry_has_nothing_else_of_ours():
    metrics = metrics_with_sources()
    names = {f.name + ("_total" if f.type == "counter" else "") for f in collected(metrics)}
    assert names == {m.name for m in METRICS}
    others = {f.name for f in metrics.registry.collect() if not f.name.startswith("dnsdisco_")}
    # prometheus_client's standard process and runtime collectors, nothing else.
    assert all(n.startswith(("process_", "python_")) for n in others), others


def test_the_exposition_parses_and_a_fresh_registry_per_instance():
    first = metrics_with_sources()
    text = first.exposition().decode()
    parsed = {f.name for f in text_string_to_metric_families(text)}
    assert "dnsdisco_dns_requests" in parsed and "dnsdisco_build_info" in parsed
    # Two agents in one process (tests) do not collide: each has its own registry.
    second = Metrics(CollectorRegistry())
    assert second.registry is not first.registry
    Metrics()  # and the default is a fresh registry too, never prometheus_client's global one


def test_labels_are_bounded():
    assert len(TYPE_LABELS) == 19
    assert {type_label(t) for t in range(65536)} == set(TYPE_LABELS)
    assert type_label(33) == "SRV" and type_label(257) == "other" and type_label(0) == "other"
    assert rcode_label(3) == "NXDOMAIN" and rcode_label(16) == "BADVERS" and rcode_label(12) == "12"


def test_readme_metrics_table_matches_the_registry():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        section = f.read().split("\n## Metrics", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `(dnsdisco_[a-z0-9_]+)` \| (counter|gauge|histogram) \| ([^|]*)\|([^|]+)\|", line)
        if m:
            labels = tuple(re.findall(r"`([a-z_]+)`", m.group(3)))
            rows[m.group(1)] = (m.group(2), labels, m.group(4).strip())
    assert set(rows) == {m.name for m in METRICS}
    for info in METRICS:
        kind, labels, meaning = rows[info.name]
        assert kind == info.kind, info.name
        assert labels == info.labels, info.name
        assert meaning, info.name


# -- the counting side -------------------------------------------------------------------------


def test_fixed_histogram_uses_le_buckets_and_exports_cumulative_counts():
    h = FixedHistogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 7.0):
        h.observe(v)
    assert h.buckets() == [("0.1", 2), ("1.0", 4), ("+Inf", 5)]
    assert h.count == 5 and h.sum == pytest.approx(8.65)


def test_reply_keys_carry_type_rcode_and_size():
    stats = DnsStats()
    stats.count("udp", "catalog", 33, _reply(3, 120))
    stats.count("udp", "catalog", 33, _reply(3, 120))
    assert list(stats.replies()) == [("udp", "catalog", 33, 3, 120, 2)]
    # BADVERS lives partly in the OPT record (RFC 6891): header rcode 0, extended bits 1.
    badvers = b"\x00\x00\x81\x00\x00\x01\x00\x00\x00\x00\x00\x01" + bytes(5) + b"\x00\x00\x29\x10\x00\x01\x00\x00\x00\x00\x00"
    assert reply_key(1, badvers) >> 16 & 0xFF == 16


def test_reply_tables_stay_bounded_and_fold_without_changing_what_is_exported():
    metrics = Metrics(CollectorRegistry())
    server = DnsServer(Config(client_addr="127.0.0.1", dns_port=0), _Table(), metrics=metrics)
    stats = server.stats
    # A client spraying every query type at many sizes.
    n = 0
    for qtype in range(0, 4000):
        for size in (40, 77, 300):
            stats.count("udp", "server", qtype, _reply(5, size))
            n += 1
    table = stats.tables["udp", "server"]
    assert len(table) <= REPLY_KEYS_MAX
    assert sum(table.values()) == n
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in metrics.registry.collect() for s in f.samples}
    assert samples[("dnsdisco_dns_responses_total", (("rcode", "REFUSED"), ("source", "server")))] == n
    other = samples[("dnsdisco_dns_requests_total", (("family", "1"), ("proto", "udp"), ("type", "other")))]
    assert other == n - 3 * 18  # the 18 named types below 4000 keep their own label
    assert samples[("dnsdisco_dns_response_size_bytes_bucket", (("le", "100.0"), ("proto", "udp")))] == 2 * 4000


def test_durations_are_kept_per_type_label_only():
    stats = DnsStats()
    for qtype in range(300):
        stats.observe(qtype, 0.00001)
    assert set(stats.durations) <= set(TYPE_LABELS)
    assert sum(h.count for h in stats.durations.values()) == 300
    assert stats.durations["A"].bounds == DURATION_BUCKETS


def test_size_buckets_cover_every_reply():
    assert SIZE_BUCKETS[-1] == 65535 and list(SIZE_BUCKETS) == sorted(SIZE_BUCKETS)


def test_catalog_counts_follow_full_and_partial_deltas():
    node = Node("n1", "10.0.0.1", "dc1")

    def entries(name: str, k: int) -> tuple[ServiceEntry, ...]:
        return tuple(ServiceEntry(node, Service("n1", f"{name}-{i}", name)) for i in range(k))

    counts = CatalogCounts("DC1")
    counts.apply(CatalogDelta("dc1", 5, {"web": entries("web", 2), "db": entries("db", 1)}, {"n1": node}, full=True))
    assert (counts.services, counts.instances, counts.index) == (2, 3, 5)
    counts.apply(CatalogDelta("dc1", 7, {"web": entries("web", 4), "db": ()}))
    assert (counts.services, counts.instances, counts.index) == (1, 4, 7)
    counts.apply(CatalogDelta("dc2", 9, {"x": entries("x", 9)}))  # another datacenter: not ours
    assert (counts.services, counts.instances, counts.index) == (1, 4, 7)
    counts.apply(CatalogDelta("dc1", 3, {"api": entries("api", 1)}, full=True))  # index reset (mirror)
    assert (counts.services, counts.instances, counts.index) == (1, 1, 3)
