"""What a running task can be stopped by: its cancel token, bound to the worker thread that runs
the task, so the layers below (HTTP requests, command tools, MCP calls) find it without it
being passed through every call, as a deadline is. Each blocking step registers how it is
interrupted (`aborting`): shutting its sockets, killing its process group, waking its wait.
The cancel arrives on another thread; the aborts it runs never block."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from . import protocol
from .errors import TaskFailure


class TaskCanceled(TaskFailure):
    """The task was cancelled; the message carries the reason."""

    code = protocol.CANCELED


class CancelToken:
    """One task's: cancelled at most once, from any thread; its aborts run under its lock, so an
    abort never reaches a step that has already ended (and been replaced by the next task's)."""

    def __init__(self) -> None:
        self.reason: Optional[str] = None  # set once cancelled ("" when no reason was given)
        self.canceled_at = 0.0  # time.monotonic() of the cancel
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._aborts: dict[int, Callable[[], None]] = {}
        self._next = 0

    @property
    def canceled(self) -> bool:
        return self.reason is not None

    def cancel(self, reason: str) -> bool:
        """Cancel the task and interrupt what it is doing; False when it already was."""
        with self._lock:
            if self.reason is not None:
                return False
            self.reason, self.canceled_at = reason, time.monotonic()
            self._event.set()
            for abort in self._aborts.values():
                abort()
        return True

    def message(self) -> str:
        """The `canceled` error's message."""
        return f"the task was canceled: {self.reason}" if self.reason else "the task was canceled"

    def check(self) -> None:
        """Raises TaskCanceled once the task is cancelled."""
        if self.reason is not None:
            raise TaskCanceled(self.message())

    def sleep(self, seconds: float) -> None:
        """Wait `seconds`, or until the task is cancelled (then TaskCanceled)."""
        self._event.wait(seconds)
        self.check()

    @contextmanager
    def aborting(self, abort: Callable[[], None]) -> Iterator[None]:
        """While the body runs, a cancel calls `abort`; TaskCanceled at once when it came already."""
        with self._lock:
            self.check()
            handle, self._next = self._next, self._next + 1
            self._aborts[handle] = abort
        try:
            yield
        finally:
            with self._lock:
                del self._aborts[handle]


_local = threading.local()


def current() -> Optional[CancelToken]:
    """The token of the task this thread runs, if any."""
    return getattr(_local, "token", None)


@contextmanager
def bound(token: CancelToken) -> Iterator[CancelToken]:
    """Bind `token` to this thread for the body: the task's steps run here."""
    previous, _local.token = current(), token
    try:
        yield token
    finally:
        _local.token = previous


@contextmanager
def shielded() -> Iterator[None]:
    """A step no cancel interrupts: telling a server that its request is cancelled."""
    previous, _local.token = current(), None
    try:
        yield
    finally:
        _local.token = previous


def check() -> None:
    """Raises TaskCanceled when this thread's task is cancelled."""
    token = current()
    if token is not None:
        token.check()


def sleep(seconds: float) -> None:
    """`time.sleep` that a cancel of this thread's task ends at once (TaskCanceled)."""
    token = current()
    if token is None:
        time.sleep(seconds)
    else:
        token.sleep(seconds)


@contextmanager
def aborting(abort: Callable[[], None]) -> Iterator[None]:
    """`CancelToken.aborting` for this thread's task, if it has one."""
    token = current()
    if token is None:
        yield
        return
    with token.aborting(abort):
        yield
