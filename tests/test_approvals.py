"""Approvals on the wire (PROTOCOL.md 9): requests with masked arguments, hostile decisions."""

import json
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
