"""Client-side limits on one LLM provider (`[llm] requests_per_minute`, `tokens_per_minute`): this
process's share of them, the limit divided by the pool's live members (recomputed as they come
and go), spent evenly. Requests are spaced (generic cell rate: one every 60 / share seconds),
so a fleet of members each keeping to its share never bursts past the provider's window;
tokens, known only after a reply, push the next request back by what they cost."""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

from .errors import LlmError


class RateLimiter:
    def __init__(self, requests_per_minute: Optional[int], tokens_per_minute: Optional[int],
                 members: Callable[[], int] = lambda: 1, clock: Callable[[], float] = time.monotonic):
        """`members`: how many processes share the limits now (a pool's live members)."""
        self.requests_per_minute, self.tokens_per_minute = requests_per_minute, tokens_per_minute
        self.members, self._clock = members, clock
        self._next_request = 0.0  # the earliest time the next request may go (clock)
        self._tokens_clear = 0.0  # when the tokens spent so far are paid for at this share's rate
        self._lock = threading.Lock()

    @property
    def limited(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None

    def delay(self) -> float:
        """Seconds to wait before the next request; reserves its slot (the caller then waits)."""
        with self._lock:
            now = self._clock()
            share = max(1, self.members())
            start = max(now, self._next_request, self._tokens_clear - 60.0)  # a minute's tokens may be in flight
            if self.requests_per_minute is not None:
                self._next_request = start + 60.0 * share / self.requests_per_minute
            return start - now

    def spent(self, tokens: int) -> None:
        """A reply's tokens, paid for at this process's share of `tokens_per_minute`."""
        if self.tokens_per_minute is None or tokens <= 0:
            return
        with self._lock:
            share = max(1, self.members())
            self._tokens_clear = max(self._tokens_clear, self._clock()) + 60.0 * tokens * share / self.tokens_per_minute

    def wait(self, deadline: float, sleep: Callable[[float], None], provider: str) -> None:
        """Wait for the next request's turn; LlmError when it comes after the task's deadline
        (a `time.monotonic()` value)."""
        pause = self.delay()
        if pause <= 0:
            return
        if time.monotonic() + pause >= deadline:
            raise LlmError(f"{provider}: the client-side limit ([llm] requests_per_minute / tokens_per_minute, "
                           f"shared by {max(1, self.members())} process(es)) allows the next request in {pause:.1f} "
                           f"s, after the task's deadline", "rate_limited")
        sleep(pause)
