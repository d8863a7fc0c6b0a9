"""Consul's blocking-query rules as the mirror applies them (``dnsdisco.sync.consul``): index
sanity, the token bucket, the backoff schedule, timeouts and reply headers - with an injected
clock and random source, no sockets. A :class:`Watch` is also driven against a scripted fake
client to show the rules at work in the loop itself."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from typing import Any

import pytest

from dnsdisco.sync.consul import (
    Backoff,
    QueryMeta,
    Response,
    TokenBucket,
    UpstreamError,
    Watch,
    backoff_delay,
    format_wait,
    http_timeout,
    next_index,
    parse_changed,
    parse_meta,
    went_backwards,
)

# -- index rules ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prev", "got", "expected"),
    [
        (0, 7, 7),  # first read: block on what we got
        (7, 7, 7),  # the wait ran out: block again on the same index
        (7, 9, 9),  # moved forward
        (0, 0, 1),  # Consul never sends 0; if something does, 0 must not be fed back (no block)
        (5, 0, 0),  # ...and 0 after 5 went backwards: reset
        (100, 40, 0),  # went backwards (restore, fresh cluster): reset to 0, read afresh
        (1, 1, 1),
        (2, 1, 0),
    ],
)
def test_next_index(prev: int, got: int, expected: int) -> None:
    assert next_index(prev, got) == expected


def test_next_index_never_returns_zero_unless_resetting() -> None:
    for prev in range(0, 20):
        for got in range(0, 20):
            n = next_index(prev, got)
            assert n == 0 if went_backwards(prev, got) else n >= 1


def test_went_backwards() -> None:
    assert not went_backwards(0, 5)
    assert not went_backwards(5, 5)
    assert went_backwards(5, 4)
    assert not went_backwards(1, 0)  # 0 counts as 1


def test_http_timeout_is_above_wait_and_jitter() -> None:
    # The server may hold a query for wait + wait/16; the read timeout must outlast that.
    for wait in (1.0, 60.0, 300.0, 600.0):
        assert http_timeout(wait) > wait + wait / 16
    assert http_timeout(300.0, margin=10.0) == pytest.approx(300 + 18.75 + 10)


def test_format_wait_is_a_go_duration() -> None:
    assert format_wait(300.0) == "300000ms"
    assert format_wait(1.5) == "1500ms"
    assert format_wait(0.0) == "1ms"  # never "0ms", which the server reads as its default


# -- backoff ---------------------------------------------------------------------------------------


def test_backoff_schedule_without_jitter() -> None:
    # u=1 gives the full delay: 100 ms doubling, capped at 30 s.
    got = [backoff_delay(i, 1.0) for i in range(12)]
    assert got == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0, 30.0])


def test_backoff_jitter_stays_in_half_to_full() -> None:
    for attempt in range(15):
        full = min(30.0, 0.1 * 2**attempt)
        assert backoff_delay(attempt, 0.0) == pytest.approx(full / 2)
        assert full / 2 <= backoff_delay(attempt, 0.37) <= full


def test_backoff_huge_attempt_does_not_overflow() -> None:
    assert backoff_delay(10_000, 1.0) == 30.0


def test_backoff_object_counts_and_resets() -> None:
    b = Backoff(base=0.1, cap=30.0, rng=random.Random(7))
    first = [b.next() for _ in range(4)]
    assert all(lo / 2 <= d <= lo for d, lo in zip(first, [0.1, 0.2, 0.4, 0.8], strict=True))
    b.reset()
    assert 0.05 <= b.next() <= 0.1


def test_backoff_is_jittered_across_mirrors() -> None:
    # Two mirrors that failed together do not retry in the same instant.
    a = Backoff(rng=random.Random(1))
    b = Backoff(rng=random.Random(2))
    assert [a.next() for _ in range(5)] != [b.next() for _ in range(5)]


# -- token bucket ----------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_burst_then_one_per_interval() -> None:
    clock = FakeClock()
    bucket = TokenBucket(15.0, 2, clock=clock)
    assert bucket.take() == 0.0  # burst of 2: delivered at once
    assert bucket.take() == 0.0
    assert bucket.take() == pytest.approx(15.0)  # then one per 15 s
    clock.now += 15.0  # the caller waited as told
    assert bucket.take() == pytest.approx(15.0)
    clock.now += 15.0
    assert bucket.take() == pytest.approx(15.0)


def test_bucket_refills_in_quiet_periods() -> None:
    clock = FakeClock()
    bucket = TokenBucket(15.0, 2, clock=clock)
    for _ in range(2):
        bucket.take()
    clock.now += 600.0  # ten quiet minutes: back to a full burst, not more
    assert bucket.tokens == pytest.approx(2.0)
    assert bucket.take() == 0.0
    assert bucket.take() == 0.0
    assert bucket.take() > 0


def test_bucket_partial_refill() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10.0, 2, clock=clock)
    bucket.take()
    bucket.take()
    clock.now += 4.0
    assert bucket.take() == pytest.approx(6.0)


def test_bucket_interval_zero_is_unlimited() -> None:
    bucket = TokenBucket(0.0, 2, clock=FakeClock())
    assert all(bucket.take() == 0.0 for _ in range(100))


# -- headers ---------------------------------------------------------------------------------------


def test_parse_meta() -> None:
    meta = parse_meta({"X-Consul-Index": "4711", "X-Consul-KnownLeader": "true", "X-Consul-LastContact": "250"})
    assert meta == QueryMeta(index=4711, known_leader=True, last_contact=0.25)
    leaderless = parse_meta({"X-Consul-Index": "9", "X-Consul-KnownLeader": "false",
                             "X-Consul-LastContact": "61000", "X-Consul-Results-Filtered-By-ACLs": "true"})
    assert leaderless == QueryMeta(index=9, known_leader=False, last_contact=61.0, filtered_by_acls=True)


def test_parse_changed_services_hint() -> None:
    # A dnsdisco upstream's list of written services, lower-cased; anything else is "no hint".
    assert parse_changed('["web","Api"]') == ("web", "api")
    assert parse_changed("[]") == ()
    for raw in (None, "", "*", " * ", "[web]", '{"a": 1}', '[1, 2]', '"web"'):
        assert parse_changed(raw) is None, raw
    meta = parse_meta({"X-Consul-Index": "7", "X-Dnsdisco-Changed-Services": '["db"]'})
    assert meta.index == 7 and meta.changed == ("db",)
    assert parse_meta({"X-Consul-Index": "7"}).changed is None  # Consul sends nothing


def test_parse_meta_missing_or_bad_values() -> None:
    assert parse_meta({}) == QueryMeta(index=0, known_leader=True, last_contact=0.0)
    assert parse_meta({"X-Consul-Index": "0"}).index == 1  # present 0 counts as 1, never fed back
    assert parse_meta({"X-Consul-Index": "x", "X-Consul-LastContact": "-5"}).index == 0
    assert parse_meta({"X-Consul-LastContact": "-5"}).last_contact == 0.0
    assert parse_meta({"X-Consul-LastContact": "soon"}).last_contact == 0.0


# -- a Watch against a scripted client -------------------------------------------------------------


class ScriptedClient:
    """Answers ``get`` from a script of (index | exception); records what was asked."""

    def __init__(self, script: list[int | Exception]) -> None:
        self.script = script
        self.asked: list[tuple[int, float]] = []

    async def get(self, path: str, *, dc: str | None = None, index: int = 0, wait: float = 0.0,
                  skip_index: int | None = None) -> Response:
        self.asked.append((index, wait))
        if not self.script:
            await asyncio.Event().wait()  # block forever, like a quiet blocking query
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return Response({"at": step}, QueryMeta(index=step), 10)


async def run_watch(script: list[int | Exception], *, interval: float = 0.0, burst: int = 2,
                    rounds: int = 50) -> tuple[ScriptedClient, list[tuple[Any, bool]], list[float], Watch]:
    client = ScriptedClient(script)
    clock = FakeClock()
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now += seconds

    delivered: list[tuple[Any, bool]] = []

    async def deliver(data: Any, meta: QueryMeta, reset: bool) -> None:
        delivered.append((data["at"], reset))

    watch = Watch(client, "/v1/catalog/services", name="t", dc=None, wait=60.0, query_interval=interval,
                  query_burst=burst, backoff_min=0.1, backoff_max=30.0, clock=clock, rng=random.Random(3),
                  sleep=sleep)  # type: ignore[arg-type]
    task = asyncio.create_task(watch.run(deliver))
    for _ in range(rounds):
        await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return client, delivered, slept, watch


async def test_watch_follows_the_index_rules() -> None:
    client, delivered, _slept, watch = await run_watch([5, 5, 8, 3, 4, 1])
    # The first read and a reset read send no index (0 never blocks); otherwise the last one.
    assert [i for i, _w in client.asked] == [0, 5, 5, 8, 0, 4, 0]
    # 5 again was a wait running out: not delivered. 3 went backwards: delivered with reset.
    assert delivered == [(5, False), (8, False), (3, True), (4, False), (1, True)]
    assert all(w == 60.0 for i, w in client.asked if i)
    assert watch.resets == 2


async def test_watch_backs_off_on_errors_and_recovers() -> None:
    err = UpstreamError("boom", status=500)
    client, delivered, slept, watch = await run_watch([err, err, err, 7, err, 9])
    assert 0.05 <= slept[0] <= 0.1 and 0.1 <= slept[1] <= 0.2 and 0.2 <= slept[2] <= 0.4
    assert 0.05 <= slept[3] <= 0.1  # success reset the backoff
    assert delivered == [(7, False), (9, False)]
    # After an error the next read does not block (no index): it might be a rebuilt cluster.
    assert [i for i, _w in client.asked] == [0, 0, 0, 0, 7, 0, 9]
    assert not watch.failing and watch.errors == 4


async def test_watch_sees_a_rebuilt_upstream_at_once_after_an_outage() -> None:
    # Index 40, the upstream dies and comes back as a fresh cluster at index 3. Sent with
    # ?index=40 the read would be held for the whole wait; the probe without an index gets the
    # lower index back at once, and it is delivered as a reset.
    err = UpstreamError("connection refused")
    client, delivered, _slept, watch = await run_watch([40, err, err, 3, 5])
    # (After the reset the loop starts again from 0, as next_index says.)
    assert [i for i, _w in client.asked] == [0, 40, 0, 0, 0, 5]
    assert delivered == [(40, False), (3, True), (5, False)]
    assert watch.resets == 1
    # Back at the same index after an outage: the probe's reply is nothing new, not delivered.
    client, delivered, _slept, _w = await run_watch([40, err, 40, 41])
    assert [i for i, _w in client.asked] == [0, 40, 0, 40, 41]
    assert delivered == [(40, False), (41, False)]


async def test_watch_rate_limits_churn_but_not_timeouts() -> None:
    # Every reply moves the index: two go at once (burst), then one per 15 s.
    _client, delivered, slept, _w = await run_watch([1, 2, 3, 4, 5], interval=15.0)
    assert [d for d, _r in delivered] == [1, 2, 3, 4, 5]
    assert slept == pytest.approx([15.0, 15.0, 15.0])
    # Replies that only ran out their wait (same index) cost no token.
    _client, delivered, slept, _w = await run_watch([1, 1, 1, 1, 1, 1, 2], interval=15.0)
    assert slept == [] and [d for d, _r in delivered] == [1, 2]


async def test_watch_without_index_header_is_an_error() -> None:
    client, delivered, slept, watch = await run_watch([0])
    # A reply without X-Consul-Index: this endpoint cannot be watched; retried with backoff.
    assert delivered == [] and len(slept) == 1 and watch.failing
    assert "X-Consul-Index" in watch.last_error


# -- the change hint's source: Store.services_changed_since -------------------------------------------


async def test_store_names_the_services_written_since_an_index() -> None:
    from dnsdisco.catalog.definition import RegisterRequest
    from dnsdisco.catalog.model import Node, Service
    from dnsdisco.catalog.store import Store

    store = Store(datacenter="dc1", node_name="agent", node_address="127.0.0.1", data_dir=None)
    await store.open()
    try:
        node = Node(name="n1", address="10.0.0.1", datacenter="dc1")

        async def put(name: str, sid: str, port: int = 1) -> int:
            await store.catalog_register(RegisterRequest(
                datacenter="dc1", node=node, service=Service(node="n1", id=sid, name=name, port=port)))
            return store.index

        start = store.index
        a = await put("Web", "w1")
        await put("db", "d1")
        services_index = store.topic_index("services")
        assert store.services_changed_since(start, 10) == ["db", "web"]  # newest first, lower-cased
        assert store.services_changed_since(a, 10) == ["db"]
        assert store.services_changed_since(store.index, 10) == []
        await put("web", "w1", port=2)  # written again: moves to the front
        assert store.services_changed_since(a, 10) == ["web", "db"]
        assert store.services_changed_since(start, 1) is None  # more than the limit: unknown
        assert store.services_changed_since(0, 10) is None  # before this process's history
        # As in Consul, a node write moves the node list and the per-service indexes, not the
        # catalog/services index, and names no service row.
        before = store.index
        services_index = store.topic_index("services")
        await store.catalog_register(RegisterRequest(
            datacenter="dc1", node=Node(name="n1", address="10.0.0.9", datacenter="dc1")))
        assert store.index > before and store.topic_index("services") == services_index
        assert store.topic_index("nodes") == store.index == store.topic_index("svc:web")
        assert store.services_changed_since(before, 10) == []
        await store.catalog_deregister("n1", "d1")
        assert store.services_changed_since(before, 10) == ["db"]
    finally:
        await store.close()


# -- undigested services replies folded into one (dnsdisco's hints and deltas) ---------------------


def test_merge_services_replies() -> None:
    from dnsdisco.sync.mirror import merge_services_replies

    full = ({"web": ["a"], "db": [], "old": []}, QueryMeta(index=5))
    delta = ({"Web": ["b"]}, QueryMeta(index=7, changed=("web", "old"), delta=True))
    # A delta over a full list: the hinted names are replaced (old is gone), the rest kept; the
    # union of hints is unknown because the full list came without one.
    data, meta = merge_services_replies(full, delta)
    assert data == {"db": [], "Web": ["b"]} and meta.index == 7 and not meta.delta and meta.changed is None
    hinted_full = (full[0], QueryMeta(index=5, changed=("db",)))
    data, meta = merge_services_replies(hinted_full, delta)
    assert not meta.delta and set(meta.changed or ()) == {"db", "web", "old"}
    # A delta over a delta is a delta over the union of both hints, the newer entries winning.
    first = ({"web": ["a"], "db": ["x"]}, QueryMeta(index=6, changed=("web", "db"), delta=True))
    data, meta = merge_services_replies(first, delta)
    assert data == {"db": ["x"], "Web": ["b"]} and meta.delta
    assert set(meta.changed or ()) == {"web", "db", "old"}
    # A full list replacing a delta is the full list, with the union of the hints.
    later_full = ({"api": []}, QueryMeta(index=8, changed=("api",)))
    data, meta = merge_services_replies(first, later_full)
    assert data == {"api": []} and not meta.delta and set(meta.changed or ()) == {"web", "db", "api"}


def test_parse_meta_reads_the_delta_marker_only_with_a_hint() -> None:
    assert parse_meta({"X-Consul-Index": "3", "X-Dnsdisco-Changed-Services": '["web"]',
                       "X-Dnsdisco-Services-Delta": "1"}).delta
    # Without a usable hint a body cannot be a delta: read as the full list it then is.
    assert not parse_meta({"X-Consul-Index": "3", "X-Dnsdisco-Changed-Services": "*",
                           "X-Dnsdisco-Services-Delta": "1"}).delta
    assert not parse_meta({"X-Consul-Index": "3", "X-Dnsdisco-Changed-Services": '["web"]'}).delta


async def test_store_names_the_services_check_writes_bore_on() -> None:
    """The hint on /v1/health/state/<status>: a service check names its service, a node check
    every service on the node, a service write alone none."""
    from dnsdisco.catalog.definition import RegisterRequest
    from dnsdisco.catalog.model import Check, Node, Service
    from dnsdisco.catalog.store import Store

    store = Store(datacenter="dc1", node_name="agent", node_address="127.0.0.1", data_dir=None)
    await store.open()
    try:
        n1 = Node(name="n1", address="10.0.0.1", datacenter="dc1")
        n2 = Node(name="n2", address="10.0.0.2", datacenter="dc1")
        for node, sid, name in ((n1, "w1", "Web"), (n1, "d1", "db"), (n2, "a1", "api")):
            await store.catalog_register(RegisterRequest(
                datacenter="dc1", node=node, service=Service(node=node.name, id=sid, name=name, port=1)))
        start = store.index
        assert store.checks_changed_since(start, 10) == []
        await store.catalog_register(RegisterRequest(datacenter="dc1", node=n2, skip_node_update=True, checks=(
            Check(node="n2", check_id="a-c", name="a", status="passing", service_id="a1"),)))
        assert store.checks_changed_since(start, 10) == ["api"]
        mid = store.index
        await store.catalog_register(RegisterRequest(datacenter="dc1", node=n1, skip_node_update=True, checks=(
            Check(node="n1", check_id="serf", name="serf", status="passing"),)))  # a node check
        assert sorted(store.checks_changed_since(mid, 10) or ()) == ["db", "web"]
        assert store.checks_changed_since(start, 2) is None  # three names: over the limit
        assert store.services_changed_since(mid, 10) == []  # no service row was written
    finally:
        await store.close()


async def test_the_hint_logs_are_bounded() -> None:
    """Past HINT_NAMES_MAX distinct names the oldest half is dropped; a hint asked for since an
    index before the cut is then 'not known', never a partial list."""
    from dnsdisco.catalog import store as storemod
    from dnsdisco.catalog.definition import RegisterRequest
    from dnsdisco.catalog.model import Node, Service

    store = storemod.Store(datacenter="dc1", node_name="agent", node_address="127.0.0.1", data_dir=None)
    await store.open()
    old = storemod.HINT_NAMES_MAX
    storemod.HINT_NAMES_MAX = 10
    try:
        node = Node(name="n1", address="10.0.0.1", datacenter="dc1")
        start = store.index
        for i in range(12):
            await store.catalog_register(RegisterRequest(
                datacenter="dc1", node=node, service=Service(node="n1", id=f"s{i}", name=f"svc{i}", port=1)))
        assert len(store._service_writes) <= 10
        assert store.services_changed_since(start, 100) is None  # the cut covers it: not known
        recent = store.index - 1
        assert store.services_changed_since(recent, 100) == ["svc11"]
    finally:
        storemod.HINT_NAMES_MAX = old
        await store.close()


def test_entries_deltas_are_split_and_merged() -> None:
    from dnsdisco.sync.consul import UpstreamError, split_entries
    from dnsdisco.sync.mirror import merge_services_replies

    meta = parse_meta({"X-Consul-Index": "9", "X-Dnsdisco-Changed-Services": '["web","old"]',
                       "X-Dnsdisco-Services-Delta": "entries"})
    assert meta.delta and meta.with_entries
    body = {"Services": {"Web": ["a"]},
            "Entries": {"Web": {"Index": 9, "Rows": [{"Node": {}}]}, "old": {"Index": 0, "Rows": []}}}
    data, split = split_entries(body, meta)
    assert data == {"Web": ["a"]} and not split.with_entries and split.delta
    assert split.entries == {"web": ([{"Node": {}}], 9), "old": ([], 1)}  # keys lower-cased, index >= 1
    plain = QueryMeta(index=3)
    assert split_entries({"x": []}, plain) == ({"x": []}, plain)  # not marked: left as it is
    for bad in ({"Services": {}}, {"Services": {}, "Entries": {"w": {"Index": "9", "Rows": []}}}, []):
        with pytest.raises(UpstreamError):
            split_entries(bad, meta)
    # Merged: the newer reply's entries for its names, the older one's for the others.
    older = ({"db": ["x"]}, replace(split, index=8, changed=("db", "web"),
                                    entries={"db": ([], 8), "web": (["stale"], 8)}))
    _, merged = merge_services_replies(older, (data, split))
    assert merged.entries == {"db": ([], 8), "web": ([{"Node": {}}], 9), "old": ([], 1)}
    # Over a reply without entries, only the newer reply's names have them (the rest are read).
    _, merged = merge_services_replies(({"db": []}, QueryMeta(index=8, changed=("db",), delta=True)), (data, split))
    assert set(merged.entries or ()) == {"web", "old"}
