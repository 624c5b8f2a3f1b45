import json
import os
import subprocess
import sys
import tempfile
import unittest

from support import AGENT_SCRIPT, ROOT, base_env

SECRET_KEY = "sk-cli-test-secret-value-0001"
SECRET_PASSWORD = "mqtt-cli-password-0002"


def cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, AGENT_SCRIPT, *args], env=base_env(**(env or {})),
                          cwd=cwd or tempfile.mkdtemp(), capture_output=True, text=True, timeout=60)


class CheckConfigTests(unittest.TestCase):
    def test_example_config_needs_no_environment(self):
        result = cli("check-config", "--config", os.path.join(ROOT, "agent.toml.example"))
        self.assertEqual(result.returncode, 0, result.stderr)
        view = json.loads(result.stdout)
        self.assertEqual((view["agent_id"], view["llm"]["provider"]), ("my-agent", "echo"))
        self.assertEqual(result.stderr, "")

    def test_secrets_never_printed(self):
        result = cli("check-config", env={"AGENT_ID": "abc", "OPENAI_API_KEY": SECRET_KEY,
                                          "MQTT_USERNAME": "user", "MQTT_PASSWORD": SECRET_PASSWORD})
        self.assertEqual(result.returncode, 0, result.stderr)
        for secret in (SECRET_KEY, SECRET_PASSWORD):
            self.assertNotIn(secret, result.stdout + result.stderr)
        view = json.loads(result.stdout)
        self.assertEqual((view["llm"]["api_key"], view["mqtt"]["password"]), ("********", "********"))

    def test_all_problems_and_exit_2(self):
        result = cli("check-config", env={"AGENT_ID": "x", "MAX_PIPELINE_DEPTH": "64", "TASK_TIMEOUT": "5",
                                          "OPENAI_API_KEY": "wrong-" + SECRET_KEY})
        self.assertEqual(result.returncode, 2)
        lines = result.stderr.strip().splitlines()
        self.assertEqual(len(lines), 4, lines)
        self.assertIn("config error: MAX_PIPELINE_DEPTH=64 is out of range (1-32)", lines)
        self.assertNotIn(SECRET_KEY, result.stderr)

    def test_unknown_key_warning_names_key(self):
        path = os.path.join(tempfile.mkdtemp(), "a.toml")
        with open(path, "w") as handle:
            handle.write('agent_id = "abc"\nmax_pipline_depth = 3\n[llm]\nprovider = "echo"\n')
        result = cli("check-config", "--config", path)
        self.assertEqual(result.returncode, 0)
        self.assertIn("config warning: unknown key max_pipline_depth is ignored (did you mean max_pipeline_depth?)",
                      result.stderr)

    def test_missing_key_warns_in_check_and_fails_run(self):
        env = {"AGENT_ID": "abc"}
        path = os.path.join(tempfile.mkdtemp(), "a.toml")
        with open(path, "w") as handle:
            handle.write('[llm]\nprovider = "openai"\n')
        checked = cli("check-config", "--config", path, env=env)
        self.assertEqual(checked.returncode, 0)
        self.assertIn("OPENAI_API_KEY is not set", checked.stderr)
        ran = cli("run", "--config", path, env=env)
        self.assertEqual(ran.returncode, 2)
        self.assertIn("config error: OPENAI_API_KEY is not set", ran.stderr)

    def test_run_with_bad_config_exits_2(self):
        result = cli("run", env={"AGENT_ID": "abc", "LOG_LEVEL": "LOUD", "OPENAI_API_KEY": SECRET_KEY})
        self.assertEqual(result.returncode, 2)
        self.assertIn("config error: LOG_LEVEL=LOUD", result.stderr)


class MiscTests(unittest.TestCase):
    def test_version(self):
        result = cli("version")
        self.assertEqual((result.returncode, result.stdout.strip()), (0, "agent2389 0.1.0"))

    def test_help_has_examples(self):
        for command in ("run", "check-config"):
            result = cli(command, "--help")
            self.assertEqual(result.returncode, 0)
            self.assertIn("example:", result.stdout)


if __name__ == "__main__":
    unittest.main()
