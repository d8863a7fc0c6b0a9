"""The operator commands against a real in-process agent: reload, catalog, kv, services; exit
codes (0 ok, 1 failure with a message saying what to do, 2 usage); the HTTP address and token
from flags or Consul's environment variables; and the agent's logging options.

The commands use blocking ``urllib``, so they run in a thread while the agent serves on the
test's event loop; one test runs the real ``python -m dnsdisco`` process for its exit codes.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import dns.message
import dns.query
import pytest

from dnsdisco import cli
from dnsdisco import config as configmod
from dnsdisco.app import Agent

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
async def agent(tmp_path) -> AsyncIterator[Agent]:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "web.json").write_text(json.dumps({"service": {
        "id": "web-1", "name": "web", "address": "10.0.0.1", "port": 80, "tags": ["v1", "blue"]}}))

    def load() -> configmod.Config:
        return configmod.load(dirs=[str(conf)], dev=True,
                              overrides={"node_name": "node1", "ports": {"http": 0, "dns": 0}})

    a = Agent(load(), reload_config=load)
    await a.start()
    a.conf_dir = conf  # type: ignore[attr-defined]
    try:
        yield a
    finally:
        await a.stop()


async def run(agent: Agent | None, capsys, *argv: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    """``dnsdisco ARGV -http-addr <agent>`` in a thread; returns (exit code, stdout, stderr)."""
    args = list(argv)
    if agent is not None:
        args += ["-http-addr", f"127.0.0.1:{agent.http_port}"]

    def call() -> int:
        if stdin is not None:
            sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
        try:
            return cli.main(args)
        except SystemExit as e:
            return int(e.code or 0)
        finally:
            sys.stdin = sys.__stdin__

    code = await asyncio.to_thread(call)
    out, err = capsys.readouterr()
    return code, out, err


def a_records(port: int, name: str) -> set[str]:
    reply = dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=2)
    return {rr.address for rrset in reply.answer for rr in rrset}


async def test_catalog_services_and_nodes(agent, capsys):
    code, out, _ = await run(agent, capsys, "catalog", "services")
    assert (code, out.split()) == (0, ["consul", "web"])
    code, out, _ = await run(agent, capsys, "catalog", "services", "-tags")
    assert code == 0 and "web\tblue,v1" in out.splitlines()
    code, out, _ = await run(agent, capsys, "catalog", "nodes")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["Node", "ID", "Address", "DC"]
    assert lines[1].split()[0] == "node1" and lines[1].split()[-2:] == ["127.0.0.1", "dc1"]


async def test_kv_put_get_delete(agent, capsys, tmp_path):
    assert (await run(agent, capsys, "kv", "put", "app/config", "hello"))[:2] == (
        0, "Success! Data written to: app/config\n")
    assert (await run(agent, capsys, "kv", "get", "app/config"))[:2] == (0, "hello\n")
    blob = tmp_path / "blob"
    blob.write_bytes(b"from a file")
    assert (await run(agent, capsys, "kv", "put", "app/file", f"@{blob}"))[0] == 0
    assert (await run(agent, capsys, "kv", "get", "app/file"))[1] == "from a file\n"
    assert (await run(agent, capsys, "kv", "put", "app/stdin", "-", stdin=b"piped"))[0] == 0
    assert (await run(agent, capsys, "kv", "get", "app/stdin"))[1] == "piped\n"
    assert (await run(agent, capsys, "kv", "delete", "app/config"))[:2] == (0, "Success! Deleted key: app/config\n")
    code, out, err = await run(agent, capsys, "kv", "get", "app/config")
    assert (code, out) == (1, "") and "no key exists at 'app/config'" in err
    assert (await run(agent, capsys, "kv", "delete", "app", "-recurse"))[0] == 0
    assert agent.store.kv_keys("app") == []


async def test_services_register_file_then_deregister(agent, capsys, tmp_path):
    one = tmp_path / "api.json"
    one.write_text(json.dumps({"service": {"id": "api-1", "name": "api", "address": "10.0.1.1", "port": 9000,
                                           "check": {"ttl": "30s", "status": "passing"}}}))
    many = tmp_path / "db.json"
    many.write_text(json.dumps({"services": [{"id": "db-1", "name": "db", "address": "10.0.2.1"},
                                             {"id": "db-2", "name": "db", "address": "10.0.2.2"}]}))
    code, out, _ = await run(agent, capsys, "services", "register", str(one), str(many))
    assert code == 0 and out.splitlines() == ["Registered service: api", "Registered service: db",
                                              "Registered service: db"]
    assert await asyncio.to_thread(a_records, agent.dns_port, "api.service.consul") == {"10.0.1.1"}
    assert await asyncio.to_thread(a_records, agent.dns_port, "db.service.consul") == {"10.0.2.1", "10.0.2.2"}

    assert (await run(agent, capsys, "services", "deregister", "db-1"))[:2] == (0, "Deregistered service: db-1\n")
    assert (await run(agent, capsys, "services", "deregister", "-id", "db-2"))[0] == 0
    assert agent.store.service("node1", "db-1") is None and agent.store.service("node1", "db-2") is None


async def test_services_register_refusals_say_what_is_wrong(agent, capsys, tmp_path):
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({"name": "x"}))
    code, _, err = await run(agent, capsys, "services", "register", str(bare))
    assert code == 1 and "no 'service' or 'services' key" in err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"service": {"name": "x", "port": "eighty"}}))
    code, _, err = await run(agent, capsys, "services", "register", str(bad))
    assert code == 1 and "the agent refused PUT /v1/agent/service/register: 400" in err
    code, _, err = await run(agent, capsys, "services", "register", str(tmp_path / "missing.json"))
    assert code == 1 and "cannot read" in err


async def test_reload_applies_new_config_files(agent, capsys):
    (agent.conf_dir / "api.json").write_text(json.dumps({"service": {"id": "api-9", "name": "api",
                                                                     "address": "10.0.9.9"}}))
    code, out, _ = await run(agent, capsys, "reload")
    assert (code, out) == (0, "Configuration reload triggered\n")
    assert await asyncio.to_thread(a_records, agent.dns_port, "api.service.consul") == {"10.0.9.9"}
    # A broken file: the agent refuses and says why; the command fails with that message.
    (agent.conf_dir / "broken.json").write_text("{")
    code, _, err = await run(agent, capsys, "reload")
    assert code == 1 and "the agent refused PUT /v1/agent/reload: 500" in err and "broken.json" in err


async def test_unreachable_agent_and_usage_errors(capsys, monkeypatch):
    code, _, err = await run(None, capsys, "catalog", "services", "-http-addr", "127.0.0.1:1")
    assert code == 1 and "cannot reach the agent at http://127.0.0.1:1" in err
    assert "is `dnsdisco agent` running?" in err
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "127.0.0.1:1")
    code, _, err = await run(None, capsys, "kv", "get", "k")
    assert code == 1 and "http://127.0.0.1:1" in err
    assert (await run(None, capsys, "kv"))[0] == 2
    assert (await run(None, capsys, "services", "deregister"))[0] == 2
    assert (await run(None, capsys, "catalog", "everything"))[0] == 2


async def test_address_and_token_come_from_flags_then_environment(agent, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("CONSUL_HTTP_ADDR", f"http://127.0.0.1:{agent.http_port}")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-env")
    code, out, _ = await run(None, capsys, "catalog", "services")
    assert code == 0 and "web" in out.split()
    api = cli.Api(None, None)
    assert (api.base, api.token) == (f"http://127.0.0.1:{agent.http_port}", "from-env")
    assert cli.Api(None, "flag").token == "flag"
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    env = {"CONSUL_HTTP_ADDR": "10.0.0.5:8501", "CONSUL_HTTP_SSL": "true", "CONSUL_HTTP_TOKEN_FILE": str(token_file)}
    api = cli.Api(None, None, environ=env)
    assert (api.base, api.token) == ("https://10.0.0.5:8501", "from-file")
    assert cli.Api("127.0.0.1:9", None, environ=env).base == "https://127.0.0.1:9"
    assert cli.Api(None, None, environ={}).base == "http://127.0.0.1:8500"


async def test_the_real_command_exit_codes(agent):
    env = {**os.environ, "CONSUL_HTTP_ADDR": f"127.0.0.1:{agent.http_port}"}

    def dnsdisco(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dnsdisco", *argv], capture_output=True, text=True,
                              cwd=ROOT, env=env, timeout=30)

    ok, missing, usage = await asyncio.gather(
        asyncio.to_thread(dnsdisco, "catalog", "services"),
        asyncio.to_thread(dnsdisco, "kv", "get", "nope"),
        asyncio.to_thread(dnsdisco, "kv", "frobnicate"))
    assert (ok.returncode, ok.stdout.split()) == (0, ["consul", "web"])
    assert missing.returncode == 1 and "no key exists" in missing.stderr
    assert usage.returncode == 2 and "usage:" in usage.stderr


# -- logging -------------------------------------------------------------------------------------


def test_log_queries_flag_turns_on_the_query_log():
    args = cli.build_parser().parse_args(["agent", "-dev", "-log-queries"])
    assert cli._load(args).dns_config.query_log is True
    args = cli.build_parser().parse_args(["agent", "-dev"])
    assert cli._load(args).dns_config.query_log is False


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _logger(window: float = 30.0) -> tuple[logging.Logger, io.StringIO, _Clock, cli.ConsolidatingFilter]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(cli._TextFormatter("%(levelname)s %(message)s"))
    clock = _Clock()
    filt = cli.ConsolidatingFilter(handler, window=window, clock=clock)
    handler.addFilter(filt)
    logger = logging.getLogger("dnsdisco.test.consolidate")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, out, clock, filt


def test_repeated_errors_are_folded_into_one_count_per_window():
    logger, out, clock, filt = _logger()
    for _ in range(500):
        logger.error("forward: recursor %s timed out", "10.0.0.1:53")
        clock.now += 0.01
    logger.warning("something else")
    logger.info("an event")  # INFO is never folded
    logger.info("an event")
    assert out.getvalue().splitlines() == [
        "ERROR forward: recursor 10.0.0.1:53 timed out",
        "WARNING something else",
        "INFO an event",
        "INFO an event",
    ]
    clock.now += 30
    logger.error("forward: recursor 10.0.0.1:53 timed out")  # a new window: the count first, then it
    lines = out.getvalue().splitlines()[4:]
    assert lines == ['ERROR 499 more like "forward: recursor 10.0.0.1:53 timed out" in the last 30s',
                     "ERROR forward: recursor 10.0.0.1:53 timed out"]
    for _ in range(3):
        logger.error("forward: recursor 10.0.0.1:53 timed out")
    filt.flush()
    assert out.getvalue().splitlines()[-1] == 'ERROR 3 more like "forward: recursor 10.0.0.1:53 timed out" in the last 30s'


def test_text_logs_are_one_line_per_event():
    logger, out, _, _ = _logger()
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("answering failed")
    text = out.getvalue()
    assert text.count("\n") == 1 and "answering failed" in text and "ValueError: boom" in text
