"""The JSON shapes of Consul's HTTP API, built from catalog model objects.

This module owns the wire spelling of every object the API returns (``Node``, ``NodeService``,
``ServiceNode``, ``HealthCheck``, ``AgentService``, ``DirEntry``): PascalCase keys, which fields
are omitted when empty and which are forced to ``[]`` - the details clients trip over
(``spec/http-api.md`` b.5-b.8). Pure functions, no I/O.
"""

from __future__ import annotations

import base64
from typing import Any

from dnsdisco.catalog.model import Check, CheckDefinition, KVEntry, Node, Service
from dnsdisco.duration import format_duration

# NodeService.Proxy as an agent sends it for a plain (non-proxy) service.
_EMPTY_PROXY = {"MeshGateway": {}, "Expose": {}}


def _tagged(service: Service) -> dict[str, dict[str, Any]]:
    # Output uses capitalised Address/Port, whatever the docs samples show.
    return {k: {"Address": v.address, "Port": v.port} for k, v in service.tagged_addresses.items()}


def _weights(service: Service) -> dict[str, int]:
    return {"Passing": service.weights.passing, "Warning": service.weights.warning}


def _node_fields(n: Node, meta_key: str) -> dict[str, Any]:
    # Nil maps are null, as Go writes them.
    return {
        "ID": n.id,
        "Node": n.name,
        "Address": n.address,
        "Datacenter": n.datacenter,
        "TaggedAddresses": dict(n.tagged_addresses) or None,
        meta_key: dict(n.meta) or None,
    }


def node(n: Node) -> dict[str, Any]:
    """Consul ``Node``."""
    out = _node_fields(n, "Meta")
    out.update(CreateIndex=n.create_index, ModifyIndex=n.modify_index)
    return out


def node_service(s: Service) -> dict[str, Any]:
    """Consul ``NodeService`` (``Service`` in health, values of ``Services`` in catalog/node)."""
    out: dict[str, Any] = {}
    if s.kind:
        out["Kind"] = s.kind
    out.update(ID=s.id, Service=s.name, Tags=list(s.tags), Address=s.address)
    if s.tagged_addresses:
        out["TaggedAddresses"] = _tagged(s)
    out["Meta"] = dict(s.meta)
    if s.port:  # json:",omitempty"
        out["Port"] = s.port
    if s.socket_path:
        out["SocketPath"] = s.socket_path
    out.update(
        Weights=_weights(s),
        EnableTagOverride=s.enable_tag_override,
        Proxy=dict(_EMPTY_PROXY),
        Connect={},
        CreateIndex=s.create_index,
        ModifyIndex=s.modify_index,
    )
    return out


def service_node(n: Node, s: Service) -> dict[str, Any]:
    """Consul ``ServiceNode``: the flattened row of ``/v1/catalog/service/<name>``."""
    out = _node_fields(n, "NodeMeta")
    out.update(ServiceKind=s.kind, ServiceID=s.id, ServiceName=s.name, ServiceTags=list(s.tags),
               ServiceAddress=s.address)
    if s.tagged_addresses:
        out["ServiceTaggedAddresses"] = _tagged(s)
    out.update(
        ServiceWeights=_weights(s),
        ServiceMeta=dict(s.meta),
        ServicePort=s.port,
        ServiceSocketPath=s.socket_path,
        ServiceEnableTagOverride=s.enable_tag_override,
        ServiceProxy=dict(_EMPTY_PROXY),
        ServiceConnect={},
        CreateIndex=s.create_index,
        ModifyIndex=s.modify_index,
    )
    return out


def definition(d: CheckDefinition) -> dict[str, Any]:
    """Consul ``HealthCheckDefinition``: every field omitted when empty, durations as strings."""
    out: dict[str, Any] = {}
    for key, value in (
        ("HTTP", d.http),
        ("TLSServerName", d.tls_server_name),
        ("TLSSkipVerify", d.tls_skip_verify),
        ("Header", {k: list(v) for k, v in d.header.items()}),
        ("Method", d.method),
        ("Body", d.body),
        ("DisableRedirects", d.disable_redirects),
        ("TCP", d.tcp),
        ("UDP", d.udp),
        ("GRPC", d.grpc),
        ("OutputMaxSize", d.output_max_size),
        ("ScriptArgs", list(d.script_args)),
    ):
        if value:
            out[key] = value
    for key, secs in (
        ("Interval", d.interval),
        ("Timeout", d.timeout),
        ("TTL", d.ttl),
        ("DeregisterCriticalServiceAfter", d.deregister_critical_service_after),
    ):
        if secs:
            out[key] = format_duration(secs)
    return out


def check(c: Check) -> dict[str, Any]:
    """Consul ``HealthCheck``. ``ServiceTags`` is ``[]``, never null."""
    d = c.definition
    return {
        "Node": c.node,
        "CheckID": c.check_id,
        "Name": c.name,
        "Status": c.status,
        "Notes": c.notes,
        "Output": c.output,
        "ServiceID": c.service_id,
        "ServiceName": c.service_name,
        "ServiceTags": list(c.service_tags),
        "Type": c.type,
        "Interval": format_duration(d.interval) if d.interval else "",
        "Timeout": format_duration(d.timeout) if d.timeout else "",
        "ExposedPort": 0,
        "Definition": definition(d),
        "CreateIndex": c.create_index,
        "ModifyIndex": c.modify_index,
    }


def agent_service(s: Service, datacenter: str) -> dict[str, Any]:
    """Consul ``AgentService`` (``/v1/agent/services`` values)."""
    out: dict[str, Any] = {}
    if s.kind:
        out["Kind"] = s.kind
    out.update(ID=s.id, Service=s.name, Tags=list(s.tags), Meta=dict(s.meta), Port=s.port, Address=s.address)
    if s.socket_path:
        out["SocketPath"] = s.socket_path
    if s.tagged_addresses:
        out["TaggedAddresses"] = _tagged(s)
    out.update(Weights=_weights(s), EnableTagOverride=s.enable_tag_override)
    if s.create_index:
        out["CreateIndex"] = s.create_index
    if s.modify_index:
        out["ModifyIndex"] = s.modify_index
    out["Datacenter"] = datacenter
    return out


def kv_entry(e: KVEntry) -> dict[str, Any]:
    """Consul ``DirEntry``: ``Value`` is base64, or null for an empty value."""
    out: dict[str, Any] = {
        "LockIndex": e.lock_index,
        "Key": e.key,
        "Flags": e.flags,
        "Value": base64.b64encode(e.value).decode("ascii") if e.value else None,
    }
    if e.session:
        out["Session"] = e.session
    out.update(CreateIndex=e.create_index, ModifyIndex=e.modify_index)
    return out
