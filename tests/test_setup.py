"""Issue 17: setting up on stock systems and edge boxes. The quick start and CI script from a
copy of the project with Debian's python3 (PEP 668: no system-wide pip) first on PATH, the
systemd unit through `systemd-analyze verify`, and the single-file build run by an interpreter
without site-packages."""

import fcntl
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

from support import NO_USAGE, ROOT, Mosquitto, Watcher, envelope, free_port, process, wait_until

from agent2389_lib.config import AgentConfig

DEBIAN_PYTHON = "/usr/bin/python3"
STOCK_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"
UNIT = os.path.join(ROOT, "deploy", "systemd", "agent2389.service")


def project_copy() -> str:
    """The working tree as a fresh clone has it (no virtual environments, state or caches)."""
    target = os.path.join(tempfile.mkdtemp(prefix="clone-"), "agent2389")
    shutil.copytree(ROOT, target, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".venv-*", "state", "__pycache__", "*.egg-info", ".hypothesis", "*.pyz"))
    return target


# how this box reaches the package registries (a proxy, its CA): the box's, not a developer's
NETWORK_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy", "SSL_CERT_FILE",
               "SSL_CERT_DIR", "NODE_EXTRA_CA_CERTS", "PIP_CERT", "REQUESTS_CA_BUNDLE")


def stock_env(**extra: str) -> dict:
    """A login shell's environment on a stock Debian box: Debian's python3 first on PATH."""
    network = {name: os.environ[name] for name in NETWORK_ENV if name in os.environ}
    return {"PATH": STOCK_PATH, "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8", **network, **extra}


class Output:
    """A process's combined output, read on a thread, searchable while it runs."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        for line in iter(stream.readline, ""):
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)


class CiScriptTests(unittest.TestCase):
    def test_every_line_reaches_a_slow_reader_of_a_non_blocking_pipe(self):
        """Before: with its output through a pipe, about half of the side-by-side suites' lines
        were lost (`cat: write error: Resource temporarily unavailable`): a program had left the
        shared output non-blocking, and a reader that fell behind made the writes fail. Here the
        pipe is non-blocking and small from the start, read slowly, and a second suite runs side
        by side (the same interpreter twice, on the fast tests of two modules: more than the pipe holds)."""
        read_end, write_end = os.pipe()
        fcntl.fcntl(write_end, getattr(fcntl, "F_SETPIPE_SZ", 1031), 4096)  # named in Python 3.10+
        os.set_blocking(write_end, False)
        env = {**os.environ, "VIRTUAL_ENV": sys.prefix, "CI_PYTHONS": "python3 python3", "CI_TESTS": "test_pro*"}
        proc = process(self, ["bash", ".ci/run"], cwd=ROOT, env=env, stdout=write_end, stderr=subprocess.STDOUT)
        os.close(write_end)
        received = bytearray()
        time.sleep(2)  # the slow reader: behind from the start, then 12 KiB a second
        while True:
            chunk = os.read(read_end, 256)
            if not chunk:
                break
            received += chunk
            time.sleep(0.02)
        os.close(read_end)
        text = received.decode(errors="replace")
        self.assertEqual(proc.wait(60), 0, text[-3000:])
        self.assertNotIn("Resource temporarily unavailable", text)
        ran = [int(n) for n in re.findall(r"^Ran (\d+) tests? in", text, re.M)]
        self.assertEqual(len(ran), 2, text[-3000:])
        self.assertGreater(ran[0], 20)
        self.assertEqual(len(re.findall(r"(?:\.\.\. |^)ok$", text, re.M)), 2 * ran[0], "every test's result, twice")
        self.assertRegex(text, rf"(?m)^{2 * ran[0]} passed, 0 failed, 0 skipped$")


class StockDebianTests(unittest.TestCase):
    def test_quickstart_creates_a_venv_and_says_what_next(self):
        clone = project_copy()
        port, health = free_port(), free_port()
        proc = process(self, ["./scripts/quickstart.sh"], cwd=clone, env=stock_env(
            MQTT_PORT=str(port), HEALTH_PORT=str(health)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output = Output(proc)
        wait_until(lambda: "agent my-agent is available" in output.text or proc.poll() is not None, 300,
                   "the quick start's agent to be available")
        text = output.text
        stop = re.search(r"it keeps running after the agent stops: stop it with kill \$\(cat (\S+)/mosquitto.pid\)$",
                         text, re.M)
        self.assertIsNotNone(stop, text)
        broker_dir = os.path.join(clone, stop.group(1))  # state/mosquitto, or its own directory as root
        self.addCleanup(lambda: os.kill(int(pathlib.Path(broker_dir, "mosquitto.pid").read_text()), signal.SIGTERM))
        self.assertIn("agent my-agent is available", text)
        self.assertIn(f"creating the virtual environment .venv with {DEBIAN_PYTHON}", text)
        self.assertIn(f"health and metrics on http://127.0.0.1:{health}/", text)
        (hint,) = [line.strip() for line in text.splitlines() if "agent2389 inject" in line]
        self.assertEqual(hint, f". .venv/bin/activate && agent2389 inject --agent-id my-agent --message hi --wait "
                               f"--broker-url mqtt://127.0.0.1:{port}")
        answer = subprocess.run(["bash", "-c", hint], cwd=clone, env=stock_env(), capture_output=True, text=True,
                                timeout=60)  # the next command, as printed
        self.assertEqual(answer.returncode, 0, answer.stderr)
        self.assertIn("hi", answer.stdout)
        with open(os.path.join(broker_dir, "mosquitto.log")) as handle:
            self.assertNotIn("should not be run as root", handle.read())
        self.run_readme_recipes(clone, port)
        proc.send_signal(signal.SIGTERM)
        self.assertEqual(proc.wait(30), 0)

    def test_quickstart_refuses_a_listener_that_is_not_an_mqtt_broker(self):
        """Before: it took any listener on its port for its broker; the agent found out 10 s later."""
        silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
        self.addCleanup(silent.close)
        port = silent.getsockname()[1]
        result = subprocess.run(["./scripts/quickstart.sh"], cwd=project_copy(), env=stock_env(MQTT_PORT=str(port)),
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        self.assertIn(f"something listens on 127.0.0.1:{port} but does not answer as an MQTT broker", result.stderr)
        self.assertNotIn("creating the virtual environment", result.stdout + result.stderr)

    def test_every_command_block_in_the_docs_runs_in_a_test_or_says_where_it_runs(self):
        """A block a reader copies must work as written: a README recipe runs verbatim in the setup
        test, a `runs in:` block names the test that runs it, an `example:` block says what other
        machine it needs. Before: `--config agent.toml` (a clone has none), `pip install
        'agent2389[otel]'` (not on PyPI)."""
        documents = [os.path.join(ROOT, "README.md")] + sorted(
            os.path.join(ROOT, "docs", name) for name in os.listdir(os.path.join(ROOT, "docs")) if name.endswith(".md"))
        for path in documents:
            with open(path) as handle:
                text = handle.read()
            for match in re.finditer(r"(?m)^```(?:bash|sh|console|shell)\n(.*?)^```", text, re.S):
                with self.subTest(document=os.path.basename(path), block=match.group(1)[:60]):
                    before = text[:match.start()].rstrip().rsplit("\n", 1)[-1]
                    self.assertRegex(before, r"^<!-- (recipe: \S+|runs in: .+|example: .+) -->$")
                    self.assertNotRegex(match.group(1), r"--config agent\.toml\b(?!\.example)|pip install '?agent2389\[")

    def test_a_missing_config_file_names_the_example(self):
        clone = project_copy()
        result = subprocess.run([sys.executable, "agent2389.py", "check-config", "--config", "agent.toml"], cwd=clone,
                                capture_output=True, text=True, timeout=30)
        self.assertEqual(result.returncode, 2)
        self.assertIn("config file agent.toml does not exist; start from the example: cp agent.toml.example "
                      "agent.toml", result.stderr)

    def run_readme_recipes(self, clone: str, port: int) -> None:
        """The README's first-task and pipeline recipes, verbatim but for the ports a test must
        pick itself (the broker's comes from MQTT_PORT, as a user's would from the quick start's)."""
        with open(os.path.join(clone, "README.md")) as handle:
            recipes = dict(re.findall(r"<!-- recipe: (\S+) -->\n```bash\n(.*?)```", handle.read(), re.S))
        self.assertEqual(sorted(recipes), ["inject", "mcp", "monitor", "mosquitto", "pipeline"])
        env = stock_env(MQTT_PORT=str(port))

        def bash(script: str, timeout: float = 90) -> subprocess.CompletedProcess:
            return subprocess.run(["bash", "-c", script], cwd=clone, env=env, capture_output=True, text=True,
                                  timeout=timeout)

        monitor = process(self, ["bash", "-c", recipes["monitor"]], cwd=clone, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, killpg=True)
        watched = Output(monitor)
        wait_until(lambda: "monitoring " in watched.text, 30, "the monitor to subscribe")
        injected = bash(recipes["inject"])
        self.assertEqual(injected.returncode, 0, injected.stderr)
        self.assertIn("hello", injected.stdout)
        self.assertIn("published task", injected.stderr)
        wait_until(lambda: "RESPONSE /conversations/" in watched.text, 30, "the monitor to show the answer")
        raw = bash(recipes["mosquitto"].replace("mosquitto_rr ", f"mosquitto_rr -p {port} "), timeout=60)
        self.assertEqual(raw.returncode, 0, raw.stderr)
        self.assertIn('"response":"Say hello', raw.stdout)
        script = recipes["pipeline"]
        for fixed in ("8081", "8082", "8083"):
            script = script.replace(fixed, str(free_port()))
        pipeline = bash(script, timeout=120)
        self.assertEqual(pipeline.returncode, 0, pipeline.stderr[-3000:])
        self.assertTrue(pipeline.stdout.startswith("Edit the article"), pipeline.stdout)
        for agent in ("researcher", "writer", "editor"):
            self.assertTrue(os.listdir(os.path.join(clone, "state", agent)), agent)  # each its own state_dir
        mcp = bash(recipes["mcp"], timeout=300)  # installs mcp-server-time from PyPI, as a user would
        self.assertEqual(mcp.returncode, 0, mcp.stderr[-3000:])
        self.assertRegex(mcp.stdout, r"(?m)^time__get_current_time +mcp:time \(stdio\) +Get current time")
        self.assertEqual(json.loads(mcp.stdout[mcp.stdout.index("{"):])["timezone"], "Europe/Paris")

    def test_ci_script_creates_a_venv(self):
        clone = project_copy()
        result = subprocess.run(["bash", ".ci/run"], cwd=clone, env=stock_env(
            CI_PYTHONS="python3", CI_TESTS="test_protocol.BuilderTests"), capture_output=True, text=True, timeout=600)
        self.assertEqual(result.returncode, 0, result.stdout[-3000:] + result.stderr[-3000:])
        lines = result.stdout.strip().splitlines()
        self.assertRegex(lines[-1], r"^[1-9]\d* passed, 0 failed, 0 skipped$")
        self.assertRegex(lines[-2], r"^python 3\.\d+\.\d+: [1-9]\d* passed, 0 failed, 0 skipped in \d+ s$")
        with open(os.path.join(clone, ".venv", "pyvenv.cfg")) as handle:
            self.assertIn("home = /usr/bin", handle.read())


class SystemdUnitTests(unittest.TestCase):
    def unit(self) -> dict:
        values: dict = {}
        with open(UNIT) as handle:
            for line in handle:
                if "=" in line and not line.startswith(("#", "[")):
                    key, _, value = line.strip().partition("=")
                    values.setdefault(key, []).append(value)
        return values

    def test_systemd_analyze_verify_accepts_it(self):
        root = tempfile.mkdtemp(prefix="sysroot-")
        shutil.copytree("/usr/lib/systemd/system", os.path.join(root, "usr/lib/systemd/system"), symlinks=True)
        os.makedirs(os.path.join(root, "etc/systemd/system"))
        shutil.copy(UNIT, os.path.join(root, "etc/systemd/system"))
        executable = os.path.join(root, self.unit()["ExecStart"][0].split()[0].lstrip("/"))
        os.makedirs(os.path.dirname(executable))
        with open(executable, "w") as handle:
            handle.write("#!/bin/sh\n")
        os.chmod(executable, 0o755)
        result = subprocess.run(["systemd-analyze", "verify", f"--root={root}", "agent2389.service"],
                                capture_output=True, text=True, timeout=60)
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))  # warnings count as failures

    def test_hardened_and_patient(self):
        unit = self.unit()
        for key, value in (("DynamicUser", "yes"), ("ProtectSystem", "strict"), ("NoNewPrivileges", "yes"),
                           ("StateDirectory", "agent2389"), ("Restart", "on-failure"), ("ProtectHome", "yes")):
            self.assertEqual(unit.get(key), [value], key)
        self.assertGreater(int(unit["TimeoutStopSec"][0]), AgentConfig("x").shutdown_grace)
        self.assertIn("STATE_DIR=%S/agent2389", unit["Environment"])


class SingleFileTests(unittest.TestCase):
    def test_pyz_runs_without_site_packages(self):
        out = os.path.join(tempfile.mkdtemp(prefix="pyz-"), "agent2389.pyz")
        build = subprocess.run([sys.executable, "-m", "agent2389_lib.build_pyz", "-o", out], cwd=ROOT,
                               capture_output=True, text=True, timeout=300)
        self.assertEqual(build.returncode, 0, build.stderr[-3000:])
        broker = Mosquitto().start()
        self.addCleanup(broker.cleanup)
        config = os.path.join(os.path.dirname(out), "agent.toml")
        with open(config, "w") as handle:  # a command tool with a schema: jsonschema works from the archive too
            handle.write(f'agent_id = "boxed"\n[mqtt]\nbroker_url = "{broker.url}"\n[llm]\nprovider = "echo"\n'
                         '[[tools]]\nname = "say"\ncommand = "echo"\nargs = ["{text}"]\n'
                         'schema = { type = "object", properties = { text = { type = "string" } }, required = ["text"] }\n')
        watcher = Watcher(broker.port, "/control/agents/boxed/status", "/conversations/#")
        self.addCleanup(watcher.close)
        agent = process(self, [sys.executable, "-I", "-S", out, "run", "--config", config], cwd="/",
                        env={"PATH": STOCK_PATH, "HEALTH_PORT": str(free_port())},
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output = Output(agent)
        watcher.wait_for("/control/agents/boxed/status", lambda p: p.get("status") == "available", timeout=30)
        task = envelope("boxed", cid="pyz", input={"tool_request": {"name": "say", "parameters": {"text": "from a zip"}}})
        watcher.publish("/control/agents/boxed/input", task)
        (answer,) = watcher.wait_for("/conversations/pyz/boxed")
        self.assertEqual(answer, {"response": "from a zip\n", "task_id": task["task_id"], "usage": NO_USAGE})
        agent.send_signal(signal.SIGTERM)
        self.assertEqual(agent.wait(30), 0, output.text[-2000:])
        self.assertFalse(re.search(r"Traceback", output.text), output.text[-2000:])


if __name__ == "__main__":
    unittest.main()
