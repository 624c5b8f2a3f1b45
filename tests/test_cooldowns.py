"""One back-off for the fleet and the client-side limits (PROTOCOL.md 8), without a broker: the
provider id, hostile cooldowns, what an agent publishes and holds, its share of the limits."""

import json
import threading
import time
import unittest

from agent2389_lib.config import LlmSettings, Secret
from agent2389_lib.cooldowns import Cooldown, Cooldowns, Fleet, ProviderGate, cooldown_topic, provider_id
from agent2389_lib.errors import LlmError
from agent2389_lib.jsonhttp import rate_limit_wait
from agent2389_lib.llm.loop import ProviderChain
from agent2389_lib.llm.base import ChatReply
from agent2389_lib.protocol import utc_millis
from agent2389_lib.ratelimit import RateLimiter
from support import FakeClock

KEY = "sk-proj-SECRETSECRETSECRET-1234"
URL = "https://user:hunter2@llm.example.com/v1"


class Published:
    def __init__(self) -> None:
        self.messages: list = []
        self.arrived = threading.Event()

    def __call__(self, topic, payload, expiry) -> None:
        self.messages.append((topic, payload, expiry))
        self.arrived.set()


class ProviderIdTests(unittest.TestCase):
    def test_the_same_provider_and_key_give_the_same_id_and_reveal_neither(self):
        ident = provider_id(URL, KEY)
        self.assertRegex(ident, r"^[0-9a-f]{32}$")
        self.assertEqual(ident, provider_id(URL + "/", KEY))
        self.assertNotEqual(ident, provider_id(URL, KEY + "x"))
        self.assertNotEqual(ident, provider_id("https://other.example.com/v1", KEY))
        for secret in (KEY, KEY[:8], "hunter2", "llm.example.com"):
            self.assertNotIn(secret.lower(), ident)


class CooldownMessageTests(unittest.TestCase):
    def setUp(self):
        self.clock = FakeClock(1_800_000_000.0)
        self.published = Published()
        self.cooldowns = Cooldowns("agent-a", self.published, v5=lambda: True, clock=self.clock)
        self.topic = cooldown_topic(provider_id(URL, KEY))

    def message(self, **fields) -> bytes:
        body = {"until": utc_millis(self.clock.now + 30), "status": 429, "agent_id": "agent-b", **fields}
        return json.dumps(body).encode()

    def test_a_cooldown_heard_is_held_until_it_ends(self):
        provider = provider_id(URL, KEY)
        self.cooldowns.heard(self.topic, self.message())
        self.assertEqual(self.cooldowns.current(provider), Cooldown(self.clock.now + 30, 429, "agent-b"))
        self.clock.now += 30
        self.assertIsNone(self.cooldowns.current(provider))

    def test_hostile_cooldowns_are_ignored_and_said_once_a_minute(self):
        hostile = [b"{", b"[1]", self.message(until="tomorrow"), self.message(until=utc_millis(self.clock.now - 5)),
                   self.message(until=utc_millis(self.clock.now + 3601)), self.message(status="429"),
                   self.message(agent_id=None), b"\xff\xfe"]
        with self.assertLogs("agent2389.cooldowns", "WARNING") as logs:
            for payload in hostile:
                self.cooldowns.heard(self.topic, payload)
        self.assertEqual(len(logs.output), 1)
        self.assertIsNone(self.cooldowns.current(provider_id(URL, KEY)))

    def test_a_rate_limit_met_is_published_retained_with_its_expiry_and_the_later_one_wins(self):
        provider = provider_id(URL, KEY)
        self.cooldowns.met(provider, 429, 12.5)
        ((topic, payload, expiry),) = self.published.messages
        self.assertEqual((topic, expiry), (self.topic, 13))
        self.assertEqual(json.loads(payload), {"until": utc_millis(self.clock.now + 12.5), "status": 429,
                                               "agent_id": "agent-a"})
        self.assertNotIn(KEY, payload.decode())
        self.cooldowns.met(provider, 429, 5)
        self.assertEqual(len(self.published.messages), 1, "an earlier end than the one known says nothing new")

    def test_an_agent_that_cannot_publish_keeps_its_own_back_off(self):
        def refuse(topic, payload, expiry):
            raise RuntimeError("not connected to the broker")

        cooldowns = Cooldowns("agent-a", refuse, v5=lambda: True, clock=self.clock)
        with self.assertLogs("agent2389.cooldowns", "WARNING") as logs:
            cooldowns.met(provider_id(URL, KEY), 429, 10)
        self.assertIn("could not tell the fleet", logs.output[0])
        self.assertIsNotNone(cooldowns.current(provider_id(URL, KEY)))

    def test_on_3_1_1_the_cooldown_is_cleared_when_it_ends(self):
        cooldowns = Cooldowns("agent-a", self.published, v5=lambda: False)
        cooldowns.met(provider_id(URL, KEY), 429, 0.2)
        self.published.arrived.clear()
        self.assertTrue(self.published.arrived.wait(10))
        self.assertEqual(self.published.messages[-1], (self.topic, b"", None))


class GateTests(unittest.TestCase):
    def test_requests_wait_for_the_cooldown_within_the_deadline(self):
        clock, slept = FakeClock(1_800_000_000.0), []
        cooldowns = Cooldowns("a", Published(), v5=lambda: True, clock=clock)
        cooldowns.met("p1", 429, 20)
        gate = ProviderGate("openai", "p1", cooldowns, RateLimiter(None, None), slept.append, clock)
        gate.before(time.monotonic() + 60)
        self.assertEqual(slept, [20])
        with self.assertRaises(LlmError) as caught:
            gate.before(time.monotonic() + 5)
        self.assertIn("openai is cooling down until", str(caught.exception))
        self.assertEqual(caught.exception.kind, "rate_limited")

    def test_the_fleet_gives_each_provider_its_gate_and_topic(self):
        fleet = Fleet(None)
        fleet.gate("openai", LlmSettings(provider="openai", api_key=Secret(KEY)), URL)
        self.assertEqual(fleet.topics(), [cooldown_topic(provider_id(URL, KEY))])


class RateLimiterTests(unittest.TestCase):
    def test_each_member_spaces_its_share_of_requests(self):
        clock, members = FakeClock(0.0), [4]
        limiter = RateLimiter(60, None, members=lambda: members[0], clock=clock)
        self.assertEqual([limiter.delay() for _ in range(3)], [0.0, 4.0, 8.0])  # 15 a minute each
        clock.now = 12.0
        members[0] = 2  # two left: each takes half
        self.assertEqual([limiter.delay() for _ in range(2)], [0.0, 2.0])

    def test_tokens_push_the_next_request_back_past_a_minutes_worth(self):
        clock = FakeClock(0.0)
        limiter = RateLimiter(None, 600, clock=clock)
        self.assertEqual(limiter.delay(), 0.0)
        limiter.spent(1200)  # two minutes' worth
        self.assertEqual(limiter.delay(), 60.0)

    def test_a_turn_after_the_deadline_fails_at_once(self):
        limiter = RateLimiter(1, None, clock=FakeClock(0.0))
        limiter.delay()
        with self.assertRaises(LlmError) as caught:
            limiter.wait(time.monotonic() + 5, lambda s: None, "openai")
        self.assertIn("client-side limit", str(caught.exception))


class RateLimitHeaderTests(unittest.TestCase):
    def test_retry_after_then_the_reset_headers_of_openai_and_anthropic(self):
        now = 1_800_000_000.0
        self.assertEqual(rate_limit_wait(429, {"Retry-After": "7"}, now), 7.0)
        self.assertEqual(rate_limit_wait(429, {"x-ratelimit-reset-requests": "1s",
                                               "x-ratelimit-reset-tokens": "6m0s"}, now), 360.0)
        self.assertEqual(rate_limit_wait(429, {"anthropic-ratelimit-requests-reset": utc_millis(now + 9)}, now), 9.0)
        self.assertIsNone(rate_limit_wait(503, {"x-ratelimit-reset-requests": "1s"}, now), "503 only with Retry-After")
        self.assertIsNone(rate_limit_wait(429, {"x-ratelimit-reset-requests": "soon"}, now))


class FailoverTests(unittest.TestCase):
    def test_a_cooling_provider_is_skipped_at_once_for_the_next(self):
        class Stub:
            def __init__(self, name, cooling):
                self.name, self._cooling, self.asked = name, cooling, 0

            def cooling(self):
                return self._cooling

            def chat(self, system, messages, tools, deadline):
                self.asked += 1
                return ChatReply(text=self.name)

        primary = Stub("primary", Cooldown(time.time() + 30, 429, "b"))
        fallback = Stub("fallback", None)
        chain = ProviderChain([primary, fallback])
        with self.assertLogs("agent2389.llm", "INFO") as logs:
            replies = [chain.chat("s", [], [], time.monotonic() + 10) for _ in range(3)]
        self.assertEqual(([reply.text for reply in replies], primary.asked), (["fallback"] * 3, 0))
        self.assertEqual(len(logs.output), 1, "said once per cooldown")
        self.assertIn("failing over to fallback at once", logs.output[0])


if __name__ == "__main__":
    unittest.main()
