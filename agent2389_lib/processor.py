"""The nine steps of one task (docs/protocol.md, How a task is processed): checks, dedupe, depth, think, publish, ack.

Every claimed delivery ends in exactly one acknowledgement, sent only after its outcome
(response, forward or error) was accepted by the broker (PUBACK reason code checked), so a
crash anywhere loses nothing: the broker redelivers and the dedupe store recognizes what was
done. The exceptions: a task abandoned at shutdown, or one whose outcome the broker refused,
stays unacknowledged and is redelivered.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import re
import time
from contextlib import contextmanager
from typing import Callable, ContextManager, Iterator, Optional, Protocol, Sequence

from . import approvals, protocol, taskscope, tracing, workflow
from .answers import extract_response
from .approvaldesk import DECIDED, RUNNING, WAITING, ApprovalDesk
from .backoff import jittered
from .config import AgentConfig
from .dedupe import COMPLETED, NEW, DedupeStore
from .errors import PayloadTooLarge, TaskFailure, TaskTimeout
from .events import Events, OutcomeRefused, TaskDropped, TaskFinished, TaskReceived, TaskRejected, TaskStarted
from .inflight import InFlight
from .llm.loop import ApprovalNeeded, LoopState
from .logs import Throttle
from .outcome import Kind, Outcome, TaskResult
from .protocol import EnvelopeError, TaskEnvelope
from .spend import Prices, Spend
from .usage import Usage

log = logging.getLogger("agent2389.processor")

_PEEK_BYTES = 65536
_PEEK_RE = {name: re.compile(rb'"' + name.encode() + rb'"\s*:\s*"([^"\\]{1,200})"')
            for name in ("task_id", "conversation_id")}
_PUBLISH_PATIENCE = 10.0
# PUBACK reason codes no retry changes: not authorized, topic name invalid, packet too large. Others
# (quota exceeded 0x97, server busy 0x89, ...) may pass later: retried with backoff within the deadline.
_PACKET_TOO_LARGE = 0x95
_FINAL_REFUSALS = frozenset({0x87, 0x90, _PACKET_TOO_LARGE})
_REFUSAL_BACKOFF = (0.5, 10.0)  # seconds: initial and maximum
_REJECTION_CODES = (protocol.INVALID_INPUT, protocol.PIPELINE_DEPTH_EXCEEDED, protocol.EXPIRED)  # not run
_INTERNAL_ERROR_TEXT = "internal error while processing the task (details are in the agent log)"

Think = Callable[[TaskEnvelope, float], str]
# a v2 hop's output and the task's deadline -> a forward or the workflow's final answer
Route = Callable[[TaskEnvelope, str, float], Outcome]
# a parked task's loop goes on: its state, the decided call's answer (None: run it), the deadline
ResumeLoop = Callable[[TaskEnvelope, LoopState, Optional[tuple[bool, str]], float], str]


class Delivery(Protocol):
    topic: str
    payload: bytes
    retain: bool
    user_properties: tuple  # MQTT 5 (name, value) pairs
    expires_at: Optional[float]  # MQTT 5 Message Expiry, as Unix time

    def ack(self) -> None: ...


class Ticket(Protocol):
    refusal: Optional[str]  # the broker's failing reason, None when accepted
    refusal_code: Optional[int]  # its reason code

    def wait(self, timeout: Optional[float]) -> bool: ...


class Publisher(Protocol):
    def publish(self, topic: str, payload: bytes, retain: bool = False,
                headers: Sequence[tuple[str, str]] = (), qos: int = 1, expiry: Optional[int] = None) -> Ticket: ...


class PublishAbandoned(Exception):
    """The broker never acknowledged an outcome before shutdown; the task stays unacknowledged."""


class OutcomeUndeliverable(Exception):
    """The broker refused an outcome for good (or until the task's deadline): the task is final
    all the same, its outcome goes to the dead-letter topic."""

    def __init__(self, topic: str, refusal: str, code: int):
        super().__init__(f"{refusal} (reason 0x{code:02X})")
        self.topic, self.refusal, self.code = topic, refusal, code


class Resumed:
    """A parked task going on after its approval was decided."""

    __slots__ = ("approval_id", "thinking", "spent")

    def __init__(self, approval_id: str, thinking: Callable[[], str], spent: dict):
        self.approval_id, self.thinking, self.spent = approval_id, thinking, spent


class Claim:
    """A claimed task key. It ends in exactly one of: its outcome published (or refused for
    good by the broker), then every delivery collected for it acknowledged; or released
    unacknowledged (shutdown)."""

    __slots__ = ("key", "task_id", "reply_topic", "deadline", "expires_at", "published", "undeliverable",
                 "forwarded_to")

    def __init__(self, key: str, task_id: str, reply_topic: str, deadline: float, expires_at: Optional[float]):
        self.key, self.task_id, self.reply_topic, self.deadline = key, task_id, reply_topic, deadline
        self.expires_at = expires_at  # the task's expiry (Unix time), for what its forward carries
        self.published = self.undeliverable = False
        self.forwarded_to: Optional[str] = None  # the agent its forward went to, once the broker took it


class _Answered:
    """Around a claim's work: an exception in it is answered with `internal_error`; a claim left
    without a published outcome is released unacknowledged (the broker redelivers it). A class,
    not a generator: it wraps every task, and a generator's context manager costs three times as much."""

    __slots__ = ("processor", "claim")

    def __init__(self, processor: "TaskProcessor", claim: Claim):
        self.processor, self.claim = processor, claim

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, failure: Optional[BaseException], traceback: object) -> bool:
        claim = self.claim
        try:
            if failure is None or isinstance(failure, PublishAbandoned):
                return False
            self.processor._answer_failure(claim, failure)  # a bug, or what ends the worker (SystemExit)
            return isinstance(failure, Exception)  # SystemExit and the like go on, answered all the same
        finally:
            if not claim.published:
                self.processor.dedupe.finish(claim.key, completed=False)


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
                 events: Events, should_abandon: Callable[[], bool] = lambda: False, route: Optional[Route] = None,
                 wall_clock: Callable[[], float] = time.time, inflight: Optional[InFlight] = None,
                 desk: Optional[ApprovalDesk] = None, resume_loop: Optional[ResumeLoop] = None):
        """What happens to each task is told to `events` (the metrics and progress subscribe);
        `inflight` is where cancels find the running tasks, `desk` where parked tasks wait for a
        person (by default, ones of its own that resume on the deciding thread); `resume_loop`
        goes on with a parked task's tool-calling loop."""
        self.config = config
        self.events = events
        self.agent_id = config.agent_id
        # compared with the envelope's topic rather than the delivered name, which a broker may
        # rewrite (RabbitMQ swaps '.' and '/')
        self.input_topic = protocol.canonicalize_topic(protocol.input_topic(config.agent_id))
        self._span_name = f"process {self.input_topic}"
        self.think = think
        self.publisher = publisher
        self.dedupe = dedupe
        self.should_abandon = should_abandon
        self.route = route
        self.secrets = config.secrets()
        self.outcome_qos = config.mqtt.outcome_qos
        self._retained = Throttle()
        self._wall_clock = wall_clock  # expiry is a moment on the wall clock (RFC 3339)
        self.desk = desk or ApprovalDesk(
            self.agent_id, dedupe, lambda topic, payload, expiry: publisher.publish(topic, payload, retain=True,
                                                                                   expiry=expiry),
            lambda item: self.resume(item.approval_id), events, wall_clock)
        self.inflight = inflight or InFlight(dedupe, config.task_timeout, events, clock=wall_clock, parked=self.desk)
        self.resume_loop = resume_loop
        self.prices = Prices({model: (per_input, per_output) for model, per_input, per_output in config.llm.prices})

    # -------------------------------------------------------------- entry point
    def handle(self, delivery: Delivery) -> None:
        """Process one delivery to its end; never raises."""
        try:
            self._handle(delivery)
        except PublishAbandoned as exc:
            log.warning("%s; the broker will redeliver the task", exc)
        except Exception:  # only reachable when not even an error could be published
            log.exception("unexpected error while handling a message on %s; it stays unacknowledged",
                          delivery.topic)

    def _handle(self, delivery: Delivery) -> None:
        self.events.emit(TaskReceived())
        if delivery.retain:
            ignored = self._retained.occurred()
            if ignored:
                log.warning("ignoring %d retained message(s) on %s since the last report: tasks must not be "
                            "published with the retain flag (some brokers also wrongly mark tasks queued for an "
                            "offline agent as retained)", ignored, delivery.topic)
            self.events.emit(TaskDropped(TaskResult.IGNORED))
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
        if protocol.canonicalize_topic(envelope.topic) != self.input_topic:
            log.warning("discarding task %s: its topic %r is not this agent's input topic %s (it arrived on %s)",
                        envelope.task_id, envelope.topic, self.input_topic, delivery.topic)
            self.events.emit(TaskDropped(TaskResult.REJECTED))
            delivery.ack()
            return
        key = protocol.task_key(self.agent_id, envelope)
        if delivery.expires_at is not None:  # the task's expiry: the earlier of its field and the MQTT 5 interval
            envelope.expires_at = min(delivery.expires_at, envelope.expires_at or delivery.expires_at)
        parent = tracing.extract(delivery.user_properties, envelope.traceparent, envelope.tracestate)
        with self._task_span(delivery.topic, parent, envelope.task_id, envelope.conversation_id) as task_span:
            with self._claimed(key, envelope.task_id, envelope.conversation_id, delivery,
                               envelope.expires_at) as claim:
                if claim is not None:
                    self._run_claimed(claim, envelope, task_span, delivery.payload)

    def _task_span(self, topic: str, parent: Optional[tracing.TraceContext], task_id: Optional[str],
                   cid: Optional[str]) -> ContextManager[tracing.Span]:
        """The task's span (OpenTelemetry's messaging conventions): what its messages carry, what
        its log lines name."""
        attributes = {"messaging.system": "mqtt", "messaging.operation.type": "process",
                      "messaging.operation.name": "process", "messaging.destination.name": topic}
        if task_id:
            attributes["messaging.message.id"] = task_id
        if cid:
            attributes["messaging.message.conversation_id"] = cid
        return tracing.span(self._span_name, tracing.CONSUMER, attributes, parent, task=True,
                            log={"operation": "task_processing", "task_id": task_id, "conversation_id": cid,
                                 "agent_id": self.agent_id})

    # -------------------------------------------------------------- claims
    @contextmanager
    def _claimed(self, key: str, task_id: str, cid: str, delivery: Delivery,
                 expires_at: Optional[float] = None) -> Iterator[Optional[Claim]]:
        """Claim `key` for the body. A duplicate yields None. An exception in the body is
        answered with `internal_error`; a claim left without a published outcome is released
        unacknowledged (the broker redelivers it)."""
        state = self.dedupe.begin(key, delivery, task_id)
        if state != NEW:
            self.events.emit(TaskDropped(TaskResult.DUPLICATE))
            if state == COMPLETED:
                log.info("discarding duplicate of completed task %s", task_id)
                delivery.ack()
            else:
                log.info("duplicate of in-flight task %s: it is acknowledged when the original finishes", task_id)
            yield None
            return
        claim = Claim(key, task_id, protocol.conversation_topic(cid, self.agent_id),
                      time.monotonic() + self._seconds_allowed(expires_at), expires_at)
        with _Answered(self, claim):
            yield claim

    def _answer_failure(self, claim: Claim, failure: BaseException) -> None:
        log.error("internal error in task %s", claim.task_id, exc_info=failure)
        if not claim.published:
            self._publish(claim, Outcome(Kind.ERROR, claim.reply_topic, protocol.error_message(
                protocol.INTERNAL_ERROR, _INTERNAL_ERROR_TEXT, claim.task_id, self.secrets)))

    def _seconds_allowed(self, expires_at: Optional[float]) -> float:
        """A running task's deadline: `task_timeout`, or less when the task expires sooner."""
        if expires_at is None:
            return self.config.task_timeout
        return max(0.0, min(float(self.config.task_timeout), expires_at - self._wall_clock()))

    def _reject(self, delivery: Delivery, task_id: Optional[str], cid: Optional[str], reason: str) -> None:
        """invalid_input to the conversation when it is known; logged either way."""
        if not (task_id and cid):
            log.warning("discarding message on %s: %s (no task_id/conversation_id to reply to)",
                        delivery.topic, reason)
            self.events.emit(TaskDropped(TaskResult.REJECTED))
            delivery.ack()
            return
        key = f"{self.agent_id}/{task_id}/{hashlib.sha256(delivery.payload).hexdigest()[:32]}"
        with self._task_span(delivery.topic, tracing.extract(delivery.user_properties), task_id, cid) as task_span:
            log.warning("rejecting task %s: %s", task_id, reason)
            task_span.fail(protocol.INVALID_INPUT)
            with self._claimed(key, task_id, cid, delivery) as claim:
                if claim is None:
                    return
                self.events.emit(TaskRejected(task_id, cid))
                self._publish(claim, Outcome(Kind.ERROR, claim.reply_topic,
                                             protocol.error_message(protocol.INVALID_INPUT, reason, task_id,
                                                                    self.secrets)))
                self.events.emit(TaskDropped(TaskResult.REJECTED))

    # -------------------------------------------------------------- one task
    def _run_claimed(self, claim: Claim, envelope: TaskEnvelope, task_span: tracing.Span, payload: bytes,
                     resumed: Optional[Resumed] = None) -> None:
        started = time.monotonic()
        ids = (envelope.task_id, envelope.conversation_id)
        result, kind, code = TaskResult.FAILED, None, None
        token = self.inflight.start(envelope.task_id)
        spend = Spend(self.prices, self.config.budget, envelope.budget, envelope.usage)
        if resumed is not None:
            spend.own = Usage(**resumed.spent)
        self.events.emit(TaskStarted(*ids))
        try:
            log.debug("task %s accepted (depth %d)", envelope.task_id, envelope.depth)
            try:
                with taskscope.bound(token, spend):
                    outcome = None if token.canceled else self._outcome(
                        envelope, claim.deadline, resumed.thinking if resumed is not None else None)
            except ApprovalNeeded as parked:
                self._park(claim, envelope, payload, parked, spend, resumed.approval_id if resumed else None)
                result = TaskResult.PARKED
                return
            if token.canceled and (outcome is None or outcome.error_code != protocol.CANCELED):
                outcome = self._error(envelope, protocol.CANCELED, token.message())  # what it came to is dropped
            assert outcome is not None
            outcome = self._publish(claim, outcome.with_message({**outcome.message, **self._carried(
                outcome, spend, task_span)}))
            code = outcome.error_code
            if code is not None or claim.undeliverable:
                task_span.fail(code or "outcome_undeliverable")
            result = (TaskResult.COMPLETED if code is None else TaskResult.CANCELED if code == protocol.CANCELED
                      else TaskResult.REJECTED if code in _REJECTION_CODES else TaskResult.FAILED)
            if result is TaskResult.CANCELED:
                task_span.set("agent2389.canceled", True)
            kind = outcome.describe()
            if claim.undeliverable:
                result, kind = TaskResult.FAILED, f"{kind} refused by the broker"
            log.info("task %s finished: %s in %.0f ms", envelope.task_id, kind, (time.monotonic() - started) * 1000)
        finally:
            self.inflight.end(envelope.task_id, token, claim.forwarded_to)
            ended = time.monotonic()
            self.events.emit(TaskFinished(*ids, result, ended - started, kind, code,
                                          ended - token.canceled_at if result is TaskResult.CANCELED else None,
                                          spend.own.message()))

    def _park(self, claim: Claim, envelope: TaskEnvelope, payload: bytes, parked: ApprovalNeeded, spend: Spend,
              replacing: Optional[str]) -> None:
        """The task waits for a person (PROTOCOL.md 9): the store owns it now (its deliveries are
        acknowledged), the worker is freed, and a retained request asks for the decision. A
        resumed task that parks again replaces its earlier approval."""
        approval_id, now = approvals.new_approval_id(), self._wall_clock()
        until = now + parked.timeout if envelope.expires_at is None else min(now + parked.timeout, envelope.expires_at)
        self.dedupe.park(approval_id, {
            "state": WAITING, "task_id": envelope.task_id, "conversation_id": envelope.conversation_id,
            "key": claim.key, "payload": payload.decode("utf-8"), "expires_at": envelope.expires_at,
            "loop": parked.state.to_json(), "seconds_left": max(0.0, claim.deadline - time.monotonic()),
            "asked_at": now, "until": until, "spent": spend.own.message()}, replacing)
        claim.published = True  # the task's deadline does not run while it waits: its time left is kept
        for handle in self.dedupe.finish(claim.key, completed=True, task_id=claim.task_id):
            handle.ack()
        self.desk.ask(approval_id, approvals.request_message(
            approval_id, envelope.task_id, envelope.conversation_id, approvals.TOOL, parked.call.name,
            parked.call.arguments, protocol.utc_millis(now), protocol.utc_millis(until), self.secrets), until)
        log.info("task %s waits for approval %s of a call of %s, until %s", envelope.task_id, approval_id,
                 parked.call.name, protocol.utc_millis(until))

    # -------------------------------------------------------------- a parked task goes on
    def resume(self, approval_id: str) -> None:
        """A decided parked task goes on, once however often it is asked to: the approved call
        runs, or the LLM hears the denial; then the task is answered as any other. Never raises."""
        record = self.dedupe.advance(approval_id, DECIDED, state=RUNNING)
        if record is None:
            return
        try:
            self._resume(approval_id, record)
        except PublishAbandoned as exc:
            self.dedupe.advance(approval_id, RUNNING, state=DECIDED)
            log.warning("%s; task %s resumes when the agent starts again", exc, record["task_id"])
        except Exception:
            log.exception("unexpected error while resuming task %s after approval %s", record["task_id"], approval_id)

    def _resume(self, approval_id: str, record: dict) -> None:
        payload = record["payload"].encode("utf-8")
        envelope = protocol.parse_envelope(payload)
        envelope.expires_at = record["expires_at"]
        state = LoopState.from_json(record["loop"])
        answer = self._decided_answer(approval_id, record, state)
        assert self.resume_loop is not None  # only a loop with tools parks
        resume_loop = self.resume_loop
        claim = Claim(record["key"], envelope.task_id, protocol.conversation_topic(envelope.conversation_id,
                                                                                   self.agent_id),
                      time.monotonic() + record["seconds_left"], envelope.expires_at)
        resumed = Resumed(approval_id, lambda: resume_loop(envelope, state, answer, claim.deadline), record["spent"])
        parent = tracing.extract((), envelope.traceparent, envelope.tracestate)
        with self._task_span(self.input_topic, parent, envelope.task_id, envelope.conversation_id) as task_span:
            task_span.set("agent2389.approval_id", approval_id)
            with _Answered(self, claim):
                self._run_claimed(claim, envelope, task_span, payload, resumed)
        if claim.published:  # answered, forwarded, or parked again under a new approval
            self.desk.done(approval_id)

    def release_parked(self) -> None:
        """At shutdown, for a store that does not outlive the process (no state_dir): each parked
        task is answered with an error naming its approval, and its request cleared."""
        for approval_id, record in self.dedupe.parked().items():
            if record["state"] == RUNNING or self.dedupe.advance(approval_id, record["state"], state=RUNNING) is None:
                continue  # a worker still has it (a shutdown past its grace)
            claim = Claim(record["key"], record["task_id"], protocol.conversation_topic(record["conversation_id"],
                                                                                        self.agent_id),
                          time.monotonic() + _PUBLISH_PATIENCE, None)
            text = (f"the agent stopped while the task waited for approval {approval_id}, and it keeps no state_dir "
                    f"to resume it from; send the task again")
            try:
                self._publish(claim, Outcome(Kind.ERROR, claim.reply_topic, protocol.error_message(
                    protocol.INTERNAL_ERROR, text, record["task_id"], self.secrets)))
            except PublishAbandoned as exc:
                log.warning("%s; task %s is lost with approval %s", exc, record["task_id"], approval_id)
                continue
            self.desk.done(approval_id)

    def _decided_answer(self, approval_id: str, record: dict, state: LoopState) -> Optional[tuple[bool, str]]:
        """What the LLM hears in place of the call (None: it runs now, marked as started first,
        so a crash while it runs never runs it twice)."""
        decision = approvals.Decision(**record["decision"])
        if not decision.approve:
            return False, f"the call was denied by {decision.by}" + (f": {decision.reason}" if decision.reason else "")
        if record.get("tool_started"):
            state.tool_calls += 1
            return False, ("the agent stopped while this call ran; it was not run again, and whether it took effect "
                           "is unknown")
        self.dedupe.advance(approval_id, RUNNING, tool_started=True)
        return None

    @staticmethod
    def _carried(outcome: Outcome, spend: Spend, task_span: tracing.Span) -> dict:
        """What an outcome carries besides itself: the pipeline's usage (PROTOCOL.md 8); a forward
        also the budget with what was used, and the trace context (for 3.1.1 brokers too)."""
        if outcome.kind is not Kind.FORWARD:
            return {"usage": spend.pipeline().message()}
        return {**spend.forwarded(), **(task_span.context.fields() if task_span.context is not None else {})}

    def _publish(self, claim: Claim, outcome: Outcome) -> Outcome:
        """Publish a claim's outcome, then acknowledge its deliveries. An outcome that the broker
        or the next agent would refuse is replaced by an `internal_error` saying so. Returns
        what was published."""
        payload = protocol.to_payload(outcome.message)
        try:
            try:
                if len(payload) > self.config.max_message_size:
                    raise PayloadTooLarge(len(payload), self.config.max_message_size, "max_message_size")
                self._publish_and_wait(claim, outcome.topic, payload, self._expiry(claim, outcome.kind))
                if outcome.kind is Kind.FORWARD:
                    claim.forwarded_to = protocol.next_agent_id(outcome.topic)
            except PayloadTooLarge as exc:
                what = "the answer" if outcome.kind is not Kind.FORWARD else f"the task forwarded to {outcome.topic}"
                outcome = Outcome(Kind.ERROR, claim.reply_topic, protocol.error_message(
                    protocol.INTERNAL_ERROR, f"{what} was {exc}", claim.task_id, self.secrets))
                log.error("task %s: %s was %s; publishing an error instead", claim.task_id, what, exc)
                payload = protocol.to_payload(outcome.message)
                self._publish_and_wait(claim, claim.reply_topic, payload, self.config.result_expiry)
        except OutcomeUndeliverable as exc:
            self._dead_letter(claim, exc, outcome.message, len(payload))
        claim.published = True
        for handle in self.dedupe.finish(claim.key, completed=True, task_id=claim.task_id,
                                         forwarded_to=claim.forwarded_to):
            handle.ack()
        return outcome

    def _expiry(self, claim: Claim, kind: Kind) -> Optional[int]:
        """The MQTT 5 Message Expiry Interval of an outcome: a forward's is what is left of the
        task's time; an answer's or error's is `result_expiry` (none by default)."""
        if kind is not Kind.FORWARD:
            return self.config.result_expiry
        if claim.expires_at is None:
            return None
        return max(1, math.ceil(claim.expires_at - self._wall_clock()))

    def _publish_and_wait(self, claim: Claim, topic: str, payload: bytes, expiry: Optional[int]) -> None:
        """Publish until the broker accepts; a refusal that may pass later is retried with
        backoff until the task's deadline. Raises OutcomeUndeliverable."""
        attributes = {"messaging.system": "mqtt", "messaging.operation.type": "send",
                      "messaging.operation.name": "send", "messaging.destination.name": topic,
                      "messaging.message.id": claim.task_id}
        with tracing.span(f"send {protocol.destination_template(topic)}", tracing.PRODUCER, attributes):
            self._publish_until_accepted(claim, topic, payload, expiry)

    def _publish_until_accepted(self, claim: Claim, topic: str, payload: bytes, expiry: Optional[int]) -> None:
        for attempt in itertools.count():
            ticket = self.publisher.publish(topic, payload, headers=tracing.task_headers(), qos=self.outcome_qos,
                                            expiry=expiry)
            waited = 0.0
            while not ticket.wait(_PUBLISH_PATIENCE):
                waited += _PUBLISH_PATIENCE
                if self.should_abandon():
                    raise PublishAbandoned(f"outcome of task {claim.task_id} was not acknowledged by the broker")
                log.warning("outcome of task %s not yet acknowledged by the broker after %.0f s; still waiting",
                            claim.task_id, waited)
            if ticket.refusal is None:
                return
            code = ticket.refusal_code or 0
            delay = jittered(attempt, *_REFUSAL_BACKOFF, equal=True)
            if code in _FINAL_REFUSALS or time.monotonic() + delay >= claim.deadline or self.should_abandon():
                raise OutcomeUndeliverable(topic, ticket.refusal, code)
            log.warning("the broker refused the outcome of task %s on %s: %s (reason 0x%02X); retrying in %.1f s",
                        claim.task_id, topic, ticket.refusal, code, delay)
            time.sleep(delay)

    def _dead_letter(self, claim: Claim, refused: OutcomeUndeliverable, outcome: dict, size: int) -> None:
        """A refused outcome is final for its task (holding the delivery would hold one of the
        broker's Receive Maximum slots forever); it goes to the dead-letter topic, if any."""
        self.events.emit(OutcomeRefused())
        claim.undeliverable = True
        where = self.config.dead_letter_topic
        log.error("task %s: the broker refused its outcome on %s: %s; the task is final (acknowledged, not retried)%s; "
                  "check the broker ACL for this client", claim.task_id, refused.topic, refused,
                  f", its outcome goes to {where}" if where else "")
        if not where:
            return
        letter = protocol.dead_letter_message(self.agent_id, claim.task_id, refused.topic, refused.code,
                                              refused.refusal, None if refused.code == _PACKET_TOO_LARGE else outcome,
                                              size)
        try:
            ticket = self.publisher.publish(where, protocol.to_payload(letter), headers=tracing.task_headers(),
                                            qos=self.outcome_qos)
        except (PayloadTooLarge, RuntimeError) as exc:
            log.error("task %s: could not send it to the dead-letter topic %s: %s", claim.task_id, where, exc)
            return
        if ticket.wait(_PUBLISH_PATIENCE) and ticket.refusal is not None:
            log.error("task %s: the broker refused the dead-letter topic %s too: %s", claim.task_id, where,
                      ticket.refusal)

    def _outcome(self, envelope: TaskEnvelope, deadline: float,
                 thinking: Optional[Callable[[], str]] = None) -> Outcome:
        """What to publish, and where, for a claimed task (`thinking`: how its text comes, when
        not by `think`: a parked task resumed). ApprovalNeeded passes through: the task parks."""
        if envelope.expires_at is not None and self._wall_clock() >= envelope.expires_at:
            return self._error(envelope, protocol.EXPIRED,
                               f"the task expired at {protocol.utc_millis(envelope.expires_at)}, before it started "
                               f"(expires_at, or the MQTT 5 message expiry); it was not run")
        if envelope.depth > self.config.max_envelope_depth:
            return self._error(envelope, protocol.PIPELINE_DEPTH_EXCEEDED,
                               f"pipeline depth {envelope.depth} exceeds the maximum of "
                               f"{self.config.max_envelope_depth} (max_envelope_depth)")
        try:
            if envelope.next is not None:
                protocol.next_agent_id(envelope.next.topic)
            text = thinking() if thinking is not None else self.think(envelope, deadline)
            if time.monotonic() > deadline:
                raise TaskTimeout()
            if envelope.next is not None:
                return Outcome(Kind.FORWARD, *protocol.forward_envelope(envelope, text, self.agent_id))
            if self.route is not None and workflow.is_routable(envelope):
                return self.route(envelope, text, deadline)
            return Outcome(Kind.ANSWER, protocol.conversation_topic(envelope.conversation_id, self.agent_id),
                           protocol.response_message(extract_response(text), envelope.task_id))
        except EnvelopeError as exc:
            return self._error(envelope, protocol.INVALID_INPUT, str(exc))
        except TaskTimeout:
            return self._error(envelope, protocol.INTERNAL_ERROR, f"task exceeded {self.config.task_timeout} s")
        except TaskFailure as exc:
            return self._error(envelope, exc.code, str(exc))
        except ApprovalNeeded:
            raise
        except Exception:
            log.exception("internal error in task %s", envelope.task_id)
            return self._error(envelope, protocol.INTERNAL_ERROR, _INTERNAL_ERROR_TEXT)

    def _error(self, envelope: TaskEnvelope, code: str, message: str) -> Outcome:
        if code == protocol.CANCELED:  # what someone asked for
            log.info("task %s: %s", envelope.task_id, message)
        else:
            # failures need attention; bad input and a spent budget are the sender's and the operator's
            level = logging.WARNING if code in _REJECTION_CODES or code == protocol.BUDGET_EXCEEDED else logging.ERROR
            log.log(level, "task %s failed: %s: %s", envelope.task_id, code, message)
        return Outcome(Kind.ERROR, protocol.conversation_topic(envelope.conversation_id, self.agent_id),
                       protocol.error_message(code, message, envelope.task_id, self.secrets))

