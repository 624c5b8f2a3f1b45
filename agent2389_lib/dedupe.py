"""Idempotency: which task keys are in flight and which are completed.

A key is the agent id, the task id and a digest of the canonical envelope (protocol.task_key):
a redelivery is the same envelope, a pipeline revisiting this agent is not.

Completed keys live in a bounded LRU; with a state directory they are also kept in sqlite
(WAL, synchronous=NORMAL: survives a killed process) so a restart still recognizes them. The
store is locked (flock) so a second process of the same agent cannot use it at the same time.
A failed write never blocks an acknowledgement: the key stays remembered in memory and the
store reports itself degraded.

It also remembers, by task id, whether a task finished here and the agent it was forwarded to,
and the cancels kept for tasks (PROTOCOL.md 7), so a cancel follows a forwarded task and a task
redelivered after a crash is answered `canceled` (cancels.py decides; this stores).

Release 0.1 kept completed task ids (no agent id, no digest) in `completed_tasks.sqlite3`; when
that file is there, its ids are read once (never written) so redeliveries right after the
upgrade are still recognized.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pathlib
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Optional

from .errors import StartupError
from .logs import Throttle

if TYPE_CHECKING:
    import sqlite3

log = logging.getLogger("agent2389.dedupe")

NEW = "new"
IN_FLIGHT = "in_flight"
COMPLETED = "completed"
_PRUNE_EVERY = 256
LEGACY_STORE = "completed_tasks.sqlite3"  # release 0.1's


class StoreError(StartupError):
    """The completed-task store cannot be opened; the message names `state_dir` and what to do."""


class DedupeStore:
    def __init__(self, capacity: int = 10000, state_dir: Optional[str] = None, agent_id: str = "agent"):
        self.capacity = capacity
        self._lock = threading.Lock()
        self._db_lock = threading.Lock()
        self._in_flight: dict[str, list[Any]] = {}
        self._completed: OrderedDict[str, None] = OrderedDict()
        self._finished: OrderedDict[str, Optional[str]] = OrderedDict()  # task id: the agent it went to, if any
        self._parked: dict[str, dict] = {}  # approval id: a task waiting for a person, or resuming (PROTOCOL.md 9)
        self._legacy_ids: frozenset = frozenset()  # task ids release 0.1 completed
        self._db: Optional[sqlite3.Connection] = None  # sqlite3 is imported with a state_dir only (1 MB)
        self._lock_fd: Optional[int] = None
        self._inserts = 0
        self._write_error: Optional[str] = None
        self._write_errors = Throttle()  # one ERROR line a minute
        if state_dir:
            self._open(state_dir, agent_id)

    # -------------------------------------------------------------- opening
    def _open(self, state_dir: str, agent_id: str) -> None:
        if os.path.exists(state_dir) and not os.path.isdir(state_dir):
            raise StoreError(f"state_dir {state_dir!r} is not a directory (point state_dir / STATE_DIR at a directory)")
        try:
            os.makedirs(state_dir, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"state_dir {state_dir!r} cannot be created: {exc.strerror} "
                             f"(point state_dir / STATE_DIR at a writable directory)") from None
        self._lock_fd = _lock_store(state_dir, agent_id)
        import sqlite3
        path = os.path.join(state_dir, f"{agent_id}.completed.sqlite3")
        try:
            db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("CREATE TABLE IF NOT EXISTS completed (seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT UNIQUE)")
            columns = {row[1] for row in db.execute("PRAGMA table_info(completed)")}
            for column in ("task_id", "forwarded_to"):  # added by the release with cancels
                if column not in columns:
                    db.execute(f"ALTER TABLE completed ADD COLUMN {column} TEXT")
            db.execute("CREATE TABLE IF NOT EXISTS cancels (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
                       "task_id TEXT UNIQUE, conversation_id TEXT, reason TEXT, until REAL)")
            db.execute("CREATE TABLE IF NOT EXISTS parked (approval_id TEXT PRIMARY KEY, record TEXT)")
            parked = db.execute("SELECT approval_id, record FROM parked").fetchall()
            rows = db.execute("SELECT key, task_id, forwarded_to FROM completed ORDER BY seq DESC LIMIT ?",
                              (self.capacity,)).fetchall()
        except sqlite3.Error as exc:
            self.close()
            raise StoreError(f"the completed-task store {path} in state_dir is unusable: {exc} (check that the "
                             f"directory is writable; move the file away if it is corrupt)") from None
        self._parked = {approval_id: json.loads(record) for approval_id, record in parked}
        for key, task_id, forwarded_to in reversed(rows):
            self._completed[key] = None
            if task_id:
                self._finished[task_id] = forwarded_to
        self._db = db
        self._legacy_ids = self._read_legacy(os.path.join(state_dir, LEGACY_STORE))

    def _read_legacy(self, path: str) -> frozenset:
        if not os.path.isfile(path):
            return frozenset()
        import sqlite3
        try:
            db = sqlite3.connect(f"{pathlib.Path(path).resolve().as_uri()}?mode=ro", uri=True)
            try:
                rows = db.execute("SELECT task_id FROM completed ORDER BY seq DESC LIMIT ?",
                                  (self.capacity,)).fetchall()
            finally:
                db.close()
        except sqlite3.Error as exc:
            log.warning("the completed-task store of release 0.1 (%s) cannot be read (%s); tasks it completed may be "
                        "answered again if redelivered", path, exc)
            return frozenset()
        log.info("read %d completed task ids from the release 0.1 store %s", len(rows), path)
        return frozenset(row[0] for row in rows if isinstance(row[0], str) and row[0])

    # -------------------------------------------------------------- claims
    def begin(self, key: str, ack_handle: Any, task_id: str = "") -> str:
        """Claim a task. For duplicates of an in-flight task the handle is kept and returned by
        `finish`, so the duplicate is acknowledged together with the original."""
        with self._lock:
            if key in self._completed or task_id in self._legacy_ids:
                return COMPLETED
            if key in self._in_flight:
                if ack_handle not in self._in_flight[key]:  # a redelivery of the same message is equal
                    self._in_flight[key].append(ack_handle)
                return IN_FLIGHT
            self._in_flight[key] = [ack_handle]
            return NEW

    def finish(self, key: str, completed: bool, task_id: str = "", forwarded_to: Optional[str] = None) -> list[Any]:
        """End a claim; remember the key as completed when its outcome was published (and the
        agent the task was forwarded to, if it was). Returns every ack handle collected for it.
        Never raises: a failed write is logged and the key stays remembered in memory."""
        with self._lock:
            handles = self._in_flight.pop(key, [])
            if completed:
                _remember(self._completed, key, None, self.capacity)
                if task_id:
                    _remember(self._finished, task_id, forwarded_to, self.capacity)
        if completed:
            self._write("INSERT OR REPLACE INTO completed (key, task_id, forwarded_to) VALUES (?, ?, ?)",
                        (key, task_id or None, forwarded_to), "completed")
        return handles

    def finished(self, task_id: str) -> tuple[bool, Optional[str]]:
        """Whether a task finished here, and the agent it was forwarded to (None if it was not)."""
        with self._lock:
            if task_id in self._finished:
                return True, self._finished[task_id]
            return task_id in self._legacy_ids, None

    # -------------------------------------------------------------- cancels
    def keep_cancel(self, task_id: str, conversation_id: Optional[str], reason: str, until: Optional[float]) -> None:
        """Keep a cancel across a restart (`until`: Unix time, None for as long as there is room)."""
        self._write("INSERT OR REPLACE INTO cancels (task_id, conversation_id, reason, until) VALUES (?, ?, ?, ?)",
                    (task_id, conversation_id, reason, until), "cancels")

    # -------------------------------------------------------------- parked tasks
    def park(self, approval_id: str, record: dict, replacing: Optional[str] = None) -> None:
        """A task waits for a person: the store owns it now (its delivery is acknowledged). A
        resumed task that parks again `replacing` its earlier approval: both in one write, so a
        crash leaves one of them."""
        with self._lock:
            self._parked[approval_id] = record
            if replacing is not None:
                self._parked.pop(replacing, None)
        statements: list[tuple[str, tuple]] = [("INSERT OR REPLACE INTO parked (approval_id, record) VALUES (?, ?)",
                       (approval_id, json.dumps(record)))]
        if replacing is not None:
            statements.append(("DELETE FROM parked WHERE approval_id = ?", (replacing,)))
        self._write_parked(statements)

    def parked(self) -> dict[str, dict]:
        with self._lock:
            return dict(self._parked)

    def advance(self, approval_id: str, expected: str, **changes: Any) -> Optional[dict]:
        """Move a parked task on from state `expected` (once: a second decision finds it moved);
        the record as it is now, or None."""
        with self._lock:
            record = self._parked.get(approval_id)
            if record is None or record["state"] != expected:
                return None
            record = self._parked[approval_id] = {**record, **changes}
        self._write_parked([("UPDATE parked SET record = ? WHERE approval_id = ?", (json.dumps(record), approval_id))])
        return record

    def unpark(self, approval_id: str) -> None:
        with self._lock:
            self._parked.pop(approval_id, None)
        self._write_parked([("DELETE FROM parked WHERE approval_id = ?", (approval_id,))])

    def _write_parked(self, statements: list) -> None:
        """In one transaction."""
        with self._db_lock:
            if self._db is None:
                return
            import sqlite3
            try:
                with self._db:
                    self._db.execute("BEGIN")
                    for statement, values in statements:
                        self._db.execute(statement, values)
            except sqlite3.Error as exc:
                self._write_failed(exc)

    def kept_cancels(self, limit: int) -> list[tuple[str, Optional[str], str, Optional[float]]]:
        """The newest `limit` cancels kept, oldest first: (task_id, conversation_id, reason, until)."""
        with self._db_lock:
            if self._db is None:
                return []
            import sqlite3
            try:
                rows = self._db.execute("SELECT task_id, conversation_id, reason, until FROM cancels "
                                        "ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
            except sqlite3.Error as exc:
                self._write_failed(exc)
                return []
        return list(reversed(rows))

    def _write(self, statement: str, values: tuple, table: str) -> None:
        """One row, and every few hundred rows the oldest beyond `capacity` pruned."""
        with self._db_lock:
            if self._db is None:
                return
            import sqlite3
            try:
                self._db.execute(statement, values)
                self._inserts += 1
                if self._inserts % _PRUNE_EVERY == 0:
                    self._db.execute(f"DELETE FROM {table} WHERE seq <= (SELECT MAX(seq) FROM {table}) - ?",
                                     (self.capacity,))
                self._write_error = None
            except sqlite3.Error as exc:
                self._write_failed(exc)

    def _write_failed(self, exc: sqlite3.Error) -> None:
        self._write_error = f"completed-task store write failed: {exc}"
        failures = self._write_errors.occurred()
        if failures:
            log.error("%s (%d time(s) since the last report); completed tasks are remembered in memory only until "
                      "it recovers, so a restart may answer them again (free disk space in state_dir)",
                      self._write_error, failures)

    @property
    def degraded(self) -> Optional[str]:
        """Why completed tasks are not being persisted, or None while all is well."""
        return self._write_error

    def close(self) -> None:
        with self._db_lock:
            if self._db is not None:
                self._db.close()
                self._db = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None


def _remember(table: OrderedDict, key: str, value: Any, capacity: int) -> None:
    """The newest `capacity` entries."""
    table[key] = value
    table.move_to_end(key)
    while len(table) > capacity:
        table.popitem(last=False)


def _lock_store(state_dir: str, agent_id: str) -> int:
    """An exclusive flock on `{agent_id}.lock`, holding our pid; StoreError when taken or unwritable."""
    path = os.path.join(state_dir, f"{agent_id}.lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreError(f"state_dir {state_dir!r} is not writable: {exc.strerror} "
                         f"(point state_dir / STATE_DIR at a writable directory)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise StoreError(f"state_dir {state_dir!r} is in use by another process of agent {agent_id} (pid {holder}); "
                         f"stop it, or give this instance its own state_dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
