"""The definition decoder: key spellings, defaults, durations, and every refusal with Consul's text."""

from __future__ import annotations

from typing import Any

import pytest

from dnsdisco.catalog.definition import (
    SCRIPTS_DISABLED,
    decode_check_definition,
    decode_check_update,
    decode_deregister_request,
    decode_register_request,
    decode_service_definition,
)
from dnsdisco.catalog.model import CRITICAL, PASSING, TaggedAddress, Weights
from dnsdisco.errors import CatalogError, DecodeError


def svc(raw: dict[str, Any], *, scripts: bool = False, strict: bool = True):
    return decode_service_definition(raw, node="n1", enable_script_checks=scripts, strict=strict)


def chk(raw: dict[str, Any], *, scripts: bool = False):
    return decode_check_definition(raw, node="n1", enable_script_checks=scripts)


# -- accepted forms -----------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    # PascalCase (Consul docs, node-consul), lower-case (py-consul), snake_case (config files).
    {"Name": "web", "ID": "web-1", "Port": 80, "Tags": ["a"], "EnableTagOverride": True,
     "Check": {"TTL": "10s", "DeregisterCriticalServiceAfter": "90s"}},
    {"name": "web", "id": "web-1", "port": 80, "tags": ["a"], "enabletagoverride": True,
     "checks": [{"ttl": "10s", "DeregisterCriticalServiceAfter": "90s"}]},
    {"name": "web", "id": "web-1", "port": 80, "tags": ["a"], "enable_tag_override": True,
     "check": {"ttl": 10_000_000_000, "deregister_critical_service_after": "1m30s"}},
])
def test_key_spellings_decode_alike(raw):
    service, checks = svc(raw)
    assert (service.node, service.id, service.name, service.port, service.tags) == ("n1", "web-1", "web", 80, ("a",))
    assert service.enable_tag_override is True
    assert len(checks) == 1
    c = checks[0]
    assert (c.check_id, c.name, c.status, c.service_id, c.service_name) == (
        "service:web-1", "Service 'web' check", CRITICAL, "web-1", "web")
    assert c.definition.ttl == 10.0
    assert c.definition.deregister_critical_service_after == 90.0
    assert c.type == "ttl"


def test_defaults_id_weights_and_numbered_check_ids():
    service, checks = svc({"Name": "api", "Check": {"TTL": "5s"}, "Checks": [
        {"HTTP": "http://x/", "Interval": "10s", "Status": "passing"}, {"TCP": "h:1", "Interval": "1m", "Name": "t"}]})
    assert service.id == "api"
    assert service.weights == Weights(1, 1)
    assert service.tags == () and service.meta == {}
    # Check comes first, then Checks; numbered from 1 because there are several.
    assert [c.check_id for c in checks] == ["service:api:1", "service:api:2", "service:api:3"]
    assert [c.type for c in checks] == ["ttl", "http", "tcp"]
    assert [c.status for c in checks] == [CRITICAL, PASSING, CRITICAL]
    assert checks[2].name == "t"
    assert checks[2].definition.interval == 60.0


def test_explicit_check_id_and_header_and_snake_aliases():
    _, checks = svc({"name": "web", "checks": [{
        "id": "web-http", "http": "https://x/h", "interval": "10s", "timeout": "2s", "method": "POST",
        "header": {"X-A": ["1", "2"]}, "body": "{}", "tls_skip_verify": True, "tls_server_name": "x",
        "disable_redirects": True, "success_before_passing": 2, "failures_before_warning": 1,
        "failures_before_critical": 3, "output_max_size": 100, "notes": "n", "service_id": "ignored"}]})
    d = checks[0].definition
    assert checks[0].check_id == "web-http" and checks[0].notes == "n"
    assert (d.method, d.header, d.body, d.tls_skip_verify, d.tls_server_name, d.disable_redirects) == (
        "POST", {"X-A": ("1", "2")}, "{}", True, "x", True)
    assert (d.interval, d.timeout, d.success_before_passing, d.failures_before_warning,
            d.failures_before_critical, d.output_max_size) == (10.0, 2.0, 2, 1, 3, 100)


@pytest.mark.parametrize("raw, interval, after", [
    ({"HTTP": "http://x", "Interval": "100ms"}, 1.0, 0.0),  # raised to the 1s floor, not refused
    ({"TCP": "h:1", "Interval": "250000000"}, None, None),  # a bare number string is not a duration
    ({"TTL": "10s", "DeregisterCriticalServiceAfter": "10s"}, 0.0, 60.0),  # raised to the 1m floor
    ({"TCP": "h:1", "Interval": 2_500_000_000}, 2.5, 0.0),  # integer nanoseconds
])
def test_duration_floors_and_forms(raw, interval, after):
    if interval is None:
        with pytest.raises(DecodeError) as e:
            svc({"Name": "x", "Check": raw})
        assert e.value.message == 'Request decode failed: time: missing unit in duration "250000000"'
        return
    _, checks = svc({"Name": "x", "Check": raw})
    assert checks[0].definition.interval == interval
    assert checks[0].definition.deregister_critical_service_after == after


def test_ip_address_gets_tagged_addresses_unless_set():
    service, _ = svc({"Name": "x", "Address": "10.0.0.5", "Port": 8080,
                      "TaggedAddresses": {"wan_ipv4": {"address": "1.2.3.4", "port": 80}}})
    assert service.tagged_addresses == {
        "wan_ipv4": TaggedAddress("1.2.3.4", 80), "lan_ipv4": TaggedAddress("10.0.0.5", 8080)}
    v6, _ = svc({"Name": "x", "Address": "2001:db8::1", "Port": 1})
    assert set(v6.tagged_addresses) == {"lan_ipv6", "wan_ipv6"}
    host, _ = svc({"Name": "x", "Address": "db.example.com"})
    assert host.tagged_addresses == {}


def test_not_strict_ignores_unknown_keys():
    service, _ = svc({"Name": "x", "Script": "old", "Bogus": 1}, strict=False)
    assert service.name == "x"


def test_script_checks_allowed_when_enabled():
    _, checks = svc({"Name": "x", "Check": {"Args": ["/bin/true"], "Interval": "10s"}}, scripts=True)
    assert checks[0].definition.script_args == ("/bin/true",) and checks[0].type == "script"
    c = chk({"Name": "s", "ScriptArgs": ["/bin/true"], "Interval": "5s"}, scripts=True)
    assert c.type == "script"


def test_check_definition_defaults():
    c = chk({"name": "mem", "ttl": "30s", "serviceid": "web-1", "notes": "n", "status": "warning"})
    assert (c.node, c.check_id, c.name, c.service_id, c.notes, c.status) == ("n1", "mem", "mem", "web-1", "n", "warning")
    c2 = chk({"Name": "disk", "ID": "disk-1", "TTL": "1m"})
    assert (c2.check_id, c2.status) == ("disk-1", CRITICAL)


# -- refusals -------------------------------------------------------------------------------------

SERVICE_ERRORS: list[tuple[Any, str, int, str | None]] = [
    ({"Name": "x", "Foo": 1}, 'Request decode failed: json: unknown field "Foo"', 400, "Foo"),
    ({"Name": "x", "Check": {"TTL": "1s", "script": "x"}}, 'Request decode failed: json: unknown field "script"', 400,
     "Check.script"),
    ({"Name": "x", "Port": "80"},
     "Request decode failed: json: cannot unmarshal string into Go struct field ServiceDefinition.Port of type int",
     400, "Port"),
    ({"Name": "x", "Port": 80.5},
     "Request decode failed: json: cannot unmarshal number 80.5 into Go struct field ServiceDefinition.Port of type int",
     400, "Port"),
    ({"Name": 5}, "Request decode failed: json: cannot unmarshal number into Go struct field ServiceDefinition.Name "
     "of type string", 400, "Name"),
    ({"Name": "x", "Tags": "a"}, "Request decode failed: json: cannot unmarshal string into Go struct field "
     "ServiceDefinition.Tags of type []string", 400, "Tags"),
    ({"Name": "x", "Tags": [1]}, "Request decode failed: json: cannot unmarshal number into Go struct field "
     "ServiceDefinition.Tags of type string", 400, "Tags"),
    ({"Name": "x", "Meta": {"a": 1}}, "Request decode failed: json: cannot unmarshal number into Go struct field "
     "ServiceDefinition.Meta of type string", 400, "Meta"),
    ({"Name": "x", "EnableTagOverride": "yes"}, "Request decode failed: json: cannot unmarshal string into Go struct "
     "field ServiceDefinition.EnableTagOverride of type bool", 400, "EnableTagOverride"),
    ({"Name": "x", "Check": []}, "Request decode failed: json: cannot unmarshal array into Go struct field "
     "ServiceDefinition.Check of type structs.CheckType", 400, "Check"),
    ({"Name": "x", "Check": {"TTL": "abc"}}, 'Request decode failed: time: invalid duration "abc"', 400, "Check.TTL"),
    ({"Name": "x", "Check": {"TTL": True}}, "Request decode failed: invalid duration true", 400, "Check.TTL"),
    ({"Name": "x", "Check": {"TTL": float("inf")}}, "Request decode failed: invalid duration inf", 400, "Check.TTL"),
    ({"Name": "x", "Check": {"Header": {"A": "b"}, "HTTP": "h", "Interval": "1s"}},
     "Request decode failed: json: cannot unmarshal string into Go struct field CheckType.Header of type []string"
     .replace("CheckType", "ServiceDefinition.Check"), 400, "Check.Header"),
    ({}, "Missing service name", 400, "name"),
    ({"ID": "x"}, "Missing service name", 400, "name"),
    ({"Name": "x", "Meta": {"": "v"}},
     "Invalid Service Meta: Couldn't load metadata pair ('', 'v'): Key cannot be blank", 400, "meta"),
    ({"Name": "x", "Meta": {"a b": "v"}},
     "Invalid Service Meta: Couldn't load metadata pair ('a b', 'v'): Key contains invalid characters", 400, "meta"),
    ({"Name": "x", "Meta": {"k" * 129: "v"}},
     f"Invalid Service Meta: Couldn't load metadata pair ('{'k' * 129}', 'v'): Key is too long (limit: 128 characters)",
     400, "meta"),
    ({"Name": "x", "Meta": {"consul-x": "v"}},
     "Invalid Service Meta: Couldn't load metadata pair ('consul-x', 'v'): Key prefix 'consul-' is reserved for "
     "internal use", 400, "meta"),
    ({"Name": "x", "Meta": {"k": "v" * 513}},
     f"Invalid Service Meta: Couldn't load metadata pair ('k', '{'v' * 513}'): Value is too long (limit: 512 "
     "characters)", 400, "meta"),
    ({"Name": "x", "Meta": {f"k{i}": "v" for i in range(65)}},
     "Invalid Service Meta: Node metadata cannot contain more than 64 key/value pairs", 400, "meta"),
    ({"Name": "x", "Weights": {"Passing": 0, "Warning": 1}}, "Invalid Weights: Passing must be greater than 0", 400,
     "weights.passing"),
    ({"Name": "x", "Weights": {"Passing": 1, "Warning": -1}},
     "Invalid Weights: Warning must be greater or equal than 0", 400, "weights.warning"),
    ({"Name": "x", "Weights": {"Passing": 70000, "Warning": 1}},
     "Invalid Weights: DNS Weight must be between 0 and 65535", 400, "weights"),
    ({"Name": "x", "Check": {"TTL": "10s", "Interval": "10s"}},
     "Invalid check: Interval and TTL cannot both be specified", 400, "check"),
    ({"Name": "x", "Check": {"HTTP": "http://x"}},
     "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks", 400, "check"),
    ({"Name": "x", "Checks": [{"TTL": "1s"}, {}]}, "Invalid check: TTL must be > 0 for TTL checks", 400, "checks.1"),
    ({"Name": "x", "Check": {"TTL": "-1s"}}, "Invalid check: TTL must be > 0 for TTL checks", 400, "check"),
    ({"Name": "x", "Check": {"AliasService": "y", "TTL": "1s"}},
     "Invalid check: TTL must be not be set for Alias checks", 400, "check"),
    ({"Name": "x", "Check": {"AliasService": "y", "Interval": "1s"}},
     "Invalid check: Interval cannot be set for Alias checks", 400, "check"),
    ({"Name": "x", "Check": {"TTL": "1s", "OutputMaxSize": -1}}, "Invalid check: MaxOutputMaxSize must be positive",
     400, "check"),
    ({"Name": "x", "Check": {"TCP": "h:1", "Interval": "1s", "FailuresBeforeWarning": 3, "FailuresBeforeCritical": 2}},
     "Invalid check: FailuresBeforeWarning can't be higher than FailuresBeforeCritical", 400, "check"),
    ({"Name": "x", "Check": {"TTL": "1s", "Status": "ok"}},
     "Status for checks must 'passing', 'warning', 'critical'", 400, "check.status"),
    ({"Name": "x", "Address": "0.0.0.0"}, "Invalid service address", 400, "address"),
    ({"Name": "x", "Address": "::"}, "Invalid service address", 400, "address"),
    ({"Name": "x", "Port": 70000}, "Invalid port 70000: must be between 0 and 65535", 400, "port"),
    ({"Name": "x", "Port": -1}, "Invalid port -1: must be between 0 and 65535", 400, "port"),
    ({"Name": "x", "TaggedAddresses": {"lan": {"Address": "a", "Port": 65536}}},
     "Invalid port 65536: must be between 0 and 65535", 400, "tagged_addresses.lan.port"),
    ({"Name": "x", "Connect": {"SidecarService": {}}}, "Connect sidecar services are not supported by dnsdisco", 400,
     "connect.sidecar_service"),
    ({"Name": "x", "Check": {"AliasService": "y"}}, "Invalid check: Alias checks are not supported by dnsdisco", 400,
     "check"),
    ({"Name": "x", "Check": {"H2PING": "h:1", "Interval": "1s"}},
     "Invalid check: H2PING checks are not supported by dnsdisco", 400, "check"),
    ({"Name": "x", "Check": {"OSService": "s", "Interval": "1s"}},
     "Invalid check: OSService checks are not supported by dnsdisco", 400, "check"),
    ({"Name": "x", "Check": {"DockerContainerID": "c", "Args": ["a"], "Interval": "1s"}},
     "Invalid check: Docker checks are not supported by dnsdisco", 400, "check"),
    ({"Name": "x", "Check": {"GRPC": "h:1", "GRPCUseTLS": True, "Interval": "1s"}},
     "Invalid check: GRPCUseTLS is not supported by dnsdisco", 400, "check"),
    ({"Name": "x", "Check": {"Args": ["/bin/true"], "Interval": "10s"}}, SCRIPTS_DISABLED, 500, "check.args"),
    ([1], "Request decode failed: json: cannot unmarshal array into Go value of type structs.ServiceDefinition",
     400, None),
]


@pytest.mark.parametrize("raw, message, status, key", SERVICE_ERRORS)
def test_service_definition_refusals(raw, message, status, key):
    with pytest.raises(DecodeError) as e:
        svc(raw)
    assert (e.value.message, e.value.status, e.value.key) == (message, status, key)


CHECK_ERRORS = [
    ({"TTL": "10s"}, "Missing check name", 400),
    ({"Name": "c", "TTL": "10s", "Status": "up"}, "Bad check status", 400),
    ({"Name": "c"}, "Invalid check: TTL must be > 0 for TTL checks", 400),
    ({"Name": "c", "TCP": "h:1"},
     "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks", 400),
    ({"Name": "c", "Args": ["x"], "Interval": "1s"}, SCRIPTS_DISABLED, 500),
    ({"Name": "c", "TTL": "1s", "Bogus": 1}, 'Request decode failed: json: unknown field "Bogus"', 400),
    ({"Name": "c", "TTL": "1s", "Interval": "x"}, 'Request decode failed: time: invalid duration "x"', 400),
    ({"Name": "c", "TCP": "h:1", "Interval": "1s", "TCPUseTLS": True},
     "Invalid check: TCPUseTLS is not supported by dnsdisco", 400),
]


@pytest.mark.parametrize("raw, message, status", CHECK_ERRORS)
def test_check_definition_refusals(raw, message, status):
    with pytest.raises(DecodeError) as e:
        chk(raw)
    assert (e.value.message, e.value.status) == (message, status)


def test_check_update():
    assert decode_check_update({"Status": "passing", "Output": "ok"}) == ("passing", "ok")
    assert decode_check_update({"status": "warning"}) == ("warning", "")
    for raw, message in [({"Status": "up"}, "Invalid check status: 'up'"), ({}, "Invalid check status: ''"),
                         ({"Status": "passing", "X": 1}, 'Request decode failed: json: unknown field "X"')]:
        with pytest.raises(DecodeError) as e:
            decode_check_update(raw)
        assert e.value.message == message


# -- catalog register / deregister ---------------------------------------------------------------


def test_register_request_py_consul_shape():
    req = decode_register_request({
        "node": "ext1", "address": "10.1.0.1", "TaggedAddresses": {"wan": "1.1.1.1"},
        "NodeMeta": {"rack": "r1"}, "WriteRequest": {"Token": "t"},
        "service": {"service": "redis", "port": 6379, "tags": ["primary"], "Weights": {"Passing": 5, "Warning": 1}},
        "check": {"name": "redis alive", "status": "passing", "serviceid": "redis",
                  "Definition": {"TCP": "10.1.0.1:6379", "IntervalDuration": "10s"}},
    }, datacenter="dc1")
    assert (req.datacenter, req.node.name, req.node.address, dict(req.node.tagged_addresses),
            dict(req.node.meta)) == ("dc1", "ext1", "10.1.0.1", {"wan": "1.1.1.1"}, {"rack": "r1"})
    assert req.service is not None
    assert (req.service.id, req.service.name, req.service.port, req.service.weights) == (
        "redis", "redis", 6379, Weights(5, 1))
    (c,) = req.checks
    assert (c.check_id, c.status, c.service_id, c.definition.tcp, c.definition.interval) == (
        "redis alive", PASSING, "redis", "10.1.0.1:6379", 10.0)


REGISTER_ERRORS = [
    ({"Address": "a"}, "Must provide node", 500),
    ({"Node": "n", "ID": "nope", "Address": "a"}, "Bad node ID: invalid UUID 'nope'", 500),
    ({"Node": "n"}, "Must provide address if SkipNodeUpdate is not set", 500),
    ({"Node": "n", "Address": "a", "NodeMeta": {"consul-x": "1"}},
     "Invalid node metadata: Couldn't load metadata pair ('consul-x', '1'): Key prefix 'consul-' is reserved for "
     "internal use", 500),
    ({"Node": "n", "Address": "a", "Service": {"ID": "s"}},
     "Must provide service name (Service.Service) when service ID is provided", 500),
    ({"Node": "n", "Address": "a", "Service": {"Service": "s", "Address": "0.0.0.0"}}, "Invalid service address", 500),
    ({"Node": "n", "Address": "a", "Service": {"Service": "s", "Meta": {"a b": "1"}}},
     "Invalid Service Meta: Couldn't load metadata pair ('a b', '1'): Key contains invalid characters", 500),
    ({"Node": "n", "Address": "a", "Check": {"Status": "passing"}}, "Missing check ID", 500),
    ({"Node": "n", "Address": "a", "Check": {"Name": "c", "Node": "m"}},
     "Node 'm' for check 'c' doesn't match register request node 'n'", 500),
    ({"Node": "n", "Address": "a", "Check": {"Name": "c", "Status": "bad"}}, "Invalid check status: 'bad'", 400),
    ({"Node": "n", "Address": "a", "Extra": 1}, 'Request decode failed: json: unknown field "Extra"', 400),
    ({"Node": "n", "Address": "a", "TaggedAddresses": {"wan": {"Address": "x"}}},
     "Request decode failed: json: cannot unmarshal object into Go struct field RegisterRequest.TaggedAddresses of "
     "type string", 400),
]


@pytest.mark.parametrize("raw, message, status", REGISTER_ERRORS)
def test_register_request_refusals(raw, message, status):
    with pytest.raises(CatalogError) as e:
        decode_register_request(raw, datacenter="dc1")
    assert (e.value.message, e.value.status) == (message, status)


def test_deregister_request():
    req = decode_deregister_request({"node": "n", "serviceid": "s", "WriteRequest": {"Token": ""}}, datacenter="dc1")
    assert (req.node, req.service_id, req.check_id, req.datacenter) == ("n", "s", "", "dc1")
    with pytest.raises(CatalogError) as e:
        decode_deregister_request({"ServiceID": "s"}, datacenter="dc1")
    assert (e.value.message, e.value.status) == ("Must provide node", 500)


def test_error_keys_are_dotted_paths_as_written():
    # The config loader prefixes these with the file's "service." to name the bad key.
    with pytest.raises(DecodeError) as e:
        svc({"name": "x", "checks": [{"ttl": "1s"}, {"tcp": "h:1", "interval": "10"}]})
    assert e.value.key == "checks.1.interval"
    assert e.value.message == 'Request decode failed: time: missing unit in duration "10"'
    with pytest.raises(DecodeError) as e:
        svc({"name": "x", "tagged_addresses": {"lan": {"address": "a", "bogus": 1}}})
    assert e.value.key == "tagged_addresses.lan.bogus"
