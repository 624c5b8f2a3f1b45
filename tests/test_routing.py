"""Protocol v2 against a real mosquitto and agent processes: discovery from the status topics,
workflows routed by an LLM (OpenAI strict schema, Anthropic forced tool) or a gatekeeper, the
ways a workflow ends, and a hop's agent killed mid-workflow."""

import json
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

from fake_llm import FakeAnthropic, FakeGatekeeper, FakeOpenAI, Hang, Reply, Status
from support import AGENT_SCRIPT, BrokerTestCase, Watcher, base_env, envelope, process, wait_until

from agent2389_lib.discovery import STATUS_FILTER, Registry

ROUTER_KEY = "sk-router-key-0123456789"
CAPABILITIES = {"researcher": ["research"], "writer": ["writing"], "judge": ["review", "judging"]}


def decision(next_agent=None, instruction=None, reasoning="because"):
    return {"workflow_complete": next_agent is None, "reasoning": reasoning, "next_agent": next_agent,
            "next_instruction": instruction}


def prompt_facts(body):
    """(scenario, current agent, iteration) from the router prompt an agent sent."""
    if "messages" in body:
        text = body["messages"][-1]["content"]
        text = text if isinstance(text, str) else text[0]["text"]
    scenario = re.search(r"ORIGINAL USER REQUEST:\n(\S+)", text).group(1)
    agent = re.search(r"CURRENT AGENT: (\S+)", text).group(1)
    iteration = int(re.search(r"iteration (\d+) of at most", text).group(1))
    return scenario, agent, iteration


PLANS = {  # scenario -> what the router says after each agent, by iteration
    "basic": {1: decision("writer", "Write it up"), 2: decision("judge", "Review the article"), 3: decision()},
    "loop": {1: decision("judge", "Review"), 2: decision("writer", "Revise"), 3: decision("judge", "Review again"),
             4: decision()},
    "endless": {n: decision("judge" if n % 2 else "writer", "Once more") for n in range(1, 50)},
    "ghost": {1: decision("ghost-agent", "Haunt")},
    "static": {1: decision()},
}


def planned(body):
    scenario, agent, iteration = prompt_facts(body)
    return PLANS[scenario][iteration]


class RoutingCase(BrokerTestCase):
    def setUp(self):
        super().setUp()
        self.watch = self.watcher("/control/agents/+/status", "/conversations/#", "/control/agents/+/input",
                                  "/control/agents/+/progress")

    def start(self, routing, names=("researcher", "writer", "judge"), env=None, **sections):
        agents = []
        for name in names:
            agent = self.agent(name, agent={"capabilities": CAPABILITIES[name], "description": f"the {name}"},
                               routing=routing, env={"ROUTER_KEY": ROUTER_KEY, **(env or {})}, **sections)
            agents.append(agent.start_and_wait_available(self.watch))
        return agents

    def workflow(self, first, query, cid):
        task = envelope(first, cid=cid, instruction=query)
        task.update(version="2.0")
        self.watch.publish(f"/control/agents/{first}/input", task)
        return task

    def final(self, cid, timeout=30):
        (answer,) = self.watch.wait_for(f"/conversations/{cid}/+", timeout=timeout)
        return answer

    def answers(self, cid):
        return self.watch.matching(f"/conversations/{cid}/+")

    def settled(self, agents, tasks: int) -> int:
        """Waits until the agents have finished `tasks` tasks between them and none is busy, then
        for a message through the broker after their last outcome: what they published has
        reached the watcher, so a count of answers can see a second one. The tasks they finished."""
        def finished() -> int:
            counts = [agent.metric("tasks") for agent in agents]
            busy = any(c["tasks_processing"] or c["intake_queue_depth"] for c in counts)
            return -1 if busy else sum(c["tasks_finished"] for c in counts)
        wait_until(lambda: finished() >= tasks, 30, f"{tasks} tasks to be finished")
        self.watch.publish("/conversations/settled/marker", {"after": "every outcome"})
        self.watch.wait_for("/conversations/settled/marker")
        return finished()


def llm_routing(fake, provider="openai", max_iterations=5):
    return {"strategy": "llm", "max_iterations": max_iterations,
            "llm": {"provider": provider, "model": "router-model", "base_url": fake.base_url,
                    "api_key_env": "ROUTER_KEY"}}


class DiscoveryTests(RoutingCase):
    def test_a_reference_agent_between_its_heartbeats_is_routable(self):
        """The reference republishes its status every 900 s and does not say so: judged against
        our 60 s heartbeat, a live reference agent was routable only a fifth of the time."""
        gatekeeper = FakeGatekeeper()
        self.addCleanup(gatekeeper.close)
        (researcher,) = self.start({"strategy": "gatekeeper", "gatekeeper": {"url": gatekeeper.url}},
                                   names=("researcher",))
        wait_until(lambda: researcher.metric("routing")["registry_agents"] == 1, 10, "the agent itself")
        five_minutes_ago = (datetime.now(timezone.utc) - timedelta(minutes=5)).isoformat()
        rust = {"agent_id": "rusty-between", "status": "available", "timestamp": five_minutes_ago,
                "capabilities": ["research"], "description": "a reference agent"}
        self.watch.publish("/control/agents/rusty-between/status", rust, retain=True)
        self.addCleanup(self.watch.publish, "/control/agents/rusty-between/status", b"", retain=True)
        wait_until(lambda: researcher.metric("routing")["registry_agents"] == 2, 10, "the reference agent routable")

    def test_registry_follows_agents(self):
        gatekeeper = FakeGatekeeper()
        self.addCleanup(gatekeeper.close)
        researcher, writer, judge = self.start({"strategy": "gatekeeper", "gatekeeper": {"url": gatekeeper.url}},
                                               heartbeat_interval=30)
        statuses = Watcher(self.broker.port, STATUS_FILTER)
        self.addCleanup(statuses.close)

        def seen():
            registry = Registry()
            for message in list(statuses.messages):
                registry.observe(message.topic, message.payload)
            return [a.agent_id for a in registry.routable()], registry.ignored

        wait_until(lambda: seen() == (["judge", "researcher", "writer"], 0), 10, "three agents in the registry")
        (payload,) = [json.loads(m.payload) for m in statuses.messages if m.topic.endswith("/writer/status")][-1:]
        self.assertEqual((payload["health"], payload["load"], payload["heartbeat_interval"], payload["capabilities"]),
                         ("ok", 0.0, 30, ["writing"]))
        self.watch.publish("/control/agents/broken/status", b"{not json")
        rust = {"agent_id": "rusty", "status": "available", "timestamp": "2099-01-01T00:00:00.000000000+00:00",
                "capabilities": ["research"], "description": "a reference agent"}
        self.watch.publish("/control/agents/rusty/status", rust, retain=True)
        self.addCleanup(self.watch.publish, "/control/agents/rusty/status", b"", retain=True)
        wait_until(lambda: seen() == (["judge", "researcher", "rusty", "writer"], 1), 10, "rusty in, broken ignored")
        wait_until(lambda: researcher.metric("routing") == {"decisions": {}, "registry_agents": 4,
                                                           "registry_statuses_ignored": 1}, 10, "the agent's registry")
        writer.proc.kill()  # the Last Will
        wait_until(lambda: seen()[0] == ["judge", "researcher", "rusty"], 15, "writer dropped at SIGKILL")
        judge.signal(signal.SIGTERM)
        self.assertEqual(judge.wait(), 0)
        wait_until(lambda: seen()[0] == ["researcher", "rusty"], 10, "judge dropped at SIGTERM")
        wait_until(lambda: researcher.metric("routing")["registry_agents"] == 2, 10, "the agent saw both leave")


class LlmRoutedWorkflowTests(RoutingCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.fake = FakeOpenAI(api_key=ROUTER_KEY)
        cls.fake.responder = lambda body: Reply(json.dumps(planned(body)))

    @classmethod
    def tearDownClass(cls):
        cls.fake.close()
        super().tearDownClass()

    def routed(self, name: str, first: str, reason: str, iterations: int) -> dict:
        """Runs the workflow `name` from agent `first` with three routed agents; checks how it ended,
        its steps and trace, that every hop was a new task run once, and that it was answered once.
        Its final answer."""
        agents = self.start(llm_routing(self.fake))
        task = self.workflow(first, name, f"cid-{name}")
        workflow = self.final(f"cid-{name}")["workflow"]
        self.assertEqual((workflow["complete"], workflow["reason"], workflow["iterations"]), (True, reason, iterations))
        steps = [s["agent_id"] for s in workflow["steps_completed"]]
        trace = [(t["from_agent"], t["to_agent"], t["step_number"]) for t in workflow["routing_trace"]]
        self.assertEqual(len(steps), iterations)
        self.assertEqual(trace, [(a, b, n + 1) for n, (a, b) in enumerate(zip(steps, steps[1:]))])
        hops = self.watch.matching("/control/agents/+/input", lambda p: p.get("conversation_id") == f"cid-{name}")
        self.assertEqual(len({h["task_id"] for h in hops}), iterations)  # every hop a new task id
        self.assertEqual(hops[0]["task_id"], task["task_id"])
        self.assertEqual(self.settled(agents, iterations), iterations, "every hop ran once")
        self.assertEqual(len(self.answers(f"cid-{name}")), 1, "answered once")
        return workflow

    def test_three_agents_routed_by_strict_schema_answers_seen_by_inject_and_monitor(self):
        agents = self.start(llm_routing(self.fake))
        before = len(self.fake.completions())
        monitor = process(self, [sys.executable, AGENT_SCRIPT, "monitor", "--broker-url", self.broker.url, "--mode",
                                 "routing", "--conversation-id", "cid-basic", "--count", "3"], env=base_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.assertTrue(monitor.stderr.readline().startswith("monitoring /control/agents/+/input, /conversations/cid-basic/# on "))
        result = subprocess.run([sys.executable, AGENT_SCRIPT, "inject", "--broker-url", self.broker.url, "--agent-id",
                                 "researcher", "--v2", "--instruction", "basic", "--message", "MQTT", "--wait", "30",
                                 "--conversation-id", "cid-basic"], env=base_env(), capture_output=True, text=True,
                                timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        shown, _ = monitor.communicate(timeout=30)
        self.assertEqual([line.split(" ", 1)[1] for line in shown.splitlines()],
                         ["cid-basic step 1: researcher -> writer: because", "cid-basic step 2: writer -> judge: because",
                          "cid-basic complete (router) after 3 step(s), answered by judge"])
        self.assertIn("1. researcher -> writer: because\n2. writer -> judge: because\n"
                      "workflow complete (router) after 3 step(s), answered by judge", result.stderr)
        self.assertTrue(result.stdout.startswith("Review the article"), result.stdout)
        bodies = [r["body"] for r in self.fake.completions()[before:]]
        self.assertEqual(len(bodies), 3)
        for body in bodies:  # the fake answered 400 to anything OpenAI would refuse
            self.assertTrue(body["response_format"]["json_schema"]["strict"])
        catalog = bodies[0]["messages"][-1]["content"].split("AVAILABLE AGENTS:\n")[1]
        self.assertIn("- judge: the judge; capabilities: review, judging; load: 0.00", catalog)
        self.assertIn("- researcher (the current agent): the researcher", catalog)
        self.assertEqual(self.settled(agents, 3), 3, "every hop ran once")
        self.assertEqual(len(self.answers("cid-basic")), 1, "answered once")

    def test_a_loop_revisits_both_agents(self):
        loop = self.routed("loop", "writer", "router", 4)
        self.assertEqual([s["agent_id"] for s in loop["steps_completed"]], ["writer", "judge", "writer", "judge"])
        self.assertEqual(loop["steps_completed"][1]["action"], "Review")
        routing_events = self.watch.matching("/control/agents/+/progress",
                                             lambda p: (p.get("metadata") or {}).get("kind") == "routing"
                                             and p["conversation_id"] == "cid-loop")
        self.assertEqual([(e["agent_id"], e["metadata"]["next_agent"], e["metadata"]["iteration"]) for e in routing_events],
                         [("writer", "judge", 1), ("judge", "writer", 2), ("writer", "judge", 3)])

    def test_max_iterations_stops_a_router_that_never_completes(self):
        self.routed("endless", "writer", "max_iterations", 5)

    def test_a_router_naming_an_unknown_agent_ends_after_one_corrective_retry(self):
        self.routed("ghost", "writer", "router_error", 1)
        ghost_prompts = [r["body"] for r in self.fake.completions() if "\nghost" in r["body"]["messages"][-1]["content"]]
        self.assertEqual(len(ghost_prompts), 2)
        self.assertIn("YOUR PREVIOUS ANSWER WAS REJECTED: next_agent 'ghost-agent' is not an available agent",
                      ghost_prompts[1]["messages"][-1]["content"])

    def test_v1_is_not_routed_and_static_next_wins(self):
        self.start(llm_routing(self.fake), names=("writer", "judge"))
        before = len(self.fake.completions())
        plain = envelope("writer", cid="v1-plain")
        self.watch.publish("/control/agents/writer/input", plain)
        self.assertEqual(set(self.final("v1-plain")), {"response", "task_id", "usage"})
        self.assertEqual(len(self.fake.completions()), before)
        static = envelope("writer", cid="v2-static", next={"topic": "/control/agents/judge/input", "instruction": "J",
                                                           "input": None, "next": None})
        static.update(version="2.0", context={"original_query": "static", "steps_completed": [], "iteration_count": 0})
        self.watch.publish("/control/agents/writer/input", static)
        answer = self.final("v2-static")  # the writer followed `next`; the judge, last in the chain, asked the router
        self.assertEqual((answer["task_id"], answer["workflow"]["reason"]), (static["task_id"], "router"))
        self.assertEqual(answer["workflow"]["routing_trace"][0]["reason"], "static pipeline")
        self.assertEqual([prompt_facts(r["body"])[1] for r in self.fake.completions()[before:]], ["judge"])


class AnthropicRoutedWorkflowTests(RoutingCase):
    def test_forced_tool_routes(self):
        fake = FakeAnthropic(api_key=ROUTER_KEY)
        self.addCleanup(fake.close)
        fake.responder = lambda body: Reply(tool_calls=[("routing_decision", planned(body))])
        self.start(llm_routing(fake, "anthropic"))
        self.workflow("researcher", "basic", "cid-anthropic")
        workflow = self.final("cid-anthropic")["workflow"]
        self.assertEqual([s["agent_id"] for s in workflow["steps_completed"]], ["researcher", "writer", "judge"])
        self.assertEqual(workflow["reason"], "router")
        for request in fake.completions():
            self.assertEqual(request["body"]["tool_choice"], {"type": "tool", "name": "routing_decision"})


class GatekeeperWorkflowTests(RoutingCase):
    def test_gatekeeper_retries_5xx_and_times_out(self):
        gatekeeper = FakeGatekeeper()
        self.addCleanup(gatekeeper.close)
        self.start({"strategy": "gatekeeper", "gatekeeper": {"url": gatekeeper.url, "timeout_ms": 400,
                                                             "retry_attempts": 2}}, names=("writer", "judge"))
        gatekeeper.script += [Status(503), decision("judge", "Review"), decision()]
        self.workflow("writer", "gated", "cid-gated")
        workflow = self.final("cid-gated")["workflow"]
        self.assertEqual(([s["agent_id"] for s in workflow["steps_completed"]], workflow["reason"]),
                         (["writer", "judge"], "router"))
        first = gatekeeper.completions()[0]["body"]
        self.assertEqual(first["original_query"], "gated")
        self.assertEqual(sorted(a["agent_id"] for a in first["available_agents"]), ["judge", "writer"])
        self.assertEqual(len(gatekeeper.completions()), 3)

        gatekeeper.script += [Hang(2.0, then=decision("judge"))] * 4  # every attempt times out
        self.workflow("writer", "stuck", "cid-stuck")
        answer = self.final("cid-stuck")
        self.assertEqual((answer["workflow"]["reason"], answer["workflow"]["iterations"]), ("router_error", 1))
        self.assertEqual(len(gatekeeper.completions()), 3 + 4)  # 2 attempts, then the corrective call's 2


class RoutingDeadlineTests(RoutingCase):
    def test_routers_that_never_answer_end_within_the_task_deadline(self):
        """Every hop's outcome within task_timeout, with the timeout error. Before: 92 s with a
        gatekeeper and 83 s with an LLM router at TASK_TIMEOUT=30 (default router settings: 244 s).
        A gatekeeper-routed writer and an LLM-routed judge, side by side."""
        gatekeeper = FakeGatekeeper()
        self.addCleanup(gatekeeper.close)
        gatekeeper.script += [Hang(120.0, then=decision())] * 10
        fake = FakeOpenAI(api_key=ROUTER_KEY)
        self.addCleanup(fake.close)
        fake.script += [Hang(120.0, then=Reply("{}"))] * 10
        llm = llm_routing(fake)
        llm["llm"]["max_attempts"] = 3  # [routing.llm] takes max_attempts like [llm]
        self.start({"strategy": "gatekeeper", "gatekeeper": {"url": gatekeeper.url}}, names=("writer",),
                   env={"TASK_TIMEOUT": "30"})
        self.start(llm, names=("judge",), env={"TASK_TIMEOUT": "30"})
        started = time.monotonic()
        tasks = {cid: self.workflow(agent, "never routed", cid) for agent, cid in (("writer", "cid-gk-late"),
                                                                                   ("judge", "cid-llm-late"))}
        for cid, task in tasks.items():
            answer = self.final(cid, timeout=60)
            self.assertEqual((answer["task_id"], answer["error"]["message"]), (task["task_id"], "task exceeded 30 s"))
        self.assertLess(time.monotonic() - started, 30 + 3, "within the deadline, plus publishing")


class KilledHopTests(RoutingCase):
    def test_hop_killed_mid_workflow(self):
        fake = FakeOpenAI(api_key=ROUTER_KEY)
        self.addCleanup(fake.close)
        fake.responder = lambda body: Reply(json.dumps(
            decision("judge", "Review") if prompt_facts(body)[1] == "writer" else decision()))
        routing = llm_routing(fake)
        (writer,) = self.start(routing, names=("writer",))
        judge = self.agent("judge", agent={"capabilities": ["review"], "state_dir": "./state", "max_pipeline_depth": 8},
                           routing=routing, llm={"provider": "echo", "latency_ms": 4000}, env={"ROUTER_KEY": ROUTER_KEY})
        judge.start_and_wait_available(self.watch)
        cids = [f"killed-{n}" for n in range(5)]
        for cid in cids:
            self.workflow("writer", "kill", cid)
        for cid in cids:  # every forward reached the judge, which is thinking about it
            self.watch.wait_for("/control/agents/judge/progress",
                                lambda p, cid=cid: p.get("conversation_id") == cid and p["event_type"] == "TaskStart")
        judge.proc.kill()
        judge.wait()
        judge.start()
        for cid in cids:
            self.assertEqual(self.final(cid, timeout=40)["workflow"]["iterations"], 2)
        self.workflow("writer", "kill", "after-kill")  # the judge's redeliveries were all taken before this one
        self.final("after-kill")
        for cid in cids:
            self.assertEqual(len(self.answers(cid)), 1, cid)
        self.assertEqual(writer.proc.poll(), None)
