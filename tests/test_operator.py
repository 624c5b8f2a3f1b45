"""inject, monitor, pipeline and healthcheck against live agent processes and a real broker."""

import json
import re
import subprocess
import sys
import time
import unittest

from agent2389_lib import protocol
from agent2389_lib.cli.ops import message_type, monitor_topics, render
from support import AGENT_SCRIPT, BrokerTestCase, base_env, free_port, process, wait_until


def cli(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, AGENT_SCRIPT, *args], env=base_env(**(env or {})), capture_output=True,
                          text=True, timeout=timeout)


class PoolMonitoringTests(unittest.TestCase):
    def test_availability_mode_shows_pool_members(self):
        topics = monitor_topics("availability", "writer", None)
        self.assertEqual(topics, ["/control/agents/writer/status", "/control/agents/writer/instances/+/status"])
        topic = "/control/agents/writer/instances/writer-1/status"
        payload = json.dumps({"agent_id": "writer", "status": "available", "instance_id": "writer-1"}).encode()
        self.assertEqual(message_type(topic, json.loads(payload)), "status")
        self.assertIn("writer instance writer-1 is available", render(topic, payload, "pretty", colour=False))


class OperatorTests(BrokerTestCase):
    def setUp(self):
        super().setUp()
        self.status = self.watcher("/control/agents/+/status")
        self.env = {"MQTT_HOST": "127.0.0.1", "MQTT_PORT": str(self.broker.port)}

    def start(self, *names, **kwargs):
        return [self.agent(name, **kwargs).start_and_wait_available(self.status) for name in names]

    def test_inject_wait_prints_response(self):
        self.start("solo", tools={"echo": "builtin"})
        result = cli("inject", "--agent-id", "solo", "--message", "hello there", "--instruction", "Greet", "--wait",
                     "30", env=self.env)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), 'Greet\nInput data: {"message":"hello there"}')

    def test_broker_url_flag_and_json_output(self):
        self.start("solo")
        result = cli("inject", "--agent-id", "solo", "--input", '{"k": [1, 2]}', "--wait", "--json",
                     "--broker-url", self.broker.url)
        self.assertEqual(result.returncode, 0, result.stderr)
        out = json.loads(result.stdout)
        self.assertEqual(out["reply"]["payload"]["task_id"], out["task"]["task_id"])
        self.assertEqual(out["task"]["input"], {"k": [1, 2]})

    def test_failing_task_exits_1_with_code(self):
        self.start("solo")
        too_long = ",".join(f"stage{i:02d}" for i in range(20))
        result = cli("inject", "--agent-id", "solo", "--message", "x", "--next", too_long, "--wait", "30", env=self.env)
        self.assertEqual(result.returncode, 1)
        self.assertIn("error pipeline_depth_exceeded", result.stderr)

    def test_next_chain_through_two_agents(self):
        self.start("first", "second")
        result = cli("inject", "--agent-id", "first", "--instruction", "Start", "--message", "m", "--next", "second",
                     "--wait", "30", "--json", env=self.env)
        self.assertEqual(result.returncode, 0, result.stderr)
        reply = json.loads(result.stdout)["reply"]
        self.assertEqual(reply["topic"].split("/")[-1], "second")
        self.assertIn("Start", reply["payload"]["response"])  # the first agent's text became the input

    def test_tool_reaches_echo_tool(self):
        self.start("solo", tools={"echo": "builtin"})
        result = cli("inject", "--agent-id", "solo", "--tool", "echo", "--tool-params", '{"message": "tool says hi"}',
                     "--wait", "30", env=self.env)
        self.assertEqual((result.returncode, result.stdout.strip()), (0, "tool says hi"))

    def test_v2_envelope(self):
        self.start("solo")
        result = cli("inject", "--agent-id", "solo", "--message", "x", "--v2", "--query", "the question", "--json",
                     env=self.env)
        task = json.loads(result.stdout)["task"]
        self.assertEqual((task["version"], task["context"]["original_query"]), ("2.0", "the question"))

    def test_inject_expires_in_sets_the_field_and_the_mqtt_5_expiry(self):
        inputs = self.watcher("/control/agents/later/input")
        before = time.time()
        result = cli("inject", "--agent-id", "later", "--message", "x", "--expires-in", "15m", "--no-check", "--json",
                     env=self.env)
        self.assertEqual(result.returncode, 0, result.stderr)
        inputs.wait_for("/control/agents/later/input")
        (message,) = [m for m in list(inputs.messages) if m.topic == "/control/agents/later/input"]
        task = json.loads(message.payload)
        self.assertAlmostEqual(protocol.parse_envelope(message.payload).expires_at, before + 900, delta=5)
        self.assertEqual(json.loads(result.stdout)["task"]["expires_at"], task["expires_at"])
        self.assertLessEqual(message.properties.MessageExpiryInterval, 900)
        self.assertGreater(message.properties.MessageExpiryInterval, 890)
        shown = render(message.topic, message.payload, "compact", colour=False,
                       expiry=message.properties.MessageExpiryInterval)
        self.assertIn(f"expires={task['expires_at']} expiry=", shown)
        bad = cli("inject", "--agent-id", "later", "--message", "x", "--expires-in", "soon", env=self.env)
        self.assertEqual(bad.returncode, 2)
        self.assertIn("'soon' is not a duration", bad.stderr)

    def test_cancel_publishes_checks_its_arguments_and_says_how_the_task_ended(self):
        watcher = self.watcher("/control/agents/+/cancel")
        task_id = "123e4567-e89b-12d3-a456-426614174000"
        result = cli("cancel", "--agent-id", "away", "--task-id", task_id.upper(), "--reason", "typo", env=self.env)
        self.assertEqual(result.returncode, 0, result.stderr)
        (published,) = watcher.wait_for("/control/agents/away/cancel")
        self.assertEqual(published, {"task_id": task_id, "reason": "typo"})
        for args, text in ((["--task-id", "nope"], "task_id (a UUID)"),
                           (["--task-id", task_id, "--reason", "x" * 501], "at most 500 characters")):
            with self.subTest(args=args[-1][:10]):
                bad = cli("cancel", "--agent-id", "away", *args, env=self.env)
                self.assertEqual(bad.returncode, 2)
                self.assertIn(text, bad.stderr)
        self.start("finisher")
        done = cli("inject", "--agent-id", "finisher", "--message", "x", "--wait", "30", "--json", env=self.env)
        finished_id = json.loads(done.stdout)["task"]["task_id"]
        late = cli("cancel", "--agent-id", "finisher", "--task-id", finished_id, "--wait", "30", env=self.env)
        self.assertEqual(late.returncode, 1, late.stderr)
        self.assertIn("[finisher] the task had already finished here: nothing to stop", late.stderr)
        self.assertIn(f"task {finished_id} had already finished at finisher: nothing was canceled", late.stderr)
        unknown = cli("cancel", "--agent-id", "finisher", "--task-id", task_id, "--wait", "2", "--json", env=self.env)
        self.assertEqual(unknown.returncode, 124)
        self.assertEqual(json.loads(unknown.stdout)["findings"],
                         [{"agent_id": "finisher", "found": "not_seen", "next_agent": None}])

    def test_timeout_exit_124(self):
        result = cli("inject", "--agent-id", "nobody-home", "--message", "x", "--wait", "1", "--no-check", env=self.env)
        self.assertEqual(result.returncode, 124)
        self.assertIn("no answer", result.stderr)

    def test_unreachable_broker(self):
        result = cli("inject", "--agent-id", "solo", "--message", "x", "--broker-url", f"mqtt://127.0.0.1:{free_port()}")
        self.assertEqual(result.returncode, 3)
        self.assertIn("cannot reach broker", result.stderr)

    def test_monitor_json_shows_every_kind(self):
        self.start("watched", tools={"echo": "builtin"})
        monitor = process(self, [sys.executable, AGENT_SCRIPT, "monitor", "--format", "json", "--count", "12",
                                 "--agent-id", "watched"], env=base_env(**self.env), stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
        first = json.loads(monitor.stdout.readline())  # the retained status arrives once subscribed
        self.assertEqual((first["message_type"], first["payload"]["status"]), ("status", "available"))
        injected = cli("inject", "--agent-id", "watched", "--tool", "echo", "--tool-params", '{"message": "x"}',
                       "--wait", "30", env=self.env)
        trace_id = re.search(r"^published task \S+ to \S+ on \S+ \(trace ([0-9a-f]{32})\)", injected.stderr, re.M).group(1)
        lines = [first] + [json.loads(monitor.stdout.readline()) for _ in range(11)]
        self.assertEqual(monitor.wait(30), 0)
        kinds = {line["message_type"] for line in lines}
        self.assertEqual(kinds, {"status", "task", "response", "progress"})
        for line in lines:
            self.assertEqual(set(line), {"timestamp", "message_type", "topic", "payload", "trace_id", "expiry_seconds"})
            # the task, its answer and its progress events are all of the trace inject started
            self.assertEqual(line["trace_id"], None if line["message_type"] == "status" else trace_id, line)

    def test_monitor_compact_and_pretty(self):
        self.start("watched")
        for fmt, expected in (("compact", " status /control/agents/watched/status watched is available (capabilities: "
                                          "testing)\n"), ("pretty", "watched is available")):
            result = cli("monitor", "--format", fmt, "--mode", "availability", "--agent-id", "watched", "--count", "1",
                         env=self.env)
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertIn(expected, result.stdout)
            self.assertNotIn("\033[", result.stdout)  # no colour when stdout is not a terminal

    def test_pipeline_wait_returns_last_stage(self):
        self.start("researcher-agent", "writer-agent", "editor-agent")
        result = cli("pipeline", "--topic", "MQTT in IoT", "--wait", "60", "--json", env=self.env)
        self.assertEqual(result.returncode, 0, result.stderr)
        out = json.loads(result.stdout)
        self.assertEqual(out["reply"]["topic"].split("/")[-1], "editor-agent")
        self.assertTrue(out["reply"]["payload"]["response"].startswith("Edit the article"))
        self.assertEqual(out["task"]["input"], {"topic": "MQTT in IoT"})
        self.assertEqual(out["task"]["next"]["next"]["topic"], "/control/agents/editor-agent/input")

    def test_healthcheck_follows_agent_state(self):
        (agent,) = self.start("probed")
        port = agent.env["HEALTH_PORT"]
        ok = cli("healthcheck", env={"HEALTH_PORT": port})
        self.assertEqual((ok.returncode, ok.stdout), (0, ""))
        self.assertEqual(cli("healthcheck", "--endpoint", "ready", "--port", port).returncode, 0)
        self.assertIn('"status": "healthy"', cli("healthcheck", "-v", "--port", port).stdout)
        nobody = str(free_port())  # the pipeline recipe's wait: bounded, and it says why it stops
        bounded = cli("healthcheck", "--endpoint", "ready", "--wait", "1", "--port", port, "--port", nobody)
        self.assertEqual(bounded.returncode, 1)
        self.assertIn(f"not ready within 1 s (is each agent running, on its own HEALTH_PORT?):\n  "
                      f"http://127.0.0.1:{port}/ready: HTTP 200", bounded.stderr)
        self.assertIn(f"http://127.0.0.1:{nobody}/ready: ", bounded.stderr)
        self.assertEqual(cli("healthcheck", "--endpoint", "ready", "--wait", "5", "--port", port).returncode, 0)
        self.broker.stop()
        try:
            wait_until(lambda: cli("healthcheck", "--port", port).returncode == 1, 30, "healthcheck to fail")
            self.assertEqual(cli("healthcheck", "--endpoint", "live", "--port", port).returncode, 0)
        finally:
            self.broker.start()
        agent.stop()
        self.assertEqual(cli("healthcheck", "--port", port).returncode, 1)

    def test_every_command_has_help_with_example(self):
        for command in ("run", "check-config", "version", "inject", "monitor", "pipeline", "healthcheck", "cancel"):
            result = cli(command, "--help")
            self.assertEqual(result.returncode, 0)
            self.assertRegex(result.stdout, r"\nexample: .*agent2389 " + command)


if __name__ == "__main__":
    unittest.main()
