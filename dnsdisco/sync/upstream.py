"""Where the mirror reads its catalog from: the ``upstream`` config section and Consul's env vars.

This module owns :class:`UpstreamConfig` (a frozen value: the Consul agent's address, the ACL
token, TLS files, which datacenters to mirror, and the knobs of the blocking-query loop) and the
two ways of filling it: :func:`parse_upstream` checks the ``upstream`` section of a config source
key by key, raising :class:`~dnsdisco.errors.ConfigError` naming the source and
``upstream.<key>``; :func:`upstream_from_env` reads the ``CONSUL_*`` variables Consul's own CLI and
API client honour, as a raw section the caller merges *under* files and flags (flags override
files, which override the environment). Nothing here does I/O: TLS files are opened by
:mod:`dnsdisco.sync.consul` when it connects.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from dnsdisco.duration import parse_duration
from dnsdisco.errors import ConfigError
from dnsdisco.values import boolean as _bool
from dnsdisco.values import go_bool
from dnsdisco.values import integer as _int
from dnsdisco.values import kind as _kind
from dnsdisco.values import string as _str

__all__ = ["ALL_DATACENTERS", "UpstreamConfig", "parse_upstream", "upstream_from_env"]

# ``datacenters: ["*"]`` mirrors every datacenter ``/v1/catalog/datacenters`` lists.
ALL_DATACENTERS = "*"

# Consul's agent listens on 127.0.0.1:8500 unless told otherwise (api.DefaultConfig).
DEFAULT_ADDRESS = "http://127.0.0.1:8500"
# The server clamps ``wait`` to max_query_time (10 min by default) and blocks 5 min when none is
# given (default_query_time): asking for more than 10 min only gets 10 min (http-api.md a.1).
MAX_WAIT = 600.0


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """How to reach and follow one Consul agent. Durations are seconds.

    ``address`` is ``http://host:port``, ``https://host:port`` or ``unix:///path``.
    ``datacenters`` names the datacenters mirrored besides the agent's own (which is always
    mirrored); ``("*",)`` means every datacenter the agent knows.

    The loop knobs follow Consul's blocking-query advice (``api-docs/features/blocking``):
    ``wait`` is the blocking wait sent with each query; ``query_interval``/``query_burst`` are a
    token bucket per watch (burst 2, then one re-query per ~15 s while the data churns; 0 turns
    the limit off); ``backoff_min``/``backoff_max`` bound the jittered exponential backoff after
    errors; ``fetch_concurrency`` bounds the per-service reads in flight (and so, with four
    watches per datacenter, the connections held open); ``resync_interval`` re-reads every
    service now and then as a safety net (0 disables it). ``change_hints`` asks a dnsdisco
    upstream to name the services each write touched (an extension Consul ignores); off, the
    mirror finds them itself as it must with Consul.
    """

    address: str = DEFAULT_ADDRESS
    token: str = ""
    datacenters: tuple[str, ...] = ()
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    tls_server_name: str = ""
    tls_skip_verify: bool = False
    wait: float = 300.0
    query_interval: float = 15.0
    query_burst: int = 2
    backoff_min: float = 0.1
    backoff_max: float = 30.0
    fetch_concurrency: int = 8
    resync_interval: float = 600.0
    change_hints: bool = True

    @property
    def all_datacenters(self) -> bool:
        return ALL_DATACENTERS in self.datacenters

    @property
    def unix_path(self) -> str:
        """The socket path of a ``unix://`` address, else ""."""
        return self.address[len("unix://"):] if self.address.startswith("unix://") else ""

    @property
    def base_url(self) -> str:
        """The URL requests are built on (``http://localhost`` for a unix socket)."""
        return "http://localhost" if self.unix_path else self.address

    @property
    def tls(self) -> bool:
        return self.address.startswith("https://")


# -- value checks (each raises ValueError with the text an operator sees) ----------------------


def normalize_address(text: str, *, https: bool = False) -> str:
    """``host:port`` gains a scheme (``https`` if *https*, as ``CONSUL_HTTP_SSL`` asks), a trailing
    ``/`` goes; a path, query, or a scheme other than http/https/unix is refused."""
    text = text.strip()
    if not text:
        raise ValueError("must not be empty")
    if text.startswith("unix://"):
        if len(text) == len("unix://"):
            raise ValueError(f"{text!r} names no socket path")
        return text
    if "://" not in text:
        text = ("https://" if https else "http://") + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{text!r}: the scheme must be http, https or unix")
    if not parts.hostname:
        raise ValueError(f"{text!r} names no host")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError(f"{text!r} has an invalid port") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{text!r}: expected scheme://host:port with no path")
    return f"{parts.scheme}://{parts.netloc}"


def _address(v: Any) -> str:
    return normalize_address(_str(v))


def _datacenters(v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list):
        raise ValueError(f"expected a list of datacenter names (or [\"*\"]), got {_kind(v)}")
    out: list[str] = []
    for item in v:
        name = _str(item).strip()
        if not name:
            raise ValueError("a datacenter name must not be empty")
        if name == ALL_DATACENTERS:
            return (ALL_DATACENTERS,)
        if name.lower() not in (o.lower() for o in out):
            out.append(name)
    return tuple(out)


def _seconds(lo: float, hi: float) -> Callable[[Any], float]:
    def parse(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, str):
            raise ValueError(f"expected a duration string such as \"10s\", got {_kind(v)}")
        seconds = parse_duration(v)
        if not lo <= seconds <= hi:
            raise ValueError(f"must be between {lo:g}s and {hi:g}s, got {v!r}")
        return seconds

    return parse



_KEYS: dict[str, Callable[[Any], Any]] = {
    "address": _address,
    "token": _str,
    "datacenters": _datacenters,
    "ca_file": _str,
    "cert_file": _str,
    "key_file": _str,
    "tls_server_name": _str,
    "tls_skip_verify": _bool,
    # Below 1 s a blocking query is a poll; above max_query_time the server clamps it anyway.
    "wait": _seconds(1.0, MAX_WAIT),
    "query_interval": _seconds(0.0, 3600.0),
    "query_burst": _int(1, 1000),
    "backoff_min": _seconds(0.001, 60.0),
    "backoff_max": _seconds(0.001, 3600.0),
    "fetch_concurrency": _int(1, 256),
    "resync_interval": _seconds(0.0, 7 * 86400.0),
    "change_hints": _bool,
}


def parse_upstream(raw: Mapping[str, Any] | str, source: str) -> UpstreamConfig:
    """Check the ``upstream`` section of one config source and build the value.

    *raw* is the JSON object (or a bare address string, the short form of ``-upstream``). An
    unknown key or a bad value raises :class:`ConfigError` naming *source* and
    ``upstream.<key>``; so do a client certificate without its key (or the reverse) and a
    ``backoff_max`` below ``backoff_min``. TLS settings with an ``http://`` address are unused
    (as in Consul's client, where ``CONSUL_CACERT`` may be set for other agents).
    """
    if isinstance(raw, str):
        raw = {"address": raw}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"expected an object or an address string, got {_kind(raw)}",
                          source=source, key="upstream")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        dotted = f"upstream.{key}"
        parser = _KEYS.get(key)
        if parser is None:
            raise ConfigError("unknown key", source=source, key=dotted)
        try:
            values[key] = parser(value)
        except ValueError as e:
            raise ConfigError(str(e), source=source, key=dotted) from None
    config = UpstreamConfig(**values)
    if bool(config.cert_file) != bool(config.key_file):
        missing = "key_file" if config.cert_file else "cert_file"
        raise ConfigError("a client certificate needs both cert_file and key_file",
                          source=source, key=f"upstream.{missing}")
    if config.backoff_max < config.backoff_min:
        raise ConfigError("must not be below upstream.backoff_min", source=source, key="upstream.backoff_max")
    return config


def upstream_from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The ``upstream`` settings Consul's standard environment variables give, as a raw section
    for :func:`parse_upstream` (merge files and flags over it: they win).

    Honoured, as Consul's ``api.DefaultConfig`` reads them: ``CONSUL_HTTP_ADDR`` (``host:port``,
    a URL or ``unix://``), ``CONSUL_HTTP_SSL`` (a schemeless address is ``https``),
    ``CONSUL_HTTP_SSL_VERIFY=false``, ``CONSUL_HTTP_TOKEN``, ``CONSUL_CACERT``,
    ``CONSUL_CLIENT_CERT``, ``CONSUL_CLIENT_KEY`` and ``CONSUL_TLS_SERVER_NAME``. Empty
    variables count as unset. A malformed value raises :class:`ConfigError` naming the variable.
    """
    out: dict[str, Any] = {}
    ssl = False
    raw_ssl = environ.get("CONSUL_HTTP_SSL", "")
    if raw_ssl:
        parsed = go_bool(raw_ssl)
        if parsed is None:
            raise ConfigError(f"expected true or false, got {raw_ssl!r}", source="CONSUL_HTTP_SSL")
        ssl = parsed
    addr = environ.get("CONSUL_HTTP_ADDR", "")
    if addr:
        try:
            out["address"] = normalize_address(addr, https=ssl)
        except ValueError as e:
            raise ConfigError(str(e), source="CONSUL_HTTP_ADDR") from None
    elif ssl:
        out["address"] = "https://127.0.0.1:8500"
    verify = environ.get("CONSUL_HTTP_SSL_VERIFY", "")
    if verify:
        parsed = go_bool(verify)
        if parsed is None:
            raise ConfigError(f"expected true or false, got {verify!r}", source="CONSUL_HTTP_SSL_VERIFY")
        out["tls_skip_verify"] = not parsed
    for var, key in (
        ("CONSUL_HTTP_TOKEN", "token"),
        ("CONSUL_CACERT", "ca_file"),
        ("CONSUL_CLIENT_CERT", "cert_file"),
        ("CONSUL_CLIENT_KEY", "key_file"),
        ("CONSUL_TLS_SERVER_NAME", "tls_server_name"),
    ):
        value = environ.get(var, "")
        if value:
            out[key] = value
    return out
