"""Prometheus metrics: every series dnsdisco exports, on one injected ``CollectorRegistry``.

:class:`Metrics` owns the registry's dnsdisco collectors and the text served at ``/metrics``.
It does not count anything on the query path itself: the DNS server and the forwarder keep
plain ints and dicts (:class:`~dnsdisco.dns.server.DnsStats`,
:class:`~dnsdisco.forward.ForwardStats`), and one custom collector turns them into metric
families when Prometheus scrapes. A query is answered in about 10 µs; a labelled
``prometheus_client`` counter costs about 1 µs per ``inc()``, a dict increment about 0.1 µs,
so the hot path only does the latter and every label is worked out at scrape time.

Names follow CoreDNS's (``coredns_dns_requests_total`` -> ``dnsdisco_dns_requests_total``) so
dashboards port over, and Prometheus's naming rules: one ``dnsdisco_`` prefix, base units
(``_seconds``, ``_bytes``), ``_total`` on counters, ``_info`` for build metadata. Every label
is bounded: query types outside CoreDNS's list become ``other``, and no series carries a
query name or a client address.

This module also holds the fixed-bucket histogram the counting side uses
(:class:`FixedHistogram`) and the label vocabulary (:func:`type_label`, :func:`rcode_label`),
so that the two sides agree on buckets and names.
"""

from __future__ import annotations

import bisect
import platform
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from dnsdisco import __version__
from dnsdisco.catalog.model import CatalogDelta

if TYPE_CHECKING:
    from dnsdisco.dns.server import DnsServer
    from dnsdisco.forward import Forwarder

__all__ = [
    "CONTENT_TYPE",
    "DURATION_BUCKETS",
    "FORWARD_DURATION_BUCKETS",
    "SIZE_BUCKETS",
    "METRICS",
    "SOURCES",
    "TYPE_LABELS",
    "CatalogCounts",
    "FixedHistogram",
    "MetricInfo",
    "Metrics",
    "SyncStatus",
    "mirror_sync_status",
    "rcode_label",
    "type_label",
]

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Request durations. CoreDNS starts at 250 µs; an answer from the table takes ~10 µs, so the
# low end is finer here, or every catalog answer would sit in the first bucket.
DURATION_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)
# One exchange with a recursor: a LAN resolver answers in under a millisecond, a cold one in
# tens to hundreds; the default recursor_timeout is 2 s.
FORWARD_DURATION_BUCKETS = (
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
# Reply sizes, CoreDNS's buckets (511: fits a classic 512-byte UDP reply), with powers of two
# minus one where CoreDNS has round numbers, so a bucket ends where a buffer size does.
SIZE_BUCKETS = (0, 100, 200, 300, 400, 511, 1023, 2047, 4095, 8191, 16383, 32767, 49151, 65535)

# CoreDNS's bounded `type` label (plugin/metrics/vars/report.go): these, and "other".
_TYPE_NAMES = {
    1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA",
    33: "SRV", 43: "DS", 46: "RRSIG", 47: "NSEC", 48: "DNSKEY", 50: "NSEC3", 65: "HTTPS",
    251: "IXFR", 252: "AXFR", 255: "ANY",
}
TYPE_LABELS = (*_TYPE_NAMES.values(), "other")
_RCODE_NAMES = {
    0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED",
    6: "YXDOMAIN", 7: "YXRRSET", 8: "NXRRSET", 9: "NOTAUTH", 10: "NOTZONE", 16: "BADVERS",
}
# Where a reply came from (the `source` label of dnsdisco_dns_responses_total).
SOURCES = ("catalog", "cache", "forward", "server")


def type_label(qtype: int) -> str:
    """The ``type`` label of *qtype*: its mnemonic if CoreDNS names it, else ``other``."""
    return _TYPE_NAMES.get(qtype, "other")


def is_named_type(qtype: int) -> bool:
    return qtype in _TYPE_NAMES


def rcode_label(rcode: int) -> str:
    """The ``rcode`` label: the RFC mnemonic, or the number for codes without one."""
    return _RCODE_NAMES.get(rcode, str(rcode))


class FixedHistogram:
    """A histogram as a plain count array: what the counting side observes into, cheaply.

    ``counts[i]`` is the number of observations in ``(bounds[i-1], bounds[i]]`` and the last
    slot those above every bound; :meth:`buckets` turns that into Prometheus's cumulative form.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, i.e. Prometheus's "le" (less than or equal).
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative ``(le, count)`` pairs ending with ``+Inf``."""
        out = []
        total = 0
        for bound, n in zip(self.bounds, self.counts):
            total += n
            out.append((floatToGoString(bound), total))
        out.append(("+Inf", total + self.counts[-1]))
        return out

    def merge(self, other: FixedHistogram) -> None:
        for i, n in enumerate(other.counts):
            self.counts[i] += n
        self.sum += other.sum


@dataclass(frozen=True, slots=True)
class SyncStatus:
    """How the catalog's producer is doing, read at scrape time.

    ``duration`` is how long the last full load took (seconds); ``last_success`` the wall-clock
    time (``time.time()``) at which the catalog was last known current; ``errors`` how many
    exchanges with the source have failed so far.
    """

    duration: float | None = None
    last_success: float | None = None
    errors: int = 0


def mirror_sync_status(mirror: Any) -> Callable[[], SyncStatus]:
    """A :attr:`Metrics.sync_status` source reading ``mirror.status()`` (:class:`dnsdisco.sync.mirror.Mirror`).

    Duck-typed on the status dict so that the metrics do not import the mirror: ``last_sync``
    (wall time the local copy was last known current), ``errors`` (failed requests to Consul)
    and the local datacenter's ``first_sync_seconds``.
    """

    def read() -> SyncStatus:
        status = mirror.status()
        local = status.get("datacenters", {}).get(getattr(mirror, "local_datacenter", ""), {})
        return SyncStatus(duration=local.get("first_sync_seconds"), last_success=status.get("last_sync"),
                          errors=int(status.get("errors") or 0))

    return read


class CatalogCounts:
    """Services, instances and index of one datacenter, kept up to date from catalog deltas.

    Fed the same :class:`~dnsdisco.catalog.model.CatalogDelta` values as the answer table
    (``store.add_delta_listener(counts.apply)``, or the mirror's ``on_delta``), so both
    producers are counted alike, at a cost proportional to what changed.
    """

    def __init__(self, datacenter: str) -> None:
        self.datacenter = datacenter.lower()
        self._instances: dict[str, int] = {}  # lower-cased service name -> instances
        self.instances = 0
        self.index = 0

    @property
    def services(self) -> int:
        return len(self._instances)

    def apply(self, delta: CatalogDelta) -> None:
        if delta.datacenter.lower() != self.datacenter:
            return
        counts = self._instances
        if delta.full:
            counts.clear()
            self.instances = 0
        for name, entries in delta.services.items():
            self.instances -= counts.pop(name, 0)
            if entries:
                counts[name] = len(entries)
                self.instances += len(entries)
        self.index = max(self.index, delta.index) if not delta.full else delta.index


@dataclass(frozen=True, slots=True)
class MetricInfo:
    """One exported metric, as the README's Metrics table documents it."""

    name: str
    kind: str  # counter | gauge | histogram
    labels: tuple[str, ...]
    help: str


# Every dnsdisco metric: the single source for the collector's families, the naming lint and
# the README table (tests/unit/test_metrics_names.py checks all three agree).
METRICS: tuple[MetricInfo, ...] = (
    MetricInfo("dnsdisco_build_info", "gauge", ("version", "python"),
               "Always 1; the labels say which dnsdisco and which Python are running."),
    MetricInfo("dnsdisco_dns_requests_total", "counter", ("proto", "family", "type"),
               "DNS requests with a readable header, by transport, address family (1 IPv4, 2 IPv6) and query type."),
    MetricInfo("dnsdisco_dns_responses_total", "counter", ("rcode", "source"),
               "DNS replies produced, by rcode and by where the answer came from "
               "(catalog, cache, forward, or server for replies the server composed itself)."),
    MetricInfo("dnsdisco_dns_request_duration_seconds", "histogram", ("type",),
               "Time from reading a request to handing its reply to the kernel, for a sample of requests "
               "(the first of each batch read from a socket: every request on an idle server)."),
    MetricInfo("dnsdisco_dns_response_size_bytes", "histogram", ("proto",),
               "Size of the DNS replies produced, by transport."),
    MetricInfo("dnsdisco_dns_dropped_total", "counter", ("reason",),
               "DNS requests or replies dropped without an answer reaching the client, by reason."),
    MetricInfo("dnsdisco_dns_panics_total", "counter", (),
               "Unexpected errors while answering a DNS request (each answered SERVFAIL)."),
    MetricInfo("dnsdisco_dns_rate_limited_total", "counter", ("action",),
               "UDP replies limited by dns_config.rate_limit: drop (not sent), slip (sent truncated, "
               "or an error reply sent as it was) or log_only (sent, counted only)."),
    MetricInfo("dnsdisco_dns_tcp_connections", "gauge", (),
               "DNS TCP connections open now."),
    MetricInfo("dnsdisco_dns_worker_restarts_total", "counter", (),
               "DNS worker processes (dns_workers > 1) that exited unexpectedly and were started again."),
    MetricInfo("dnsdisco_catalog_services", "gauge", (),
               "Service names in the local datacenter's catalog."),
    MetricInfo("dnsdisco_catalog_instances", "gauge", (),
               "Service instances in the local datacenter's catalog, healthy or not."),
    MetricInfo("dnsdisco_catalog_index", "gauge", (),
               "Catalog index (Raft index in mirror mode) the DNS answers reflect."),
    MetricInfo("dnsdisco_catalog_sync_duration_seconds", "gauge", (),
               "How long the last full load of the catalog took."),
    MetricInfo("dnsdisco_catalog_sync_last_success_timestamp_seconds", "gauge", (),
               "Unix time at which the catalog was last known current (now for the embedded catalog)."),
    MetricInfo("dnsdisco_catalog_sync_errors_total", "counter", (),
               "Failed requests to the Consul agent being mirrored (0 for the embedded catalog)."),
    MetricInfo("dnsdisco_forward_request_duration_seconds", "histogram", ("to", "rcode"),
               "Duration of each exchange with a recursor that got a reply, by recursor and reply rcode."),
    MetricInfo("dnsdisco_forward_failures_total", "counter", ("to",),
               "Exchanges with a recursor that got no reply (timeout or network error), health probes included."),
    MetricInfo("dnsdisco_forward_healthy", "gauge", ("to",),
               "1 while a recursor is in rotation, 0 while it is skipped (failing, or a forwarding loop)."),
    MetricInfo("dnsdisco_forward_max_concurrent_rejects_total", "counter", (),
               "Forwarded queries refused because recursor_max_concurrent were already in flight."),
    MetricInfo("dnsdisco_forward_cache_hits_total", "counter", (),
               "Forwarded names answered from a fresh entry of the recursor cache."),
    MetricInfo("dnsdisco_forward_cache_misses_total", "counter", (),
               "Forwarded names not found fresh in the recursor cache."),
    MetricInfo("dnsdisco_forward_cache_entries", "gauge", (),
               "Answers held in the recursor cache."),
)
METRICS_BY_NAME = {m.name: m for m in METRICS}


class Metrics:
    """Every dnsdisco metric, registered on *registry* (a fresh ``CollectorRegistry`` per agent
    and per test; the process-wide default one is never used).

    The composition root connects the sources, each read only when Prometheus scrapes:
    :meth:`watch_dns` (a :class:`~dnsdisco.dns.server.DnsServer`'s counters),
    :meth:`watch_forwarder`, :attr:`catalog` (fed catalog deltas), and :attr:`sync_status`
    (the mirror's state, or the embedded catalog's). With ``process=True`` the registry also
    carries prometheus_client's standard ``process_*``, ``python_info`` and ``python_gc_*``.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, datacenter: str = "dc1",
                 process: bool = False) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.catalog = CatalogCounts(datacenter)
        self.sync_status: Callable[[], SyncStatus] | None = None
        # With DNS worker processes (dnsdisco.workers): called first at each scrape, to fetch
        # the workers' counters into the objects watch_dns/watch_forwarder read; and the restarts.
        self.before_scrape: list[Callable[[], None]] = []
        self.worker_restarts: Callable[[], int] | None = None
        self._dns: list[DnsServer] = []
        self._forwarders: list[Forwarder] = []
        self.registry.register(_DnsdiscoCollector(self))
        if process:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)

    def watch_dns(self, server: DnsServer) -> None:
        """Export *server*'s counters (``server.stats``)."""
        if server not in self._dns:
            self._dns.append(server)

    def watch_forwarder(self, forwarder: Forwarder) -> None:
        """Export *forwarder*'s counters, per-recursor histograms and cache size."""
        if forwarder not in self._forwarders:
            self._forwarders.append(forwarder)

    def observe_delta(self, delta: CatalogDelta) -> None:
        """A catalog delta listener: keeps the catalog gauges current."""
        self.catalog.apply(delta)

    def exposition(self) -> bytes:
        """The registry in Prometheus's text format (what ``/metrics`` serves)."""
        return generate_latest(self.registry)

    # -- reading the sources (scrape time) ------------------------------------------------------

    def _families(self) -> Iterator[Metric]:
        # Every family is built from the sources as they are now; nothing is kept between scrapes.
        for hook in self.before_scrape:
            hook()
        fam = _Families()
        fam.gauge("dnsdisco_build_info").add_metric([__version__, platform.python_version()], 1)
        self._dns_families(fam)
        self._catalog_families(fam)
        self._forward_families(fam)
        return fam.all()

    def _dns_families(self, fam: _Families) -> None:
        requests: dict[tuple[str, str, str], int] = {}
        responses: dict[tuple[str, str], int] = {}
        sizes = {proto: FixedHistogram(SIZE_BUCKETS) for proto in ("udp", "tcp")}
        durations: dict[str, FixedHistogram] = {}
        dropped: dict[str, int] = {}
        panics = 0
        limited = {"drop": 0, "slip": 0, "log_only": 0}
        connections = 0
        for server in self._dns:
            stats = server.stats
            family = server.family_label
            for proto, source, qtype, rcode, size, n in stats.replies():
                tl = type_label(qtype)
                if source != "forward":  # forwarded requests are counted when they arrive
                    key3 = (proto, family, tl)
                    requests[key3] = requests.get(key3, 0) + n
                key2 = (rcode_label(rcode), source)
                responses[key2] = responses.get(key2, 0) + n
                hist = sizes[proto]
                hist.counts[bisect.bisect_left(SIZE_BUCKETS, size)] += n
                hist.sum += size * n
            for (proto, tl), n in stats.forwarded.items():
                key3 = (proto, family, tl)
                requests[key3] = requests.get(key3, 0) + n
            for tl, hist in stats.durations.items():
                have = durations.get(tl)
                if have is None:
                    have = durations[tl] = FixedHistogram(DURATION_BUCKETS)
                have.merge(hist)
            for reason, n in stats.dropped().items():
                dropped[reason] = dropped.get(reason, 0) + n
            panics += stats.errors
            rl = stats.rate_limit
            limited["drop"] += rl.dropped
            limited["slip"] += rl.slipped
            limited["log_only"] += rl.logged
            connections += server.tcp_open
        req = fam.counter("dnsdisco_dns_requests_total")
        for labels3, n in sorted(requests.items()):
            req.add_metric(list(labels3), n)
        resp = fam.counter("dnsdisco_dns_responses_total")
        for labels2, n in sorted(responses.items()):
            resp.add_metric(list(labels2), n)
        dur = fam.histogram("dnsdisco_dns_request_duration_seconds")
        for tl, hist in sorted(durations.items()):
            dur.add_metric([tl], hist.buckets(), hist.sum)
        size_fam = fam.histogram("dnsdisco_dns_response_size_bytes")
        if self._dns:
            for proto, hist in sizes.items():
                size_fam.add_metric([proto], hist.buckets(), hist.sum)
        drop = fam.counter("dnsdisco_dns_dropped_total")
        for reason, n in sorted(dropped.items()):
            drop.add_metric([reason], n)
        fam.counter("dnsdisco_dns_panics_total").add_metric([], panics)
        rate_limited = fam.counter("dnsdisco_dns_rate_limited_total")
        for action, n in limited.items():
            rate_limited.add_metric([action], n)
        fam.gauge("dnsdisco_dns_tcp_connections").add_metric([], connections)
        restarts = self.worker_restarts() if self.worker_restarts is not None else 0
        fam.counter("dnsdisco_dns_worker_restarts_total").add_metric([], restarts)

    def _catalog_families(self, fam: _Families) -> None:
        cat = self.catalog
        fam.gauge("dnsdisco_catalog_services").add_metric([], cat.services)
        fam.gauge("dnsdisco_catalog_instances").add_metric([], cat.instances)
        fam.gauge("dnsdisco_catalog_index").add_metric([], cat.index)
        status = self.sync_status() if self.sync_status is not None else SyncStatus()
        fam.gauge("dnsdisco_catalog_sync_duration_seconds").add_metric([], status.duration or 0.0)
        fam.gauge("dnsdisco_catalog_sync_last_success_timestamp_seconds").add_metric(
            [], status.last_success or 0.0)
        fam.counter("dnsdisco_catalog_sync_errors_total").add_metric([], status.errors)

    def _forward_families(self, fam: _Families) -> None:
        durations: dict[tuple[str, str], FixedHistogram] = {}
        failures: dict[str, int] = {}
        healthy: dict[str, int] = {}
        rejects = hits = misses = entries = 0
        for fwd in self._forwarders:
            stats = fwd.stats
            for (to, rcode), hist in stats.upstream_durations.items():
                key = (to, rcode_label(rcode))
                have = durations.get(key)
                if have is None:
                    have = durations[key] = FixedHistogram(FORWARD_DURATION_BUCKETS)
                have.merge(hist)
            for to, n in stats.upstream_failures.items():
                failures[to] = failures.get(to, 0) + n
            for up in fwd.upstreams:
                healthy[up.text] = int(up.healthy and up.loop is None)
                failures.setdefault(up.text, 0)
            rejects += stats.rejected
            hits += stats.cache_hits
            misses += stats.cache_misses
            entries += len(fwd.cache) if fwd.cache is not None else 0
        dur = fam.histogram("dnsdisco_forward_request_duration_seconds")
        for (to, rc), hist in sorted(durations.items()):
            dur.add_metric([to, rc], hist.buckets(), hist.sum)
        fail = fam.counter("dnsdisco_forward_failures_total")
        for to, n in sorted(failures.items()):
            fail.add_metric([to], n)
        up_fam = fam.gauge("dnsdisco_forward_healthy")
        for to, ok in sorted(healthy.items()):
            up_fam.add_metric([to], ok)
        fam.counter("dnsdisco_forward_max_concurrent_rejects_total").add_metric([], rejects)
        fam.counter("dnsdisco_forward_cache_hits_total").add_metric([], hits)
        fam.counter("dnsdisco_forward_cache_misses_total").add_metric([], misses)
        fam.gauge("dnsdisco_forward_cache_entries").add_metric([], entries)


class _Families:
    """The metric families of one scrape, built from :data:`METRICS` in its order."""

    def __init__(self) -> None:
        self._made: dict[str, Metric] = {}

    def _get(self, name: str, cls: type[Metric]) -> Any:
        fam = self._made.get(name)
        if fam is None:
            info = METRICS_BY_NAME[name]
            # prometheus_client appends "_total" to a counter's samples itself.
            base = name[: -len("_total")] if info.kind == "counter" else name
            fam = self._made[name] = cls(base, info.help, labels=list(info.labels))
        return fam

    def counter(self, name: str) -> CounterMetricFamily:
        return self._get(name, CounterMetricFamily)  # type: ignore[no-any-return]

    def gauge(self, name: str) -> GaugeMetricFamily:
        return self._get(name, GaugeMetricFamily)  # type: ignore[no-any-return]

    def histogram(self, name: str) -> HistogramMetricFamily:
        return self._get(name, HistogramMetricFamily)  # type: ignore[no-any-return]

    def all(self) -> Iterator[Metric]:
        for info in METRICS:
            fam = self._made.get(info.name)
            if fam is not None:
                yield fam


class _DnsdiscoCollector(Collector):
    """The one custom collector: reads the plain counters when the registry is collected."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return list(self.metrics._families())

    def describe(self) -> Iterable[Metric]:
        # Names only (the registry checks them for duplicates), without reading any source.
        fam = _Families()
        for info in METRICS:
            {"counter": fam.counter, "gauge": fam.gauge, "histogram": fam.histogram}[info.kind](info.name)
        return list(fam.all())
