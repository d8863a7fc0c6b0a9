"""DNS on every core: worker processes sharing the DNS port, each with its own copy of the answers.

With ``dns_workers`` N above 1 the agent serves no DNS itself. :class:`WorkerPool` (run in the
agent) owns the worker processes: it binds the sockets, spawns the workers, supervises them
(a worker that dies is started again, with a log line and ``dnsdisco_dns_worker_restarts_total``),
relays reloads, fetches their counters when Prometheus scrapes, says whether they are ready, and
stops them. :func:`worker_main` (``python -m dnsdisco.workers``) is one worker: a
:class:`~dnsdisco.sync.mirror.Mirror` feeding an :class:`~dnsdisco.dns.table.AnswerTable`, a
:class:`~dnsdisco.forward.Forwarder` and a :class:`~dnsdisco.dns.server.DnsServer` on the
sockets it was handed. A worker knows nothing of the embedded catalog; the DNS side is the same
code as in the agent.

Choices, and why:

* **Sockets are made by the parent** and inherited (``pass_fds``): one UDP and one TCP socket per
  worker, all on one address and port with ``SO_REUSEPORT``, so the kernel spreads clients over
  the workers by their address and port (one socket per worker, not one shared socket: no
  thundering herd, and each worker reads only its share). A bind error therefore surfaces at
  start-up, in the agent, with nothing spawned; port 0 works (the first bind picks the port).
  Before binding with ``SO_REUSEPORT`` the port is probed *without* it: otherwise a second
  dnsdisco of the same user would silently share, and steal half of, a port already in use.
  The parent keeps every socket open for the life of the pool, so a crashed worker's
  replacement serves the very same socket: queries the kernel queued for it meanwhile are
  answered late rather than lost, and no client is re-hashed to another worker.
* **Workers follow the catalog through the mirror code over HTTP.** In embedded mode they follow
  the agent's own Consul-compatible API over loopback (the agent's HTTP listener when it is on
  loopback or a wildcard address, else a Unix socket of the same API in a 0700 directory), with
  no rate limit (``query_interval`` 0: the agent is the only server and is local) and short
  backoffs, so one code path, the mirror's, serves both modes. In mirror mode they follow the
  upstream Consul agent directly, with its configuration: a mirror-mode agent has no catalog API
  to follow (its HTTP port serves only ``/health``, ``/ready``, ``/metrics``), and an extra hop
  would add latency to every change. The cost is N (+1, the agent's own mirror that ``/ready``
  and the catalog metrics read) sets of the mirror's few connections into Consul, whatever the
  number of services; on ``?stale`` reads any Consul server answers them.
* **Start-up**: a worker opens its DNS sockets once its first full sync is done (or after
  ``SYNC_WAIT`` seconds, after which catalog names get SERVFAIL until it is), so queries that
  arrive while it starts wait in the socket's queue and get a real answer. The agent logs
  "agent started" once every worker is synced (or after ``STARTUP_WAIT``); ``/ready`` is 503
  until every worker has had its first full sync, and again while a replacement syncs.
* **Control channel**: a Unix socket pair per worker, carrying length-prefixed pickles (both ends
  are this program, the parent spawned the child, and nothing else can reach the pair). The
  parent sends the configuration (first message, and on each reload) and stats requests; the
  worker sends "synced" and stats replies. EOF on it is how each side learns the other is gone:
  the parent reaps and restarts the worker; a worker whose agent died (even by ``kill -9``)
  stops at once, so no orphan keeps the port.
* **Metrics are summed over workers** at scrape time: :attr:`Metrics.before_scrape` calls
  :meth:`WorkerPool.refresh_stats`, which asks every worker for its
  :class:`~dnsdisco.dns.server.DnsStats` and forwarder counters at once and waits up to
  ``STATS_TIMEOUT`` for the replies (a worker that does not answer in time contributes its last
  snapshot). The snapshots stand in for the workers' servers and forwarders in
  :class:`~dnsdisco.metrics.Metrics`, so the exported names and labels are those of one
  in-process server. A dead worker's last snapshot is kept, so summed counters do not go back.
* **Signals**: SIGTERM to the agent stops the workers (SIGTERM, then SIGKILL after
  ``STOP_TIMEOUT``); workers ignore SIGINT and SIGHUP (a terminal's Ctrl-C reaches the whole
  process group; the agent decides). A reload re-sends the configuration; ``dns_config`` changes
  apply in every worker as in the agent.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import errno
import gc
import logging
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields, is_dataclass, replace
from collections.abc import Callable
from typing import Any

import dnsdisco
from dnsdisco.config import Config
from dnsdisco.dns.server import TCP_BACKLOG, UDP_RCVBUF, DnsStats
from dnsdisco.forward import ForwardStats
from dnsdisco.metrics import Metrics
from dnsdisco.catalog.model import CRITICAL, WARNING
from dnsdisco.catalog.store import Store
from dnsdisco.http import shapes
from dnsdisco.sync.mirror import DEFAULT_MAX_STALE, Seed
from dnsdisco.sync.upstream import UpstreamConfig

__all__ = ["WorkerPool", "bind_shared", "loopback_source", "worker_main"]

log = logging.getLogger("dnsdisco.workers")

# How long the agent waits at start-up for every worker's first sync before it carries on
# (unready: /ready says which worker is missing).
STARTUP_WAIT = 15.0
# How long a worker waits for its first sync before it opens DNS anyway (SERVFAIL until then),
# CoreDNS kubernetes's startup_timeout idea (anchors.md 1.2).
SYNC_WAIT = 5.0
# Scrape-time wait for the workers' counters; a slower worker contributes its last snapshot.
STATS_TIMEOUT = 0.25
# SIGTERM, then SIGKILL after this long.
STOP_TIMEOUT = 5.0
# A worker that ran at least this long before dying is restarted at once; one that dies sooner
# waits RESTART_MIN, doubling up to RESTART_MAX (a worker that cannot start must not spin).
RESTART_HEALTHY = 10.0
RESTART_MIN = 0.1
RESTART_MAX = 10.0

_LEN = struct.Struct("!I")


def _frame(message: Any) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(body)) + body


def _unframe(buf: bytearray) -> list[Any]:
    """Complete messages at the start of *buf* (removed from it)."""
    out = []
    while len(buf) >= 4:
        (n,) = _LEN.unpack_from(buf)
        if len(buf) < 4 + n:
            break
        out.append(pickle.loads(bytes(buf[4 : 4 + n])))
        del buf[: 4 + n]
    return out


# --- sockets ---------------------------------------------------------------------------------------


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def _probe(family: socket.AddressFamily, address: str, port: int) -> int:
    """Check that *port* is free for UDP and TCP without ``SO_REUSEPORT`` (so that a port some
    other socket shares with ``SO_REUSEPORT`` counts as taken); 0 picks a free one."""
    for attempt in range(20 if port == 0 else 1):
        with socket.socket(family, socket.SOCK_DGRAM) as udp:
            udp.bind((address, port))
            got = udp.getsockname()[1]
            with socket.socket(family, socket.SOCK_STREAM) as tcp:
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    tcp.bind((address, got))
                except OSError as exc:
                    if port == 0 and exc.errno == errno.EADDRINUSE and attempt < 19:
                        continue
                    raise
            return got
    raise OSError(errno.EADDRINUSE, "no free port for UDP and TCP")  # pragma: no cover


def bind_shared(address: str, port: int, count: int) -> list[tuple[socket.socket, socket.socket]]:
    """*count* ``(udp, tcp)`` pairs bound to *address*:*port* with ``SO_REUSEPORT`` (TCP
    listening), non-blocking. Port 0 picks one port for all. Raises OSError (EADDRINUSE when the
    port is taken, by anyone: see :func:`_probe`)."""
    family = _family(address)
    port = _probe(family, address, port)
    pairs: list[tuple[socket.socket, socket.socket]] = []
    try:
        for _ in range(count):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            pairs.append((udp, socket.socket(family, socket.SOCK_STREAM)))
            tcp = pairs[-1][1]
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
            except OSError:  # pragma: no cover - the default will do
                pass
            udp.bind((address, port))
            udp.setblocking(False)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            tcp.bind((address, port))
            # Listening now, not when a worker starts: connections made meanwhile wait in the
            # backlog instead of being refused.
            tcp.listen(TCP_BACKLOG)
            tcp.setblocking(False)
    except BaseException:
        for u, t in pairs:
            u.close()
            t.close()
        raise
    return pairs


def seed_from_store(store: Store) -> Seed:
    """The embedded catalog as a worker's first load reads it, at this instant: the watched
    lists as the HTTP API answers them (same shapes, same indexes) and every service's entries.
    A worker loads it from a file in a fraction of the time its HTTP reads take (100,000
    instances: about 2 s against 10)."""
    def at(topic: str) -> int:
        return max(store.topic_index(topic), 1)  # as the HTTP reads answer (never 0)

    lists = {
        "services": (store.service_names(), at("services")),
        "nodes": ([shapes.node(n) for n in store.nodes()], at("nodes")),
        "critical": ([shapes.check(c) for c in store.checks_in_state(CRITICAL)], at("checks")),
        "warning": ([shapes.check(c) for c in store.checks_in_state(WARNING)], at("checks")),
    }
    names = {name.lower() for name in lists["services"][0]}
    return Seed(lists=lists,
                entries={lname: tuple(store.health_service(lname)) for lname in names},
                svc_index={lname: at(f"health:{lname}") for lname in names})


def loopback_source(port: int, address: str = "127.0.0.1") -> UpstreamConfig:
    """What a worker follows in embedded mode: the agent's own API on loopback. No token bucket
    (the agent is local and the only server), short backoffs (it restarts in a second)."""
    host = f"[{address}]" if ":" in address else address
    return UpstreamConfig(address=f"http://{host}:{port}", query_interval=0.0, backoff_min=0.02,
                          backoff_max=1.0)


# --- the agent's side ------------------------------------------------------------------------------


@dataclass(eq=False)  # Metrics keeps a list of distinct sources: identity, not value
class _DnsView:
    """Stands in for a worker's DnsServer in Metrics (``stats``, ``family_label``, ``tcp_open``)."""

    family_label: str
    stats: DnsStats = field(default_factory=DnsStats)
    tcp_open: int = 0


@dataclass(frozen=True, slots=True)
class _UpstreamView:
    text: str
    healthy: bool
    loop: str | None


class _Sized:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


@dataclass(eq=False)
class _ForwarderView:
    """Stands in for a worker's Forwarder in Metrics (``stats``, ``upstreams``, ``cache``)."""

    stats: ForwardStats = field(default_factory=ForwardStats)
    upstreams: tuple[_UpstreamView, ...] = ()
    cache: _Sized | None = None


class _Const:
    """A counter a worker reads through a callable (``DnsStats.receive_drops``), as read."""

    __slots__ = ("value",)

    def __init__(self, value: int) -> None:
        self.value = value

    def __call__(self) -> int:
        return self.value


def _snapshot(stats: DnsStats) -> DnsStats:
    """*stats* made picklable: counters read through callables are read now."""
    out = copy.copy(stats)
    for f in fields(stats):
        value = getattr(stats, f.name)
        if callable(value):
            setattr(out, f.name, _Const(int(value())))
    return out


def _merge_stats(into: DnsStats, other: DnsStats) -> None:
    """Add *other*'s counters to *into* (a dead worker's last snapshot to the retired total).

    Plain int counters and int-only counter groups add up; counters read through a callable
    belong to the socket, which outlives the worker, so the next worker reports them."""
    for f in fields(other):
        mine, theirs = getattr(into, f.name), getattr(other, f.name)
        if isinstance(theirs, int):
            setattr(into, f.name, mine + theirs)
        elif is_dataclass(theirs) and not isinstance(theirs, type):
            for g in fields(theirs):
                if isinstance(getattr(theirs, g.name), int):
                    setattr(mine, g.name, getattr(mine, g.name) + getattr(theirs, g.name))
    for key, table in other.tables.items():
        mine = into.tables.setdefault(key, {})
        for k, n in table.items():
            mine[k] = mine.get(k, 0) + n
    for key2, n in other.forwarded.items():
        into.forwarded[key2] = into.forwarded.get(key2, 0) + n
    for label, hist in other.durations.items():
        have = into.durations.get(label)
        if have is None:
            into.durations[label] = hist
        else:
            have.merge(hist)
    into.fold()


class _Slot:
    """One worker position: its sockets (kept for life), and the process serving them now."""

    def __init__(self, index: int, udp: socket.socket, tcp: socket.socket, family_label: str) -> None:
        self.index = index
        self.udp = udp
        self.tcp = tcp
        self.proc: subprocess.Popen[bytes] | None = None
        self.ctl: socket.socket | None = None
        self.buf = bytearray()
        self.synced = False
        self.started = 0.0
        self.quick_deaths = 0
        self.stats_seq = 0
        self.view = _DnsView(family_label)
        self.fview = _ForwarderView()


class WorkerPool:
    """N DNS worker processes on one port; owned and driven by :class:`dnsdisco.app.Agent`.

    :meth:`bind` (may raise OSError), then :meth:`start` with what the workers follow, then
    :meth:`reload` / :meth:`refresh_stats` / :meth:`ready` while running, :meth:`stop` at the end.
    """

    def __init__(self, config: Config, count: int, *, metrics: Metrics | None = None) -> None:
        self.config = config
        self.count = count
        self.metrics = metrics
        self.port: int | None = None
        self.restarts = 0
        self._slots: list[_Slot] = []
        self._source: UpstreamConfig | None = None
        self._max_stale = DEFAULT_MAX_STALE
        self._seed_path: str | None = None
        self._stopping = False
        self._seq = 0
        self._all_synced = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._retired = _DnsView("2" if _family(config.dns_bind) == socket.AF_INET6 else "1")

    # -- lifecycle ------------------------------------------------------------------------------------

    def bind(self) -> int:
        """Bind every worker's sockets; returns the port. Raises OSError (port in use ...)."""
        pairs = bind_shared(self.config.dns_bind, self.config.dns_port, self.count)
        label = self._retired.family_label
        self._slots = [_Slot(i, u, t, label) for i, (u, t) in enumerate(pairs)]
        self.port = pairs[0][0].getsockname()[1]
        if self.metrics is not None:
            self.metrics.watch_dns(self._retired)  # type: ignore[arg-type]
            for slot in self._slots:
                self.metrics.watch_dns(slot.view)  # type: ignore[arg-type]
                self.metrics.watch_forwarder(slot.fview)  # type: ignore[arg-type]
            self.metrics.before_scrape.append(self.refresh_stats)
            self.metrics.worker_restarts = lambda: self.restarts
        return self.port

    async def start(self, source: UpstreamConfig, *, max_stale: float = DEFAULT_MAX_STALE,
                    wait: float = STARTUP_WAIT, write_seed: Callable[[], str] | None = None) -> None:
        """Spawn the workers following *source* and wait (up to *wait* seconds) until every one
        has had its first full sync. *write_seed* writes a pickled :class:`Seed` and returns its
        path: the workers load their first copy from it instead of reading it over HTTP. It is
        called once the workers are spawned (they start up meanwhile), and used for this start
        only: a worker started again later reads, its seed being old by then."""
        self._source = source
        self._max_stale = max_stale
        try:
            for slot in self._slots:
                self._spawn(slot, configure=False)
            self._seed_path = write_seed() if write_seed is not None else None
            for slot in self._slots:
                self._configure(slot)
            try:
                await asyncio.wait_for(self._all_synced.wait(), wait)
            except asyncio.TimeoutError:
                log.warning("dns workers: not all synced after %.0fs; /ready says which", wait)
        finally:
            self._seed_path = None

    def _worker_config(self) -> Config:
        # Services from config files are the agent's business (they reach the workers through
        # the catalog); the port is the one bound, so that 0 stays what it resolved to.
        return replace(self.config, services=(), dns_port=self.port or 0, dns_workers=1)

    def _spawn(self, slot: _Slot, *, configure: bool = True) -> None:
        """Start the worker of *slot* on its sockets and (unless not *configure*: see
        :meth:`start`) send it its configuration. Raises OSError if it cannot be started."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = (child.fileno(), slot.udp.fileno(), slot.tcp.fileno())
        root = os.path.dirname(os.path.dirname(os.path.abspath(dnsdisco.__file__)))
        env = dict(os.environ)
        if root not in [p for p in sys.path if p and p != os.getcwd()]:
            # Run from a source tree, not installed: the worker must find the same package.
            env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        # -P: not the agent's working directory first on sys.path, where a stray socket.py (or
        # dnsdisco/) would be imported by every worker; the package comes from PYTHONPATH.
        cmd = [sys.executable, "-P", "-m", "dnsdisco.workers", "--index", str(slot.index),
               "--control", str(fds[0]), "--udp", str(fds[1]), "--tcp", str(fds[2])]
        try:
            slot.proc = subprocess.Popen(cmd, pass_fds=fds, env=env, stdin=subprocess.DEVNULL)
        except OSError:
            parent.close()
            raise
        finally:
            child.close()
        # Timeout mode: reads happen only when select/the loop says there is data, and a send
        # to a worker that stopped reading gives up instead of hanging the agent.
        parent.settimeout(1.0)
        slot.ctl = parent
        slot.buf.clear()
        slot.synced = False
        slot.started = time.monotonic()
        self._all_synced.clear()
        if configure:
            self._configure(slot)
        asyncio.get_running_loop().add_reader(parent.fileno(), self._on_readable, slot)
        log.info("dns worker %d started (pid %d)", slot.index, slot.proc.pid)

    def _configure(self, slot: _Slot) -> None:
        """The worker's first message: what to serve, what to follow, and the seed if any."""
        self._send(slot, ("config", self._worker_config(), self._source, self._max_stale, self._seed_path))

    def _send(self, slot: _Slot, message: Any) -> bool:
        if slot.ctl is None:
            return False
        try:
            slot.ctl.sendall(_frame(message))
        except OSError:
            return False  # dying or stuck: the EOF path deals with it
        return True

    def _on_readable(self, slot: _Slot) -> None:
        ctl = slot.ctl
        if ctl is None:
            return
        try:
            data = ctl.recv(1 << 20)
        except (BlockingIOError, InterruptedError, TimeoutError):
            return
        except OSError:
            data = b""
        if not data:
            self._lost(slot)
            return
        slot.buf += data
        for msg in _unframe(slot.buf):
            self._dispatch(slot, msg)

    def _dispatch(self, slot: _Slot, msg: Any) -> None:
        kind = msg[0]
        if kind == "synced":
            slot.synced = True
            slot.quick_deaths = 0
            log.info("dns worker %d (pid %d): first sync done, serving DNS", slot.index,
                     slot.proc.pid if slot.proc else 0)
            if all(s.synced for s in self._slots):
                self._all_synced.set()
        elif kind == "stats":
            _, seq, stats, tcp_open, fstats, upstreams, cache = msg
            slot.view.stats = stats
            slot.view.tcp_open = tcp_open
            slot.fview.stats = fstats
            slot.fview.upstreams = tuple(_UpstreamView(*u) for u in upstreams)
            slot.fview.cache = None if cache is None else _Sized(cache)
            slot.stats_seq = max(slot.stats_seq, seq)

    def _lost(self, slot: _Slot) -> None:
        """The control channel closed: the worker is gone (or going). Reap it, then restart it."""
        ctl = slot.ctl
        if ctl is None:
            return
        asyncio.get_running_loop().remove_reader(ctl.fileno())
        ctl.close()
        slot.ctl = None
        slot.synced = False
        self._all_synced.clear()
        if self._stopping:
            return
        task = asyncio.get_running_loop().create_task(self._restart(slot))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _restart(self, slot: _Slot) -> None:
        proc = slot.proc
        assert proc is not None
        try:
            code = await asyncio.to_thread(proc.wait, STOP_TIMEOUT)
        except subprocess.TimeoutExpired:  # closed its channel but lives on: not a worker any more
            proc.kill()
            code = await asyncio.to_thread(proc.wait)
        if self._stopping:
            return
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        self.restarts += 1
        # Keep what it counted (as of the last scrape), so that sums do not go back.
        _merge_stats(self._retired.stats, slot.view.stats)
        slot.view.stats = DnsStats()
        slot.view.tcp_open = 0
        ran = time.monotonic() - slot.started
        delay = 0.0
        if ran < RESTART_HEALTHY:
            delay = min(RESTART_MAX, RESTART_MIN * 2 ** slot.quick_deaths)
            slot.quick_deaths += 1
        log.error("dns worker %d (pid %d) stopped unexpectedly (%s) after %.1fs; starting it again%s",
                  slot.index, proc.pid, how, ran, f" in {delay:.1f}s" if delay else "")
        while True:
            if delay:
                await asyncio.sleep(delay)
            if self._stopping:
                return
            try:
                self._spawn(slot)
                return
            except OSError as e:
                # Out of processes, descriptors or memory: try again later rather than leave
                # the slot dead (and /ready 503) for good.
                delay = min(RESTART_MAX, max(delay * 2, RESTART_MIN))
                log.error("dns worker %d could not be started (%s); trying again in %.1fs",
                          slot.index, e, delay)

    async def stop(self) -> None:
        """SIGTERM every worker, wait for them (SIGKILL after STOP_TIMEOUT), close the sockets."""
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        procs = [s.proc for s in self._slots if s.proc is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for proc in procs:
            if proc.poll() is None:
                log.warning("dns worker (pid %d) did not stop within %.0fs; killing it", proc.pid, STOP_TIMEOUT)
                proc.kill()
                proc.wait()
        loop = asyncio.get_running_loop()
        for slot in self._slots:
            if slot.ctl is not None:
                loop.remove_reader(slot.ctl.fileno())
                slot.ctl.close()
                slot.ctl = None
            slot.udp.close()
            slot.tcp.close()

    # -- while running --------------------------------------------------------------------------------

    def reload(self, config: Config) -> None:
        """Send the new configuration to every worker (and keep it for restarts)."""
        self.config = config
        for slot in self._slots:
            self._send(slot, ("config", self._worker_config(), self._source, self._max_stale))

    def ready(self) -> tuple[bool, str]:
        """Every worker has had its first full sync (and is running)."""
        for slot in self._slots:
            if slot.ctl is None:
                return False, f"not ready: DNS worker {slot.index} is being restarted"
            if not slot.synced:
                return False, (f"not ready: DNS worker {slot.index} (pid {slot.proc.pid if slot.proc else 0}) "
                               "has not completed its first sync")
        return True, f"{len(self._slots)} DNS workers serving"

    def pids(self) -> list[int]:
        """The workers' process IDs now (tests, operators)."""
        return [s.proc.pid for s in self._slots if s.proc is not None and s.ctl is not None]

    def worker_stats(self) -> list[DnsStats]:
        """Each worker's DNS counters as of now (fetched as a scrape does)."""
        self.refresh_stats()
        return [slot.view.stats for slot in self._slots]

    def refresh_stats(self, timeout: float = STATS_TIMEOUT) -> None:
        """Fetch every worker's counters into the views Metrics reads (scrape time; blocks the
        loop for at most *timeout*, about a millisecond when the workers are well)."""
        waiting: dict[int, tuple[_Slot, int]] = {}
        for slot in self._slots:
            self._seq += 1
            if slot.ctl is not None and self._send(slot, ("stats", self._seq)):
                waiting[slot.ctl.fileno()] = (slot, self._seq)
        deadline = time.monotonic() + timeout
        # poll, not select: a busy agent's descriptors can be numbered past select's 1024.
        poller = select.poll()
        for fd in waiting:
            poller.register(fd, select.POLLIN)
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for fd, _events in poller.poll(left * 1000):
                if fd not in waiting:
                    continue
                slot, seq = waiting[fd]
                self._on_readable(slot)
                if slot.ctl is None or slot.stats_seq >= seq:
                    del waiting[fd]
                    poller.unregister(fd)


# --- the worker's side -----------------------------------------------------------------------------


class _Prefix(logging.Filter):
    def __init__(self, index: int) -> None:
        super().__init__()
        self.tag = f"[worker {index}]"

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.endswith(self.tag):
            record.name = f"{record.name}{self.tag}"
        return True


async def _serve(index: int, ctl: socket.socket, udp: socket.socket, tcp: socket.socket) -> int:
    """One worker's life; returns its exit code."""
    from dnsdisco.cli import _setup_logging
    from dnsdisco.dns.server import DnsServer
    from dnsdisco.dns.table import AnswerTable
    from dnsdisco.forward import Forwarder
    from dnsdisco.heap import keep_frozen
    from dnsdisco.sync.mirror import Mirror

    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_unix_connection(sock=ctl)

    async def receive() -> Any:
        (n,) = _LEN.unpack(await reader.readexactly(4))
        return pickle.loads(await reader.readexactly(n))

    def send(message: Any) -> None:
        writer.write(_frame(message))

    try:
        kind, config, source, max_stale, seed_path = await receive()
    except asyncio.IncompleteReadError:
        return 0  # the agent went away before it said anything
    assert kind == "config"
    _setup_logging(config.log_level, config.log_json)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_Prefix(index))
    seed = None
    if seed_path:
        # Without the cyclic GC meanwhile: unpickling creates some 400,000 long-lived objects
        # per 100,000 instances, and each full collection on the way walks all made so far.
        gc.disable()
        try:
            with open(seed_path, "rb") as f:
                seed = pickle.load(f)
        except (OSError, pickle.UnpicklingError, EOFError) as e:
            log.warning("cannot read the agent's snapshot %s (%s); loading the catalog over HTTP", seed_path, e)
        finally:
            gc.enable()
    table = AnswerTable(config)
    mirror = Mirror(source, local_datacenter=config.datacenter, on_delta=table.apply,
                    on_stale=table.set_stale, max_stale=max_stale, seed=seed)
    forwarder = Forwarder(config)
    dns = DnsServer(config, table, forwarder=forwarder)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    async def control() -> None:
        nonlocal config
        try:
            while True:
                msg = await receive()
                if msg[0] == "stats":
                    fwd = forwarder
                    send(("stats", msg[1], _snapshot(dns.stats), dns.tcp_open, fwd.stats,
                          [(u.text, u.healthy, u.loop) for u in fwd.upstreams],
                          None if fwd.cache is None else len(fwd.cache)))
                elif msg[0] == "config":
                    config = msg[1]
                    table.reconfigure(config)
                    forwarder.reload(config)
                    dns.reload(config)
        except (asyncio.IncompleteReadError, ConnectionError):
            log.warning("the agent has gone away; stopping")
        finally:
            stop.set()

    async def first_sync() -> None:
        synced = await mirror.wait_synced(SYNC_WAIT)
        await dns.start((udp, tcp))
        # After the listener is up, as in the agent: a loop probe must find us answering.
        await forwarder.start()
        if not synced:
            log.warning("no full sync from %s after %.0fs; serving DNS anyway (SERVFAIL for catalog "
                        "names until it completes)", source.address, SYNC_WAIT)
            await mirror.wait_synced()
        gc.freeze()  # as in the agent: the catalog is long-lived, keep it out of full GC passes
        send(("synced",))
        await keep_frozen(mirror.instance_count)  # ... and so is what it grows by

    controller = loop.create_task(control())
    await mirror.start()
    syncing = loop.create_task(first_sync())
    failed: list[BaseException] = []

    def after_first_sync(task: asyncio.Task[None]) -> None:
        # A worker that cannot start serving (its sockets refused, say) must exit, so that the
        # agent sees it and starts it again, rather than live on without DNS.
        if not task.cancelled() and task.exception() is not None:
            failed.append(task.exception())  # type: ignore[arg-type]
            log.error("could not start serving DNS: %s", task.exception())
            stop.set()

    syncing.add_done_callback(after_first_sync)
    try:
        await stop.wait()
        return 1 if failed else 0
    finally:
        syncing.cancel()
        controller.cancel()
        await asyncio.gather(syncing, controller, return_exceptions=True)
        await dns.stop()
        await forwarder.stop()
        await mirror.stop()
        writer.close()


def worker_main(argv: list[str] | None = None) -> int:
    """``python -m dnsdisco.workers``: one DNS worker, on the descriptors the agent passed."""
    p = argparse.ArgumentParser(prog="dnsdisco.workers")
    for name in ("index", "control", "udp", "tcp"):
        p.add_argument(f"--{name}", type=int, required=True)
    args = p.parse_args(argv)
    # Ctrl-C in a terminal reaches the whole process group: the agent stops the workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    ctl = socket.socket(fileno=args.control)
    udp = socket.socket(fileno=args.udp)
    tcp = socket.socket(fileno=args.tcp)
    for s in (udp, tcp):
        s.setblocking(False)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_serve(args.index, ctl, udp, tcp))
    return uvloop.run(_serve(args.index, ctl, udp, tcp))


if __name__ == "__main__":
    # Run as ``-m``, this file is ``__main__``; run the copy imported as ``dnsdisco.workers``, so
    # that what it pickles for the agent names classes the agent can find.
    from dnsdisco.workers import worker_main as _main

    sys.exit(_main())
