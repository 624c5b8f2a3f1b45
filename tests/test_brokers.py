"""The core scenarios on every broker the deployment guide names: mosquitto (MQTT 5 and 3.1.1),
ActiveMQ Classic (Amazon MQ's engine) and RabbitMQ, each started by the test as a plain process.
ActiveMQ and RabbitMQ do not speak MQTT 5: the agent's default (`protocol = "auto"`) must find
that out by itself."""

import signal
import subprocess
import sys
import time
import unittest
from typing import Optional

from support import (AGENT_SCRIPT, NO_USAGE, ActiveMQ, AgentProcess, Mosquitto, RabbitMQ, Watcher, base_env,
                     envelope, test_failed)

FALLBACK = "does not speak MQTT 5"


def chain(depth, target):
    nxt = None
    for _ in range(depth - 1):
        nxt = {"topic": f"/control/agents/{target}/input", "instruction": "go on", "input": None, "next": nxt}
    return nxt


class BrokerScenarios:
    """Mixed into one TestCase per broker."""

    make_broker = staticmethod(Mosquitto)
    agent_protocol: Optional[str] = None  # None: the default, "auto"
    watcher_protocol = "5"
    speaks_v5 = True
    shares_subscriptions = True

    @classmethod
    def setUpClass(cls):
        cls.broker = cls.make_broker().start()

    @classmethod
    def tearDownClass(cls):
        cls.broker.cleanup()

    def setUp(self):
        self.agents = []

    def tearDown(self):
        for agent in self.agents:
            agent.stop()
        if test_failed(self):
            for agent in self.agents:
                print(f"\n--- log of {agent.agent_id} ---\n{agent.log()[-3000:]}", file=sys.stderr)
            print(f"\n--- broker log ---\n{self.broker.log()}", file=sys.stderr)

    def watcher(self, *topics):
        watcher = Watcher(self.broker.port, *topics, protocol=self.watcher_protocol)
        self.addCleanup(watcher.close)
        return watcher

    def agent(self, agent_id, **sections):
        mqtt = {"protocol": self.agent_protocol} if self.agent_protocol else {}
        agent = AgentProcess(self.broker, agent_id, **{"mqtt": mqtt, **sections})
        self.agents.append(agent)
        return agent

    def status(self, agent_id):
        return f"/control/agents/{agent_id}/status"

    def assert_negotiated(self, agent):
        fell_back = FALLBACK in agent.log()
        self.assertEqual(fell_back, not self.speaks_v5 and self.agent_protocol is None, agent.log()[-2000:])
        if fell_back:
            self.assertEqual(agent.log().count(FALLBACK), 1, "said once per process")

    # -------------------------------------------------------------- scenarios
    def test_available_retained_then_task_answered(self):
        agent_id = "basic-agent"
        watcher = self.watcher(self.status(agent_id), "/conversations/#")
        agent = self.agent(agent_id).start_and_wait_available(watcher)
        self.assert_negotiated(agent)
        newcomer = self.watcher(self.status(agent_id))  # the retained status a newcomer sees
        self.assertEqual(newcomer.wait_for(self.status(agent_id))[0]["status"], "available")
        task = envelope(agent_id, cid="c-basic", instruction="Hello", input={"x": 1})
        watcher.publish(f"/control/agents/{agent_id}/input", task)
        (reply,) = watcher.wait_for(f"/conversations/c-basic/{agent_id}")
        self.assertEqual(reply, {"response": 'Hello\nInput data: {"x":1}', "task_id": task["task_id"],
                                 "usage": NO_USAGE})

    def test_two_agent_pipeline(self):
        watcher = self.watcher("/control/agents/+/status", "/conversations/#")
        for name in ("pipe-first", "pipe-second"):
            self.agent(name).start_and_wait_available(watcher)
        task = envelope("pipe-first", cid="c-pipe", instruction="Research",
                        next={"topic": "/control/agents/pipe-second/input", "instruction": "Write", "input": None,
                              "next": None})
        watcher.publish("/control/agents/pipe-first/input", task)
        (final,) = watcher.wait_for("/conversations/c-pipe/+")
        self.assertEqual(final["task_id"], task["task_id"])
        self.assertTrue(final["response"].startswith("Write\nInput data: \"Research"), final)

    def test_sigkill_publishes_the_last_will(self):
        agent_id = "killed-agent"
        watcher = self.watcher(self.status(agent_id))
        agent = self.agent(agent_id).start_and_wait_available(watcher)
        agent.proc.kill()
        agent.wait(10)
        watcher.wait_for(self.status(agent_id), lambda p: p["status"] == "unavailable", timeout=30)

    def test_sigterm_leaves_retained_unavailable(self):
        agent_id = "stopped-agent"
        watcher = self.watcher(self.status(agent_id))
        agent = self.agent(agent_id).start_and_wait_available(watcher)
        agent.signal(signal.SIGTERM)
        self.assertEqual(agent.wait(30), 0)
        watcher.wait_for(self.status(agent_id), lambda p: p["status"] == "unavailable")
        newcomer = self.watcher(self.status(agent_id))
        self.assertEqual(newcomer.wait_for(self.status(agent_id))[0]["status"], "unavailable")

    def test_tasks_queued_while_down_are_answered_once(self):
        agent_id = "queued-agent"
        watcher = self.watcher(self.status(agent_id), "/conversations/#")
        agent = self.agent(agent_id, agent={"state_dir": "./state"}).start_and_wait_available(watcher)
        agent.signal(signal.SIGTERM)
        self.assertEqual(agent.wait(30), 0)
        tasks = [envelope(agent_id, cid="c-queued") for _ in range(20)]
        for task in tasks:
            watcher.publish(f"/control/agents/{agent_id}/input", task)
        restarted = AgentProcess(self.broker, agent_id, workdir=agent.dir, agent={"state_dir": "./state"},
                                 mqtt={"protocol": self.agent_protocol} if self.agent_protocol else {})
        self.agents.append(restarted)
        restarted.start()
        replies = watcher.wait_for(f"/conversations/c-queued/{agent_id}", count=20, timeout=60)
        marker = envelope(agent_id, cid="c-queued-marker")  # everything before it has arrived too
        watcher.publish(f"/control/agents/{agent_id}/input", marker)
        watcher.wait_for(f"/conversations/c-queued-marker/{agent_id}")
        replies = watcher.matching(f"/conversations/c-queued/{agent_id}")
        self.assertEqual(sorted(r["task_id"] for r in replies), sorted(t["task_id"] for t in tasks))

    def test_burst_of_200(self):
        agent_id = "burst-agent"
        watcher = self.watcher(self.status(agent_id), "/conversations/#")
        self.agent(agent_id).start_and_wait_available(watcher)
        tasks = [envelope(agent_id, cid="c-burst") for _ in range(200)]
        started = time.monotonic()
        for task in tasks:
            watcher.publish(f"/control/agents/{agent_id}/input", task, wait=False)
        replies = watcher.wait_for(f"/conversations/c-burst/{agent_id}", count=200, timeout=120)
        rate = 200 / (time.monotonic() - started)
        print(f"\n{type(self).__name__}: 200-task burst at {rate:.0f} tasks/s", file=sys.stderr)
        self.assertEqual(sorted(r["task_id"] for r in replies), sorted(t["task_id"] for t in tasks))

    def test_invalid_json_and_depth_errors(self):
        agent_id = "strict-agent"
        watcher = self.watcher(self.status(agent_id), "/conversations/#", "/control/agents/next-agent/input")
        self.agent(agent_id).start_and_wait_available(watcher)
        topic = f"/control/agents/{agent_id}/input"
        watcher.publish(topic, b"{this is not json")
        invalid = envelope(agent_id, cid="c-invalid", instruction=42)
        watcher.publish(topic, invalid)
        deep = envelope(agent_id, cid="c-deep", next=chain(17, "next-agent"))
        watcher.publish(topic, deep)
        (error,) = watcher.wait_for(f"/conversations/c-invalid/{agent_id}")
        self.assertEqual((error["task_id"], error["error"]["code"]), (invalid["task_id"], "invalid_input"))
        (error,) = watcher.wait_for(f"/conversations/c-deep/{agent_id}")
        self.assertEqual((error["task_id"], error["error"]["code"]), (deep["task_id"], "pipeline_depth_exceeded"))


    def test_inject_wait_with_the_default_protocol(self):
        agent_id = "inject-agent"
        watcher = self.watcher(self.status(agent_id))
        self.agent(agent_id).start_and_wait_available(watcher)
        result = subprocess.run([sys.executable, AGENT_SCRIPT, "inject", "--broker-url", self.broker.url, "--agent-id",
                                 agent_id, "--message", "hi", "--instruction", "Greet", "--wait", "30"],
                                env=base_env(), capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), 'Greet\nInput data: {"message":"hi"}')

    def test_pool_member_works_only_where_subscriptions_are_shared(self):
        agent_id = "pool-agent"
        member = self.agent(agent_id, agent={"instance_id": "0"}).start()
        if not self.shares_subscriptions:
            self.assertEqual(member.wait(60), 1)
            self.assertIn("the broker d", member.log())  # does not deliver / did not grant
            self.assertIn("shared subscription", member.log())
            return
        member.wait_metric("lifecycle.current_state", "running", timeout=30)  # subscribed
        watcher = self.watcher("/conversations/#")
        task = envelope(agent_id, cid="c-pool-member")
        watcher.publish(f"/control/agents/{agent_id}/input", task)
        self.assertEqual(watcher.wait_for(f"/conversations/c-pool-member/{agent_id}")[0]["task_id"], task["task_id"])

    def test_agent_id_with_a_dot(self):
        """RabbitMQ swaps '.' and '/' between MQTT topics and routing keys: the delivered topic
        name may differ from the envelope's, which must still be recognized as this agent's."""
        agent_id = "team.writer"
        watcher = self.watcher("/conversations/#")
        agent = self.agent(agent_id).start()
        agent.wait_metric("lifecycle.current_state", "running", timeout=30)  # subscribed
        task = envelope(agent_id, cid="c-dot", instruction="Dotted")
        watcher.publish(f"/control/agents/{agent_id}/input", task)
        (reply,) = watcher.wait_for(None, lambda p: isinstance(p, dict) and p.get("task_id") == task["task_id"])
        self.assertEqual(reply["response"], "Dotted")


class MosquittoV5Tests(BrokerScenarios, unittest.TestCase):
    agent_protocol = "5"


class Mosquitto311Tests(BrokerScenarios, unittest.TestCase):
    agent_protocol = "3.1.1"
    watcher_protocol = "3.1.1"


class ActiveMQTests(BrokerScenarios, unittest.TestCase):
    make_broker = ActiveMQ
    watcher_protocol = "3.1.1"
    speaks_v5 = False
    shares_subscriptions = False


    def test_explicit_mqtt5_says_which_key_to_change(self):
        agent = self.agent("strict-v5", mqtt={"protocol": "5"}).start()
        agent.wait_log("it may not speak MQTT 5: set [mqtt] protocol")
        self.assertNotIn(FALLBACK, agent.log())


class RabbitMQTests(BrokerScenarios, unittest.TestCase):
    make_broker = RabbitMQ
    watcher_protocol = "3.1.1"
    speaks_v5 = False
    shares_subscriptions = False


if __name__ == "__main__":
    unittest.main()
