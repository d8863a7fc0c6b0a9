"""The store: index rules, agent identity, ownership rules, listeners, deltas, topic wake-ups,
the config layer, KV semantics, and durability through the journal (reopen, disk refusal)."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import replace

import pytest

from dnsdisco.catalog import persist
from dnsdisco.catalog.definition import decode_register_request, decode_service_definition
from dnsdisco.catalog.model import CRITICAL, PASSING, WARNING, CatalogDelta, Check, CheckDefinition, Service
from dnsdisco.catalog.store import SOURCE_CATALOG, SOURCE_CONFIG, Store
from dnsdisco.errors import CatalogError, StorageError


def make_store(data_dir: str | None = None, node: str = "agent1") -> Store:
    return Store(datacenter="dc1", node_name=node, node_address="10.0.0.9", data_dir=data_dir)


@pytest.fixture(params=["memory", "disk"])
async def store(request, tmp_path):
    s = make_store(str(tmp_path / "data") if request.param == "disk" else None)
    await s.open()
    yield s
    await s.close()


def service(sid: str, name: str = "web", **kw) -> tuple[Service, list[Check]]:
    raw = {"ID": sid, "Name": name, **kw}
    return decode_service_definition(raw, node="agent1", enable_script_checks=False)


async def register(store: Store, sid: str, name: str = "web", **kw) -> None:
    s, checks = service(sid, name, **kw)
    await store.register_service(s, checks)


# -- open and the agent's identity ---------------------------------------------------------------


async def test_open_registers_agent_like_a_consul_server(store):
    node = store.node("AGENT1")  # node names are case-insensitive
    assert node is not None and node.name == "agent1"
    assert node.tagged_addresses == {"lan": "10.0.0.9", "lan_ipv4": "10.0.0.9", "wan": "10.0.0.9",
                                     "wan_ipv4": "10.0.0.9"}
    assert node.meta == {"consul-network-segment": ""}
    assert node.id and node.datacenter == "dc1"
    consul = store.service("agent1", "consul")
    assert consul is not None and consul.port == 8300
    serf = store.check("agent1", "serfHealth")
    assert serf is not None
    assert (serf.name, serf.status, serf.output, serf.service_id) == (
        "Serf Health Status", PASSING, "Agent alive and reachable", "")
    assert store.index >= 1
    # The agent's own consul service is not an agent (local) service.
    assert store.agent_services() == [] and store.agent_checks() == []
    (entry,) = store.health_service("consul")
    assert [c.check_id for c in entry.checks] == ["serfHealth"]


async def test_index_starts_at_one_and_is_never_zero():
    s = make_store()
    assert s.index == 1  # before open, too
    await s.open()
    assert s.index >= 1
    assert s.topic_index("svc:nothing") >= 1
    assert s.kv_index("nothing", prefix=False) >= 1
    await s.close()


# -- index rules ---------------------------------------------------------------------------------


async def test_each_write_bumps_index_once_and_identical_writes_do_not(store):
    i0 = store.index
    await register(store, "web-1", Port=80, Check={"TTL": "10s"})
    i1 = store.index
    assert i1 == i0 + 1
    svc = store.service("agent1", "web-1")
    chk = store.check("agent1", "service:web-1")
    assert svc.create_index == svc.modify_index == i1 and chk.create_index == i1
    await register(store, "web-1", Port=80, Check={"TTL": "10s"})  # identical re-registration
    assert store.index == i1
    assert await store.set_check_status("agent1", "service:web-1", CRITICAL, "") is False
    assert store.index == i1
    assert await store.set_check_status("agent1", "service:web-1", PASSING, "ok") is True
    assert store.index == i1 + 1
    chk2 = store.check("agent1", "service:web-1")
    assert (chk2.create_index, chk2.modify_index) == (i1, i1 + 1)
    await register(store, "web-1", Port=81, Check={"TTL": "10s"})
    svc2 = store.service("agent1", "web-1")
    assert (svc2.create_index, svc2.modify_index, svc2.port) == (i1, i1 + 2, 81)


async def test_reregistration_keeps_check_status_and_output(store):
    await register(store, "web-1", Check={"TTL": "10s"})
    await store.set_check_status("agent1", "service:web-1", PASSING, "fine")
    await register(store, "web-1", Tags=["v2"], Check={"TTL": "20s", "Status": "critical"})
    c = store.check("agent1", "service:web-1")
    assert (c.status, c.output, c.definition.ttl, c.service_tags) == (PASSING, "fine", 20.0, ("v2",))


async def test_replace_existing_checks(store):
    await register(store, "web-1", Checks=[{"TTL": "1s"}, {"TTL": "2s"}])
    assert {c.check_id for c in store.agent_checks()} == {"service:web-1:1", "service:web-1:2"}
    s, checks = service("web-1", Check={"TTL": "1s", "CheckID": "only"})
    await store.register_service(s, checks)
    assert {c.check_id for c in store.agent_checks()} == {"service:web-1:1", "service:web-1:2", "only"}
    await store.register_service(s, checks, replace_existing_checks=True)
    assert {c.check_id for c in store.agent_checks()} == {"only"}


# -- agent ownership and refusals ----------------------------------------------------------------


async def test_agent_deregister_unknown_and_non_agent_services_is_404(store):
    with pytest.raises(CatalogError) as e:
        await store.deregister_service("agent1", "nope")
    assert e.value.status == 404
    assert e.value.message == 'Unknown service ID "nope". Ensure that the service ID is passed, not the service name.'
    with pytest.raises(CatalogError):
        await store.deregister_service("agent1", "consul")  # the server's own, not a local service
    with pytest.raises(CatalogError) as e:
        await store.deregister_check("agent1", "serfHealth")
    assert e.value.message == 'Unknown check ID "serfHealth". Ensure that the check ID is passed, not the check name.'


async def test_deregister_removes_service_and_its_checks(store):
    await register(store, "web-1", Checks=[{"TTL": "1s"}, {"TTL": "2s"}])
    i = store.index
    await store.deregister_service("agent1", "web-1")
    assert store.index == i + 1  # one write for the service and both checks
    assert store.service("agent1", "web-1") is None and store.agent_checks() == []
    assert store.health_service("web") == []


async def test_register_check_needs_an_agent_service(store):
    with pytest.raises(CatalogError) as e:
        await store.register_check(Check(node="agent1", check_id="c", name="c", service_id="ghost",
                                         definition=CheckDefinition(ttl=5)))
    assert (e.value.status, e.value.message) == (404, 'ServiceID "ghost" does not exist')
    await register(store, "web-1", Tags=["a"])
    await store.register_check(Check(node="agent1", check_id="c", name="c", service_id="web-1",
                                     definition=CheckDefinition(ttl=5)))
    c = store.check("agent1", "c")
    assert (c.service_name, c.service_tags, c.status) == ("web", ("a",), CRITICAL)


async def test_maintenance_checks(store):
    await register(store, "web-1")
    with pytest.raises(CatalogError) as e:
        await store.set_service_maintenance("nope", True)
    assert (e.value.status, e.value.message) == (404, 'No service registered with ID "nope"')
    await store.set_service_maintenance("web-1", True, "deploy")
    m = store.check("agent1", "_service_maintenance:web-1")
    assert (m.status, m.notes, m.name, m.service_id) == (CRITICAL, "deploy", "Service Maintenance Mode", "web-1")
    (entry,) = store.health_service("web")
    assert entry.status == CRITICAL
    await store.set_service_maintenance("web-1", False)
    assert store.check("agent1", "_service_maintenance:web-1") is None
    await store.set_node_maintenance(True)
    n = store.check("agent1", "_node_maintenance")
    assert n.status == CRITICAL and n.notes.startswith("Maintenance mode is enabled for this node")
    assert store.health_service("web")[0].status == CRITICAL  # node checks count for every instance


# -- listeners and deltas ------------------------------------------------------------------------


async def test_check_listener_sees_before_and_after(store):
    seen: list[tuple[Check | None, Check | None]] = []
    store.add_check_listener(lambda b, a: seen.append((b, a)))
    await register(store, "web-1", Check={"TTL": "5s"})
    assert len(seen) == 1 and seen[0][0] is None and seen[0][1].check_id == "service:web-1"
    await store.set_check_status("agent1", "service:web-1", WARNING, "meh")
    before, after = seen[-1]
    assert (before.status, after.status, after.output) == (CRITICAL, WARNING, "meh")
    assert store.check("agent1", "service:web-1") == after  # committed by the time it is called
    await store.deregister_service("agent1", "web-1")
    assert seen[-1][1] is None and seen[-1][0].check_id == "service:web-1"


async def test_delta_names_lowercased_services_and_is_synchronous(store):
    deltas: list[CatalogDelta] = []
    store.add_delta_listener(deltas.append)
    await register(store, "web-1", name="Web")
    # Emitted in the commit step itself: no await between the write returning and the delta.
    assert len(deltas) == 1
    d = deltas[0]
    assert d.index == store.index and not d.full and d.datacenter == "dc1"
    assert list(d.services) == ["web"] and d.services["web"][0].service.id == "web-1"
    await store.deregister_service("agent1", "web-1")
    assert deltas[-1].services == {"web": ()}


async def test_node_check_change_touches_every_service_on_the_node(store):
    await register(store, "web-1", name="web")
    await register(store, "db-1", name="db")
    deltas: list[CatalogDelta] = []
    store.add_delta_listener(deltas.append)
    await store.set_check_status("agent1", "serfHealth", CRITICAL, "Agent not live or unreachable")
    (d,) = deltas
    assert set(d.services) == {"web", "db", "consul"}
    assert all(e.status == CRITICAL for entries in d.services.values() for e in entries)


async def test_full_delta(store):
    await register(store, "web-1")
    full = store.full_delta()
    assert full.full and full.index == store.index
    assert set(full.services) == {"consul", "web"} and set(full.nodes) == {"agent1"}


async def test_health_service_order_and_checks(store):
    req = decode_register_request({"Node": "b-node", "Address": "10.0.0.2", "Service": {"Service": "web", "ID": "w"},
                                   "Checks": [{"Name": "node-ok", "Status": "passing"},
                                              {"Name": "svc", "ServiceID": "w", "Status": "warning"}]},
                                  datacenter="dc1")
    await store.catalog_register(req)
    await register(store, "web-2")
    await register(store, "web-1", Check={"TTL": "1s"})
    entries = store.health_service("WEB")
    assert [(e.node.name, e.service.id) for e in entries] == [("agent1", "web-1"), ("agent1", "web-2"),
                                                               ("b-node", "w")]
    assert [c.check_id for c in entries[0].checks] == ["serfHealth", "service:web-1"]
    assert [c.check_id for c in entries[2].checks] == ["node-ok", "svc"]
    assert entries[2].status == WARNING


# -- blocking waits ------------------------------------------------------------------------------


async def test_wait_wakes_on_its_topic_only(store):
    await register(store, "web-1")
    idx = store.topic_index("health:web")
    waiter = asyncio.create_task(store.wait(["health:web"], 5))
    await asyncio.sleep(0)
    await register(store, "db-1", name="db")  # unrelated
    await store.kv_put("k", b"v")  # unrelated
    await asyncio.sleep(0.02)
    assert not waiter.done()
    assert store.topic_index("health:web") == idx  # an unrelated write does not look like a change
    await store.set_check_status("agent1", "serfHealth", WARNING, "")  # node check: touches web
    assert await asyncio.wait_for(waiter, 1) is True
    assert store.topic_index("health:web") == store.index


async def test_wait_times_out_false(store):
    assert await store.wait(["svc:none"], 0.01) is False
    assert store._waiters == {}  # cleaned up


async def test_topics_per_endpoint(store):
    await register(store, "web-1", Check={"TTL": "5s"})
    base = {t: store.topic_index(t) for t in ("services", "nodes", "checks", "svc:web", "health:web",
                                               "node:agent1", "nodechecks:agent1")}
    await store.set_check_status("agent1", "service:web-1", PASSING, "")
    changed = {t for t in base if store.topic_index(t) != base[t]}
    assert changed == {"checks", "health:web", "nodechecks:agent1"}
    base = {t: store.topic_index(t) for t in base}
    await register(store, "web-1", Tags=["x"], Check={"TTL": "5s"})
    changed = {t for t in base if store.topic_index(t) != base[t]}
    # The check follows the service's tags, so its topics move too.
    assert changed == {"services", "svc:web", "health:web", "node:agent1", "checks", "nodechecks:agent1"}


async def test_kv_wait_exact_and_prefix(store):
    exact = asyncio.create_task(store.wait(store.kv_topics("a/b", prefix=False), 5))
    prefix = asyncio.create_task(store.wait(store.kv_topics("a/", prefix=True), 5))
    await asyncio.sleep(0)
    await store.kv_put("a/bc", b"1")  # under the prefix, not the exact key
    await asyncio.sleep(0)
    assert prefix.done() and not exact.done()
    await store.kv_put("a/b", b"1")
    assert await asyncio.wait_for(exact, 1) is True


# -- catalog API ---------------------------------------------------------------------------------


async def test_catalog_register_and_deregister(store):
    req = decode_register_request({"Node": "ext", "Address": "10.1.1.1", "NodeMeta": {"r": "1"},
                                   "Service": {"Service": "redis", "Port": 6379},
                                   "Check": {"Name": "c", "ServiceID": "redis", "Status": "passing"}},
                                  datacenter="dc1")
    await store.catalog_register(req)
    assert store.node("ext").meta == {"r": "1"}
    assert store.service_source("ext", "redis") == SOURCE_CATALOG
    assert store.check("ext", "c").status == PASSING
    i = store.index
    await store.catalog_register(req)  # identical: no write
    assert store.index == i
    with pytest.raises(CatalogError) as e:
        bad = decode_register_request({"Node": "ext", "Address": "10.1.1.1",
                                       "Check": {"Name": "x", "ServiceID": "ghost"}}, datacenter="dc1")
        await store.catalog_register(bad)
    assert (e.value.status, e.value.message) == (500, "Unknown service ID 'ghost' for check ID 'x'")
    assert store.check("ext", "x") is None and store.index == i  # refused: nothing changed
    with pytest.raises(CatalogError) as e:
        await store.catalog_register(replace(req, datacenter="dc2"))
    assert e.value.message == "No path to datacenter"
    await store.catalog_deregister("ext", check_id="c")
    assert store.check("ext", "c") is None
    await store.catalog_deregister("ext", service_id="nothing")  # not an error
    await store.catalog_deregister("ext")
    assert store.node("ext") is None and store.service("ext", "redis") is None


# -- config layer --------------------------------------------------------------------------------


async def test_sync_config_services_replaces_layer_and_keeps_check_state(store):
    await register(store, "api-1", name="api")  # an API registration, same ID as a config one below
    defs = [service("web-1", Check={"TTL": "10s"}), service("db-1", name="db")]
    await store.sync_config_services(defs)
    assert store.service_source("agent1", "web-1") == SOURCE_CONFIG
    await store.set_check_status("agent1", "service:web-1", PASSING, "up")
    i = store.index
    await store.sync_config_services(defs)  # a reload with nothing changed writes nothing
    assert store.index == i
    await store.sync_config_services([service("web-1", Tags=["new"], Check={"TTL": "10s"}),
                                      service("api-1", name="api")])
    assert store.index == i + 1  # one atomic step
    assert store.service("agent1", "db-1") is None
    c = store.check("agent1", "service:web-1")
    assert (c.status, c.output, c.service_tags) == (PASSING, "up", ("new",))
    assert store.service_source("agent1", "api-1") == SOURCE_CONFIG  # config wins over the API


# -- KV ------------------------------------------------------------------------------------------


async def test_kv_cas_and_indexes(store):
    assert await store.kv_put("k", b"v", cas=5) is False  # cas on a missing key
    assert await store.kv_put("k", b"v", cas=0) is True
    e = store.kv_get("k")
    assert await store.kv_put("k", b"w", cas=0) is False  # cas=0: only if absent
    assert await store.kv_put("k", b"w", cas=e.modify_index, flags=42) is True
    e2 = store.kv_get("k")
    assert (e2.value, e2.flags, e2.create_index) == (b"w", 42, e.create_index)
    assert await store.kv_delete("k", cas=e.modify_index) is False
    await store.kv_put("dir/a", b"1")
    await store.kv_put("dir/b", b"2")
    top = store.kv_index("dir/", prefix=True)
    await store.kv_delete("dir/b")
    # Deleting the newest key under a prefix must not send the prefix's index backwards.
    assert store.kv_index("dir/", prefix=True) == store.index > top
    assert store.kv_index("dir/b", prefix=False) == store.index
    assert await store.kv_delete("dir/", recurse=True) is True
    assert store.kv_list("dir/") == []
    i = store.index
    assert await store.kv_delete("missing") is True and store.index == i  # nothing deleted: no write


# -- durability ----------------------------------------------------------------------------------


async def test_reopen_restores_everything_and_index_keeps_growing(tmp_path):
    d = str(tmp_path / "data")
    s = make_store(d)
    await s.open()
    node_id = s.node_id
    await register(s, "web-1", Check={"TTL": "10s"}, Meta={"v": "1"})
    await s.set_check_status("agent1", "service:web-1", PASSING, "ok")
    await s.sync_config_services([service("cfg-1", name="cfg")])  # not persisted
    await s.kv_put("k", b"\x00\xff", flags=2**64 - 1)
    await s.catalog_register(decode_register_request(
        {"Node": "ext", "Address": "10.1.1.1", "Service": {"Service": "redis"}}, datacenter="dc1"))
    last = s.index
    await s.close()

    s2 = make_store(d)
    await s2.open()
    assert s2.node_id == node_id
    assert s2.index == last  # the agent's own registration is unchanged: no write at open
    assert s2.service("agent1", "web-1").meta == {"v": "1"}
    c = s2.check("agent1", "service:web-1")
    assert (c.status, c.output, c.definition.ttl) == (PASSING, "ok", 10.0)
    assert s2.service("agent1", "cfg-1") is None
    assert s2.kv_get("k").value == b"\x00\xff" and s2.kv_get("k").flags == 2**64 - 1
    assert s2.service("ext", "redis") is not None
    await register(s2, "web-2")
    assert s2.index == last + 1
    await s2.close()


async def test_new_node_name_drops_the_old_agent_identity(tmp_path):
    d = str(tmp_path / "data")
    s = make_store(d, node="old")
    await s.open()
    await s.close()
    s2 = make_store(d, node="new")
    await s2.open()
    assert s2.node("old") is None and s2.node("new") is not None
    assert [e.node.name for e in s2.health_service("consul")] == ["new"]
    await s2.close()


async def test_concurrent_writes_share_commits_and_keep_order(tmp_path):
    s = make_store(str(tmp_path / "data"))
    await s.open()
    start = s.index
    await asyncio.gather(*(s.kv_put(f"k{i}", str(i).encode()) for i in range(200)))
    assert s.index == start + 200
    # Indexes follow call order: each write saw the previous ones.
    assert [s.kv_get(f"k{i}").modify_index for i in range(200)] == list(range(start + 1, start + 201))
    await s.close()
    with sqlite3.connect(str(tmp_path / "data" / persist.DB_NAME)) as db:
        assert db.execute("SELECT COUNT(*) FROM kv").fetchone()[0] == 200
        assert db.execute("SELECT value FROM meta WHERE name='index'").fetchone()[0] == str(start + 200)


async def test_disk_refusal_fails_the_write_and_changes_nothing(tmp_path, monkeypatch):
    d = tmp_path / "data"
    s = make_store(str(d))
    await s.open()
    await register(s, "web-1")
    before_index = s.index
    seen: list = []
    s.add_delta_listener(seen.append)
    # The disk refusing a row mid-transaction, as SQLite reports it (a full disk, an I/O
    # error); the real thing is tests/integration/test_faults.py.
    apply = persist.Journal._apply

    def refuse(self, conn, write):
        apply(self, conn, write)
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(persist.Journal, "_apply", refuse)
    try:
        results = await asyncio.gather(register(s, "web-2"), s.kv_put("k", b"v"), return_exceptions=True)
    finally:
        monkeypatch.setattr(persist.Journal, "_apply", apply)
    assert all(isinstance(r, StorageError) for r in results)
    assert "catalog write failed" in str(results[0]) or "earlier catalog write failed" in str(results[0])
    assert results[0].status == 500
    assert s.index == before_index and s.service("agent1", "web-2") is None and s.kv_get("k") is None
    assert seen == []  # nothing uncommitted was ever announced
    # The store recovers: the next write works and builds on committed state only.
    await register(s, "web-3")
    assert s.index == before_index + 1
    assert s.service("agent1", "web-3") is not None and s.service("agent1", "web-2") is None
    await s.close()
    s2 = make_store(str(d))
    await s2.open()
    assert s2.service("agent1", "web-3") is not None and s2.service("agent1", "web-2") is None
    await s2.close()


async def test_unusable_data_dir_fails_open_with_storage_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    s = make_store(str(blocker / "data"))
    with pytest.raises(StorageError) as e:
        await s.open()
    assert str(blocker) in str(e.value)
    assert not s.is_open


async def test_checks_in_state_follow_every_status_change():
    """The per-status index behind /v1/health/state/<state> agrees with a scan of every check
    through registrations, status changes and deregistrations."""
    from dnsdisco.catalog.definition import RegisterRequest
    from dnsdisco.catalog.model import Node

    s = make_store()
    await s.open()

    def scan(status: str) -> list:
        return [c for c in s.checks() if c.status == status]

    for i in range(6):
        await s.catalog_register(RegisterRequest(
            datacenter="dc1", node=Node(name=f"n{i % 2}", address=f"10.0.0.{i % 2 + 1}", datacenter="dc1"),
            service=Service(node=f"n{i % 2}", id=f"s{i}", name="web", port=80),
            checks=(Check(node=f"n{i % 2}", check_id=f"c{i}", name="alive",
                          status=("passing", "warning", "critical")[i % 3], service_id=f"s{i}"),)))
    for status in ("passing", "warning", "critical", "maintenance"):
        assert s.checks_in_state(status) == scan(status), status
    await s.catalog_register(RegisterRequest(  # c0: passing -> critical
        datacenter="dc1", node=Node(name="n0", address="10.0.0.1", datacenter="dc1"), skip_node_update=True,
        checks=(Check(node="n0", check_id="c0", name="alive", status="critical", service_id="s0"),)))
    await s.catalog_deregister("n1", "s1")  # takes c1 (warning) with it
    for status in ("passing", "warning", "critical"):
        assert s.checks_in_state(status) == scan(status), status
    assert [c.check_id for c in s.checks_in_state("critical")] == ["c0", "c2", "c5"]
    await s.close()


async def test_a_failed_open_does_not_keep_the_database_locked(tmp_path):
    """The database is opened with an EXCLUSIVE lock; an open that fails after taking it (here:
    a schema from another version) must let go, or the next attempt finds it locked."""
    d = tmp_path / "data"
    s = make_store(str(d))
    await s.open()
    await s.close()
    db = sqlite3.connect(str(d / persist.DB_NAME), isolation_level=None)
    db.execute("UPDATE meta SET value='999' WHERE name='schema'")
    db.close()
    with pytest.raises(StorageError, match="schema"):
        await make_store(str(d)).open()
    db = sqlite3.connect(str(d / persist.DB_NAME), isolation_level=None, timeout=0.1)
    db.execute("UPDATE meta SET value=? WHERE name='schema'", (persist.SCHEMA_VERSION,))  # not locked
    db.close()
    s = make_store(str(d))
    await s.open()
    await s.close()


async def test_service_names_kept_up_to_date_from_the_names_written(store):
    """catalog/services' summary is patched from the names written since the cached one; after
    every kind of write it equals the summary built afresh from every instance."""
    import random

    from dnsdisco.catalog.store import summarise_services

    rng = random.Random(7)
    names = ["web", "Web", "db", "api", "cache"]
    store.service_names()
    for step in range(300):
        node = f"n{rng.randrange(6)}"
        op = rng.random()
        if op < 0.6:
            body = {"Node": node, "Address": "10.1.1.1", "SkipNodeUpdate": step > 10,
                    "Service": {"ID": f"i{rng.randrange(12)}", "Service": rng.choice(names),
                                "Tags": rng.sample(["a", "b", "c"], rng.randrange(3))}}
            try:
                await store.catalog_register(decode_register_request(body, datacenter="dc1"))
            except CatalogError:
                continue  # SkipNodeUpdate on a node not registered yet
        elif op < 0.9:
            await store.catalog_deregister(node, service_id=f"i{rng.randrange(12)}")
        else:
            await store.catalog_deregister(node)  # the node and all its services
        if step % 3 == 0:
            got = store.service_names()
            assert got == summarise_services(store.services()), step
            assert list(got) == sorted(got)
