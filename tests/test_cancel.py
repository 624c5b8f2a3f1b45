"""Cancel through a real mosquitto (PROTOCOL.md 7): a task stopped before it starts, during an LLM
request, a command tool or an MCP call, along a pipeline, across a crash and in a pool, each
answered exactly once with `canceled`."""

import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time

from fake_llm import FakeOpenAI, Trickle
from support import (AGENT_SCRIPT, AgentProcess, BrokerTestCase, ClosingProxy, Watcher, acl_broker, base_env,
                     envelope, new_task_id, process_gone, read_pids, sdk_server, wait_until)

KEY = "sk-test-key-0123456789"


def cancel_topic(agent_id: str) -> str:
    return f"/control/agents/{agent_id}/cancel"


def input_topic(agent_id: str) -> str:
    return f"/control/agents/{agent_id}/input"


class CancelTestCase(BrokerTestCase):
    def progress(self, watcher, task_id: str, event_type: str) -> list:
        """`event_type`, or a Custom one's metadata kind."""
        def wanted(event: dict) -> bool:
            kinds = (event.get("event_type"), (event.get("metadata") or {}).get("kind"))
            return event.get("task_id") == task_id and event_type in kinds
        return watcher.matching("/control/agents/+/progress/#", wanted)

    def assert_canceled_once(self, watcher, agent: AgentProcess, task: dict, reason: str = "") -> dict:
        """The one error on the conversation: a task published after it is answered later (a
        cancelled one, so at once however slow the agent), so a second message for the cancelled
        task would be there by then."""
        cid = task["conversation_id"]
        (error,) = watcher.wait_for(f"/conversations/{cid}/+")
        self.assertEqual((error["task_id"], error["error"]["code"]), (task["task_id"], "canceled"))
        self.assertIn(reason, error["error"]["message"])
        marker = envelope(agent.agent_id, cid=f"{cid}-after")
        watcher.publish(cancel_topic(agent.agent_id), {"task_id": marker["task_id"]})
        agent.wait_log(f"cancel for task {marker['task_id']}: not seen here")
        watcher.publish(input_topic(agent.agent_id), marker)
        watcher.wait_for(f"/conversations/{cid}-after/+")
        self.assertEqual(len(watcher.matching(f"/conversations/{cid}/+")), 1, "exactly one answer")
        return error


class RunningTaskTests(CancelTestCase):
    def test_an_llm_request_in_flight_is_abandoned_its_connection_closed(self):
        fake = FakeOpenAI(api_key=KEY)
        self.addCleanup(fake.close)
        answer = Trickle(seconds=60)
        fake.script = [answer]
        watcher = self.watcher("/control/agents/+/status", "/conversations/#", "/control/agents/+/progress/#")
        agent = self.agent("llm-cancel", llm={"provider": "openai", "base_url": fake.base_url},
                           env={"OPENAI_API_KEY": KEY}).start_and_wait_available(watcher)
        task = envelope("llm-cancel", cid="c-llm")
        watcher.publish(input_topic("llm-cancel"), task)
        self.assertTrue(answer.started.wait(20), "the LLM began answering")
        sent = time.monotonic()
        watcher.publish(cancel_topic("llm-cancel"), {"task_id": task["task_id"], "reason": "wrong input"})
        self.assertTrue(answer.closed.wait(10), "the provider saw its connection closed")
        self.assertLess(answer.closed_at - sent, 1.0)
        error = self.assert_canceled_once(watcher, agent, task, "wrong input")
        self.assertEqual(error["error"]["message"], "the task was canceled: wrong input")
        self.assertEqual(len(fake.completions()), 1, "the cancelled request was not retried")
        self.assertEqual(len(self.progress(watcher, task["task_id"], "task_canceled")), 1)
        agent.wait_metric("tasks.tasks_canceled", 2)  # and the marker
        self.assertIn("agent2389_cancel_to_end_seconds_count 2", agent.fetch("/metrics", "text/plain"))

    def test_a_command_tool_is_killed_with_its_children(self):
        directory = tempfile.mkdtemp(prefix="cancel-tool-")
        pids = os.path.join(directory, "pids")
        script = os.path.join(directory, "slow-tool")
        with open(script, "w") as handle:  # a child that ignores SIGTERM, and the tool itself
            handle.write(f"#!/bin/sh\n(trap '' TERM; sleep 60) &\necho $! > {pids}\necho $$ >> {pids}\nsleep 60\n")
        os.chmod(script, 0o755)
        watcher = self.watcher("/control/agents/+/status", "/conversations/#")
        agent = self.agent("tool-cancel", tools={"slow": {"command": script, "timeout": 120}})
        agent.start_and_wait_available(watcher)
        task = envelope("tool-cancel", cid="c-tool", input={"tool_request": {"name": "slow", "parameters": {}}})
        watcher.publish(input_topic("tool-cancel"), task)
        wait_until(lambda: len(read_pids(pids)) == 2, 20, "the tool and its child to start")
        watcher.publish(cancel_topic("tool-cancel"), {"task_id": task["task_id"]})
        for pid in read_pids(pids):
            wait_until(lambda pid=pid: process_gone(pid), 10, f"process {pid} to be gone")
        self.assert_canceled_once(watcher, agent, task)

    def test_an_mcp_call_is_cancelled_at_the_server(self):
        directory = tempfile.mkdtemp(prefix="cancel-mcp-")
        cancel_log, start_log = os.path.join(directory, "cancelled"), os.path.join(directory, "started")
        url = sdk_server(self, "--cancel-log", cancel_log, "--start-log", start_log)
        watcher = self.watcher("/control/agents/+/status", "/conversations/#", "/control/agents/+/progress/#")
        agent = self.agent("mcp-cancel", mcp_servers=[{"name": "sdk", "url": url}]).start_and_wait_available(watcher)
        task = envelope("mcp-cancel", cid="c-mcp",
                        input={"tool_request": {"name": "sdk__wait", "parameters": {"seconds": 60}}})
        watcher.publish(input_topic("mcp-cancel"), task)
        wait_until(lambda: os.path.exists(start_log), 20, "the call to reach the MCP server")
        watcher.publish(cancel_topic("mcp-cancel"), {"task_id": task["task_id"], "reason": "enough"})
        wait_until(lambda: os.path.exists(cancel_log), 10, "the MCP server to cancel the call")
        self.assert_canceled_once(watcher, agent, task, "enough")

    def test_a_task_waiting_for_a_worker_is_not_run(self):
        watcher = self.watcher("/control/agents/+/status", "/conversations/#", "/control/agents/+/progress/#")
        agent = self.agent("busy-cancel", llm={"latency_ms": 60000}, env={"MAX_PIPELINE_DEPTH": "1"})
        agent.start_and_wait_available(watcher)
        running, waiting = envelope("busy-cancel", cid="c-running"), envelope("busy-cancel", cid="c-waiting")
        watcher.publish(input_topic("busy-cancel"), running)
        agent.wait_metric("tasks.tasks_processing", 1)
        watcher.publish(input_topic("busy-cancel"), waiting)  # held by the broker: one worker, Receive Maximum 1
        watcher.publish(cancel_topic("busy-cancel"), {"task_id": waiting["task_id"]})
        agent.wait_log(f"cancel for task {waiting['task_id']}: not seen here")
        watcher.publish(cancel_topic("busy-cancel"), {"task_id": running["task_id"]})
        self.assert_canceled_once(watcher, agent, running)
        self.assert_canceled_once(watcher, agent, waiting)
        self.assertEqual(self.progress(watcher, waiting["task_id"], "LlmRequest"), [], "never run")


class ArrivalTests(CancelTestCase):
    def test_a_cancel_before_its_task_an_unknown_task_and_malformed_cancels(self):
        watcher = self.watcher("/control/agents/+/status", "/conversations/#", "/control/agents/+/progress/#")
        agent = self.agent("early-cancel", env={"LOG_LEVEL": "INFO"}).start_and_wait_available(watcher)
        for malformed in (b"{", b'{"reason": "no task id"}', b"[1]", b"x" * 5000):
            watcher.publish(cancel_topic("early-cancel"), malformed)
        agent.wait_log("ignoring a malformed cancel on /control/agents/early-cancel/cancel")
        unknown = new_task_id()
        watcher.publish(cancel_topic("early-cancel"), {"task_id": unknown})
        agent.wait_log(f"cancel for task {unknown}: not seen here")
        task = envelope("early-cancel", task_id=unknown, cid="c-early")
        watcher.publish(input_topic("early-cancel"), task)
        self.assert_canceled_once(watcher, agent, task)
        self.assertEqual(self.progress(watcher, unknown, "LlmRequest"), [], "never run")
        self.assertEqual(agent.proc.poll(), None, "still running")


class PipelineCancelTests(CancelTestCase):
    def test_a_pipeline_cancelled_at_its_first_agent_stops_where_the_task_is(self):
        """The CLI follows the cancel: the first agent forwarded the task, the second was running it."""
        watcher = self.watcher("/control/agents/+/status", "/conversations/#", "/control/agents/+/progress/#",
                               "/control/agents/+/input")
        self.agent("pipe-first").start_and_wait_available(watcher)
        second = self.agent("pipe-second", llm={"latency_ms": 60000}).start_and_wait_available(watcher)
        self.agent("pipe-third").start_and_wait_available(watcher)
        task = envelope("pipe-first", cid="c-pipe-cancel",
                        next={"topic": input_topic("pipe-second"), "instruction": "Write", "input": None,
                              "next": {"topic": input_topic("pipe-third"), "instruction": "Edit", "input": None,
                                       "next": None}})
        watcher.publish(input_topic("pipe-first"), task)
        watcher.wait_for("/control/agents/pipe-second/progress/llm", lambda p: p.get("task_id") == task["task_id"])
        cli = subprocess.run([sys.executable, AGENT_SCRIPT, "cancel", "--agent-id", "pipe-first", "--task-id",
                              task["task_id"], "--conversation-id", "c-pipe-cancel", "--reason", "wrong topic",
                              "--wait", "30", "--broker-url", self.broker.url],
                             env=base_env(), capture_output=True, text=True, timeout=60)
        self.assertEqual(cli.returncode, 0, cli.stderr)
        self.assertIn(f"task {task['task_id']} canceled by pipe-second: the task was canceled: wrong topic",
                      cli.stdout)
        self.assertIn("[pipe-first] the task was forwarded to pipe-second; the cancel follows it", cli.stderr)
        self.assertIn("[pipe-second] the task was running here: stopping it", cli.stderr)
        self.assert_canceled_once(watcher, second, task, "wrong topic")
        self.assertEqual(watcher.matching(input_topic("pipe-third")), [], "the third agent never got it")


class CrashTests(CancelTestCase):
    def test_a_cancel_recorded_before_a_crash_answers_the_redelivered_task(self):
        """The agent stops the task and records the cancel, but its `canceled` error never reaches
        the broker (a stalled connection); killed and restarted, it answers the redelivery from its store."""
        proxy = ClosingProxy(self.broker.port, close_first=0)
        self.addCleanup(proxy.close)
        workdir = tempfile.mkdtemp(prefix="cancel-crash-")
        watcher = self.watcher("/control/agents/+/status", "/conversations/#", "/control/agents/+/progress/#")
        stalled = self.agent("crash-cancel", workdir=workdir, llm={"latency_ms": 60000},
                             agent={"state_dir": "./state"}, mqtt={"broker_url": f"mqtt://127.0.0.1:{proxy.port}"})
        stalled.start_and_wait_available(watcher)
        task = envelope("crash-cancel", cid="c-crash")
        watcher.publish(input_topic("crash-cancel"), task)
        watcher.wait_for("/control/agents/crash-cancel/progress/llm",  # running, and its progress went out
                         lambda p: p.get("task_id") == task["task_id"] and p.get("event_type") == "LlmRequest")
        proxy.to_broker.clear()
        watcher.publish(cancel_topic("crash-cancel"), {"task_id": task["task_id"], "reason": "stop"})
        store = os.path.join(workdir, "state", "crash-cancel.completed.sqlite3")
        wait_until(lambda: _kept_cancels(store, task["task_id"]) == 1, 15, "the cancel recorded")
        stalled.signal(signal.SIGKILL)
        stalled.wait(10)
        proxy.drop_all()  # what the killed agent sent never arrives
        again = AgentProcess(self.broker, "crash-cancel", workdir=workdir, llm={"latency_ms": 60000},
                             agent={"state_dir": "./state"})
        self.agents.append(again)
        again.start_and_wait_available(watcher)
        self.assert_canceled_once(watcher, again, task, "stop")
        self.assertEqual(len(self.progress(watcher, task["task_id"], "LlmRequest")), 1, "run once, before the crash")


class PoolCancelTests(CancelTestCase):
    def test_the_member_holding_the_task_stops_it(self):
        watcher = self.watcher("/control/agents/+/status", "/control/agents/+/instances/+/status", "/conversations/#")
        members = [self.agent("pool-cancel", agent={"instance_id": name}, llm={"latency_ms": 60000})
                   for name in ("m1", "m2")]
        for member in members:
            member.start()
        for name in ("m1", "m2"):
            watcher.wait_for("/control/agents/pool-cancel/instances/+/status",
                             lambda p, name=name: p.get("instance_id") == name and p.get("status") == "available")
        task = envelope("pool-cancel", cid="c-pool")
        watcher.publish(input_topic("pool-cancel"), task)
        wait_until(lambda: sum(m.metric("tasks.tasks_processing") for m in members) == 1, 15, "a member to take it")
        holder, other = sorted(members, key=lambda m: -m.metric("tasks.tasks_processing"))
        watcher.publish(cancel_topic("pool-cancel"), {"task_id": task["task_id"]})
        (error,) = watcher.wait_for("/conversations/c-pool/+")
        self.assertEqual(error["error"]["code"], "canceled")
        holder.wait_metric("tasks.tasks_canceled", 1)
        other.wait_log(f"cancel for task {task['task_id']}: not seen here")
        self.assertEqual(other.metric("tasks.tasks_canceled"), 0)


class AclTests(CancelTestCase):
    """deploy/mosquitto/acl: the operator cancels, a requester cannot, an agent follows its forwards."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.broker = acl_broker(("researcher-agent", "writer-agent", "requester", "operator"), "-pass")

    def test_only_the_operator_cancels(self):
        watcher = Watcher(self.broker.port, "/control/agents/+/status", "/conversations/#", username="operator",
                          password="operator-pass")
        self.addCleanup(watcher.close)
        agents = {name: self.agent(name, llm={"latency_ms": 60000},
                                   env={"MQTT_USERNAME": name, "MQTT_PASSWORD": f"{name}-pass"})
                  for name in ("researcher-agent", "writer-agent")}
        for agent in agents.values():
            agent.start_and_wait_available(watcher)
        task = envelope("writer-agent", cid="c-acl")
        asked = {}
        for user in ("requester", "operator"):
            asked[user] = subprocess.run(
                [sys.executable, AGENT_SCRIPT, "cancel", "--agent-id", "writer-agent", "--task-id", task["task_id"]],
                env=base_env(MQTT_HOST="127.0.0.1", MQTT_PORT=str(self.broker.port), MQTT_USERNAME=user,
                             MQTT_PASSWORD=f"{user}-pass"), capture_output=True, text=True, timeout=60)
        self.assertEqual(asked["requester"].returncode, 3, asked["requester"].stderr)
        self.assertIn("refused the publish to /control/agents/writer-agent/cancel: Not authorized",
                      asked["requester"].stderr)
        self.assertEqual(asked["operator"].returncode, 0, asked["operator"].stderr)
        agents["writer-agent"].wait_log(f"cancel for task {task['task_id']}: not seen here")
        forwarded = envelope("researcher-agent", cid="c-acl-pipe",
                             next={"topic": input_topic("writer-agent"), "instruction": "W", "input": None,
                                   "next": None})
        agents["researcher-agent"].stop()  # a fast first hop: the echo without latency
        fast = self.agent("researcher-agent", env={"MQTT_USERNAME": "researcher-agent",
                                                   "MQTT_PASSWORD": "researcher-agent-pass"})
        fast.start_and_wait_available(watcher)
        watcher.publish(input_topic("researcher-agent"), forwarded)
        agents["writer-agent"].wait_metric("tasks.tasks_processing", 1)
        watcher.publish(cancel_topic("researcher-agent"), {"task_id": forwarded["task_id"]})
        (error,) = watcher.wait_for("/conversations/c-acl-pipe/+")
        self.assertEqual(error["error"]["code"], "canceled", "the researcher may follow its forward")


def _kept_cancels(path: str, task_id: str) -> int:
    if not os.path.exists(path):
        return 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute("SELECT COUNT(*) FROM cancels WHERE task_id = ?", (task_id,)).fetchone()[0]
    except sqlite3.Error:
        return 0
    finally:
        db.close()
