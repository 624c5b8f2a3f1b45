"""Cancels (PROTOCOL.md 7): what a cancel message says, and the cancels an agent keeps by task
id: for tasks it has not seen yet (a pipeline hop cancelled while the forward to it is still on
its way), so the task is answered `canceled` when it arrives, and for tasks it cancelled, so a
redelivery is answered `canceled` too."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

from .protocol import EnvelopeError, decode_json, is_topic_safe, normalize_uuid

MAX_REASON_CHARS = 500
MAX_CANCEL_BYTES = 4096  # a cancel is three short fields
KEPT = 10000  # cancels kept for tasks not seen yet, the newest


class CancelError(ValueError):
    """A cancel message that cannot be read; the message says why."""


@dataclass
class Cancel:
    task_id: str  # lowercase hyphenated
    conversation_id: Optional[str]
    reason: str  # "" when none was given


def parse_cancel(payload: bytes) -> Cancel:
    """`{"task_id", "conversation_id" (optional), "reason" (optional, at most 500 characters)}`."""
    if len(payload) > MAX_CANCEL_BYTES:
        raise CancelError(f"a cancel of {len(payload)} bytes is over {MAX_CANCEL_BYTES}")
    try:
        data = decode_json(payload)
    except EnvelopeError as exc:
        raise CancelError(str(exc)) from None
    if not isinstance(data, dict):
        raise CancelError("a cancel must be a JSON object")
    task_id = normalize_uuid(data.get("task_id"))
    if task_id is None:
        raise CancelError("a cancel needs the task_id (a UUID) of the task to cancel")
    cid = data.get("conversation_id")
    if cid is not None and not (isinstance(cid, str) and cid and is_topic_safe(cid)):
        raise CancelError("conversation_id must be a non-empty string without '/', '+', '#' or NUL")
    reason = data.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise CancelError("reason must be a string")
    if reason is not None and len(reason) > MAX_REASON_CHARS:
        raise CancelError(f"reason must be at most {MAX_REASON_CHARS} characters")
    return Cancel(task_id, cid, reason or "")


def cancel_message(cancel: Cancel) -> dict:
    """The message that asks for `cancel` (the CLI's, and an agent's to the next hop)."""
    message: dict = {"task_id": cancel.task_id}
    if cancel.conversation_id:
        message["conversation_id"] = cancel.conversation_id
    if cancel.reason:
        message["reason"] = cancel.reason
    return message


class KeptCancels:
    """Cancels by task id: the newest `capacity`, each until its time (Unix time, as the store
    keeps it across a restart) or, with none, for as long as there is room. Kept by the thread
    that reads cancels, read by the workers that start tasks."""

    def __init__(self, capacity: int = KEPT, clock: Callable[[], float] = time.time):
        self.capacity, self._clock = capacity, clock
        self._kept: OrderedDict[str, tuple[Optional[float], Cancel]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._kept)

    def keep(self, cancel: Cancel, until: Optional[float]) -> None:
        with self._lock:
            self._kept.pop(cancel.task_id, None)
            self._kept[cancel.task_id] = (until, cancel)
            while len(self._kept) > self.capacity:
                self._kept.popitem(last=False)

    def get(self, task_id: str) -> Optional[Cancel]:
        """The cancel kept for `task_id`, None when there is none or its time is up."""
        with self._lock:
            kept = self._kept.get(task_id)
            if kept is None:
                return None
            until, cancel = kept
            if until is not None and until <= self._clock():
                del self._kept[task_id]
                return None
            return cancel
