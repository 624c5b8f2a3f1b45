"""The gateway's core: A2A tasks onto agent2389 tasks and back. It reads who is there from the
retained statuses, publishes each task once, and follows the task by what the broker carries:
progress events (working), approval requests (input required), the answer or error on the
conversation (completed with the answer as an artifact, failed, canceled, rejected). Its MQTT
session is persistent, so an answer published while the gateway is down reaches it afterwards."""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
import uuid
from collections import defaultdict
from typing import Any, Callable, Optional

from .. import protocol
from ..approvals import approval_topic, decision_message, decision_topic
from ..cancels import Cancel, cancel_message
from ..cli.opsclient import OperatorClient, OperatorError
from ..discovery import STATUS_FILTER
from ..metrics import Metrics
from ..outcome import TaskResult
from . import a2a
from .a2a import Incoming, RpcError
from .tasks import Task, TaskStore

log = logging.getLogger("agent2389.gateway")

_NAMESPACE = uuid.UUID("7c1f3a52-2389-4c4e-9a3b-6a2a2a2389a2")  # of the task ids made from (agent, message id)
_CANCEL_WAIT = 10.0  # seconds CancelTask waits for the agent to say the task ended
_RESULTS = {a2a.COMPLETED: TaskResult.COMPLETED, a2a.FAILED: TaskResult.FAILED, a2a.CANCELED: TaskResult.CANCELED,
            a2a.REJECTED: TaskResult.REJECTED}
_APPROVE_WORDS, _DENY_WORDS = ("approve", "approved", "yes", "ok"), ("deny", "denied", "no", "reject")
Stream = queue.Queue  # of StreamResponse payloads; None when the task stops for now


def conversation_for(context_id: str) -> str:
    """An A2A context is an agent2389 conversation; an id a topic level cannot carry is hashed."""
    if protocol.is_topic_safe(context_id) and len(context_id) <= 128:
        return context_id
    return "a2a-" + hashlib.sha256(context_id.encode("utf-8")).hexdigest()[:32]


class Gateway:
    def __init__(self, client: OperatorClient, store: TaskStore, metrics: Metrics, send_wait: float = 300.0,
                 clock: Callable[[], float] = time.time):
        """`send_wait`: how long SendMessage waits for a task to finish (or to need input)."""
        self.client, self.store, self.metrics, self.send_wait = client, store, metrics, send_wait
        self._clock = clock
        self.agents: dict[str, dict] = {}  # agent id: its status, while it says it is available
        self._streams: dict[str, list] = defaultdict(list)  # task id: the queues of the clients following it
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, name="gateway-mqtt", daemon=True)

    # -------------------------------------------------------------- the broker's side
    def start(self) -> None:
        """Subscribe (the retained statuses and approval requests come first), then read; tasks
        a crash left unpublished are published now (the agent drops a copy by its id)."""
        self.client.subscribe([STATUS_FILTER, protocol.conversation_topic("+", "+"), protocol.progress_filter(),
                               approval_topic("+")])
        self._reader.start()
        for task in self.store.unpublished():
            self._publish(task)

    def stop(self) -> None:
        self._stop.set()
        self._reader.join(5)
        with self._lock:
            for streams in self._streams.values():
                for stream in streams:
                    stream.put(None)
            self._streams.clear()

    def _read(self) -> None:
        while not self._stop.is_set():
            message = self.client.next_message(0.5)
            if message is None:
                continue
            try:
                self.on_message(message.topic, bytes(message.payload))
            except Exception:  # a message must never stop the reader
                log.exception("could not handle a message on %s", message.topic)

    def on_message(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        if topic.startswith("/conversations/"):
            self._answered(_json(payload))
        elif len(parts) == 5 and parts[4] == "status":
            self._status(parts[3], _json(payload))
        elif len(parts) >= 5 and parts[4] == "progress":
            self._progress(_json(payload))
        elif len(parts) == 6 and parts[4] == "approvals" and payload:
            self._approval(parts[3], _json(payload))

    def _status(self, agent_id: str, status: Any) -> None:
        with self._lock:
            if isinstance(status, dict) and status.get("status") == protocol.AVAILABLE:
                self.agents[agent_id] = status
            else:
                self.agents.pop(agent_id, None)

    def _answered(self, payload: Any) -> None:
        task = self._known(payload)
        if task is None:
            return
        state, text = a2a.outcome_state(payload)
        message = a2a.agent_message(text, task.context_id, task.id)
        if state == a2a.COMPLETED:
            moved = self.store.move(task.id, state, message, artifacts=[a2a.artifact(text)])
            if moved is not None:
                self._emit(task.id, {"artifactUpdate": {"taskId": task.id, "contextId": task.context_id,
                                                        "artifact": a2a.artifact(text), "lastChunk": True}})
        else:
            moved = self.store.move(task.id, state, message)
        if moved is not None:
            self.metrics.task_dropped(_RESULTS[state])
            log.info("task %s at %s: %s", task.id, task.agent_id, state)
            self._emit_status(moved)

    def _progress(self, payload: Any) -> None:
        task = self._known(payload)
        if task is None or task.finished or payload.get("event_type") == "ApprovalRequired":
            return
        text = str(payload.get("message", ""))
        moved = self.store.move(task.id, a2a.WORKING) if task.state != a2a.WORKING else task
        if moved is not None:
            event = _status_event(moved, a2a.WORKING, a2a.agent_message(text, task.context_id, task.id))
            self._emit(task.id, event)

    def _approval(self, agent_id: str, request: Any) -> None:
        task = self._known(request)
        if task is None or task.finished or not isinstance(request.get("approval_id"), str):
            return
        if request.get("kind") == "elicitation":
            text = f"{request.get('tool')} asks: {request.get('message')}"
        else:
            text = (f"{request.get('tool')} needs approval, with arguments "
                    f"{json.dumps(request.get('arguments'), ensure_ascii=False)}")
        text += ("; answer on this task with approve or deny and a reason (text), or with data "
                 '{"decision": "approve" | "deny", "reason": ..., "content": ...}')
        moved = self.store.move(task.id, a2a.INPUT_REQUIRED, a2a.agent_message(text, task.context_id, task.id,
                                                                               data=request),
                                approval={**request, "agent_id": agent_id})
        if moved is not None:
            self._emit_status(moved)

    def _known(self, payload: Any) -> Optional[Task]:
        task_id = payload.get("task_id") if isinstance(payload, dict) else None
        return self.store.get(task_id) if isinstance(task_id, str) else None

    # -------------------------------------------------------------- the clients' side
    def available(self, agent_id: str) -> Optional[dict]:
        with self._lock:
            return self.agents.get(agent_id)

    def available_agents(self) -> dict[str, dict]:
        with self._lock:
            return dict(self.agents)

    def send(self, agent_id: str, incoming: Incoming, stream: bool) -> tuple[Task, Optional[Stream]]:
        """The task a message starts (once per message id; as it was made, or as it is when the
        message was sent before), or the one it answers; with `stream`, a queue of what follows,
        registered before anything is published."""
        if incoming.task_id is not None:
            return self._answer(agent_id, incoming, stream)
        task_id = str(uuid.uuid5(_NAMESPACE, f"{agent_id}\n{incoming.message_id}"))
        if self.available(agent_id) is None and self.store.get(task_id) is None:  # a retry is answered all the same
            raise RpcError(a2a.TASK_NOT_FOUND, f"agent {agent_id} is not available (no retained status says it is; "
                                               f"see the gateway's card for those that are)", "AGENT_NOT_AVAILABLE")
        context_id = incoming.context_id or str(uuid.uuid4())
        data = incoming.data[0] if len(incoming.data) == 1 else (incoming.data or None)
        conversation_id = conversation_for(context_id)
        envelope = {"task_id": task_id, "conversation_id": conversation_id, "topic": protocol.input_topic(agent_id),
                    "instruction": incoming.text or None, "input": data, "next": None}
        task, created = self.store.create(Task(
            task_id, agent_id, context_id, conversation_id, incoming.message_id, a2a.SUBMITTED,
            a2a.status(a2a.SUBMITTED, protocol.utc_millis(self._clock())),
            history=[{**incoming.message, "contextId": context_id, "taskId": task_id}], envelope=envelope))
        follow = self.watch(task.id) if stream else None
        if created:
            self.metrics.task_received()
            log.info("A2A message %s: task %s for %s in conversation %s", incoming.message_id, task.id, agent_id,
                     task.conversation_id)
        if not task.published:
            self._publish(task)  # what becomes of it, a failure to publish too, reaches `follow`
        return task, follow

    def _publish(self, task: Task) -> None:
        try:
            self.client.publish(protocol.input_topic(task.agent_id), protocol.to_payload(task.envelope))
        except OperatorError as exc:
            log.error("could not publish task %s to %s: %s", task.id, task.agent_id, exc)
            failed = self.store.move(task.id, a2a.FAILED, a2a.agent_message(
                f"the gateway could not publish the task: {exc}", task.context_id, task.id))
            if failed is not None:
                self._emit_status(failed)
            return
        self.store.mark_published(task.id)

    def _answer(self, agent_id: str, incoming: Incoming, stream: bool) -> tuple[Task, Optional[Stream]]:
        """A message on a task that waits for input decides its approval."""
        task = self.get(str(incoming.task_id))
        if task.agent_id != agent_id:
            raise RpcError(a2a.TASK_NOT_FOUND, f"task {task.id} is not a task of {agent_id}", "TASK_NOT_FOUND")
        if task.state != a2a.INPUT_REQUIRED or not task.approval:
            raise RpcError(a2a.UNSUPPORTED_OPERATION, f"task {task.id} is {task.state}: it takes no input now",
                           "UNSUPPORTED_OPERATION")
        approve, reason, content = _decision(incoming)
        approval = task.approval
        follow = self.watch(task.id) if stream else None
        self.store.add_history(task.id, {**incoming.message, "contextId": task.context_id, "taskId": task.id})
        try:
            self.client.publish(decision_topic(approval["agent_id"], approval["approval_id"]), protocol.to_payload(
                decision_message(approve, f"a2a:{task.context_id}"[:200], reason, content)))
        except OperatorError as exc:
            raise RpcError(a2a.INTERNAL_ERROR, f"could not publish the decision: {exc}") from None
        moved = self.store.move(task.id, a2a.WORKING, a2a.agent_message(
            f"{'approved' if approve else 'denied'}: {reason}".rstrip(": "), task.context_id, task.id))
        if moved is not None:
            self._emit_status(moved)
        return moved or task, follow

    def get(self, task_id: str) -> Task:
        task = self.store.get(task_id)
        if task is None:
            raise RpcError(a2a.TASK_NOT_FOUND, f"Task not found: {task_id}", "TASK_NOT_FOUND")
        return task

    def cancel(self, task_id: str) -> Task:
        """The agent's cancel, followed through its pipeline; the task as it is once the agent
        said it ended (or after a short wait)."""
        task = self.get(task_id)
        if task.finished:
            raise RpcError(a2a.TASK_NOT_CANCELABLE, f"task {task_id} is {task.state}: it can no longer be canceled",
                           "TASK_NOT_CANCELABLE")
        follow = self.watch(task_id)
        try:
            self.client.publish(protocol.cancel_topic(task.agent_id), protocol.to_payload(cancel_message(
                Cancel(task.id, task.conversation_id, "canceled by an A2A client"))))
        except OperatorError as exc:
            self.unwatch(task_id, follow)
            raise RpcError(a2a.INTERNAL_ERROR, f"could not publish the cancel: {exc}") from None
        self.wait(task_id, follow, _CANCEL_WAIT)
        return self.get(task_id)

    def wait(self, task_id: str, follow: Stream, seconds: float) -> None:
        """Until the task stops for now (finished, or waiting for input) or `seconds` pass."""
        deadline = time.monotonic() + seconds
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or follow.get(timeout=left) is None:
                    return
        except queue.Empty:
            return
        finally:
            self.unwatch(task_id, follow)

    # -------------------------------------------------------------- streams
    def watch(self, task_id: str) -> Stream:
        follow: Stream = queue.Queue()
        with self._lock:
            self._streams[task_id].append(follow)
        return follow

    def unwatch(self, task_id: str, follow: Stream) -> None:
        with self._lock:
            streams = self._streams.get(task_id, [])
            if follow in streams:
                streams.remove(follow)
            if not streams:
                self._streams.pop(task_id, None)

    def _emit(self, task_id: str, event: dict, stops: bool = False) -> None:
        with self._lock:
            streams = self._streams.pop(task_id, []) if stops else list(self._streams.get(task_id, []))
        for follow in streams:
            follow.put(event)
            if stops:
                follow.put(None)

    def _emit_status(self, task: Task) -> None:
        stops = task.finished or task.state in a2a.INTERRUPTED
        self._emit(task.id, _status_event(task, task.state, task.status.get("message")), stops)


def _status_event(task: Task, state: str, message: Optional[dict]) -> dict:
    return {"statusUpdate": {"taskId": task.id, "contextId": task.context_id,
                             "status": a2a.status(state, protocol.utc_millis(time.time()), message)}}


def _decision(incoming: Incoming) -> tuple[bool, str, Optional[dict]]:
    """approve or deny, the reason, and an MCP question's content: from a data part
    {"decision", "reason", "content"}, or from text ("approve", "deny: not on Fridays")."""
    for data in incoming.data:
        if isinstance(data, dict) and data.get("decision") in ("approve", "deny"):
            content = data.get("content")
            return (data["decision"] == "approve", str(data.get("reason", ""))[:500],
                    content if isinstance(content, dict) else None)
    words = incoming.text.strip().split(None, 1)
    verdict = words[0].lower().strip(".:,!") if words else ""
    if verdict not in _APPROVE_WORDS + _DENY_WORDS:
        raise RpcError(a2a.INVALID_PARAMS, "the task waits for an approval: answer approve or deny (and a reason), "
                                           'or a data part {"decision": "approve" | "deny", "reason": ...}')
    return verdict in _APPROVE_WORDS, (words[1] if len(words) > 1 else "")[:500], None


def _json(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
