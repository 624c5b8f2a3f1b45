"""Metrics, health endpoints, logs and progress events, checked against a running agent process."""

import functools
import json
import subprocess
import sys
import unittest
import urllib.error
import urllib.request

from fake_llm import FakeOpenAI, Reply, Status
from prometheus_client.parser import text_string_to_metric_families

from agent2389_lib.metrics import FAMILIES, Metrics, json_document, percentile, prometheus_text
from agent2389_lib.outcome import TaskResult
from support import AgentProcess, BrokerTestCase, Mosquitto, Watcher, envelope, test_failed, wait_until

AGENT = "agent-obs"
INPUT = f"/control/agents/{AGENT}/input"
STATUS = f"/control/agents/{AGENT}/status"
OPENAI_KEY = "sk-observability-key-000"


def http_get(port, path, accept=None):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers.get("Content-Type"), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type"), exc.read().decode()


def pipe(first, second, stdin_text=None):
    """`first | second` without a shell."""
    producer = subprocess.Popen(first, stdin=subprocess.PIPE if stdin_text is not None else None,
                                stdout=subprocess.PIPE)
    consumer = subprocess.run(second, stdin=producer.stdout, capture_output=True, text=True, timeout=30)
    producer.stdout.close()
    producer.wait(30)
    return consumer.stdout


class MetricsUnitTests(unittest.TestCase):
    def test_percentiles_on_known_distribution(self):
        values = [i / 1000 for i in range(1, 101)]
        self.assertEqual((percentile(values, 0.5), percentile(values, 0.95), percentile(values, 0.99)),
                         (0.05, 0.095, 0.099))
        metrics = Metrics("a1", 4)
        for value in reversed(values):
            metrics.task_started()
            metrics.task_finished(TaskResult.COMPLETED, value)
        tasks = metrics.snapshot()["tasks"]
        self.assertEqual((tasks["processing_time_p50_ms"], tasks["processing_time_p95_ms"],
                          tasks["processing_time_p99_ms"], tasks["avg_processing_time_ms"]), (50.0, 95.0, 99.0, 50.5))
        self.assertEqual(percentile([], 0.5), 0.0)

    def test_window_is_last_1000(self):
        metrics = Metrics("a1", 1)
        for value in [10.0] * 500 + [0.001] * 1000:
            metrics.task_started()
            metrics.task_finished(TaskResult.COMPLETED, value)
        self.assertEqual(metrics.snapshot()["tasks"]["processing_time_p99_ms"], 1.0)

    def test_each_task_result_has_a_counter_of_its_own(self):
        """Before: results were strings, and one metrics did not know was counted as "ignored"."""
        metrics = Metrics("a1", 1)
        for count, result in enumerate(TaskResult, start=1):
            for _ in range(count):
                metrics.task_dropped(result)
        tasks = metrics.snapshot()["tasks"]
        self.assertEqual([tasks[f"tasks_{name}"] for name in ("completed", "failed", "rejected", "canceled", "parked",
                                                              "duplicate", "ignored")], [1, 2, 3, 4, 5, 6, 7])

    def test_the_time_from_a_cancel_to_its_tasks_end_is_a_histogram(self):
        metrics = Metrics("a1", 1)
        for seconds in (0.02, 0.3, 20.0):
            metrics.task_started()
            metrics.task_finished(TaskResult.CANCELED, 1.0, cancel_seconds=seconds)
        text = prometheus_text(metrics.read())
        self.assertIn("# TYPE agent2389_cancel_to_end_seconds histogram", text)
        self.assertIn('agent2389_cancel_to_end_seconds_bucket{le="0.01"} 0', text)
        self.assertIn('agent2389_cancel_to_end_seconds_bucket{le="0.025"} 1', text)
        self.assertIn('agent2389_cancel_to_end_seconds_bucket{le="0.5"} 2', text)
        self.assertIn('agent2389_cancel_to_end_seconds_bucket{le="10.0"} 2', text)
        self.assertIn('agent2389_cancel_to_end_seconds_bucket{le="+Inf"} 3', text)
        self.assertIn("agent2389_cancel_to_end_seconds_count 3", text)
        self.assertIn("agent2389_tasks_canceled_total 3", text)
        self.assertEqual(metrics.snapshot()["tasks"]["tasks_canceled"], 3)

    def test_prometheus_and_json_render_the_same_declared_figures(self):
        """Each figure is declared once: where both have it, Prometheus and the JSON document agree."""
        metrics = Metrics("a1", 2)
        metrics.tool_execution("echo", False, False, 0.5)
        metrics.task_received()
        reading = metrics.read()
        document = json_document(reading)
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(prometheus_text(reading)) for s in f.samples}
        compared = 0
        for family in FAMILIES:
            if family.name and family.path and not family.labels:
                json_value = functools.reduce(lambda node, key: node[key], family.path.split("."), document)
                self.assertEqual(samples[(family.name, ())], float(json_value), family.name)
                compared += 1
        self.assertGreater(compared, 20)

    def test_prometheus_text_parses_strictly(self):
        metrics = Metrics("a1", 2)
        metrics.tool_execution('we"ird\\tool', False, True, 0.5)
        metrics.llm_request("openai", seconds=0.2, retries=1, error_kind="rate_limited", tokens_in=3, tokens_out=4)
        text = prometheus_text(metrics.read())
        families = {f.name: f for f in text_string_to_metric_families(text)}
        self.assertIn("agent2389_tasks_completed", families)  # the parser strips _total from counters
        self.assertEqual(families["agent2389_tasks_completed"].type, "counter")
        self.assertEqual(families["agent2389_task_duration_seconds"].type, "summary")
        tool = [s for s in families["agent2389_tool_timeouts"].samples if s.name.endswith("_total")][0]
        self.assertEqual((tool.labels, tool.value), ({"tool": 'we"ird\\tool'}, 1.0))
        for name in families:
            self.assertRegex(name, r"^agent2389_[a-z_]+$")
        for line in text.splitlines():
            if line.startswith("# TYPE") and line.endswith(" counter"):
                self.assertTrue(line.split()[2].endswith("_total"), line)


class ScriptedRunTests(BrokerTestCase):
    """Six tasks, each with one tool call, two failing, run once for the class; then what each
    observer sees: the counters, the deployment guide's commands, the log lines, the progress events."""

    PUBLISHED = 1 + 1 + 6 + 6 * 8  # the startup probe, available, 6 outcomes, 8 progress events per task

    @classmethod
    def setUpClass(cls):
        cls.broker = Mosquitto().start()
        cls.addClassCleanup(cls.broker.cleanup)  # the class's cleanups run last first: the broker goes last
        fake = FakeOpenAI(api_key=OPENAI_KEY)
        cls.addClassCleanup(fake.close)
        cls.watch = Watcher(cls.broker.port, STATUS, "/conversations/#", f"/control/agents/{AGENT}/progress/#")
        cls.addClassCleanup(cls.watch.close)
        cls.run_agent = AgentProcess(cls.broker, AGENT, llm={"provider": "openai", "base_url": fake.base_url},
                                     tools={"echo": "builtin"},
                                     env={"OPENAI_API_KEY": OPENAI_KEY, "MAX_PIPELINE_DEPTH": "1", "LOG_LEVEL": "INFO"})
        cls.addClassCleanup(cls.run_agent.stop)
        cls.run_agent.start_and_wait_available(cls.watch)
        for index in range(6):
            fake.script += [Reply(tool_calls=[("echo", {"message": f"m{index}"})]),
                            Status(400) if index in (1, 4) else Reply(f"done {index}")]
        for index in range(6):
            cls.watch.publish(INPUT, envelope(AGENT, cid=f"c-obs{index}"))
        cls.watch.wait_for("/conversations/+/+", count=6, timeout=30)
        cls.provider = f"openai-compatible({fake.base_url})"
        cls.port = cls.run_agent.env["HEALTH_PORT"]
        cls.snapshot = wait_until(lambda: cls._settled(cls.port), 15, "all publishes acknowledged and tasks finished")

    @classmethod
    def tearDownClass(cls):
        pass  # the class cleanups do it, in order

    def tearDown(self):
        super().tearDown()
        if test_failed(self):
            print(f"\n--- log of {AGENT} ---\n{self.run_agent.log()[-3000:]}", file=sys.stderr)

    def test_counters(self):
        snapshot = self.snapshot
        tasks, mqtt, tools, llm = snapshot["tasks"], snapshot["mqtt"], snapshot["tools"], snapshot["llm"]["providers"]
        self.assertEqual({k: tasks[k] for k in ("tasks_received", "tasks_processing", "tasks_completed", "tasks_failed",
                                                "tasks_rejected", "tasks_duplicate", "current_pipeline_depth",
                                                "max_pipeline_depth_reached", "intake_queue_depth", "tasks_finished")},
                         {"tasks_received": 6, "tasks_processing": 0, "tasks_completed": 4, "tasks_failed": 2,
                          "tasks_rejected": 0, "tasks_duplicate": 0, "current_pipeline_depth": 0,
                          "max_pipeline_depth_reached": 1, "intake_queue_depth": 0, "tasks_finished": 6})
        self.assertGreater(tasks["avg_processing_time_ms"], 0)
        self.assertEqual({k: mqtt[k] for k in ("connected", "connection_attempts", "connections_established",
                                               "connection_failures", "messages_received", "publish_failures")},
                         {"connected": True, "connection_attempts": 2, "connections_established": 1,
                          "connection_failures": 0, "messages_received": 6, "publish_failures": 0})
        self.assertEqual(mqtt["messages_published"], self.PUBLISHED)
        echo = tools["tool_stats"]["echo"]
        self.assertEqual({k: echo[k] for k in ("executions", "failures", "timeouts", "success_rate")},
                         {"executions": 6, "failures": 0, "timeouts": 0, "success_rate": 1.0})
        self.assertEqual((tools["total_executions"], tools["total_failures"]), (6, 0))
        self.assertEqual({k: llm[self.provider][k] for k in ("requests", "errors", "errors_by_kind", "retries",
                                                              "tokens_in", "tokens_out")},
                         {"requests": 12, "errors": 2, "errors_by_kind": {"bad_request": 2}, "retries": 0,
                          "tokens_in": 110, "tokens_out": 70})
        self.assertEqual((snapshot["lifecycle"]["current_state"], snapshot["lifecycle"]["healthy"],
                          snapshot["lifecycle"]["restarts"]), ("running", True, 0))
        self.assertEqual(snapshot["agent_id"], AGENT)
        self.assertGreater(snapshot["system"]["memory_used_bytes"], 1_000_000)

    def test_the_deployment_guides_commands_verbatim_but_for_the_port(self):
        url = f"http://localhost:{self.port}/metrics"
        self.assertEqual(pipe(["curl", "-s", url], ["jq", ".tasks.current_pipeline_depth"]).strip(), "0")
        for path, expected in ((".tasks.tasks_processing", "0"), (".mqtt.connected", "true")):
            self.assertEqual(pipe(["curl", "-s", url], ["jq", path]).strip(), expected)
        for path in (".tasks.avg_processing_time_ms", ".uptime_seconds"):
            self.assertGreater(float(pipe(["curl", "-s", url], ["jq", path])), 0)
        summary = json.loads(pipe(["curl", "-s", url], ["jq", "{tasks_processing: .tasks.tasks_processing, "
                                                               "mqtt_connected: .mqtt.connected, "
                                                               "avg_processing_time: .tasks.avg_processing_time_ms}"]))
        self.assertEqual(set(summary), {"tasks_processing", "mqtt_connected", "avg_processing_time"})
        self.assertEqual(pipe(["curl", "-s", f"http://localhost:{self.port}/health"], ["jq", ".status"]).strip(),
                         '"healthy"')

    def test_log_lines(self):
        logs = self.run_agent.log()
        errors = self._jq(logs, 'select(.level=="ERROR")')
        self.assertEqual(len(errors), 2)
        self.assertTrue(all("llm_error" in e["fields"]["message"] for e in errors))
        processing = self._jq(logs, 'select(.span.operation=="task_processing")')
        self.assertEqual(len({p["span"]["task_id"] for p in processing}), 6)
        self.assertTrue(all(p["span"]["agent_id"] == AGENT and p["span"]["conversation_id"] for p in processing))
        mqtt_lines = self._jq(logs, 'select(.target | contains("mqtt"))')
        self.assertEqual({line["target"] for line in mqtt_lines}, {"agent2389::transport::mqtt"})
        self.assertTrue(any("subscribed to" in line["fields"]["message"] for line in mqtt_lines))

    def test_progress_events(self):
        progress = self.watch.matching(f"/control/agents/{AGENT}/progress/#")
        self.assertEqual(len(progress), 48)
        for event in progress:
            self.assertEqual(list(event), ["agent_id", "task_id", "conversation_id", "timestamp", "category",
                                           "event_type", "message", "metadata"])
        by_topic = {suffix: self.watch.matching(f"/control/agents/{AGENT}/progress{suffix}")
                    for suffix in ("", "/llm", "/tools")}
        self.assertEqual({e["event_type"] for e in by_topic[""]}, {"TaskStart", "TaskComplete", "TaskError"})
        self.assertEqual({e["event_type"] for e in by_topic["/llm"]}, {"LlmRequest", "LlmResponse", "LlmError"})
        self.assertEqual({e["event_type"] for e in by_topic["/tools"]}, {"ToolCall", "ToolComplete"})
        self.assertTrue(all(e["metadata"] == {"tool_name": "echo"} for e in by_topic["/tools"]))
        self.assertTrue(all(e["metadata"] is None for e in by_topic["/llm"]))
        self.assertTrue(all(e["metadata"] is None for e in by_topic[""] if e["event_type"] == "TaskStart"))
        ended = [e for e in by_topic[""] if e["event_type"] != "TaskStart"]  # with the agent's own share of usage
        self.assertTrue(all(set(e["metadata"]["usage"]) == {"input_tokens", "output_tokens", "cost_usd"}
                            for e in ended))

    @staticmethod
    def _settled(port):
        snapshot = json.loads(http_get(port, "/metrics")[2])
        # a task is counted finished just after its last progress event is written
        done = snapshot["mqtt"]["messages_published"] >= ScriptedRunTests.PUBLISHED and \
            snapshot["tasks"]["tasks_finished"] >= 6
        return snapshot if done else None

    @staticmethod
    def _jq(text, program):
        out = subprocess.run(["jq", "-c", program], input=text, capture_output=True, text=True, timeout=30)
        return [json.loads(line) for line in out.stdout.splitlines()]


class EndpointTests(BrokerTestCase):
    @classmethod
    def setUpClass(cls):
        cls.broker = Mosquitto(persistence=True).start()

    def test_endpoints_and_ready_follows_broker(self):
        watcher = self.watcher(STATUS)
        agent = self.agent(AGENT).start_and_wait_available(watcher)
        port = agent.env["HEALTH_PORT"]
        self.assertEqual(http_get(port, "/live")[:2], (200, "application/json"))
        self.assertEqual(json.loads(http_get(port, "/ready")[2]), {"status": "ready"})
        code, _, body = http_get(port, "/health")
        health = json.loads(body)
        self.assertEqual((code, health["status"], health["agent_id"]), (200, "healthy", AGENT))
        self.assertEqual(set(health["checks"]), {"mqtt", "task_processing", "state_store"})
        self.assertEqual(set(health["checks"]["mqtt"]), {"status", "message", "last_check"})
        self.assertIn("/metrics/prometheus", json.loads(http_get(port, "/")[2])["endpoints"])
        for accept in ("text/plain", "application/openmetrics-text; version=1.0.0"):
            code, kind, text = http_get(port, "/metrics", accept)
            self.assertTrue(kind.startswith("text/plain; version=0.0.4"))
            self.assertTrue(list(text_string_to_metric_families(text)))
        self.assertTrue(http_get(port, "/metrics/prometheus")[1].startswith("text/plain"))
        self.assertEqual(http_get(port, "/metrics", "application/json")[1], "application/json")
        self.assertEqual(http_get(port, "/nope")[0], 404)
        post = urllib.request.Request(f"http://127.0.0.1:{port}/health", data=b"x", method="POST")
        with self.assertRaises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(post, timeout=5)
        self.assertEqual(caught.exception.code, 405)

        self.broker.stop()
        wait_until(lambda: http_get(port, "/ready")[0] == 503, 20, "/ready to report 503")
        code, _, body = http_get(port, "/health")
        self.assertEqual((code, json.loads(body)["status"]), (503, "degraded"))
        self.assertEqual(json.loads(body)["checks"]["mqtt"]["status"], "unhealthy")
        self.assertEqual(http_get(port, "/live")[0], 200)
        self.broker.start()
        wait_until(lambda: http_get(port, "/ready")[0] == 200, 30, "/ready to recover")
        self.assertEqual(http_get(port, "/health")[0], 200)
        metrics = json.loads(http_get(port, "/metrics")[2])
        self.assertEqual(metrics["lifecycle"]["restarts"], 1)
        self.assertGreaterEqual(metrics["mqtt"]["connections_established"], 2)

    def test_slow_client_does_not_block(self):
        import socket
        watcher = self.watcher(STATUS)
        agent = self.agent(AGENT).start_and_wait_available(watcher)
        port = int(agent.env["HEALTH_PORT"])
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]  # never send a request
        self.addCleanup(lambda: [s.close() for s in idle])
        self.assertEqual(http_get(port, "/live")[0], 200)


class ProgressSwitchTests(BrokerTestCase):
    def test_progress_disabled(self):
        watcher = self.watcher(STATUS, "/conversations/#", f"/control/agents/{AGENT}/progress/#")
        self.agent(AGENT, agent={"progress_events": False}, tools={"echo": "builtin"},
                   env={"MAX_PIPELINE_DEPTH": "1"}).start_and_wait_available(watcher)
        with_tool = {"tool_request": {"name": "echo", "parameters": {"message": "x"}}}
        watcher.publish(INPUT, envelope(AGENT, cid="c-quiet", input=with_tool))
        watcher.publish(INPUT, envelope(AGENT, cid="c-quiet2"))
        # one worker and one output connection: the first task's events would precede this answer
        watcher.wait_for("/conversations/c-quiet2/+")
        self.assertEqual(len(watcher.matching("/conversations/c-quiet/+")), 1)
        self.assertEqual(watcher.matching(f"/control/agents/{AGENT}/progress/#"), [])


if __name__ == "__main__":
    unittest.main()
