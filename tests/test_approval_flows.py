"""Approvals through a real mosquitto and the fake OpenAI server (PROTOCOL.md 9): a call that
needs a person parks its task; approved it runs once, denied or timed out the LLM hears why;
each task is answered exactly once across a SIGKILL while parked or while the approved tool
runs, in a pool, through the CLI, and for an MCP server's elicitation."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile

from fake_llm import FakeOpenAI, Reply
from support import (AGENT_SCRIPT, AgentProcess, BrokerTestCase, Watcher, acl_broker, base_env, envelope,
                     installed, wait_until)

KEY = "sk-test-key-0123456789"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def input_topic(agent_id: str) -> str:
    return f"/control/agents/{agent_id}/input"


def decision_topic(agent_id: str, approval_id: str) -> str:
    return f"/control/agents/{agent_id}/approvals/{approval_id}/decision"


def calls_deploy(body: dict) -> Reply:
    """The LLM: a tool's result is the answer; "ping" is answered at once; anything else calls the tool."""
    last = body["messages"][-1]
    if last["role"] == "tool":
        return Reply(f"final: {last['content']}")
    if "ping" in json.dumps(body["messages"]):
        return Reply("pong")
    return Reply(tool_calls=[("deploy", {"target": "prod", "api_key": "k-live-5ecret"})])


class ApprovalTestCase(BrokerTestCase):
    TOPICS = ("/control/agents/+/status", "/conversations/#", "/control/agents/+/progress/#",
              "/control/agents/+/approvals/+")

    def setUp(self):
        super().setUp()
        self.fake = FakeOpenAI(api_key=KEY)
        self.addCleanup(self.fake.close)
        self.fake.responder = calls_deploy
        self.dir = tempfile.mkdtemp(prefix="approvals-")
        self.count = os.path.join(self.dir, "count")
        self.hold = os.path.join(self.dir, "hold")  # while it exists, the tool waits after counting its run
        self.script = os.path.join(self.dir, "deploy")
        with open(self.script, "w") as handle:
            handle.write(f"#!/bin/sh\necho ran >> {self.count}\nif [ -f {self.hold} ]; then echo $$ > {self.hold}.pid; "
                         f"sleep 60; fi\nprintf deployed\n")
        os.chmod(self.script, 0o755)
        self.addCleanup(self._kill_held_tool)

    def _kill_held_tool(self):
        try:
            with open(f"{self.hold}.pid") as handle:
                os.kill(int(handle.read()), signal.SIGKILL)
        except (OSError, ValueError):
            pass

    def deployer(self, agent_id: str, timeout: int = 600, workdir=None, agent=None, **sections) -> AgentProcess:
        tool = {"name": "deploy", "command": self.script, "timeout": 120, "requires_approval": True,
                "approval_timeout": timeout}
        return self.agent(agent_id, workdir=workdir, llm={"provider": "openai", "base_url": self.fake.base_url},
                          env={"OPENAI_API_KEY": KEY}, tools=[tool], agent=agent or {}, **sections)

    def runs(self) -> int:
        try:
            with open(self.count) as handle:
                return len(handle.readlines())
        except FileNotFoundError:
            return 0

    def request_for(self, watcher, task: dict) -> dict:
        """The retained approval request of `task`."""
        (request,) = watcher.wait_for("/control/agents/+/approvals/+",
                                      lambda p: isinstance(p, dict) and p.get("task_id") == task["task_id"])
        return request

    def decide(self, watcher, agent_id: str, approval_id: str, decision: str, by: str = "alice", reason: str = ""):
        watcher.publish(decision_topic(agent_id, approval_id), {"decision": decision, "by": by, "reason": reason})

    def assert_answered_once(self, watcher, agent: AgentProcess, task: dict) -> dict:
        """The one answer on the conversation: a task sent after it (answered at once) finds no second one."""
        cid = task["conversation_id"]
        (answer,) = watcher.wait_for(f"/conversations/{cid}/+", timeout=30)
        self.assertEqual(answer["task_id"], task["task_id"])
        marker = envelope(agent.agent_id, cid=f"{cid}-after", instruction="ping")
        watcher.publish(input_topic(agent.agent_id), marker)
        watcher.wait_for(f"/conversations/{cid}-after/+", timeout=30)
        self.assertEqual(len(watcher.matching(f"/conversations/{cid}/+")), 1, "exactly one answer")
        return answer

    def cleared(self, watcher, approval_id: str) -> None:
        watcher.wait_for(f"/control/agents/+/approvals/{approval_id}", lambda p: p == b"")


class DecisionTests(ApprovalTestCase):
    def test_an_approved_call_runs_once_and_its_task_is_answered_once(self):
        watcher = self.watcher(*self.TOPICS)
        agent = self.deployer("deployer").start_and_wait_available(watcher)
        task = envelope("deployer", cid="c-approve")
        watcher.publish(input_topic("deployer"), task)
        request = self.request_for(watcher, task)
        self.assertEqual((request["kind"], request["tool"], request["conversation_id"]), ("tool", "deploy", "c-approve"))
        self.assertEqual(request["arguments"], {"target": "prod", "api_key": "[REDACTED]"}, "masked as in logs")
        (event,) = watcher.wait_for("/control/agents/deployer/progress/#",
                                    lambda p: p.get("event_type") == "ApprovalRequired")
        self.assertEqual(event["metadata"], {"approval_id": request["approval_id"], "tool_name": "deploy"})
        agent.wait_metric("approvals.pending", 1)
        self.assertEqual(json.loads(agent.fetch("/health"))["approvals_pending"], 1)
        self.assertIn("agent2389_approvals_pending 1", agent.fetch("/metrics", "text/plain"))
        self.assertEqual(self.runs(), 0, "nothing runs before the decision")
        for _ in range(3):  # the same decision, three times: one resume
            self.decide(watcher, "deployer", request["approval_id"], "approve")
        answer = self.assert_answered_once(watcher, agent, task)
        self.assertEqual(answer["response"], "final: deployed")
        self.cleared(watcher, request["approval_id"])
        self.assertEqual(self.runs(), 1)
        agent.wait_metric("approvals.decisions.approved", 1)
        agent.wait_metric("approvals.pending", 0)
        prometheus = agent.fetch("/metrics", "text/plain")
        self.assertIn('agent2389_approval_decisions_total{outcome="approved"} 1', prometheus)
        self.assertIn("agent2389_approval_decision_seconds_count 1", prometheus)
        agent.wait_log(f"ignoring a decision for approval {request['approval_id']}: it is not waiting here")

    def test_a_denied_call_tells_the_llm_who_denied_it_and_why_and_hostile_decisions_change_nothing(self):
        watcher = self.watcher(*self.TOPICS)
        agent = self.deployer("denier").start_and_wait_available(watcher)
        task = envelope("denier", cid="c-deny")
        watcher.publish(input_topic("denier"), task)
        approval_id = self.request_for(watcher, task)["approval_id"]
        for hostile in (b"{", b'{"decision": "maybe"}', b"[1]", b'{"decision": "approve", "content": [1]}',
                        json.dumps({"decision": "approve", "by": "x" * 300}).encode(), b"x" * 70000):
            watcher.publish(decision_topic("denier", approval_id), hostile)
        watcher.publish(decision_topic("denier", "unknown-approval-0001"), {"decision": "approve"})
        watcher.publish("/control/agents/denier/approvals/short/decision", {"decision": "approve"})
        agent.wait_log("ignoring a decision on /control/agents/denier/approvals/")
        agent.wait_log("ignoring a decision for approval unknown-approval-0001")
        self.assertEqual((agent.metric("approvals.pending"), self.runs(), agent.proc.poll()), (1, 0, None))
        self.decide(watcher, "denier", approval_id, "deny", by="bob", reason="not on a Friday")
        answer = self.assert_answered_once(watcher, agent, task)
        self.assertEqual(answer["response"], "final: the call was denied by bob: not on a Friday")
        self.assertEqual(self.runs(), 0, "never ran")
        self.cleared(watcher, approval_id)
        agent.wait_metric("approvals.decisions.denied", 1)

    def test_nobody_deciding_in_time_is_a_denial_by_timeout(self):
        watcher = self.watcher(*self.TOPICS)
        agent = self.deployer("waiter", timeout=1).start_and_wait_available(watcher)
        task = envelope("waiter", cid="c-timeout")
        watcher.publish(input_topic("waiter"), task)
        request = self.request_for(watcher, task)
        answer = self.assert_answered_once(watcher, agent, task)
        self.assertEqual(answer["response"], "final: the call was denied by timeout: nobody decided in time")
        self.assertEqual(self.runs(), 0)
        self.cleared(watcher, request["approval_id"])
        agent.wait_metric("approvals.decisions.timeout", 1)

    def test_a_cancel_ends_the_wait_and_the_task_is_canceled(self):
        watcher = self.watcher(*self.TOPICS)
        agent = self.deployer("canceler").start_and_wait_available(watcher)
        task = envelope("canceler", cid="c-cancel-parked")
        watcher.publish(input_topic("canceler"), task)
        request = self.request_for(watcher, task)
        watcher.publish("/control/agents/canceler/cancel", {"task_id": task["task_id"], "reason": "changed my mind"})
        (error,) = watcher.wait_for("/conversations/c-cancel-parked/+")
        self.assertEqual((error["error"]["code"], error["error"]["message"]),
                         ("canceled", "the task was canceled: changed my mind"))
        (received,) = watcher.wait_for("/control/agents/canceler/progress/#",
                                       lambda p: (p.get("metadata") or {}).get("kind") == "cancel_received")
        self.assertEqual(received["metadata"]["found"], "waiting_approval")
        self.cleared(watcher, request["approval_id"])
        self.assertEqual(self.runs(), 0)
        self.assert_answered_once(watcher, agent, task)


class CrashTests(ApprovalTestCase):
    def test_killed_while_parked_it_resumes_from_its_store_with_the_decision_made_meanwhile(self):
        watcher = self.watcher(*self.TOPICS)
        workdir = tempfile.mkdtemp(prefix="approvals-crash-")
        parked = self.deployer("crash-parked", workdir=workdir, agent={"state_dir": "./state"})
        parked.start_and_wait_available(watcher)
        task = envelope("crash-parked", cid="c-crash-parked")
        watcher.publish(input_topic("crash-parked"), task)
        approval_id = self.request_for(watcher, task)["approval_id"]
        parked.signal(signal.SIGKILL)
        parked.wait(10)
        self.decide(watcher, "crash-parked", approval_id, "approve")  # queued in its session while it is down
        again = self.deployer("crash-parked", workdir=workdir, agent={"state_dir": "./state"})
        again.start_and_wait_available(watcher)
        answer = self.assert_answered_once(watcher, again, task)
        self.assertEqual(answer["response"], "final: deployed")
        self.assertEqual(self.runs(), 1)
        self.cleared(watcher, approval_id)

    def test_killed_while_the_approved_tool_runs_it_never_runs_it_twice(self):
        watcher = self.watcher(*self.TOPICS)
        workdir = tempfile.mkdtemp(prefix="approvals-crash-")
        open(self.hold, "w").close()
        running = self.deployer("crash-running", workdir=workdir, agent={"state_dir": "./state"})
        running.start_and_wait_available(watcher)
        task = envelope("crash-running", cid="c-crash-running")
        watcher.publish(input_topic("crash-running"), task)
        approval_id = self.request_for(watcher, task)["approval_id"]
        self.decide(watcher, "crash-running", approval_id, "approve")
        wait_until(lambda: os.path.exists(f"{self.hold}.pid"), 20, "the approved tool to run")
        running.signal(signal.SIGKILL)
        running.wait(10)
        again = self.deployer("crash-running", workdir=workdir, agent={"state_dir": "./state"})
        again.start_and_wait_available(watcher)
        answer = self.assert_answered_once(watcher, again, task)
        self.assertIn("the agent stopped while this call ran; it was not run again", answer["response"])
        self.assertEqual(self.runs(), 1, "the tool ran once")
        self.cleared(watcher, approval_id)

    def test_without_a_state_dir_a_stopping_agent_answers_its_parked_tasks(self):
        """A pool member that leaves hands its parked tasks back: kept in its store to resume, or,
        with a store that ends with the process, answered with an error naming the approval."""
        watcher = self.watcher(*self.TOPICS)
        agent = self.deployer("leaver").start_and_wait_available(watcher)
        task = envelope("leaver", cid="c-leave")
        watcher.publish(input_topic("leaver"), task)
        approval_id = self.request_for(watcher, task)["approval_id"]
        self.assertEqual(agent.stop(), 0)
        (error,) = watcher.wait_for("/conversations/c-leave/+")
        self.assertIn(f"the agent stopped while the task waited for approval {approval_id}", error["error"]["message"])
        self.cleared(watcher, approval_id)


class PoolTests(ApprovalTestCase):
    def test_the_decision_reaches_the_member_that_parked(self):
        watcher = self.watcher(*self.TOPICS, "/control/agents/+/instances/+/status")
        members = [self.deployer("pool-approve", agent={"instance_id": name}).start_and_wait_available(watcher)
                   for name in ("m1", "m2")]
        tasks = [envelope("pool-approve", cid=f"c-pool-{n}") for n in range(4)]
        for task in tasks:
            watcher.publish(input_topic("pool-approve"), task)
        requests = [self.request_for(watcher, task) for task in tasks]
        # which member parked each: its log says so, a moment after the request is out (CI saw it not yet there)
        holders = [wait_until(lambda request=request: [index for index, member in enumerate(members)
                                                       if request["approval_id"] in member.log()], 15,
                              "the member that parked it to log it")[0] for request in requests]
        self.assertEqual(sorted(set(holders)), [0, 1], "both members parked tasks (the shared subscription)")
        for request in requests:
            self.decide(watcher, "pool-approve", request["approval_id"], "approve")
        for task in tasks:
            (answer,) = watcher.wait_for(f"/conversations/{task['conversation_id']}/+", timeout=30)
            self.assertEqual(answer["response"], "final: deployed")
        self.assertEqual(self.runs(), 4)
        for request in requests:
            self.cleared(watcher, request["approval_id"])
        self.assertEqual(len(watcher.matching("/conversations/+/+")), 4, "each answered once")


class CliTests(ApprovalTestCase):
    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, AGENT_SCRIPT, "approvals", *args, "--broker-url", self.broker.url],
                              env=base_env(), capture_output=True, text=True, timeout=60)

    def test_list_approve_and_deny_through_the_cli(self):
        watcher = self.watcher(*self.TOPICS)
        agent = self.deployer("cli-approve").start_and_wait_available(watcher)
        first, second = envelope("cli-approve", cid="c-cli-1"), envelope("cli-approve", cid="c-cli-2")
        for task in (first, second):
            watcher.publish(input_topic("cli-approve"), task)
        ids = [self.request_for(watcher, task)["approval_id"] for task in (first, second)]
        listed = self.cli("list", "--agent-id", "cli-approve")
        self.assertEqual(listed.returncode, 0, listed.stderr)
        for approval_id, task in zip(ids, (first, second)):
            self.assertIn(f"{approval_id}  agent cli-approve  task {task['task_id']}", listed.stdout)
        self.assertIn('tool: deploy {"target": "prod", "api_key": "[REDACTED]"}', listed.stdout)
        self.assertNotIn("5ecret", listed.stdout)
        as_json = [json.loads(line) for line in self.cli("list", "--json").stdout.splitlines()]
        self.assertEqual(sorted(r["approval_id"] for r in as_json), sorted(ids))
        approved = self.cli("approve", ids[0], "--reason", "checked the diff")
        self.assertEqual(approved.returncode, 0, approved.stderr)
        self.assertEqual(approved.stdout.strip(), f"approved approval {ids[0]} (agent cli-approve, task "
                                                  f"{first['task_id']})")
        denied = self.cli("deny", ids[1], "--reason", "not today", "--by", "carol")
        self.assertEqual(denied.returncode, 0, denied.stderr)
        self.assertEqual(self.assert_answered_once(watcher, agent, first)["response"], "final: deployed")
        self.assertEqual(self.assert_answered_once(watcher, agent, second)["response"],
                         "final: the call was denied by carol: not today")
        self.cleared(watcher, ids[0])
        again = self.cli("approve", ids[0])
        self.assertEqual(again.returncode, 1)
        self.assertIn(f"no approval {ids[0]} is waiting", again.stderr)
        self.assertEqual(self.cli("deny", ids[1]).returncode, 2, "deny needs --reason")
        self.assertEqual(self.cli("list").stdout, "")


class AclTests(ApprovalTestCase):
    """deploy/mosquitto/acl: only operators decide; an agent asks and reads its own decisions."""

    @classmethod
    def setUpClass(cls) -> None:
        cls.broker = acl_broker(("researcher-agent", "requester", "operator"), "-pw")

    def test_a_requester_cannot_decide_an_operator_can(self):
        operator = self.watcher_as("operator", *self.TOPICS)
        requester = self.watcher_as("requester")
        agent = self.deployer("researcher-agent")
        agent.env.update(MQTT_USERNAME="researcher-agent", MQTT_PASSWORD="researcher-agent-pw")
        agent.start_and_wait_available(operator)
        task = envelope("researcher-agent", cid="c-acl-approve")
        operator.publish(input_topic("researcher-agent"), task)
        approval_id = self.request_for(operator, task)["approval_id"]
        self.decide(requester, "researcher-agent", approval_id, "approve", by="mallory")
        self.decide(operator, "researcher-agent", approval_id, "deny", by="ops", reason="no")
        answer = self.assert_answered_once(operator, agent, task)
        self.assertEqual(answer["response"], "final: the call was denied by ops: no", "the requester's never arrived")

    def watcher_as(self, user: str, *topics: str) -> Watcher:
        watcher = Watcher(self.broker.port, *topics, username=user, password=f"{user}-pw")
        self.addCleanup(watcher.close)
        return watcher


class ElicitationTests(BrokerTestCase):
    """@modelcontextprotocol/server-everything's elicitation tool over stdio: the server's
    question reaches a person as an approval of kind `elicitation`, the call open meanwhile."""

    TOOL = "everything__trigger-elicitation-request"

    def setUp(self):
        super().setUp()
        self.fake = FakeOpenAI(api_key=KEY)
        self.addCleanup(self.fake.close)
        self.fake.responder = lambda body: (Reply(body["messages"][-1]["content"]) if body["messages"][-1]["role"] ==
                                            "tool" else Reply(tool_calls=[(self.TOOL, {})]))

    def test_accepted_with_content_declined_and_content_that_does_not_match(self):
        watcher = self.watcher("/control/agents/+/status", "/conversations/#", "/control/agents/+/approvals/+")
        agent = self.agent("asker", llm={"provider": "openai", "base_url": self.fake.base_url},
                           env={"OPENAI_API_KEY": KEY},
                           mcp_servers=[{"name": "everything", "command": installed("mcp-server-everything"),
                                         "args": ["stdio"], "timeout": 120}])
        agent.start_and_wait_available(watcher)
        accepted, declined = envelope("asker", cid="c-elicit-accept"), envelope("asker", cid="c-elicit-decline")
        watcher.publish(input_topic("asker"), accepted)
        request = _request(watcher, accepted)
        self.assertEqual((request["kind"], request["tool"]), ("elicitation", self.TOOL))
        self.assertEqual(request["message"], "Please provide inputs for the following fields:")
        self.assertEqual(request["schema"]["required"], ["name"])
        approval_id = request["approval_id"]
        cli = subprocess.run([sys.executable, AGENT_SCRIPT, "approvals", "approve", approval_id, "--content",
                              '{"name": "Ada", "integer": 500}', "--broker-url", self.broker.url],
                             env=base_env(), capture_output=True, text=True, timeout=60)
        self.assertEqual(cli.returncode, 2, cli.stderr)
        self.assertIn("--content does not match the schema the MCP server asked with: integer: 500 is greater than "
                      "the maximum of 100; nothing was sent", cli.stderr)
        watcher.publish(decision_topic("asker", approval_id), {"decision": "approve", "content": {"email": "no"}})
        agent.wait_log(f"approval {approval_id}: the content does not match the schema the MCP server asked for")
        self.assertEqual(watcher.matching("/conversations/c-elicit-accept/+"), [], "still waiting")
        watcher.publish(decision_topic("asker", approval_id),
                        {"decision": "approve", "by": "ada", "content": {"name": "Ada Lovelace", "check": True}})
        (answer,) = watcher.wait_for("/conversations/c-elicit-accept/+", timeout=30)
        self.assertIn("User provided the requested information", answer["response"])
        self.assertIn("- Name: Ada Lovelace", answer["response"])
        watcher.wait_for(f"/control/agents/asker/approvals/{approval_id}", lambda p: p == b"")
        watcher.publish(input_topic("asker"), declined)
        request = _request(watcher, declined)
        watcher.publish(decision_topic("asker", request["approval_id"]), {"decision": "deny", "reason": "no"})
        (answer,) = watcher.wait_for("/conversations/c-elicit-decline/+", timeout=30)
        self.assertIn("User declined to provide the requested information", answer["response"])
        agent.wait_metric("approvals.decisions.approved", 1)
        agent.wait_metric("approvals.decisions.denied", 1)


def _request(watcher, task: dict) -> dict:
    (request,) = watcher.wait_for("/control/agents/+/approvals/+",
                                  lambda p: isinstance(p, dict) and p.get("task_id") == task["task_id"], timeout=30)
    return request


class RecipeTests(ApprovalTestCase):
    def test_the_recipe_in_docs_tools_md(self):
        """docs/tools.md's configuration, as written but for the command's path, and its commands."""
        with open(os.path.join(ROOT, "docs", "tools.md")) as handle:
            text = handle.read()
        toml_text = re.search(r"<!-- recipe: approvals -->\n```toml\n(.*?)```", text, re.S).group(1)
        try:
            import tomllib
        except ImportError:  # Python < 3.11
            import tomli as tomllib
        (tool,) = tomllib.loads(toml_text)["tools"]
        self.assertEqual((tool["requires_approval"], tool["approval_timeout"]), (True, 3600))
        commands = re.search(r"<!-- runs in: test_approval_flows.RecipeTests -->\n```bash\n(.*?)```", text,
                             re.S).group(1).strip().splitlines()
        watcher = self.watcher(*self.TOPICS)
        agent = self.agent("deployer", llm={"provider": "openai", "base_url": self.fake.base_url},
                           env={"OPENAI_API_KEY": KEY}, tools=[{**tool, "command": self.script}])
        agent.start_and_wait_available(watcher)
        task = envelope("deployer", cid="c-recipe")
        watcher.publish(input_topic("deployer"), task)
        approval_id = self.request_for(watcher, task)["approval_id"]
        for command in commands:
            argv = shlex.split(command.replace("APPROVAL_ID", approval_id))
            self.assertEqual(argv[:2], ["agent2389", "approvals"])
            result = subprocess.run([sys.executable, AGENT_SCRIPT, *argv[1:], "--broker-url", self.broker.url],
                                    env=base_env(), capture_output=True, text=True, timeout=60)
            self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self.assert_answered_once(watcher, agent, task)["response"], "final: deployed")
