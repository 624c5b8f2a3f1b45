"""The gateway without a broker: what it reads from A2A messages, the states answers map to,
conversation ids from contexts, the cards, and the task store across a restart."""

import json
import os
import tempfile
import unittest

from agent2389_lib.gateway import a2a
from agent2389_lib.gateway.a2a import RpcError, outcome_state, read_message, read_request
from agent2389_lib.gateway.cards import POOL_EXTENSION, agent_card, gateway_card
from agent2389_lib.gateway.service import conversation_for
from agent2389_lib.gateway.tasks import Task, TaskStore


class MessageTests(unittest.TestCase):
    def test_text_parts_are_the_instruction_data_parts_the_input(self):
        incoming = read_message({"message": {"messageId": "m1", "contextId": "c1", "role": "ROLE_USER",
                                             "parts": [{"text": "one"}, {"data": {"k": 1}}, {"text": "two"}]}})
        self.assertEqual((incoming.text, incoming.data, incoming.context_id, incoming.task_id),
                         ("one\ntwo", [{"k": 1}], "c1", None))

    def test_what_is_wrong_is_said_with_json_rpc_codes(self):
        for params, text in (({}, "message is required"), ({"message": {"parts": [{"text": "x"}]}}, "messageId"),
                             ({"message": {"messageId": "m", "parts": []}}, "at least one part"),
                             ({"message": {"messageId": "m", "parts": [{"url": "http://x"}]}}, "files are not"),
                             ({"message": {"messageId": "m", "parts": [{"text": "x"}], "taskId": 5}}, "taskId")):
            with self.subTest(text):
                with self.assertRaises(RpcError) as caught:
                    read_message(params)
                self.assertEqual(caught.exception.code, a2a.INVALID_PARAMS)
                self.assertIn(text, caught.exception.message)
        for body, code in ((b"{", a2a.PARSE_ERROR), (b'{"jsonrpc": "1.0", "method": "x"}', a2a.INVALID_REQUEST),
                           (b'{"jsonrpc": "2.0", "method": "x", "id": [1]}', a2a.INVALID_REQUEST),
                           (b'{"jsonrpc": "2.0", "method": "x", "params": [1]}', a2a.INVALID_PARAMS)):
            with self.assertRaises(RpcError) as caught:
                read_request(body)
            self.assertEqual(caught.exception.code, code)

    def test_answers_and_errors_map_to_states(self):
        self.assertEqual(outcome_state({"response": "done"}), (a2a.COMPLETED, "done"))
        for code, state in (("canceled", a2a.CANCELED), ("llm_error", a2a.FAILED), ("expired", a2a.REJECTED),
                            ("invalid_input", a2a.REJECTED), ("budget_exceeded", a2a.FAILED)):
            self.assertEqual(outcome_state({"error": {"code": code, "message": "m"}}), (state, f"{code}: m"))

    def test_a_context_id_is_a_conversation_id_when_a_topic_level_can_carry_it(self):
        self.assertEqual(conversation_for("ctx-1"), "ctx-1")
        hashed = conversation_for("a/b#c")
        self.assertTrue(hashed.startswith("a2a-") and "/" not in hashed)
        self.assertEqual(conversation_for("a/b#c"), hashed, "the same context, the same conversation")


class CardTests(unittest.TestCase):
    def test_an_agent_card_from_its_status(self):
        card = agent_card("writer", {"description": "writes", "capabilities": ["writing"], "instances_hint": 3,
                                     "version": "0.1.0"}, "https://gw.example", auth=True)
        self.assertEqual(card["supportedInterfaces"], [{"url": "https://gw.example/agents/writer",
                                                        "protocolBinding": "JSONRPC", "protocolVersion": "1.0"}])
        self.assertEqual([s["id"] for s in card["skills"]], ["writing"])
        self.assertEqual(card["capabilities"]["extensions"][0]["uri"], POOL_EXTENSION)
        self.assertEqual(card["securityRequirements"], [{"schemes": {"bearer": {"list": []}}}])
        own = gateway_card({"writer": {"description": "writes"}}, "https://gw.example", auth=False)
        self.assertNotIn("securitySchemes", own)
        self.assertEqual(own["agents"], [{"agent_id": "writer",
                                          "card": "https://gw.example/agents/writer/.well-known/agent-card.json"}])


class TaskStoreTests(unittest.TestCase):
    def test_a_task_survives_a_restart_and_a_finished_one_stays_finished(self):
        path = os.path.join(tempfile.mkdtemp(), "tasks.sqlite3")
        store = TaskStore(path)
        task = Task("t1", "writer", "c1", "c1", "m1", a2a.SUBMITTED, a2a.status(a2a.SUBMITTED, "now"),
                    envelope={"task_id": "t1"})
        self.assertEqual(store.create(task)[1], True)
        self.assertEqual(store.create(Task("t2", "writer", "c1", "c1", "m1", a2a.SUBMITTED, {}))[0].id, "t1",
                         "the same agent and message id: the task made before")
        self.assertEqual([t.id for t in store.unpublished()], ["t1"])
        store.mark_published("t1")
        store.move("t1", a2a.COMPLETED, artifacts=[a2a.artifact("done")])
        store.close()
        again = TaskStore(path)
        self.assertEqual((again.get("t1").state, again.unpublished()), (a2a.COMPLETED, []))
        self.assertIsNone(again.move("t1", a2a.FAILED), "a late answer changes nothing")
        self.assertEqual(json.loads(json.dumps(again.get("t1").to_json()))["artifacts"][0]["parts"][0]["text"], "done")


if __name__ == "__main__":
    unittest.main()
