"""The nine steps of one task (PROTOCOL.md 3): checks, dedupe, depth, think, publish, ack.

An incoming message is acknowledged only after its outcome (response, forward or error)
was acknowledged by the broker and its id recorded as completed, so a crash anywhere
loses nothing: the broker redelivers and the dedupe store recognizes what was done.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, Callable, Optional, Protocol

from . import protocol
from .config import AgentConfig
from .dedupe import COMPLETED, IN_FLIGHT, DedupeStore
from .errors import TaskFailure, TaskTimeout
from .llm.loop import Progress
from .logs import span
from .metrics import Metrics
from .protocol import EnvelopeError, TaskEnvelope

log = logging.getLogger("agent2389.processor")

_PEEK_BYTES = 65536
_PEEK_RE = {name: re.compile(rb'"' + name.encode() + rb'"\s*:\s*"([^"\\]{1,200})"')
            for name in ("task_id", "conversation_id")}
_PUBLISH_PATIENCE = 10.0
_REJECTION_CODES = (protocol.INVALID_INPUT, protocol.PIPELINE_DEPTH_EXCEEDED)

Think = Callable[[TaskEnvelope, float], str]


class Delivery(Protocol):
    topic: str
    payload: bytes
    retain: bool

    def ack(self) -> None: ...


class Ticket(Protocol):
    def wait(self, timeout: Optional[float]) -> bool: ...


class Publisher(Protocol):
    def publish(self, topic: str, payload: bytes, retain: bool = False) -> Ticket: ...


class PublishAbandoned(Exception):
    """The broker never acknowledged an outcome before shutdown; the task stays unacknowledged."""


def peek_ids_in_prefix(payload: bytes) -> tuple[Optional[str], Optional[str]]:
    """task_id and conversation_id from the start of a payload too large to parse."""
    head = payload[:_PEEK_BYTES]
    found = []
    for name in ("task_id", "conversation_id"):
        match = _PEEK_RE[name].search(head)
        found.append(match.group(1).decode("utf-8", "replace") if match else None)
    task_id = protocol.normalize_uuid(found[0])
    cid = found[1] if found[1] and protocol.is_topic_safe(found[1]) else None
    return task_id, cid


class TaskProcessor:
    def __init__(self, config: AgentConfig, think: Think, publisher: Publisher, dedupe: DedupeStore,
                 metrics: Metrics, progress: Optional[Progress] = None,
                 should_abandon: Callable[[], bool] = lambda: False):
        self.config = config
        self.metrics = metrics
        self.progress: Progress = progress or (lambda *args: None)
        self.agent_id = config.agent_id
        self.input_topic = protocol.canonicalize_topic(protocol.input_topic(config.agent_id))
        self.think = think
        self.publisher = publisher
        self.dedupe = dedupe
        self.should_abandon = should_abandon
        self.secrets = config.secrets()

    # -------------------------------------------------------------- entry point
    def handle(self, delivery: Delivery) -> None:
        """Process one delivery to its end; never raises."""
        try:
            self._handle(delivery)
        except PublishAbandoned as exc:
            log.warning("%s; the broker will redeliver the task", exc)
        except Exception:  # a bug must cost one task, never the agent
            log.exception("unexpected error while handling a message on %s", delivery.topic)

    def _handle(self, delivery: Delivery) -> None:
        self.metrics.task_received()
        if delivery.retain:
            log.debug("ignoring a retained message on %s", delivery.topic)
            self.metrics.task_dropped("ignored")
            delivery.ack()
            return
        size = len(delivery.payload)
        if size > self.config.max_message_size:
            task_id, cid = peek_ids_in_prefix(delivery.payload)
            reason = f"message of {size} bytes exceeds max_message_size ({self.config.max_message_size} bytes)"
            self._reject(delivery, task_id, cid, reason)
            return
        try:
            envelope = protocol.parse_envelope(delivery.payload)
        except EnvelopeError as exc:
            self._reject(delivery, exc.task_id, exc.conversation_id, f"invalid task envelope: {exc}")
            return
        if protocol.canonicalize_topic(envelope.topic) != protocol.canonicalize_topic(delivery.topic):
            log.warning("discarding task %s: its topic %r does not match the topic it arrived on (%s)",
                        envelope.task_id, envelope.topic, delivery.topic, extra=self._span(envelope))
            self.metrics.task_dropped("rejected")
            delivery.ack()
            return
        if self._claim(envelope.task_id, delivery):
            self._run_claimed(envelope)

    # -------------------------------------------------------------- steps
    def _claim(self, task_id: str, delivery: Delivery) -> bool:
        state = self.dedupe.begin(task_id, delivery)
        if state in (COMPLETED, IN_FLIGHT):
            self.metrics.task_dropped("duplicate")
        if state == COMPLETED:
            log.info("discarding duplicate of completed task %s", task_id)
            delivery.ack()
        elif state == IN_FLIGHT:
            log.info("duplicate of in-flight task %s: it is acknowledged when the original finishes", task_id)
        return state not in (COMPLETED, IN_FLIGHT)

    def _finish(self, task_id: str, completed: bool) -> None:
        for handle in self.dedupe.finish(task_id, completed):
            if completed:
                handle.ack()

    def _reject(self, delivery: Delivery, task_id: Optional[str], cid: Optional[str], reason: str) -> None:
        """invalid_input to the conversation when it is known; logged either way."""
        if not (task_id and cid):
            log.warning("discarding message on %s: %s (no task_id/conversation_id to reply to)",
                        delivery.topic, reason)
            self.metrics.task_dropped("rejected")
            delivery.ack()
            return
        log.warning("rejecting task %s: %s", task_id, reason,
                    extra={"span": {"operation": "task_processing", **self._ids(task_id, cid)}})
        if not self._claim(task_id, delivery):
            return
        self.progress(task_id, cid, "General", "ValidationError", "the task envelope is invalid", None)
        self._publish_outcome(task_id, protocol.conversation_topic(cid, self.agent_id),
                              protocol.error_message(protocol.INVALID_INPUT, reason, task_id, self.secrets))
        self.metrics.task_dropped("rejected")

    def _run_claimed(self, envelope: TaskEnvelope) -> None:
        started = time.monotonic()
        ids = (envelope.task_id, envelope.conversation_id)
        outcome = "failed"
        self.metrics.task_started()
        try:
            with span(log, "task_processing", **self._ids(*ids)) as extra:
                log.debug("task %s accepted (depth %d)", envelope.task_id, envelope.depth, extra=extra)
                self.progress(*ids, "General", "TaskStart", "task accepted", None)
                topic, message = self._outcome(envelope)
                self._publish_outcome(envelope.task_id, topic, message)
                error = message.get("error")
                outcome = "completed" if error is None else ("rejected" if error["code"] in _REJECTION_CODES else "failed")
                kind = "error " + error["code"] if error else ("response" if "response" in message else "forward")
                self.progress(*ids, "General", "TaskError" if error else "TaskComplete", f"task finished: {kind}", None)
                log.info("task %s finished: %s in %.0f ms", envelope.task_id, kind,
                         (time.monotonic() - started) * 1000, extra=extra)
        finally:
            self._finish(envelope.task_id, completed=False)  # a no-op once the outcome was recorded
            self.metrics.task_finished(outcome, time.monotonic() - started)

    def _publish_outcome(self, task_id: str, topic: str, message: dict) -> None:
        try:
            self._publish_and_wait(topic, protocol.to_payload(message), task_id)
        except BaseException:
            self._finish(task_id, completed=False)
            raise
        self._finish(task_id, completed=True)

    def _publish_and_wait(self, topic: str, payload: bytes, task_id: str) -> None:
        ticket = self.publisher.publish(topic, payload)
        waited = 0.0
        while not ticket.wait(_PUBLISH_PATIENCE):
            waited += _PUBLISH_PATIENCE
            if self.should_abandon():
                raise PublishAbandoned(f"outcome of task {task_id} was not acknowledged by the broker")
            log.warning("outcome of task %s not yet acknowledged by the broker after %.0f s; still waiting",
                        task_id, waited)

    def _outcome(self, envelope: TaskEnvelope) -> tuple[str, dict]:
        """What to publish, and where, for a claimed task."""
        reply_topic = protocol.conversation_topic(envelope.conversation_id, self.agent_id)
        if envelope.depth > self.config.max_pipeline_depth:
            return reply_topic, self._error(envelope, protocol.PIPELINE_DEPTH_EXCEEDED,
                                            f"pipeline depth {envelope.depth} exceeds the maximum of "
                                            f"{self.config.max_pipeline_depth}")
        try:
            if envelope.next is not None:
                protocol.next_agent_id(envelope.next.topic)
            deadline = time.monotonic() + self.config.task_timeout
            text = self.think(envelope, deadline)
            if time.monotonic() > deadline:
                raise TaskTimeout()
            if envelope.next is not None:
                return protocol.forward_envelope(envelope, text, self.agent_id)
            return reply_topic, protocol.response_message(protocol.extract_response(text), envelope.task_id)
        except EnvelopeError as exc:
            return reply_topic, self._error(envelope, protocol.INVALID_INPUT, str(exc))
        except TaskTimeout:
            return reply_topic, self._error(envelope, protocol.INTERNAL_ERROR,
                                            f"task exceeded {self.config.task_timeout} s")
        except TaskFailure as exc:
            return reply_topic, self._error(envelope, exc.code, str(exc))
        except Exception:
            log.exception("internal error in task %s", envelope.task_id, extra=self._span(envelope))
            return reply_topic, self._error(envelope, protocol.INTERNAL_ERROR,
                                            "internal error while processing the task (details are in the agent log)")

    def _error(self, envelope: TaskEnvelope, code: str, message: str) -> dict:
        level = logging.WARNING if code in _REJECTION_CODES else logging.ERROR  # failures need attention
        log.log(level, "task %s failed: %s: %s", envelope.task_id, code, message, extra=self._span(envelope))
        return protocol.error_message(code, message, envelope.task_id, self.secrets)

    # -------------------------------------------------------------- logging
    def _ids(self, task_id: str, cid: Any) -> dict:
        return {"task_id": task_id, "conversation_id": cid, "agent_id": self.agent_id}

    def _span(self, envelope: TaskEnvelope) -> dict:
        return {"span": {"operation": "task_processing", **self._ids(envelope.task_id, envelope.conversation_id)}}
