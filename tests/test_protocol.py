import io
import json
import logging
import re
import unittest
from datetime import datetime, timezone

from hypothesis import given, settings
from hypothesis import strategies as st

from agent2389_lib import answers, logs, protocol, redaction
from agent2389_lib.protocol import EnvelopeError

TASK = "123e4567-e89b-12d3-a456-426614174000"


def env(**over):
    msg = {"task_id": TASK, "conversation_id": "c1", "topic": "/control/agents/a1/input",
           "instruction": "Go", "input": {"text": "x"}, "next": None}
    msg.update(over)
    return json.dumps(msg)


def chain(depth):
    """An envelope of the given depth (1 + nested next)."""
    nxt = None
    for _ in range(depth - 1):
        nxt = {"topic": "/control/agents/b1/input", "instruction": None, "input": None, "next": nxt}
    return env(next=nxt)


class TopicTests(unittest.TestCase):
    def test_canonicalize(self):
        cases = [
            ("//control//agents/foo/", "/control/agents/foo"),  # the RFC example
            ("", "/"), ("/", "/"), ("///", "/"), ("a/b", "/a/b"), ("/a/b/", "/a/b"),
            ("/control/agents/x/input", "/control/agents/x/input"),
        ]
        for raw, expected in cases:
            with self.subTest(raw=raw):
                self.assertEqual(protocol.canonicalize_topic(raw), expected)
                self.assertEqual(protocol.canonicalize_topic(expected), expected)  # idempotent

    def test_builders(self):
        self.assertEqual(protocol.input_topic("a1"), "/control/agents/a1/input")
        self.assertEqual(protocol.status_topic("a1"), "/control/agents/a1/status")
        self.assertEqual(protocol.conversation_topic("c", "a1"), "/conversations/c/a1")
        self.assertEqual(protocol.progress_topic("a1", "General"), "/control/agents/a1/progress")
        self.assertEqual(protocol.progress_topic("a1", "LLM"), "/control/agents/a1/progress/llm")
        self.assertEqual(protocol.progress_topic("a1", "Tool"), "/control/agents/a1/progress/tools")

    def test_agent_ids(self):
        for good in ("abc", "a.b_c-d", "A" * 64, "agent-001"):
            self.assertTrue(protocol.is_valid_agent_id(good), good)
        for bad in ("ab", "A" * 65, "a b", "a/b", "a+b", "", None, 123, "é-agent"):
            self.assertFalse(protocol.is_valid_agent_id(bad), bad)

    def test_next_agent_id(self):
        self.assertEqual(protocol.next_agent_id("//control/agents/writer/input/"), "writer")
        for bad in ("/conversations/x/y", "/control/agents", "/control/agents/a b/input", "/ctl/agents/w/input"):
            with self.subTest(bad=bad), self.assertRaises(EnvelopeError):
                protocol.next_agent_id(bad)


class EnvelopeTests(unittest.TestCase):
    def test_valid_v1(self):
        parsed = protocol.parse_envelope(env().encode())
        self.assertEqual((parsed.task_id, parsed.conversation_id, parsed.instruction), (TASK, "c1", "Go"))
        self.assertEqual(parsed.input, {"text": "x"})
        self.assertIsNone(parsed.version)
        self.assertEqual(parsed.depth, 1)

    def test_uuid_spellings(self):
        spellings = [TASK, TASK.upper(), TASK.replace("-", ""), "{" + TASK + "}", "urn:uuid:" + TASK,
                     "6ba7b810-9dad-11d1-80b4-00c04fd430c8", "00000000-0000-0000-0000-000000000000"]
        for spelling in spellings:
            with self.subTest(spelling=spelling):
                parsed = protocol.parse_envelope(env(task_id=spelling))
                self.assertEqual(parsed.task_id, spelling.lower().replace("urn:uuid:", "").strip("{}")
                                 if "-" in spelling else TASK)
                self.assertRegex(parsed.task_id, r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

    def test_invalid_envelopes(self):
        cases = {
            "not json": b"hello",
            "invalid utf-8": b'{"task_id": "\xff"}',
            "array": b"[1,2]",
            "NaN": env(input=0).replace("0", "NaN", 1).encode() if False else b'{"task_id": NaN}',
            "missing task_id": json.dumps({"conversation_id": "c1", "topic": "/t", "input": None}),
            "task_id not uuid": env(task_id="task-1"),
            "task_id number": env(task_id=5),
            "braces unbalanced": env(task_id="{" + TASK),
            "mixed hyphens": env(task_id=TASK[:8] + TASK[9:]),
            "missing conversation_id": json.dumps({"task_id": TASK, "topic": "/t", "input": None}),
            "conversation_id number": env(conversation_id=7),
            "conversation_id empty": env(conversation_id=""),
            "conversation_id slash": env(conversation_id="a/b"),
            "conversation_id wildcard": env(conversation_id="a+"),
            "conversation_id hash": env(conversation_id="#"),
            "conversation_id NUL": env(conversation_id="a\u0000b"),
            "missing topic": json.dumps({"task_id": TASK, "conversation_id": "c", "input": None}),
            "topic number": env(topic=1),
            "instruction number": env(instruction=3),
            "missing input": json.dumps({"task_id": TASK, "conversation_id": "c", "topic": "/t"}),
            "next string": env(next="x"),
            "next without topic": env(next={"instruction": "x", "input": None, "next": None}),
            "nested next bad": env(next={"topic": "/a", "next": {"topic": 5}}),
            "next instruction bad": env(next={"topic": "/a", "instruction": []}),
        }
        for name, payload in cases.items():
            with self.subTest(name), self.assertRaises(EnvelopeError):
                protocol.parse_envelope(payload)

    def test_error_carries_ids_when_readable(self):
        with self.assertRaises(EnvelopeError) as caught:
            protocol.parse_envelope(env(topic=5))
        self.assertEqual((caught.exception.task_id, caught.exception.conversation_id), (TASK, "c1"))
        with self.assertRaises(EnvelopeError) as caught:
            protocol.parse_envelope(env(conversation_id="a/b"))
        self.assertEqual(caught.exception.task_id, TASK)
        self.assertIsNone(caught.exception.conversation_id)

    def test_optional_fields(self):
        payload = json.dumps({"task_id": TASK, "conversation_id": "c", "topic": "/t", "input": "plain string"})
        parsed = protocol.parse_envelope(payload)
        self.assertIsNone(parsed.instruction)
        self.assertIsNone(parsed.next)
        self.assertEqual(parsed.input, "plain string")
        self.assertIsNone(protocol.parse_envelope(env(input=None)).input)
        self.assertEqual(protocol.parse_envelope(env(unknown_field=1)).task_id, TASK)  # unknown ignored

    def test_depth(self):
        self.assertEqual(protocol.parse_envelope(chain(16)).depth, 16)
        self.assertEqual(protocol.parse_envelope(chain(17)).depth, 17)
        nested = protocol.parse_envelope(chain(3)).next
        self.assertEqual(nested.topic, "/control/agents/b1/input")
        self.assertIsNotNone(nested.next)
        self.assertIsNone(nested.next.next)

    def test_deep_nesting_is_an_envelope_error(self):
        with self.assertRaises(EnvelopeError):
            protocol.parse_envelope(b"[" * 100000 + b"]" * 100000)
        with self.assertRaises(EnvelopeError):
            link = '{"topic":"/control/agents/b1/input","next":'
            protocol.parse_envelope(env(next=None)[:-len("null}")] + link * 5000 + "null" + "}" * 5001)


class V2Tests(unittest.TestCase):
    context = {"original_query": "q", "steps_completed": [{"agent_id": "a", "action": "x", "timestamp": "t"}],
               "iteration_count": 2}
    trace = [{"from_agent": "a", "to_agent": "b", "reason": "r", "timestamp": "t", "step_number": 1}]

    def test_detection(self):
        cases = [
            ({"version": "2.0"}, "2.0"),
            ({"version": "anything"}, "anything"),
            ({"version": 2}, None),  # numeric version: v1
            ({"version": None}, None),
            ({"version": "2.0", "context": self.context, "routing_trace": self.trace}, "2.0"),
            ({"version": "2.0", "context": {"original_query": 5, "steps_completed": []}}, None),  # malformed -> v1
            ({"version": "2.0", "context": {"original_query": "q"}}, None),
            ({"version": "2.0", "context": {**self.context, "iteration_count": -1}}, None),
            ({"version": "2.0", "context": "text"}, None),
            ({"version": "2.0", "routing_trace": [{"from_agent": "a"}]}, None),
            ({"version": "2.0", "routing_trace": {}}, None),
            ({"version": "2.0", "context": {"original_query": "q", "steps_completed": []}}, "2.0"),
        ]
        for extra, version in cases:
            with self.subTest(extra=extra):
                parsed = protocol.parse_envelope(env(**extra))
                self.assertEqual(parsed.version, version)
                if version is None:
                    self.assertIsNone(parsed.context)
                    self.assertIsNone(parsed.routing_trace)


class ForwardTests(unittest.TestCase):
    def test_forward_v1_uses_text_when_next_input_null(self):
        nxt = {"topic": "/control/agents/writer/input", "instruction": "Write", "input": None,
               "next": {"topic": "/control/agents/editor/input", "instruction": "Edit", "input": {"k": 1}, "next": None}}
        parsed = protocol.parse_envelope(env(next=nxt))
        topic, out = protocol.forward_envelope(parsed, "final text", "a1")
        self.assertEqual(topic, "/control/agents/writer/input")
        self.assertEqual(out, {"task_id": TASK, "conversation_id": "c1", "topic": "/control/agents/writer/input",
                               "instruction": "Write", "input": "final text", "next": nxt["next"]})

    def test_forward_keeps_the_expiry(self):
        nxt = {"topic": "/control/agents/writer/input", "instruction": "Write", "input": None, "next": None}
        parsed = protocol.parse_envelope(env(next=nxt, expires_at="2027-01-15T10:00:00.5+02:00"))
        self.assertEqual(parsed.expires_at, 1800000000.5)
        _, out = protocol.forward_envelope(parsed, "final text", "a1")
        self.assertEqual(out["expires_at"], "2027-01-15T08:00:00.500Z")
        self.assertIsNone(protocol.parse_envelope(env(expires_at=None)).expires_at)

    def test_forward_keeps_non_null_input_and_v2_trace(self):
        nxt = {"topic": "/control/agents/writer/input", "instruction": None, "input": {"keep": True}, "next": None}
        parsed = protocol.parse_envelope(env(next=nxt, version="2.0", context=V2Tests.context,
                                             routing_trace=V2Tests.trace))
        moment = datetime(2026, 1, 1, 12, 0, 0, 123000, tzinfo=timezone.utc)
        _, out = protocol.forward_envelope(parsed, "text", "a1", now=moment)
        self.assertEqual(out["input"], {"keep": True})
        self.assertEqual(out["version"], "2.0")
        self.assertEqual(out["context"], V2Tests.context)
        self.assertEqual(out["routing_trace"][-1], {"from_agent": "a1", "to_agent": "writer", "reason": "static pipeline",
                                                    "timestamp": "2026-01-01T12:00:00.123Z", "step_number": 2})
        self.assertEqual(len(out["routing_trace"]), 2)


class BuilderTests(unittest.TestCase):
    moment = datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=timezone.utc)

    def test_status(self):
        msg = protocol.status_message("a1", "available", capabilities=["x"], description="d", load=0.25,
                                      version="0.1.0", now=self.moment)
        self.assertEqual(msg, {"agent_id": "a1", "status": "available", "timestamp": "2026-01-01T12:00:00.123Z",
                               "capabilities": ["x"], "description": "d", "health": "ok", "load": 0.25,
                               "last_updated": "2026-01-01T12:00:00.123Z", "version": "0.1.0"})
        bare = protocol.status_message("a1", "unavailable", load=0.5, heartbeat_interval=60, now=self.moment)
        self.assertNotIn("capabilities", bare)
        self.assertNotIn("description", bare)
        # the reference's registry reads only health: a dead agent must not look healthy
        self.assertEqual((bare["health"], bare["load"], bare["heartbeat_interval"]), ("unavailable", 1.0, 60))
        busy = protocol.status_message("a1", "available", load=1.0, health="degraded", now=self.moment)
        self.assertEqual((busy["health"], busy["load"]), ("degraded", 1.0))

    def test_timestamps_are_rfc3339_z(self):
        self.assertRegex(protocol.rfc3339(), r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

    def test_response_and_error(self):
        self.assertEqual(protocol.response_message("r", TASK), {"response": "r", "task_id": TASK})
        self.assertEqual(protocol.error_message("llm_error", "boom", TASK),
                         {"error": {"code": "llm_error", "message": "boom"}, "task_id": TASK})
        with self.assertRaises(ValueError):
            protocol.error_message("nope", "x", TASK)

    def test_progress(self):
        payload = protocol.progress_payload("a1", TASK, "c\"1\u00e9\n", "Tool", "ToolCall", "calling \"x\"",
                                            metadata={"tool_name": "échø"}, now=self.moment)
        msg = json.loads(payload)
        self.assertEqual(msg, {"agent_id": "a1", "task_id": TASK, "conversation_id": "c\"1\u00e9\n",
                               "timestamp": protocol.rfc3339(self.moment), "category": "Tool", "event_type": "ToolCall",
                               "message": 'calling "x"', "metadata": {"tool_name": "échø"}})
        self.assertEqual(payload, protocol.to_payload(msg), "the same bytes as the dict's encoding, in this order")
        self.assertIsNone(json.loads(protocol.progress_payload("a1", TASK, "c1", "LLM", "LlmRequest", "m"))["metadata"])
        self.assertEqual(json.loads(protocol.progress_payload("a1", TASK, "c1", "LLM", "LlmRequest", "\ud800"))["message"],
                         "\ufffd", "an unpaired surrogate is replaced")
        with self.assertRaises(ValueError):
            protocol.progress_payload("a1", TASK, "c1", "LLM", "Nope", "m")

    def test_payload_is_compact_utf8(self):
        self.assertEqual(protocol.to_payload({"a": "é", "b": [1, 2]}), '{"a":"é","b":[1,2]}'.encode())


class SanitizerTests(unittest.TestCase):
    def test_redaction_rules(self):
        cases = [
            ("api_key=abc123 failed", "abc123"),
            ("password: hunter2", "hunter2"),
            ("token = 'tok-xyz'", "tok-xyz"),
            ('{"secret": "s3cr3t"}', "s3cr3t"),
            ("Authorization: Bearer sk-live-abcdef", "sk-live-abcdef"),
            ("could not open /home/u/.ssh/id_rsa", "/home/u/.ssh/id_rsa"),
            ("read /etc/app/secrets/db.txt", "/etc/app/secrets/db.txt"),
            ("see /root/.aws/credentials", ".aws/credentials"),
            ("see /home/u/.config/tool/conf.json", ".config/tool"),
        ]
        for text, secret in cases:
            with self.subTest(text=text):
                cleaned = redaction.sanitize_error_message(text)
                self.assertNotIn(secret, cleaned)

    def test_url_passwords_masked_in_every_shape(self):
        for url in ("mqtt://u:pw-123@host:1883", "u:pw-123@host:1883", "mqtt:/u:pw-123@host", "ftp://u:pw-123@h",
                    "http://user:pw-123@[bad", "//u:pw-123@h", "mqtt://me@corp:pw-123@h", "http://u:p@pw-123@h/v1",
                    "http://u:pw-123/x@h", "https://:pw-123@h"):
            for text in (url, f"model 'm' is not among the models at {url} lists", f"url={url}", f"({url})"):
                with self.subTest(text=text):
                    masked = redaction.mask_url_credentials(text)
                    self.assertNotIn("pw-123", masked)
                    self.assertIn(":********@", masked)
                    self.assertNotIn("pw-123", redaction.sanitize_error_message(text))
        for text in ("http://host/a@b", "user@host", "no at all", "10:03:13 a@b"):
            self.assertEqual(redaction.mask_url_credentials(text), text)

    def test_log_lines_mask_url_passwords(self):
        """Every log line passes the redacting filter: the gatekeeper's and the model check's too."""
        stream = io.StringIO()
        handler = logs.configure_logging("INFO", "text", stream=stream)
        try:
            logging.getLogger("agent2389.router").warning("gatekeeper %s failed", "http://gk:pw-123@gk:8000/route")
        finally:
            logging.getLogger().removeHandler(handler)
        self.assertIn("http://gk:********@gk:8000/route", stream.getvalue())
        self.assertNotIn("pw-123", stream.getvalue())

    def test_configured_secret_anywhere(self):
        cleaned = redaction.sanitize_error_message("upstream said: invalid key sk-XYZ123456 for org", ["sk-XYZ123456"])
        self.assertNotIn("sk-XYZ123456", cleaned)
        self.assertIn("[REDACTED]", cleaned)

    def test_traceback_removed(self):
        text = "boom\nTraceback (most recent call last):\n  File \"/app/x.py\", line 1\nValueError: x"
        self.assertEqual(redaction.sanitize_error_message(text), "boom")

    def test_cut_to_500_bytes_on_char_boundary(self):
        for text in ("é" * 400, "a" * 1000, "€" * 300 + "x"):
            with self.subTest(first=text[0]):
                cleaned = redaction.sanitize_error_message(text)
                self.assertLessEqual(len(cleaned.encode("utf-8")), 500)
                self.assertTrue(cleaned.endswith("...[truncated]"))
                cleaned.encode("utf-8").decode("utf-8")  # whole characters only
        self.assertEqual(redaction.sanitize_error_message("short"), "short")
        exact = "b" * 500
        self.assertEqual(redaction.sanitize_error_message(exact), exact)


class ExtractionTests(unittest.TestCase):
    def test_rules(self):
        cases = [
            ("plain text answer", "plain text answer"),
            ('{"result": "done"}', "done"),
            ('  {"result": {"a": 1}}  ', '{"a":1}'),
            ('{"result": [1, 2]}', "[1,2]"),
            ('{"result": 5}', "5"),
            ('{"other": 1}', '{"other": 1}'),
            ('Here:\n```json\n{"result": "fenced"}\n```\nbye', "fenced"),
            ('Answer: {"result": "inline {braces} \\"q\\""} trailing', 'inline {braces} "q"'),
            ("text with {not json} then {\"result\": \"second\"}", "second"),
            ("unbalanced { here", "unbalanced { here"),
            ('["result"]', '["result"]'),
        ]
        for text, expected in cases:
            with self.subTest(text=text):
                self.assertEqual(answers.extract_response(text), expected)


class PropertyTests(unittest.TestCase):
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
        max_leaves=20)
    envelope_like = st.fixed_dictionaries({}, optional={
        "task_id": st.one_of(st.just(TASK), st.text(max_size=40), st.integers()),
        "conversation_id": st.one_of(st.just("c1"), st.text(max_size=10), st.none()),
        "topic": st.one_of(st.just("/control/agents/a1/input"), json_values),
        "instruction": json_values, "input": json_values, "next": json_values,
        "version": json_values, "context": json_values, "routing_trace": json_values})

    def _only_envelope_errors(self, payload):
        try:
            parsed = protocol.parse_envelope(payload)
        except EnvelopeError:
            return
        self.assertTrue(re.match(r"^[0-9a-f-]{36}$", parsed.task_id))

    @settings(max_examples=300, deadline=None)
    @given(json_values)
    def test_arbitrary_json(self, value):
        self._only_envelope_errors(json.dumps(value))

    @settings(max_examples=300, deadline=None)
    @given(envelope_like)
    def test_envelope_shaped_json(self, value):
        self._only_envelope_errors(json.dumps(value).encode())

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=300))
    def test_arbitrary_bytes(self, data):
        self._only_envelope_errors(data)


if __name__ == "__main__":
    unittest.main()
