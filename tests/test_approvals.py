"""Approvals on the wire (PROTOCOL.md 9): requests with masked arguments, hostile decisions."""

import json
import time
import unittest

from agent2389_lib.approvals import (Decision, DecisionError, approval_id_of, decision_topic, new_approval_id,
                                     parse_decision, request_message)


class DecisionTests(unittest.TestCase):
    def test_a_decision_is_read(self):
        self.assertEqual(parse_decision(b'{"decision": "approve", "by": "ops", "reason": "ok"}'),
                         Decision(True, "ops", "ok"))
        self.assertEqual(parse_decision(b'{"decision": "deny"}'), Decision(False, "someone", ""))
        self.assertEqual(parse_decision(b'{"decision": "approve", "content": {"name": "x"}}').content, {"name": "x"})

    def test_hostile_decisions_say_what_is_wrong(self):
        for payload, text in ((b"{", "not JSON"), (b"[]", "JSON object"), (b'{"decision": "yes"}', '"approve" or'),
                              (b'{"decision": "approve", "by": 5}', "by must be"),
                              (json.dumps({"decision": "deny", "reason": "x" * 501}).encode(), "reason must be"),
                              (b'{"decision": "approve", "content": [1]}', "content must be"),
                              (b"x" * 70000, "bytes is over"), (b"\xff", "not JSON")):
            with self.subTest(payload=payload[:30]):
                with self.assertRaises(DecisionError) as caught:
                    parse_decision(payload)
                self.assertIn(text, str(caught.exception))

    def test_topics_name_the_approval(self):
        ident = new_approval_id()
        self.assertEqual(approval_id_of(decision_topic("deployer", ident)), ident)
        for topic in ("/control/agents/a/approvals/short/decision", "/control/agents/a/approvals/x" * 2,
                      f"/control/agents/a/approvals/{ident}"):
            self.assertIsNone(approval_id_of(topic))


class RequestTests(unittest.TestCase):
    def test_secrets_in_the_arguments_are_masked_as_in_logs(self):
        request = request_message("a" * 32, "t", "c", "tool", "deploy",
                                  {"target": "prod", "api_key": "k-123", "url": "https://u:pw@host/x",
                                   "notes": ["the sentinel S3CRET-9 here"]}, "2026-01-01T00:00:00.000Z",
                                  "2026-01-01T00:15:00.000Z", secrets=("S3CRET-9",))
        self.assertEqual(request["arguments"]["target"], "prod")
        self.assertEqual(request["arguments"]["api_key"], "[REDACTED]")
        text = json.dumps(request)
        for secret in ("k-123", ":pw@", "S3CRET-9"):
            self.assertNotIn(secret, text)


if __name__ == "__main__":
    unittest.main()


class LoopParkingTests(unittest.TestCase):
    """The tool-calling loop stops at a call that needs approval and goes on from its state."""

    def test_a_call_needing_approval_parks_and_the_loop_resumes_from_json(self):
        from agent2389_lib.config import BudgetSettings
        from agent2389_lib.events import Events
        from agent2389_lib.llm.base import ChatReply, ToolCall
        from agent2389_lib.llm.loop import AgentLoop, ApprovalNeeded, LoopState
        from support import envelope
        from agent2389_lib.protocol import parse_envelope

        class Chain:
            def __init__(self):
                self.asked = []

            def chat(self, system, messages, tools, deadline):
                self.asked.append([m.role for m in messages])
                if len(self.asked) == 1:
                    return ChatReply("", (ToolCall("c1", "safe", {}), ToolCall("c2", "deploy", {"to": "prod"})),
                                     "tool_calls")
                return ChatReply("done")

        class Tools:
            ran = []

            def definitions(self):
                return [object()]

            def approval_timeout(self, name):
                return 60 if name == "deploy" else None

            def execute(self, name, arguments, deadline):
                self.ran.append(name)
                return True, f"{name} ran"

        chain, tools = Chain(), Tools()
        loop = AgentLoop(chain, tools, BudgetSettings(), "system", Events())
        task = parse_envelope(json.dumps(envelope("a1")))
        with self.assertRaises(ApprovalNeeded) as caught:
            loop.think(task, time.monotonic() + 60)
        parked = caught.exception
        self.assertEqual((parked.call.name, parked.timeout, tools.ran), ("deploy", 60, ["safe"]))
        state = LoopState.from_json(json.loads(json.dumps(parked.state.to_json())))  # as the store keeps it
        self.assertEqual(loop.resume(task, state, None, time.monotonic() + 60), "done")
        self.assertEqual(chain.asked[-1], ["user", "assistant", "tool", "tool"])
        self.assertEqual((state.tool_calls, tools.ran), (2, ["safe", "deploy"]), "approved: it ran")


class ParkedStoreTests(unittest.TestCase):
    def test_a_parked_task_survives_a_restart_and_moves_on_once(self):
        import tempfile
        from agent2389_lib.dedupe import DedupeStore
        directory = tempfile.mkdtemp()
        store = DedupeStore(100, directory, "deployer")
        store.park("a" * 32, {"state": "waiting", "task_id": "t1"})
        self.assertIsNotNone(store.advance("a" * 32, "waiting", state="decided", decision={"approve": True}))
        self.assertIsNone(store.advance("a" * 32, "waiting", state="decided"), "a second decision finds it moved")
        store.close()
        reopened = DedupeStore(100, directory, "deployer")
        self.assertEqual(reopened.parked(), {"a" * 32: {"state": "decided", "task_id": "t1",
                                                        "decision": {"approve": True}}})
        reopened.unpark("a" * 32)
        reopened.close()
        self.assertEqual(DedupeStore(100, directory, "deployer").parked(), {})


class ParkingTests(unittest.TestCase):
    def test_a_task_that_needs_approval_is_parked_acknowledged_and_asked_for(self):
        from agent2389_lib.llm.base import Message, ToolCall
        from agent2389_lib.llm.loop import ApprovalNeeded, LoopState
        from support import envelope
        from test_processor import AGENT, ProcessorTestCase

        case = ProcessorTestCase()

        def think(task, deadline):
            state = LoopState([Message("user", "deploy it")], 1, 0, [ToolCall("c1", "deploy", {"to": "prod"})])
            raise ApprovalNeeded(state, state.pending[0], 600)

        case.make(think=think)
        task = envelope(AGENT)
        delivery = case.deliver(task)
        self.assertEqual(delivery.acks, 1, "the store owns the task now")
        ((topic, request),) = case.publisher.published()
        (approval_id, record), = case.store.parked().items()
        self.assertEqual(topic, f"/control/agents/{AGENT}/approvals/{approval_id}")
        self.assertEqual((request["kind"], request["tool"], request["arguments"], request["task_id"]),
                         ("tool", "deploy", {"to": "prod"}, task["task_id"]))
        self.assertEqual((record["state"], record["loop"]["pending"][0]["name"]), ("waiting", "deploy"))
        self.assertEqual(case.metrics.snapshot()["tasks"]["tasks_parked"], 1)
        case.journal.clear()
        redelivered = case.deliver(task)
        self.assertEqual((redelivered.acks, case.publisher.published()), (1, []), "a redelivery is a duplicate")
