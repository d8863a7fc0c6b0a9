"""Configuration: Consul-compatible JSON files and agent flags, resolved once into frozen values.

This module owns the shape of the configuration (frozen dataclasses, one per section), its
defaults, and the loading rules: later files override earlier ones, flags override files, an
unknown key or a bad value raises :class:`~dnsdisco.errors.ConfigError` naming the file (or flag)
and the key. Key names are Consul's (``node_name``, ``ports.dns``, ``dns_config.only_passing``,
...) so existing agent configs port over. Nothing here does I/O beyond reading the files it is
given; nothing here exits the process.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from dnsdisco.duration import parse_duration
from dnsdisco.errors import ConfigError
from dnsdisco.values import boolean, integer, kind, string
from dnsdisco.sync.upstream import UpstreamConfig, parse_upstream, upstream_from_env

RecursorStrategy = Literal["sequential", "random"]

# Who may have names outside our domains resolved through the recursors: loopback and the
# private ranges (RFC 1918, RFC 4193), as BIND's `allow-recursion { localnets; localhost; }`
# default keeps it from being an open resolver (anchors.md §4.2).
DEFAULT_ALLOW_RECURSION: tuple[str, ...] = (
    "127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7",
)


@dataclass(frozen=True, slots=True)
class SoaConfig:
    """``dns_config.soa``: the zone's SOA timers, in seconds (Consul 1.3+ defaults)."""

    refresh: int = 3600
    retry: int = 600
    expire: int = 86400
    min_ttl: int = 0


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    """``dns_config.rate_limit``: response rate limiting of UDP replies (dnsdisco's own; Consul
    has none). BIND's ``rate-limit`` options in snake_case, with BIND's defaults; see
    :mod:`dnsdisco.dns.rrl`. Off while every rate is 0 (the default). ``None`` for the NODATA,
    NXDOMAIN and error rates means "as ``responses_per_second``", as in BIND.
    """

    responses_per_second: int = 0
    nodata_per_second: int | None = None
    nxdomains_per_second: int | None = None
    errors_per_second: int | None = None
    window: float = 15.0
    slip: int = 2
    ipv4_prefix_length: int = 24
    ipv6_prefix_length: int = 56
    exempt_clients: tuple[str, ...] = ()
    log_only: bool = False
    max_table_size: int = 20000

    @property
    def enabled(self) -> bool:
        return any((self.responses_per_second, self.nodata_per_second, self.nxdomains_per_second,
                    self.errors_per_second))


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
    # dnsdisco's own keys: the forwarder (dnsdisco.forward).
    allow_recursion: tuple[str, ...] = DEFAULT_ALLOW_RECURSION
    recursor_max_concurrent: int = 1000  # CoreDNS forward max_concurrent (k8s deployment value)
    recursor_cache_size: int = 10000  # forwarded answers kept; 0 disables the cache
    recursor_serve_stale: float = 86400.0  # RFC 8767 maximum stale age; 0 never serves stale
    # dnsdisco's own: response rate limiting (dnsdisco.dns.rrl); off by default.
    rate_limit: RateLimitConfig = RateLimitConfig()

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
class ServiceSource:
    """One service definition as written in a config file, with the file it came from."""

    source: str
    definition: Mapping[str, Any]


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
    # Service definitions from config files, undecoded: the catalog's decoder reads them, so that
    # files and the HTTP API accept exactly the same forms (see decode_services).
    services: tuple[ServiceSource, ...] = ()
    # Mirror mode: follow this Consul agent instead of running the embedded catalog.
    upstream: UpstreamConfig | None = None
    log_level: str = "info"
    log_json: bool = False
    # DNS processes sharing the DNS port (dnsdisco.workers); 1 serves DNS in the agent itself.
    dns_workers: int = 1

    @property
    def http_bind(self) -> str:
        return self.http_addr or self.client_addr

    @property
    def dns_bind(self) -> str:
        return self.dns_addr or self.client_addr

    @property
    def advertise(self) -> str:
        return self.advertise_addr or self.bind_addr


# ---------------------------------------------------------------------------------------------
# Loading
#
# Each source (a file, or the command line) is a JSON object in Consul's layout. It is checked
# key by key against the tables below, so that an unknown key or a bad value is reported with the
# source and the dotted key, and then merged: scalars and maps key by key (later sources win),
# `service`/`services` and `recursors` appended, as Consul merges its config fragments.

Parser = Callable[[Any], Any]
_str, _bool, _int, _kind = string, boolean, integer, kind


def _port(v: Any) -> int:
    # -1 disables the listener (Consul); 0 asks the kernel for a free port (handy in tests).
    return _int(-1, 65535)(v)


def _duration(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError(f"expected a duration such as \"10s\", got {_kind(v)}")
    if isinstance(v, (int, float)):
        # Consul's config reads a bare number as seconds for a few keys and as nanoseconds for
        # others; refusing it is clearer than guessing.
        raise ValueError(f"expected a duration string such as \"10s\", got the number {v}")
    seconds = parse_duration(_str(v))
    if seconds < 0:
        raise ValueError(f"must not be negative, got {v!r}")
    return seconds


def _ip(v: Any) -> str:
    text = _str(v).strip()
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"expected an IP address, got {v!r}") from None
    return text


def _domain(v: Any) -> str:
    text = _str(v).strip().lower().rstrip(".")
    if not text:
        raise ValueError("must not be empty")
    labels = text.split(".")
    if any(not label or len(label) > 63 for label in labels) or len(text) > 253:
        raise ValueError(f"{v!r} is not a valid domain name")
    return text + "."


def _recursor(v: Any) -> str:
    """Normalise ``ip``, ``ip:port`` or ``[v6]:port`` to ``host:port`` text (port 53 default)."""
    text = _str(v).strip()
    host, port = text, 53
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{v!r} is not an address: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{v!r} is not an address")
            port = _port_text(rest[1:], v)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        port = _port_text(port_text, v)
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{v!r} is not an IP address (host names are not accepted)") from None
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


def _port_text(text: str, whole: Any) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{whole!r} has an invalid port")
    return int(text)


def _level(v: Any) -> str:
    text = _str(v).lower()
    if text not in ("trace", "debug", "info", "warn", "warning", "error"):
        raise ValueError(f"expected one of trace, debug, info, warn, error; got {v!r}")
    return text


def _strategy(v: Any) -> str:
    text = _str(v)
    if text not in ("sequential", "random"):
        raise ValueError(f"expected \"sequential\" or \"random\", got {v!r}")
    return text


def _cidrs(v: Any) -> tuple[str, ...]:
    """A list of networks (``"10.0.0.0/8"``, ``"::1/128"``, or a bare address) in normal form."""
    if not isinstance(v, list):
        raise ValueError(f"expected a list of CIDRs such as [\"10.0.0.0/8\"], got {_kind(v)}")
    out = []
    for item in v:
        text = _str(item).strip()
        try:
            # strict=False: "192.168.1.1/24" means that address's network, as BIND reads it.
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not a CIDR (expected e.g. \"10.0.0.0/8\" or \"fd00::/8\")") from None
        if str(net) not in out:
            out.append(str(net))
    return tuple(out)


def _service_ttl(v: Any) -> tuple[tuple[str, float], ...]:
    if not isinstance(v, dict):
        raise ValueError(f"expected an object of service name to duration, got {_kind(v)}")
    out = []
    for name, ttl in v.items():
        try:
            out.append((name.lower(), _duration(ttl)))
        except ValueError as e:
            raise ValueError(f"{name!r}: {e}") from None
    return tuple(out)


_SOA_KEYS: dict[str, Parser] = {
    "refresh": _int(0, 2**31 - 1),
    "retry": _int(0, 2**31 - 1),
    "expire": _int(0, 2**31 - 1),
    "min_ttl": _int(0, 2**31 - 1),
}


def _rrl_window(v: Any) -> float:
    # BIND: 1 to 3600 seconds; written as a duration here like every other time in the config.
    seconds = _duration(v)
    if not 1.0 <= seconds <= 3600.0:
        raise ValueError(f"must be between 1s and 1h, got {v!r}")
    return seconds


# dns_config.rate_limit: BIND's rate-limit options (dnsdisco.dns.rrl), with BIND's ranges.
_RATE_LIMIT_KEYS: dict[str, Parser] = {
    "responses_per_second": _int(0, 1000),
    "nodata_per_second": _int(0, 1000),
    "nxdomains_per_second": _int(0, 1000),
    "errors_per_second": _int(0, 1000),
    "window": _rrl_window,
    "slip": _int(0, 10),
    "ipv4_prefix_length": _int(0, 32),
    "ipv6_prefix_length": _int(0, 128),
    "exempt_clients": _cidrs,
    "log_only": _bool,
    "max_table_size": _int(1, 10_000_000),
}

_DNS_KEYS: dict[str, Parser] = {
    "allow_stale": _bool,
    "max_stale": _duration,
    "node_ttl": _duration,
    "service_ttl": _service_ttl,
    "enable_truncate": _bool,
    "only_passing": _bool,
    "recursor_strategy": _strategy,
    "recursor_timeout": _duration,
    "disable_compression": _bool,
    # Consul accepts 0 and then answers nothing at all; we refuse it (spec: Decisions table).
    "udp_answer_limit": _int(1, 2**31 - 1),
    "a_record_limit": _int(0, 2**31 - 1),
    "enable_additional_node_meta_txt": _bool,
    "use_cache": _bool,
    "cache_max_age": _duration,
    "prefer_namespace": _bool,
    "tcp_idle_timeout": _duration,
    "tcp_max_connections": _int(1, 1_000_000),
    "query_log": _bool,
    "allow_recursion": _cidrs,
    "recursor_max_concurrent": _int(1, 1_000_000),
    "recursor_cache_size": _int(0, 10_000_000),
    "recursor_serve_stale": _duration,
}

_TOP_KEYS: dict[str, Parser] = {
    "datacenter": _str,
    "node_name": _str,
    "client_addr": _ip,
    "bind_addr": _ip,
    "advertise_addr": _ip,
    "data_dir": _str,
    "domain": _domain,
    "alt_domain": _domain,
    "enable_script_checks": _bool,
    "translate_wan_addrs": _bool,
    "log_level": _level,
    "log_json": _bool,
    "dns_workers": _int(1, 1024),
}
_PORT_KEYS: dict[str, Parser] = {"http": _port, "dns": _port, "server": _port}
_ADDRESS_KEYS: dict[str, Parser] = {"http": _ip, "dns": _ip}


def _check_section(section: Any, keys: Mapping[str, Parser], prefix: str, source: str) -> dict:
    if not isinstance(section, dict):
        raise ConfigError(f"expected an object, got {_kind(section)}", source=source, key=prefix)
    out = {}
    for key, value in section.items():
        dotted = f"{prefix}.{key}"
        if key not in keys:
            raise ConfigError("unknown key", source=source, key=dotted)
        try:
            out[key] = keys[key](value)
        except ValueError as e:
            raise ConfigError(str(e), source=source, key=dotted) from None
    return out


def parse_source(raw: Any, source: str) -> dict[str, Any]:
    """Check one source's JSON object key by key; return it with values parsed.

    Raises :class:`ConfigError` naming *source* and the dotted key of the first problem.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a JSON object at the top level, got {_kind(raw)}", source=source)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _TOP_KEYS:
            try:
                out[key] = _TOP_KEYS[key](value)
            except ValueError as e:
                raise ConfigError(str(e), source=source, key=key) from None
        elif key == "ports":
            out[key] = _check_section(value, _PORT_KEYS, key, source)
        elif key == "addresses":
            out[key] = _check_section(value, _ADDRESS_KEYS, key, source)
        elif key == "dns_config":
            if not isinstance(value, dict):
                raise ConfigError(f"expected an object, got {_kind(value)}", source=source, key=key)
            section = dict(value)
            soa = section.pop("soa", None)
            rate_limit = section.pop("rate_limit", None)
            parsed = _check_section(section, _DNS_KEYS, key, source)
            if soa is not None:
                parsed["soa"] = _check_section(soa, _SOA_KEYS, "dns_config.soa", source)
            if rate_limit is not None:
                parsed["rate_limit"] = _check_section(rate_limit, _RATE_LIMIT_KEYS, "dns_config.rate_limit", source)
            out[key] = parsed
        elif key == "upstream":
            # Checked here so a bad value names this source; merged key by key like a section.
            parse_upstream(value, source)
            out[key] = {"address": value} if isinstance(value, str) else dict(value)
        elif key == "recursors":
            if not isinstance(value, list):
                raise ConfigError(f"expected a list, got {_kind(value)}", source=source, key=key)
            try:
                out[key] = [_recursor(v) for v in value]
            except ValueError as e:
                raise ConfigError(str(e), source=source, key=key) from None
        elif key in ("service", "services"):
            # Consul takes `service` as one object (or, from HCL normalisation, a one-item list)
            # and `services` as a list.
            items = value if isinstance(value, list) else [value]
            if key == "services" and not isinstance(value, list):
                raise ConfigError(f"expected a list of services, got {_kind(value)}", source=source, key=key)
            for i, item in enumerate(items):
                if not isinstance(item, dict):
                    raise ConfigError(f"expected an object, got {_kind(item)}", source=source, key=f"{key}[{i}]")
            out.setdefault("services", []).extend(ServiceSource(source, item) for item in items)
        else:
            raise ConfigError("unknown key", source=source, key=key)
    return out


def read_file(path: str) -> dict[str, Any]:
    """Read and check one JSON config file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", source=path) from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}", source=path) from None
    return parse_source(raw, path)


def dir_files(path: str) -> list[str]:
    """The config files of a config dir: ``*.json``, not recursive, in lexical order (Consul)."""
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        raise ConfigError(f"cannot read config dir: {e.strerror}", source=path) from None
    files = []
    for name in names:
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            continue
        if name.endswith(".hcl"):
            raise ConfigError("HCL config files are not supported; write the file as JSON", source=full)
        if name.endswith(".json"):
            files.append(full)
    return files


def _merge(into: dict[str, Any], src: Mapping[str, Any]) -> None:
    for key, value in src.items():
        if key in ("services",):
            into.setdefault(key, []).extend(value)
        elif key == "recursors":
            have = into.setdefault(key, [])
            have.extend(r for r in value if r not in have)
        elif isinstance(value, dict):
            merged = dict(into.get(key, {}))
            for k, v in value.items():
                if isinstance(v, dict):
                    merged[k] = {**merged.get(k, {}), **v}
                else:
                    merged[k] = v
            into[key] = merged
        else:
            into[key] = value


def load(
    files: Sequence[str] = (),
    dirs: Sequence[str] = (),
    overrides: Mapping[str, Any] | None = None,
    *,
    dev: bool = False,
    hostname: Callable[[], str] = socket.gethostname,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Resolve the configuration: files in order, then each dir's ``*.json`` files in lexical
    order, then *overrides* (the command line, in the same JSON layout), later sources winning.
    In mirror mode (an ``upstream`` section or ``-upstream``), Consul's ``CONSUL_HTTP_*``
    variables from *environ* fill what files and flags leave unset.

    Raises :class:`ConfigError` naming the source and key of the first problem; nothing is
    started or changed by a failed load.
    """
    merged: dict[str, Any] = {}
    for path in files:
        _merge(merged, read_file(path))
    for d in dirs:
        for path in dir_files(d):
            _merge(merged, read_file(path))
    if overrides:
        _merge(merged, parse_source(dict(overrides), "command line"))
    # -dev (one developer's machine, tests, the README's quick start) serves DNS in the agent
    # itself: the freshest path and the quickest start. Otherwise one DNS process per core.
    workers = 1 if dev else default_dns_workers()
    upstream = None
    if "upstream" in merged:
        env = upstream_from_env(os.environ if environ is None else environ)
        upstream = parse_upstream({**env, **merged["upstream"]}, "configuration")
        # The mirror keeps no catalog of its own, so it needs no data dir.
        dev = True
    return _build(merged, files=tuple(files), dirs=tuple(dirs), dev=dev, hostname=hostname,
                  upstream=upstream, workers=workers)


def _build(m: dict[str, Any], *, files: tuple[str, ...], dirs: tuple[str, ...], dev: bool,
           hostname: Callable[[], str], upstream: UpstreamConfig | None, workers: int = 1) -> Config:
    dns_raw = dict(m.get("dns_config", {}))
    soa = SoaConfig(**dns_raw.pop("soa", {}))
    rate_limit = RateLimitConfig(**dns_raw.pop("rate_limit", {}))
    dns = DnsConfig(soa=soa, rate_limit=rate_limit, **dns_raw)
    ports = m.get("ports", {})
    addresses = m.get("addresses", {})
    domain = m.get("domain", "consul.")
    alt_domain = m.get("alt_domain", "")
    if alt_domain and alt_domain == domain:
        raise ConfigError("must differ from domain", source="configuration", key="alt_domain")
    data_dir = m.get("data_dir", "")
    if not dev and not data_dir:
        raise ConfigError("must be set (or run with -dev to keep everything in memory)",
                          source="configuration", key="data_dir")
    node_name = m.get("node_name") or hostname()
    datacenter = m.get("datacenter", "dc1").lower()
    if not datacenter or any(not (c.isalnum() or c in "-_") for c in datacenter):
        raise ConfigError(f"{datacenter!r} is not a valid datacenter name", source="configuration",
                          key="datacenter")
    return Config(
        datacenter=datacenter,
        node_name=node_name,
        client_addr=m.get("client_addr", "127.0.0.1"),
        bind_addr=m.get("bind_addr", "127.0.0.1"),
        advertise_addr=m.get("advertise_addr", ""),
        http_addr=addresses.get("http", ""),
        dns_addr=addresses.get("dns", ""),
        http_port=ports.get("http", 8500),
        dns_port=ports.get("dns", 8600),
        server_port=ports.get("server", 8300),
        data_dir="" if dev else data_dir,
        dev=dev,
        domain=domain,
        alt_domain=alt_domain,
        recursors=tuple(m.get("recursors", ())),
        translate_wan_addrs=m.get("translate_wan_addrs", False),
        enable_script_checks=m.get("enable_script_checks", False),
        dns_config=dns,
        config_files=files,
        config_dirs=dirs,
        services=tuple(m.get("services", ())),
        upstream=upstream,
        log_level=m.get("log_level", "info"),
        log_json=m.get("log_json", False),
        dns_workers=m.get("dns_workers", workers),
    )


def default_dns_workers(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """``dns_workers`` when unset: the cores this process may run on (a ``taskset`` or cgroup
    cpuset counts, as it should for a pinned benchmark), else every core; and no more than a
    cgroup CPU quota allows (a container limited to 2 CPUs on a 64-core host gets 2 workers,
    not 64, each holding a copy of the catalog)."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        cores = max(1, os.cpu_count() or 1)
    quota = cgroup_cpu_quota(cgroup_root)
    return cores if quota is None else max(1, min(cores, math.ceil(quota)))


def cgroup_cpu_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs this process's cgroup may use (quota / period), or None without a limit: cgroup v2's
    ``cpu.max`` ("max 100000" when unlimited), else v1's ``cpu.cfs_quota_us`` (-1 unlimited)."""
    try:
        with open(os.path.join(root, "cpu.max")) as f:
            quota, _, period = f.read().strip().partition(" ")
        if quota == "max":
            return None
        return int(quota) / int(period or "100000")
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            quota_us = int(f.read().strip())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period_us = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us


def decode_services(config: Config) -> list[tuple[Any, list[Any]]]:
    """Decode the config files' service definitions with the catalog's decoder.

    Returns ``(Service, [Check])`` pairs for the agent's node. Raises :class:`ConfigError`
    naming the file and the key (``service.check.interval``) of the first bad definition.
    """
    from dnsdisco.catalog.definition import decode_service_definition
    from dnsdisco.errors import DecodeError

    out = []
    seen: dict[str, str] = {}
    for src in config.services:
        try:
            service, checks = decode_service_definition(
                src.definition, node=config.node_name,
                enable_script_checks=config.enable_script_checks, strict=True,
            )
        except DecodeError as e:
            key = f"service.{e.key}" if e.key else "service"
            raise ConfigError(e.message, source=src.source, key=key) from None
        if service.id in seen:
            raise ConfigError(f"duplicate service ID {service.id!r} (also in {seen[service.id]})",
                              source=src.source, key="service.id")
        seen[service.id] = src.source
        out.append((service, list(checks)))
    return out


def dns_config_fields() -> list[str]:
    """Names of every ``dns_config`` key, for documentation checks."""
    return [f.name for f in fields(DnsConfig)]


def with_overrides(config: Config, **changes: Any) -> Config:
    """A copy of *config* with some fields replaced (tests and the CLI use it)."""
    return replace(config, **changes)
