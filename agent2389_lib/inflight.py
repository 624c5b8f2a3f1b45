"""The tasks running now, and where each cancel goes (PROTOCOL.md 7): to the task running here
(its token stops what it is doing), after a task this agent forwarded (published to the agent
it went to), or kept for a task not seen yet. Every cancel is kept by task id, in memory and in
the completed-task store, so the task (or a redelivery of it after a crash) is answered
`canceled` and never run. One lock orders cancels against tasks starting and ending, so no
cancel falls between them."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional, Protocol

from .cancels import KEPT, Cancel, CancelError, KeptCancels, parse_cancel
from .dedupe import DedupeStore
from .events import CancelReceived, Events
from .logs import Throttle
from .taskscope import CancelToken

log = logging.getLogger("agent2389.cancels")

# where a cancel found its task
RUNNING, WAITING, FORWARDED, FINISHED, NOT_SEEN = "running", "waiting_approval", "forwarded", "finished", "not_seen"

Follow = Callable[[str, Cancel], None]  # the next agent's id, the cancel to publish to it


class Parked(Protocol):
    """The tasks waiting for a person (approvaldesk.ApprovalDesk)."""

    def waits(self, task_id: str) -> bool: ...

    def cancel_task(self, task_id: str, reason: str) -> bool: ...


class InFlight:
    def __init__(self, store: DedupeStore, keep_for: float, events: Events, follow: Follow = lambda agent, c: None,
                 clock: Callable[[], float] = time.time, capacity: int = KEPT, parked: Optional[Parked] = None):
        """`keep_for`: how long a cancel for a task not seen yet is kept (`task_timeout`);
        `follow` publishes a cancel to the agent a task went to; `clock` is the wall clock (a
        kept cancel's time survives a restart); `parked`: the tasks waiting for a person (a
        cancel ends the wait, and the task ends `canceled` when it resumes)."""
        self.store, self.keep_for, self.events, self.follow = store, keep_for, events, follow
        self.parked = parked
        self._clock = clock
        self._kept = KeptCancels(capacity, clock)
        for task_id, conversation_id, reason, until in store.kept_cancels(capacity):
            self._kept.keep(Cancel(task_id, conversation_id, reason or ""), until)
        self._running: dict[str, CancelToken] = {}
        self._lock = threading.Lock()
        self._malformed = Throttle()

    # -------------------------------------------------------------- tasks
    def start(self, task_id: str) -> CancelToken:
        """A task begins: its token, cancelled already when a cancel for it was kept."""
        token = CancelToken()
        with self._lock:
            self._running[task_id] = token
            kept = self._kept.get(task_id)
            if kept is not None:
                token.cancel(kept.reason)
        return token

    def end(self, task_id: str, token: CancelToken, forwarded_to: Optional[str]) -> None:
        """A task's outcome is published (`forwarded_to`: the agent it went to). A cancel that
        came while the forward was on its way follows it."""
        with self._lock:
            if self._running.get(task_id) is token:
                del self._running[task_id]
            followed = self._kept.get(task_id) if token.canceled and forwarded_to else None
        if followed is not None and forwarded_to:
            self._follow(forwarded_to, followed)

    # -------------------------------------------------------------- cancels
    def receive(self, topic: str, payload: bytes) -> None:
        """A cancel message (on the network thread); never raises."""
        try:
            cancel = parse_cancel(payload)
        except CancelError as exc:
            ignored = self._malformed.occurred()
            if ignored:
                log.warning("ignoring a malformed cancel on %s: %s (%d such since the last report)", topic, exc,
                            ignored)
            return
        self.cancel(cancel)

    def cancel(self, cancel: Cancel) -> str:
        """Act on a cancel; returns where it found its task."""
        with self._lock:
            token = self._running.get(cancel.task_id)
            waiting = token is None and self.parked is not None and self.parked.waits(cancel.task_id)
            finished, forwarded_to = self.store.finished(cancel.task_id) if token is None else (False, None)
            # for a task stopped here, as long as there is room (a redelivery after a crash may come late)
            until = None if token is not None else self._clock() + self.keep_for
            self._kept.keep(cancel, until)
            self.store.keep_cancel(cancel.task_id, cancel.conversation_id, cancel.reason, until)
            found = (RUNNING if token is not None else WAITING if waiting else FORWARDED if forwarded_to
                     else FINISHED if finished else NOT_SEEN)
            # said before acting on it, so whoever follows the cancel reads where it was found before how the
            # task ended (the `canceled` error of this agent, or of the next one)
            self.events.emit(CancelReceived(cancel.task_id, cancel.conversation_id or "", found, forwarded_to))
            if token is not None:
                token.cancel(cancel.reason)
            if (token is not None or waiting) and self.parked is not None:  # a parked task, or an MCP question
                self.parked.cancel_task(cancel.task_id, cancel.reason)
        why = f" ({cancel.reason})" if cancel.reason else ""
        if found in (RUNNING, WAITING):
            log.info("cancel for task %s%s: stopping it", cancel.task_id, why)
        elif forwarded_to:
            log.info("cancel for task %s%s: it was forwarded to %s; the cancel follows it", cancel.task_id, why,
                     forwarded_to)
            self._follow(forwarded_to, cancel)
        elif finished:
            log.info("cancel for task %s changes nothing: it has finished here", cancel.task_id)
        else:
            log.info("cancel for task %s: not seen here; kept for %.0f s in case it arrives", cancel.task_id,
                     self.keep_for)
        return found

    def _follow(self, agent_id: str, cancel: Cancel) -> None:
        try:
            self.follow(agent_id, cancel)
        except Exception as exc:  # not connected: the operator cancels again
            log.warning("could not pass the cancel of task %s on to %s: %s", cancel.task_id, agent_id, exc)
