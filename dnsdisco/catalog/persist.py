"""Durable storage of the embedded catalog: SQLite in the data dir, one writer thread.

This module owns the file format and the commit path. :class:`Journal` loads what a previous run
committed and then accepts batches of row changes from the store; a single writer thread runs
them in order, grouping whatever has queued up into one transaction (group commit), so concurrent
writes share one fsync and the event loop never waits on the disk. The database runs in WAL mode
with ``synchronous=FULL``: a commit returns only after the WAL is fsynced, which is what lets the
HTTP layer answer 200 only for writes that survive ``kill -9`` or a power cut.

What is stored is the store's business (it says which rows are durable); how is ours: nodes,
services and checks as JSON text, KV values as BLOBs, and the catalog index in ``meta``. Nothing
here knows about HTTP or the event loop beyond handing a completion callback back to it.

When the disk refuses a write (full, read-only, permissions, I/O error) the batch fails with a
:class:`StorageError` that names the data dir and the OS error, found by :func:`diagnose`
(SQLite itself only says "database or disk is full" or "disk I/O error"). The writer thread
lives on: the next batch tries again, so writes succeed once space or permissions come back,
without a restart. The change into and out of that state is logged once each, not per request,
and :attr:`Journal.failing` says what is wrong meanwhile (``/ready`` shows it).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from dnsdisco.catalog.model import (
    Check,
    CheckDefinition,
    KVEntry,
    Node,
    Service,
    TaggedAddress,
    Weights,
)
from dnsdisco.errors import StorageError

log = logging.getLogger("dnsdisco.catalog.persist")

DB_NAME = "catalog.db"
SCHEMA_VERSION = "1"
# Only our own writer thread writes; a lock held longer than this means someone else has the
# file open for writing, and the write fails (500) rather than hanging the client.
BUSY_TIMEOUT_MS = 2000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (name TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS services (node TEXT NOT NULL, id TEXT NOT NULL, source TEXT NOT NULL,
    data TEXT NOT NULL, PRIMARY KEY (node, id));
CREATE TABLE IF NOT EXISTS checks (node TEXT NOT NULL, id TEXT NOT NULL, source TEXT NOT NULL,
    data TEXT NOT NULL, PRIMARY KEY (node, id));
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL, data TEXT NOT NULL);
"""

# One row change: (table, key, value). table is "node", "service", "check" or "kv"; key is the
# node name, (node, id) or the KV key; value is None for a delete, else a Node, (Service,
# source), (Check, source) or KVEntry.
Write = tuple[str, Any, Any]


def diagnose(data_dir: str, db_path: str) -> str:
    """Why the data dir refuses writes, in the OS's words (``"No space left on device"``), or
    ``""`` when every probe succeeds. Blocking: it opens the database files for writing and
    writes, fsyncs and removes a 4 KiB probe file, which is what SQLite needed to do."""
    for path in (db_path, db_path + "-wal"):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:
            continue
        except OSError as e:
            return f"{path}: {_os_text(e)}"
        os.close(fd)
    probe = os.path.join(data_dir, ".dnsdisco-write-probe")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, bytes(4096))
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        return _os_text(e)
    try:
        st = os.statvfs(data_dir)
    except OSError as e:
        return _os_text(e)
    if st.f_flag & os.ST_RDONLY:
        return os.strerror(errno.EROFS)
    if st.f_bavail * st.f_frsize < 64 * 1024:
        # The probe fit, SQLite's pages did not (or root's reserved blocks are all that's left).
        return f"{os.strerror(errno.ENOSPC)} ({st.f_bavail * st.f_frsize} bytes free)"
    return ""


def _os_text(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)


# -- JSON forms of the model (our own file format, not Consul's wire format) -------------------


def _node_to(n: Node) -> dict[str, Any]:
    return {"name": n.name, "address": n.address, "datacenter": n.datacenter, "id": n.id,
            "tagged_addresses": dict(n.tagged_addresses), "meta": dict(n.meta),
            "create_index": n.create_index, "modify_index": n.modify_index}


def _node_from(d: dict[str, Any]) -> Node:
    return Node(name=d["name"], address=d["address"], datacenter=d["datacenter"], id=d["id"],
                tagged_addresses=d["tagged_addresses"], meta=d["meta"],
                create_index=d["create_index"], modify_index=d["modify_index"])


def _service_to(s: Service) -> dict[str, Any]:
    return {"node": s.node, "id": s.id, "name": s.name, "tags": list(s.tags), "address": s.address,
            "port": s.port,
            "tagged_addresses": {k: [v.address, v.port] for k, v in s.tagged_addresses.items()},
            "meta": dict(s.meta), "weights": [s.weights.passing, s.weights.warning], "kind": s.kind,
            "enable_tag_override": s.enable_tag_override, "socket_path": s.socket_path,
            "create_index": s.create_index, "modify_index": s.modify_index}


def _service_from(d: dict[str, Any]) -> Service:
    return Service(node=d["node"], id=d["id"], name=d["name"], tags=tuple(d["tags"]), address=d["address"],
                   port=d["port"],
                   tagged_addresses={k: TaggedAddress(v[0], v[1]) for k, v in d["tagged_addresses"].items()},
                   meta=d["meta"], weights=Weights(*d["weights"]), kind=d["kind"],
                   enable_tag_override=d["enable_tag_override"], socket_path=d["socket_path"],
                   create_index=d["create_index"], modify_index=d["modify_index"])


def _definition_to(c: CheckDefinition) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(CheckDefinition):
        name = f.name
        value = getattr(c, name)
        if name == "header":
            value = {k: list(v) for k, v in value.items()}
        elif name == "script_args":
            value = list(value)
        if value != getattr(_EMPTY_DEFINITION, name):
            out[name] = value
    return out


_EMPTY_DEFINITION = CheckDefinition()


def _definition_from(d: dict[str, Any]) -> CheckDefinition:
    kw = dict(d)
    if "header" in kw:
        kw["header"] = {k: tuple(v) for k, v in kw["header"].items()}
    if "script_args" in kw:
        kw["script_args"] = tuple(kw["script_args"])
    return CheckDefinition(**kw)


def _check_to(c: Check) -> dict[str, Any]:
    return {"node": c.node, "check_id": c.check_id, "name": c.name, "status": c.status, "notes": c.notes,
            "output": c.output, "service_id": c.service_id, "service_name": c.service_name,
            "service_tags": list(c.service_tags), "definition": _definition_to(c.definition),
            "create_index": c.create_index, "modify_index": c.modify_index}


def _check_from(d: dict[str, Any]) -> Check:
    return Check(node=d["node"], check_id=d["check_id"], name=d["name"], status=d["status"], notes=d["notes"],
                 output=d["output"], service_id=d["service_id"], service_name=d["service_name"],
                 service_tags=tuple(d["service_tags"]), definition=_definition_from(d["definition"]),
                 create_index=d["create_index"], modify_index=d["modify_index"])


def _kv_to(e: KVEntry) -> str:
    # flags is a uint64, beyond SQLite's signed INTEGER: kept in the JSON text.
    return json.dumps({"flags": e.flags, "lock_index": e.lock_index, "session": e.session,
                       "create_index": e.create_index, "modify_index": e.modify_index})


def _kv_from(key: str, value: bytes, data: str) -> KVEntry:
    d = json.loads(data)
    return KVEntry(key=key, value=bytes(value), flags=d["flags"], lock_index=d["lock_index"],
                   session=d["session"], create_index=d["create_index"], modify_index=d["modify_index"])


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


@dataclass(slots=True)
class Loaded:
    """What a previous run committed. ``services``/``checks`` carry their source."""

    index: int = 0
    node_id: str = ""
    nodes: list[Node] = field(default_factory=list)
    services: list[tuple[Service, str]] = field(default_factory=list)
    checks: list[tuple[Check, str]] = field(default_factory=list)
    kv: list[KVEntry] = field(default_factory=list)


@dataclass(slots=True)
class _Job:
    writes: Sequence[Write]
    index: int
    epoch: int
    done: Callable[[BaseException | None], None]


class Journal:
    """The catalog's SQLite file in *data_dir* and the thread that writes it.

    Use: ``loaded = journal.open()`` (blocking; call it from a thread), then ``submit(...)``
    from the event loop, and ``close()`` at the end. A batch whose transaction fails is reported
    to its ``done`` callback with a :class:`StorageError`, and so is every batch of the same or
    an older *epoch* still queued behind it: those were computed on top of the failed one. The
    store moves to a new epoch when it learns of the failure.
    """

    def __init__(self, data_dir: str, *, persistent_sources: frozenset[str]) -> None:
        self.path = os.path.join(data_dir, DB_NAME)
        self._data_dir = data_dir
        self._persistent = persistent_sources
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._dead_epoch = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        # Set by the writer thread while writes fail (read by the event loop: one reference
        # assignment, atomic under the GIL); None when the last transaction committed.
        self.failing: str | None = None
        self.failing_since: float | None = None  # time.time() of the first failure in a row
        self._failed_batches = 0

    # -- lifecycle ----------------------------------------------------------------------------

    def open(self) -> Loaded:
        """Create or open the database and read everything in it. Blocking."""
        try:
            return self._open()
        except BaseException:
            # Not left open on failure: it may hold the EXCLUSIVE lock, and a retry in this
            # process (or another agent) would then find the database locked.
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            raise

    def _open(self) -> Loaded:
        try:
            os.makedirs(self._data_dir, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._conn = conn
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            # EXCLUSIVE before WAL: SQLite then keeps the WAL index in this process's heap
            # instead of a mmap'd -shm file. A write to that mapping on a filesystem gone
            # read-only (or a file made immutable) is a SIGBUS that kills the whole agent, where
            # a failed write() is a 500 for one request. It also keeps a second agent off the
            # same data dir (it fails to open with "database is locked").
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: every commit fsyncs the WAL, so a committed write survives a power cut, not
            # only a crash of this process (NORMAL would only survive the latter).
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            schema = conn.execute("SELECT value FROM meta WHERE name='schema'").fetchone()[0]
            if schema != SCHEMA_VERSION:
                raise StorageError(f"{self.path}: unknown catalog schema version {schema!r}")
            loaded = self._load(conn)
        except sqlite3.Error as e:
            why = diagnose(self._data_dir, self.path)
            if not why and getattr(e, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY:
                why = "another process holds the catalog database (a second agent on this data_dir?)"
            raise StorageError(f"data_dir {self._data_dir} is not usable: "
                               f"{why + ' (SQLite: ' + str(e) + ')' if why else e} "
                               f"(database {self.path})") from e
        except FileExistsError as e:
            raise StorageError(f"data_dir {self._data_dir} is not usable: it is not a directory") from e
        except OSError as e:
            where = f"{e.filename}: " if e.filename and e.filename != self._data_dir else ""
            raise StorageError(f"data_dir {self._data_dir} is not usable: {where}{_os_text(e)}") from e
        self._conn = conn
        return loaded

    def _load(self, conn: sqlite3.Connection) -> Loaded:
        out = Loaded()
        for name, value in conn.execute("SELECT name, value FROM meta"):
            if name == "index":
                out.index = int(value)
            elif name == "node_id":
                out.node_id = value
        out.nodes = [_node_from(json.loads(d)) for (d,) in conn.execute("SELECT data FROM nodes")]
        out.services = [(_service_from(json.loads(d)), src)
                        for d, src in conn.execute("SELECT data, source FROM services")]
        out.checks = [(_check_from(json.loads(d)), src) for d, src in conn.execute("SELECT data, source FROM checks")]
        out.kv = [_kv_from(k, v, d) for k, v, d in conn.execute("SELECT key, value, data FROM kv")]
        return out

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the writer thread; completions are delivered on *loop*."""
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="dnsdisco-catalog-writer", daemon=True)
        self._thread.start()

    def set_meta(self, name: str, value: str) -> None:
        """Write one meta value at once (before :meth:`start`; used for the node ID)."""
        assert self._conn is not None and self._thread is None
        try:
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))
        except sqlite3.Error as e:
            why = diagnose(self._data_dir, self.path) or str(e)
            raise StorageError(f"data_dir {self._data_dir} is not writable: {why} "
                               f"(database {self.path})") from e

    def close(self) -> None:
        """Finish the queued batches, stop the thread and close the file. Blocking."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- writing ------------------------------------------------------------------------------

    def submit(self, writes: Sequence[Write], index: int, epoch: int,
               done: Callable[[BaseException | None], None]) -> None:
        """Queue *writes* (committed with the catalog *index*); *done* runs on the loop after."""
        self._queue.put(_Job(writes, index, epoch, done))

    def _run(self) -> None:
        stopping = False
        while not stopping:
            job = self._queue.get()
            if job is None:
                break
            batch = [job]
            # Group commit: everything that queued up while the last fsync ran goes in one
            # transaction. Order is kept, and each batch still reports on its own.
            while True:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                batch.append(nxt)
            try:
                self._commit(batch)
            except Exception as e:
                # The thread must outlive any one batch: if it died, every later write would
                # wait forever instead of failing (and succeeding again once the disk is back).
                log.exception("catalog writer: unexpected error")
                self._dead_epoch = max(self._dead_epoch, *(j.epoch for j in batch))
                err = StorageError(f"catalog write failed, nothing was changed: {e}")
                for job in batch:
                    try:
                        self._loop.call_soon_threadsafe(job.done, err)  # type: ignore[union-attr]
                    except RuntimeError:
                        pass

    def _commit(self, batch: list[_Job]) -> None:
        assert self._conn is not None and self._loop is not None
        errors: dict[int, BaseException] = {}
        live: list[_Job] = []
        for job in batch:
            if job.epoch <= self._dead_epoch:
                why = f": {self.failing}" if self.failing else ""
                errors[id(job)] = StorageError(f"catalog write failed, nothing was changed: it was queued "
                                               f"behind a write that failed{why}")
            else:
                live.append(job)
        if live:
            conn = self._conn
            try:
                if conn.in_transaction:  # a ROLLBACK after an I/O error can itself fail
                    conn.execute("ROLLBACK")
                conn.execute("BEGIN IMMEDIATE")
                for job in live:
                    for write in job.writes:
                        self._apply(conn, write)
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('index', ?)", (str(live[-1].index),))
                conn.execute("COMMIT")
            except (sqlite3.Error, OSError, ValueError, TypeError) as e:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                self._dead_epoch = max(j.epoch for j in live)
                why = self._failed(e)
                err = StorageError(f"catalog write failed, nothing was changed: {why}")
                errors.update((id(j), err) for j in live)
            else:
                if self.failing is not None:
                    log.warning("catalog writes succeed again in data_dir %s after %d failed batches "
                                "over %.1fs", self._data_dir, self._failed_batches,
                                time.time() - (self.failing_since or time.time()))
                    self.failing = self.failing_since = None
                    self._failed_batches = 0
        # Report in queue order: the store applies committed batches in the order it made them.
        for job in batch:
            try:
                self._loop.call_soon_threadsafe(job.done, errors.get(id(job)))
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def _failed(self, e: BaseException) -> str:
        """Record a failed transaction; returns what to tell the client. Logs only when the
        journal starts failing or the reason changes: a full disk under a stream of writes
        must not turn into a log line per request."""
        why = ""
        if isinstance(e, (sqlite3.Error, OSError)):
            try:
                why = diagnose(self._data_dir, self.path)
            except Exception:  # a probe must never be what kills the writer thread
                why = ""
        text = f"data_dir {self._data_dir}: {why} (SQLite: {e})" if why else \
            f"data_dir {self._data_dir}: {e} (database {self.path})"
        self._failed_batches += 1
        if self.failing is None:
            self.failing_since = time.time()
            log.error("catalog writes are failing and get HTTP 500 until this is fixed; reads and "
                      "DNS answer from the last committed state: %s", text)
        elif why and why not in self.failing:
            log.error("catalog writes are still failing, now: %s", text)
        self.failing = text
        return text

    def _apply(self, conn: sqlite3.Connection, write: Write) -> None:
        table, key, value = write
        if table == "node":
            if value is None:
                conn.execute("DELETE FROM nodes WHERE name=?", (key,))
            else:
                conn.execute("INSERT OR REPLACE INTO nodes VALUES (?, ?)", (key, _dumps(_node_to(value))))
        elif table in ("service", "check"):
            sql_table = "services" if table == "service" else "checks"
            # A row whose source is not durable (config files) is removed from the file: it may
            # replace a row that was durable before (a config definition wins over the API).
            if value is None or value[1] not in self._persistent:
                conn.execute(f"DELETE FROM {sql_table} WHERE node=? AND id=?", key)
            else:
                obj, source = value
                data = _service_to(obj) if table == "service" else _check_to(obj)
                conn.execute(f"INSERT OR REPLACE INTO {sql_table} VALUES (?, ?, ?, ?)",
                             (key[0], key[1], source, _dumps(data)))
        elif table == "kv":
            if value is None:
                conn.execute("DELETE FROM kv WHERE key=?", (key,))
            else:
                conn.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?)", (key, value.value, _kv_to(value)))
        else:
            raise ValueError(f"unknown table {table!r}")
