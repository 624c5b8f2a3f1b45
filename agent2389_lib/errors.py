"""Failures of one task, each carrying the protocol error code it is published with; and the one
kind of failure that stops the agent from starting."""

from __future__ import annotations

import time

from . import protocol


class TaskFailure(Exception):
    """A task could not be completed; `str(exc)` is the user-facing message (sanitized later)."""

    code = protocol.INTERNAL_ERROR


class LlmError(TaskFailure):
    code = protocol.LLM_ERROR

    def __init__(self, message: str, kind: str = "error"):
        super().__init__(message)
        self.kind = kind  # for the per-provider error counters: auth, rate_limited, server_error, ...


class TaskTimeout(TaskFailure):
    code = protocol.INTERNAL_ERROR


def remaining(deadline: float) -> float:
    """Seconds left before the task deadline (a `time.monotonic()` value); raises TaskTimeout
    when none are."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TaskTimeout("task deadline passed")
    return left


class InvalidTask(TaskFailure):
    code = protocol.INVALID_INPUT


class StartupError(Exception):
    """The agent cannot start; the message says what to fix (exit code 1)."""


class PayloadTooLarge(ValueError):
    """A message that must not be published: the broker or the receiving agent would refuse it."""

    def __init__(self, size: int, limit: int, limit_name: str):
        super().__init__(f"{size} bytes, over the {limit_name} of {limit} bytes")
        self.size, self.limit = size, limit
