"""The processor with an in-memory transport double: every row of PROTOCOL.md section 3, and the
exactly-once rules (one ack per claimed delivery, after its outcome was accepted by the broker)."""

import json
import tempfile
import threading
import time
import unittest
from typing import Optional

from agent2389_lib.config import AgentConfig
from agent2389_lib.dedupe import DedupeStore
from agent2389_lib.errors import LlmError, PayloadTooLarge
from agent2389_lib.events import Events, counted_in
from agent2389_lib.metrics import Metrics
from agent2389_lib.processor import TaskProcessor
from support import NO_USAGE, envelope, new_task_id

AGENT = "agent-one"
INPUT = f"/control/agents/{AGENT}/input"


class Delivery:
    """A received message; counts its acknowledgements and records when they happened."""

    def __init__(self, payload, topic: str = INPUT, retain: bool = False, journal: Optional[list] = None,
                 user_properties: tuple = (), expires_at: Optional[float] = None):
        self.topic = topic
        self.expires_at = expires_at
        self.user_properties = user_properties
        self.payload = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.retain = retain
        self.acks = 0
        self.journal = journal if journal is not None else []

    def ack(self) -> None:
        self.acks += 1
        self.journal.append(("ack", self.topic))


class Ticket:
    def __init__(self, refusal: Optional[tuple] = None):
        self.refusal, self.refusal_code = refusal or (None, None)

    def wait(self, timeout):
        return True


class MemoryPublisher:
    """Records publishes in order; the broker's answer to each is scripted (accepted by default)."""

    def __init__(self, journal: list):
        self.journal = journal
        self.refusals: list = []  # per publish: None, (reason text, reason code), or an exception to raise
        self.max_packet_size: Optional[int] = None
        self.expiries: list = []  # the Message Expiry Interval of each publish

    def publish(self, topic: str, payload: bytes, retain: bool = False, headers: tuple = (), qos: int = 1,
                expiry: Optional[int] = None) -> Ticket:
        if self.max_packet_size is not None and len(payload) > self.max_packet_size:
            raise PayloadTooLarge(len(payload), self.max_packet_size, "broker's maximum packet size")
        refusal = self.refusals.pop(0) if self.refusals else None
        if isinstance(refusal, Exception):
            raise refusal
        self.journal.append(("publish", topic, json.loads(payload) if payload else None))  # None: a retained clear
        self.expiries.append(expiry)
        return Ticket(refusal)

    def published(self) -> list:
        return [(entry[1], entry[2]) for entry in self.journal if entry[0] == "publish"]


def echo_think(envelope, deadline):
    return f"did {envelope.instruction}"


class ProcessorTestCase(unittest.TestCase):
    def make(self, think=echo_think, store: Optional[DedupeStore] = None, wall_clock=time.time, **config):
        self.journal: list = []
        self.publisher = MemoryPublisher(self.journal)
        self.store = store or DedupeStore(100)
        settings = {"agent_id": AGENT, "task_timeout": 5, "dead_letter_topic": f"/control/agents/{AGENT}/dead-letter",
                    **config}
        self.metrics = Metrics(AGENT, 4)
        self.processor = TaskProcessor(AgentConfig(**settings), think, self.publisher, self.store,
                                       Events(counted_in(self.metrics)), wall_clock=wall_clock)
        return self.processor

    def deliver(self, payload, **kwargs) -> Delivery:
        delivery = Delivery(payload, journal=self.journal, **kwargs)
        self.processor.handle(delivery)
        return delivery

    def assert_answered_then_acked(self, delivery, topic, check):
        """Exactly one publish on `topic`, then exactly one ack of this delivery, in that order."""
        self.assertEqual(delivery.acks, 1)
        kinds = [entry[0] for entry in self.journal]
        self.assertEqual(kinds, ["publish", "ack"], self.journal)
        ((published_topic, message),) = self.publisher.published()
        self.assertEqual(published_topic, topic)
        check(message)
        return message


class ProtocolRowTests(ProcessorTestCase):
    def setUp(self):
        self.make()

    def error_check(self, code, task_id, text=""):
        def check(message):
            self.assertEqual(message["task_id"], task_id)
            self.assertEqual(message["error"]["code"], code)
            self.assertIn(text, message["error"]["message"])
        return check

    def test_retained_is_acked_and_ignored_with_a_throttled_warning(self):
        with self.assertLogs("agent2389.processor", "WARNING") as logs:
            deliveries = [self.deliver(envelope(AGENT), retain=True) for _ in range(3)]
        self.assertEqual(([d.acks for d in deliveries], self.publisher.published()), ([1, 1, 1], []))
        self.assertEqual(len(logs.output), 1)
        self.assertIn(f"ignoring 1 retained message(s) on {INPUT}", logs.output[0])

    def test_topic_rewritten_by_the_broker_still_matches(self):
        """RabbitMQ delivers /control/agents/agent.one/input as /control/agents/agent/one/input."""
        self.make(agent_id="agent.one")
        task = envelope("agent.one")
        delivery = self.deliver(task, topic="/control/agents/agent/one/input")
        self.assertEqual([t for t, _ in self.publisher.published()], ["/conversations/conv1/agent.one"])
        self.assertEqual(delivery.acks, 1)

    def test_oversized_with_ids_gets_invalid_input(self):
        self.make(max_message_size=2048)
        task_id = new_task_id()
        delivery = self.deliver(envelope(AGENT, task_id=task_id, cid="big", input="x" * 4000))
        self.assert_answered_then_acked(delivery, f"/conversations/big/{AGENT}",
                                        self.error_check("invalid_input", task_id, "exceeds max_message_size"))

    def test_a_task_that_arrives_after_its_expiry_is_answered_expired_and_not_run(self):
        thought = []
        self.make(think=lambda envelope, deadline: thought.append(envelope) or "ran", wall_clock=lambda: 1_800_000_001.0)
        task_id = new_task_id()
        delivery = self.deliver(envelope(AGENT, task_id=task_id, cid="late", expires_at="2027-01-15T08:00:00.000Z"))
        self.assert_answered_then_acked(delivery, f"/conversations/late/{AGENT}", self.error_check(
            "expired", task_id, "the task expired at 2027-01-15T08:00:00.000Z, before it started"))
        self.assertEqual((thought, self.metrics.snapshot()["tasks"]["tasks_rejected"]), ([], 1))

    def test_a_task_s_deadline_is_its_expiry_when_sooner_than_task_timeout(self):
        deadlines = []
        self.make(think=lambda envelope, deadline: deadlines.append(deadline - time.monotonic()) or "ran",
                  wall_clock=lambda: 1_799_999_998.0, task_timeout=300)
        self.deliver(envelope(AGENT, expires_at="2027-01-15T10:00:00+02:00"))  # 1,800,000,000: 2 s away
        ((deadline,),) = [deadlines]
        self.assertLessEqual(deadline, 2.0)
        self.assertGreater(deadline, 1.0)

    def test_the_mqtt_5_message_expiry_counts_when_it_is_sooner(self):
        thought = []
        self.make(think=lambda envelope, deadline: thought.append(envelope) or "ran", wall_clock=lambda: 1_800_000_001.0)
        late = self.deliver(envelope(AGENT, cid="late", expires_at="2027-01-15T09:00:00Z"), expires_at=1_800_000_000.0)
        (((_, message),)) = self.publisher.published()
        self.assertEqual((message["error"]["code"], late.acks, thought), ("expired", 1, []))
        self.deliver(envelope(AGENT, cid="fine"), expires_at=1_800_000_002.0)
        self.assertEqual(len(thought), 1, "not yet expired: run")

    def test_a_forward_carries_what_is_left_of_the_task_s_time_and_an_answer_result_expiry(self):
        nxt = {"topic": "/control/agents/writer/input", "instruction": "Write", "input": None, "next": None}
        self.make(result_expiry=600)
        self.deliver(envelope(AGENT, cid="kept"))
        self.assertEqual(self.publisher.expiries, [600])
        self.make(wall_clock=lambda: 1_799_999_970.5)
        self.deliver(envelope(AGENT, cid="on", next=nxt, expires_at="2027-01-15T08:00:00Z"))
        self.deliver(envelope(AGENT, cid="done"))
        ((_, forward), _) = self.publisher.published()
        self.assertEqual((self.publisher.expiries, forward["expires_at"]), ([30, None], "2027-01-15T08:00:00.000Z"))

    def test_an_expires_at_that_is_no_rfc_3339_moment_is_invalid_input(self):
        for bad in ("tomorrow", "2027-01-15", "2027-01-15T08:00:00", 1800000000):
            with self.subTest(bad=bad):
                self.make()
                task_id = new_task_id()
                delivery = self.deliver(envelope(AGENT, task_id=task_id, cid="bad", expires_at=bad))
                self.assert_answered_then_acked(delivery, f"/conversations/bad/{AGENT}", self.error_check(
                    "invalid_input", task_id, "expires_at must be an RFC 3339 date and time with a zone"))

    def test_oversized_without_ids_is_only_acked(self):
        self.make(max_message_size=2048)
        delivery = self.deliver(b"[" + b"1," * 2000 + b"1]")
        self.assertEqual((delivery.acks, self.publisher.published()), (1, []))

    def test_not_json_is_only_acked(self):
        delivery = self.deliver(b"{not json")
        self.assertEqual((delivery.acks, self.publisher.published()), (1, []))

    def test_invalid_envelope_with_ids_gets_invalid_input(self):
        task_id = new_task_id()
        bad = envelope(AGENT, task_id=task_id, cid="c-bad")
        del bad["input"]
        delivery = self.deliver(bad)
        self.assert_answered_then_acked(delivery, f"/conversations/c-bad/{AGENT}",
                                        self.error_check("invalid_input", task_id, "no input"))

    def test_a_task_id_that_is_no_uuid_is_answered_invalid_input_echoing_it(self):
        """Before: discarded with a WARN saying there was no task or conversation id to reply to."""
        delivery = self.deliver(envelope(AGENT, task_id="task-1", cid="demo"))
        self.assert_answered_then_acked(delivery, f"/conversations/demo/{AGENT}",
                                        self.error_check("invalid_input", "task-1", "task_id must be a UUID string"))

    def test_topic_mismatch_is_only_acked(self):
        delivery = self.deliver(envelope("someone-else"))
        self.assertEqual((delivery.acks, self.publisher.published()), (1, []))

    def test_duplicate_of_completed_is_acked_silently(self):
        task = envelope(AGENT)
        self.deliver(task)
        again = self.deliver(task)
        self.assertEqual(again.acks, 1)
        self.assertEqual(len(self.publisher.published()), 1)

    def test_duplicate_of_in_flight_is_acked_with_the_original(self):
        release, started = threading.Event(), threading.Event()

        def slow_think(envelope, deadline):
            started.set()
            release.wait(10)
            return "done"

        self.make(think=slow_think)
        task = envelope(AGENT)
        original = Delivery(task, journal=self.journal)
        worker = threading.Thread(target=self.processor.handle, args=(original,))
        worker.start()
        self.assertTrue(started.wait(10))
        duplicate = self.deliver(task)
        self.assertEqual(duplicate.acks, 0)  # not before the outcome is published
        release.set()
        worker.join(10)
        self.assertEqual((original.acks, duplicate.acks, len(self.publisher.published())), (1, 1, 1))

    def test_depth_exceeded(self):
        nxt = None
        for _ in range(16):
            nxt = {"topic": "/control/agents/next-agent/input", "instruction": "go", "input": None, "next": nxt}
        task_id = new_task_id()
        delivery = self.deliver(envelope(AGENT, task_id=task_id, cid="deep", next=nxt))
        self.assert_answered_then_acked(delivery, f"/conversations/deep/{AGENT}",
                                        self.error_check("pipeline_depth_exceeded", task_id, "17"))

    def test_a_one_worker_agent_forwards_along_a_pipeline(self):
        """Before: the worker count was also the depth limit, so one worker rejected every `next`."""
        self.make(max_pipeline_depth=1)
        task_id = new_task_id()
        nxt = {"topic": "/control/agents/writer/input", "instruction": "write", "input": None,
               "next": {"topic": "/control/agents/editor/input", "instruction": "edit", "input": None, "next": None}}
        delivery = self.deliver(envelope(AGENT, task_id=task_id, cid="c1", instruction="X", next=nxt))
        self.assert_answered_then_acked(delivery, "/control/agents/writer/input", lambda m: None)

    def test_llm_failure(self):
        def failing(envelope, deadline):
            raise LlmError("openai returned HTTP 500 (after 4 attempts)")

        self.make(think=failing)
        task_id = new_task_id()
        delivery = self.deliver(envelope(AGENT, task_id=task_id, cid="c1"))
        self.assert_answered_then_acked(delivery, f"/conversations/c1/{AGENT}",
                                        self.error_check("llm_error", task_id, "HTTP 500"))

    def test_deadline(self):
        self.make(task_timeout=0)  # the deadline has passed by the time the LLM step returns
        task_id = new_task_id()
        delivery = self.deliver(envelope(AGENT, task_id=task_id, cid="c1"))
        self.assert_answered_then_acked(delivery, f"/conversations/c1/{AGENT}",
                                        self.error_check("internal_error", task_id, "task exceeded 0 s"))

    def test_success_response(self):
        task_id = new_task_id()
        delivery = self.deliver(envelope(AGENT, task_id=task_id, cid="c1", instruction="X"))
        self.assert_answered_then_acked(delivery, f"/conversations/c1/{AGENT}",
                                        lambda m: self.assertEqual(m, {"response": "did X", "task_id": task_id,
                                                                       "usage": NO_USAGE}))

    def test_success_forward(self):
        task_id = new_task_id()
        nxt = {"topic": "/control/agents/writer/input", "instruction": "write", "input": None, "next": None}
        delivery = self.deliver(envelope(AGENT, task_id=task_id, cid="c1", instruction="X", next=nxt))
        message = self.assert_answered_then_acked(delivery, "/control/agents/writer/input", lambda m: None)
        self.assertEqual((message["task_id"], message["input"], message["instruction"]), (task_id, "did X", "write"))

    def test_next_topic_not_an_agent(self):
        task_id = new_task_id()
        nxt = {"topic": "/somewhere/else", "instruction": "write", "input": None, "next": None}
        delivery = self.deliver(envelope(AGENT, task_id=task_id, cid="c1", next=nxt))
        self.assert_answered_then_acked(delivery, f"/conversations/c1/{AGENT}",
                                        self.error_check("invalid_input", task_id, "next.topic"))


class ExactlyOnceTests(ProcessorTestCase):
    """Issue 13: the ways a claimed delivery used to end unacknowledged or acknowledged too early."""

    def test_lone_surrogate_in_text_fields_gets_invalid_input(self):
        self.make()
        for field in ("instruction", "input"):
            self.journal.clear()
            task_id = new_task_id()
            raw = json.dumps(envelope(AGENT, task_id=task_id, cid="poison", **{field: "PLACEHOLDER"}))
            delivery = self.deliver(raw.replace("PLACEHOLDER", "\\ud800").encode())
            message = self.assert_answered_then_acked(delivery, f"/conversations/poison/{AGENT}", lambda m: None)
            self.assertEqual(message["error"]["code"], "invalid_input")
            self.assertIn(f"{field} contains an unpaired UTF-16 surrogate", message["error"]["message"])

    def test_lone_surrogate_in_conversation_id_is_acked_and_logged(self):
        self.make()
        raw = json.dumps(envelope(AGENT, cid="PLACEHOLDER")).replace("PLACEHOLDER", "\\udc00").encode()
        with self.assertLogs("agent2389.processor", "WARNING") as logs:
            delivery = Delivery(raw, journal=self.journal)
            self.processor.handle(delivery)
        self.assertEqual((delivery.acks, self.publisher.published()), (1, []))
        self.assertIn("conversation_id contains an unpaired UTF-16 surrogate", "\n".join(logs.output))

    def test_lone_surrogate_from_the_llm_is_replaced(self):
        self.make(think=lambda envelope, deadline: "half \ud83d of a pair")
        delivery = self.deliver(envelope(AGENT, cid="c1"))
        message = self.assert_answered_then_acked(delivery, f"/conversations/c1/{AGENT}", lambda m: None)
        self.assertEqual(message["response"], "half \ufffd of a pair")

    def test_an_exception_while_publishing_becomes_internal_error(self):
        self.make()
        self.publisher.refusals = [RuntimeError("MQTT outgoing queue is full")]
        task_id = new_task_id()
        with self.assertLogs("agent2389.processor", "ERROR"):
            delivery = Delivery(envelope(AGENT, task_id=task_id, cid="c1"), journal=self.journal)
            self.processor.handle(delivery)
        self.assert_answered_then_acked(delivery, f"/conversations/c1/{AGENT}",
                                        lambda m: self.assertEqual(m["error"]["code"], "internal_error"))

    def test_an_outcome_refused_for_good_is_final_and_dead_lettered(self):
        """Holding the delivery would hold one of the broker's Receive Maximum slots forever."""
        self.make()
        self.publisher.refusals = [("Not authorized", 0x87)]
        task = envelope(AGENT, cid="denied")
        with self.assertLogs("agent2389.processor", "ERROR") as logs:
            first = Delivery(task, journal=self.journal)
            self.processor.handle(first)
        self.assertEqual(first.acks, 1)
        self.assertIn(f"task {task['task_id']}: the broker refused its outcome on /conversations/denied/{AGENT}: "
                      "Not authorized (reason 0x87); the task is final", "\n".join(logs.output))
        (refused, letter) = self.publisher.published()
        self.assertEqual(letter[0], f"/control/agents/{AGENT}/dead-letter")
        self.assertEqual({k: letter[1][k] for k in ("task_id", "topic", "reason_code", "reason", "outcome")},
                         {"task_id": task["task_id"], "topic": refused[0], "reason_code": 0x87,
                          "reason": "Not authorized", "outcome": refused[1]})
        self.assertEqual(self.metrics.snapshot()["mqtt"]["outcomes_undeliverable"], 1)
        again = self.deliver(task)  # a redelivery is a duplicate of a completed task
        self.assertEqual((again.acks, len(self.publisher.published())), (1, 2))

    def test_a_refusal_that_may_pass_is_retried(self):
        self.make()
        self.publisher.refusals = [("Quota exceeded", 0x97), ("Server busy", 0x89)]
        delivery = self.deliver(envelope(AGENT, cid="busy"))
        self.assertEqual((delivery.acks, [t for t, _ in self.publisher.published()]),
                         (1, [f"/conversations/busy/{AGENT}"] * 3))
        self.assertEqual(self.metrics.snapshot()["mqtt"]["outcomes_undeliverable"], 0)

    def test_an_outcome_too_large_for_the_broker_is_dead_lettered_by_its_size(self):
        self.make()
        self.publisher.refusals = [("Packet too large", 0x95)]
        with self.assertLogs("agent2389.processor", "ERROR"):
            self.deliver(envelope(AGENT, cid="large"))
        (refused, letter) = self.publisher.published()
        self.assertEqual((letter[1]["outcome"], letter[1]["outcome_bytes"]),
                         (None, len(json.dumps(refused[1], separators=(",", ":")).encode())))

    def test_no_dead_letter_topic_when_set_empty(self):
        self.make(dead_letter_topic="")
        self.publisher.refusals = [("Topic Name invalid", 0x90)]
        with self.assertLogs("agent2389.processor", "ERROR"):
            delivery = self.deliver(envelope(AGENT, cid="denied"))
        self.assertEqual((delivery.acks, len(self.publisher.published())), (1, 1))

    def test_answer_over_max_message_size_becomes_internal_error(self):
        self.make(think=lambda envelope, deadline: "y" * 5000, max_message_size=4096)
        task_id = new_task_id()
        with self.assertLogs("agent2389.processor", "ERROR"):
            delivery = Delivery(envelope(AGENT, task_id=task_id, cid="c1"), journal=self.journal)
            self.processor.handle(delivery)
        message = self.assert_answered_then_acked(delivery, f"/conversations/c1/{AGENT}", lambda m: None)
        self.assertEqual(message["error"]["code"], "internal_error")
        self.assertRegex(message["error"]["message"], r"^the answer was 5\d\d\d bytes, over the max_message_size "
                                                      r"of 4096 bytes$")

    def test_forward_over_the_brokers_packet_limit_becomes_an_error_to_the_conversation(self):
        self.make(think=lambda envelope, deadline: "z" * 3000)
        self.publisher.max_packet_size = 2000
        nxt = {"topic": "/control/agents/writer/input", "instruction": "write", "input": None, "next": None}
        with self.assertLogs("agent2389.processor", "ERROR"):
            delivery = Delivery(envelope(AGENT, cid="c1", next=nxt), journal=self.journal)
            self.processor.handle(delivery)
        message = self.assert_answered_then_acked(delivery, f"/conversations/c1/{AGENT}", lambda m: None)
        self.assertIn("the task forwarded to /control/agents/writer/input was 3", message["error"]["message"])
        self.assertIn("over the broker's maximum packet size of 2000 bytes", message["error"]["message"])

    def test_revisiting_an_agent_in_a_pipeline_is_not_a_duplicate(self):
        self.make()
        task_id = new_task_id()
        back = {"topic": INPUT, "instruction": "judge again", "input": None, "next": None}
        first = envelope(AGENT, task_id=task_id, cid="loop", instruction="judge",
                         next={"topic": "/control/agents/writer/input", "instruction": "write", "input": None,
                               "next": back})
        revisit = envelope(AGENT, task_id=task_id, cid="loop", instruction="judge again", input="did write")
        self.deliver(first)
        self.deliver(revisit)
        redelivery = self.deliver(revisit)
        topics = [topic for topic, _ in self.publisher.published()]
        self.assertEqual(topics, ["/control/agents/writer/input", f"/conversations/loop/{AGENT}"])
        self.assertEqual(redelivery.acks, 1)

    def test_a_failing_store_never_blocks_the_ack(self):
        with tempfile.TemporaryDirectory() as state:
            store = DedupeStore(100, state, AGENT)
            self.addCleanup(store.close)
            self.make(store=store)
            self.deliver(envelope(AGENT))
            store._db.execute("PRAGMA query_only = 1")  # every write now fails inside sqlite
            with self.assertLogs("agent2389.dedupe", "ERROR") as logs:
                deliveries = [self.deliver(envelope(AGENT)) for _ in range(20)]
            self.assertEqual([d.acks for d in deliveries], [1] * 20)
            self.assertEqual(len(logs.output), 1, "logged once a minute, not once per task")
            self.assertIn("completed-task store write failed: attempt to write a readonly database", store.degraded)
            again = self.deliver(json.loads(deliveries[0].payload))  # remembered in memory
            self.assertEqual((again.acks, len(self.publisher.published())), (1, 21))


if __name__ == "__main__":
    unittest.main()
