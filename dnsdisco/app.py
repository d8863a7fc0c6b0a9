"""The composition root: builds the catalog, health checker, DNS table and servers from a Config,
and runs them until told to stop.

:class:`Agent` owns the lifecycle (start, reload, stop) and the wiring between parts: the store
feeds the DNS table through catalog deltas (the embedded producer of the snapshot), the health
checker writes check results through the store, and both servers read what they need from
their own collaborators. It raises; only ``dnsdisco.cli`` turns errors into exit codes.

With ``dns_workers`` above 1 DNS is not served here: a :class:`~dnsdisco.workers.WorkerPool`
runs that many DNS processes on the DNS port, each following this agent's catalog (or the
upstream Consul) through the mirror; this process keeps the catalog, HTTP, health checks and
the workers' supervision, and its own DNS table stays empty. One worker (the ``-dev`` default)
keeps today's in-process path, the freshest one.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import pickle
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace

from aiohttp import web

from dnsdisco import config as configmod
from dnsdisco.catalog.health import HealthChecker
from dnsdisco.catalog.model import CatalogDelta
from dnsdisco.catalog.store import Store
from dnsdisco.config import Config
from dnsdisco.dns.server import DnsServer
from dnsdisco.dns.table import AnswerTable
from dnsdisco.errors import ConfigError
from dnsdisco.forward import Forwarder
from dnsdisco.heap import keep_frozen
from dnsdisco.http.app import make_app, make_ops_app
from dnsdisco.metrics import Metrics, SyncStatus, mirror_sync_status
from dnsdisco.sync.mirror import DEFAULT_MAX_STALE, Mirror
from dnsdisco.workers import WorkerPool, loopback_source, seed_from_store

log = logging.getLogger("dnsdisco.agent")


class Agent:
    """One dnsdisco agent: the embedded catalog (the default), or, with ``config.upstream``, a
    mirror of a Consul cluster. Either producer feeds the same DNS table through catalog deltas,
    so the DNS side cannot tell the modes apart.

    *reload_config* re-reads the configuration from its original sources (files and flags); it
    is what SIGHUP and ``PUT /v1/agent/reload`` call. Without it, reload is refused.
    """

    def __init__(self, config: Config, *, reload_config: Callable[[], Config] | None = None,
                 metrics: Metrics | None = None) -> None:
        self.config = config
        self._reload_config = reload_config
        self.table = AnswerTable(config)
        self.store: Store | None = None
        self.health: HealthChecker | None = None
        self.mirror: Mirror | None = None
        if config.upstream is not None:
            self.mirror = Mirror(
                config.upstream, local_datacenter=config.datacenter, on_delta=self._on_mirror_delta,
                on_stale=self.table.set_stale, max_stale=config.dns_config.max_stale,
            )
        else:
            self.store = Store(
                datacenter=config.datacenter,
                node_name=config.node_name,
                node_address=config.advertise,
                data_dir=config.data_dir or None,
                server_port=config.server_port,
            )
            self.health = HealthChecker(self.store, enable_script_checks=config.enable_script_checks)
        self.forwarder = Forwarder(config)
        # Metrics (and their registry) belong to this agent; tests inject a fresh one.
        self.metrics = metrics or Metrics(datacenter=config.datacenter, process=True)
        # dns_workers > 1: DNS is served by worker processes (dnsdisco.workers), each with its
        # own table and forwarder; this process keeps the catalog, HTTP and the supervision.
        self.uses_workers = config.dns_port >= 0 and config.dns_workers > 1
        if not self.uses_workers:
            self.metrics.watch_forwarder(self.forwarder)
        self.workers: WorkerPool | None = None
        self.dns: DnsServer | None = None
        self._runner: web.AppRunner | None = None
        self.http_port: int | None = None
        self.dns_port: int | None = None
        self._stopped = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._freeze: asyncio.Task[None] | None = None
        self._private_dir: str | None = None  # the workers' private API socket lives here

    def _on_mirror_delta(self, delta: CatalogDelta) -> None:
        if not self.uses_workers:  # the workers render their own tables
            self.table.apply(delta)
        self.metrics.observe_delta(delta)

    async def start(self) -> None:
        """Open the catalog, load the config dir's services, and start checks and listeners.

        Config services are decoded before anything starts, so a bad definition stops start-up
        with nothing bound. DNS answers SERVFAIL for catalog names until the first full load,
        which happens here before the DNS socket opens.
        """
        try:
            if self.mirror is not None:
                if self.config.services:
                    log.warning("mirror mode: the %d service definitions in config files are ignored "
                                "(register them with the Consul cluster)", len(self.config.services))
                # DNS opens at once and answers SERVFAIL for catalog names until the first
                # complete sync (honest readiness); /ready says 503 until then.
                await self.mirror.start()
                self.metrics.sync_status = mirror_sync_status(self.mirror)
                self._freeze = asyncio.get_running_loop().create_task(self._freeze_after_sync())
            else:
                await self._start_embedded()
            if self.uses_workers:
                # Bound here, before anything serves: a port in use stops start-up at once.
                self.workers = WorkerPool(self.config, self.config.dns_workers, metrics=self.metrics)
                self.dns_port = self.workers.bind()
            elif self.config.dns_port >= 0:
                self.dns = DnsServer(self.config, self.table, forwarder=self.forwarder, metrics=self.metrics)
                await self.dns.start()
                self.dns_port = self.dns.port
                # After the listener is up, so that a loop probe sent through a recursor that
                # forwards back to us arrives and is recognised.
                await self.forwarder.start()
            # Embedded mode with workers: they follow this agent's API over loopback, so it
            # runs even with the HTTP port disabled (then on a private loopback port only).
            private_api = self.workers is not None and self.store is not None
            if self.config.http_port >= 0 or private_api:
                if self.store is not None and self.health is not None:
                    app = make_app(self.store, self.health, self.config, reload=self.reload,
                                   metrics=self.metrics, ready=self._ready)
                else:
                    app = make_ops_app(self.config, metrics=self.metrics, ready=self._ready,
                                       reload=self.reload)
                # handler_cancellation: a blocking query whose client has gone away stops waiting at once
                # instead of holding its slot for up to ten minutes.
                self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                             handler_cancellation=True)
                await self._runner.setup()
                if self.config.http_port >= 0:
                    site = web.TCPSite(self._runner, self.config.http_bind, self.config.http_port)
                    await site.start()
                    server = site._server
                    assert server is not None and server.sockets
                    self.http_port = server.sockets[0].getsockname()[1]
            if self.workers is not None:
                await self._start_workers()
        except BaseException:
            await self.stop()
            raise
        log.info(
            "agent started: datacenter=%s node=%s http=%s dns=%s %s dns_workers=%d",
            self.config.datacenter, self.config.node_name,
            f"{self.config.http_bind}:{self.http_port}" if self.http_port is not None else "off",
            f"{self.config.dns_bind}:{self.dns_port}" if self.dns_port is not None else "off",
            f"upstream={self.config.upstream.address}" if self.config.upstream is not None
            else f"data_dir={self.config.data_dir or '(memory, -dev)'}",
            self.config.dns_workers if self.workers is not None else 1,
        )

    async def _start_workers(self) -> None:
        """Spawn the DNS workers, following this agent's API over loopback (embedded) or the
        upstream Consul agent (mirror mode); see dnsdisco.workers for why."""
        assert self.workers is not None
        if self.store is None:
            assert self.config.upstream is not None
            await self.workers.start(self.config.upstream, max_stale=self.config.dns_config.max_stale)
            return
        bind = self.config.http_bind
        port = self.http_port
        if port is not None and (bind.startswith("127.") or bind in ("0.0.0.0", "::", "::1")):
            address = "::1" if bind in ("::", "::1") else "127.0.0.1" if bind == "0.0.0.0" else bind
            source = loopback_source(port, address)
        else:
            # Not reachable on loopback (or disabled): a private listener of the same API, on a
            # Unix socket in a directory only this user can enter. Not a loopback TCP port: the
            # operator turned the API off (or away from this host), and a port would hand the
            # whole read-write API to every local user.
            assert self._runner is not None
            self._private_dir = tempfile.mkdtemp(prefix="dnsdisco-api-")  # mode 0700
            path = os.path.join(self._private_dir, "api.sock")
            site = web.UnixSite(self._runner, path)
            await site.start()
            source = replace(loopback_source(0), address=f"unix://{path}")
        # The workers' first copy of the catalog, written once for all of them: loading it is
        # several times quicker than reading every service over HTTP (see Seed).
        if self._private_dir is None:
            self._private_dir = tempfile.mkdtemp(prefix="dnsdisco-api-")  # mode 0700
        seed_path = os.path.join(self._private_dir, "seed.pickle")
        store = self.store

        def write_seed() -> str:
            gc.disable()  # the snapshot's tuples and the pickler's memo: no cyclic GC passes
            try:
                with open(seed_path, "wb") as f:
                    pickle.dump(seed_from_store(store), f, protocol=pickle.HIGHEST_PROTOCOL)
            finally:
                gc.enable()
            return seed_path

        try:
            # The embedded catalog is never stale: dns_config.max_stale is for mirror mode.
            await self.workers.start(source, max_stale=DEFAULT_MAX_STALE, write_seed=write_seed)
        finally:
            if os.path.exists(seed_path):
                os.unlink(seed_path)

    async def _start_embedded(self) -> None:
        assert self.store is not None and self.health is not None
        definitions = configmod.decode_services(self.config)
        loading = time.monotonic()
        await self.store.open()
        await self.store.sync_config_services(definitions)
        # The table follows the store from here on: every committed change arrives as a
        # delta in the same loop step, so DNS reflects a write within milliseconds. (With DNS
        # workers, each follows the store through the HTTP API into a table of its own.)
        if not self.uses_workers:
            self.store.add_delta_listener(self.table.apply)
        self.store.add_delta_listener(self.metrics.observe_delta)
        full = self.store.full_delta()
        if not self.uses_workers:
            self.table.apply(full)
        self.metrics.observe_delta(full)
        # The embedded catalog is always current: "last success" is now at every scrape.
        load_seconds = time.monotonic() - loading
        self.metrics.sync_status = lambda: SyncStatus(duration=load_seconds, last_success=time.time())
        # The catalog and its index are long-lived: move them out of the cyclic GC's reach,
        # whose full passes over a 100k-instance heap otherwise stall queries for 100+ ms -
        # now and as registrations grow it (dnsdisco.heap).
        catalog = self.metrics.catalog
        self._freeze = asyncio.get_running_loop().create_task(keep_frozen(lambda: catalog.instances))
        await self.health.start()

    async def _freeze_after_sync(self) -> None:
        assert self.mirror is not None
        if await self.mirror.wait_synced():
            # As in embedded mode, once the mirrored catalog is in memory.
            await keep_frozen(self.mirror.instance_count)

    def _ready(self) -> tuple[bool, str]:
        """``/ready``: 200 only once the catalog is loaded and DNS answers from it; in mirror
        mode, the mirror says how stale it is. With DNS workers, every one must have had its
        first full sync too."""
        ok, why = self._catalog_ready()
        if ok and self.uses_workers:
            if self.workers is None:
                return False, "not ready: the DNS workers are not started"
            ok, more = self.workers.ready()
            why = f"{why}; {more}" if ok else more
        return ok, why

    def _catalog_ready(self) -> tuple[bool, str]:
        if self.mirror is not None:
            return self.mirror.ready()
        assert self.store is not None
        if not self.store.is_open:
            return False, "not ready: the catalog store is not open"
        if not self.uses_workers and not self.table.synced:
            return False, "not ready: the catalog has not been loaded into the DNS table yet"
        failing = self.store.storage_error
        if failing is not None:
            # Still 200, as a mirror serving a stale catalog is: DNS and reads answer from the
            # last committed state, and taking the agent out of rotation would stop those too.
            # Only writes fail (500), until space or permissions come back.
            return True, (f"ready (degraded): catalog writes are failing: {failing}; reads and DNS "
                          f"answer from index {self.store.index}")
        return True, f"ready: embedded catalog at index {self.store.index}"

    async def reload(self) -> None:
        """Re-read the configuration and apply what can change without a restart: ``dns_config``,
        the recursors, and the config dir's services (Consul reloads services and checks).

        A bad configuration raises :class:`ConfigError` and leaves the running one untouched.
        Listener addresses, ports, data dir, node name and datacenter need a restart; a change
        to them is logged and ignored.
        """
        if self._reload_config is None:
            raise ConfigError("this agent was started without reloadable configuration sources")
        async with self._reload_lock:
            new = self._reload_config()
            definitions = configmod.decode_services(new)
            fixed = ("datacenter", "node_name", "data_dir", "client_addr", "bind_addr",
                     "advertise_addr", "http_addr", "dns_addr", "http_port", "dns_port", "dev",
                     "upstream", "dns_workers")
            changed = [k for k in fixed if getattr(new, k) != getattr(self.config, k)]
            if changed:
                log.warning("reload: %s changed; these take effect only after a restart",
                            ", ".join(changed))
                new = configmod.with_overrides(new, **{k: getattr(self.config, k) for k in changed})
            if self.store is not None:
                await self.store.sync_config_services(definitions)
            self.table.reconfigure(new)
            self.forwarder.reload(new)
            if self.dns is not None:
                self.dns.reload(new)
            if self.workers is not None:
                self.workers.reload(new)
            self.config = new
            log.info("configuration reloaded: %d services from config files", len(definitions))

    async def stop(self) -> None:
        """Stop listeners first (no new work), then checks, then close the catalog."""
        # The DNS workers before the HTTP API they follow, so that they do not see it vanish.
        if self.workers is not None:
            await self.workers.stop()
            self.workers = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None
        if self.dns is not None:
            await self.dns.stop()
            self.dns = None
        await self.forwarder.stop()
        if self._freeze is not None:
            self._freeze.cancel()
            self._freeze = None
        if self.mirror is not None:
            await self.mirror.stop()
        if self.health is not None:
            await self.health.stop()
        if self.store is not None:
            await self.store.close()
        self._stopped.set()

    async def run(self) -> None:
        """Start, then serve until SIGINT/SIGTERM; SIGHUP reloads the configuration."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        # Before start(): once "agent started" is logged (or DNS workers answer), a SIGTERM must
        # be a clean stop, not the default death that would leave nothing cleaned up.
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        # A SIGHUP while starting (nothing to reload yet) must not kill the agent either.
        loop.add_signal_handler(signal.SIGHUP, lambda: None)
        try:
            await self.start()
        except BaseException:
            for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            raise

        def on_hup() -> None:
            loop.create_task(self._reload_logged())

        loop.add_signal_handler(signal.SIGHUP, on_hup)
        try:
            await stop.wait()
            log.info("shutting down")
        finally:
            for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.stop()

    async def _reload_logged(self) -> None:
        try:
            await self.reload()
        except ConfigError as e:
            log.error("reload refused, the running configuration is unchanged: %s", e)
        except Exception:
            log.exception("reload failed, the running configuration is unchanged")
