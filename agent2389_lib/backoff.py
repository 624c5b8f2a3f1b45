"""Retry delays for every retry loop of the agent (reconnects, LLM calls, refused outcomes): the
cap doubles per attempt from `initial` up to `maximum`, and jitter spreads the retries of many
agents apart."""

from __future__ import annotations

import random


def jittered(attempt: int, initial: float, maximum: float, equal: bool = False) -> float:
    """Full jitter draws uniform(0, cap); equal jitter uniform(cap / 2, cap), so a retry never
    comes at once (a refused client must not hammer its broker)."""
    cap = min(maximum, initial * (2 ** min(attempt, 30)))
    return random.uniform(cap / 2 if equal else 0.0, cap)


class Backoff:
    """Equal-jitter delays for a loop that counts its own attempts until a success resets them."""

    def __init__(self, initial: float, maximum: float):
        self.initial, self.maximum, self.attempt = initial, maximum, 0

    def next_delay(self) -> float:
        delay = jittered(self.attempt, self.initial, self.maximum, equal=True)
        self.attempt = min(self.attempt + 1, 30)
        return delay

    def reset(self) -> None:
        self.attempt = 0
