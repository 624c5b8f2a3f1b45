"""What a running task can be stopped by: its cancel token (and what it may spend on LLM requests,
spend.py), bound to the worker thread that runs the task, so the layers below (HTTP requests,
command tools, MCP calls, the LLM providers) find them without them being passed through every
call, as a deadline is. Each blocking step registers how it is
interrupted (`aborting`): shutting its sockets, killing its process group, waking its wait.
The cancel arrives on another thread; the aborts it runs never block."""

from __future__ import annotations

import threading
import time
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Optional

from . import protocol
from .errors import TaskFailure

if TYPE_CHECKING:
    from .spend import Spend


class TaskCanceled(TaskFailure):
    """The task was cancelled; the message carries the reason."""

    code = protocol.CANCELED


class CancelToken:
    """One task's: cancelled at most once, from any thread; its aborts run under its lock, so an
    abort never reaches a step that has already ended (and been replaced by the next task's).
    Made for every task: nothing in it is made before it is needed."""

    __slots__ = ("reason", "canceled_at", "_lock", "_aborts")

    def __init__(self) -> None:
        self.reason: Optional[str] = None  # set once cancelled ("" when no reason was given)
        self.canceled_at = 0.0  # time.monotonic() of the cancel
        self._lock = threading.Lock()
        self._aborts: dict[int, Callable[[], None]] = {}

    @property
    def canceled(self) -> bool:
        return self.reason is not None

    def cancel(self, reason: str) -> bool:
        """Cancel the task and interrupt what it is doing; False when it already was."""
        with self._lock:
            if self.reason is not None:
                return False
            self.reason, self.canceled_at = reason, time.monotonic()
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
        woken = threading.Event()
        with self.aborting(woken.set):
            woken.wait(seconds)
        self.check()

    def aborting(self, abort: Callable[[], None]) -> ContextManager[None]:
        """While the body runs, a cancel calls `abort`; TaskCanceled at once when it came already."""
        return _Aborting(self, abort)


class _Aborting:
    """`CancelToken.aborting` (a class: one is made for every HTTP request)."""

    __slots__ = ("token", "abort")

    def __init__(self, token: CancelToken, abort: Callable[[], None]):
        self.token, self.abort = token, abort

    def __enter__(self) -> None:
        token = self.token
        with token._lock:
            token.check()
            token._aborts[id(self)] = self.abort

    def __exit__(self, *exc_info: Any) -> None:
        token = self.token
        with token._lock:
            del token._aborts[id(self)]


class _Bound:
    __slots__ = ("token", "spend", "previous")

    def __init__(self, token: Optional[CancelToken], spend: Optional[Spend]):
        self.token, self.spend = token, spend
        self.previous: tuple = (None, None)

    def __enter__(self) -> None:
        self.previous = current(), current_spend()
        _local.token, _local.spend = self.token, self.spend

    def __exit__(self, *exc_info: Any) -> None:
        _local.token, _local.spend = self.previous


_local = threading.local()
_UNCANCELLABLE = nullcontext()


def current() -> Optional[CancelToken]:
    """The token of the task this thread runs, if any."""
    return getattr(_local, "token", None)


def current_spend() -> Optional[Spend]:
    """What the task this thread runs may spend and has spent on LLM requests, if it is a task."""
    return getattr(_local, "spend", None)


def bound(token: CancelToken, spend: Optional[Spend] = None) -> ContextManager[None]:
    """Bind `token` (and the task's `spend`) to this thread for the body: the task's steps run here."""
    return _Bound(token, spend)


def shielded() -> ContextManager[None]:
    """A step no cancel interrupts: telling a server that its request is cancelled."""
    return _Bound(None, current_spend())


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


def aborting(abort: Callable[[], None]) -> ContextManager[None]:
    """`CancelToken.aborting` for this thread's task, if it has one."""
    token = current()
    return _UNCANCELLABLE if token is None else _Aborting(token, abort)
