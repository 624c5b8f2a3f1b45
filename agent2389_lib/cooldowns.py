"""One back-off for the fleet (PROTOCOL.md 8). An agent that an LLM provider answers 429 (or
503/529 with Retry-After) publishes a retained cooldown on `/control/providers/{provider_id}/
cooldown`, with a Message Expiry Interval of the wait (on 3.1.1 it clears it with an empty
retained message when it ends); every agent using that provider subscribes, and holds its new
requests to it until then. `provider_id` is a keyed hash of the base URL and the API key: agents
with the same provider and key compute the same one, and neither can be read back from it."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional

from . import protocol, taskscope
from .config import LlmSettings
from .errors import LlmError
from .logs import Throttle
from .ratelimit import RateLimiter
from .rfc3339 import parse_rfc3339

log = logging.getLogger("agent2389.cooldowns")

MAX_AHEAD = 3600.0  # a cooldown further away than this is not believed
_ID_CONTEXT = b"agent2389 provider id\n"

Publish = Callable[[str, bytes, Optional[int]], None]  # topic, payload (retained), Message Expiry Interval


def provider_id(base_url: str, api_key: str) -> str:
    """32 hex digits: HMAC-SHA256 keyed with the API key over the base URL (PROTOCOL.md 8)."""
    return hmac.new(api_key.encode("utf-8"), _ID_CONTEXT + base_url.rstrip("/").lower().encode("utf-8"),
                    hashlib.sha256).hexdigest()[:32]


def cooldown_topic(provider: str) -> str:
    return f"/control/providers/{provider}/cooldown"


class CooldownError(ValueError):
    """A cooldown message not to believe; the message says why."""


@dataclass(frozen=True)
class Cooldown:
    until: float  # Unix time
    status: int
    agent_id: str


def parse_cooldown(payload: bytes, now: float) -> Cooldown:
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise CooldownError("not JSON") from None
    if not isinstance(data, dict):
        raise CooldownError("not a JSON object")
    until = parse_rfc3339(data.get("until"))
    if until is None:
        raise CooldownError("until must be an RFC 3339 date and time with a zone")
    if until <= now:
        raise CooldownError("until is in the past")
    if until - now > MAX_AHEAD:
        raise CooldownError(f"until is more than {MAX_AHEAD / 3600:g} hour away")
    status, agent_id = data.get("status"), data.get("agent_id")
    if isinstance(status, bool) or not isinstance(status, int) or not isinstance(agent_id, str):
        raise CooldownError("status must be a number and agent_id a string")
    return Cooldown(until, status, agent_id[:64])


class Cooldowns:
    """The cooldowns this agent knows, by provider id: heard from the fleet (the network thread)
    or met itself (a worker); wall-clock times, as the messages carry them."""

    def __init__(self, agent_id: str, publish: Publish, v5: Callable[[], bool], clock: Callable[[], float] = time.time):
        self.agent_id, self.publish, self.v5, self._clock = agent_id, publish, v5, clock
        self._until: dict[str, Cooldown] = {}
        self._lock = threading.Lock()
        self._ignored = Throttle()
        self._unpublished = Throttle()

    def current(self, provider: str) -> Optional[Cooldown]:
        with self._lock:
            cooldown = self._until.get(provider)
        return cooldown if cooldown is not None and cooldown.until > self._clock() else None

    def heard(self, topic: str, payload: bytes) -> None:
        """A retained cooldown (or its clearing) on a provider's topic; never raises."""
        provider = topic.rstrip("/").split("/")[-2]
        if not payload:
            return  # cleared (3.1.1): the one kept here ends by itself
        try:
            cooldown = parse_cooldown(payload, self._clock())
        except CooldownError as exc:
            ignored = self._ignored.occurred()
            if ignored:
                log.warning("ignoring a cooldown on %s: %s (%d such since the last report)", topic, exc, ignored)
            return
        if self._keep(provider, cooldown):
            log.info("provider %s is cooling down until %s (HTTP %d at %s): holding requests to it", provider,
                     protocol.utc_millis(cooldown.until), cooldown.status, cooldown.agent_id)

    def _keep(self, provider: str, cooldown: Cooldown) -> bool:
        with self._lock:
            known = self._until.get(provider)
            if known is not None and known.until >= cooldown.until:
                return False
            self._until[provider] = cooldown
            return True

    def met(self, provider: str, status: int, wait: float) -> None:
        """This agent was told to wait: keep it, and tell the fleet (best effort)."""
        cooldown = Cooldown(self._clock() + min(wait, MAX_AHEAD), status, self.agent_id)
        if not self._keep(provider, cooldown):
            return
        message = {"until": protocol.utc_millis(cooldown.until), "status": status, "agent_id": self.agent_id}
        seconds = max(1, math.ceil(cooldown.until - self._clock()))
        try:
            self.publish(cooldown_topic(provider), protocol.to_payload(message), seconds)
        except Exception as exc:  # not connected, refused: this agent keeps to its own back-off
            if self._unpublished.occurred():
                log.warning("could not tell the fleet that provider %s is cooling down: %s", provider, exc)
            return
        if not self.v5():  # no Message Expiry on 3.1.1: cleared when it ends, unless a later one came meanwhile
            timer = threading.Timer(seconds, self._clear, (provider, cooldown))
            timer.daemon = True
            timer.start()

    def _clear(self, provider: str, cooldown: Cooldown) -> None:
        with self._lock:
            if self._until.get(provider) is not cooldown:
                return
        try:
            self.publish(cooldown_topic(provider), b"", None)
        except Exception as exc:
            log.debug("could not clear the cooldown of provider %s: %s", provider, exc)


class Fleet:
    """The LLM providers this process uses, each behind its gate: the fleet's cooldowns, and the
    client-side limits shared by `members` processes (a pool's live members)."""

    def __init__(self, cooldowns: Optional[Cooldowns], members: Callable[[], int] = lambda: 1):
        self.cooldowns, self.members = cooldowns, members
        self.providers: set[str] = set()  # their ids: the cooldown topics to follow

    def gate(self, name: str, settings: LlmSettings, base_url: str) -> ProviderGate:
        provider = provider_id(base_url, settings.api_key.reveal() if settings.api_key else "")
        self.providers.add(provider)
        limiter = RateLimiter(settings.requests_per_minute, settings.tokens_per_minute, self.members)
        return ProviderGate(name, provider, self.cooldowns, limiter, taskscope.sleep)

    def topics(self) -> list[str]:
        return [cooldown_topic(provider) for provider in sorted(self.providers)]


class ProviderGate:
    """What one provider's requests pass before they go (its cooldown, then this process's share
    of the client-side limits), and what they report after."""

    def __init__(self, name: str, provider: str, cooldowns: Optional[Cooldowns], limiter: RateLimiter,
                 sleep: Callable[[float], None], wall_clock: Callable[[], float] = time.time):
        self.name, self.provider, self.cooldowns, self.limiter = name, provider, cooldowns, limiter
        self._sleep, self._wall_clock = sleep, wall_clock

    def cooling(self) -> Optional[Cooldown]:
        return self.cooldowns.current(self.provider) if self.cooldowns is not None else None

    def before(self, deadline: float) -> None:
        """Wait for the provider's cooldown and this request's turn; LlmError when either ends
        after the task's deadline (a `time.monotonic()` value)."""
        cooldown = self.cooling()
        if cooldown is not None:
            left = cooldown.until - self._wall_clock()
            if time.monotonic() + left >= deadline:
                raise LlmError(f"{self.name} is cooling down until {protocol.utc_millis(cooldown.until)} (HTTP "
                               f"{cooldown.status} at {cooldown.agent_id}); the task's deadline comes first",
                               "rate_limited")
            self._sleep(left)
        if self.limiter.limited:
            self.limiter.wait(deadline, self._sleep, self.name)

    def limited(self, status: int, wait: float) -> None:
        if self.cooldowns is not None:
            self.cooldowns.met(self.provider, status, wait)

    def spent(self, tokens: int) -> None:
        self.limiter.spent(tokens)
