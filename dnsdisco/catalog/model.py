"""The catalog's values: nodes, services, checks, KV entries, and the deltas the DNS side eats.

These are stripped-down Consul objects (CoreDNS's kubernetes plugin does the same: cut the
source objects down at ingest). They are frozen and carry no behaviour beyond small derived
properties, so they can cross modules and processes freely. Mapping fields are plain dicts that
nobody mutates after construction: treat every value here as read-only.

Both producers of the DNS snapshot - the embedded catalog (``catalog.store``) and the mirror of
a real Consul cluster - hand the DNS side :class:`CatalogDelta` values built from these types,
which is why the DNS side cannot tell the two apart.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

# Check statuses as Consul spells them. Maintenance mode is a critical check, not a status.
PASSING = "passing"
WARNING = "warning"
CRITICAL = "critical"
STATUSES = (PASSING, WARNING, CRITICAL)

_SEVERITY = {PASSING: 0, WARNING: 1, CRITICAL: 2}


def aggregate_status(checks: Iterable[Check]) -> str:
    """Return the worst status of *checks* (Consul's ``AggregatedStatus``); no checks is passing."""
    worst = PASSING
    for check in checks:
        if _SEVERITY.get(check.status, 2) > _SEVERITY[worst]:
            worst = check.status if check.status in _SEVERITY else CRITICAL
            if worst == CRITICAL:
                break
    return worst


_T = TypeVar("_T")


def _pickled_by_fields(cls: type[_T]) -> type[_T]:
    """Pickle *cls* as a call of its constructor with its fields, not as a slots object whose
    state is restored attribute by attribute: a DNS worker's start-up snapshot of 100,000
    instances (dnsdisco.workers.seed_from_store) loads in half the time."""
    names = tuple(f.name for f in fields(cls))  # type: ignore[arg-type]

    def __reduce__(self: Any) -> tuple[Any, tuple[Any, ...]]:
        return cls, tuple(getattr(self, n) for n in names)

    cls.__reduce__ = __reduce__  # type: ignore[assignment,method-assign]
    return cls


@_pickled_by_fields
@dataclass(frozen=True, slots=True)
class TaggedAddress:
    """A service's tagged address (``lan_ipv4``, ``wan``, ...): Consul's ``{Address, Port}``."""

    address: str
    port: int = 0


@_pickled_by_fields
@dataclass(frozen=True, slots=True)
class Weights:
    """SRV weights by health (Consul ``Weights``): passing instances use ``passing``."""

    passing: int = 1
    warning: int = 1


@_pickled_by_fields
@dataclass(frozen=True, slots=True)
class Node:
    """A catalog node (Consul ``Node``). ``tagged_addresses`` maps name -> address string."""

    name: str
    address: str
    datacenter: str
    id: str = ""
    tagged_addresses: Mapping[str, str] = field(default_factory=dict)
    meta: Mapping[str, str] = field(default_factory=dict)
    create_index: int = 0
    modify_index: int = 0


@_pickled_by_fields
@dataclass(frozen=True, slots=True)
class Service:
    """A service instance on a node (Consul ``NodeService``). ``name`` is Consul's ``Service``.

    An empty ``address`` means "use the node's address", as in Consul.
    """

    node: str
    id: str
    name: str
    tags: tuple[str, ...] = ()
    address: str = ""
    port: int = 0
    tagged_addresses: Mapping[str, TaggedAddress] = field(default_factory=dict)
    meta: Mapping[str, str] = field(default_factory=dict)
    weights: Weights = Weights()
    kind: str = ""
    enable_tag_override: bool = False
    socket_path: str = ""
    create_index: int = 0
    modify_index: int = 0


@_pickled_by_fields
@dataclass(frozen=True, slots=True)
class CheckDefinition:
    """How the agent runs a check. Durations are seconds (floats); 0 means unset.

    Exactly one of ``http``, ``tcp``, ``ttl``, ``script_args`` (or none, for checks whose status
    an external caller writes through the catalog API) says what kind of check it is.
    """

    http: str = ""
    method: str = ""
    header: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    body: str = ""
    disable_redirects: bool = False
    tls_server_name: str = ""
    tls_skip_verify: bool = False
    tcp: str = ""
    udp: str = ""
    grpc: str = ""
    script_args: tuple[str, ...] = ()
    ttl: float = 0.0
    interval: float = 0.0
    timeout: float = 0.0
    deregister_critical_service_after: float = 0.0
    success_before_passing: int = 0
    failures_before_warning: int = 0
    failures_before_critical: int = 0
    output_max_size: int = 0

    @property
    def type(self) -> str:
        """Consul's check ``Type``: http, tcp, udp, grpc, script, ttl, or "" (externally set)."""
        if self.http:
            return "http"
        if self.tcp:
            return "tcp"
        if self.udp:
            return "udp"
        if self.grpc:
            return "grpc"
        if self.script_args:
            return "script"
        if self.ttl:
            return "ttl"
        return ""


@_pickled_by_fields
@dataclass(frozen=True, slots=True)
class Check:
    """A health check (Consul ``HealthCheck``). Node-level checks have ``service_id == ""``."""

    node: str
    check_id: str
    name: str
    status: str = CRITICAL
    notes: str = ""
    output: str = ""
    service_id: str = ""
    service_name: str = ""
    service_tags: tuple[str, ...] = ()
    definition: CheckDefinition = CheckDefinition()
    create_index: int = 0
    modify_index: int = 0

    @property
    def type(self) -> str:
        return self.definition.type


@dataclass(frozen=True, slots=True)
class KVEntry:
    """A KV pair (Consul ``DirEntry``); ``value`` is raw bytes (base64 only on the wire)."""

    key: str
    value: bytes = b""
    flags: int = 0
    lock_index: int = 0
    session: str = ""
    create_index: int = 0
    modify_index: int = 0


@_pickled_by_fields
@dataclass(frozen=True, slots=True)
class ServiceEntry:
    """One row of ``/v1/health/service/<name>``: an instance, its node, and every check that
    bears on its health - the instance's own checks **and** its node's checks (Consul's DNS
    counts both)."""

    node: Node
    service: Service
    checks: tuple[Check, ...] = ()

    @property
    def status(self) -> str:
        """The instance's aggregate health: the worst of its own and its node's checks."""
        return aggregate_status(self.checks)


@dataclass(frozen=True, slots=True)
class CatalogDelta:
    """A change to one datacenter's catalog, in the shape the DNS side consumes.

    ``services`` maps a **lower-cased** service name to every entry that now answers to it
    (all instances whose name lower-cases to the key, healthy or not; the DNS side applies its
    own health filter). An empty tuple means the service is gone. ``nodes`` maps a node name to
    the node now, or ``None`` if it is gone. With ``full=True`` the delta is the whole catalog of
    ``datacenter``: anything not named in it no longer exists. ``index`` is the catalog index
    the delta brings the consumer up to.
    """

    datacenter: str
    index: int
    services: Mapping[str, tuple[ServiceEntry, ...]] = field(default_factory=dict)
    nodes: Mapping[str, Node | None] = field(default_factory=dict)
    full: bool = False
