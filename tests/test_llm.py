"""Providers and the agent loop against loopback servers speaking the real API formats."""

import io
import email.utils
import json
import logging
import time
import tracemalloc
import unittest
from dataclasses import replace

from fake_llm import FakeAnthropic, FakeOpenAI, Hang, Raw, Reply, Status
from support import free_port

from agent2389_lib.config import AgentConfig, BudgetSettings, LlmSettings, Secret, ToolSpec
from agent2389_lib.errors import LlmError, TaskTimeout
from agent2389_lib.llm import build_agent_loop
from agent2389_lib.jsonhttp import retry_after_seconds
from agent2389_lib.logs import configure_logging
from agent2389_lib.protocol import parse_envelope
from agent2389_lib.tools import build_registry

OPENAI_KEY = "sk-openai-test-key-0123456789"
ANTHROPIC_KEY = "sk-ant-test-key-0123456789"
TASK = "123e4567-e89b-12d3-a456-426614174000"


def task(instruction="Summarise", input=None):
    return parse_envelope(json.dumps({"task_id": TASK, "conversation_id": "c", "topic": "/t",
                                      "instruction": instruction, "input": input}))


def llm_settings(fake, provider, key, **over):
    fields = dict(provider=provider, model="model-x", api_key=Secret(key), base_url=fake.base_url,
                  system_prompt="You are a test.", max_attempts=4, request_timeout=10.0)
    return LlmSettings(**{**fields, **over})


def loop_for(llm, tools=("echo",), budget=BudgetSettings()):
    config = AgentConfig(agent_id="tester", llm=llm, budget=budget,
                         tools=tuple(ToolSpec(name=t, kind="builtin") for t in tools))
    return build_agent_loop(config, build_registry(config) if tools else None)


class ProviderCase(unittest.TestCase):
    provider = "openai"
    fake_class = FakeOpenAI
    key = OPENAI_KEY

    def setUp(self):
        self.fake = self.fake_class(api_key=self.key)
        self.addCleanup(self.fake.close)
        self.log = io.StringIO()
        configure_logging("DEBUG", "json", (), stream=self.log)  # no secrets registered: nothing to mask
        self.addCleanup(lambda: self.assertNotIn(self.key, self.log.getvalue(), "an API key reached the logs"))
        self.addCleanup(logging.getLogger().handlers.clear)

    def loop(self, tools=("echo",), budget=BudgetSettings(), **over):
        return loop_for(llm_settings(self.fake, self.provider, self.key, **over), tools, budget)

    def think(self, loop, envelope=None, seconds=20.0):
        return loop.think(envelope or task(), time.monotonic() + seconds)

    def last_messages(self):
        return self.fake.completions()[-1]["body"]["messages"]


class OpenAITests(ProviderCase):
    def test_plain_completion(self):
        self.fake.script = [Reply("the answer")]
        self.assertEqual(self.think(self.loop(tools=()), task("Summarise", {"text": "x"})), "the answer")
        (request,) = self.fake.completions()
        body = request["body"]
        self.assertEqual(request["headers"]["Authorization"], f"Bearer {OPENAI_KEY}")
        self.assertEqual(body["model"], "model-x")
        self.assertNotIn("tools", body)
        self.assertEqual(body["messages"][0]["role"], "system")
        self.assertIn("You are a test.", body["messages"][0]["content"])
        self.assertIn("Current UTC time:", body["messages"][0]["content"])
        self.assertEqual(body["messages"][1:], [{"role": "user", "content": "Summarise"},
                                                {"role": "user", "content": 'Input data: {"text":"x"}'}])

    def test_temperature_and_max_tokens_passed(self):
        self.think(self.loop(tools=(), temperature=0.3, max_tokens=123))
        body = self.fake.completions()[0]["body"]
        self.assertEqual((body["temperature"], body["max_tokens"]), (0.3, 123))

    def test_tool_round_trip(self):
        self.fake.script = [Reply(tool_calls=[("echo", {"message": "hello tool"})]), Reply("done")]
        self.assertEqual(self.think(self.loop()), "done")
        first, second = self.fake.completions()
        self.assertEqual(first["body"]["tools"][0]["function"]["name"], "echo")
        self.assertEqual(first["body"]["tools"][0]["function"]["parameters"]["required"], ["message"])
        assistant, result = second["body"]["messages"][-2:]
        self.assertEqual(assistant["tool_calls"][0]["function"], {"name": "echo", "arguments": '{"message":"hello tool"}'})
        self.assertEqual(result, {"role": "tool", "tool_call_id": assistant["tool_calls"][0]["id"],
                                  "content": "hello tool"})

    def test_multiple_tool_calls_in_one_turn(self):
        self.fake.script = [Reply(tool_calls=[("echo", {"message": "one"}), ("echo", {"message": "two"})]),
                            Reply("both done")]
        self.assertEqual(self.think(self.loop()), "both done")
        results = [m for m in self.last_messages() if m["role"] == "tool"]
        self.assertEqual([r["content"] for r in results], ["one", "two"])

    def test_invalid_tool_call_goes_back_as_error(self):
        self.fake.script = [Reply(tool_calls=[("echo", {"wrong": 1}), ("rm_rf", {})]), Reply("recovered")]
        self.assertEqual(self.think(self.loop()), "recovered")
        results = [m["content"] for m in self.last_messages() if m["role"] == "tool"]
        self.assertIn("invalid parameters for echo: $: 'message' is a required property", results[0])
        self.assertIn("unknown tool 'rm_rf'; the available tools are: echo", results[1])

    def test_429_retry_after_honoured(self):
        self.fake.script = [Status(429, {"Retry-After": "1"}), Reply("after wait")]
        self.assertEqual(self.think(self.loop(tools=())), "after wait")
        first, second = self.fake.completions()
        self.assertGreaterEqual(second["at"] - first["at"], 1.0)

    def test_429_retry_after_as_an_http_date_honoured(self):
        later = email.utils.formatdate(time.time() + 2, usegmt=True)  # whole seconds: 1 to 2 s from now
        self.fake.script = [Status(429, {"Retry-After": later}), Reply("after the date")]
        self.assertEqual(self.think(self.loop(tools=())), "after the date")
        first, second = self.fake.completions()
        self.assertGreaterEqual(second["at"] - first["at"], 0.9)

    def test_500_then_200_recovers(self):
        self.fake.script = [Status(500), Status(503), Reply("recovered")]
        self.assertEqual(self.think(self.loop(tools=())), "recovered")
        self.assertEqual(len(self.fake.completions()), 3)

    def test_retries_exhausted(self):
        self.fake.script = [Status(500)] * 4
        with self.assertRaises(LlmError) as caught:
            self.think(self.loop(tools=(), max_attempts=2))
        self.assertIn("HTTP 500", str(caught.exception))
        self.assertIn("after 2 attempts", str(caught.exception))

    def test_401_fails_at_once_without_the_key(self):
        loop = loop_for(replace(llm_settings(self.fake, "openai", OPENAI_KEY), api_key=Secret("sk-wrong-key-999")),
                        ())
        with self.assertRaises(LlmError) as caught:
            self.think(loop)
        self.assertEqual(len(self.fake.completions()), 1)
        self.assertIn("rejected the API key (HTTP 401", str(caught.exception))
        self.assertNotIn("sk-wrong-key-999", str(caught.exception))

    def test_other_4xx_not_retried(self):
        self.fake.script = [Status(404, body={"error": {"message": "The model `x` does not exist", "type":
                                                        "invalid_request_error", "code": "model_not_found"}})]
        with self.assertRaises(LlmError) as caught:
            self.think(self.loop(tools=()))
        self.assertIn("model_not_found", str(caught.exception))
        self.assertEqual(len(self.fake.completions()), 1)

    def test_deadline_stops_retries(self):
        self.fake.script = [Status(429, {"Retry-After": "30"})]
        started = time.monotonic()
        with self.assertRaises(LlmError) as caught:
            self.think(self.loop(tools=()), seconds=3)
        self.assertLess(time.monotonic() - started, 2.5)
        self.assertIn("deadline", str(caught.exception))
        self.assertEqual(len(self.fake.completions()), 1)

    def test_hanging_server_bounded_by_deadline(self):
        self.fake.script = [Hang(3), Reply("too late")]
        started = time.monotonic()
        with self.assertRaises((LlmError, TaskTimeout)):
            self.think(self.loop(tools=()), seconds=1)
        self.assertLess(time.monotonic() - started, 2.5)

    def test_trickling_body_is_cut_at_the_deadline(self):
        self.fake.script = [Raw((b" " for _ in range(100)), length=100, pause=0.5)]
        with self.assertRaises(LlmError) as caught:
            self.think(self.loop(tools=()), seconds=2)
        self.assertIn("was still sending its answer", str(caught.exception))
        self.assertEqual(caught.exception.kind, "timeout")

    def test_body_over_max_response_bytes_is_an_llm_error_not_memory(self):
        chunk = b"x" * 65536
        self.fake.script = [Raw((chunk for _ in range(800)), length=800 * len(chunk))]  # 50 MiB
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        with self.assertRaises(LlmError) as caught:
            self.think(self.loop(tools=()))
        peak = tracemalloc.get_traced_memory()[1]
        self.assertIn("is over the 8388608-byte limit (max_response_bytes)", str(caught.exception))
        self.assertLess(peak, 24 * 2 ** 20)

    def test_body_shorter_than_its_content_length_is_retried(self):
        self.fake.script = [Raw([b'{"id": "chatcmpl-1", "choices": ['], length=5000), Reply("whole")]
        self.assertEqual(self.think(self.loop(tools=())), "whole")
        self.assertEqual(len(self.fake.completions()), 2)

    def test_content_given_as_a_list_of_parts(self):
        body = {"id": "chatcmpl-2", "object": "chat.completion", "created": 1700000000, "model": "model-x",
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": [
                    {"type": "text", "text": "one "}, {"type": "text", "text": "two"}]}}]}
        self.fake.script = [Raw([json.dumps(body).encode()])]
        self.assertEqual(self.think(self.loop(tools=())), "one two")

    def test_budget_exhaustion_produces_final_answer(self):
        forever = [Reply(tool_calls=[("echo", {"message": f"call {i}"})]) for i in range(2)]
        self.fake.script = forever + [Reply("final best answer")]
        answer = self.think(self.loop(budget=BudgetSettings(max_tool_calls=15, max_iterations=3)))
        self.assertEqual(answer, "final best answer")
        requests = self.fake.completions()
        self.assertEqual(len(requests), 3)
        self.assertIn("tools", requests[1]["body"])
        self.assertNotIn("tools", requests[2]["body"])
        self.assertIn("budget", requests[2]["body"]["messages"][-1]["content"])

    def test_tool_budget(self):
        self.fake.script = [Reply(tool_calls=[("echo", {"message": "a"}), ("echo", {"message": "b"})]),
                            Reply("final")]
        self.assertEqual(self.think(self.loop(budget=BudgetSettings(max_tool_calls=1, max_iterations=8))), "final")
        results = [m["content"] for m in self.last_messages() if m["role"] == "tool"]
        self.assertEqual(results[0], "a")
        self.assertIn("budget", results[1])
        self.assertNotIn("tools", self.fake.completions()[-1]["body"])

    def test_verify(self):
        self.loop().chain.verify()
        self.assertEqual(self.fake.requests[-1]["path"], "/v1/models")
        wrong = loop_for(replace(llm_settings(self.fake, "openai", OPENAI_KEY), api_key=Secret("sk-nope-1234")), ())
        with self.assertRaises(LlmError) as caught:
            wrong.chain.verify()
        self.assertIn(f"rejected the API key (HTTP 401 from {self.fake.base_url}/models)", str(caught.exception))
        closed = free_port()  # nothing listens there
        unreachable = replace(llm_settings(self.fake, "openai", OPENAI_KEY), base_url=f"http://127.0.0.1:{closed}/v1")
        with self.assertRaises(LlmError) as caught:
            loop_for(unreachable, ()).chain.verify()
        self.assertIn(f"http://127.0.0.1:{closed}/v1/models is unreachable: Connection refused", str(caught.exception))


class AnthropicTests(ProviderCase):
    provider = "anthropic"
    fake_class = FakeAnthropic
    key = ANTHROPIC_KEY

    def test_plain_completion(self):
        self.fake.script = [Reply("claude says")]
        self.assertEqual(self.think(self.loop(tools=()), task("Go", {"k": 1})), "claude says")
        (request,) = self.fake.completions()
        self.assertEqual((request["headers"]["x-api-key"], request["headers"]["anthropic-version"]),
                         (ANTHROPIC_KEY, "2023-06-01"))
        body = request["body"]
        self.assertEqual(body["max_tokens"], 4096)
        self.assertIn("You are a test.", body["system"])
        self.assertEqual(body["messages"], [{"role": "user", "content": [
            {"type": "text", "text": "Go"}, {"type": "text", "text": 'Input data: {"k":1}'}]}])

    def test_tool_round_trip_and_text_blocks(self):
        self.fake.script = [Reply("let me check", tool_calls=[("echo", {"message": "ping"})]), Reply("pong received")]
        self.assertEqual(self.think(self.loop()), "pong received")
        first, second = self.fake.completions()
        self.assertEqual(first["body"]["tools"][0]["name"], "echo")
        self.assertIn("input_schema", first["body"]["tools"][0])
        assistant, user = second["body"]["messages"][-2:]
        tool_use = assistant["content"][-1]
        self.assertEqual((tool_use["type"], tool_use["input"]), ("tool_use", {"message": "ping"}))
        self.assertEqual(user["content"][0], {"type": "tool_result", "tool_use_id": tool_use["id"],
                                              "content": "ping", "is_error": False})

    def test_multiple_tool_calls_and_budget_message_alternate(self):
        self.fake.script = [Reply(tool_calls=[("echo", {"message": "1"}), ("echo", {"message": "2"})]),
                            Reply(tool_calls=[("echo", {"message": "3"})]), Reply("final")]
        answer = self.think(self.loop(budget=BudgetSettings(max_tool_calls=15, max_iterations=3)))
        self.assertEqual(answer, "final")  # the fake rejects non-alternating roles with 400
        last = self.fake.completions()[-1]["body"]["messages"][-1]["content"]
        self.assertEqual([b["type"] for b in last], ["tool_result", "text"])

    def test_529_overloaded_retried(self):
        overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        self.fake.script = [Status(529, body=overloaded), Reply("after overload")]
        self.assertEqual(self.think(self.loop(tools=())), "after overload")
        self.assertEqual(len(self.fake.completions()), 2)

    def test_401_without_key_in_error(self):
        loop = loop_for(replace(llm_settings(self.fake, "anthropic", ANTHROPIC_KEY), api_key=Secret("sk-ant-bad-77")),
                        ())
        with self.assertRaises(LlmError) as caught:
            self.think(loop)
        self.assertNotIn("sk-ant-bad-77", str(caught.exception))
        self.assertEqual(len(self.fake.completions()), 1)

    def test_verify_uses_models_endpoint(self):
        self.loop().chain.verify()
        self.assertEqual(self.fake.requests[-1]["path"], "/v1/models")
        self.assertEqual(self.fake.completions(), [])


class FailoverTests(unittest.TestCase):
    def test_second_provider_answers(self):
        primary, secondary = FakeOpenAI(api_key=OPENAI_KEY), FakeAnthropic(api_key=ANTHROPIC_KEY)
        self.addCleanup(primary.close)
        self.addCleanup(secondary.close)
        primary.script = [Status(500)] * 2
        secondary.script = [Reply("from the fallback")]
        llm = replace(llm_settings(primary, "openai", OPENAI_KEY, max_attempts=2),
                      fallback=(llm_settings(secondary, "anthropic", ANTHROPIC_KEY),))
        loop = loop_for(llm, ())
        self.assertEqual(loop.think(task(), time.monotonic() + 20), "from the fallback")
        self.assertEqual((len(primary.completions()), len(secondary.completions())), (2, 1))


class EchoProviderTests(unittest.TestCase):
    def test_deterministic_text(self):
        loop = loop_for(LlmSettings(provider="echo"), ())
        self.assertEqual(loop.think(task("Hi", {"a": 1}), time.monotonic() + 5), 'Hi\nInput data: {"a":1}')

    def test_tool_request_through_validated_tool_path(self):
        loop = loop_for(LlmSettings(provider="echo"))
        request = {"tool_request": {"name": "echo", "parameters": {"message": "via tool"}}}
        self.assertEqual(loop.think(task(None, request), time.monotonic() + 5), "via tool")
        bad = {"tool_request": {"name": "echo", "parameters": {"nope": 1}}}
        self.assertIn("invalid parameters for echo", loop.think(task(None, bad), time.monotonic() + 5))


class RetryAfterTests(unittest.TestCase):
    def test_forms(self):
        self.assertEqual(retry_after_seconds("3"), 3.0)
        self.assertEqual(retry_after_seconds("0.5"), 0.5)
        self.assertIsNone(retry_after_seconds(None))
        self.assertIsNone(retry_after_seconds("soon"))
        self.assertAlmostEqual(retry_after_seconds("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0), 10.0)
        self.assertEqual(retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0), 0.0)


if __name__ == "__main__":
    unittest.main()
