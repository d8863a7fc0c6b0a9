"""Configuration: Consul-compatible JSON files and agent flags, resolved once into frozen values.

This module owns the shape of the configuration (frozen dataclasses, one per section), its
defaults, and the loading rules: later files override earlier ones, flags override files, an
unknown key or a bad value raises :class:`~dnsdisco.errors.ConfigError` naming the file (or flag)
and the key. Key names are Consul's (``node_name``, ``ports.dns``, ``dns_config.only_passing``,
...) so existing agent configs port over. Nothing here does I/O beyond reading the files it is
given; nothing here exits the process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

RecursorStrategy = Literal["sequential", "random"]


@dataclass(frozen=True, slots=True)
class SoaConfig:
    """``dns_config.soa``: the zone's SOA timers, in seconds (Consul 1.3+ defaults)."""

    refresh: int = 3600
    retry: int = 600
    expire: int = 86400
    min_ttl: int = 0


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """``dns_config``: how the DNS interface answers. Durations are seconds.

    ``service_ttl`` maps a service name, a ``prefix*`` or ``*`` to a TTL; the exact name wins,
    then the longest prefix, then ``*``, then 0 (Consul's rule).
    """

    allow_stale: bool = True
    max_stale: float = 87600 * 3600.0
    node_ttl: float = 0.0
    service_ttl: tuple[tuple[str, float], ...] = ()
    enable_truncate: bool = False
    only_passing: bool = False
    recursor_strategy: RecursorStrategy = "sequential"
    recursor_timeout: float = 2.0
    disable_compression: bool = False
    udp_answer_limit: int = 3
    a_record_limit: int = 0
    enable_additional_node_meta_txt: bool = True
    soa: SoaConfig = SoaConfig()
    use_cache: bool = False
    cache_max_age: float = 0.0
    prefer_namespace: bool = False
    # dnsdisco's own keys (not in Consul): bounds on the TCP listener.
    tcp_idle_timeout: float = 10.0
    tcp_max_connections: int = 1024
    query_log: bool = False

    def service_ttl_for(self, name: str) -> float:
        """TTL for service *name*: exact key, else the longest matching ``prefix*``, else 0."""
        name = name.lower()
        best_len = -1
        best = 0.0
        for key, ttl in self.service_ttl:
            if key == name:
                return ttl
            if key.endswith("*") and name.startswith(key[:-1]) and len(key) > best_len:
                best_len, best = len(key), ttl
        return best


@dataclass(frozen=True, slots=True)
class Config:
    """The whole agent configuration, resolved. Field names follow Consul's config keys."""

    datacenter: str = "dc1"
    node_name: str = ""  # empty: the machine's hostname, resolved at load time
    client_addr: str = "127.0.0.1"
    bind_addr: str = "127.0.0.1"
    advertise_addr: str = ""  # empty: bind_addr
    http_addr: str = ""  # addresses.http; empty: client_addr
    dns_addr: str = ""  # addresses.dns; empty: client_addr
    http_port: int = 8500  # ports.http; -1 disables
    dns_port: int = 8600  # ports.dns; -1 disables
    server_port: int = 8300  # ports.server: the port of the agent's own `consul` service
    data_dir: str = ""
    dev: bool = False
    domain: str = "consul."
    alt_domain: str = ""
    recursors: tuple[str, ...] = ()
    translate_wan_addrs: bool = False
    enable_script_checks: bool = False
    dns_config: DnsConfig = DnsConfig()
    config_files: tuple[str, ...] = ()
    config_dirs: tuple[str, ...] = ()
    # Service definitions from config files, as raw dicts; decoded by the catalog's decoder so
    # that files and the HTTP API accept exactly the same forms.
    services: tuple[dict, ...] = field(default_factory=tuple)
    log_level: str = "info"
    log_json: bool = False
