"""The ``dnsdisco`` command line: the only place that turns errors into exit codes.

``dnsdisco agent`` takes the flags Consul's agent takes (``-dev``, ``-config-file``,
``-config-dir``, ``-node``, ``-dns-port``, ...), in Consul's single-dash spelling or the
``--long`` one. Exit codes: 0 success, 1 runtime failure (a bad config, a port in use),
2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
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
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The command line as a config source in Consul's JSON layout (applied last)."""
    out: dict[str, Any] = {}
    for key in ("data_dir", "datacenter", "node_name", "client_addr", "bind_addr",
                "advertise_addr", "domain", "alt_domain", "enable_script_checks", "log_level",
                "log_json"):
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
    return out


def _load(args: argparse.Namespace) -> configmod.Config:
    return configmod.load(args.config_files, args.config_dirs, _overrides(args), dev=args.dev)


def _setup_logging(level: str, as_json: bool) -> None:
    level = {"trace": "DEBUG", "warn": "WARNING"}.get(level, level.upper())
    handler = logging.StreamHandler(sys.stderr)
    if as_json:
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"@timestamp": self.formatTime(record), "@level": record.levelname.lower(),
                 "@module": record.name, "@message": record.getMessage()}
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


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
        parser.print_help(sys.stderr)
        return 2
    except DnsdiscoError as e:
        print(f"dnsdisco: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        # Typically a listener that cannot bind (port in use, address not local).
        print(f"dnsdisco: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
