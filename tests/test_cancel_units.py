"""Cancel without a broker (PROTOCOL.md 7): a task's token and what it interrupts, where a cancel
finds its task, and the processor's one `canceled` answer."""

import os
import tempfile
import threading
import time
import unittest

from agent2389_lib import taskscope, tracing
from agent2389_lib.cancels import Cancel
from agent2389_lib.config import ToolSpec
from agent2389_lib.dedupe import DedupeStore
from agent2389_lib.events import Events
from agent2389_lib.inflight import FINISHED, FORWARDED, NOT_SEEN, RUNNING, InFlight
from agent2389_lib.taskscope import CancelToken, TaskCanceled
from agent2389_lib.tools.command import CommandTool
from support import FakeClock, envelope, new_task_id, process_gone, read_pids, wait_until
from test_processor import AGENT, ProcessorTestCase


def cancel_from_another_thread(token: CancelToken, reason: str, when: threading.Event) -> threading.Thread:
    """Cancels `token` once `when` is set, as the network thread does."""
    def run() -> None:
        when.wait(30)
        token.cancel(reason)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


class TokenTests(unittest.TestCase):
    def test_a_cancel_runs_the_aborts_registered_and_is_said_once(self):
        token = CancelToken()
        aborted = []
        with token.aborting(lambda: aborted.append("socket")):
            self.assertTrue(token.cancel("wrong input"))
            self.assertFalse(token.cancel("again"), "cancelled once")
        self.assertEqual(aborted, ["socket"])
        self.assertEqual(token.message(), "the task was canceled: wrong input")
        with self.assertRaises(TaskCanceled):
            token.check()

    def test_an_abort_ended_is_not_run_and_a_step_after_the_cancel_does_not_start(self):
        token = CancelToken()
        aborted = []
        with token.aborting(lambda: aborted.append("first")):
            pass
        token.cancel("")
        self.assertEqual(aborted, [], "its step had ended: the next one must not be hit")
        with self.assertRaises(TaskCanceled):
            with token.aborting(lambda: aborted.append("late")):
                self.fail("a step of a cancelled task began")
        self.assertEqual(CancelToken().message(), "the task was canceled")

    def test_sleep_ends_at_the_cancel(self):
        token = CancelToken()
        started = threading.Event()
        cancel_from_another_thread(token, "stop", started)
        with taskscope.bound(token):
            began = time.monotonic()
            started.set()
            with self.assertRaises(TaskCanceled):
                taskscope.sleep(60)
        self.assertLess(time.monotonic() - began, 10)
        self.assertIsNone(taskscope.current(), "unbound after the task")

    def test_a_shielded_step_is_not_interrupted(self):
        token = CancelToken()
        token.cancel("")
        with taskscope.bound(token):
            with taskscope.shielded():
                taskscope.check()  # telling a server its request is cancelled must still happen
            with self.assertRaises(TaskCanceled):
                taskscope.check()


class CommandToolCancelTests(unittest.TestCase):
    def test_a_cancel_kills_the_tools_whole_process_group(self):
        directory = tempfile.mkdtemp()
        pids = os.path.join(directory, "pids")
        script = os.path.join(directory, "tool.sh")
        with open(script, "w") as handle:  # a child that ignores SIGTERM, and the leader
            handle.write(f"#!/bin/sh\n(trap '' TERM; sleep 60) &\necho $! > {pids}\necho $$ >> {pids}\nsleep 60\n")
        os.chmod(script, 0o755)
        tool = CommandTool(ToolSpec(name="slow", kind="command", command=script, timeout=120), 65536)
        token = CancelToken()
        started = threading.Event()
        cancel_from_another_thread(token, "stop", started)
        began = time.monotonic()
        both_started = lambda: len(read_pids(pids)) == 2  # noqa: E731
        threading.Thread(target=lambda: (wait_until(both_started, 10, "the tool started"), started.set()),
                         daemon=True).start()
        with taskscope.bound(token):
            with self.assertRaises(TaskCanceled):
                tool.execute({}, time.monotonic() + 120)
        self.assertLess(time.monotonic() - began, 30)
        for pid in read_pids(pids):
            wait_until(lambda pid=pid: process_gone(pid), 10, f"process {pid} gone")


class InFlightTests(unittest.TestCase):
    def setUp(self):
        self.clock = FakeClock()
        self.store = DedupeStore(100)
        self.followed: list = []
        self.inflight = InFlight(self.store, 300, Events(), lambda agent, c: self.followed.append((agent, c)),
                                 clock=self.clock)
        self.task = new_task_id()

    def test_a_running_task_is_stopped(self):
        token = self.inflight.start(self.task)
        self.assertEqual(self.inflight.cancel(Cancel(self.task, "c1", "stop")), RUNNING)
        self.assertEqual(token.reason, "stop")

    def test_a_cancel_before_its_task_is_kept_for_task_timeout(self):
        self.assertEqual(self.inflight.cancel(Cancel(self.task, None, "early")), NOT_SEEN)
        token = self.inflight.start(self.task)
        self.assertEqual(token.reason, "early", "the task starts cancelled")
        self.inflight.end(self.task, token, None)
        other = new_task_id()
        self.inflight.cancel(Cancel(other, None, ""))
        self.clock.now += 300
        self.assertFalse(self.inflight.start(other).canceled, "kept for task_timeout only")

    def test_a_forwarded_task_is_followed_once(self):
        self.store.finish("k", completed=True, task_id=self.task, forwarded_to="writer")
        self.assertEqual(self.inflight.cancel(Cancel(self.task, "c1", "stop")), FORWARDED)
        self.assertEqual(self.followed, [("writer", Cancel(self.task, "c1", "stop"))])
        self.store.finish("k2", completed=True, task_id=new_task_id())
        self.assertEqual(self.inflight.cancel(Cancel(new_task_id(), None, "")), NOT_SEEN)

    def test_a_cancel_while_the_forward_is_published_follows_it(self):
        token = self.inflight.start(self.task)
        self.inflight.cancel(Cancel(self.task, "c1", "late"))  # the forward was already on its way
        self.store.finish("k", completed=True, task_id=self.task, forwarded_to="writer")
        self.inflight.end(self.task, token, "writer")
        self.assertEqual(self.followed, [("writer", Cancel(self.task, "c1", "late"))])
        self.assertEqual(self.inflight.cancel(Cancel(self.task, "c1", "again")), FORWARDED, "and again after")

    def test_where_a_cancel_was_found_is_said_before_it_is_acted_on(self):
        """A watcher reads an agent's `cancel_received` before the task's `canceled` error, from this
        agent or the next one (in CI the next agent's error once came first, and the CLI stopped there)."""
        said: list = []
        self.inflight.events.subscribe(lambda event: said.append((event.found, list(self.followed), token.canceled)))
        token = self.inflight.start(self.task)
        self.inflight.cancel(Cancel(self.task, "c1", "stop"))
        self.inflight.end(self.task, token, None)
        forwarded = new_task_id()
        self.store.finish("k", completed=True, task_id=forwarded, forwarded_to="writer")
        self.inflight.cancel(Cancel(forwarded, "c1", "stop"))
        self.assertEqual(said, [(RUNNING, [], False), (FORWARDED, [], True)])

    def test_a_finished_task_changes_nothing(self):
        self.store.finish("k", completed=True, task_id=self.task)
        with self.assertLogs("agent2389.cancels", "INFO") as logs:
            self.assertEqual(self.inflight.cancel(Cancel(self.task, None, "")), FINISHED)
        self.assertIn("changes nothing", logs.output[0])
        self.assertEqual(self.followed, [])

    def test_malformed_cancels_are_logged_at_warn_rate_limited_and_change_nothing(self):
        with self.assertLogs("agent2389.cancels", "WARNING") as logs:
            for payload in (b"{", b'{"reason": "no id"}', b"x" * 5000):
                self.inflight.receive("/control/agents/a/cancel", payload)
        self.assertEqual(len(logs.output), 1, "one line, then once a minute")
        self.assertIn("malformed cancel", logs.output[0])

    def test_kept_cancels_survive_a_restart(self):
        directory = tempfile.mkdtemp()
        store = DedupeStore(100, directory, AGENT)
        InFlight(store, 300, Events(), clock=self.clock).start(self.task)
        InFlight(store, 300, Events(), clock=self.clock).cancel(Cancel(self.task, "c1", "stop"))
        store.finish("k", completed=True, task_id="forwarded-one", forwarded_to="writer")
        store.close()
        reopened = DedupeStore(100, directory, AGENT)
        self.addCleanup(reopened.close)
        self.assertEqual(InFlight(reopened, 300, Events(), clock=self.clock).start(self.task).reason, "stop")
        self.assertEqual(reopened.finished("forwarded-one"), (True, "writer"))


class ProcessorCancelTests(ProcessorTestCase):
    def test_a_running_task_is_answered_canceled_once_and_never_forwarded(self):
        started = threading.Event()

        def think(task, deadline):
            started.set()
            taskscope.sleep(60)  # an LLM that takes its time
            return "never"

        self.make(think=think)
        task = envelope(AGENT, next={"topic": "/control/agents/writer/input", "instruction": "W", "input": None,
                                     "next": None})
        threading.Thread(target=lambda: (started.wait(30), self.processor.inflight.cancel(
            Cancel(task["task_id"], "conv1", "wrong input"))), daemon=True).start()
        delivery = self.deliver(task)
        message = self.assert_answered_then_acked(delivery, "/conversations/conv1/agent-one", lambda m: None)
        self.assertEqual(message["error"], {"code": "canceled", "message": "the task was canceled: wrong input"})
        tasks = self.metrics.snapshot()["tasks"]
        self.assertEqual((tasks["tasks_canceled"], tasks["tasks_failed"], tasks["tasks_completed"]), (1, 0, 0))
        self.journal.clear()
        self.deliver(task)
        self.assertEqual(self.publisher.published(), [], "a redelivery is a duplicate of a finished task")

    def test_the_task_span_ends_failed_and_marked_canceled(self):
        spans = []

        class RecordingSpan(tracing.Span):
            __slots__ = ("task", "attributes", "failure")

            def set(self, key, value):
                self.attributes[key] = value

            def fail(self, description):
                self.failure = description

        class RecordingTracer(tracing.Tracer):
            def start(self, name, kind, parent, attributes, task):
                span = RecordingSpan(tracing.child_of(parent))
                span.task, span.attributes, span.failure = task, dict(attributes), None
                spans.append(span)
                return span

        tracing.install(RecordingTracer())
        self.addCleanup(tracing.install, tracing.Tracer())
        self.make()
        task = envelope(AGENT)
        self.processor.inflight.cancel(Cancel(task["task_id"], None, ""))
        self.deliver(task)
        (task_span,) = [span for span in spans if span.task]
        self.assertEqual((task_span.attributes.get("agent2389.canceled"), task_span.failure), (True, "canceled"))

    def test_a_task_cancelled_before_it_arrives_is_not_run(self):
        ran = []
        self.make(think=lambda task, deadline: ran.append(task) or "ran")
        task = envelope(AGENT)
        self.processor.inflight.cancel(Cancel(task["task_id"], None, ""))
        delivery = self.deliver(task)
        message = self.assert_answered_then_acked(delivery, "/conversations/conv1/agent-one", lambda m: None)
        self.assertEqual((message["error"]["code"], ran), ("canceled", []))

    def test_a_cancel_recorded_before_a_crash_answers_the_redelivery(self):
        directory = tempfile.mkdtemp()
        store = DedupeStore(100, directory, AGENT)
        self.make(store=store)
        task = envelope(AGENT)
        self.processor.inflight.start(task["task_id"])  # running when the cancel came; then the process died
        self.processor.inflight.cancel(Cancel(task["task_id"], None, "stop"))
        store.close()
        ran = []
        self.make(think=lambda t, d: ran.append(t) or "ran", store=DedupeStore(100, directory, AGENT))
        delivery = self.deliver(task)
        message = self.assert_answered_then_acked(delivery, "/conversations/conv1/agent-one", lambda m: None)
        self.assertEqual((message["error"]["code"], ran), ("canceled", []))
        self.store.close()


if __name__ == "__main__":
    unittest.main()

