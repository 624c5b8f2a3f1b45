"""The MQTT layer at its edges, against a real mosquitto and the agent as a process: QoS 0 tasks,
a broker in a crash loop (two agents with one id: test_exactly_once), a protocol fallback on a
single closed connection, and faults inside the network loop."""

import collections
import json
import os
import re
import subprocess
import tempfile
import time

from support import (BrokerTestCase, ClosingProxy, Mosquitto, Watcher, envelope, new_task_id, program,
                     wait_until)

from agent2389_lib.protocol import rfc3339

FALLBACK = "does not speak MQTT 5"
TAKEOVER = "stop it, or give each process its own agent id"


def status(agent_id):
    return f"/control/agents/{agent_id}/status"


def available(payload):
    return payload.get("status") == "available"


class LoggingBrokerCase(BrokerTestCase):
    """A broker that logs every connection with its protocol level (the assertions read it)."""

    @classmethod
    def setUpClass(cls):
        cls.broker = Mosquitto(extra_conf="log_type all").start()


class Qos0Tests(LoggingBrokerCase):
    def test_qos0_tasks_are_answered_and_the_agent_stays_on_the_broker(self):
        agent_id = "qos0-agent"
        watcher = self.watcher(status(agent_id), "/conversations/#")
        agent = self.agent(agent_id).start_and_wait_available(watcher)
        tasks = [envelope(agent_id, cid="c-qos0", instruction=f"task {n}") for n in range(5)]
        for task in tasks:  # mosquitto_pub's default QoS is 0, as the reference implementation's forwards
            subprocess.run([program("mosquitto_pub"), "-p", str(self.broker.port), "-t",
                            f"/control/agents/{agent_id}/input", "-m", json.dumps(task)], check=True, timeout=10)
        replies = watcher.wait_for(f"/conversations/c-qos0/{agent_id}", count=5)
        self.assertEqual(sorted(r["task_id"] for r in replies), sorted(t["task_id"] for t in tasks))
        self.assertNotIn("lost connection", agent.log())
        self.assertNotIn(f"Client agent2389-{agent_id} disconnected due to protocol error", self.broker.log(tail=None))
        self.assertEqual(self.broker.log(tail=None).count(f"as agent2389-{agent_id} ("), 1, "connected once, never again")


class CrashLoopTests(BrokerTestCase):
    @classmethod
    def setUpClass(cls):
        cls.broker = Mosquitto(persistence=True).start()

    def connections(self, client_id):
        return self.broker.log(tail=None).count(f" as {client_id} (")

    def test_a_broker_in_a_crash_loop_is_not_taken_for_a_twin_agent(self):
        agent_id = "crash-loop-agent"
        watcher = self.watcher(status(agent_id), "/conversations/#")
        agent = self.agent(agent_id).start_and_wait_available(watcher)
        intake = f"agent2389-{agent_id}"
        published = []
        for cycle in range(4):  # each time the agent is back, the broker dies under it
            before = self.connections(intake)
            task = envelope(agent_id, cid="c-crash", instruction=f"cycle {cycle}")
            watcher.publish(f"/control/agents/{agent_id}/input", task)  # acknowledged by the broker
            published.append(task["task_id"])
            self.broker.stop()
            self.broker.start()
            wait_until(lambda: self.connections(intake) > before, 40, "the agent to reconnect")
        replies = watcher.wait_for(f"/conversations/c-crash/{agent_id}", count=len(published), timeout=60)
        self.assertEqual(sorted({r["task_id"] for r in replies}), sorted(published))
        self.assertNotIn(TAKEOVER, agent.log())
        task_id = new_task_id()  # and it keeps serving, without a takeover's long wait
        watcher.publish(f"/control/agents/{agent_id}/input", envelope(agent_id, task_id=task_id, cid="c-after"))
        self.assertEqual(watcher.wait_for(f"/conversations/c-after/{agent_id}")[0]["task_id"], task_id)


class KilledBrokerTests(BrokerTestCase):
    @classmethod
    def setUpClass(cls):
        cls.broker = Mosquitto(persistence=True, extra_conf="autosave_interval 1\nautosave_on_changes false").start()

    def test_a_broker_killed_again_and_again_is_rejoined_at_once_each_time(self):
        """broker_flap.py --kill, shorter. Before: the reconnect delay grew with every loss (0.3, 0.5,
        1.3, 3.6, 7.6 s) although every attempt succeeded, while tasks piled up in a broker that died
        before saving them (498 of 1,227 never answered)."""
        agent_id = "killed-broker-agent"
        watcher = self.watcher(status(agent_id), "/conversations/#")
        agent = self.agent(agent_id).start_and_wait_available(watcher)
        took = []
        for cycle in range(7):
            killed_at = rfc3339()
            self.broker.proc.kill()
            self.broker.proc.wait(10)
            self.broker.start()
            back = time.monotonic()
            # subscribed again: the broker may have lost the session that would have kept a task. A status
            # published since the kill, not the retained one the broker kept from before (the watcher gets
            # that again when it subscribes again, possibly before the agent is back)
            watcher.wait_for(status(agent_id), lambda p: p.get("status") == "available"
                             and p.get("timestamp", "") > killed_at, timeout=40)
            took.append(round(time.monotonic() - back, 2))
            task = envelope(agent_id, cid=f"c-killed-{cycle}")  # answered before the next kill: one the
            watcher.publish(f"/control/agents/{agent_id}/input", task)  # broker had not saved would be lost
            watcher.wait_for(f"/conversations/c-killed-{cycle}/{agent_id}", timeout=30)
        self.assertLess(max(took), 3.0, f"broker back, agent back at once (seconds per cycle: {took})")
        self.assertNotIn(TAKEOVER, agent.log())


class ExactlyOnceOnTheWireTests(BrokerTestCase):
    @classmethod
    def setUpClass(cls):
        cls.broker = Mosquitto(persistence=True).start()

    def test_outcome_qos_2_reaches_a_qos_2_subscriber_once_across_broker_restarts(self):
        """broker_flap.py --qos2, shorter. At QoS 1 a broker restarted between delivering an
        answer and its acknowledgement delivers it again (14 copies in 60 s of restarts)."""
        agent_id = "qos2-agent"
        watcher = Watcher(self.broker.port, status(agent_id), "/conversations/#", qos=2)
        self.addCleanup(watcher.close)
        self.agent(agent_id, mqtt={"outcome_qos": 2}, agent={"state_dir": "./state"}).start_and_wait_available(watcher)
        published = []
        for cycle in range(6):  # each time, answers are on their way when the broker stops
            wait_until(watcher.client.is_connected, 30, "the watcher to reconnect")
            for _ in range(15):
                task = envelope(agent_id, cid="c-qos2", instruction=f"cycle {cycle}")
                watcher.publish(f"/control/agents/{agent_id}/input", task)
                published.append(task["task_id"])
            self.broker.stop()
            self.broker.start()
        watcher.wait_for(f"/conversations/c-qos2/{agent_id}", count=len(published), timeout=90)
        answers = collections.Counter(r["task_id"] for r in watcher.matching(f"/conversations/c-qos2/{agent_id}"))
        self.assertEqual(set(answers), set(published))
        copies = [task for task, count in answers.items() if count > 1]
        deliveries = [(m.mid, m.dup, m.timestamp) for m in watcher.messages for task in copies
                      if task.encode() in m.payload]
        self.assertEqual(copies, [], f"no copy at all; the copies' (packet id, DUP, time): {deliveries}; "
                                     f"broker log: {self.broker.log(tail=3000)}")
        self.assertEqual({qos for topic, qos in watcher.qos_levels() if topic.startswith("/conversations/")}, {2})


class ProtocolFallbackTests(LoggingBrokerCase):
    def proxied_agent(self, agent_id, close_first, after_connect=False):
        proxy = ClosingProxy(self.broker.port, close_first, after_connect)
        self.addCleanup(proxy.close)
        agent = self.agent(agent_id, mqtt={"broker_url": f"mqtt://127.0.0.1:{proxy.port}"})
        return proxy, agent

    def protocols(self, agent_id):
        """The protocol level of each connection the broker accepted for the agent's links (p5: MQTT 5)."""
        return re.findall(rf" as agent2389-{re.escape(agent_id)}(?:-out)? \((p\d)", self.broker.log(tail=None))

    def test_one_closed_connection_is_no_reason_to_leave_mqtt5(self):
        agent_id = "lb-agent"
        watcher = self.watcher(status(agent_id))
        proxy, agent = self.proxied_agent(agent_id, close_first=1)
        agent.start_and_wait_available(watcher)
        self.assertEqual(proxy.closed, 1)
        self.assertNotIn(FALLBACK, agent.log())
        self.assertEqual(self.protocols(agent_id), ["p5", "p5"])

    def test_connections_reset_before_connect_was_read_are_no_reason_to_leave_mqtt5(self):
        """Reset at accept: nobody read the CONNECT, so the closes say nothing about MQTT 5."""
        agent_id = "lb-agent-3"
        watcher = self.watcher(status(agent_id))
        proxy, agent = self.proxied_agent(agent_id, close_first=2)  # auto_fallback.py's accept-2
        agent.start_and_wait_available(watcher)
        self.assertEqual(proxy.closed, 2)
        self.assertNotIn(FALLBACK, agent.log())
        self.assertEqual(self.protocols(agent_id), ["p5", "p5"])

    def test_after_a_fallback_on_closes_a_later_connection_speaks_mqtt5_again(self):
        agent_id = "lb-agent-2"
        watcher = self.watcher(status(agent_id))
        proxy, agent = self.proxied_agent(agent_id, close_first=2, after_connect=True)  # closes, then 3.1.1: evidence
        agent.start_and_wait_available(watcher)
        self.assertEqual(agent.log().count(FALLBACK), 1)
        self.assertEqual(self.protocols(agent_id), ["p2", "p2"])  # mosquitto says p2 for 3.1.1
        proxy.drop_all()  # the balancer restarts; the broker behind it speaks MQTT 5
        wait_until(lambda: len(self.protocols(agent_id)) >= 4, 30, "both links to reconnect")
        self.assertEqual(self.protocols(agent_id)[2:], ["p5", "p5"])
        watcher.wait_for(status(agent_id), available, count=2)


class NetworkLoopFaultTests(LoggingBrokerCase):
    def test_a_fault_in_the_loop_reconnects_with_backoff_and_is_logged_once(self):
        agent_id = "faulty-loop"
        flag = os.path.join(tempfile.mkdtemp(prefix="fault-"), "raise")
        prelude = ("import os\nimport agent2389_lib.mqtt.link as link\n"
                   "service = link.Link._service\n"
                   "def faulty(self):\n"
                   f"    if self.name == 'intake' and os.path.exists({flag!r}):\n"
                   "        raise RuntimeError('injected fault')\n"
                   "    return service(self)\n"
                   "link.Link._service = faulty\n")
        watcher = self.watcher(status(agent_id), "/conversations/#")
        agent = self.agent(agent_id, prelude=prelude).start_and_wait_available(watcher)
        connections = lambda: self.broker.log(tail=None).count("New connection from")  # noqa: E731
        before = connections()
        open(flag, "w").close()
        started = time.monotonic()
        wait_until(lambda: connections() >= before + 4, 30, "four reconnection attempts")
        # equal jitter: at least 0.25 + 0.5 + 1 s between the first four attempts
        self.assertGreaterEqual(time.monotonic() - started, 1.7)
        os.unlink(flag)
        task_id = new_task_id()
        watcher.publish(f"/control/agents/{agent_id}/input", envelope(agent_id, task_id=task_id, cid="c-fault"))
        self.assertEqual(watcher.wait_for(f"/conversations/c-fault/{agent_id}", timeout=40)[0]["task_id"], task_id)
        self.assertEqual(agent.log().count("unexpected error in the intake network loop"), 1, "a line a minute")
