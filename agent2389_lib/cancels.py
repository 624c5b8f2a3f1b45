"""Cancels (PROTOCOL.md 7): what a cancel message says, and the cancels an agent keeps for tasks
it has not seen yet (a pipeline hop cancelled while the forward to it is still on its way), so
the task is answered `canceled` when it arrives."""

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


class PendingCancels:
    """Cancels for tasks this agent has not seen: the newest `capacity`, each for at most `ttl`
    seconds (`task_timeout`: a forward still on its way arrives within it). Kept by the network
    thread that reads cancels, taken by the workers that start tasks."""

    def __init__(self, ttl: float, capacity: int = KEPT, clock: Callable[[], float] = time.monotonic):
        self.ttl, self.capacity, self._clock = ttl, capacity, clock
        self._kept: OrderedDict[str, tuple[float, Cancel]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._kept)

    def keep(self, cancel: Cancel) -> None:
        with self._lock:
            self._kept.pop(cancel.task_id, None)
            self._kept[cancel.task_id] = (self._clock() + self.ttl, cancel)
            while len(self._kept) > self.capacity:
                self._kept.popitem(last=False)

    def take(self, task_id: str) -> Optional[Cancel]:
        """The cancel kept for `task_id`, once (None when there is none, or it is too old)."""
        with self._lock:
            self._drop_expired()
            kept = self._kept.pop(task_id, None)
        return kept[1] if kept is not None else None

    def _drop_expired(self) -> None:
        now = self._clock()
        while self._kept:
            task_id, (until, _) = next(iter(self._kept.items()))
            if until > now:
                return
            del self._kept[task_id]
