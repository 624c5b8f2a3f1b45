"""The gateway's A2A tasks, in a SQLite file of its own: a gateway restarted between a client's
send and the agent's answer still knows the task, and a message id the client retries maps to
the task it already made (one publish)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from . import a2a
from ..protocol import utc_millis

_COLUMNS = ("id", "agent_id", "context_id", "conversation_id", "message_id", "state", "status", "artifacts",
            "history", "approval", "envelope", "published", "created", "updated")
_JSON = ("status", "artifacts", "history", "approval", "envelope")


@dataclass
class Task:
    id: str  # the A2A task id, also the agent2389 task_id
    agent_id: str
    context_id: str
    conversation_id: str
    message_id: str
    state: str
    status: dict  # A2A TaskStatus
    artifacts: list = field(default_factory=list)
    history: list = field(default_factory=list)  # the client's messages
    approval: Optional[dict] = None  # the agent's approval request while input is required
    envelope: dict = field(default_factory=dict)  # the agent2389 task it was published as
    published: bool = False  # the broker took it (a task a crash left unpublished is published at start)
    created: float = 0.0
    updated: float = 0.0

    @property
    def finished(self) -> bool:
        return self.state in a2a.TERMINAL

    def to_json(self, history_length: Optional[int] = None) -> dict:
        task: dict = {"id": self.id, "contextId": self.context_id, "status": self.status,
                      "metadata": {"agent_id": self.agent_id}}
        if self.artifacts:
            task["artifacts"] = self.artifacts
        history = self.history if history_length is None else self.history[-history_length:] if history_length else []
        if history:
            task["history"] = history
        return task


class TaskStore:
    def __init__(self, path: str, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # as the agent's store: a process crash loses nothing
            self._db.execute("CREATE TABLE IF NOT EXISTS tasks (id TEXT PRIMARY KEY, agent_id TEXT, context_id TEXT, "
                             "conversation_id TEXT, message_id TEXT, state TEXT, status TEXT, artifacts TEXT, "
                             "history TEXT, approval TEXT, envelope TEXT, published INTEGER, created REAL, "
                             "updated REAL, UNIQUE (agent_id, message_id))")
        except sqlite3.Error as exc:
            raise OSError(f"the gateway's task store {path} is unusable: {exc} (check that its directory is writable; "
                          f"move the file away if it is corrupt)") from None

    def create(self, task: Task) -> tuple[Task, bool]:
        """The task, or the one already made for its agent and message id (False: nothing new)."""
        task.created = task.updated = self._clock()
        with self._lock:
            cursor = self._db.execute(f"INSERT OR IGNORE INTO tasks ({', '.join(_COLUMNS)}) VALUES "
                                      f"({', '.join('?' * len(_COLUMNS))})", self._row(task))
            if cursor.rowcount:
                return task, True
            row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM tasks WHERE agent_id = ? AND message_id = ?",
                                   (task.agent_id, task.message_id)).fetchone()
        return self._task(row), False

    def get(self, task_id: str) -> Optional[Task]:
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return self._task(row) if row else None

    def move(self, task_id: str, state: str, message: Optional[dict] = None, artifacts: Optional[list] = None,
             approval: Optional[dict] = None, unless_finished: bool = True) -> Optional[Task]:
        """The task in `state` (with the agent's status message, artifacts, approval); None when
        there is no such task, or it is finished already (a late or repeated answer changes nothing)."""
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if row is None:
                return None
            task = self._task(row)
            if unless_finished and task.finished:
                return None
            task.state, task.updated = state, self._clock()
            task.status = a2a.status(state, utc_millis(task.updated), message)
            task.artifacts = artifacts if artifacts is not None else task.artifacts
            task.approval = approval
            self._db.execute("UPDATE tasks SET state = ?, status = ?, artifacts = ?, approval = ?, updated = ? "
                             "WHERE id = ?", (task.state, json.dumps(task.status), json.dumps(task.artifacts),
                                              json.dumps(task.approval), task.updated, task_id))
        return task

    def mark_published(self, task_id: str) -> None:
        with self._lock:
            self._db.execute("UPDATE tasks SET published = 1 WHERE id = ?", (task_id,))

    def unpublished(self) -> list[Task]:
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM tasks WHERE NOT published AND state = ?",
                                    (a2a.SUBMITTED,)).fetchall()
        return [self._task(row) for row in rows]

    def add_history(self, task_id: str, message: dict) -> None:
        with self._lock:
            row = self._db.execute("SELECT history FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if row is not None:
                self._db.execute("UPDATE tasks SET history = ? WHERE id = ?",
                                 (json.dumps(json.loads(row[0]) + [message]), task_id))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @staticmethod
    def _row(task: Task) -> tuple:
        values = {**vars(task), **{name: json.dumps(getattr(task, name)) for name in _JSON}}
        return tuple(values[name] for name in _COLUMNS)

    @staticmethod
    def _task(row: tuple) -> Task:
        values = dict(zip(_COLUMNS, row))
        for name in _JSON:
            values[name] = json.loads(values[name])
        values["published"] = bool(values["published"])
        return Task(**values)
