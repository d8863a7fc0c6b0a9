"""The ``dnsdisco`` command line: the only place that turns errors into exit codes.

``dnsdisco agent`` takes the flags Consul's agent takes (``-dev``, ``-config-file``,
``-config-dir``, ``-node``, ``-dns-port``, ...), in Consul's single-dash spelling or the
``--long`` one. The operator commands (``reload``, ``catalog``, ``kv``, ``services``) talk to a
running agent's HTTP API the way Consul's CLI does: ``-http-addr`` (else ``CONSUL_HTTP_ADDR``,
else ``127.0.0.1:8500``) and ``-token`` (else ``CONSUL_HTTP_TOKEN`` / ``CONSUL_HTTP_TOKEN_FILE``),
over stdlib ``urllib``: one synchronous request each, no event loop. Exit codes: 0 success,
1 runtime failure (a bad config, a port in use, an agent that cannot be reached or says no;
the message says what to do), 2 usage error.

This module also owns how the agent logs: one line per event on stderr (text or JSON), with
repeated warnings and errors folded by :class:`ConsolidatingFilter`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dnsdisco import __version__
from dnsdisco import config as configmod
from dnsdisco.errors import DnsdiscoError

log = logging.getLogger("dnsdisco")


def _flag(parser: argparse.ArgumentParser, name: str, **kw: Any) -> None:
    # Consul spells its flags with one dash; accept that and the GNU `--long` form alike.
    parser.add_argument(f"-{name}", f"--{name}", **kw)


def _agent_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agent", help="run the agent: catalog, health checks, HTTP API and DNS",
                       allow_abbrev=False)
    _flag(p, "dev", action="store_true", help="development mode: everything in memory, no data dir")
    _flag(p, "config-file", action="append", default=[], dest="config_files", metavar="FILE",
          help="a JSON config file (repeatable; later files override earlier ones)")
    _flag(p, "config-dir", action="append", default=[], dest="config_dirs", metavar="DIR",
          help="a directory of *.json config files, read in lexical order (repeatable)")
    _flag(p, "data-dir", dest="data_dir", metavar="DIR", help="where the catalog is stored durably")
    _flag(p, "datacenter", metavar="NAME", help="datacenter name (default dc1)")
    _flag(p, "node", dest="node_name", metavar="NAME", help="node name (default: the hostname)")
    _flag(p, "client", dest="client_addr", metavar="ADDR",
          help="address the HTTP and DNS listeners bind to (default 127.0.0.1)")
    _flag(p, "bind", dest="bind_addr", metavar="ADDR", help="the node's address (default 127.0.0.1)")
    _flag(p, "advertise", dest="advertise_addr", metavar="ADDR",
          help="address advertised for this node (default: the bind address)")
    _flag(p, "http-port", dest="http_port", type=int, metavar="PORT", help="HTTP API port (8500; -1 disables)")
    _flag(p, "dns-port", dest="dns_port", type=int, metavar="PORT", help="DNS port (8600; -1 disables)")
    _flag(p, "dns-workers", dest="dns_workers", type=int, metavar="N",
          help="DNS processes sharing the DNS port (default: the number of cores; 1 with -dev)")
    _flag(p, "domain", metavar="DOMAIN", help="the DNS domain answered (default consul.)")
    _flag(p, "alt-domain", dest="alt_domain", metavar="DOMAIN", help="a second domain answered alike")
    _flag(p, "recursor", action="append", default=[], dest="recursors", metavar="ADDR",
          help="an upstream resolver for other names (repeatable)")
    _flag(p, "enable-script-checks", dest="enable_script_checks", action="store_true", default=None,
          help="allow checks that run scripts (registrations with Args)")
    _flag(p, "upstream", nargs="?", const="", metavar="URL",
          help="mirror mode: follow this Consul agent (http://host:8500; without a value, "
               "CONSUL_HTTP_ADDR) instead of running the embedded catalog")
    _flag(p, "log-level", dest="log_level", metavar="LEVEL", help="trace, debug, info, warn or error")
    _flag(p, "log-json", dest="log_json", action="store_true", default=None, help="log JSON lines")
    _flag(p, "log-queries", dest="log_queries", action="store_true", default=None,
          help="log one line per DNS query (dns_config.query_log; costly on busy servers)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dnsdisco", allow_abbrev=False,
        description="DNS-based service discovery with a Consul-compatible catalog.",
    )
    parser.add_argument("--version", action="version", version=f"dnsdisco {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _agent_parser(sub)
    v = sub.add_parser("validate", help="check config files or dirs without starting anything")
    v.add_argument("paths", nargs="+", metavar="FILE|DIR")
    sub.add_parser("version", help="print the version")
    _api_parsers(sub)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The command line as a config source in Consul's JSON layout (applied last)."""
    out: dict[str, Any] = {}
    for key in ("data_dir", "datacenter", "node_name", "client_addr", "bind_addr",
                "advertise_addr", "domain", "alt_domain", "enable_script_checks", "log_level",
                "log_json", "dns_workers"):
        value = getattr(args, key)
        if value is not None:
            out[key] = value
    ports = {k: getattr(args, f"{k}_port") for k in ("http", "dns") if getattr(args, f"{k}_port") is not None}
    if ports:
        out["ports"] = ports
    if args.recursors:
        out["recursors"] = args.recursors
    if args.upstream is not None:
        out["upstream"] = {"address": args.upstream} if args.upstream else {}
    if args.log_queries:
        out["dns_config"] = {"query_log": True}
    return out


def _load(args: argparse.Namespace) -> configmod.Config:
    return configmod.load(args.config_files, args.config_dirs, _overrides(args), dev=args.dev)


def _setup_logging(level: str, as_json: bool) -> None:
    level = {"trace": "DEBUG", "warn": "WARNING"}.get(level, level.upper())
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s [%(levelname)s] %(name)s: %(message)s"))
    handler.addFilter(ConsolidatingFilter(handler))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class _TextFormatter(logging.Formatter):
    """One line per event: a traceback stays with its message, its line breaks escaped, so that
    ``grep`` and line-based collectors see one record (the JSON form is one object per line)."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\r", "").replace("\n", "\\n")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"@timestamp": self.formatTime(record), "@level": record.levelname.lower(),
                 "@module": record.name, "@message": record.getMessage()}
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class ConsolidatingFilter(logging.Filter):
    """Fold repeated warnings and errors: the first of a kind is logged, identical ones within
    *window* seconds are only counted, and the count is logged as ``N more like "..."``.

    CoreDNS's *errors* plugin does this (``consolidate 30s``): during an outage a recursor
    timeout or a refused connection repeats per query, and thousands of identical lines hide
    the one that matters. "Identical" means same logger, level and formatted message. The
    summary goes out with the next record that reaches the handler once the window is over
    (or from :meth:`flush`), so no timer thread is needed. INFO and below pass untouched: they
    are events, not failures.
    """

    def __init__(self, handler: logging.Handler | None = None, *, window: float = 30.0,
                 clock: Callable[[], float] = time.monotonic, max_kinds: int = 256) -> None:
        super().__init__()
        self.handler = handler
        self.window = window
        self.clock = clock
        self.max_kinds = max_kinds
        self._lock = threading.Lock()
        # (logger, level, message) -> [window start, repeats suppressed, a record to summarise with]
        self._seen: dict[tuple[str, int, str], list[Any]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_consolidated", False):
            return True  # our own summary line
        now = self.clock()
        keep = True
        with self._lock:
            due = self._take(lambda state: now - state[0] >= self.window)
            if record.levelno >= logging.WARNING:
                key = (record.name, record.levelno, record.getMessage())
                state = self._seen.get(key)
                if state is not None:
                    state[1] += 1  # within its window: expired ones were just taken
                    keep = False
                else:
                    if len(self._seen) >= self.max_kinds:
                        # Bounded: report the oldest kind's count now and forget it.
                        oldest = min(self._seen, key=lambda k: self._seen[k][0])
                        stale = self._seen.pop(oldest)
                        if stale[1]:
                            due.append(stale)
                    self._seen[key] = [now, 0, record]
        self._emit(due)
        return keep

    def flush(self) -> None:
        """Log the counts of every window with suppressed repeats now, over or not."""
        with self._lock:
            due = self._take(lambda state: state[1] > 0)
        self._emit(due)

    def _take(self, done: Callable[[list[Any]], bool]) -> list[list[Any]]:
        # Under the lock: drop the windows *done* says are over; return those with repeats.
        over = [key for key, state in self._seen.items() if done(state)]
        return [state for state in (self._seen.pop(key) for key in over) if state[1]]

    def _emit(self, due: list[list[Any]]) -> None:
        for _start, count, first in due:
            summary = logging.LogRecord(
                first.name, first.levelno, first.pathname, first.lineno,
                '%d more like "%s" in the last %gs', (count, first.getMessage(), self.window), None,
            )
            summary._consolidated = True  # type: ignore[attr-defined]
            if self.handler is not None:
                self.handler.handle(summary)
            else:
                logging.getLogger(first.name).handle(summary)


def _run_agent(args: argparse.Namespace) -> int:
    config = _load(args)
    _setup_logging(config.log_level, config.log_json)
    from dnsdisco.app import Agent

    try:
        import uvloop  # optional extra: roughly 4x the DNS fast path
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    runner(Agent(config, reload_config=lambda: _load(args)).run())
    return 0


def _validate(paths: Sequence[str]) -> int:
    import os

    files = [p for p in paths if not os.path.isdir(p)]
    dirs = [p for p in paths if os.path.isdir(p)]
    config = configmod.load(files, dirs, dev=True)
    definitions = configmod.decode_services(config)
    print(f"Configuration is valid! ({len(definitions)} services)")
    return 0


# -- operator commands: a running agent's HTTP API ----------------------------------------------

DEFAULT_HTTP_ADDR = "127.0.0.1:8500"
# A local agent answers in milliseconds; this only bounds a hung or firewalled address.
API_TIMEOUT = 10.0


class ApiError(Exception):
    """A request to the agent failed; the message says what happened and what to do."""


def _api_flags(p: argparse.ArgumentParser) -> None:
    _flag(p, "http-addr", dest="http_addr", metavar="ADDR",
          help=f"the agent's HTTP API (default: CONSUL_HTTP_ADDR, else {DEFAULT_HTTP_ADDR})")
    _flag(p, "token", metavar="TOKEN", help="ACL token (default: CONSUL_HTTP_TOKEN); sent, not enforced by dnsdisco")


def _api_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reload", help="make the agent re-read its configuration (PUT /v1/agent/reload)")
    _api_flags(p)

    cat = sub.add_parser("catalog", help="list the catalog's services or nodes")
    cat_sub = cat.add_subparsers(dest="action", metavar="services|nodes", required=True)
    p = cat_sub.add_parser("services", help="service names, one per line")
    _flag(p, "tags", action="store_true", help="show each service's tags too")
    _api_flags(p)
    p = cat_sub.add_parser("nodes", help="nodes with their ID, address and datacenter")
    _api_flags(p)

    kv = sub.add_parser("kv", help="read and write the KV store")
    kv_sub = kv.add_subparsers(dest="action", metavar="get|put|delete", required=True)
    p = kv_sub.add_parser("get", help="print a key's value")
    p.add_argument("key", metavar="KEY")
    _api_flags(p)
    p = kv_sub.add_parser("put", help="write a key (VALUE, @FILE, - for stdin, or empty)")
    p.add_argument("key", metavar="KEY")
    p.add_argument("value", nargs="?", default="", metavar="VALUE")
    _api_flags(p)
    p = kv_sub.add_parser("delete", help="delete a key (or, with -recurse, a prefix)")
    p.add_argument("key", metavar="KEY")
    _flag(p, "recurse", action="store_true", help="delete every key under KEY")
    _api_flags(p)

    svc = sub.add_parser("services", help="register or deregister services with the agent")
    svc_sub = svc.add_subparsers(dest="action", metavar="register|deregister", required=True)
    p = svc_sub.add_parser("register", help="register the services of Consul JSON definition files")
    p.add_argument("files", nargs="+", metavar="FILE")
    _api_flags(p)
    p = svc_sub.add_parser("deregister", help="deregister a service by ID")
    p.add_argument("service_id", nargs="?", metavar="ID")
    _flag(p, "id", dest="id_flag", metavar="ID", help="the service ID (as Consul's -id)")
    _api_flags(p)


class Api:
    """The agent's HTTP API for one command: base URL and token resolved once, as Consul's
    ``api.DefaultConfig`` does (flags over ``CONSUL_HTTP_*`` variables over defaults)."""

    def __init__(self, http_addr: str | None, token: str | None, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = http_addr or env.get("CONSUL_HTTP_ADDR") or DEFAULT_HTTP_ADDR
        if addr.startswith("unix://"):
            raise ApiError(f"{addr}: unix sockets are not supported; give host:port")
        if "://" not in addr:
            ssl = env.get("CONSUL_HTTP_SSL", "").lower() in ("1", "t", "true")
            addr = ("https://" if ssl else "http://") + addr
        self.base = addr.rstrip("/")
        self.token = token or env.get("CONSUL_HTTP_TOKEN") or _read_token_file(env.get("CONSUL_HTTP_TOKEN_FILE"))

    def call(self, method: str, path: str, body: bytes | None = None, *,
             query: Mapping[str, str] | None = None) -> tuple[int, bytes]:
        """Send one request; return (status, body). Raises :class:`ApiError` when the agent
        cannot be reached; an answer of any status is returned for the caller to judge."""
        url = self.base + path + ("?" + urllib.parse.urlencode(query) if query else "")
        req = urllib.request.Request(url, data=body, method=method)
        if self.token:
            req.add_header("X-Consul-Token", self.token)
        try:
            with urllib.request.urlopen(req, timeout=API_TIMEOUT) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ApiError(f"cannot reach the agent at {self.base} ({reason}): is `dnsdisco agent` running? "
                           "Point -http-addr or CONSUL_HTTP_ADDR at its HTTP address.") from None

    def ok(self, method: str, path: str, body: bytes | None = None, *,
           query: Mapping[str, str] | None = None) -> bytes:
        """:meth:`call`, raising :class:`ApiError` with the agent's own message unless 200."""
        status, data = self.call(method, path, body, query=query)
        if status != 200:
            text = data.decode("utf-8", "replace").strip() or "(no message)"
            raise ApiError(f"the agent refused {method} {path}: {status} {text}")
        return data


def _read_token_file(path: str | None) -> str | None:
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError as e:
        raise ApiError(f"cannot read CONSUL_HTTP_TOKEN_FILE {path}: {e.strerror}") from None


def _kv_path(key: str) -> str:
    return "/v1/kv/" + urllib.parse.quote(key.lstrip("/"), safe="/")


def _run_api(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    api = Api(args.http_addr, args.token)
    command = args.command if args.command == "reload" else f"{args.command} {args.action}"
    if command == "reload":
        api.ok("PUT", "/v1/agent/reload")
        print("Configuration reload triggered")
    elif command == "catalog services":
        services = json.loads(api.ok("GET", "/v1/catalog/services"))
        for name in sorted(services, key=str.lower):
            print(f"{name}\t{','.join(services[name])}" if args.tags else name)
    elif command == "catalog nodes":
        nodes = json.loads(api.ok("GET", "/v1/catalog/nodes"))
        rows = [("Node", "ID", "Address", "DC")]
        rows += [(n["Node"], (n.get("ID") or "")[:8], n["Address"], n["Datacenter"]) for n in nodes]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    elif command == "kv get":
        status, data = api.call("GET", _kv_path(args.key), query={"raw": "true"})
        if status == 404:
            raise ApiError(f"no key exists at {args.key!r}")
        if status != 200:
            raise ApiError(f"the agent refused GET {_kv_path(args.key)}: {status} {data.decode('utf-8', 'replace')}")
        sys.stdout.buffer.write(data + b"\n")
        sys.stdout.flush()
    elif command == "kv put":
        if json.loads(api.ok("PUT", _kv_path(args.key), _kv_value(args.value))) is not True:
            raise ApiError(f"the agent did not write {args.key!r}")
        print(f"Success! Data written to: {args.key}")
    elif command == "kv delete":
        api.ok("DELETE", _kv_path(args.key), query={"recurse": "true"} if args.recurse else None)
        print(f"Success! Deleted key{'s under' if args.recurse else ''}: {args.key}")
    elif command == "services register":
        definitions = [(path, d) for path in args.files for d in _service_definitions(path)]
        for path, definition in definitions:
            api.ok("PUT", "/v1/agent/service/register", json.dumps(definition).encode())
            print(f"Registered service: {_service_name(definition) or path}")
    elif command == "services deregister":
        service_id = args.id_flag or args.service_id
        if not service_id or (args.id_flag and args.service_id):
            parser.error("services deregister takes one service ID (as an argument or -id)")
        api.ok("PUT", "/v1/agent/service/deregister/" + urllib.parse.quote(service_id, safe=""))
        print(f"Deregistered service: {service_id}")
    else:  # pragma: no cover - argparse allows nothing else
        parser.error(f"unknown command {command!r}")
    return 0


def _kv_value(value: str) -> bytes:
    # Consul's `kv put` conventions: "-" reads stdin, "@path" reads a file.
    if value == "-":
        return sys.stdin.buffer.read()
    if value.startswith("@"):
        try:
            with open(value[1:], "rb") as f:
                return f.read()
        except OSError as e:
            raise ApiError(f"cannot read {value[1:]}: {e.strerror}") from None
    return value.encode()


def _service_definitions(path: str) -> list[dict[str, Any]]:
    """The service definitions of a Consul JSON file: ``{"service": {...}}`` or
    ``{"services": [...]}``, as the agent's config dir takes them (snake_case keys included:
    the register endpoint accepts both spellings)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ApiError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ApiError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(f"{path}: expected a JSON object with a 'service' or 'services' key")
    keys = {k.lower(): k for k in data}
    out: list[Any] = []
    if "service" in keys:
        out.append(data[keys["service"]])
    if "services" in keys:
        listed = data[keys["services"]]
        if not isinstance(listed, list):
            raise ApiError(f"{path}: 'services' must be a list of service definitions")
        out.extend(listed)
    if not out:
        raise ApiError(f"{path}: no 'service' or 'services' key; write {{\"service\": {{\"name\": ...}}}}")
    for d in out:
        if not isinstance(d, dict):
            raise ApiError(f"{path}: each service definition must be a JSON object")
    return out


def _service_name(definition: Mapping[str, Any]) -> str:
    for key in ("name", "Name", "id", "ID"):
        if isinstance(definition.get(key), str):
            return str(definition[key])
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "agent":
            return _run_agent(args)
        if args.command == "validate":
            return _validate(args.paths)
        if args.command == "version":
            print(f"dnsdisco {__version__}")
            return 0
        if args.command in ("reload", "catalog", "kv", "services"):
            return _run_api(args, parser)
        parser.print_help(sys.stderr)
        return 2
    except ApiError as e:
        print(f"dnsdisco: {e}", file=sys.stderr)
        return 1
    except DnsdiscoError as e:
        print(f"dnsdisco: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        # Typically a listener that cannot bind (port in use, address not local).
        print(f"dnsdisco: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
