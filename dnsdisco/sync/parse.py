"""Consul's JSON, read at the edge: response bodies into :mod:`dnsdisco.catalog.model` values.

This module owns the reading side of Consul's wire shapes (``spec/http-api.md`` b.8-b.10):
``Node``, ``NodeService``, ``HealthCheck`` and its ``Definition``, the rows of
``/v1/health/service/<name>``, and the lists of ``/v1/catalog/{nodes,services,datacenters}`` and
``/v1/health/state/any``. Like CoreDNS's kubernetes plugin, it cuts the objects down to what
the DNS side needs as they come in, and nothing else in dnsdisco sees Consul's JSON.

It is pure and tolerant where Consul is loose - a ``null`` ``Meta`` or ``TaggedAddresses``, an
omitted ``Port`` (``json:",omitempty"``), a ``Definition`` that is ``{}`` or zero-filled
(``"Interval":"0s"``), tagged addresses spelled ``Address``/``address`` - and strict where a
value would be meaningless: a missing node name, a check without an ID, or a body of the wrong
type raise :class:`ParseError`, which the mirror treats like any other failed read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dnsdisco.catalog.model import (
    CRITICAL,
    Check,
    CheckDefinition,
    Node,
    Service,
    ServiceEntry,
    TaggedAddress,
    Weights,
)
from dnsdisco.duration import parse_duration
from dnsdisco.errors import DnsdiscoError

__all__ = [
    "ParseError",
    "parse_check",
    "parse_checks",
    "parse_datacenters",
    "parse_definition",
    "parse_health_service",
    "parse_node",
    "parse_nodes",
    "parse_service",
    "parse_service_entry",
    "parse_services",
]


class ParseError(DnsdiscoError, ValueError):
    """A Consul response body does not have the shape its endpoint documents."""


_EMPTY: Mapping[str, Any] = {}


def _obj(v: Any, what: str) -> Mapping[str, Any]:
    if v is None:
        return _EMPTY
    if not isinstance(v, Mapping):
        raise ParseError(f"{what}: expected an object, got {type(v).__name__}")
    return v


def _list(v: Any, what: str) -> list[Any]:
    if v is None:
        return []  # Go writes a nil slice as null
    if not isinstance(v, list):
        raise ParseError(f"{what}: expected a list, got {type(v).__name__}")
    return v


def _text(obj: Mapping[str, Any], key: str) -> str:
    v = obj.get(key)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise ParseError(f"{key}: expected a string, got {type(v).__name__}")
    return v


def _required(obj: Mapping[str, Any], key: str, what: str) -> str:
    v = _text(obj, key)
    if not v:
        raise ParseError(f"{what} without {key}")
    return v


def _int(obj: Mapping[str, Any], key: str, default: int = 0) -> int:
    v = obj.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ParseError(f"{key}: expected an integer, got {type(v).__name__}")
    return v


def _bool(obj: Mapping[str, Any], key: str) -> bool:
    v = obj.get(key)
    return v if isinstance(v, bool) else False


def _strings(v: Any, what: str) -> tuple[str, ...]:
    items = _list(v, what)
    if not all(isinstance(x, str) for x in items):
        raise ParseError(f"{what}: expected a list of strings")
    return tuple(items)


def _string_map(v: Any, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, val in _obj(v, what).items():
        # Consul's maps here are map[string]string; anything else is stringified, not refused,
        # so one odd value cannot stop the whole mirror.
        out[k] = val if isinstance(val, str) else ("" if val is None else str(val))
    return out


def _seconds(v: Any) -> float:
    """A Go duration: Consul writes strings (``"10s"``, ``"0s"``, ``""``); decoders also accept
    integer nanoseconds, so we do too."""
    if v is None or v == "":
        return 0.0
    if isinstance(v, bool):
        return 0.0
    if isinstance(v, (int, float)):
        return float(v) / 1e9
    if isinstance(v, str):
        try:
            return parse_duration(v)
        except ValueError:
            raise ParseError(f"invalid duration {v!r}") from None
    raise ParseError(f"expected a duration, got {type(v).__name__}")


# -- objects ------------------------------------------------------------------------------------


def parse_node(obj: Any, *, meta_key: str = "Meta") -> Node:
    """Consul ``Node`` (``/v1/catalog/nodes`` rows, ``Node`` in health rows). ``TaggedAddresses``
    is a map of name to address *string*; ``Meta`` may be null."""
    o = _obj(obj, "Node")
    return Node(
        name=_required(o, "Node", "node"),
        address=_text(o, "Address"),
        datacenter=_text(o, "Datacenter"),
        id=_text(o, "ID"),
        tagged_addresses=_string_map(o.get("TaggedAddresses"), "TaggedAddresses"),
        meta=_string_map(o.get(meta_key), meta_key),
        create_index=_int(o, "CreateIndex"),
        modify_index=_int(o, "ModifyIndex"),
    )


def _tagged_address(v: Any, what: str) -> TaggedAddress:
    o = _obj(v, what)
    # Consul writes {"Address","Port"}; its docs samples show lower case. Accept both.
    address = o.get("Address", o.get("address"))
    port = o.get("Port", o.get("port"))
    if address is not None and not isinstance(address, str):
        raise ParseError(f"{what}.Address: expected a string")
    if port is not None and (isinstance(port, bool) or not isinstance(port, int)):
        raise ParseError(f"{what}.Port: expected an integer")
    return TaggedAddress(address=address or "", port=port or 0)


def parse_service(obj: Any, node: str) -> Service:
    """Consul ``NodeService`` on node *node* (its JSON does not name the node). ``Port`` is
    omitted when 0, ``Meta`` may be null, ``TaggedAddresses`` omitted when empty; ``Weights``
    missing means Consul's default 1/1."""
    o = _obj(obj, "Service")
    tagged = {k: _tagged_address(v, f"TaggedAddresses.{k}") for k, v in _obj(o.get("TaggedAddresses"),
                                                                              "TaggedAddresses").items()}
    w = o.get("Weights")
    weights = Weights()
    if w is not None:
        wo = _obj(w, "Weights")
        weights = Weights(passing=_int(wo, "Passing", 1), warning=_int(wo, "Warning", 1))
    name = _required(o, "Service", "service")
    return Service(
        node=node,
        id=_text(o, "ID") or name,
        name=name,
        tags=_strings(o.get("Tags"), "Tags"),
        address=_text(o, "Address"),
        port=_int(o, "Port"),
        tagged_addresses=tagged,
        meta=_string_map(o.get("Meta"), "Meta"),
        weights=weights,
        kind=_text(o, "Kind"),
        enable_tag_override=_bool(o, "EnableTagOverride"),
        socket_path=_text(o, "SocketPath"),
        create_index=_int(o, "CreateIndex"),
        modify_index=_int(o, "ModifyIndex"),
    )


def parse_definition(obj: Any, *, interval: Any = None, timeout: Any = None) -> CheckDefinition:
    """Consul ``HealthCheckDefinition``: every field omitted when empty (``{}`` is common), or
    zero-filled in older servers. *interval*/*timeout* are the check's top-level strings, used
    when the definition does not carry its own."""
    o = _obj(obj, "Definition")
    header: dict[str, tuple[str, ...]] = {}
    for k, v in _obj(o.get("Header"), "Header").items():
        header[k] = _strings(v, f"Header.{k}")
    return CheckDefinition(
        http=_text(o, "HTTP"),
        method=_text(o, "Method"),
        header=header,
        body=_text(o, "Body"),
        disable_redirects=_bool(o, "DisableRedirects"),
        tls_server_name=_text(o, "TLSServerName"),
        tls_skip_verify=_bool(o, "TLSSkipVerify"),
        tcp=_text(o, "TCP"),
        udp=_text(o, "UDP"),
        grpc=_text(o, "GRPC"),
        script_args=_strings(o.get("ScriptArgs"), "ScriptArgs"),
        ttl=_seconds(o.get("TTL")),
        interval=_seconds(o.get("Interval")) or _seconds(interval),
        timeout=_seconds(o.get("Timeout")) or _seconds(timeout),
        deregister_critical_service_after=_seconds(o.get("DeregisterCriticalServiceAfter")),
        output_max_size=_int(o, "OutputMaxSize"),
    )


def parse_check(obj: Any) -> Check:
    """Consul ``HealthCheck``. A status outside passing/warning/critical is kept as sent (the
    aggregate counts it as critical, as Consul's DNS does); a missing one is critical."""
    o = _obj(obj, "HealthCheck")
    return Check(
        node=_required(o, "Node", "check"),
        check_id=_required(o, "CheckID", "check"),
        name=_text(o, "Name"),
        status=_text(o, "Status") or CRITICAL,
        notes=_text(o, "Notes"),
        output=_text(o, "Output"),
        service_id=_text(o, "ServiceID"),
        service_name=_text(o, "ServiceName"),
        service_tags=_strings(o.get("ServiceTags"), "ServiceTags"),
        definition=parse_definition(o.get("Definition"), interval=o.get("Interval"), timeout=o.get("Timeout")),
        create_index=_int(o, "CreateIndex"),
        modify_index=_int(o, "ModifyIndex"),
    )


def _known_node(obj: Any, nodes: Mapping[str, Node] | None) -> Node | None:
    # A node at the same Create/ModifyIndex is the same node: Consul bumps ModifyIndex on every
    # change to it. Reusing it saves decoding it once per instance, and shares the object.
    if nodes is None or not isinstance(obj, Mapping):
        return None
    known = nodes.get(obj.get("Node"))  # type: ignore[arg-type]
    if (known is not None and known.modify_index == obj.get("ModifyIndex")
            and known.create_index == obj.get("CreateIndex")):
        return known
    return None


def parse_service_entry(obj: Any, nodes: Mapping[str, Node] | None = None) -> ServiceEntry:
    """One ``/v1/health/service/<name>`` row: ``{"Node", "Service", "Checks"}``. ``Checks``
    holds the node's checks and the instance's own; their order is kept as sent. *nodes*
    (name -> Node, e.g. from ``/v1/catalog/nodes``) supplies nodes already decoded."""
    o = _obj(obj, "entry")
    node = _known_node(o.get("Node"), nodes) or parse_node(o.get("Node"))
    return ServiceEntry(
        node=node,
        service=parse_service(o.get("Service"), node.name),
        checks=tuple(parse_check(c) for c in _list(o.get("Checks"), "Checks")),
    )


# -- bodies -------------------------------------------------------------------------------------


def parse_health_service(body: Any, nodes: Mapping[str, Node] | None = None) -> tuple[ServiceEntry, ...]:
    """The body of ``/v1/health/service/<name>``: ``[]`` for an unknown service. *nodes* as for
    :func:`parse_service_entry`."""
    return tuple(parse_service_entry(row, nodes) for row in _list(body, "health/service"))


def parse_nodes(body: Any) -> list[Node]:
    """The body of ``/v1/catalog/nodes``."""
    return [parse_node(row) for row in _list(body, "catalog/nodes")]


def parse_services(body: Any) -> dict[str, tuple[str, ...]]:
    """The body of ``/v1/catalog/services``: service name -> the union of its instances' tags."""
    out: dict[str, tuple[str, ...]] = {}
    for name, tags in _obj(body, "catalog/services").items():
        if not name:
            continue
        out[name] = _strings(tags, f"tags of {name!r}")
    return out


def parse_checks(body: Any) -> list[Check]:
    """The body of ``/v1/health/state/<state>``."""
    return [parse_check(row) for row in _list(body, "health/state")]


def parse_datacenters(body: Any) -> list[str]:
    """The body of ``/v1/catalog/datacenters`` (sorted by round-trip time; order kept)."""
    names = _strings(body, "catalog/datacenters")
    return [n for n in names if n]
