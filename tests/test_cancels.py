"""Cancel messages read, and cancels kept for tasks not seen yet (PROTOCOL.md 7)."""

import json
import unittest

from agent2389_lib.cancels import Cancel, CancelError, PendingCancels, parse_cancel

TASK = "123e4567-e89b-12d3-a456-426614174000"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class ParseCancelTests(unittest.TestCase):
    def test_a_cancel_names_its_task_and_may_say_why(self):
        cancel = parse_cancel(json.dumps({"task_id": TASK.upper(), "conversation_id": "c1", "reason": "wrong input"})
                              .encode())
        self.assertEqual(cancel, Cancel(TASK, "c1", "wrong input"))
        self.assertEqual(parse_cancel(json.dumps({"task_id": TASK}).encode()), Cancel(TASK, None, ""))

    def test_malformed_cancels_say_what_is_wrong(self):
        cases = {b"{not json": "not valid JSON", b"[1]": "must be a JSON object",
                 json.dumps({"conversation_id": "c1"}).encode(): "needs the task_id",
                 json.dumps({"task_id": "not-a-uuid"}).encode(): "needs the task_id",
                 json.dumps({"task_id": TASK, "conversation_id": "a/b"}).encode(): "conversation_id must be",
                 json.dumps({"task_id": TASK, "reason": 5}).encode(): "reason must be a string",
                 json.dumps({"task_id": TASK, "reason": "x" * 501}).encode(): "at most 500 characters",
                 json.dumps({"task_id": TASK, "pad": "x" * 5000}).encode(): "over 4096"}
        for payload, text in cases.items():
            with self.subTest(payload=payload[:40]):
                with self.assertRaises(CancelError) as caught:
                    parse_cancel(payload)
                self.assertIn(text, str(caught.exception))


class PendingCancelsTests(unittest.TestCase):
    def test_a_kept_cancel_is_taken_once_and_only_while_it_is_fresh(self):
        clock = FakeClock()
        pending = PendingCancels(ttl=300, clock=clock)
        pending.keep(Cancel(TASK, "c1", "stop"))
        self.assertEqual(pending.take(TASK), Cancel(TASK, "c1", "stop"))
        self.assertIsNone(pending.take(TASK), "taken once")
        pending.keep(Cancel(TASK, "c1", "stop"))
        clock.now += 300
        self.assertIsNone(pending.take(TASK), "older than task_timeout: its task is not coming")
        self.assertEqual(len(pending), 0)

    def test_only_the_newest_are_kept(self):
        pending = PendingCancels(ttl=300, capacity=3, clock=FakeClock())
        ids = [f"00000000-0000-0000-0000-00000000000{n}" for n in range(5)]
        for task_id in ids:
            pending.keep(Cancel(task_id, None, ""))
        self.assertEqual(len(pending), 3)
        self.assertIsNone(pending.take(ids[0]))
        self.assertIsNotNone(pending.take(ids[4]))


if __name__ == "__main__":
    unittest.main()
