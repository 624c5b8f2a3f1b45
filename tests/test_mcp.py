"""MCP tool servers against real servers this project did not write: mcp-server-time (PyPI) over
stdio, the protocol's reference server @modelcontextprotocol/server-everything (npm) over stdio
and streamable HTTP, and a server built with the official `mcp` SDK over streamable HTTP (event
streams and plain JSON). The misbehaving cases use tests/mcp_bad_server.py; the end-to-end ones
a real broker and an agent process."""

import json
import logging
import os
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.request

from fake_llm import FakeOpenAI, Reply
from support import (AGENT_SCRIPT, BrokerTestCase, base_env, envelope, free_port, http_server, installed,
                     mcp_python, sdk_server, wait_until, write_toml)

from agent2389_lib.config import McpServerSpec, Secret
from agent2389_lib.tools.mcp.server import McpServer
from agent2389_lib.tools.registry import ToolRegistry

HERE = os.path.dirname(os.path.abspath(__file__))
BAD_SERVER = os.path.join(HERE, "mcp_bad_server.py")
OPENAI_KEY = "sk-test-key-0123456789"


def registry(case: unittest.TestCase, *specs: McpServerSpec, max_output_size: int = 100000) -> ToolRegistry:
    tools = ToolRegistry([], [McpServer(spec, max_output_size) for spec in specs])
    case.addCleanup(tools.shutdown, 5.0)
    tools.initialize()
    return tools


def call(tools: ToolRegistry, name: str, arguments: dict, seconds: float = 20.0) -> tuple[bool, str]:
    return tools.execute(name, arguments, time.monotonic() + seconds)


def bad_server(name: str, mode: str, *args: str, **options) -> McpServerSpec:
    return McpServerSpec(name=name, command=(sys.executable, BAD_SERVER, mode, *args), **options)


class StdioRealServerTests(unittest.TestCase):
    def test_mcp_server_time_tools_and_a_real_answer(self):
        tools = registry(self, McpServerSpec(name="time", command=(installed("mcp-server-time"), "--local-timezone",
                                                                    "UTC"), allowed_tools=("get_current_time",)))
        self.assertEqual(sorted(tools.tools), ["time__get_current_time"], "allowed_tools leaves convert_time out")
        (definition,) = tools.definitions()
        self.assertIn("timezone", definition.schema["properties"])
        ok, text = call(tools, "time__get_current_time", {"timezone": "Asia/Tokyo"})
        self.assertTrue(ok, text)
        answer = json.loads(text)
        self.assertEqual(answer["timezone"], "Asia/Tokyo")
        self.assertTrue(answer["datetime"].endswith("+09:00"), answer)
        ok, text = call(tools, "time__get_current_time", {})
        self.assertFalse(ok)
        self.assertIn("'timezone' is a required property", text, "checked against inputSchema before the call")
        self.assertEqual(tools.servers[0].calls, 1, "a refused call never reaches the server")

    def test_server_everything_over_stdio(self):
        tools = registry(self, McpServerSpec(name="everything", command=(installed("mcp-server-everything"), "stdio"),
                                             denied_tools=("toggle-simulated-logging",)))
        self.assertIn("everything__get-sum", tools.tools)
        self.assertNotIn("everything__toggle-simulated-logging", tools.tools)
        self.assertEqual(call(tools, "everything__get-sum", {"a": 2, "b": 40}), (True, "The sum of 2 and 40 is 42."))
        ok, text = call(tools, "everything__get-tiny-image", {})
        self.assertTrue(ok, text)
        self.assertRegex(text, r"\[image: image/png, \d+ bytes, not shown\]", "described, not dropped")
        ok, text = call(tools, "everything__get-resource-links", {"count": 2})
        self.assertEqual(text.count("[resource link: demo://"), 2, text)
        ok, text = call(tools, "everything__echo", {"message": "x" * 5000})
        self.assertTrue(ok)
        capped = registry(self, McpServerSpec(name="capped", command=(installed("mcp-server-everything"), "stdio")),
                          max_output_size=1024)
        ok, text = call(capped, "capped__echo", {"message": "x" * 5000})
        self.assertLessEqual(len(text.encode()), 1024)
        self.assertTrue(text.endswith("[result truncated at 1024 bytes]"))

    def test_a_slow_call_is_cancelled_at_the_deadline(self):
        tools = registry(self, McpServerSpec(name="everything", command=(installed("mcp-server-everything"), "stdio")))
        started = time.monotonic()
        ok, text = call(tools, "everything__trigger-long-running-operation", {"duration": 30, "steps": 30}, 1.0)
        self.assertLess(time.monotonic() - started, 5)
        self.assertFalse(ok)
        self.assertIn("did not answer tools/call within 1.0 s; the request was cancelled", text)
        self.assertEqual(call(tools, "everything__get-sum", {"a": 1, "b": 1})[0], True, "the server is still usable")


def forget_session(url: str, session_id: str) -> None:
    """Makes the server forget a session, as a server restart would."""
    request = urllib.request.Request(url, method="DELETE", headers={"Mcp-Session-Id": session_id,
                                                                     "MCP-Protocol-Version": "2025-11-25"})
    urllib.request.urlopen(request, timeout=5).close()


class StreamableHttpTests(unittest.TestCase):
    def test_sdk_server_with_event_streams_and_with_json(self):
        for options in ((), ("--json-response",)):
            with self.subTest(options=options):
                tools = registry(self, McpServerSpec(name="sdk", url=sdk_server(self, *options)))
                self.assertEqual(sorted(tools.tools), ["sdk__add", "sdk__refuse", "sdk__traceparent", "sdk__wait"])
                self.assertEqual(call(tools, "sdk__add", {"a": 20, "b": 22}), (True, "42"))
                ok, text = call(tools, "sdk__refuse", {"reason": "no such record"})
                self.assertFalse(ok, "isError: true reaches the LLM as a tool error")
                self.assertIn("no such record", text)
                channel = tools.servers[0]._session.channel
                self.assertEqual(channel.protocol_version, "2025-11-25")
                self.assertTrue(channel._session_id, "Mcp-Session-Id kept")

    def test_a_cancelled_call_is_cancelled_at_the_server(self):
        cancel_log = os.path.join(tempfile.mkdtemp(prefix="mcp-"), "cancelled")
        tools = registry(self, McpServerSpec(name="sdk", url=sdk_server(self, "--cancel-log", cancel_log),
                                             timeout=1.0))
        ok, text = call(tools, "sdk__wait", {"seconds": 60})
        self.assertFalse(ok)
        self.assertIn("did not answer tools/call within 1.0 s", text)
        wait_until(lambda: os.path.exists(cancel_log), 10, "the server to cancel the call")
        self.assertEqual(call(tools, "sdk__add", {"a": 1, "b": 2}), (True, "3"))

    def test_an_expired_session_opens_a_new_one_and_shutdown_deletes_it(self):
        url = sdk_server(self)
        tools = registry(self, McpServerSpec(name="sdk", url=url))
        channel = tools.servers[0]._session.channel
        first = channel._session_id
        forget_session(url, first)
        self.assertEqual(call(tools, "sdk__add", {"a": 2, "b": 2}), (True, "4"))
        second = tools.servers[0]._session.channel._session_id
        self.assertNotEqual(second, first)
        tools.shutdown(5.0)
        with self.assertRaises(urllib.error.HTTPError) as gone:
            urllib.request.urlopen(urllib.request.Request(url, method="DELETE", headers={"Mcp-Session-Id": second}),
                                   timeout=5)
        self.assertEqual(gone.exception.code, 404, "the session was deleted at shutdown")

    def test_an_expired_session_is_reopened_once_for_workers_calling_at_once(self):
        """Before: each worker whose call found the session expired opened a new one, and the
        replaced ones were never deleted on the server."""
        url = sdk_server(self)
        tools = registry(self, McpServerSpec(name="sdk", url=url))
        server = tools.servers[0]
        forget_session(url, server._session.channel._session_id)
        opened = []
        new_session = server._new_session
        server._new_session = lambda: opened.append(new_session()) or opened[-1]
        start = threading.Barrier(4)
        results = []

        def worker(a: int) -> None:
            start.wait(10)
            results.append(call(tools, "sdk__add", {"a": a, "b": 1}))

        workers = [threading.Thread(target=worker, args=(a,)) for a in range(4)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join(30)
        self.assertEqual(sorted(results), [(True, "1"), (True, "2"), (True, "3"), (True, "4")])
        self.assertEqual(len(opened), 1, "one new session")
        self.assertIs(server._session, opened[0])

    def test_server_everything_over_streamable_http(self):
        port = free_port()
        http_server(self, [installed("mcp-server-everything"), "streamableHttp"], {"PORT": str(port)}, port)
        tools = registry(self, McpServerSpec(name="everything", url=f"http://127.0.0.1:{port}/mcp",
                                             headers=(("Authorization", Secret("Bearer t0ps3cret")),)))
        self.assertEqual(call(tools, "everything__get-sum", {"a": 3, "b": 4}), (True, "The sum of 3 and 4 is 7."))
        self.assertEqual(call(tools, "everything__echo", {"message": "over HTTP"}), (True, "Echo: over HTTP"))

    def test_an_unreachable_server_is_down_and_comes_up_when_it_listens(self):
        port = free_port()
        tools = registry(self, McpServerSpec(name="late", url=f"http://127.0.0.1:{port}/mcp", startup_timeout=2))
        server = tools.servers[0]
        self.assertEqual(server.state, "down")
        self.assertIn("Connection refused", server.last_error)
        self.assertEqual(tools.tools, {})
        http_server(self, [mcp_python(), os.path.join(HERE, "mcp_sdk_server.py"), str(port)], {}, port)
        wait_until(lambda: server.state == "up", 90, "the retries to reach it")
        self.assertEqual(call(tools, "late__add", {"a": 1, "b": 1}), (True, "2"))


class BadServerTests(unittest.TestCase):
    def test_a_server_that_is_not_executable(self):
        path = os.path.join(tempfile.mkdtemp(prefix="mcp-"), "server")
        with open(path, "w") as handle:
            handle.write("#!/bin/sh\n")
        tools = registry(self, McpServerSpec(name="noexec", command=(path,)))
        server = tools.servers[0]
        self.assertEqual(server.state, "down")
        self.assertEqual(server.last_error, f"cannot start MCP server noexec ({path}): Permission denied")

    def test_a_server_that_never_answers_initialize(self):
        started = time.monotonic()
        tools = registry(self, bad_server("silent", "silent", startup_timeout=1))
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual(tools.servers[0].state, "down")
        self.assertIn("did not answer initialize within 1.0 s", tools.servers[0].last_error)

    def test_garbage_lines_are_ignored_and_said(self):
        with self.assertLogs("agent2389.tools.mcp", logging.WARNING) as logs:
            tools = registry(self, bad_server("garbage", "garbage"))
            self.assertEqual(call(tools, "garbage__ping", {}), (True, "pong"))
        self.assertTrue(any("wrote a line on stdout that is not JSON" in line for line in logs.output), logs.output)

    def test_a_50_mb_line_fails_its_call_and_the_server_goes_on(self):
        flag = tempfile.mkstemp(prefix="huge-")[1]
        tools = registry(self, bad_server("huge", "huge-once", flag))
        started = time.monotonic()
        ok, text = call(tools, "huge__ping", {}, 60)
        self.assertFalse(ok)
        self.assertRegex(text, r"sent a message of 5\d{7} bytes, over the 8 MiB limit")
        self.assertLess(time.monotonic() - started, 30, "failed when the line ended, not at the call timeout")
        self.assertEqual(call(tools, "huge__ping", {}), (True, "pong"))

    def test_a_server_that_stops_reading_fails_calls_at_their_timeout(self):
        tools = registry(self, bad_server("deaf", "deaf", timeout=1.0))
        started = time.monotonic()
        for _ in range(3):  # 3 MB: far beyond what the pipe holds
            ok, text = call(tools, "deaf__ping", {"padding": "x" * (1 << 20)})
            self.assertFalse(ok)
            self.assertIn("did not answer tools/call within 1.0 s", text)
        self.assertLess(time.monotonic() - started, 10, "no call waited on the full pipe")

    def test_tools_list_pages_and_list_changed(self):
        paged = registry(self, bad_server("paged", "paged"))
        self.assertEqual(sorted(paged.tools), ["paged__added", "paged__ping"], "both pages")
        changing = registry(self, bad_server("changing", "changing"))
        self.assertEqual(list(changing.tools), ["changing__ping"])
        self.assertEqual(call(changing, "changing__ping", {}), (True, "pong"))  # then the server says its list changed
        wait_until(lambda: "changing__added" in changing.tools, 10, "the list to be fetched again")

    def test_a_tool_named_twice_is_offered_once(self):
        with self.assertLogs("agent2389.tools.mcp", logging.WARNING) as logs:
            tools = registry(self, bad_server("dup", "duplicate"))
        self.assertEqual(list(tools.tools), ["dup__ping"])
        self.assertIn("lists tool 'ping' twice", "\n".join(logs.output))

    def test_a_server_that_dies_mid_call_is_restarted(self):
        flag = tempfile.mkstemp(prefix="die-")[1]
        tools = registry(self, bad_server("mortal", "die-once", flag))
        ok, text = call(tools, "mortal__ping", {})
        self.assertFalse(ok)
        self.assertIn("MCP server mortal exited with status 3", text)
        server = tools.servers[0]
        wait_until(lambda: server.state == "up" and server.restarts == 1, 30, "the restart")
        self.assertEqual(call(tools, "mortal__ping", {}), (True, "pong"))

    def test_stderr_is_logged_rate_limited_and_masked(self):
        with self.assertLogs("agent2389.tools.mcp", logging.INFO) as logs:
            tools = registry(self, bad_server("noisy", "noisy", env=(("API_TOKEN", Secret("s3cr3t-token-value")),)))
            wait_until(lambda: any("more stderr lines not shown" in line for line in logs.output)
                       or len([line for line in logs.output if "noise" in line]) >= 20, 10, "the stderr lines")
            self.assertEqual(call(tools, "noisy__ping", {}), (True, "pong"))
        noise = [line for line in logs.output if "MCP server noisy: noise" in line]
        self.assertEqual(len(noise), 20, "at most 20 lines per 10 s")
        self.assertNotIn("s3cr3t-token-value", "\n".join(logs.output))
        self.assertIn("token=[REDACTED]", noise[0])

    def test_shutdown_ends_a_server_that_ignores_stdin_and_sigterm(self):
        tools = registry(self, bad_server("stubborn", "stubborn"))
        proc = tools.servers[0]._session.channel.proc
        started = time.monotonic()
        tools.shutdown(2.0)
        self.assertLess(time.monotonic() - started, 3.5)
        self.assertEqual(proc.wait(5), -9, "SIGKILL, after stdin closed and SIGTERM were ignored")


class AgentWithMcpTests(BrokerTestCase):
    def test_a_task_whose_llm_calls_an_mcp_tool_gets_the_real_result(self):
        fake = FakeOpenAI(api_key=OPENAI_KEY)
        self.addCleanup(fake.close)
        fake.script = [Reply(tool_calls=[("time__get_current_time", {"timezone": "Asia/Tokyo"})])]
        fake.responder = lambda body: Reply("the time is " + body["messages"][-1]["content"])
        watcher = self.watcher("/control/agents/+/status", "/conversations/#", "/control/agents/mcp-agent/progress/#")
        agent = self.agent("mcp-agent", llm={"provider": "openai", "base_url": fake.base_url},
                           env={"OPENAI_API_KEY": OPENAI_KEY},
                           mcp_servers=[{"name": "time", "command": installed("mcp-server-time")}])
        agent.start_and_wait_available(watcher)
        task = envelope("mcp-agent", cid="what-time")
        watcher.publish("/control/agents/mcp-agent/input", task)
        (reply,) = watcher.wait_for("/conversations/what-time/mcp-agent")
        self.assertTrue(reply.get("response", "").startswith("the time is {"), reply)
        answer = json.loads(reply["response"].removeprefix("the time is "))
        self.assertEqual(answer["timezone"], "Asia/Tokyo")
        self.assertTrue(answer["datetime"].endswith("+09:00"))
        offered = [tool["function"]["name"] for tool in fake.completions()[0]["body"]["tools"]]
        self.assertEqual(offered, ["time__get_current_time", "time__convert_time"])
        watcher.wait_for("/control/agents/mcp-agent/progress/tools",
                         lambda p: p["event_type"] == "ToolComplete"
                         and p["metadata"]["tool_name"] == "time__get_current_time")
        port = agent.env["HEALTH_PORT"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            health = json.loads(response.read())
        self.assertEqual(health["mcp_servers"], [{"name": "time", "transport": "stdio", "state": "up",
                                                  "required": False, "tools": 2, "restarts": 0, "last_error": ""}])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics/prometheus", timeout=5) as response:
            metrics = response.read().decode()
        self.assertIn('agent2389_mcp_server_up{server="time"} 1', metrics)
        self.assertIn('agent2389_mcp_calls_total{server="time"} 1', metrics)
        self.assertIn('agent2389_tool_executions_total{tool="time__get_current_time"} 1', metrics)

    def test_a_required_server_keeps_ready_at_503_until_it_is_up(self):
        path = os.path.join(tempfile.mkdtemp(prefix="mcp-"), "server")
        with open(path, "w") as handle:
            handle.write(f"#!/bin/sh\nexec {sys.executable} {BAD_SERVER} plain\n")
        watcher = self.watcher("/control/agents/+/status", "/conversations/#")
        agent = self.agent("needs-mcp", mcp_servers=[{"name": "late", "command": path, "required": True,
                                                      "startup_timeout": 1}])
        agent.start_and_wait_available(watcher)
        port = agent.env["HEALTH_PORT"]
        status, body = self.ready(port)
        self.assertEqual(status, 503)
        self.assertEqual(body["reason"], f"required MCP server late is down: cannot start MCP server late ({path}): "
                                         f"Permission denied")
        task = envelope("needs-mcp", cid="served-meanwhile")
        watcher.publish("/control/agents/needs-mcp/input", task)
        watcher.wait_for("/conversations/served-meanwhile/needs-mcp")  # tasks are answered meanwhile
        os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)
        wait_until(lambda: self.ready(port)[0] == 200, 90, "the server to come up and /ready to say so")

    @staticmethod
    def ready(port: str) -> tuple:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())


class ToolsCommandTests(unittest.TestCase):
    def command(self, *args: str) -> subprocess.CompletedProcess:
        config = write_toml(os.path.join(tempfile.mkdtemp(prefix="tools-"), "agent.toml"), {
            "agent": {"id": "tools-check"}, "llm": {"provider": "echo"}, "tools": {"echo": "builtin"},
            "mcp_servers": [{"name": "time", "command": installed("mcp-server-time")}]})
        return subprocess.run([sys.executable, AGENT_SCRIPT, "tools", *args, "--config", config], env=base_env(),
                              capture_output=True, text=True, timeout=120)

    def test_tools_list_shows_every_tool_and_where_it_comes_from(self):
        result = self.command("list")
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.splitlines()
        self.assertRegex(lines[0], r"^echo +builtin +Returns the given message unchanged")
        self.assertRegex(lines[1], r"^time__get_current_time +mcp:time \(stdio\) +Get current time")
        self.assertRegex(lines[2], r"^time__convert_time +mcp:time \(stdio\)")
        listed = json.loads(self.command("list", "--json").stdout)
        self.assertEqual(listed["mcp_servers"][0]["state"], "up")
        self.assertIn("timezone", listed["tools"][1]["input_schema"]["properties"])

    def test_tools_call_runs_one_tool(self):
        result = self.command("call", "time__get_current_time", "--args", '{"timezone": "Europe/Paris"}')
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout)["timezone"], "Europe/Paris")
        refused = self.command("call", "time__get_current_time", "--args", "{}")
        self.assertEqual(refused.returncode, 1)
        self.assertIn("'timezone' is a required property", refused.stderr)
        self.assertEqual(self.command("call", "echo", "--args", "not json").returncode, 2)


if __name__ == "__main__":
    unittest.main()
