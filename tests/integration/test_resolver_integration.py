"""``.consul`` through a real system resolver: dnsmasq forwarding to a real agent, as the README's
"Forwarding .consul to dnsdisco" section sets it up.

1. dnsmasq on a loopback port with ``server=/consul/127.0.0.1#<agent port>``; dnspython asks
   dnsmasq for ``web.service.consul`` and gets the registered address.
2. The whole path a program takes: in a private mount namespace (``unshare -m``) a resolv.conf
   naming dnsmasq (port 53 on a 127.x address of its own) is bind-mounted over /etc/resolv.conf,
   and ``getent hosts web.service.consul`` (glibc's resolver, through nsswitch) prints the address.
   The host's /etc/resolv.conf is never touched.

Skipped only when dnsmasq is not installed, or (for 2) without root or ``unshare``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import dns.message
import dns.query
import dns.rcode
import pytest

from dnsdisco import config as configmod
from dnsdisco.app import Agent

pytestmark = pytest.mark.integration

DNSMASQ = shutil.which("dnsmasq") or ("/usr/sbin/dnsmasq" if os.path.exists("/usr/sbin/dnsmasq") else None)
WEB_ADDRESS = "10.11.12.13"

needs_dnsmasq = pytest.mark.skipif(DNSMASQ is None, reason="dnsmasq is not installed (apt-get install dnsmasq)")


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on *host*."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((host, 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


@pytest.fixture
async def agent(tmp_path) -> AsyncIterator[Agent]:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "web.json").write_text(json.dumps({"service": {"id": "web-1", "name": "web",
                                                           "address": WEB_ADDRESS, "port": 80}}))
    cfg = configmod.load(dirs=[str(conf)], dev=True,
                         overrides={"node_name": "node1", "ports": {"http": -1, "dns": 0}})
    a = Agent(cfg)
    await a.start()
    try:
        yield a
    finally:
        await a.stop()


@contextmanager
def dnsmasq(agent_port: int, *, address: str = "127.0.0.1", port: int | None = None) -> Iterator[int]:
    """dnsmasq in the foreground, forwarding ``consul`` to the agent and nothing else; killed on exit."""
    assert DNSMASQ is not None
    port = port if port is not None else free_port(address)
    cmd = [DNSMASQ, "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--no-poll",
           f"--listen-address={address}", "--bind-interfaces", f"--port={port}", "--pid-file=",
           "--cache-size=0", "--log-facility=-", f"--server=/consul/127.0.0.1#{agent_port}"]
    if os.geteuid() == 0:
        cmd.append("--user=root")  # no drop to "nobody": nothing to set up for it in a test
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_listening(proc, address, port)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stderr is not None:
            proc.stderr.close()


def _wait_listening(proc: subprocess.Popen[str], address: str, port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"dnsmasq exited with {proc.returncode}: {err}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            if s.connect_ex((address, port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError("dnsmasq did not start listening")


def resolve(server: str, port: int, name: str, rdtype: str = "A") -> dns.message.Message:
    return dns.query.udp(dns.message.make_query(name, rdtype), server, port=port, timeout=5)


@needs_dnsmasq
async def test_dnsmasq_forwards_consul_to_the_agent(agent):
    def check() -> None:
        with dnsmasq(agent.dns_port) as port:
            reply = resolve("127.0.0.1", port, "web.service.consul")
            assert reply.rcode() == dns.rcode.NOERROR
            assert {rr.address for rrset in reply.answer for rr in rrset} == {WEB_ADDRESS}
            assert resolve("127.0.0.1", port, "nope.service.consul").rcode() == dns.rcode.NXDOMAIN
            srv = resolve("127.0.0.1", port, "web.service.consul", "SRV")
            assert [rr.port for rrset in srv.answer for rr in rrset] == [80]

    await asyncio.to_thread(check)


@needs_dnsmasq
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a private mount namespace and port 53")
@pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("getent") is None,
                    reason="needs unshare (util-linux) and getent (libc-bin)")
async def test_getent_resolves_through_resolv_conf_and_dnsmasq(agent, tmp_path):
    # glibc's resolver only talks to port 53, so dnsmasq takes port 53 on a loopback address
    # of its own (all of 127/8 is loopback on Linux), clear of anything on 127.0.0.1 / .53.
    address = f"127.{random.randrange(60, 250)}.{random.randrange(1, 250)}.{random.randrange(2, 250)}"
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver {address}\noptions timeout:2 attempts:2\n")
    script = f"mount --bind {resolv} /etc/resolv.conf && exec getent hosts web.service.consul"

    def check() -> subprocess.CompletedProcess[str]:
        with dnsmasq(agent.dns_port, address=address, port=53):
            return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=30)

    result = await asyncio.to_thread(check)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [WEB_ADDRESS, "web.service.consul"]
    with open("/etc/resolv.conf", encoding="utf-8") as f:
        assert address not in f.read()  # the host's file was never changed
