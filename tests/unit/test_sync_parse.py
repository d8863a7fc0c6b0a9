"""Reading Consul's JSON at the edge (``dnsdisco.sync.parse``) and the ``upstream`` config
(``dnsdisco.sync.upstream``).

The fixture documents below are written by hand for these tests, in the shapes Consul's API
docs and servers use (``spec/http-api.md`` b.8-b.10): a ``/v1/health/service`` row with the
node's ``serfHealth`` check next to the instance's own, ``ServiceTaggedAddresses``-style
``{Address, Port}`` values, a ``null`` ``Meta``, an omitted ``Port``, ``Definition`` as ``{}``
and as the old zero-filled form, ``TaggedAddresses`` null on catalog-registered nodes.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from dnsdisco.catalog.model import (
    CRITICAL,
    PASSING,
    WARNING,
    CheckDefinition,
    TaggedAddress,
    Weights,
)
from dnsdisco.errors import ConfigError
from dnsdisco.sync.mirror import tag_sets, with_check
from dnsdisco.sync.parse import (
    ParseError,
    parse_check,
    parse_checks,
    parse_datacenters,
    parse_health_service,
    parse_node,
    parse_nodes,
    parse_services,
)
from dnsdisco.sync.upstream import UpstreamConfig, parse_upstream, upstream_from_env

# -- fixture documents ------------------------------------------------------------------------------

# GET /v1/health/service/billing: two instances. The first runs on an agent node (serfHealth,
# lan/wan tagged addresses, consul-network-segment meta) with an HTTP check; the second on a
# catalog-registered external node (no serfHealth, null TaggedAddresses/Meta) whose service has
# no port (omitted), null Meta, and an externally set warning check with an empty Definition.
HEALTH_SERVICE = json.loads("""
[
  {
    "Node": {
      "ID": "2f0c8d1e-6a4b-4c11-9d7e-3b5a1c9e0f42",
      "Node": "app-07",
      "Address": "10.20.1.7",
      "Datacenter": "east",
      "TaggedAddresses": {"lan": "10.20.1.7", "lan_ipv4": "10.20.1.7", "wan": "198.51.100.7",
                          "wan_ipv4": "198.51.100.7"},
      "Meta": {"consul-network-segment": "", "rack": "r12"},
      "CreateIndex": 31,
      "ModifyIndex": 88
    },
    "Service": {
      "ID": "billing-1",
      "Service": "billing",
      "Tags": ["v2", "primary"],
      "Address": "10.20.1.70",
      "TaggedAddresses": {
        "lan_ipv4": {"Address": "10.20.1.70", "Port": 7300},
        "wan_ipv4": {"Address": "198.51.100.70", "Port": 17300}
      },
      "Meta": {"owner": "payments"},
      "Port": 7300,
      "Weights": {"Passing": 5, "Warning": 1},
      "EnableTagOverride": false,
      "Proxy": {"MeshGateway": {}, "Expose": {}},
      "Connect": {},
      "CreateIndex": 90,
      "ModifyIndex": 95
    },
    "Checks": [
      {
        "Node": "app-07",
        "CheckID": "serfHealth",
        "Name": "Serf Health Status",
        "Status": "passing",
        "Notes": "",
        "Output": "Agent alive and reachable",
        "ServiceID": "",
        "ServiceName": "",
        "ServiceTags": [],
        "Type": "",
        "Interval": "",
        "Timeout": "",
        "ExposedPort": 0,
        "Definition": {},
        "CreateIndex": 31,
        "ModifyIndex": 31
      },
      {
        "Node": "app-07",
        "CheckID": "service:billing-1",
        "Name": "billing http",
        "Status": "passing",
        "Notes": "",
        "Output": "HTTP GET http://10.20.1.70:7300/health: 200 OK",
        "ServiceID": "billing-1",
        "ServiceName": "billing",
        "ServiceTags": ["v2", "primary"],
        "Type": "http",
        "Interval": "10s",
        "Timeout": "2s",
        "ExposedPort": 0,
        "Definition": {
          "HTTP": "http://10.20.1.70:7300/health",
          "Header": {"X-Probe": ["dns"]},
          "Method": "HEAD",
          "TLSSkipVerify": true,
          "Interval": "10s",
          "Timeout": "2s",
          "DeregisterCriticalServiceAfter": "1m30s"
        },
        "CreateIndex": 90,
        "ModifyIndex": 97
      }
    ]
  },
  {
    "Node": {
      "ID": "",
      "Node": "legacy-db",
      "Address": "db.legacy.example.",
      "Datacenter": "east",
      "TaggedAddresses": null,
      "Meta": null,
      "CreateIndex": 40,
      "ModifyIndex": 40
    },
    "Service": {
      "ID": "billing-legacy",
      "Service": "billing",
      "Tags": [],
      "Address": "",
      "Meta": null,
      "Weights": {"Passing": 1, "Warning": 1},
      "EnableTagOverride": true,
      "Proxy": {"MeshGateway": {}, "Expose": {}},
      "Connect": {},
      "CreateIndex": 41,
      "ModifyIndex": 41
    },
    "Checks": [
      {
        "Node": "legacy-db",
        "CheckID": "external-probe",
        "Name": "probe from esm",
        "Status": "warning",
        "Notes": "set by an external checker",
        "Output": "slow",
        "ServiceID": "billing-legacy",
        "ServiceName": "billing",
        "ServiceTags": null,
        "Type": "",
        "Definition": {},
        "CreateIndex": 42,
        "ModifyIndex": 120
      }
    ]
  }
]
""")

# GET /v1/catalog/nodes (an older server: no Datacenter field on a node is tolerated too).
CATALOG_NODES = json.loads("""
[
  {"ID": "2f0c8d1e-6a4b-4c11-9d7e-3b5a1c9e0f42", "Node": "app-07", "Address": "10.20.1.7",
   "Datacenter": "east", "TaggedAddresses": {"lan": "10.20.1.7", "wan": "198.51.100.7"},
   "Meta": {"consul-network-segment": ""}, "CreateIndex": 31, "ModifyIndex": 88},
  {"ID": "", "Node": "legacy-db", "Address": "db.legacy.example.", "TaggedAddresses": null,
   "Meta": null, "CreateIndex": 40, "ModifyIndex": 40}
]
""")

# GET /v1/catalog/services: the union of tags per name; a server always lists consul.
CATALOG_SERVICES = json.loads('{"consul": [], "billing": ["v2", "primary"], "Billing": ["old"], "cache": null}')

# GET /v1/health/state/any, including the old zero-filled Definition form ("Interval":"0s").
STATE_ANY = json.loads("""
[
  {"Node": "app-07", "CheckID": "serfHealth", "Name": "Serf Health Status", "Status": "critical",
   "Notes": "", "Output": "Agent not live or unreachable", "ServiceID": "", "ServiceName": "",
   "ServiceTags": [], "Type": "", "Definition": {"Interval": "0s", "Timeout": "0s",
   "DeregisterCriticalServiceAfter": "0s", "HTTP": "", "TCP": "", "Header": null,
   "ScriptArgs": null}, "CreateIndex": 31, "ModifyIndex": 130},
  {"Node": "app-07", "CheckID": "_node_maintenance", "Name": "Node Maintenance Mode",
   "Status": "critical", "Notes": "kernel upgrade", "Output": "", "ServiceID": "", "ServiceName": "",
   "ServiceTags": [], "Type": "", "Definition": {}, "CreateIndex": 131, "ModifyIndex": 131},
  {"Node": "cache-1", "CheckID": "service:redis", "Name": "redis ttl", "Status": "passing",
   "Notes": "", "Output": "", "ServiceID": "redis", "ServiceName": "redis", "ServiceTags": [],
   "Type": "ttl", "Interval": "", "Timeout": "", "Definition": {"TTL": "30s"},
   "CreateIndex": 50, "ModifyIndex": 51},
  {"Node": "cache-1", "CheckID": "tcp-6379", "Name": "redis port", "Status": "passing",
   "ServiceID": "redis", "ServiceName": "redis", "Type": "tcp", "Interval": "5s", "Timeout": "1s",
   "Definition": {"TCP": "127.0.0.1:6379", "Interval": "5s", "Timeout": "1s",
   "ScriptArgs": []}, "CreateIndex": 52, "ModifyIndex": 52}
]
""")


# -- health/service ---------------------------------------------------------------------------------


def test_health_service_entries() -> None:
    first, second = parse_health_service(HEALTH_SERVICE)
    node = first.node
    assert (node.name, node.address, node.datacenter, node.id) == (
        "app-07", "10.20.1.7", "east", "2f0c8d1e-6a4b-4c11-9d7e-3b5a1c9e0f42")
    assert node.tagged_addresses == {"lan": "10.20.1.7", "lan_ipv4": "10.20.1.7", "wan": "198.51.100.7",
                                     "wan_ipv4": "198.51.100.7"}
    assert node.meta == {"consul-network-segment": "", "rack": "r12"}
    assert (node.create_index, node.modify_index) == (31, 88)

    svc = first.service
    assert svc.node == "app-07"  # the NodeService JSON does not name its node: the row does
    assert (svc.id, svc.name, svc.tags, svc.address, svc.port) == (
        "billing-1", "billing", ("v2", "primary"), "10.20.1.70", 7300)
    assert svc.tagged_addresses == {"lan_ipv4": TaggedAddress("10.20.1.70", 7300),
                                    "wan_ipv4": TaggedAddress("198.51.100.70", 17300)}
    assert svc.weights == Weights(passing=5, warning=1)
    assert svc.meta == {"owner": "payments"}
    assert (svc.create_index, svc.modify_index) == (90, 95)

    # Node checks and the instance's own, in the order sent; both count for health.
    assert [c.check_id for c in first.checks] == ["serfHealth", "service:billing-1"]
    assert first.status == PASSING
    serf, http = first.checks
    assert serf.service_id == "" and serf.output == "Agent alive and reachable"
    assert serf.definition == CheckDefinition() and serf.type == ""
    assert http.type == "http"
    assert http.definition.http == "http://10.20.1.70:7300/health"
    assert http.definition.header == {"X-Probe": ("dns",)}
    assert http.definition.method == "HEAD" and http.definition.tls_skip_verify
    assert (http.definition.interval, http.definition.timeout) == (10.0, 2.0)
    assert http.definition.deregister_critical_service_after == 90.0
    assert http.service_tags == ("v2", "primary")


def test_health_service_tolerates_nulls_and_omissions() -> None:
    _, second = parse_health_service(HEALTH_SERVICE)
    assert second.node.tagged_addresses == {} and second.node.meta == {}
    assert second.node.address == "db.legacy.example."  # a hostname: the DNS side makes it a CNAME
    svc = second.service
    assert svc.port == 0  # "Port" omitted (json:",omitempty")
    assert svc.meta == {}  # "Meta": null
    assert svc.tagged_addresses == {}  # omitted when empty
    assert svc.address == "" and svc.enable_tag_override
    (check,) = second.checks
    assert check.status == WARNING and check.service_tags == () and check.definition == CheckDefinition()
    assert second.status == WARNING


def test_health_service_empty_and_wrong_shapes() -> None:
    assert parse_health_service([]) == ()
    assert parse_health_service(None) == ()  # a nil slice
    with pytest.raises(ParseError):
        parse_health_service({"Node": {}})  # not a list
    with pytest.raises(ParseError):
        parse_health_service([{"Node": {"Address": "10.0.0.1"}, "Service": {"Service": "x"}}])  # no node name
    with pytest.raises(ParseError):
        parse_health_service([{"Node": {"Node": "n"}, "Service": {"ID": "x"}}])  # no service name


def test_known_nodes_are_reused_only_at_the_same_version() -> None:
    app = parse_node(HEALTH_SERVICE[0]["Node"])
    first, _ = parse_health_service(HEALTH_SERVICE, {"app-07": app})
    assert first.node is app
    moved = replace(app, modify_index=89, address="10.20.1.8")  # a newer version we hold
    first, _ = parse_health_service(HEALTH_SERVICE, {"app-07": moved})
    assert first.node == app and first.node is not moved


def test_tagged_address_spellings() -> None:
    # Consul writes Address/Port; its docs samples show lower case. Both read the same.
    row = {"Node": {"Node": "n"}, "Service": {"Service": "s", "TaggedAddresses": {
        "lan": {"address": "10.0.0.1", "port": 80}, "wan": {"Address": "192.0.2.1"}}}}
    (entry,) = parse_health_service([row])
    assert entry.service.tagged_addresses == {"lan": TaggedAddress("10.0.0.1", 80), "wan": TaggedAddress("192.0.2.1", 0)}
    assert entry.service.weights == Weights()  # missing Weights: Consul's default 1/1
    assert entry.service.id == "s"  # an ID defaults to the name


# -- lists ------------------------------------------------------------------------------------------


def test_catalog_nodes() -> None:
    app, legacy = parse_nodes(CATALOG_NODES)
    assert app.name == "app-07" and app.tagged_addresses == {"lan": "10.20.1.7", "wan": "198.51.100.7"}
    assert legacy.datacenter == "" and legacy.meta == {} and legacy.tagged_addresses == {}
    assert parse_node(CATALOG_NODES[0]) == app
    assert parse_nodes([]) == []


def test_catalog_services() -> None:
    names = parse_services(CATALOG_SERVICES)
    assert names == {"consul": (), "billing": ("v2", "primary"), "Billing": ("old",), "cache": ()}
    # The DNS side's keys: case folded, tags merged (Consul's names are case-insensitive).
    assert tag_sets(names) == {"consul": frozenset(), "billing": frozenset({"v2", "primary", "old"}),
                               "cache": frozenset()}
    with pytest.raises(ParseError):
        parse_services(["consul"])


def test_health_state_checks() -> None:
    serf, maint, ttl, tcp = parse_checks(STATE_ANY)
    # The old zero-filled Definition reads as empty.
    assert serf.definition == CheckDefinition() and serf.status == CRITICAL
    assert maint.check_id == "_node_maintenance" and maint.notes == "kernel upgrade"
    assert ttl.definition.ttl == 30.0 and ttl.type == "ttl"
    assert tcp.definition.tcp == "127.0.0.1:6379" and tcp.definition.interval == 5.0 and tcp.type == "tcp"
    assert (tcp.create_index, tcp.modify_index) == (52, 52)
    assert tcp.notes == "" and tcp.output == ""  # omitted strings


def test_check_top_level_interval_is_a_fallback() -> None:
    c = parse_check({"Node": "n", "CheckID": "c", "Interval": "15s", "Timeout": "3s", "Definition": {}})
    assert (c.definition.interval, c.definition.timeout) == (15.0, 3.0)
    assert c.status == CRITICAL  # no status: Consul's default
    # Integer nanoseconds (what decoders also accept) read as durations too.
    c = parse_check({"Node": "n", "CheckID": "c", "Definition": {"Interval": 2_000_000_000}})
    assert c.definition.interval == 2.0
    with pytest.raises(ParseError):
        parse_check({"Node": "n", "CheckID": "c", "Definition": {"Interval": "ten seconds"}})
    with pytest.raises(ParseError):
        parse_check({"Node": "n", "Name": "no id"})


def test_datacenters() -> None:
    assert parse_datacenters(["east", "west", ""]) == ["east", "west"]
    with pytest.raises(ParseError):
        parse_datacenters({"east": 1})


# -- patching an entry with a check (the mirror's pure helper) -------------------------------------


def test_with_check_replaces_in_place_and_inserts_in_id_order() -> None:
    first, _ = parse_health_service(HEALTH_SERVICE)
    serf, http = first.checks
    flapped = parse_check({**HEALTH_SERVICE[0]["Checks"][1], "Status": "critical", "ModifyIndex": 140})
    patched = with_check(first, http.check_id, flapped)
    assert patched.checks == (serf, flapped) and patched.status == CRITICAL
    assert with_check(patched, http.check_id, flapped) is patched  # no change, same object
    maint = parse_check(STATE_ANY[1])
    assert [c.check_id for c in with_check(first, maint.check_id, maint).checks] == [
        "_node_maintenance", "serfHealth", "service:billing-1"]
    assert with_check(first, "serfHealth", None).checks == (http,)
    assert with_check(first, "absent", None) is first


# -- upstream config -------------------------------------------------------------------------------


def test_upstream_defaults() -> None:
    up = parse_upstream({}, "f.json")
    assert up == UpstreamConfig()
    assert up.address == "http://127.0.0.1:8500" and up.wait == 300.0
    assert (up.query_interval, up.query_burst) == (15.0, 2)
    assert (up.backoff_min, up.backoff_max) == (0.1, 30.0)


def test_upstream_full() -> None:
    up = parse_upstream({
        "address": "https://consul.service.example:8501/",
        "token": "b1gs3cr3t",
        "datacenters": ["west", "West", "north"],
        "ca_file": "/etc/consul/ca.pem",
        "cert_file": "/etc/consul/client.pem",
        "key_file": "/etc/consul/client-key.pem",
        "tls_server_name": "server.east.consul",
        "wait": "2m",
        "query_interval": "1s",
        "query_burst": 4,
        "backoff_min": "50ms",
        "backoff_max": "10s",
        "fetch_concurrency": 16,
        "resync_interval": "0s",
    }, "mirror.json")
    assert up.address == "https://consul.service.example:8501" and up.tls
    assert up.datacenters == ("west", "north")  # case-insensitive de-duplication
    assert (up.wait, up.query_interval, up.query_burst) == (120.0, 1.0, 4)
    assert (up.backoff_min, up.backoff_max, up.fetch_concurrency, up.resync_interval) == (0.05, 10.0, 16, 0.0)


def test_upstream_short_forms() -> None:
    assert parse_upstream("consul:8500", "-upstream").address == "http://consul:8500"
    assert parse_upstream({"datacenters": ["east", "*"]}, "f").datacenters == ("*",)
    assert parse_upstream({"datacenters": ["*"]}, "f").all_datacenters
    unix = parse_upstream({"address": "unix:///run/consul/http.sock"}, "f")
    assert unix.unix_path == "/run/consul/http.sock" and unix.base_url == "http://localhost"


@pytest.mark.parametrize(
    ("raw", "key", "text"),
    [
        ({"adress": "x"}, "upstream.adress", "unknown key"),
        ({"address": "ftp://consul:21"}, "upstream.address", "scheme"),
        ({"address": "http://consul:8500/v1"}, "upstream.address", "no path"),
        ({"address": "http://consul:99999"}, "upstream.address", "invalid port"),
        ({"address": ""}, "upstream.address", "empty"),
        ({"token": 5}, "upstream.token", "string"),
        ({"datacenters": "east"}, None, None),  # a single string is accepted
        ({"datacenters": [""]}, "upstream.datacenters", "empty"),
        ({"datacenters": {"east": True}}, "upstream.datacenters", "list"),
        ({"wait": 60}, "upstream.wait", "duration"),
        ({"wait": "20m"}, "upstream.wait", "between"),
        ({"wait": "100ms"}, "upstream.wait", "between"),
        ({"query_burst": 0}, "upstream.query_burst", "between"),
        ({"fetch_concurrency": True}, "upstream.fetch_concurrency", "integer"),
        ({"tls_skip_verify": "yes"}, "upstream.tls_skip_verify", "true or false"),
        ({"cert_file": "/c.pem"}, "upstream.key_file", "both"),
        ({"key_file": "/k.pem"}, "upstream.cert_file", "both"),
        ({"backoff_min": "5s", "backoff_max": "1s"}, "upstream.backoff_max", "backoff_min"),
        (["http://x"], "upstream", "object"),
    ],
)
def test_upstream_errors(raw: object, key: str | None, text: str | None) -> None:
    if key is None:
        parse_upstream(raw, "f.json")  # type: ignore[arg-type]
        return
    with pytest.raises(ConfigError) as err:
        parse_upstream(raw, "f.json")  # type: ignore[arg-type]
    assert err.value.key == key and err.value.source == "f.json"
    assert text in str(err.value) and "f.json" in str(err.value)


def test_upstream_from_env() -> None:
    env = {
        "CONSUL_HTTP_ADDR": "10.0.0.5:8501",
        "CONSUL_HTTP_SSL": "true",
        "CONSUL_HTTP_SSL_VERIFY": "false",
        "CONSUL_HTTP_TOKEN": "tok",
        "CONSUL_CACERT": "/ca.pem",
        "CONSUL_CLIENT_CERT": "/c.pem",
        "CONSUL_CLIENT_KEY": "/k.pem",
        "CONSUL_TLS_SERVER_NAME": "consul.internal",
        "HOME": "/root",
    }
    raw = upstream_from_env(env)
    assert raw == {"address": "https://10.0.0.5:8501", "tls_skip_verify": True, "token": "tok",
                   "ca_file": "/ca.pem", "cert_file": "/c.pem", "key_file": "/k.pem",
                   "tls_server_name": "consul.internal"}
    up = parse_upstream(raw, "environment")
    assert up.tls and up.tls_skip_verify and up.token == "tok"


def test_upstream_env_is_overridden_by_files_and_flags() -> None:
    raw = upstream_from_env({"CONSUL_HTTP_ADDR": "http://env:8500", "CONSUL_HTTP_TOKEN": "env-token"})
    merged = {**raw, **{"address": "http://file:8500"}}  # the file (or flag) wins key by key
    up = parse_upstream(merged, "f.json")
    assert up.address == "http://file:8500" and up.token == "env-token"


def test_upstream_from_env_empty_and_bad() -> None:
    assert upstream_from_env({}) == {}
    assert upstream_from_env({"CONSUL_HTTP_ADDR": "", "CONSUL_HTTP_TOKEN": ""}) == {}
    assert upstream_from_env({"CONSUL_HTTP_SSL": "1"}) == {"address": "https://127.0.0.1:8500"}
    assert upstream_from_env({"CONSUL_HTTP_ADDR": "unix:///s.sock"}) == {"address": "unix:///s.sock"}
    with pytest.raises(ConfigError) as err:
        upstream_from_env({"CONSUL_HTTP_SSL": "maybe"})
    assert err.value.source == "CONSUL_HTTP_SSL"
    with pytest.raises(ConfigError) as err:
        upstream_from_env({"CONSUL_HTTP_ADDR": "gopher://x"})
    assert err.value.source == "CONSUL_HTTP_ADDR"


# -- a sweep by node: /v1/catalog/node-services/<node> against the mirrored instances -------------

NODE_SERVICES = json.loads("""
{
  "Node": {
    "ID": "2f0c8d1e-6a4b-4c11-9d7e-3b5a1c9e0f42",
    "Node": "app-07",
    "Address": "10.20.1.7",
    "Datacenter": "east",
    "TaggedAddresses": {"lan": "10.20.1.7", "wan": "198.51.100.7"},
    "Meta": {"rack": "r12"},
    "CreateIndex": 31,
    "ModifyIndex": 88
  },
  "Services": [
    {
      "ID": "billing-1",
      "Service": "billing",
      "Tags": ["v2", "primary"],
      "Address": "10.20.1.70",
      "TaggedAddresses": {"lan_ipv4": {"Address": "10.20.1.70", "Port": 7300}},
      "Meta": null,
      "Port": 7300,
      "Weights": {"Passing": 5, "Warning": 1},
      "EnableTagOverride": false,
      "Proxy": {"MeshGateway": {}, "Expose": {}},
      "Connect": {},
      "PeerName": "",
      "CreateIndex": 90,
      "ModifyIndex": 95
    }
  ]
}
""")


def test_node_services_bodies_name_the_services_whose_instances_differ():
    from dnsdisco.sync.consul import UpstreamError
    from dnsdisco.sync.mirror import Mirror, _Datacenter
    from dnsdisco.sync.upstream import UpstreamConfig

    mirror = Mirror(UpstreamConfig(address="http://127.0.0.1:1"), local_datacenter="east",
                    on_delta=lambda d: None, on_stale=lambda dc, s: None)
    dc = _Datacenter(mirror, "east", None)
    dc._set_entries("billing", parse_health_service(HEALTH_SERVICE))
    assert dc._node_changes("app-07", NODE_SERVICES) == {}  # as mirrored
    assert dc._node_changes("app-08", {"Node": {}, "Services": []}) == {}  # nothing there either

    def body(*rows: dict) -> dict:
        return {**NODE_SERVICES, "Services": list(rows)}

    row = NODE_SERVICES["Services"][0]
    # Re-registered with another port: a new ModifyIndex.
    assert dc._node_changes("app-07", body({**row, "Port": 7301, "ModifyIndex": 120})) == {"billing": "billing"}
    # Deregistered (the node's list lacks it), or the node itself gone (null).
    assert dc._node_changes("app-07", body()) == {"billing": "billing"}
    assert dc._node_changes("app-07", None) == {"billing": "billing"}
    # A new instance, of a service spelled as registered; a renamed one names both services.
    extra = {**row, "ID": "Ledger-1", "Service": "Ledger", "CreateIndex": 130, "ModifyIndex": 130}
    assert dc._node_changes("app-07", body(row, extra)) == {"ledger": "Ledger"}
    assert dc._node_changes("app-07", body({**row, "Service": "invoices", "ModifyIndex": 140})) == {
        "invoices": "invoices", "billing": "billing"}
    # Rows that are not instances are passed over; a body that is not an object is refused.
    assert dc._node_changes("app-07", body(row, "junk", {"ID": 7})) == {}
    with pytest.raises(UpstreamError, match="expected an object"):
        dc._node_changes("app-07", ["not", "an", "object"])


def test_check_rows_are_listed_by_node():
    from dnsdisco.sync.mirror import _CheckRow, _CheckRows

    rows = _CheckRows()
    rows[("a", "c1")] = _CheckRow((1, 1), "web-1", "web")
    rows[("a", "serfHealth")] = _CheckRow((1, 2), "", "")
    rows[("b", "c1")] = _CheckRow((3, 3), "web-2", "web")
    assert len(rows) == 3 and sorted(rows) == [("a", "c1"), ("a", "serfHealth"), ("b", "c1")]
    assert sorted(rows.on_node("a")) == [("a", "c1"), ("a", "serfHealth")] and rows.on_node("z") == []
    assert rows.pop(("a", "c1")).service_id == "web-1" and rows.pop(("a", "c1")) is None
    rows[("b", "c1")] = _CheckRow((3, 4), "web-2", "web")  # a new version replaces the row
    assert rows.get(("b", "c1")).version == (3, 4) and rows.on_node("b") == [("b", "c1")]
    rows.pop(("a", "serfHealth"))
    assert rows.on_node("a") == [] and len(rows) == 1


async def test_pushed_entries_older_than_a_check_patch_are_read_instead():
    """A dnsdisco upstream pushes a changed service's entries with the services delta. Taken
    in the same round after a newer check list (the lists are applied first), they must not
    undo the check's patch: the service is read instead."""
    import copy

    from dnsdisco.sync.consul import QueryMeta
    from dnsdisco.sync.mirror import Mirror, _Datacenter
    from dnsdisco.sync.parse import parse_node
    from dnsdisco.sync.upstream import UpstreamConfig

    mirror = Mirror(UpstreamConfig(address="http://127.0.0.1:1"), local_datacenter="east",
                    on_delta=lambda d: None, on_stale=lambda dc, s: None)
    dc = _Datacenter(mirror, "east", None)
    rows = [HEALTH_SERVICE[0]]
    dc.nodes = {"app-07": parse_node(rows[0]["Node"])}
    dc.tags = {"billing": frozenset({"v2", "primary"})}
    dc.url_names = {"billing": "billing"}
    dc._set_entries("billing", parse_health_service(rows, dc.nodes))
    dc.svc_index["billing"] = 97
    dc.synced = True
    dc._services_index = dc._checks_index = dc.index = 97
    # Index 99: the instance's check goes critical (the check list names billing) ...
    crit = {**copy.deepcopy(rows[0]["Checks"][1]), "Status": "critical", "ModifyIndex": 99}
    hint = QueryMeta(index=99, changed=("billing",))
    await dc._apply_nonpassing(([crit], hint), ([], hint))
    assert [c.status for c in dc.entries["billing"][0].checks] == ["passing", "critical"]
    # ... then the services delta of write 98 arrives with billing's entries as of 98.
    older = copy.deepcopy(rows)
    older[0]["Service"]["ModifyIndex"] = 98
    meta = QueryMeta(index=98, changed=("billing",), delta=True, entries={"billing": (older, 98)})
    await dc._apply_services({"billing": ["v2", "primary"]}, meta)
    assert [c.status for c in dc.entries["billing"][0].checks] == ["passing", "critical"]
    assert dc.pushed == 0 and "billing" in dc._dirty  # read instead (and, failing here, queued)
    # Entries as new as the patch are taken as they are.
    newer = copy.deepcopy(rows)
    newer[0]["Checks"][1] = crit
    newer[0]["Service"]["Port"] = 7399
    meta = QueryMeta(index=100, changed=("billing",), delta=True, entries={"billing": (newer, 100)})
    await dc._apply_services({"billing": ["v2", "primary"]}, meta)
    assert dc.pushed == 1 and dc.entries["billing"][0].service.port == 7399 and dc.svc_index["billing"] == 100
