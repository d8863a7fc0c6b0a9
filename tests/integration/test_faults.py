"""Faults, with nothing lost: real agent processes on loopback, broken on purpose.

* ``kill -9`` of an agent with ``-data-dir`` under a stream of registrations, updates and
  deregistrations with several requests in flight; after a restart on the same data dir every
  acknowledged change is there, checked one by one over HTTP and in DNS (a request that was in
  flight at the kill may or may not have landed, and nothing else is allowed).
* A full data dir (a size-limited tmpfs) and a read-only one (``chattr +i``): writes get a 500
  naming the data dir and the OS error, reads and DNS keep answering from the last committed
  state, ``/ready`` says the store is degraded, one log line says what is wrong, and writes
  succeed again without a restart once space or permissions are back. An unusable data dir at
  start-up stops the agent with a message naming ``data_dir``.
* Mirror mode with the upstream (a second dnsdisco agent standing in for Consul) killed and
  restarted every second, sometimes with a fresh catalog (a lower index): a DNS client querying
  the mirror throughout never sees anything but the right answer, and the mirror converges to
  the final catalog.
* SIGHUP with a broken file: the log names the file and key, DNS keeps the *old* ``dns_config``
  values and HTTP keeps serving, and the fixed file applies on the next SIGHUP.

The long versions (many kills in a row, longer flapping) are ``bench/faults.py``. The full and
read-only tests need root (to mount a tmpfs, to ``chattr``) and skip without it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest

from tests.integration.test_agent import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent.parent
ABSENT = None  # a service's state in the ledger when it is (or should be) deregistered


# -- an agent process ----------------------------------------------------------------------------


class Proc:
    """``python -m dnsdisco agent`` with its log in a file (a pipe nobody reads could fill up
    and block the agent). Restarting on the same log file appends; :meth:`log` is this run's."""

    def __init__(self, log: Path, *args: str, node: str = "n1", http_port: int | None = None,
                 dns_port: int | None = None) -> None:
        self.http_port = http_port if http_port is not None else free_port()
        self.dns_port = dns_port if dns_port is not None else free_port()
        self.log_path = log
        self._offset = log.stat().st_size if log.exists() else 0
        self._log = open(log, "ab")
        cmd = [sys.executable, "-m", "dnsdisco", "agent", "-node", node,
               "-http-port", str(self.http_port), "-dns-port", str(self.dns_port), *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(self._offset)
            return f.read().decode(errors="replace")

    def wait_log(self, pattern: str, *, count: int = 1, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(re.findall(pattern, self.log())) < count:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited ({self.proc.returncode}) before {pattern!r}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count}x {pattern!r} within {timeout}s:\n{self.log()}")
            time.sleep(0.02)

    def wait_started(self, timeout: float = 30.0) -> None:
        self.wait_log(r"agent started", timeout=timeout)

    def kill9(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        code = self.proc.wait(10)
        self._log.close()
        return code


@pytest.fixture
def procs():
    """Every agent a test starts; stopped (TERM, then KILL) at the end whatever happened."""
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()


async def call(http: aiohttp.ClientSession, method: str, url: str, body: Any = None,
               data: bytes | None = None) -> tuple[int, str]:
    if body is not None:
        data = json.dumps(body).encode()
    async with http.request(method, url, data=data) as r:
        return r.status, await r.text()


def ask(port: int, name: str, rdtype: str = "A", timeout: float = 2.0) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    return dns.query.udp(q, "127.0.0.1", port=port, timeout=timeout)


def srv_state(port: int, sid: str) -> tuple[int, str] | None:
    """What DNS says of the service *sid*: (port, address) from its SRV answer and glue, or
    ABSENT for NXDOMAIN."""
    reply = ask(port, f"{sid}.service.consul", "SRV")
    if reply.rcode() == dns.rcode.NXDOMAIN:
        return ABSENT
    ports = [rr.port for rrset in reply.answer for rr in rrset]
    addrs = [rr.address for rrset in reply.additional if rrset.rdtype == dns.rdatatype.A for rr in rrset]
    assert len(ports) == 1 and len(addrs) == 1, reply.to_text()
    return ports[0], addrs[0]


def dns_matches(port: int, sid: str, want: tuple[int, str] | None, timeout: float = 3.0) -> tuple[int, str] | None:
    """DNS's state of *sid*, waiting up to *timeout* for it to equal *want* (with DNS worker
    processes the answers follow the catalog within milliseconds, not in the same step)."""
    deadline = time.monotonic() + timeout
    while True:
        got = srv_state(port, sid)
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.02)


# -- kill -9 under a stream of writes ------------------------------------------------------------


@dataclass
class Ledger:
    """What the client knows: per service ID, the last acknowledged state (a port, or ABSENT)
    and the state of a request still in flight (it may or may not have landed)."""

    acked: dict[str, int | None] = field(default_factory=dict)
    inflight: dict[str, int | None] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)
    acks: int = 0
    refused: list[str] = field(default_factory=list)
    inflight_at_kill: int = 0

    def allowed(self, sid: str) -> set[int | None]:
        out = {self.acked.get(sid, ABSENT)}
        if sid in self.inflight:
            out.add(self.inflight[sid])
        return out


async def write_stream(base: str, ledger: Ledger, *, workers: int, stop: asyncio.Event, prefix: str = "s") -> None:
    """*workers* clients, one request in flight each, until *stop* or the agent goes away: new
    registrations, re-registrations with a new port, and deregistrations, each worker on its
    own IDs (so the order of one ID's changes is the order of its worker's acks)."""

    async def worker(w: int, http: aiohttp.ClientSession) -> None:
        live: list[str] = []
        j = 0
        while not stop.is_set():
            j += 1
            if j % 5 == 0 and live:
                sid, new = live[j % len(live)], 2000 + j  # update: same ID, new port
            elif j % 7 == 0 and live:
                sid, new = live.pop(0), ABSENT
            else:
                sid, new = f"{prefix}{w}x{j}", 1000 + j
                ledger.addresses[sid] = f"10.{w}.{j // 250}.{j % 250 + 1}"
            ledger.inflight[sid] = new
            try:
                if new is ABSENT:
                    status, text = await call(http, "PUT", f"{base}/v1/agent/service/deregister/{sid}")
                else:
                    status, text = await call(http, "PUT", f"{base}/v1/agent/service/register", {
                        "Name": sid, "ID": sid, "Address": ledger.addresses[sid], "Port": new})
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError):
                return  # the agent is gone: this request stays in flight
            if status != 200:
                ledger.refused.append(f"{sid}: {status} {text}")
                return
            del ledger.inflight[sid]
            ledger.acked[sid] = new
            ledger.acks += 1
            if new is not ABSENT and sid not in live:
                live.append(sid)

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=workers), timeout=timeout) as http:
        await asyncio.gather(*(worker(w, http) for w in range(workers)))


async def check_ledger(agent: Proc, ledger: Ledger) -> tuple[int, list[str]]:
    """Compare every ID the client ever touched with the restarted agent, over HTTP and DNS."""
    async with aiohttp.ClientSession() as http:
        status, text = await call(http, "GET", f"{agent.base}/v1/agent/services")
        assert status == 200, text
    services = json.loads(text)
    wrong: list[str] = []
    checked = 0
    for sid in sorted(set(ledger.acked) | set(ledger.inflight)):
        allowed = ledger.allowed(sid)
        actual = services[sid]["Port"] if sid in services else ABSENT
        if actual not in allowed:
            wrong.append(f"{sid}: HTTP has {actual}, acknowledged {ledger.acked.get(sid, 'nothing')}, "
                         f"in flight {ledger.inflight.get(sid, 'nothing')}")
            continue
        want = ABSENT if actual is ABSENT else (actual, ledger.addresses[sid])
        got = await asyncio.to_thread(dns_matches, agent.dns_port, sid, want)
        if got != want:
            wrong.append(f"{sid}: DNS has {got}, HTTP has {want}")
        checked += 1
    return checked, wrong


async def test_kill_9_under_a_stream_of_registrations_loses_nothing_acknowledged(tmp_path, procs):
    data = tmp_path / "data"
    log = tmp_path / "agent.log"
    agent = Proc(log, "-data-dir", str(data))
    procs.append(agent)
    await asyncio.to_thread(agent.wait_started)
    ledger = Ledger()
    stop = asyncio.Event()
    stream = asyncio.create_task(write_stream(agent.base, ledger, workers=8, stop=stop))
    await asyncio.sleep(4.0)  # about 4 s of stream, then the kill lands mid-request
    ledger.inflight_at_kill = len(ledger.inflight)
    agent.proc.send_signal(signal.SIGKILL)
    await asyncio.wait_for(stream, 30)
    await asyncio.to_thread(agent.kill9)
    assert agent.proc.returncode == -signal.SIGKILL
    assert not ledger.refused, ledger.refused
    assert ledger.acks >= 100, f"only {ledger.acks} writes acknowledged in 4 s"

    again = Proc(log, "-data-dir", str(data))
    procs.append(again)
    await asyncio.to_thread(again.wait_started)
    checked, wrong = await check_ledger(again, ledger)
    assert not wrong, f"{len(wrong)} of {checked + len(wrong)} differ after kill -9 " \
                      f"({ledger.acks} acks, {ledger.inflight_at_kill} in flight):\n" + "\n".join(wrong[:20])
    assert checked == len(set(ledger.acked) | set(ledger.inflight))
    # And the agent writes on from there.
    async with aiohttp.ClientSession() as http:
        status, text = await call(http, "PUT", f"{again.base}/v1/agent/service/register",
                                  {"Name": "after", "Address": "10.99.0.1", "Port": 1})
        assert status == 200, text


# -- a full or read-only data dir ----------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs mounted for the test (needs root, or CAP_SYS_ADMIN)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a size-limited tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(path: Path) -> None:
    """Write *path* until the filesystem says ENOSPC."""
    with open(path, "wb") as f:
        try:
            while True:
                f.write(bytes(65536))
                f.flush()
        except OSError as e:
            assert e.errno == 28, e


async def register(http: aiohttp.ClientSession, agent: Proc, sid: str, i: int) -> tuple[int, str]:
    return await call(http, "PUT", f"{agent.base}/v1/agent/service/register",
                      {"Name": sid, "ID": sid, "Address": f"10.8.0.{i}", "Port": 8000 + i})


async def degraded_but_serving(agent: Proc, http: aiohttp.ClientSession, acked: list[str],
                               os_error: str) -> None:
    """Writes refused with the data dir and *os_error* named; reads, DNS and /ready go on."""
    for n in range(20):
        status, text = await register(http, agent, f"refused{n}", 200)
        assert status == 500, (status, text)
        assert os_error in text and "data_dir" in text and "nothing was changed" in text, text
    status, text = await call(http, "PUT", f"{agent.base}/v1/kv/refused", data=b"x")
    assert status == 500 and os_error in text, text
    status, text = await call(http, "GET", f"{agent.base}/v1/agent/services")
    assert status == 200 and set(acked) <= set(json.loads(text)) and "refused0" not in text
    status, text = await call(http, "GET", f"{agent.base}/v1/health/service/{acked[0]}")
    assert status == 200 and json.loads(text)[0]["Service"]["ID"] == acked[0]
    status, text = await call(http, "GET", f"{agent.base}/v1/kv/kept?raw")
    assert (status, text) == (200, "kept")
    for i, sid in enumerate(acked, 1):
        assert await asyncio.to_thread(dns_matches, agent.dns_port, sid, (8000 + i, f"10.8.0.{i}")) \
            == (8000 + i, f"10.8.0.{i}")
    assert await asyncio.to_thread(dns_matches, agent.dns_port, "refused0", ABSENT) is ABSENT
    status, text = await call(http, "GET", f"{agent.base}/ready")
    assert status == 200 and text.startswith("ready (degraded)") and os_error in text, text
    status, text = await call(http, "GET", f"{agent.base}/health")
    assert status == 200
    # One log line for the 21 refused writes, not one each.
    assert len(re.findall(r"catalog writes are failing", agent.log())) == 1, agent.log()


async def recovered(agent: Proc, http: aiohttp.ClientSession, acked: list[str]) -> None:
    """Writes succeed again, without a restart; the log says so once; /ready is plain again."""
    for i in range(len(acked) + 1, len(acked) + 4):
        status, text = await register(http, agent, f"svc{i}", i)
        assert status == 200, text
        acked.append(f"svc{i}")
    status, text = await call(http, "GET", f"{agent.base}/ready")
    assert status == 200 and text.startswith("ready: embedded catalog"), text
    assert len(re.findall(r"catalog writes succeed again", agent.log())) == 1, agent.log()


async def after_restart(log: Path, data: Path, procs: list[Proc], acked: list[str]) -> None:
    """kill -9 and restart: every acknowledged write is there, none of the refused ones."""
    procs[-1].kill9()
    again = Proc(log, "-data-dir", str(data))
    procs.append(again)
    await asyncio.to_thread(again.wait_started)
    async with aiohttp.ClientSession() as http:
        status, text = await call(http, "GET", f"{again.base}/v1/agent/services")
    services = json.loads(text)
    assert [sid for sid in acked if sid not in services] == []
    assert [sid for sid in services if sid.startswith("refused")] == []


async def test_full_data_dir_refuses_writes_keeps_serving_and_recovers(small_fs, tmp_path, procs):
    data = small_fs / "data"
    log = tmp_path / "agent.log"
    agent = Proc(log, "-data-dir", str(data))
    procs.append(agent)
    await asyncio.to_thread(agent.wait_started)
    acked: list[str] = []
    async with aiohttp.ClientSession() as http:
        for i in range(1, 6):
            status, text = await register(http, agent, f"svc{i}", i)
            assert status == 200, text
            acked.append(f"svc{i}")
        assert (await call(http, "PUT", f"{agent.base}/v1/kv/kept", data=b"kept"))[0] == 200
        fill(small_fs / "filler")
        await degraded_but_serving(agent, http, acked, "No space left on device")
        assert str(data) in agent.log()
        (small_fs / "filler").unlink()
        await recovered(agent, http, acked)
    await after_restart(log, data, procs, acked)


def chattr(flag: str, *paths: Path) -> bool:
    return subprocess.run(["chattr", flag, *map(str, paths)], capture_output=True).returncode == 0


@pytest.fixture
def immutable_works(tmp_path):
    """Skip unless ``chattr +i`` stops writes through an open file here (root, on ext4/xfs;
    tmpfs and overlayfs ignore it)."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    probe = tmp_path / "probe"
    with open(probe, "ab") as f:
        if not chattr("+i", probe):
            pytest.skip("chattr +i is not allowed here (needs root and a filesystem that has it)")
        try:
            f.write(b"x")
            f.flush()
            refused = False
        except OSError:
            refused = True
        finally:
            chattr("-i", probe)
    if not refused:
        pytest.skip("chattr +i does not stop writes on this filesystem")


async def test_read_only_data_dir_refuses_writes_keeps_serving_and_recovers(immutable_works, tmp_path, procs):
    data = tmp_path / "data"
    log = tmp_path / "agent.log"
    agent = Proc(log, "-data-dir", str(data))
    procs.append(agent)
    await asyncio.to_thread(agent.wait_started)
    acked: list[str] = []
    locked = [data, *data.iterdir()]
    try:
        async with aiohttp.ClientSession() as http:
            for i in range(1, 6):
                status, text = await register(http, agent, f"svc{i}", i)
                assert status == 200, text
                acked.append(f"svc{i}")
            assert (await call(http, "PUT", f"{agent.base}/v1/kv/kept", data=b"kept"))[0] == 200
            locked = [data, *data.iterdir()]
            assert chattr("+i", *locked)
            await degraded_but_serving(agent, http, acked, "Operation not permitted")
            assert chattr("-i", *locked)
            await recovered(agent, http, acked)
    finally:
        chattr("-i", *locked)
    await after_restart(log, data, procs, acked)


def test_unusable_data_dir_stops_startup_naming_it(tmp_path):
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    afile = tmp_path / "afile"
    afile.write_text("")
    cases = [(afile, "not a directory")]
    if os.geteuid() != 0:
        blocked.chmod(0o500)
        cases.append((blocked / "data", "Permission denied"))
    elif shutil.which("chattr") and chattr("+i", blocked):
        cases.append((blocked / "data", "Operation not permitted"))
    try:
        for data_dir, why in cases:
            proc = subprocess.run([sys.executable, "-m", "dnsdisco", "agent", "-data-dir", str(data_dir),
                                   "-http-port", "0", "-dns-port", "0"],
                                  capture_output=True, text=True, timeout=60, cwd=ROOT)
            assert proc.returncode == 1, proc.stderr
            assert f"data_dir {data_dir} is not usable: " in proc.stderr and why in proc.stderr, proc.stderr
    finally:
        chattr("-i", blocked)
        blocked.chmod(0o700)


# -- mirror mode: the upstream flaps -------------------------------------------------------------


def services_file(path: Path, services: dict[str, str]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "services.json").write_text(json.dumps({"services": [
        {"id": name, "name": name, "address": addr, "port": 80} for name, addr in services.items()]}))


class DnsProbe:
    """A client asking the mirror for one name in a loop, in a thread, recording every outcome."""

    def __init__(self, port: int, name: str, want: set[str]) -> None:
        self.port, self.name, self.want = port, name, want
        self.outcomes: dict[str, int] = {}
        self.bad: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                reply = ask(self.port, self.name, timeout=2.0)
                got = {rr.address for rrset in reply.answer for rr in rrset}
                what = dns.rcode.to_text(reply.rcode()) if got != self.want else "ok"
            except dns.exception.Timeout:
                what = "timeout"
            self.outcomes[what] = self.outcomes.get(what, 0) + 1
            if what != "ok":
                self.bad.append(f"{time.monotonic():.3f} {what}")
            time.sleep(0.005)

    def __enter__(self) -> DnsProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def mirror_converged(mirror: Proc, catalog: dict[str, str], gone: set[str]) -> bool:
    for name, addr in catalog.items():
        reply = ask(mirror.dns_port, f"{name}.service.consul")
        if {rr.address for rrset in reply.answer for rr in rrset} != {addr}:
            return False
    return all(ask(mirror.dns_port, f"{name}.service.consul").rcode() == dns.rcode.NXDOMAIN for name in gone)


async def test_mirror_keeps_answering_while_the_upstream_flaps_and_converges(tmp_path, procs):
    # Two catalogs with one name in common: "old" is the upstream's long-lived state (kept in
    # its data dir, high index), "fresh" is a rebuilt cluster (new data dir: a lower index).
    old = {"stable": "10.7.0.1", "gen-old": "10.7.1.1"}
    fresh = {"stable": "10.7.0.1", "gen-fresh": "10.7.2.1"}
    services_file(tmp_path / "conf-old", old)
    services_file(tmp_path / "conf-fresh", fresh)
    up_port = free_port()
    up_log = tmp_path / "upstream.log"

    def start_upstream(conf: str, data: Path) -> Proc:
        p = Proc(up_log, "-data-dir", str(data), "-config-dir", str(tmp_path / conf), node="consul-1",
                 http_port=up_port, dns_port=-1)
        procs.append(p)
        p.wait_started()
        return p

    up = await asyncio.to_thread(start_upstream, "conf-old", tmp_path / "up-old")
    async with aiohttp.ClientSession() as http:
        # A long history, so that the fresh catalogs below come back with a lower index. Catalog
        # changes, not KV writes: the mirror watches the catalog endpoints, whose index is that
        # of their own tables, as in Consul.
        for i in range(20):
            assert (await call(http, "PUT", f"{up.base}/v1/agent/service/register", {"Name": "history"}))[0] == 200
            assert (await call(http, "PUT", f"{up.base}/v1/agent/service/deregister/history"))[0] == 200
    knobs = {"upstream": {"address": up.base, "wait": "1s", "query_interval": "0s", "backoff_min": "20ms",
                          "backoff_max": "250ms", "resync_interval": "0s"}}
    (tmp_path / "mirror.json").write_text(json.dumps(knobs))
    mirror = Proc(tmp_path / "mirror.log", "-config-file", str(tmp_path / "mirror.json"), node="mirror1")
    procs.append(mirror)
    await asyncio.to_thread(mirror.wait_started)
    await asyncio.to_thread(lambda: _until(lambda: mirror_converged(mirror, old, set()), 10, "first sync"))

    with DnsProbe(mirror.dns_port, "stable.service.consul", {"10.7.0.1"}) as probe:
        for flap in range(5):
            t0 = time.monotonic()
            await asyncio.to_thread(up.kill9)
            await asyncio.sleep(0.3)
            # Even flaps come back as a fresh cluster (lower index), odd ones with the old state.
            conf, data = ("conf-fresh", tmp_path / f"up-fresh-{flap}") if flap % 2 == 0 else ("conf-old", tmp_path / "up-old")
            up = await asyncio.to_thread(start_upstream, conf, data)
            if flap < 4:
                await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - t0)))
        # The last one (flap 4) is a fresh cluster and stays up: the old catalog must go.
        t_up = time.monotonic()
        await asyncio.to_thread(lambda: _until(lambda: mirror_converged(mirror, fresh, {"gen-old"}), 15,
                                               "the mirror to converge to the fresh catalog"))
        converge = time.monotonic() - t_up
    queries = sum(probe.outcomes.values())
    assert queries > 100, probe.outcomes
    assert probe.outcomes == {"ok": queries}, f"{probe.outcomes}: {probe.bad[:10]}"
    async with aiohttp.ClientSession() as http:
        status, text = await call(http, "GET", f"{mirror.base}/ready")
    assert status == 200, text
    print(f"mirror: {queries} DNS queries during 5 upstream restarts, all answered right; "
          f"converged {converge:.2f}s after the last restart")


def _until(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


# -- reload with a broken config -----------------------------------------------------------------


def ttls(port: int, name: str) -> set[int]:
    return {rrset.ttl for rrset in ask(port, name).answer}


async def test_sighup_with_a_broken_file_keeps_the_old_config_serving(tmp_path, procs):
    conf = tmp_path / "conf"
    services_file(conf, {"web": "10.9.0.1"})
    (conf / "dns.json").write_text(json.dumps({"dns_config": {"service_ttl": {"*": "7s"}}}))
    agent = Proc(tmp_path / "agent.log", "-dev", "-config-dir", str(conf))
    procs.append(agent)
    await asyncio.to_thread(agent.wait_started)
    assert await asyncio.to_thread(ttls, agent.dns_port, "web.service.consul") == {7}

    # A broken file that also changes a valid key: nothing of it may apply.
    (conf / "dns.json").write_text(json.dumps({"dns_config": {"service_ttl": {"*": "9s"}, "node_ttl": "soon"}}))
    agent.proc.send_signal(signal.SIGHUP)
    await asyncio.to_thread(agent.wait_log, r"reload refused")
    line = next(ln for ln in agent.log().splitlines() if "reload refused" in ln)
    assert "dns.json" in line and "dns_config.node_ttl" in line, line
    assert await asyncio.to_thread(ttls, agent.dns_port, "web.service.consul") == {7}
    async with aiohttp.ClientSession() as http:
        status, text = await call(http, "GET", f"{agent.base}/v1/catalog/service/web")
        assert status == 200 and json.loads(text)[0]["ServiceAddress"] == "10.9.0.1"

    (conf / "dns.json").write_text(json.dumps({"dns_config": {"service_ttl": {"*": "9s"}}}))
    agent.proc.send_signal(signal.SIGHUP)
    await asyncio.to_thread(agent.wait_log, r"configuration reloaded")
    deadline = time.monotonic() + 5
    while await asyncio.to_thread(ttls, agent.dns_port, "web.service.consul") != {9}:
        assert time.monotonic() < deadline, "the fixed config did not apply"
        await asyncio.sleep(0.02)
    assert agent.stop() == 0
