"""The A2A gateway (docs/gateway.md) with the official a2a-sdk Python client, and the official
JavaScript SDK, against real agents on a real mosquitto: cards, send, stream, get, cancel,
failures, an approval answered through input-required, a gateway restart, retries, bad tokens,
bad JSON-RPC, oversized bodies, TLS."""

import importlib.util
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import sysconfig
import tempfile
import threading
import urllib.error
import urllib.request
import uuid

from fake_llm import FakeOpenAI, Reply, Status
from support import AGENT_SCRIPT, HERE, ROOT, BrokerTestCase, base_env, free_port, installed, wait_until
from test_approval_flows import calls_deploy
from test_security import Certificates

KEY = "sk-test-key-0123456789"


def a2a_python() -> str:
    """An interpreter with the a2a-sdk: this one, or under Python 3.9 (which the SDK does not
    support) the `python-a2a` that .ci/run links into this environment from a newer one."""
    return sys.executable if importlib.util.find_spec("a2a") is not None else installed("python-a2a")


class GatewayProcess:
    """`agent2389 gateway` as a subprocess, on a free port of its own."""

    def __init__(self, case, broker, *args: str, state=None, scheme="http"):
        self.port = free_port()
        self.state = state or os.path.join(tempfile.mkdtemp(prefix="gateway-"), "tasks.sqlite3")
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.argv = [sys.executable, AGENT_SCRIPT, "gateway", "--listen", f"127.0.0.1:{self.port}", "--broker-url",
                     broker.url, "--state", self.state, *args]
        self.log_path = self.state + ".log"
        self.proc = None
        case.addCleanup(self.stop)

    def start(self) -> "GatewayProcess":
        with open(self.log_path, "ab") as log:  # the process writes it; this one only reads it
            self.proc = subprocess.Popen(self.argv, env=base_env(LOG_LEVEL="DEBUG"), stdout=log,
                                         stderr=subprocess.STDOUT)
        wait_until(lambda: "A2A gateway on" in self.log(), 20, "the gateway to serve")
        return self

    def log(self) -> str:
        with open(self.log_path, errors="replace") as handle:
            return handle.read()

    def stop(self, signum=signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)
            self.proc.wait(20)

    def agent_url(self, agent_id: str) -> str:
        return f"{self.url}/agents/{agent_id}"

    def post(self, path: str, body: bytes, headers=None) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, data=body, method="POST",
                                         headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def get(self, path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")


def sdk(spec: dict) -> list:
    """What the a2a-sdk client said, one object a line."""
    result = subprocess.run([a2a_python(), os.path.join(HERE, "a2a_client.py")], input=json.dumps(spec),
                            capture_output=True, text=True, timeout=120)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    if not lines:
        raise AssertionError(f"the a2a client said nothing: {result.stderr[-2000:]}")
    return lines


def sdk_stream(spec: dict) -> tuple[subprocess.Popen, list, threading.Event]:
    """A streaming call running in the background: its events as they come."""
    proc = subprocess.Popen([a2a_python(), os.path.join(HERE, "a2a_client.py")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    proc.stdin.write(json.dumps(spec))
    proc.stdin.close()
    events, ended = [], threading.Event()

    def read():
        with proc.stdout:
            for line in proc.stdout:
                if line.strip():
                    events.append(json.loads(line))
        ended.set()
    threading.Thread(target=read, daemon=True).start()
    return proc, events, ended


def state_of(event: dict) -> str:
    if "task" in event:
        return event["task"]["status"]["state"]
    if "statusUpdate" in event:
        return event["statusUpdate"]["status"]["state"]
    return "artifact" if "artifactUpdate" in event else next(iter(event))


class GatewayTestCase(BrokerTestCase):
    def gateway(self, *args, **kwargs) -> GatewayProcess:
        return GatewayProcess(self, self.broker, *args, **kwargs).start()

    def echo_agent(self, agent_id: str, **llm):
        return self.agent(agent_id, llm={"provider": "echo", **llm}, agent={"capabilities": ["echoing", "testing"]})

    def running(self, agent, watcher=None):
        watcher = watcher or self.watcher("/control/agents/+/status")
        agent.start_and_wait_available(watcher)
        return agent


class SendTests(GatewayTestCase):
    def test_cards_send_stream_and_get(self):
        self.running(self.echo_agent("gw-echo"))
        gateway = self.gateway()
        wait_until(lambda: gateway.get("/agents/gw-echo/.well-known/agent-card.json")[0] == 200, 15, "the card")
        (card,) = sdk({"op": "card", "url": gateway.agent_url("gw-echo")})
        self.assertEqual((card["name"], card["supportedInterfaces"][0]["url"], card["capabilities"]["streaming"]),
                         ("gw-echo", gateway.agent_url("gw-echo"), True))
        self.assertEqual(sorted(skill["id"] for skill in card["skills"]), ["echoing", "testing"])
        (own,) = sdk({"op": "card", "url": gateway.url})
        self.assertEqual([skill["id"] for skill in own["skills"]], ["gw-echo"])
        self.assertEqual(gateway.get("/agents/nobody/.well-known/agent-card.json")[0], 404)

        (sent,) = sdk({"op": "send", "url": gateway.agent_url("gw-echo"), "text": "hello gateway",
                       "message_id": "m-send", "data": {"n": 1}})
        task = sent["task"]
        self.assertEqual(task["status"]["state"], "TASK_STATE_COMPLETED")
        self.assertEqual(task["artifacts"][0]["parts"][0]["text"].split("\n")[0], "hello gateway")
        self.assertEqual(task["history"][0]["messageId"], "m-send")

        events = sdk({"op": "send", "url": gateway.agent_url("gw-echo"), "text": "hello stream", "stream": True,
                      "message_id": "m-stream", "context_id": "ctx-1"})
        states = [state_of(event) for event in events]
        self.assertEqual(states[0], "TASK_STATE_SUBMITTED")
        self.assertIn("TASK_STATE_WORKING", states)
        self.assertEqual(states[-2:], ["artifact", "TASK_STATE_COMPLETED"], "the answer, then the end")
        self.assertEqual(events[-2]["artifactUpdate"]["artifact"]["parts"][0]["text"], "hello stream")
        streamed = events[0]["task"]["id"]
        self.assertTrue(all(event.get("statusUpdate", event.get("artifactUpdate", {"taskId": streamed}))["taskId"]
                            == streamed for event in events[1:]))

        (got,) = sdk({"op": "get", "url": gateway.agent_url("gw-echo"), "task_id": streamed})
        self.assertEqual((got["status"]["state"], got["contextId"], got["artifacts"][0]["parts"][0]["text"]),
                         ("TASK_STATE_COMPLETED", "ctx-1", "hello stream"))
        for length, kept in (("lots", 1), (0, 0), (True, 1)):  # anything but a count is all of it
            _, raw = gateway.post("/agents/gw-echo", json.dumps({"jsonrpc": "2.0", "id": 7, "method": "GetTask",
                                  "params": {"id": streamed, "historyLength": length}}).encode())
            self.assertEqual(len(raw["result"].get("history", [])), kept, length)
        (missing,) = sdk({"op": "get", "url": gateway.agent_url("gw-echo"), "task_id": str(uuid.uuid4())})
        self.assertEqual(missing["error"]["type"], "TaskNotFoundError")

    def test_a_send_waits_for_an_answer_longer_than_a_request_may_take_to_arrive(self):
        """The HTTP server cuts off a request still arriving after 10 s (slow clients); a send
        waiting for its agent is past that. Before: the connection was closed after 10 s."""
        self.running(self.echo_agent("gw-patient", latency_ms=11000))
        gateway = self.gateway()
        wait_until(lambda: gateway.get("/agents/gw-patient/.well-known/agent-card.json")[0] == 200, 15, "the card")
        (sent,) = sdk({"op": "send", "url": gateway.agent_url("gw-patient"), "text": "take your time",
                       "message_id": "m-patient"})
        self.assertEqual(sent["task"]["status"]["state"], "TASK_STATE_COMPLETED")

    def test_a_retried_message_id_is_published_once(self):
        watcher = self.watcher("/control/agents/+/status", "/control/agents/gw-once/input")
        self.running(self.echo_agent("gw-once"), watcher)
        gateway = self.gateway()
        wait_until(lambda: gateway.get("/agents/gw-once/.well-known/agent-card.json")[0] == 200, 15, "the card")
        tasks = [sdk({"op": "send", "url": gateway.agent_url("gw-once"), "text": "once", "message_id": "m-retry"})[0]
                 for _ in range(3)]
        self.assertEqual(len({t["task"]["id"] for t in tasks}), 1)
        self.assertEqual(len(watcher.matching("/control/agents/gw-once/input")), 1, "published once")

    def test_a_failed_task_and_an_agent_that_is_not_there(self):
        fake = FakeOpenAI(api_key=KEY)
        self.addCleanup(fake.close)
        fake.script = [Status(500)]
        self.running(self.agent("gw-failing", llm={"provider": "openai", "base_url": fake.base_url,
                                                   "max_attempts": 1}, env={"OPENAI_API_KEY": KEY}))
        gateway = self.gateway()
        wait_until(lambda: gateway.get("/agents/gw-failing/.well-known/agent-card.json")[0] == 200, 15, "the card")
        (sent,) = sdk({"op": "send", "url": gateway.agent_url("gw-failing"), "text": "fail", "message_id": "m-fail"})
        status = sent["task"]["status"]
        self.assertEqual(status["state"], "TASK_STATE_FAILED")
        self.assertTrue(status["message"]["parts"][0]["text"].startswith("llm_error: "))
        (refused,) = sdk({"op": "send", "url": gateway.agent_url("gw-failing"), "text": "too much",
                          "message_id": "m-big", "data": {"blob": "x" * 300000}})  # over the agent's 256 KiB
        self.assertEqual(refused["task"]["status"]["state"], "TASK_STATE_REJECTED")
        self.assertIn("invalid_input: message of", refused["task"]["status"]["message"]["parts"][0]["text"])
        code, body = gateway.post("/agents/nobody", json.dumps({"jsonrpc": "2.0", "id": 1, "method": "SendMessage",
                                  "params": {"message": {"messageId": "x", "role": "ROLE_USER",
                                                         "parts": [{"text": "hi"}]}}}).encode())
        self.assertEqual((code, body["error"]["code"]), (200, -32001))
        self.assertIn("agent nobody is not available", body["error"]["message"])


class CancelTests(GatewayTestCase):
    def test_cancel_a_running_task(self):
        agent = self.running(self.echo_agent("gw-slow", latency_ms=60000))
        gateway = self.gateway()
        wait_until(lambda: gateway.get("/agents/gw-slow/.well-known/agent-card.json")[0] == 200, 15, "the card")
        proc, events, ended = sdk_stream({"op": "send", "url": gateway.agent_url("gw-slow"), "text": "slow",
                                          "stream": True, "message_id": "m-slow"})
        self.addCleanup(proc.wait, 10)
        self.addCleanup(proc.kill)
        wait_until(lambda: "TASK_STATE_WORKING" in map(state_of, list(events)), 20, "the agent working")
        task_id = events[0]["task"]["id"]
        watching, seen, watched = sdk_stream({"op": "subscribe", "url": gateway.agent_url("gw-slow"),
                                              "task_id": task_id, "stream": True})
        self.addCleanup(watching.wait, 10)
        self.addCleanup(watching.kill)
        wait_until(lambda: seen, 20, "the subscriber to get the task")
        (canceled,) = sdk({"op": "cancel", "url": gateway.agent_url("gw-slow"), "task_id": task_id})
        self.assertEqual(canceled["status"]["state"], "TASK_STATE_CANCELED")
        self.assertTrue(ended.wait(20) and watched.wait(20), "both streams ended")
        self.assertEqual((state_of(events[-1]), state_of(seen[-1])), ("TASK_STATE_CANCELED", "TASK_STATE_CANCELED"))
        agent.wait_log(f"cancel for task {task_id}")
        (again,) = sdk({"op": "cancel", "url": gateway.agent_url("gw-slow"), "task_id": task_id})
        self.assertEqual(again["error"]["type"], "TaskNotCancelableError")


class ApprovalTests(GatewayTestCase):
    def test_an_approval_answered_through_input_required(self):
        fake = FakeOpenAI(api_key=KEY)
        self.addCleanup(fake.close)
        fake.responder = calls_deploy
        script = os.path.join(tempfile.mkdtemp(prefix="gw-deploy-"), "deploy")
        with open(script, "w") as handle:
            handle.write("#!/bin/sh\nprintf deployed\n")
        os.chmod(script, 0o755)
        self.running(self.agent("gw-deployer", llm={"provider": "openai", "base_url": fake.base_url},
                                env={"OPENAI_API_KEY": KEY},
                                tools=[{"name": "deploy", "command": script, "requires_approval": True}]))
        gateway = self.gateway()
        wait_until(lambda: gateway.get("/agents/gw-deployer/.well-known/agent-card.json")[0] == 200, 15, "the card")
        (sent,) = sdk({"op": "send", "url": gateway.agent_url("gw-deployer"), "text": "ship it", "message_id": "m-d"})
        task = sent["task"]
        self.assertEqual(task["status"]["state"], "TASK_STATE_INPUT_REQUIRED")
        asked = task["status"]["message"]["parts"]
        self.assertIn("deploy needs approval", asked[0]["text"])
        self.assertEqual(asked[1]["data"]["arguments"], {"target": "prod", "api_key": "[REDACTED]"})
        (answered,) = sdk({"op": "send", "url": gateway.agent_url("gw-deployer"), "text": "approve looks right",
                           "message_id": "m-d2", "task_id": task["id"], "context_id": task["contextId"]})
        self.assertEqual(answered["task"]["status"]["state"], "TASK_STATE_COMPLETED")
        self.assertEqual(answered["task"]["artifacts"][0]["parts"][0]["text"], "final: deployed")


class RestartTests(GatewayTestCase):
    def test_a_gateway_restarted_between_send_and_answer(self):
        self.running(self.echo_agent("gw-later", latency_ms=3000))
        gateway = self.gateway()
        wait_until(lambda: gateway.get("/agents/gw-later/.well-known/agent-card.json")[0] == 200, 15, "the card")
        (sent,) = sdk({"op": "send", "url": gateway.agent_url("gw-later"), "text": "later", "message_id": "m-later",
                       "polling": True})
        task_id = sent["task"]["id"]
        self.assertIn(sent["task"]["status"]["state"], ("TASK_STATE_SUBMITTED", "TASK_STATE_WORKING"))
        gateway.stop(signal.SIGKILL)
        again = GatewayProcess(self, self.broker, state=gateway.state).start()
        wait_until(lambda: sdk({"op": "get", "url": again.agent_url("gw-later"), "task_id": task_id})[0]
                   .get("status", {}).get("state") == "TASK_STATE_COMPLETED", 30, "the answer, after the restart",
                   interval=0.5)
        (got,) = sdk({"op": "get", "url": again.agent_url("gw-later"), "task_id": task_id})
        self.assertEqual(got["artifacts"][0]["parts"][0]["text"], "later")


class SecurityTests(GatewayTestCase):
    def test_tokens_bad_json_rpc_and_oversized_bodies(self):
        self.running(self.echo_agent("gw-guarded"))
        tokens = os.path.join(tempfile.mkdtemp(prefix="gw-tokens-"), "tokens")
        with open(tokens, "w") as handle:
            handle.write("# the operators' clients\ntoken-one-S3CRET\ntoken-two-S3CRET\n")
        gateway = self.gateway("--auth-token-file", tokens)
        wait_until(lambda: gateway.get("/agents/gw-guarded/.well-known/agent-card.json")[0] == 200, 15, "the card")
        card = gateway.get("/agents/gw-guarded/.well-known/agent-card.json")[1]
        self.assertEqual(card["securitySchemes"]["bearer"]["httpAuthSecurityScheme"]["scheme"], "Bearer")
        for token in (None, "wrong"):
            (refused,) = sdk({"op": "send", "url": gateway.agent_url("gw-guarded"), "text": "hi", "message_id": "m-x",
                              "token": token})
            self.assertIn("401", refused["error"]["message"])
        (sent,) = sdk({"op": "send", "url": gateway.agent_url("gw-guarded"), "text": "hi", "message_id": "m-ok",
                       "token": "token-two-S3CRET"})
        self.assertEqual(sent["task"]["status"]["state"], "TASK_STATE_COMPLETED")

        auth = {"Authorization": "Bearer token-one-S3CRET"}
        for body, code in ((b"{", -32700), (b"[]", -32600), (b'{"jsonrpc": "2.0", "id": 1}', -32600),
                           (b'{"jsonrpc": "2.0", "id": 1, "method": "Nope"}', -32601),
                           (b'{"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {}}', -32602),
                           (b'{"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": "nope"}}', -32001)):
            with self.subTest(body=body):
                status, answer = gateway.post("/agents/gw-guarded", body, auth)
                self.assertEqual((status, answer["error"]["code"]), (200, code))
        # refused unread: the headers alone get the 413 (a client still sending 2 MiB may find the
        # connection closed under it, as on 3.9 in CI)
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
            sock.sendall(b"POST /agents/gw-guarded HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer "
                         b"token-one-S3CRET\r\nContent-Type: application/json\r\nContent-Length: 2097152\r\n\r\n")
            self.assertTrue(sock.recv(100).startswith(b"HTTP/1.1 413 "))
        status, _ = gateway.post("/agents/gw-guarded", b'{"jsonrpc": "2.0", "id": 1, "method": "GetTask"}',
                                 {**auth, "A2A-Version": "0.2"})
        self.assertNotIn("S3CRET", gateway.log())
        self.assertEqual(gateway.proc.poll(), None)

    def test_tls_and_health(self):
        certs = Certificates()
        self.running(self.echo_agent("gw-tls"))
        gateway = GatewayProcess(self, self.broker, "--tls-cert", certs.path("server.crt"), "--tls-key",
                                 certs.path("server.key"), scheme="https").start()
        context = ssl.create_default_context(cafile=certs.path("ca.crt"))

        def card():
            try:
                with urllib.request.urlopen(gateway.url + "/.well-known/agent-card.json", context=context,
                                            timeout=10) as response:
                    return json.loads(response.read())
            except OSError:
                return None
        wait_until(lambda: (card() or {}).get("skills"), 15, "the card over HTTPS")
        self.assertEqual(card()["supportedInterfaces"][0]["url"], gateway.url + "/")
        with urllib.request.urlopen(gateway.url + "/ready", context=context, timeout=10) as response:
            self.assertEqual(json.loads(response.read())["status"], "ready")
        with urllib.request.urlopen(gateway.url + "/metrics", context=context, timeout=10) as response:
            self.assertIn("mqtt", json.loads(response.read()))


class JavaScriptClientTests(GatewayTestCase):
    """@a2a-js/sdk, the official JavaScript SDK from npm: a client nobody here wrote."""

    def test_the_javascript_sdk_sends_and_streams(self):
        self.running(self.echo_agent("gw-js"))
        gateway = self.gateway()
        wait_until(lambda: gateway.get("/agents/gw-js/.well-known/agent-card.json")[0] == 200, 15, "the card")
        result = subprocess.run([installed("node-a2a"), os.path.join(HERE, "a2a_js_client.cjs"),
                                 gateway.agent_url("gw-js") + "/"],  # the SDK resolves the card's path against it
                                capture_output=True, text=True, timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr)
        said = json.loads(result.stdout)
        self.assertEqual((said["sent"]["status"]["state"], said["sent"]["answer"]),
                         ("TASK_STATE_COMPLETED", "hello from javascript"))
        self.assertEqual(said["streamed"][0], "TASK_STATE_SUBMITTED")
        self.assertEqual(said["streamed"][-2:], ["artifactUpdate", "TASK_STATE_COMPLETED"])


class RecipeTests(GatewayTestCase):
    def test_the_recipe_in_docs_gateway_md(self):
        """docs/gateway.md's commands, as written but for the port a test must pick itself."""
        with open(os.path.join(ROOT, "docs", "gateway.md")) as handle:
            block = re.search(r"<!-- recipe: gateway -->\n```bash\n(.*?)```", handle.read(), re.S).group(1)
        self.running(self.echo_agent("researcher-agent"))
        port, workdir = free_port(), tempfile.mkdtemp(prefix="gw-recipe-")
        env = base_env(MQTT_HOST="127.0.0.1", MQTT_PORT=str(self.broker.port),
                       PATH=sysconfig.get_path("scripts") + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"))
        said = []
        for line in block.replace("8389", str(port)).strip().splitlines():
            if line.endswith("&"):
                served = subprocess.Popen(["bash", "-c", line[:-1]], cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL)
                self.addCleanup(served.wait, 20)
                self.addCleanup(served.terminate)
                wait_until(lambda: "researcher-agent" in _fetch(f"http://127.0.0.1:{port}/.well-known/agent-card.json"),
                           20, "the gateway serving the agent")
                continue
            result = subprocess.run(["bash", "-c", line], cwd=workdir, env=env, capture_output=True, text=True,
                                    timeout=60)
            self.assertEqual(result.returncode, 0, result.stderr)
            said.append(result.stdout)
        card, answer = json.loads(said[-2]), json.loads(said[-1])
        self.assertEqual([skill["id"] for skill in card["skills"]], ["researcher-agent"])
        self.assertEqual(answer["result"]["task"]["status"]["state"], "TASK_STATE_COMPLETED")
        self.assertEqual(answer["result"]["task"]["artifacts"][0]["parts"][0]["text"], "Summarise MQTT in one line")


def _fetch(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()
    except OSError:
        return ""

