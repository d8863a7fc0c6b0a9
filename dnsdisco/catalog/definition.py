"""Decoding service and check definitions, from HTTP bodies and config files, into model objects.

This module owns the one decoder that both the HTTP API and the config loader use, so that a
definition means the same thing wherever it comes from. It reproduces how a Consul agent reads
JSON: keys match without regard to case (Go's ``encoding/json``), the snake_case spellings of
config files are accepted everywhere (``enable_tag_override``, ``deregister_critical_service_after``,
``args``/``script_args``...), durations are Go strings (``10s``) or integer nanoseconds, and an
unknown key is refused (``lib.DecodeJSON`` uses ``DisallowUnknownFields``). Validation messages
are Consul's own, because clients match on them.

Everything raises :class:`~dnsdisco.errors.DecodeError` (400 unless Consul answers otherwise)
whose ``key`` is the dotted path of the offending key. Nothing here touches the store: checks
that depend on catalog state (does the service exist?) belong to :mod:`dnsdisco.catalog.store`.
"""

from __future__ import annotations

import ipaddress
import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dnsdisco.catalog.model import (
    CRITICAL,
    STATUSES,
    Check,
    CheckDefinition,
    Node,
    Service,
    TaggedAddress,
    Weights,
)
from dnsdisco.duration import parse_duration
from dnsdisco.errors import CatalogError, DecodeError

__all__ = [
    "DeregisterRequest",
    "RegisterRequest",
    "decode_check_definition",
    "decode_check_update",
    "decode_deregister_request",
    "decode_register_request",
    "decode_service_definition",
    "validate_meta",
]

# Consul's floors (agent/config: check_deregister_interval_min and MinInterval): smaller values
# are raised, not refused, so py-consul's 100ms HTTP check registers.
MIN_CHECK_INTERVAL = 1.0
MIN_DEREGISTER_AFTER = 60.0

# structs.metaMaxKeyPairs and friends.
META_MAX_PAIRS = 64
META_KEY_MAX = 128
META_VALUE_MAX = 512
_META_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
# Node meta keys the agent itself sets; allowed despite the reserved prefix.
_NODE_META_CONSUL_KEYS = frozenset({"consul-network-segment", "consul-version"})

SCRIPTS_DISABLED = (
    "Scripts are disabled on this agent; to enable, configure 'enable_script_checks' or "
    "'enable_local_script_checks' to true"
)
_DECODE = "Request decode failed: "


# -- a small schema-driven JSON decoder ---------------------------------------------------------
#
# Each Go struct the API decodes is a _Schema: its fields with a kind, the Go type name used in
# error texts, and the spellings that match it. Lookup is by lower-cased key, which is how Go
# matches a JSON key against a field name.

_STR = "string"
_INT = "int"
_UINT = "uint64"
_BOOL = "bool"
_STRLIST = "[]string"
_STRMAP = "map[string]string"
_HEADER = "map[string][]string"
_DURATION = "time.Duration"
_OBJECT = "struct"
_OBJECTS = "[]struct"
_OBJMAP = "map[string]struct"
_ANY = "any"  # an object we accept but do not keep (Proxy, Connect, Locality)
_INT_MIN, _INT_MAX, _UINT_MAX = -(2**63), 2**63 - 1, 2**64 - 1


@dataclass(frozen=True, slots=True)
class _F:
    name: str
    kind: str
    schema: _Schema | None = None
    aliases: tuple[str, ...] = ()
    snake: str | None = None


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


@dataclass(slots=True)
class _Schema:
    go_name: str
    fields: tuple[_F, ...]
    lookup: dict[str, _F] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in self.fields:
            for spelling in (f.name, f.snake or _snake(f.name), *f.aliases):
                self.lookup[spelling.lower()] = f


def _json_type(value: Any) -> str:
    # The JSON type word Go's UnmarshalTypeError names.
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return f"number {value}" if isinstance(value, float) else "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _type_error(value: Any, path: str, go_type: str, key: str) -> DecodeError:
    return DecodeError(
        f"{_DECODE}json: cannot unmarshal {_json_type(value)} into Go struct field {path} of type {go_type}",
        key=key,
    )


def _duration(value: Any, key: str) -> float:
    """A Go duration string or a number of nanoseconds, as seconds."""
    if isinstance(value, bool):
        raise DecodeError(f"{_DECODE}invalid duration {str(value).lower()}", key=key)
    if isinstance(value, (int, float)):
        # 1e400 parses as inf in Python, and a long integer does not fit a float: Go refuses
        # both (a time.Duration is an int64 of nanoseconds).
        if not _INT_MIN <= value <= _INT_MAX or not math.isfinite(value):
            raise DecodeError(f"{_DECODE}invalid duration {value}", key=key)
        return float(value) / 1e9
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except ValueError:
            # time.ParseDuration's two messages: a bare number lacks a unit, the rest is invalid.
            if re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)", value.strip()):
                raise DecodeError(f'{_DECODE}time: missing unit in duration "{value}"', key=key) from None
            raise DecodeError(f'{_DECODE}time: invalid duration "{value}"', key=key) from None
    raise DecodeError(f"{_DECODE}invalid duration {_json_type(value)}", key=key)


def _decode(raw: Any, schema: _Schema, *, strict: bool, path: str, key: str) -> dict[str, Any]:
    """Decode *raw* against *schema* into ``{GoFieldName: python value}``; nulls are skipped."""
    if not isinstance(raw, Mapping):
        where = f"Go struct field {path} of type structs.{schema.go_name}" if "." in path else (
            f"Go value of type structs.{schema.go_name}")
        raise DecodeError(f"{_DECODE}json: cannot unmarshal {_json_type(raw)} into {where}", key=key or None)
    out: dict[str, Any] = {}
    for k, v in raw.items():
        f = schema.lookup.get(str(k).lower())
        kpath = f"{key}.{k}" if key else str(k)
        if f is None:
            if strict:
                raise DecodeError(f'{_DECODE}json: unknown field "{k}"', key=kpath)
            continue
        if v is None:
            continue  # Go leaves the zero value for null
        fpath = f"{path}.{f.name}"
        out[f.name] = _value(v, f, strict=strict, path=fpath, key=kpath)
    return out


def _value(v: Any, f: _F, *, strict: bool, path: str, key: str) -> Any:
    kind = f.kind
    if kind == _STR:
        if not isinstance(v, str):
            raise _type_error(v, path, "string", key)
        return v
    if kind in (_INT, _UINT):
        if isinstance(v, bool) or not isinstance(v, int):
            raise _type_error(v, path, kind, key)
        if kind == _UINT and v < 0:
            raise _type_error(v, path, kind, key)
        if not (_INT_MIN <= v <= _INT_MAX if kind == _INT else v <= _UINT_MAX):
            # Go's int is 64 bits: a larger number is refused, and the text quotes it
            # (encoding/json's literalStore).
            raise DecodeError(
                f"{_DECODE}json: cannot unmarshal number {v} into Go struct field {path} of type {kind}", key=key)
        return v
    if kind == _BOOL:
        if not isinstance(v, bool):
            raise _type_error(v, path, "bool", key)
        return v
    if kind == _STRLIST:
        if not isinstance(v, list):
            raise _type_error(v, path, "[]string", key)
        for item in v:
            if not isinstance(item, str):
                raise _type_error(item, path, "string", key)
        return tuple(v)
    if kind == _STRMAP:
        if not isinstance(v, Mapping):
            raise _type_error(v, path, "map[string]string", key)
        for item in v.values():
            if not isinstance(item, str):
                raise _type_error(item, path, "string", key)
        return {str(k): item for k, item in v.items()}
    if kind == _HEADER:
        if not isinstance(v, Mapping):
            raise _type_error(v, path, "map[string][]string", key)
        header: dict[str, tuple[str, ...]] = {}
        for hk, hv in v.items():
            if not isinstance(hv, list) or not all(isinstance(x, str) for x in hv):
                raise _type_error(hv, path, "[]string", key)
            header[str(hk)] = tuple(hv)
        return header
    if kind == _DURATION:
        return _duration(v, key)
    if kind == _OBJECT:
        assert f.schema is not None
        return _decode(v, f.schema, strict=strict, path=path, key=key)
    if kind == _OBJECTS:
        assert f.schema is not None
        if not isinstance(v, list):
            raise _type_error(v, path, f"[]*structs.{f.schema.go_name}", key)
        return [_decode(item, f.schema, strict=strict, path=path, key=f"{key}.{i}") for i, item in enumerate(v)]
    if kind == _OBJMAP:
        assert f.schema is not None
        if not isinstance(v, Mapping):
            raise _type_error(v, path, f"map[string]structs.{f.schema.go_name}", key)
        return {str(k): _decode(item, f.schema, strict=strict, path=path, key=f"{key}.{k}")
                for k, item in v.items() if item is not None}
    if kind == _ANY:
        if not isinstance(v, Mapping):
            raise _type_error(v, path, f"structs.{f.name}", key)
        return dict(v)
    raise AssertionError(kind)


# -- the schemas -------------------------------------------------------------------------------

# The fields that say what a check runs: shared by the agent's CheckType / CheckDefinition and
# the catalog's HealthCheckDefinition.
_PROBE_FIELDS = (
    _F("HTTP", _STR),
    _F("Header", _HEADER),
    _F("Method", _STR),
    _F("Body", _STR),
    _F("DisableRedirects", _BOOL),
    _F("TCP", _STR),
    _F("TCPUseTLS", _BOOL),
    _F("UDP", _STR),
    _F("GRPC", _STR),
    _F("GRPCUseTLS", _BOOL),
    _F("H2PING", _STR, snake="h2ping"),
    _F("H2PingUseTLS", _BOOL, snake="h2ping_use_tls"),
    _F("OSService", _STR),
    _F("AliasNode", _STR),
    _F("AliasService", _STR),
    _F("DockerContainerID", _STR),
    _F("Shell", _STR),
    _F("TLSServerName", _STR),
    _F("TLSSkipVerify", _BOOL),
    _F("OutputMaxSize", _INT),
)

_CHECK_TYPE_FIELDS = (
    *_PROBE_FIELDS,
    _F("Status", _STR),
    _F("Notes", _STR),
    _F("ScriptArgs", _STRLIST, aliases=("args",)),
    _F("Interval", _DURATION),
    _F("Timeout", _DURATION),
    _F("TTL", _DURATION),
    _F("DeregisterCriticalServiceAfter", _DURATION),
    _F("SuccessBeforePassing", _INT),
    _F("FailuresBeforeWarning", _INT),
    _F("FailuresBeforeCritical", _INT),
    _F("Token", _STR),
    _F("Namespace", _STR),
    _F("Partition", _STR),
)

# structs.CheckType: a check inside a service definition. ServiceID is accepted and ignored.
_CHECK_TYPE = _Schema("CheckType", (
    _F("CheckID", _STR, aliases=("id",)),
    _F("Name", _STR),
    _F("ServiceID", _STR),
    *_CHECK_TYPE_FIELDS,
))

# structs.CheckDefinition: /v1/agent/check/register and top-level config checks.
_CHECK_DEFINITION = _Schema("CheckDefinition", (
    _F("ID", _STR, aliases=("checkid",)),
    _F("Name", _STR),
    _F("ServiceID", _STR),
    *_CHECK_TYPE_FIELDS,
))

_SERVICE_ADDRESS = _Schema("ServiceAddress", (_F("Address", _STR), _F("Port", _INT)))
_WEIGHTS = _Schema("Weights", (_F("Passing", _INT), _F("Warning", _INT)))
_CONNECT = _Schema("ServiceConnect", (
    _F("Native", _BOOL),
    _F("SidecarService", _ANY),
))

_SERVICE_DEFINITION = _Schema("ServiceDefinition", (
    _F("ID", _STR),
    _F("Name", _STR),
    _F("Tags", _STRLIST),
    _F("Address", _STR),
    _F("TaggedAddresses", _OBJMAP, _SERVICE_ADDRESS),
    _F("Meta", _STRMAP),
    _F("Port", _INT),
    _F("Ports", _ANY),
    _F("SocketPath", _STR),
    _F("Kind", _STR),
    _F("Proxy", _ANY),
    _F("Connect", _OBJECT, _CONNECT),
    _F("Check", _OBJECT, _CHECK_TYPE),
    _F("Checks", _OBJECTS, _CHECK_TYPE),
    _F("EnableTagOverride", _BOOL),
    _F("Weights", _OBJECT, _WEIGHTS),
    _F("Token", _STR),
    _F("Locality", _ANY),
    _F("Namespace", _STR),
    _F("Partition", _STR),
))

# structs.HealthCheckDefinition: the Definition of a catalog-registered check. Node-consul sends
# the *Duration spellings; both are accepted.
_HEALTH_CHECK_DEFINITION = _Schema("HealthCheckDefinition", (
    *_PROBE_FIELDS,
    _F("ScriptArgs", _STRLIST),
    _F("Interval", _DURATION, aliases=("intervalduration",)),
    _F("Timeout", _DURATION, aliases=("timeoutduration",)),
    _F("TTL", _DURATION, aliases=("ttlduration",)),
    _F("DeregisterCriticalServiceAfter", _DURATION, aliases=("deregistercriticalserviceafterduration",)),
))

_HEALTH_CHECK = _Schema("HealthCheck", (
    _F("Node", _STR),
    _F("CheckID", _STR, aliases=("id",)),
    _F("Name", _STR),
    _F("Status", _STR),
    _F("Notes", _STR),
    _F("Output", _STR),
    _F("ServiceID", _STR),
    _F("ServiceName", _STR),
    _F("ServiceTags", _STRLIST),
    _F("Type", _STR),
    _F("Interval", _STR),
    _F("Timeout", _STR),
    _F("ExposedPort", _INT),
    _F("Definition", _OBJECT, _HEALTH_CHECK_DEFINITION),
    _F("PeerName", _STR),
    _F("Namespace", _STR),
    _F("Partition", _STR),
    _F("CreateIndex", _UINT),
    _F("ModifyIndex", _UINT),
))

_NODE_SERVICE = _Schema("NodeService", (
    _F("Kind", _STR),
    _F("ID", _STR),
    _F("Service", _STR),
    _F("Tags", _STRLIST),
    _F("Address", _STR),
    _F("TaggedAddresses", _OBJMAP, _SERVICE_ADDRESS),
    _F("Meta", _STRMAP),
    _F("Port", _INT),
    _F("SocketPath", _STR),
    _F("Weights", _OBJECT, _WEIGHTS),
    _F("EnableTagOverride", _BOOL),
    _F("Proxy", _ANY),
    _F("Connect", _ANY),
    _F("Locality", _ANY),
    _F("PeerName", _STR),
    _F("Namespace", _STR),
    _F("Partition", _STR),
    _F("CreateIndex", _UINT),
    _F("ModifyIndex", _UINT),
))

_WRITE_REQUEST = _Schema("WriteRequest", (_F("Token", _STR),))

_REGISTER_REQUEST = _Schema("RegisterRequest", (
    _F("Datacenter", _STR),
    _F("ID", _STR),
    _F("Node", _STR),
    _F("Address", _STR),
    _F("TaggedAddresses", _STRMAP),
    _F("NodeMeta", _STRMAP),
    _F("Service", _OBJECT, _NODE_SERVICE),
    _F("Check", _OBJECT, _HEALTH_CHECK),
    _F("Checks", _OBJECTS, _HEALTH_CHECK),
    _F("SkipNodeUpdate", _BOOL),
    _F("WriteRequest", _OBJECT, _WRITE_REQUEST),
    _F("Token", _STR),
    _F("Locality", _ANY),
    _F("PeerName", _STR),
    _F("Namespace", _STR),
    _F("Partition", _STR),
))

_DEREGISTER_REQUEST = _Schema("DeregisterRequest", (
    _F("Datacenter", _STR),
    _F("Node", _STR),
    _F("ServiceID", _STR),
    _F("CheckID", _STR),
    _F("WriteRequest", _OBJECT, _WRITE_REQUEST),
    _F("Token", _STR),
    _F("PeerName", _STR),
    _F("Namespace", _STR),
    _F("Partition", _STR),
))

_CHECK_UPDATE = _Schema("checkUpdate", (_F("Status", _STR), _F("Output", _STR)))


# -- validation shared by the API and config files ---------------------------------------------


def validate_meta(meta: Mapping[str, str], *, allowed_consul_keys: frozenset[str] = frozenset()) -> str | None:
    """Return Consul's complaint about a metadata map (``structs.validateMetadata``), or None."""
    if len(meta) > META_MAX_PAIRS:
        # Consul says "Node metadata" for services too: the limit is shared.
        return f"Node metadata cannot contain more than {META_MAX_PAIRS} key/value pairs"
    for k, v in meta.items():
        reason = None
        if k == "":
            reason = "Key cannot be blank"
        elif not _META_KEY.match(k):
            reason = "Key contains invalid characters"
        elif len(k) > META_KEY_MAX:
            reason = f"Key is too long (limit: {META_KEY_MAX} characters)"
        elif k.startswith("consul-") and k not in allowed_consul_keys:
            reason = "Key prefix 'consul-' is reserved for internal use"
        elif len(v) > META_VALUE_MAX:
            reason = f"Value is too long (limit: {META_VALUE_MAX} characters)"
        if reason:
            return f"Couldn't load metadata pair ('{k}', '{v}'): {reason}"
    return None


def _check_type_error(d: Mapping[str, Any]) -> str | None:
    """``CheckType.Validate``: the reason a check's type/timing is inconsistent, or None."""
    interval = d.get("Interval", 0.0)
    ttl = d.get("TTL", 0.0)
    is_alias = bool(d.get("AliasService"))
    interval_check = bool(
        d.get("ScriptArgs") or d.get("HTTP") or d.get("TCP") or d.get("UDP") or d.get("GRPC")
        or d.get("H2PING") or d.get("OSService")
    )
    if interval > 0 and ttl > 0:
        return "Interval and TTL cannot both be specified"
    if interval_check and interval <= 0:
        return "Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks"
    if is_alias:
        if ttl > 0:
            return "TTL must be not be set for Alias checks"
        if interval > 0:
            return "Interval cannot be set for Alias checks"
    if not interval_check and not is_alias and ttl <= 0:
        return "TTL must be > 0 for TTL checks"
    if d.get("OutputMaxSize", 0) < 0:
        return "MaxOutputMaxSize must be positive"
    if d.get("FailuresBeforeWarning", 0) > d.get("FailuresBeforeCritical", 0):
        return "FailuresBeforeWarning can't be higher than FailuresBeforeCritical"
    return None


def _unsupported_check(d: Mapping[str, Any], key: str) -> None:
    # Check kinds Consul has and dnsdisco does not run. Refusing them beats storing a check that
    # would sit critical forever with no explanation.
    for field_name, what in (("H2PING", "H2PING"), ("AliasService", "Alias"), ("AliasNode", "Alias"),
                             ("OSService", "OSService"), ("DockerContainerID", "Docker")):
        if d.get(field_name):
            raise DecodeError(f"Invalid check: {what} checks are not supported by dnsdisco", key=key or None)
    for field_name in ("TCPUseTLS", "GRPCUseTLS"):
        if d.get(field_name):
            raise DecodeError(f"Invalid check: {field_name} is not supported by dnsdisco", key=key or None)


def _check_definition(d: Mapping[str, Any], *, floors: bool = True) -> CheckDefinition:
    """A decoded check (CheckType, CheckDefinition or a catalog HealthCheckDefinition) as the
    model's definition. *floors* applies the agent's minimums; catalog checks are never run,
    so their definition is kept as given."""
    interval = max(d.get("Interval", 0.0), 0.0)
    after = max(d.get("DeregisterCriticalServiceAfter", 0.0), 0.0)
    if floors:
        if 0 < interval < MIN_CHECK_INTERVAL:
            interval = MIN_CHECK_INTERVAL
        if 0 < after < MIN_DEREGISTER_AFTER:
            after = MIN_DEREGISTER_AFTER
    return CheckDefinition(
        http=d.get("HTTP", ""),
        method=d.get("Method", ""),
        header=d.get("Header", {}),
        body=d.get("Body", ""),
        disable_redirects=d.get("DisableRedirects", False),
        tls_server_name=d.get("TLSServerName", ""),
        tls_skip_verify=d.get("TLSSkipVerify", False),
        tcp=d.get("TCP", ""),
        udp=d.get("UDP", ""),
        grpc=d.get("GRPC", ""),
        script_args=tuple(d.get("ScriptArgs", ())),
        ttl=max(d.get("TTL", 0.0), 0.0),
        interval=interval,
        timeout=max(d.get("Timeout", 0.0), 0.0),
        deregister_critical_service_after=after,
        success_before_passing=max(d.get("SuccessBeforePassing", 0), 0),
        failures_before_warning=max(d.get("FailuresBeforeWarning", 0), 0),
        failures_before_critical=max(d.get("FailuresBeforeCritical", 0), 0),
        output_max_size=max(d.get("OutputMaxSize", 0), 0),
    )


def _is_unspecified(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_unspecified
    except ValueError:
        return False


def _tagged_addresses(raw: Mapping[str, Mapping[str, Any]]) -> dict[str, TaggedAddress]:
    return {name: TaggedAddress(v.get("Address", ""), v.get("Port", 0)) for name, v in raw.items()}


def _with_ip_tagged_addresses(tagged: dict[str, TaggedAddress], address: str, port: int) -> dict[str, TaggedAddress]:
    # The agent tags an IP service address as lan_ipv4/wan_ipv4 (or the ipv6 pair) so that DNS
    # can pick the right family, unless the caller set them.
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return tagged
    suffix = "ipv4" if ip.version == 4 else "ipv6"
    for name in (f"lan_{suffix}", f"wan_{suffix}"):
        tagged.setdefault(name, TaggedAddress(address, port))
    return tagged


def _weights(d: Mapping[str, Any] | None) -> Weights:
    if d is None:
        return Weights()
    passing, warning = d.get("Passing", 0), d.get("Warning", 0)
    if passing < 1:
        raise DecodeError("Invalid Weights: Passing must be greater than 0", key="weights.passing")
    if warning < 0:
        raise DecodeError("Invalid Weights: Warning must be greater or equal than 0", key="weights.warning")
    if passing > 65535 or warning > 65535:
        raise DecodeError("Invalid Weights: DNS Weight must be between 0 and 65535", key="weights")
    return Weights(passing, warning)


def _port(port: int, key: str) -> int:
    # Go's int takes any value; a port outside 0..65535 cannot appear in an SRV record, so
    # dnsdisco refuses it rather than serving a truncated number.
    if not 0 <= port <= 65535:
        raise DecodeError(f"Invalid port {port}: must be between 0 and 65535", key=key)
    return port


# -- public decoders ---------------------------------------------------------------------------


def decode_service_definition(
    raw: Mapping[str, Any],
    *,
    node: str,
    enable_script_checks: bool,
    strict: bool = True,
) -> tuple[Service, list[Check]]:
    """Decode a ServiceDefinition (``/v1/agent/service/register`` body, or one ``service``
    object of a config file) into the service on *node* and its checks.

    Check IDs default to ``service:<id>`` (``service:<id>:<n>`` when there are several), names
    to ``Service '<name>' check``, statuses to critical; the store keeps a re-registered
    check's previous status. *strict* refuses unknown keys (Consul's behaviour); without it they
    are ignored. Raises :class:`DecodeError` with Consul's text (a 500 for script checks on an
    agent that does not allow them).
    """
    d = _decode(raw, _SERVICE_DEFINITION, strict=strict, path="ServiceDefinition", key="")
    name = d.get("Name", "")
    if not name:
        raise DecodeError("Missing service name", key="name")
    sid = d.get("ID") or name
    meta = d.get("Meta", {})
    problem = validate_meta(meta)
    if problem:
        raise DecodeError(f"Invalid Service Meta: {problem}", key="meta")
    weights = _weights(d.get("Weights"))

    raw_checks: list[tuple[dict[str, Any], str]] = []
    if "Check" in d:
        raw_checks.append((d["Check"], "check"))
    raw_checks.extend((c, f"checks.{i}") for i, c in enumerate(d.get("Checks", ())))
    for c, ckey in raw_checks:
        problem = _check_type_error(c)
        if problem:
            raise DecodeError(f"Invalid check: {problem}", key=ckey)
    for c, ckey in raw_checks:
        status = c.get("Status", "")
        if status and status not in STATUSES:
            raise DecodeError("Status for checks must 'passing', 'warning', 'critical'", key=f"{ckey}.status")

    address = d.get("Address", "")
    if _is_unspecified(address):
        raise DecodeError("Invalid service address", key="address")
    port = _port(d.get("Port", 0), "port")
    tagged = _tagged_addresses(d.get("TaggedAddresses", {}))
    for tname, taddr in tagged.items():
        _port(taddr.port, f"tagged_addresses.{tname}.port")
    tagged = _with_ip_tagged_addresses(tagged, address, port)
    if d.get("Connect", {}).get("SidecarService") is not None:
        raise DecodeError("Connect sidecar services are not supported by dnsdisco", key="connect.sidecar_service")
    for c, ckey in raw_checks:
        _unsupported_check(c, ckey)
        if c.get("ScriptArgs") and not enable_script_checks:
            raise DecodeError(SCRIPTS_DISABLED, 500, key=f"{ckey}.args")

    tags = tuple(d.get("Tags", ()))
    service = Service(
        node=node,
        id=sid,
        name=name,
        tags=tags,
        address=address,
        port=port,
        tagged_addresses=tagged,
        meta=meta,
        weights=weights,
        kind=d.get("Kind", ""),
        enable_tag_override=d.get("EnableTagOverride", False),
        socket_path=d.get("SocketPath", ""),
    )
    checks = []
    many = len(raw_checks) > 1
    for n, (c, _ckey) in enumerate(raw_checks, start=1):
        check_id = c.get("CheckID") or (f"service:{sid}:{n}" if many else f"service:{sid}")
        checks.append(Check(
            node=node,
            check_id=check_id,
            name=c.get("Name") or f"Service '{name}' check",
            status=c.get("Status") or CRITICAL,
            notes=c.get("Notes", ""),
            service_id=sid,
            service_name=name,
            service_tags=tags,
            definition=_check_definition(c),
        ))
    return service, checks


def decode_check_definition(
    raw: Mapping[str, Any],
    *,
    node: str,
    enable_script_checks: bool,
    strict: bool = True,
) -> Check:
    """Decode a CheckDefinition (``/v1/agent/check/register`` body, or a top-level config
    ``check``) into a check on *node*. ``ID`` defaults to ``Name``; the status to critical.

    A ``ServiceID`` is kept as given: the store checks that the service exists (404
    ``ServiceID "<id>" does not exist``) and fills in its name and tags.
    """
    d = _decode(raw, _CHECK_DEFINITION, strict=strict, path="CheckDefinition", key="")
    name = d.get("Name", "")
    if not name:
        raise DecodeError("Missing check name", key="name")
    status = d.get("Status", "")
    if status and status not in STATUSES:
        raise DecodeError("Bad check status", key="status")
    problem = _check_type_error(d)
    if problem:
        raise DecodeError(f"Invalid check: {problem}")
    _unsupported_check(d, "")
    if d.get("ScriptArgs") and not enable_script_checks:
        raise DecodeError(SCRIPTS_DISABLED, 500, key="args")
    return Check(
        node=node,
        check_id=d.get("ID") or name,
        name=name,
        status=status or CRITICAL,
        notes=d.get("Notes", ""),
        service_id=d.get("ServiceID", ""),
        definition=_check_definition(d),
    )


def decode_check_update(raw: Any) -> tuple[str, str]:
    """Decode the ``/v1/agent/check/update`` body ``{"Status", "Output"}``; the status is
    validated by the TTL updater (400 ``Invalid check status: '<s>'``)."""
    d = _decode(raw, _CHECK_UPDATE, strict=True, path="checkUpdate", key="")
    status = d.get("Status", "")
    if status not in STATUSES:
        raise DecodeError(f"Invalid check status: '{status}'", key="status")
    return status, d.get("Output", "")


# -- catalog register / deregister ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegisterRequest:
    """A decoded ``/v1/catalog/register`` body. ``node`` carries the node as the caller wants
    it; with ``skip_node_update`` an existing node is left as it is."""

    datacenter: str
    node: Node
    skip_node_update: bool = False
    service: Service | None = None
    checks: tuple[Check, ...] = ()


@dataclass(frozen=True, slots=True)
class DeregisterRequest:
    """A decoded ``/v1/catalog/deregister`` body: the node, or one of its services or checks."""

    datacenter: str
    node: str
    service_id: str = ""
    check_id: str = ""


def _rpc_error(message: str) -> CatalogError:
    # Catalog writes are validated inside Consul's RPC layer, so their refusals are 500s.
    return CatalogError(message, 500)


def decode_register_request(raw: Any, *, datacenter: str) -> RegisterRequest:
    """Decode a catalog RegisterRequest. Shape errors are 400 ``Request decode failed: ...``;
    semantic refusals are 500 with Consul's RPC text (``Must provide node``, ...). *datacenter*
    is the agent's, used when the body names none."""
    d = _decode(raw, _REGISTER_REQUEST, strict=True, path="RegisterRequest", key="")
    dc = d.get("Datacenter") or datacenter
    node_name = d.get("Node", "")
    if not node_name:
        raise _rpc_error("Must provide node")
    node_id = d.get("ID", "")
    if node_id:
        try:
            uuid.UUID(node_id)
        except ValueError:
            raise _rpc_error(f"Bad node ID: invalid UUID {node_id!r}") from None
    skip = d.get("SkipNodeUpdate", False)
    address = d.get("Address", "")
    if not address and not skip:
        raise _rpc_error("Must provide address if SkipNodeUpdate is not set")
    node_meta = d.get("NodeMeta", {})
    problem = validate_meta(node_meta, allowed_consul_keys=_NODE_META_CONSUL_KEYS)
    if problem:
        raise _rpc_error(f"Invalid node metadata: {problem}")
    node = Node(name=node_name, address=address, datacenter=dc, id=node_id,
                tagged_addresses=d.get("TaggedAddresses", {}), meta=node_meta)

    service = None
    s = d.get("Service")
    if s is not None and (s.get("ID") or s.get("Service")):
        sname = s.get("Service", "")
        if not sname:
            raise _rpc_error("Must provide service name (Service.Service) when service ID is provided")
        sid = s.get("ID") or sname
        saddress = s.get("Address", "")
        if _is_unspecified(saddress):
            raise _rpc_error("Invalid service address")
        smeta = s.get("Meta", {})
        problem = validate_meta(smeta)
        if problem:
            raise _rpc_error(f"Invalid Service Meta: {problem}")
        w = s.get("Weights")
        tagged = _tagged_addresses(s.get("TaggedAddresses", {}))
        service = Service(
            node=node_name,
            id=sid,
            name=sname,
            tags=tuple(s.get("Tags", ())),
            address=saddress,
            port=_port(s.get("Port", 0), "service.port"),
            tagged_addresses=tagged,
            meta=smeta,
            weights=Weights(w.get("Passing", 1), w.get("Warning", 1)) if w is not None else Weights(),
            kind=s.get("Kind", ""),
            enable_tag_override=s.get("EnableTagOverride", False),
            socket_path=s.get("SocketPath", ""),
        )

    raw_checks = ([d["Check"]] if "Check" in d else []) + list(d.get("Checks", ()))
    checks = []
    for c in raw_checks:
        check_id = c.get("CheckID") or c.get("Name", "")
        if not check_id:
            raise _rpc_error("Missing check ID")
        cnode = c.get("Node") or node_name
        if cnode.lower() != node_name.lower():
            raise _rpc_error(
                f"Node '{cnode}' for check '{check_id}' doesn't match register request node '{node_name}'")
        status = c.get("Status") or CRITICAL
        if status not in STATUSES:
            raise DecodeError(f"Invalid check status: '{status}'")
        defn = c.get("Definition", {})
        checks.append(Check(
            node=node_name,
            check_id=check_id,
            name=c.get("Name") or check_id,
            status=status,
            notes=c.get("Notes", ""),
            output=c.get("Output", ""),
            service_id=c.get("ServiceID", ""),
            definition=_check_definition(defn, floors=False),
        ))
    return RegisterRequest(datacenter=dc, node=node, skip_node_update=skip, service=service,
                           checks=tuple(checks))


def decode_deregister_request(raw: Any, *, datacenter: str) -> DeregisterRequest:
    """Decode a catalog DeregisterRequest; a missing node is Consul's 500 ``Must provide node``."""
    d = _decode(raw, _DEREGISTER_REQUEST, strict=True, path="DeregisterRequest", key="")
    node = d.get("Node", "")
    if not node:
        raise _rpc_error("Must provide node")
    return DeregisterRequest(datacenter=d.get("Datacenter") or datacenter, node=node,
                             service_id=d.get("ServiceID", ""), check_id=d.get("CheckID", ""))
