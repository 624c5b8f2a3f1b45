"""Where approvals wait for a person (PROTOCOL.md 9): the retained requests, the decisions as
they arrive, the clock that denies what nobody decided in time, and the MCP elicitations that a
call holds open. A parked task's record lives in the completed-task store; it moves from
`waiting` to `decided` once, so a decision counts once however often it is published, and
survives a restart. An elicitation lives in memory only: its MCP call cannot outlive the process."""

from __future__ import annotations

import heapq
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

from . import protocol
from .approvals import (ELICITATION, Decision, DecisionError, approval_id_of, approval_topic, content_problem,
                        new_approval_id, parse_decision, request_message)
from .dedupe import DedupeStore
from .events import ApprovalDecided, ApprovalRequired, Events
from .logs import Throttle

log = logging.getLogger("agent2389.approvals")

WAITING, DECIDED, RUNNING = "waiting", "decided", "running"  # a parked task's record, in that order
TIMEOUT, CANCELED_BY = "timeout", "cancel"  # who a denial is by when nobody decided

PublishRetained = Callable[[str, bytes, Optional[int]], object]  # topic, payload, Message Expiry Interval


@dataclass
class Resume:
    """A work item: the decided parked task `approval_id` goes on, on a worker."""

    approval_id: str


class _Question:
    """An MCP server's elicitation, waiting for a person on the call's thread."""

    __slots__ = ("schema", "asked_at", "answered", "result", "task_id")

    def __init__(self, schema: dict, asked_at: float, task_id: str):
        self.schema, self.asked_at, self.task_id = schema, asked_at, task_id
        self.answered = threading.Event()
        self.result: dict = {"action": "cancel"}


def outcome_of(decision: Decision) -> str:
    """How a decision is counted: approved, denied, timeout or canceled."""
    if decision.approve:
        return "approved"
    return {TIMEOUT: "timeout", CANCELED_BY: "canceled"}.get(decision.by, "denied")


class ApprovalDesk:
    def __init__(self, agent_id: str, store: DedupeStore, publish: PublishRetained, resume: Callable[[Resume], None],
                 events: Events, clock: Callable[[], float] = time.time, pool_member: bool = False):
        """`resume` hands a decided task to a worker; `clock` is the wall clock (a request's
        expiry is a moment, kept across a restart)."""
        self.agent_id, self.store, self.publish, self.resume, self.events = agent_id, store, publish, resume, events
        self._clock = clock
        self.pool_member = pool_member  # the other members' decisions arrive here too
        self._questions: dict[str, _Question] = {}
        self._due: list[tuple[float, str]] = []  # (until, approval id): the clock's heap
        self._lock = threading.Condition()
        self._clock_thread: Optional[threading.Thread] = None
        self._stopped = False
        self._malformed, self._unknown = Throttle(), Throttle()

    def pending(self) -> int:
        waiting = sum(1 for record in self.store.parked().values() if record["state"] == WAITING)
        with self._lock:
            return waiting + len(self._questions)

    # -------------------------------------------------------------- asking
    def ask(self, approval_id: str, request: dict, until: float) -> None:
        """Publish the retained request (it expires with the approval), say so in a progress
        event, and deny it at `until`."""
        expiry = max(1, math.ceil(until - self._clock()))
        self.publish(approval_topic(self.agent_id, approval_id), protocol.to_payload(request), expiry)
        self.events.emit(ApprovalRequired(request["task_id"], request["conversation_id"], approval_id,
                                          request["tool"]))
        self._deny_at(approval_id, until)

    def done(self, approval_id: str) -> None:
        """The decision was acted on: the store forgets it, the retained request is cleared."""
        self.store.unpark(approval_id)
        self.publish(approval_topic(self.agent_id, approval_id), b"", None)

    def elicit(self, server: str, tool: str, task: dict, message: str, schema: dict, until: float) -> dict:
        """An MCP server's question (`elicitation/create`, form mode) put to a person; blocks the
        calling thread until a decision, `until`, or shutdown. Returns the MCP result:
        accept with the content, decline (denied), or cancel (nobody decided)."""
        approval_id, now = new_approval_id(), self._clock()
        question = _Question(schema, now, task.get("task_id", ""))
        with self._lock:
            if self._stopped:
                return question.result
            self._questions[approval_id] = question
        request = request_message(approval_id, question.task_id, task.get("conversation_id", ""), ELICITATION, tool,
                                  None, protocol.utc_millis(now), protocol.utc_millis(until), message=message,
                                  schema=schema)
        log.info("MCP server %s asks a person (approval %s, task %s): %s", server, approval_id, question.task_id,
                 message[:200])
        try:
            self.ask(approval_id, request, until)
            question.answered.wait()
        finally:
            with self._lock:
                self._questions.pop(approval_id, None)
            self.publish(approval_topic(self.agent_id, approval_id), b"", None)
        return question.result

    # -------------------------------------------------------------- deciding
    def receive(self, topic: str, payload: bytes) -> None:
        """A decision message (on the intake's network thread); never raises."""
        approval_id = approval_id_of(topic)
        try:
            if approval_id is None:
                raise DecisionError("its topic names no approval id")
            decision = parse_decision(payload)
        except DecisionError as exc:
            ignored = self._malformed.occurred()
            if ignored:
                log.warning("ignoring a decision on %s: %s (%d such since the last report)", topic, exc, ignored)
            return
        if not self.decide(approval_id, decision) and not self.pool_member:
            ignored = self._unknown.occurred()
            if ignored:
                log.info("ignoring a decision for approval %s: it is not waiting here (unknown, or decided already; "
                         "%d such since the last report)", approval_id, ignored)

    def decide(self, approval_id: str, decision: Decision) -> bool:
        """Whether the approval was waiting here: the decision counted (the first one does), or its
        content was refused (logged; the approval still waits)."""
        with self._lock:
            question = self._questions.get(approval_id)
        if question is not None:
            return self._answer(approval_id, question, decision)
        record = self.store.advance(approval_id, WAITING, state=DECIDED, decision=asdict(decision))
        if record is None:
            return False
        self._decided(approval_id, decision, self._clock() - record["asked_at"], record["task_id"])
        self.resume(Resume(approval_id))
        return True

    def _answer(self, approval_id: str, question: _Question, decision: Decision) -> bool:
        if decision.approve:
            problem = content_problem(decision.content or {}, question.schema)
            if problem:
                log.warning("approval %s: the content does not match the schema the MCP server asked for (%s); not "
                            "sent to the server: decide again", approval_id, problem)
                return True
            result = {"action": "accept", "content": decision.content or {}}
        else:
            result = {"action": "decline" if outcome_of(decision) == "denied" else "cancel"}
        with self._lock:
            if self._questions.get(approval_id) is not question or question.answered.is_set():
                return False
            question.result = result
            question.answered.set()
        self._decided(approval_id, decision, self._clock() - question.asked_at, question.task_id)
        return True

    def _decided(self, approval_id: str, decision: Decision, waited: float, task_id: str) -> None:
        outcome = outcome_of(decision)
        self.events.emit(ApprovalDecided(approval_id, outcome, max(0.0, waited)))
        why = f": {decision.reason}" if decision.reason else ""
        log.info("approval %s (task %s) %s by %s%s after %.0f s", approval_id, task_id, outcome, decision.by, why,
                 waited)

    def waits(self, task_id: str) -> bool:
        """Whether `task_id` waits for a person here."""
        with self._lock:
            if any(question.task_id == task_id for question in self._questions.values()):
                return True
        return any(record["task_id"] == task_id and record["state"] == WAITING
                   for record in self.store.parked().values())

    def cancel_task(self, task_id: str, reason: str) -> bool:
        """A cancel for a task that waits for a person: its approval ends as a denial by `cancel`
        (the task then ends `canceled`, by the cancel its token keeps). Whether one was waiting."""
        denial = Decision(False, CANCELED_BY, reason or "the task was canceled")
        for approval_id, record in self.store.parked().items():
            if record["task_id"] == task_id and self.decide(approval_id, denial):
                return True
        with self._lock:
            asked = [approval_id for approval_id, question in self._questions.items() if question.task_id == task_id]
        for approval_id in asked:
            self.decide(approval_id, denial)
        return bool(asked)

    # -------------------------------------------------------------- the clock
    def _deny_at(self, approval_id: str, until: float) -> None:
        with self._lock:
            heapq.heappush(self._due, (until, approval_id))
            if self._clock_thread is None:
                self._clock_thread = threading.Thread(target=self._keep_time, name="approval-clock", daemon=True)
                self._clock_thread.start()
            self._lock.notify()

    def _keep_time(self) -> None:
        while True:
            with self._lock:
                while not self._stopped and (not self._due or self._due[0][0] > self._clock()):
                    self._lock.wait(min(60.0, self._due[0][0] - self._clock()) if self._due else None)
                if self._stopped:
                    return
                _, approval_id = heapq.heappop(self._due)
            self.expire(approval_id)

    def expire(self, approval_id: str) -> None:
        """`approval_timeout` (or the task's expiry) passed: a denial by `timeout`, unless decided."""
        self.decide(approval_id, Decision(False, TIMEOUT, "nobody decided in time"))

    # -------------------------------------------------------------- lifecycle
    def recover(self) -> None:
        """At startup: the store's parked tasks go on. Waiting ones wait again (denied at once if
        their time passed while the agent was down); decided ones, and ones that were running
        when the agent stopped, resume."""
        for approval_id, record in self.store.parked().items():
            if record["state"] == WAITING:
                self._deny_at(approval_id, record["until"])
                continue
            if record["state"] == RUNNING:
                self.store.advance(approval_id, RUNNING, state=DECIDED)
            log.info("task %s resumes after approval %s was decided", record["task_id"], approval_id)
            self.resume(Resume(approval_id))

    def stop(self) -> None:
        """Open elicitations end as `cancel`; the clock stops (the store keeps the rest)."""
        with self._lock:
            self._stopped = True
            for question in self._questions.values():
                question.answered.set()
            self._lock.notify()

