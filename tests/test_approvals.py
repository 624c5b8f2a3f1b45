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


class DeskTests(unittest.TestCase):
    """approvaldesk.ApprovalDesk with the test's clock: decisions counted once, the clock's
    denials, recovery at startup, cancels, and an MCP question answered."""

    def setUp(self):
        from agent2389_lib.approvaldesk import ApprovalDesk
        from agent2389_lib.dedupe import DedupeStore
        from agent2389_lib.events import Events
        from support import FakeClock
        self.clock = FakeClock()
        self.store = DedupeStore(100)
        self.published, self.resumed, self.decided = [], [], []
        events = Events(lambda event: self.decided.append(event) if hasattr(event, "outcome") else None)
        self.desk = ApprovalDesk("deployer", self.store, lambda topic, payload, expiry: self.published.append(
            (topic, payload, expiry)), self.resumed.append, events, clock=self.clock)
        self.addCleanup(self.desk.stop)

    def park(self, state="waiting", until=1600.0, **extra) -> str:
        approval_id = new_approval_id()
        self.store.park(approval_id, {"state": state, "task_id": f"task-{approval_id[:6]}", "asked_at": 1000.0,
                                      "until": until, **extra})
        return approval_id

    def test_a_decision_counts_once_however_often_it_comes(self):
        from agent2389_lib.approvaldesk import Resume
        approval_id = self.park()
        self.clock.now += 42
        for _ in range(3):
            self.desk.receive(decision_topic("deployer", approval_id), b'{"decision": "approve", "by": "ops"}')
        self.assertEqual(self.resumed, [Resume(approval_id)])
        self.assertEqual([(e.outcome, e.seconds) for e in self.decided], [("approved", 42.0)])
        record = self.store.parked()[approval_id]
        self.assertEqual((record["state"], record["decision"]["by"]), ("decided", "ops"))

    def test_hostile_decisions_are_logged_once_a_minute_and_change_nothing(self):
        approval_id = self.park()
        with self.assertLogs("agent2389.approvals", "INFO") as logs:
            for payload in (b"{", b'{"decision": "yes"}', b"[]"):
                self.desk.receive(decision_topic("deployer", approval_id), payload)
            self.desk.receive(decision_topic("deployer", "unknown-approval"), b'{"decision": "approve"}')
            self.desk.receive("/control/agents/deployer/approvals/x/decision", b'{"decision": "approve"}')
        self.assertEqual(len(logs.output), 2, logs.output)  # one malformed, one unknown: the rest throttled
        self.assertEqual((self.resumed, self.store.parked()[approval_id]["state"], self.desk.pending()),
                         ([], "waiting", 1))

    def test_nobody_deciding_in_time_and_a_cancel_are_denials(self):
        timed_out, canceled = self.park(), self.park()
        self.desk.expire(timed_out)
        self.assertTrue(self.desk.waits(self.store.parked()[canceled]["task_id"]))
        self.assertTrue(self.desk.cancel_task(self.store.parked()[canceled]["task_id"], "enough"))
        self.assertEqual([e.outcome for e in self.decided], ["timeout", "canceled"])
        self.assertEqual(self.store.parked()[canceled]["decision"]["reason"], "enough")
        self.assertFalse(self.desk.cancel_task("task-unknown", ""))

    def test_at_startup_waiting_ones_wait_again_and_decided_or_running_ones_resume(self):
        from agent2389_lib.approvaldesk import Resume
        from support import wait_until
        waiting, overdue = self.park(until=1600.0), self.park(until=999.0)
        decided = self.park(state="decided", decision={"approve": True, "by": "a", "reason": "", "content": None})
        running = self.park(state="running", tool_started=True,
                            decision={"approve": True, "by": "a", "reason": "", "content": None})
        self.desk.recover()
        wait_until(lambda: len(self.resumed) == 3, 10, "the overdue one denied by the clock")
        self.assertEqual(sorted(r.approval_id for r in self.resumed), sorted([overdue, decided, running]))
        self.assertEqual(self.store.parked()[running]["state"], "decided", "resumed from decided again")
        self.assertEqual(self.store.parked()[overdue]["decision"]["by"], "timeout")
        self.assertEqual(self.store.parked()[waiting]["state"], "waiting")

    def test_an_mcp_question_is_answered_with_content_that_matches_its_schema(self):
        import threading
        schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 5}}, "required": ["n"]}
        results = []
        asking = threading.Thread(target=lambda: results.append(self.desk.elicit(
            "db", "db__query", {"task_id": "t1", "conversation_id": "c1"}, "How many?", schema, 1900.0)))
        asking.start()
        from support import wait_until
        wait_until(lambda: self.published, 10, "the request")
        topic, payload, expiry = self.published[0]
        request = json.loads(payload)
        self.assertEqual((request["kind"], request["tool"], request["schema"], expiry), ("elicitation", "db__query",
                                                                                          schema, 900))
        approval_id = request["approval_id"]
        with self.assertLogs("agent2389.approvals", "WARNING") as logs:
            self.assertTrue(self.desk.decide(approval_id, Decision(True, "ops", "", {"n": 9})))
        self.assertIn("n: 9 is greater than the maximum of 5", logs.output[0])
        self.assertTrue(asking.is_alive(), "still waiting")
        self.assertTrue(self.desk.decide(approval_id, Decision(True, "ops", "", {"n": 3})))
        asking.join(10)
        self.assertEqual(results, [{"action": "accept", "content": {"n": 3}}])
        self.assertEqual(self.published[-1], (topic, b"", None), "the request cleared")
        self.assertFalse(self.desk.decide(approval_id, Decision(False, "ops", "")), "answered already")
        self.assertEqual([e.outcome for e in self.decided], ["approved"])


class ResumeTests(unittest.TestCase):
    """The processor resumes a decided task once: the approved call runs (marked started first),
    a denial reaches the LLM, a call that was running at a crash is not run again."""

    def setUp(self):
        from agent2389_lib.llm.base import Message, ToolCall
        from agent2389_lib.llm.loop import ApprovalNeeded, LoopState
        from test_processor import AGENT, ProcessorTestCase
        self.agent = AGENT
        self.case = ProcessorTestCase()

        def think(task, deadline):
            state = LoopState([Message("user", "deploy it")], 1, 0, [ToolCall("c1", "deploy", {"to": "prod"})])
            raise ApprovalNeeded(state, state.pending[0], 600)

        from support import FakeClock
        self.answers = []
        self.clock = FakeClock(time.time())
        processor = self.case.make(think=think, wall_clock=self.clock)

        def resume_loop(task, state, answer, deadline):
            record = next(iter(self.case.store.parked().values()))
            self.answers.append((answer, record.get("tool_started"), state.tool_calls))
            self.seconds_left = deadline - time.monotonic()
            return "done" if answer is None else f"LLM heard: {answer[1]}"

        processor.resume_loop = resume_loop

    def parked(self):
        from support import envelope
        task = envelope(self.agent)
        self.case.deliver(task)
        (approval_id,) = self.case.store.parked()
        self.case.journal.clear()
        return task, approval_id

    def test_approved_the_call_runs_marked_as_started_and_the_task_is_answered_once(self):
        task, approval_id = self.parked()
        self.case.processor.desk.decide(approval_id, Decision(True, "ops", ""))
        self.case.processor.resume(approval_id)  # a second resume finds it moved on
        self.assertEqual(self.answers, [(None, True, 0)])
        published = self.case.publisher.published()
        self.assertEqual([topic for topic, _ in published], [f"/conversations/{task['conversation_id']}/{self.agent}",
                                                             f"/control/agents/{self.agent}/approvals/{approval_id}"])
        self.assertEqual((published[0][1]["response"], published[1][1]), ("done", None), "answered, the request cleared")
        self.assertEqual(self.case.store.parked(), {})

    def test_the_time_parked_does_not_count_against_the_task(self):
        """It resumes with the time it had left when it parked (task_timeout 5 s here), however
        long it waited; its expiry still bounds the wait (the request's expires_at)."""
        task, approval_id = self.parked()
        self.assertAlmostEqual(self.case.store.parked()[approval_id]["seconds_left"], 5, delta=1)
        self.case.store.advance(approval_id, "waiting", seconds_left=1234.0)  # as if parked with that much left
        self.case.processor.desk.decide(approval_id, Decision(True, "ops", ""))
        self.assertAlmostEqual(self.seconds_left, 1234, delta=5)
        from support import envelope
        expiring = envelope(self.agent, expires_at="2099-01-01T00:00:10Z")
        self.clock.now = 4070908800.0  # 2099-01-01T00:00:00Z: 10 s before it expires
        self.case.deliver(expiring)
        ((topic, request),) = self.case.publisher.published()[-1:]
        self.assertEqual(request["expires_at"], "2099-01-01T00:00:10.000Z", "not 600 s from now")

    def test_denied_the_llm_hears_who_and_why(self):
        task, approval_id = self.parked()
        self.case.processor.desk.decide(approval_id, Decision(False, "bob", "not today"))
        self.assertEqual(self.answers, [((False, "the call was denied by bob: not today"), None, 0)])

    def test_a_call_running_at_a_crash_is_not_run_again(self):
        task, approval_id = self.parked()
        self.case.store.advance(approval_id, "waiting", state="decided", tool_started=True,
                                decision={"approve": True, "by": "ops", "reason": "", "content": None})
        self.case.processor.resume(approval_id)
        ((answer, started, calls),) = self.answers
        self.assertEqual((answer[0], started, calls), (False, True, 1))
        self.assertIn("it was not run again", answer[1])



class ElicitationSessionTests(unittest.TestCase):
    def test_a_form_question_goes_to_a_person_on_a_thread_of_its_own_and_other_modes_are_refused(self):
        from agent2389_lib.tools.mcp.session import McpSession
        from support import wait_until
        sent, asked = [], []

        class Channel:
            protocol_version = None

            def start(self):
                pass

            def send(self, message, timeout):
                sent.append(message)

            def close(self, timeout):
                pass

        session = McpSession("s", lambda s: Channel(),
                             elicit=lambda params, asking: asked.append((params, asking)) or {"action": "decline"})
        session.dispatch({"jsonrpc": "2.0", "id": 7, "method": "elicitation/create",
                          "params": {"mode": "url", "url": "https://example.com", "message": "m", "elicitationId": "e"}})
        session.dispatch({"jsonrpc": "2.0", "id": 8, "method": "elicitation/create",
                          "params": {"message": "Which?", "requestedSchema": {"type": "object"}}})
        wait_until(lambda: len(sent) == 2, 10, "both answered")
        answers = {message["id"]: message for message in sent}
        self.assertEqual(answers[7]["error"]["code"], -32602)
        self.assertEqual(answers[8]["result"], {"action": "decline"})
        self.assertEqual(asked, [({"message": "Which?", "requestedSchema": {"type": "object"}}, None)])


if __name__ == "__main__":
    unittest.main()
