"""The agent's own health checks: which ones run, when, and where their results go.

:class:`HealthChecker` owns the schedule of every check registered on this agent's node: a
periodic runner for HTTP, TCP and (when enabled) script checks, an expiry timer for TTL checks,
and the reaper behind ``DeregisterCriticalServiceAfter``. What one run of a check does, and the
threshold and output rules, live in :mod:`dnsdisco.catalog.probe`; the store owns the checks
themselves. Every result is written through the store, so it is durable, bumps the catalog
index, and reaches DNS like any other change.

The checker follows the store rather than being told: it subscribes to check changes and starts,
restarts or stops runners as checks appear, change definition, or go away. Status-only changes
(including the ones it writes itself) only feed the reaper's critical-since bookkeeping.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from dnsdisco.catalog.model import CRITICAL, STATUSES, Check, CheckDefinition
from dnsdisco.catalog.probe import (
    Thresholds,
    http_probe,
    output_limit,
    script_probe,
    tcp_probe,
    truncate_ttl_output,
)
from dnsdisco.catalog.store import AGENT_SOURCES
from dnsdisco.duration import format_duration
from dnsdisco.errors import CatalogError

log = logging.getLogger("dnsdisco.health")

CheckListener = Callable[[Check | None, Check | None], None]

# At most this many probes are in flight at once. A check waiting for a slot has not started
# its timeout yet, so a burst of 10k checks is spread out instead of timing out, and the agent
# never holds more sockets (or child processes) than this for checks.
MAX_CONCURRENT_PROBES = 128


class CheckStore(Protocol):
    """The part of :class:`dnsdisco.catalog.store.Store` the checker uses."""

    @property
    def node_name(self) -> str: ...

    def checks(self) -> Iterable[Check]: ...

    def check(self, node: str, check_id: str) -> Check | None: ...

    def check_source(self, node: str, check_id: str) -> str | None: ...

    def add_check_listener(self, fn: CheckListener) -> None: ...

    async def set_check_status(self, node: str, check_id: str, status: str, output: str) -> bool: ...

    async def deregister_service(self, node: str, service_id: str) -> None: ...


@dataclass(eq=False, slots=True)
class _Scheduled:
    """What runs for one check: a periodic runner task, or a TTL expiry timer."""

    definition: CheckDefinition
    task: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None
    last_output: str = ""

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class HealthChecker:
    """Runs this agent's HTTP, TCP, TTL (and, if enabled, script) checks against *store*.

    Only the agent's own checks are run: those on ``store.node_name`` registered through the
    agent API or a config file. Checks written through ``/v1/catalog/register`` (even on this
    node, even with a ``Definition``) belong to whoever wrote them, as in Consul, where such
    checks are for external checkers. Options:

    * *enable_script_checks* - run ``Args`` checks; otherwise they are never run (the HTTP layer
      refuses to register them, as Consul does).
    * *clock* - the time source for how long a check has been critical (the reaper's measure).
    * *reap_interval* - how often the reaper looks for services to remove (Consul: 30 s).
    * *min_interval* - checks run no more often than this (Consul: 1 s, raised with a warning).
    * *min_deregister_after* - the floor on ``DeregisterCriticalServiceAfter`` (Consul: 1 min).
    * *max_concurrent_probes* - the cap on probes in flight at once.
    """

    def __init__(
        self,
        store: CheckStore,
        *,
        enable_script_checks: bool = False,
        clock: Callable[[], float] = time.monotonic,
        reap_interval: float = 30.0,
        min_interval: float = 1.0,
        min_deregister_after: float = 60.0,
        max_concurrent_probes: int = MAX_CONCURRENT_PROBES,
    ) -> None:
        self._store = store
        self._scripts = enable_script_checks
        self._clock = clock
        self._reap_interval = reap_interval
        self._min_interval = min_interval
        self._min_deregister_after = min_deregister_after
        self._max_probes = max_concurrent_probes
        self._scheduled: dict[str, _Scheduled] = {}
        # check ID -> clock() when it was last seen turning critical; only for service checks
        # that carry DeregisterCriticalServiceAfter. In memory, as in Consul: a restart starts
        # the count again.
        self._critical_since: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._slots: asyncio.Semaphore | None = None
        self._running = False
        self._subscribed = False

    @property
    def running(self) -> bool:
        return self._running

    async def start(self) -> None:
        """Subscribe to the store and schedule every check already in it."""
        if self._running:
            return
        self._slots = asyncio.Semaphore(self._max_probes)
        self._session = aiohttp.ClientSession(
            # force_close: Consul disables keep-alive for checks, so every probe sees a fresh
            # connection (a dead backend is not hidden by a pooled socket), and a per-request
            # ssl=False or SNI name can never meet a connection set up for another check.
            # limit=0: the probe semaphore is the bound, the connector must not add a second.
            connector=aiohttp.TCPConnector(force_close=True, limit=0),
            # Cookies set by one check's target must not ride along on another check.
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._running = True
        if not self._subscribed:
            # The store has no unsubscribe; after stop() the listener ignores events, and a
            # restarted checker reuses the one subscription.
            self._store.add_check_listener(self._on_check_change)
            self._subscribed = True
        for check in self._store.checks():
            self._on_check_change(None, check)
        self._reaper = asyncio.create_task(self._reap_loop(), name="health-reaper")

    async def stop(self) -> None:
        """Cancel every runner, timer and pending write, and close the HTTP client."""
        if not self._running:
            return
        self._running = False
        pending: list[asyncio.Task[None]] = list(self._tasks)
        for entry in self._scheduled.values():
            entry.cancel()
            if entry.task is not None:
                pending.append(entry.task)
        self._scheduled.clear()
        self._critical_since.clear()
        if self._reaper is not None:
            self._reaper.cancel()
            pending.append(self._reaper)
            self._reaper = None
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def ttl_update(self, check_id: str, status: str, output: str) -> None:
        """Set a TTL check's status and output and reset its timer (``/v1/agent/check/pass``
        and friends). Returns once the store has recorded it.

        Raises :class:`CatalogError` with Consul's status and text: 404 for an unknown check,
        500 for a check that is not a TTL check, 400 for a status Consul does not know.
        """
        node = self._store.node_name
        check = self._store.check(node, check_id)
        if check is None or not self._is_agent_check(check):
            # A catalog-registered check is not in the agent's local state: unknown to it.
            raise CatalogError(
                f'Unknown check ID "{check_id}". Ensure that the check ID is passed, not the check name.',
                404,
            )
        if check.type != "ttl":
            # Clients (Spring Cloud among them) match this text to decide to re-register.
            raise CatalogError(f'CheckID "{check_id}" does not have associated TTL', 500)
        if status not in STATUSES:
            raise CatalogError(f"Invalid check status: '{status}'", 400)
        output = truncate_ttl_output(output, output_limit(check.definition))
        entry = self._scheduled.get(check_id)
        if entry is not None and entry.definition == check.definition:
            # Reset first: the timer then measures from this update even if the write is slow,
            # and an expiry cannot fire between our write and a late reset.
            entry.last_output = output
            self._arm_ttl(check_id, entry)
        await self._store.set_check_status(node, check_id, status, output)

    async def reap(self) -> list[str]:
        """One reaper pass: deregister every service with a check that has been critical for
        longer than its ``DeregisterCriticalServiceAfter``. Returns the removed service IDs."""
        node = self._store.node_name
        now = self._clock()
        removed: list[str] = []
        for check_id, since in list(self._critical_since.items()):
            check = self._store.check(node, check_id)
            if check is None or check.status != CRITICAL or not check.service_id:
                self._critical_since.pop(check_id, None)
                continue
            after = self._deregister_after(check.definition)
            if now - since <= after or check.service_id in removed:
                continue
            log.info(
                "removing service %r: check %r has been critical for %s "
                "(DeregisterCriticalServiceAfter %s)",
                check.service_id, check_id, format_duration(round(now - since, 3)),
                format_duration(after),
            )
            try:
                await self._store.deregister_service(node, check.service_id)
            except CatalogError as e:
                # Deregistered by someone else since we looked; nothing left to do.
                log.debug("reaper: service %r already gone: %s", check.service_id, e)
            self._critical_since.pop(check_id, None)
            removed.append(check.service_id)
        return removed

    # -- following the store ------------------------------------------------------------

    def _on_check_change(self, before: Check | None, after: Check | None) -> None:
        """The store's check listener: called synchronously after each committed change."""
        if not self._running:
            return
        current = after if after is not None else before
        if current is None or current.node.lower() != self._store.node_name.lower():
            return
        check_id = current.check_id
        if after is None or not self._is_agent_check(after):
            entry = self._scheduled.pop(check_id, None)
            if entry is not None:
                entry.cancel()
            self._critical_since.pop(check_id, None)
            return
        self._track_critical(after)
        if (before is None or before.definition != after.definition
                or (check_id not in self._scheduled and self._runs(after.definition))):
            self._schedule(after)

    def _is_agent_check(self, check: Check) -> bool:
        return (check.node.lower() == self._store.node_name.lower()
                and self._store.check_source(check.node, check.check_id) in AGENT_SOURCES)

    def _runs(self, defn: CheckDefinition) -> bool:
        kind = defn.type
        return kind in ("ttl", "http", "tcp") or (kind == "script" and self._scripts)

    def _track_critical(self, check: Check) -> None:
        # Consul's local state keeps a CriticalTime per check: set when it turns critical
        # (including a check registered critical, the default), cleared by any other status.
        if (check.status == CRITICAL and check.service_id
                and check.definition.deregister_critical_service_after > 0):
            self._critical_since.setdefault(check.check_id, self._clock())
        else:
            self._critical_since.pop(check.check_id, None)

    def _schedule(self, check: Check) -> None:
        """(Re)start whatever runs *check*; a new definition starts from scratch, thresholds
        included, as Consul does when a check is re-registered with a different definition."""
        old = self._scheduled.pop(check.check_id, None)
        if old is not None:
            old.cancel()
        defn = check.definition
        if (defn.deregister_critical_service_after > 0
                and defn.deregister_critical_service_after < self._min_deregister_after):
            log.warning(
                "check %r has deregister interval below minimum of %s",
                check.check_id, format_duration(self._min_deregister_after),
            )
        kind = defn.type
        if kind == "ttl":
            entry = _Scheduled(defn)
            self._scheduled[check.check_id] = entry
            # A TTL check that is never updated expires one TTL after registration.
            self._arm_ttl(check.check_id, entry)
            return
        if self._runs(defn):
            if defn.interval < self._min_interval:
                log.warning(
                    "check %r has interval below minimum of %s",
                    check.check_id, format_duration(self._min_interval),
                )
            entry = _Scheduled(defn)
            entry.task = asyncio.create_task(
                self._run(check.check_id, defn), name=f"check:{check.check_id}"
            )
            self._scheduled[check.check_id] = entry
        # Other types (udp, grpc, disabled scripts, externally set checks) are not run here;
        # their status is whatever was registered or written through the API.

    # -- periodic checks ----------------------------------------------------------------

    async def _run(self, check_id: str, defn: CheckDefinition) -> None:
        interval = max(defn.interval, self._min_interval)
        thresholds = Thresholds.for_definition(defn)
        # Spread the first runs over one interval so that many checks registered together
        # (a restart, a config dir) do not probe in lockstep.
        await asyncio.sleep(random.uniform(0, interval))
        while True:
            status, output = await self._probe(check_id, defn)
            result = thresholds.update(status, output)
            if result is not None:
                await self._write(check_id, *result)
            # Measured from the end of the run, so a slow target never overlaps itself.
            await asyncio.sleep(interval)

    async def _probe(self, check_id: str, defn: CheckDefinition) -> tuple[str, str]:
        assert self._slots is not None and self._session is not None
        async with self._slots:
            try:
                if defn.http:
                    return await http_probe(defn, self._session)
                if defn.tcp:
                    return await tcp_probe(defn)
                return await script_probe(defn)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                # A bug in a probe must not kill the runner (the check would silently keep its
                # last status forever); record it as the failure it is.
                log.exception("check %r: probe failed unexpectedly", check_id)
                return CRITICAL, f"check failed: {type(e).__name__}: {e}"

    async def _write(self, check_id: str, status: str, output: str) -> None:
        try:
            await self._store.set_check_status(self._store.node_name, check_id, status, output)
        except asyncio.CancelledError:
            raise
        except CatalogError as e:
            # Typically the check was deregistered while its probe ran; the listener is
            # cancelling this runner. Storage errors also land here: the next run retries.
            log.debug("check %r: status not recorded: %s", check_id, e)
        except Exception:
            log.exception("check %r: status not recorded", check_id)

    # -- TTL checks ---------------------------------------------------------------------

    def _arm_ttl(self, check_id: str, entry: _Scheduled) -> None:
        if entry.timer is not None:
            entry.timer.cancel()
        if not self._running:
            entry.timer = None
            return
        loop = asyncio.get_running_loop()
        entry.timer = loop.call_later(entry.definition.ttl, self._ttl_expired, check_id, entry)

    def _ttl_expired(self, check_id: str, entry: _Scheduled) -> None:
        entry.timer = None
        if not self._running or self._scheduled.get(check_id) is not entry:
            return  # stale timer of a removed or redefined check
        if entry.last_output:
            output = f"TTL expired (last output before timeout follows): {entry.last_output}"
        else:
            output = "TTL expired"
        log.debug("check %r: TTL expired", check_id)
        # Not re-armed: the check stays critical until the next update, as in Consul.
        self._spawn(self._write(check_id, CRITICAL, output), f"ttl-expired:{check_id}")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- reaper -------------------------------------------------------------------------

    def _deregister_after(self, defn: CheckDefinition) -> float:
        # Consul raises values below check_deregister_interval_min (1 min) rather than refusing.
        return max(defn.deregister_critical_service_after, self._min_deregister_after)

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self._reap_interval)
            try:
                await self.reap()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("reaper pass failed; retrying in %s", format_duration(self._reap_interval))
