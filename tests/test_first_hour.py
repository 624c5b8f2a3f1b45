"""Issue 17: what a new user meets in the first hour: feedback from `run`, `inject` and `monitor`,
configuration that means what it says, log lines that stay lines."""

import io
import json
import logging
import os
import pty
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

from fake_llm import FakeOpenAI
from support import (AGENT_SCRIPT, AgentProcess, BrokerTestCase, Mosquitto, Watcher, base_env, envelope, free_port,
                     process, wait_until)

from agent2389_lib.cli import ops
from agent2389_lib.config import load_config
from agent2389_lib.llm.openai import OpenAIProvider
from agent2389_lib.config import LlmSettings, Secret
from agent2389_lib.logs import configure_logging


def cli(*args, env=None, timeout=60, cwd=None):
    return subprocess.run([sys.executable, AGENT_SCRIPT, *args], env=base_env(**(env or {})), capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


def write(text):
    path = os.path.join(tempfile.mkdtemp(prefix="cfg-"), "agent.toml")
    with open(path, "w") as handle:
        handle.write(text)
    return path


class ConfigMeansWhatItSaysTests(unittest.TestCase):
    def test_budget_with_one_key_takes_the_other_default(self):
        config = load_config(write('agent_id = "abc"\n[llm]\nprovider = "echo"\n[budget]\nmax_tool_calls = 3\n'),
                             environ={}).config
        self.assertEqual((config.budget.max_tool_calls, config.budget.max_iterations), (3, 8))

    def test_provider_from_the_environment_alone(self):
        for provider, extra in (("echo", {}), ("anthropic", {"ANTHROPIC_API_KEY": "sk-ant-abc123"}),
                                ("openai", {"OPENAI_API_KEY": "sk-abc123", "ANTHROPIC_API_KEY": "sk-ant-abc123"})):
            with self.subTest(provider):
                loaded = load_config(None, environ={"AGENT_ID": "abc", "LLM_PROVIDER": provider, **extra})
                self.assertEqual((loaded.config.llm.provider, loaded.run_problems), (provider, ()))

    def test_health_bind_from_the_environment(self):
        config = load_config(None, environ={"AGENT_ID": "abc", "LLM_PROVIDER": "echo", "HEALTH_BIND": "127.0.0.1"}).config
        self.assertEqual(config.health_bind, "127.0.0.1")

    def test_missing_agent2389_config_is_an_error(self):
        result = cli("run", env={"AGENT2389_CONFIG": "/nonexistent/agent.toml", "AGENT_ID": "abc", "LLM_PROVIDER": "echo"})
        self.assertEqual(result.returncode, 2)
        self.assertEqual(result.stderr.strip(), "config error: AGENT2389_CONFIG=/nonexistent/agent.toml names a file "
                                                "that does not exist (unset it to configure from the environment alone)")

    def test_malformed_toml_reports_only_that(self):
        result = cli("check-config", "--config", write('agent_id = "abc"\n[llm\nprovider = "echo"\n'))
        self.assertEqual(result.returncode, 2)
        (line,) = result.stderr.strip().splitlines()
        self.assertIn("is not valid TOML", line)

    def test_broker_url_credentials(self):
        from agent2389_lib.config import load_mqtt_settings
        settings = load_mqtt_settings(None, environ={}, broker_url="mqtt://bob:p%40ss@127.0.0.1:1999")
        self.assertEqual((settings.username, settings.password.reveal(), settings.broker_url),
                         ("bob", "p@ss", "mqtt://127.0.0.1:1999"))

    def test_model_missing_from_the_server_list_warns(self):
        fake = FakeOpenAI()
        self.addCleanup(fake.close)
        settings = LlmSettings(provider="openai", model="gpt-4o-typo", api_key=Secret(fake.api_key), base_url=fake.base_url)
        with self.assertLogs("agent2389.llm", "WARNING") as logs:
            OpenAIProvider(settings).verify()
        self.assertIn("model 'gpt-4o-typo' is not among the 1 models", logs.output[0])
        with self.assertNoLogs("agent2389.llm", "WARNING") if hasattr(self, "assertNoLogs") else _no_warning(self):
            OpenAIProvider(LlmSettings(provider="openai", model="gpt-4o", api_key=Secret(fake.api_key),
                                       base_url=fake.base_url)).verify()


class _no_warning:
    """assertNoLogs for Python 3.9."""

    def __init__(self, case):
        self.case = case

    def __enter__(self):
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setLevel(logging.WARNING)
        logging.getLogger("agent2389.llm").addHandler(self.handler)

    def __exit__(self, *exc):
        logging.getLogger("agent2389.llm").removeHandler(self.handler)
        self.case.assertEqual(self.stream.getvalue(), "")


class CommandLineTests(unittest.TestCase):
    def test_version_flag(self):
        result = cli("--version")
        self.assertEqual((result.returncode, result.stdout.strip()), (0, "agent2389 0.1.0"))

    def test_inject_validates_agent_ids(self):
        for args in (["--agent-id", "a/b"], ["--agent-id", "ok-agent", "--next", "fine,x"]):
            with self.subTest(args):
                result = cli("inject", *args, "--message", "m", "--broker-url", "mqtt://127.0.0.1:1")
                self.assertEqual(result.returncode, 2)
                self.assertIn("is not a valid agent id", result.stderr)

    def test_pipeline_instruction_count_must_match(self):
        result = cli("pipeline", "--agents", "a-1,b-2,c-3", "--topic", "t", "--instruction", "only one",
                     "--broker-url", "mqtt://127.0.0.1:1")
        self.assertEqual(result.returncode, 2)
        self.assertIn("1 --instruction value(s) for 3 agents", result.stderr)

    def test_default_instructions_follow_the_role(self):
        self.assertEqual([ops.default_instruction(a)[:5] for a in ("editor-agent", "my-writer", "researcher", "bot")],
                         ["Edit ", "Write", "Resea", "Conti"])

    def test_text_logs_are_one_line_per_record(self):
        stream = io.StringIO()
        configure_logging("INFO", "text", (), stream=stream)
        self.addCleanup(configure_logging, "INFO", "json", (), stream=sys.stderr)
        log = logging.getLogger("agent2389.test")
        log.warning("error body:\n{\n  \"error\": 1\n}")
        try:
            raise ValueError("two\nlines")
        except ValueError:
            log.exception("failed")
        lines = stream.getvalue().splitlines()
        self.assertEqual(len(lines), 2, lines)
        self.assertIn('error body:\\n{\\n  "error": 1\\n}', lines[0])
        self.assertIn("ValueError: two\\nlines", lines[1])


class MonitorRenderingTests(unittest.TestCase):
    def test_progress_subscribed_once(self):
        self.assertEqual(ops.monitor_topics("progress", "a1", None), ["/control/agents/a1/progress/#"])

    def test_pretty_never_prints_none_and_compact_is_short(self):
        task = json.dumps({"task_id": "t1", "conversation_id": "c", "topic": "/control/agents/a1/input",
                           "instruction": None, "input": None, "next": None}).encode()
        error = json.dumps({"task_id": "t1", "error": {"code": "llm_error", "message": "x" * 500}}).encode()
        status = json.dumps({"agent_id": "a1", "status": "available"}).encode()
        for topic, payload in (("/control/agents/a1/input", task), ("/conversations/c/a1", error),
                               ("/control/agents/a1/status", status)):
            with self.subTest(topic):
                pretty = ops.render(topic, payload, "pretty", colour=False)
                compact = ops.render(topic, payload, "compact", colour=False)
                self.assertNotIn("None", pretty + compact)
                self.assertEqual(len(compact.splitlines()), 1)
                self.assertLessEqual(len(compact), 13 + len(topic) + 12 + ops.SUMMARY_CHARS)

    def test_a_large_message_is_summarized_unless_full(self):
        """Before: the default view printed a 400 KB answer in full."""
        answer = json.dumps({"task_id": "t1", "response": "word " * 80000}).encode()
        pretty = ops.render("/conversations/c/a1", answer, "pretty", colour=False)
        self.assertLess(len(pretty), ops.PRETTY_CHARS + 200)
        self.assertIn(f"more characters of {len(answer)} bytes; --full shows the whole message", pretty)
        self.assertIn("word " * 80000, ops.render("/conversations/c/a1", answer, "pretty", colour=False, full=True))
        self.assertIn("word " * 79999 + "word", ops.render("/conversations/c/a1", answer, "compact", colour=False,
                                                          full=True))


class SilentPort:
    """Something that accepts TCP connections and never answers (not an MQTT broker)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.accepted.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self):
        self.sock.close()
        for conn in self.accepted:
            conn.close()


class RunFeedbackTests(unittest.TestCase):
    def agent(self, port, **env):
        broker = Mosquitto()  # only its address is used
        broker.port = port
        agent = AgentProcess(broker, "lonely-agent", env={"LOG_FORMAT": "json", **env})
        self.addCleanup(agent.stop)
        return agent.start()

    def test_port_that_is_not_a_broker(self):
        silent = SilentPort()
        self.addCleanup(silent.close)
        agent = self.agent(silent.port)
        agent.wait_log("did not answer CONNECT within 10 s", timeout=20)
        line = next(json.loads(l) for l in agent.log().splitlines() if "did not answer CONNECT" in l)
        self.assertEqual(line["level"], "WARN")
        self.assertIn(f"broker 127.0.0.1:{silent.port} accepted the TCP connection", line["fields"]["message"])
        self.assertIn("is it an MQTT broker's port?", line["fields"]["message"])

    def test_refused_port_reported_once_then_rate_limited(self):
        agent = self.agent(free_port())
        wait_until(lambda: agent.metric("mqtt.connection_failures") >= 4, 30, "four failed connection attempts")
        lines = [l for l in agent.log().splitlines() if "cannot connect to broker" in l]
        self.assertEqual(len(lines), 1, lines)
        self.assertEqual(json.loads(lines[0])["level"], "WARN")
        self.assertIn("Connection refused", lines[0])

    def test_config_warnings_use_the_log_format(self):
        path = write('agent_id = "abc"\nmax_pipline_depth = 3\n[llm]\nprovider = "openai"\n')
        result = cli("run", "--config", path, env={"LOG_FORMAT": "json"})
        self.assertEqual(result.returncode, 2)
        lines = [json.loads(line) for line in result.stderr.strip().splitlines()]  # every line is JSON
        self.assertEqual([(l["level"], l["fields"]["message"][:14]) for l in lines],
                         [("WARN", "config warning"), ("ERROR", "config error: ")])


def at_a_terminal() -> None:
    """Ctrl-C as at a terminal: a suite started in the background (CI) hands its children
    SIGINT ignored, and a Python started so keeps it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class InjectAndMonitorTests(BrokerTestCase):
    def setUp(self):
        super().setUp()
        self.status = self.watcher("/control/agents/+/status")
        self.env = {"MQTT_HOST": "127.0.0.1", "MQTT_PORT": str(self.broker.port)}

    def test_text_logs_on_a_terminal_say_each_thing_once(self):
        """With LOG_FORMAT unset: text on a terminal (before: JSON; text lines ran to 274 characters,
        the task id and topic twice), and the start-up line names the LLM."""
        primary, secondary = pty.openpty()
        self.addCleanup(os.close, primary)
        agent = AgentProcess(self.broker, "tty-agent")
        env = {k: v for k, v in agent.env.items() if k != "LOG_FORMAT"}
        process(self, [sys.executable, AGENT_SCRIPT, "run", "--config", agent.config_path], env=env, cwd=agent.dir,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=secondary)
        os.close(secondary)
        lines: list = []
        reader = io.TextIOWrapper(io.FileIO(primary, closefd=False), encoding="utf-8", newline="")

        def read_until(text):
            while not any(text in line for line in lines):
                lines.append(reader.readline())
            return next(line for line in lines if text in line)

        read_until("is available on")
        task = envelope("tty-agent", cid="c-tty")
        self.status.publish("/control/agents/tty-agent/input", task)
        finished = read_until(f"task {task['task_id']} finished")
        self.assertFalse(any(line.lstrip().startswith("{") for line in lines), lines[:3])
        self.assertEqual(finished.count(task["task_id"]), 1, finished)
        self.assertNotIn("tty-agent", finished.split(": ", 1)[1], "the agent id is the same on every line")
        self.assertRegex(finished, r" \(conversation_id=c-tty trace=[0-9a-f]{32}\)\r?\n$")
        self.assertIn(f"broker {self.broker.url}, LLM echo model echo at offline,", read_until("starting (version"))

    def test_inject_to_an_agent_that_is_not_there_says_so_at_once(self):
        """Before: it waited the whole timeout without a hint, naming no broker."""
        where = f"127.0.0.1:{self.broker.port}"
        absent = cli("inject", "--agent-id", "nobody-here", "--message", "m", "--wait", "60", env=self.env, timeout=20)
        self.assertEqual(absent.returncode, 3, absent.stderr)
        self.assertIn(f"error: no agent nobody-here has announced itself on {where}", absent.stderr)
        gone = self.agent("gone-agent").start_and_wait_available(self.status)
        gone.stop()  # its retained status: unavailable
        left = cli("pipeline", "--agents", "gone-agent,writer-agent", "--topic", "t", "--wait", "60", env=self.env,
                   timeout=20)
        self.assertEqual(left.returncode, 3, left.stderr)
        self.assertIn(f"error: agent gone-agent is unavailable on {where}", left.stderr)
        sent = cli("inject", "--agent-id", "nobody-here", "--message", "m", "--no-check", env=self.env)
        self.assertEqual(sent.returncode, 0, sent.stderr)

    def test_inject_wait_keeps_its_answer_across_a_broker_restart(self):
        """Before: inject reconnected with a new session after the answer was published and said
        `no answer ... within 60 s` (exit 124); a retry would run the task again."""
        broker = Mosquitto(persistence=True).start()
        self.addCleanup(broker.cleanup)
        status = Watcher(broker.port, "/control/agents/+/status")
        self.addCleanup(status.close)
        agent = AgentProcess(broker, "blip-agent", llm={"provider": "echo", "latency_ms": 2000})
        self.addCleanup(agent.stop)
        agent.start_and_wait_available(status)
        proc = process(self, [sys.executable, AGENT_SCRIPT, "inject", "--agent-id", "blip-agent", "--message", "hi",
                              "--wait", "60", "--broker-url", broker.url], env=base_env(), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
        self.assertIn("published task", proc.stderr.readline())
        broker.stop()
        time.sleep(2)  # the outage: inject's client retries after 1 s, then 2 s more; the agent sooner
        broker.start()
        out, err = proc.communicate(timeout=90)
        self.assertEqual(proc.returncode, 0, err)
        self.assertEqual(out.strip(), "Input data: {\"message\":\"hi\"}")
        self.assertIn(f"lost the connection to broker 127.0.0.1:{broker.port}", err)
        self.assertIn(f"reconnected to broker 127.0.0.1:{broker.port}", err)

    def test_ctrl_c_ends_every_waiting_command_with_one_line_and_130(self):
        """Before: a Python traceback from inject --wait, pipeline --wait and healthcheck."""
        self.agent("sleeper", llm={"provider": "echo", "latency_ms": 60000},
                   agent={"shutdown_grace": 1}).start_and_wait_available(self.status)
        silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers: healthcheck waits
        self.addCleanup(silent.close)
        commands = {
            "inject": ["inject", "--agent-id", "sleeper", "--message", "hi", "--wait", "120"],
            "pipeline": ["pipeline", "--topic", "t", "--wait", "120", "--no-check"],
            "monitor": ["monitor"],
            "healthcheck": ["healthcheck", "--port", str(silent.getsockname()[1]), "--timeout", "120"],
        }
        for name, argv in commands.items():
            with self.subTest(name):
                proc = process(self, [sys.executable, AGENT_SCRIPT, *argv], env=base_env(**self.env),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=at_a_terminal)
                if name in ("inject", "pipeline"):
                    self.assertIn("published task", proc.stderr.readline())  # waiting now
                elif name == "healthcheck":
                    self.addCleanup(silent.accept()[0].close)
                else:
                    self.assertIn("status", proc.stdout.readline())  # sleeper's retained status: subscribed
                proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=30)
                self.assertEqual(proc.returncode, 130, err)
                self.assertNotIn("Traceback", err)
                self.assertEqual(err.splitlines()[-1], f"agent2389 {name}: interrupted")

    def test_inject_wait_shows_progress_unless_quiet(self):
        self.agent("thinker", llm={"provider": "echo", "latency_ms": 300}).start_and_wait_available(self.status)
        result = cli("inject", "--agent-id", "thinker", "--message", "hi", "--wait", "30", env=self.env)
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stderr.splitlines()
        self.assertRegex(lines[0], r"^published task [0-9a-f-]{36} to /control/agents/thinker/input on 127\.0\.0\.1:\d+ \(trace [0-9a-f]{32}\); "
                                   r"waiting up to 30 s for an answer on /conversations/cli-[0-9a-f]+/\+$")
        # TaskComplete follows the answer on the same connection, so the answer ends the wait first
        self.assertEqual([l.split("]")[1].split(":")[0].strip() for l in lines[1:]],
                         ["TaskStart", "LlmRequest", "LlmResponse"])
        self.assertTrue(all(l.startswith("  [thinker] ") for l in lines[1:]))
        quiet = cli("inject", "--agent-id", "thinker", "--message", "hi", "--wait", "30", "--quiet", env=self.env)
        self.assertEqual((quiet.returncode, quiet.stderr), (0, ""))

    def test_inject_uses_credentials_in_the_broker_url(self):
        broker = Mosquitto(anonymous=False)
        self.addCleanup(broker.cleanup)
        passwords = os.path.join(broker.dir, "passwd")
        subprocess.run(["mosquitto_passwd", "-b", "-c", passwords, "op", "op-secret"], check=True, capture_output=True)
        broker.extra_conf = f"password_file {passwords}"
        broker.start()
        ok = cli("inject", "--agent-id", "nobody-home", "--message", "m", "--no-check", "--broker-url",
                 f"mqtt://op:op-secret@127.0.0.1:{broker.port}")
        self.assertEqual(ok.returncode, 0, ok.stderr)
        refused = cli("inject", "--agent-id", "nobody-home", "--message", "m", "--broker-url",
                      f"mqtt://op:wrong@127.0.0.1:{broker.port}")
        self.assertEqual(refused.returncode, 3)
        self.assertNotIn("wrong", refused.stderr)

    def test_monitor_counts_each_progress_event_once(self):
        self.agent("watched").start_and_wait_available(self.status)
        monitor = process(self, [sys.executable, AGENT_SCRIPT, "monitor", "--mode", "progress", "--format", "json",
                                 "--count", "4"], env=base_env(**self.env), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
        self.assertTrue(monitor.stderr.readline().startswith("monitoring /control/agents/+/progress/# on "))
        cli("inject", "--agent-id", "watched", "--message", "m", "--wait", "30", "--quiet", env=self.env)
        out, _ = monitor.communicate(timeout=30)
        events = [json.loads(line)["payload"]["event_type"] for line in out.splitlines()]
        self.assertEqual(events, ["TaskStart", "LlmRequest", "LlmResponse", "TaskComplete"])

    def test_monitor_says_when_it_reconnects(self):
        broker = Mosquitto()
        self.addCleanup(broker.cleanup)
        broker.start()
        monitor = process(self, [sys.executable, AGENT_SCRIPT, "monitor", "--broker-url", broker.url],
                          env=base_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.assertTrue(monitor.stderr.readline().startswith("monitoring "))
        broker.stop()
        self.assertRegex(monitor.stderr.readline(), rf"^lost the connection to broker 127.0.0.1:{broker.port} .*; "
                                                    r"reconnecting$")
        broker.start()
        self.assertEqual(monitor.stderr.readline().strip(), f"reconnected to broker 127.0.0.1:{broker.port}")


if __name__ == "__main__":
    unittest.main()
