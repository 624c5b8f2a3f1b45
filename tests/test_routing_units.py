"""Protocol v2 parts without a broker: the registry, routed envelopes, the routers against
loopback servers speaking the real wire formats, and the rules that end a workflow."""

import json
import os
import sys
import time
import unittest
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fake_llm import FakeAnthropic, FakeGatekeeper, FakeOpenAI, Hang, Reply, Status  # noqa: E402

from agent2389_lib import protocol, workflow  # noqa: E402
from agent2389_lib.config import GatekeeperSettings, LlmSettings, RoutingSettings, Secret  # noqa: E402
from agent2389_lib.events import Events, counted_in  # noqa: E402
from agent2389_lib.metrics import Metrics, prometheus_text  # noqa: E402
from agent2389_lib.discovery import Registry, parse_timestamp  # noqa: E402
from agent2389_lib.router import (GatekeeperRouter, LlmRouter, RouterError, RoutingRequest,  # noqa: E402
                                  WorkflowRouter, parse_decision)

KEY = "sk-test-key-0123456789"
NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=timezone.utc)


def status(agent_id, state="available", **extra):
    message = protocol.status_message(agent_id, state, now=NOW, heartbeat_interval=60, **extra)
    return f"/control/agents/{agent_id}/status", json.dumps(message).encode()


def v2_task(instruction="Write about MQTT", context=None, trace=None, agent="writer"):
    task = {"task_id": "6f1c7a52-3b7e-4bd4-9d8e-0c7b2a3f4e51", "conversation_id": "conv-1",
            "topic": f"/control/agents/{agent}/input", "instruction": instruction, "input": {"message": "hi"},
            "next": None, "version": "2.0"}
    if context is not None:
        task["context"] = context
    if trace is not None:
        task["routing_trace"] = trace
    return protocol.parse_envelope(json.dumps(task))


class RegistryTests(unittest.TestCase):
    def setUp(self):
        self.clock = NOW.timestamp()
        self.registry = Registry(clock=lambda: self.clock)

    def ids(self):
        return [a.agent_id for a in self.registry.routable()]

    def test_status_decides_and_empty_payload_removes(self):
        self.registry.observe(*status("writer", capabilities=["Writing"], description="writes"))
        self.registry.observe(*status("judge", capabilities=["review"]))
        self.assertEqual(self.ids(), ["judge", "writer"])
        self.registry.observe(*status("writer", "unavailable"))  # our Last Will / shutdown payload
        self.assertEqual(self.ids(), ["judge"])
        self.registry.observe("/control/agents/judge/status", b"")  # a cleared retained status
        self.assertEqual(self.ids(), [])

    def test_reference_shaped_status_accepted(self):
        rust = {"agent_id": "researcher", "status": "available", "timestamp": "2026-12-01T11:59:00.123456789+00:00",
                "capabilities": ["research"], "description": "Research agent"}
        self.registry.observe("/control/agents/researcher/status", json.dumps(rust).encode())
        (info,) = self.registry.routable()
        self.assertEqual((info.health, info.load, info.heartbeat_interval), ("ok", 0.0, 900))

    def test_a_reference_status_is_judged_against_the_reference_heartbeat(self):
        """It republishes every 900 s and does not say so: our 60 s would make it routable a fifth of the time."""
        rust = {"agent_id": "researcher", "status": "available", "timestamp": NOW.isoformat(),
                "capabilities": ["research"], "description": "Research agent"}
        self.registry.observe("/control/agents/researcher/status", json.dumps(rust).encode())
        self.clock += 899
        self.assertEqual(self.ids(), ["researcher"], "live between two of its heartbeats")
        self.clock += 3 * 900 - 899 + 1
        self.assertEqual(self.ids(), [], "stale after three of them")

    def test_garbage_ignored_and_counted(self):
        for payload in (b"not json", b"[1]", b'{"status": "dancing", "timestamp": "2026-12-01T12:00:00Z"}',
                        b'{"status": "available"}', b'{"status": "available", "timestamp": "yesterday"}',
                        b'{"status": "available", "timestamp": "2026-12-01T12:00:00Z", "load": "high"}',
                        b'{"status": "available", "timestamp": "2026-12-01T12:00:00Z", "capabilities": [1]}'):
            self.registry.observe("/control/agents/bad/status", payload)
        self.registry.observe("/control/agents/x/instances/y/status", b"garbage")  # not a discovery topic
        self.assertEqual((self.ids(), self.registry.ignored), ([], 7))

    def test_stale_after_three_heartbeats_of_the_published_time(self):
        self.registry.observe(*status("writer"))
        self.clock += 180
        self.assertEqual(self.ids(), ["writer"])
        self.clock += 1
        self.assertEqual(self.ids(), [])

    def test_unhealthy_not_routable_degraded_is(self):
        self.registry.observe(*status("busy", health="degraded", load=1.0))
        topic, payload = status("sick")
        sick = json.loads(payload)
        sick["health"] = "failing"
        self.registry.observe(topic, json.dumps(sick).encode())
        self.assertEqual(self.ids(), ["busy"])

    def test_best_by_capability_or_handles_lowest_load_then_id(self):
        self.registry.observe(*status("w2", capabilities=["writing"], load=0.5))
        self.registry.observe(*status("w1", capabilities=["WRITING"], load=0.5))
        topic, payload = status("w0", load=0.9)
        data = json.loads(payload)
        data["handles"] = ["Writing"]
        self.registry.observe(topic, json.dumps(data).encode())
        self.assertEqual(self.registry.find_best("writing").agent_id, "w1")
        self.registry.observe(*status("w2", capabilities=["writing"], load=0.1))
        self.assertEqual(self.registry.find_best("Writing").agent_id, "w2")
        self.assertIsNone(self.registry.find_best("cooking"))

    def test_timestamps(self):
        base = NOW.timestamp()
        self.assertEqual(parse_timestamp("2026-12-01T12:00:00Z"), base)
        self.assertEqual(parse_timestamp("2026-12-01T12:00:00.500+00:00"), base + 0.5)
        self.assertEqual(parse_timestamp("2026-12-01T13:00:00+01:00"), base)
        for bad in ("2026-13-01T12:00:00Z", "2026-12-01 12:00", 5, None):
            self.assertIsNone(parse_timestamp(bad))


class EnvelopeTests(unittest.TestCase):
    def test_routable(self):
        self.assertTrue(workflow.is_routable(v2_task()))
        for version in ("1.0", "1", "1.2"):
            envelope = protocol.parse_envelope(json.dumps({**json.loads(protocol.to_payload({
                "task_id": "6f1c7a52-3b7e-4bd4-9d8e-0c7b2a3f4e51", "conversation_id": "c", "topic": "/control/agents/a/input",
                "instruction": None, "input": None, "next": None})), "version": version}))
            self.assertFalse(workflow.is_routable(envelope), version)

    def test_routed_envelope(self):
        envelope = v2_task(context={"original_query": "q", "steps_completed": [], "iteration_count": 2}, trace=[])
        topic, out = workflow.routed_envelope(envelope, '{"draft": "text"}', "writer", "judge", "Review it", "needs review",
                                              now=NOW)
        self.assertEqual(topic, "/control/agents/judge/input")
        self.assertNotEqual(out["task_id"], envelope.task_id)
        self.assertEqual(str(protocol.normalize_uuid(out["task_id"])), out["task_id"])
        self.assertEqual((out["conversation_id"], out["topic"], out["instruction"], out["input"], out["next"], out["version"]),
                         ("conv-1", topic, "Review it", {"draft": "text"}, None, "2.0"))
        self.assertEqual(out["context"], {"original_query": "q", "iteration_count": 3, "steps_completed": [
            {"agent_id": "writer", "action": "Write about MQTT", "timestamp": "2026-12-01T12:00:00.000Z"}]})
        self.assertEqual(out["routing_trace"], [{"from_agent": "writer", "to_agent": "judge", "reason": "needs review",
                                                 "timestamp": "2026-12-01T12:00:00.000Z", "step_number": 1}])
        parsed = protocol.parse_envelope(protocol.to_payload(out))  # the next hop reads it as v2
        self.assertEqual(parsed.context["iteration_count"], 3)

    def test_first_hop_sets_query_text_input_and_caps(self):
        steps = [{"agent_id": "a", "action": str(i), "timestamp": "t"} for i in range(100)]
        trace = [{"from_agent": "a", "to_agent": "b", "reason": "r", "timestamp": "t", "step_number": i + 1}
                 for i in range(100)]
        _, first = workflow.routed_envelope(v2_task("x" * 300), "plain text", "writer", "judge", None, "r")
        self.assertEqual((first["context"]["original_query"], first["input"], first["context"]["iteration_count"]),
                         ("x" * 300, "plain text", 1))
        self.assertEqual(len(first["context"]["steps_completed"][0]["action"]), 200)
        _, capped = workflow.routed_envelope(
            v2_task(context={"original_query": "q", "steps_completed": steps, "iteration_count": 100}, trace=trace),
            "out", "writer", "judge", None, "r")
        self.assertEqual((len(capped["context"]["steps_completed"]), len(capped["routing_trace"])), (100, 100))
        self.assertEqual((capped["context"]["steps_completed"][-1]["agent_id"], capped["routing_trace"][-1]["step_number"]),
                         ("writer", 101))

    def test_workflow_response(self):
        trace = [{"from_agent": "a", "to_agent": "writer", "reason": "r", "timestamp": "t", "step_number": 1}]
        envelope = v2_task(context={"original_query": "q", "steps_completed": [
            {"agent_id": "a", "action": "x", "timestamp": "t"}], "iteration_count": 1}, trace=trace)
        message = workflow.workflow_response(envelope, "done", "writer", "router", now=NOW)
        self.assertEqual((message["response"], message["task_id"]), ("done", envelope.task_id))
        self.assertEqual(message["workflow"]["iterations"], 2)
        self.assertEqual([s["agent_id"] for s in message["workflow"]["steps_completed"]], ["a", "writer"])
        self.assertEqual(message["workflow"]["routing_trace"], trace)


def request_for(agents=()):
    return RoutingRequest("writer", workflow.workflow_of(v2_task()), "the draft", tuple(agents), 10)


class LlmRouterTests(unittest.TestCase):
    def settings(self, fake, provider="openai"):
        return LlmSettings(provider=provider, model="m", api_key=Secret(KEY), base_url=fake.base_url, temperature=0.1,
                           max_tokens=500, max_attempts=2, request_timeout=5.0)

    def test_openai_strict_json_schema(self):
        fake = FakeOpenAI()
        self.addCleanup(fake.close)
        fake.script.append(Reply(json.dumps({"workflow_complete": False, "reasoning": "needs review",
                                             "next_agent": "judge", "next_instruction": "Review"})))
        decision = LlmRouter(self.settings(fake)).decide(request_for(), None, time.monotonic() + 10)
        self.assertEqual((decision.complete, decision.next_agent, decision.next_instruction, decision.reasoning),
                         (False, "judge", "Review", "needs review"))
        body = fake.completions()[-1]["body"]  # the fake validated it against OpenAI's schema and strict rules
        self.assertEqual(body["response_format"]["type"], "json_schema")
        self.assertTrue(body["response_format"]["json_schema"]["strict"])
        self.assertEqual((body["temperature"], body["max_tokens"]), (0.1, 500))
        prompt = body["messages"][-1]["content"]
        self.assertIn("iteration 1 of at most 10", prompt)
        self.assertIn("CURRENT AGENT: writer", prompt)

    def test_strict_schema_is_what_openai_demands(self):
        from agent2389_lib.router import DECISION_SCHEMA
        FakeOpenAI.check_strict_schema(DECISION_SCHEMA, "routing_decision")
        loose = dict(DECISION_SCHEMA, required=["workflow_complete"])  # the reference's schema
        with self.assertRaises(Exception):
            FakeOpenAI.check_strict_schema(loose, "x")

    def test_anthropic_forced_tool(self):
        fake = FakeAnthropic()
        self.addCleanup(fake.close)
        fake.script.append(Reply(tool_calls=[("routing_decision", {"workflow_complete": True, "reasoning": "done",
                                                                   "next_agent": None, "next_instruction": None})]))
        decision = LlmRouter(self.settings(fake, "anthropic")).decide(request_for(), None, time.monotonic() + 10)
        self.assertTrue(decision.complete)
        body = fake.completions()[-1]["body"]
        self.assertEqual(body["tool_choice"], {"type": "tool", "name": "routing_decision"})
        self.assertEqual(body["tools"][0]["input_schema"]["required"],
                         ["workflow_complete", "reasoning", "next_agent", "next_instruction"])

    def test_compatible_server_without_structured_output(self):
        fake = FakeOpenAI()
        self.addCleanup(fake.close)
        fake.script += [Status(400, body=FakeOpenAI.error_body("invalid_request_error", "response_format is not supported")),
                        Reply('Sure! ```json\n{"workflow_complete": true, "reasoning": "ok"}\n```'),
                        Reply('{"workflow_complete": true}')]
        router = LlmRouter(self.settings(fake))
        with self.assertLogs("agent2389.router", "WARNING"):
            self.assertTrue(router.decide(request_for(), None, time.monotonic() + 10).complete)
        self.assertTrue(router.decide(request_for(), None, time.monotonic() + 10).complete)
        self.assertEqual(["response_format" in r["body"] for r in fake.completions()], [True, False, False])

    def test_invalid_answers(self):
        for data in (None, [], {"workflow_complete": "yes"}, {"workflow_complete": False, "next_agent": 5}):
            with self.assertRaises(RouterError):
                parse_decision(data)


class GatekeeperTests(unittest.TestCase):
    def setUp(self):
        self.fake = FakeGatekeeper()
        self.addCleanup(self.fake.close)

    def router(self, timeout_ms=2000, attempts=3):
        return GatekeeperRouter(GatekeeperSettings(self.fake.url, timeout_ms, attempts))

    def test_request_shape_and_5xx_retry(self):
        from agent2389_lib.discovery import AgentInfo
        self.fake.script += [Status(503), {"workflow_complete": False, "next_agent": "judge", "next_instruction": "go"}]
        judge = AgentInfo("judge", ("review",), "reviews", "ok", 0.25, 0.0, 60)
        decision = self.router().decide(request_for([judge]), None, time.monotonic() + 30)
        self.assertEqual(decision.next_agent, "judge")
        first, second = self.fake.completions()
        self.assertEqual(first["body"], second["body"])
        self.assertEqual(second["body"]["available_agents"],
                         [{"agent_id": "judge", "capabilities": ["review"], "load": 0.25, "description": "reviews"}])
        self.assertEqual((second["body"]["original_query"], second["body"]["iteration_count"]), ("Write about MQTT", 0))

    def test_timeout(self):
        """The gatekeeper's failures are the router's (RouterError), not an LLM error of the task."""
        self.fake.script += [Hang(1.5, then={"workflow_complete": True})] * 2
        started = time.monotonic()
        with self.assertRaises(RouterError) as caught:
            self.router(timeout_ms=300, attempts=2).decide(request_for(), None, time.monotonic() + 30)
        self.assertRegex(str(caught.exception),
                         r"^timed out talking to http://127\.0\.0\.1:\d+/route \(after 2 attempts\)$")
        self.assertLess(time.monotonic() - started, 1.5)

    def test_4xx_not_retried(self):
        self.fake.script += [Status(404)]
        with self.assertRaises(RouterError):
            self.router().decide(request_for(), None, time.monotonic() + 30)
        self.assertEqual(len(self.fake.completions()), 1)


class ScriptedRouter:
    def __init__(self, *decisions):
        self.decisions = list(decisions)
        self.feedback = []

    def budget(self):
        return 5.0

    def decide(self, request, feedback, deadline):
        self.feedback.append(feedback)
        item = self.decisions.pop(0)
        if isinstance(item, Exception):
            raise item
        return parse_decision(item)


class WorkflowRouterTests(unittest.TestCase):
    def setUp(self):
        self.registry = Registry()
        for agent in ("writer", "judge"):
            self.registry.observe(*status(agent, capabilities=["review"] if agent == "judge" else ["writing"]))
        self.registry.clock = lambda: NOW.timestamp()
        self.metrics = Metrics("writer", 4)
        self.events = []

    def hop(self, router, envelope=None, max_iterations=10):
        events = Events(counted_in(self.metrics), lambda event: self.events.extend(filter(None, [event.progress()])))
        workflow = WorkflowRouter("writer", RoutingSettings("llm", max_iterations), self.registry, router, events)
        outcome = workflow.next_step(envelope or v2_task(), "the draft", time.monotonic() + 60)
        return outcome.topic, outcome.message

    def test_forward_emits_routing_progress(self):
        topic, message = self.hop(ScriptedRouter({"workflow_complete": False, "reasoning": "check it",
                                                  "next_agent": "judge", "next_instruction": "Review"}))
        self.assertEqual((topic, message["input"], message["routing_trace"][0]["reason"]),
                         ("/control/agents/judge/input", "the draft", "check it"))
        (event,) = self.events
        self.assertEqual(event[2:4], ("General", "Custom"))
        self.assertEqual(event[5], {"kind": "routing", "next_agent": "judge", "reasoning": "check it", "iteration": 1})

    def test_capability_resolves_to_agent(self):
        topic, _ = self.hop(ScriptedRouter({"workflow_complete": False, "next_agent": "Review"}))
        self.assertEqual(topic, "/control/agents/judge/input")

    def test_unknown_agent_gets_one_corrective_retry_then_router_error(self):
        router = ScriptedRouter({"workflow_complete": False, "next_agent": "ghost"},
                                {"workflow_complete": False, "next_agent": "ghost"})
        with self.assertLogs("agent2389.router", "WARNING"):
            topic, message = self.hop(router)
        self.assertEqual(topic, "/conversations/conv-1/writer")
        self.assertEqual((message["response"], message["workflow"]["reason"]), ("the draft", "router_error"))
        self.assertIsNone(router.feedback[0])
        self.assertIn("'ghost' is not an available agent; choose one of: judge, writer", router.feedback[1])

    def test_corrective_retry_can_succeed(self):
        router = ScriptedRouter(RouterError("nonsense"), {"workflow_complete": True})
        _, message = self.hop(router)
        self.assertEqual(message["workflow"]["reason"], "router")
        self.assertIn("nonsense", router.feedback[1])

    def test_self_only_when_named_twice_in_a_row(self):
        again = {"workflow_complete": False, "next_agent": "writer", "next_instruction": "Polish"}
        topic, _ = self.hop(ScriptedRouter(again, again))
        self.assertEqual(topic, "/control/agents/writer/input")
        with self.assertLogs("agent2389.router", "WARNING"):
            topic, message = self.hop(ScriptedRouter(again, {"workflow_complete": False, "next_agent": "nobody"}))
        self.assertEqual(message["workflow"]["reason"], "router_error")

    def test_max_iterations_stops_without_asking(self):
        router = ScriptedRouter()
        envelope = v2_task(context={"original_query": "q", "steps_completed": [], "iteration_count": 2})
        _, message = self.hop(router, envelope, max_iterations=3)
        self.assertEqual((message["workflow"]["reason"], message["workflow"]["iterations"]), ("max_iterations", 3))
        self.assertEqual(router.feedback, [])
        text = prometheus_text(self.metrics.read())
        self.assertIn('agent2389_routing_decisions_total{outcome="max_iterations"} 1', text)
        self.assertIn("agent2389_registry_agents 0", text)  # the runtime wires the registry in


if __name__ == "__main__":
    unittest.main()
