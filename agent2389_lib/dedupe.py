"""Idempotency: which task ids are in flight and which are completed.

Completed ids live in a bounded LRU; with a state directory they are also kept in sqlite
(WAL, synchronous=NORMAL: survives a killed process) so a restart still recognizes them.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections import OrderedDict
from typing import Any, Optional

NEW = "new"
IN_FLIGHT = "in_flight"
COMPLETED = "completed"
_PRUNE_EVERY = 256


class DedupeStore:
    def __init__(self, capacity: int = 10000, state_dir: Optional[str] = None):
        self.capacity = capacity
        self._lock = threading.Lock()
        self._in_flight: dict[str, list[Any]] = {}
        self._completed: OrderedDict[str, None] = OrderedDict()
        self._db: Optional[sqlite3.Connection] = None
        self._inserts = 0
        if state_dir:
            self._open(state_dir)

    def _open(self, state_dir: str) -> None:
        os.makedirs(state_dir, exist_ok=True)
        db = sqlite3.connect(os.path.join(state_dir, "completed_tasks.sqlite3"), check_same_thread=False,
                             isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("CREATE TABLE IF NOT EXISTS completed (seq INTEGER PRIMARY KEY AUTOINCREMENT, task_id TEXT UNIQUE)")
        rows = db.execute("SELECT task_id FROM completed ORDER BY seq DESC LIMIT ?", (self.capacity,)).fetchall()
        for (task_id,) in reversed(rows):
            self._completed[task_id] = None
        self._db = db

    def begin(self, task_id: str, ack_handle: Any) -> str:
        """Claim a task. For duplicates of an in-flight task the handle is kept and returned by
        `finish`, so the duplicate is acknowledged together with the original."""
        with self._lock:
            if task_id in self._completed:
                return COMPLETED
            if task_id in self._in_flight:
                if ack_handle not in self._in_flight[task_id]:  # a redelivery of the same message is equal
                    self._in_flight[task_id].append(ack_handle)
                return IN_FLIGHT
            self._in_flight[task_id] = [ack_handle]
            return NEW

    def finish(self, task_id: str, completed: bool) -> list[Any]:
        """End a claim; record the id as completed when its outcome was published.
        Returns every ack handle collected for it."""
        with self._lock:
            handles = self._in_flight.pop(task_id, [])
            if completed:
                self._remember(task_id)
        return handles

    def _remember(self, task_id: str) -> None:
        self._completed[task_id] = None
        self._completed.move_to_end(task_id)
        while len(self._completed) > self.capacity:
            self._completed.popitem(last=False)
        if self._db is not None:
            self._db.execute("INSERT OR REPLACE INTO completed (task_id) VALUES (?)", (task_id,))
            self._inserts += 1
            if self._inserts % _PRUNE_EVERY == 0:
                self._db.execute("DELETE FROM completed WHERE seq <= (SELECT MAX(seq) FROM completed) - ?",
                                 (self.capacity,))

    def in_flight_count(self) -> int:
        with self._lock:
            return len(self._in_flight)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
