"""Cancel messages read, and cancels kept for tasks not seen yet (PROTOCOL.md 7)."""

import json
import unittest

from agent2389_lib.cancels import Cancel, CancelError, KeptCancels, parse_cancel
from support import FakeClock

TASK = "123e4567-e89b-12d3-a456-426614174000"


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


class KeptCancelsTests(unittest.TestCase):
    def test_a_kept_cancel_is_read_until_its_time_is_up(self):
        clock = FakeClock(100.0)
        kept = KeptCancels(clock=clock)
        kept.keep(Cancel(TASK, "c1", "stop"), until=clock.now + 300)
        self.assertEqual(kept.get(TASK), Cancel(TASK, "c1", "stop"))
        self.assertEqual(kept.get(TASK), Cancel(TASK, "c1", "stop"), "read, not taken: a redelivery finds it too")
        clock.now += 300
        self.assertIsNone(kept.get(TASK), "older than task_timeout: its task is not coming")
        self.assertEqual(len(kept), 0)

    def test_one_without_a_time_stays_while_there_is_room(self):
        clock = FakeClock(100.0)
        kept = KeptCancels(clock=clock)
        kept.keep(Cancel(TASK, "c1", ""), until=None)
        clock.now += 10 ** 6
        self.assertEqual(kept.get(TASK), Cancel(TASK, "c1", ""))

    def test_only_the_newest_are_kept(self):
        kept = KeptCancels(capacity=3, clock=FakeClock(100.0))
        ids = [f"00000000-0000-0000-0000-00000000000{n}" for n in range(5)]
        for task_id in ids:
            kept.keep(Cancel(task_id, None, ""), until=None)
        self.assertEqual(len(kept), 3)
        self.assertIsNone(kept.get(ids[0]))
        self.assertIsNotNone(kept.get(ids[4]))


if __name__ == "__main__":
    unittest.main()
