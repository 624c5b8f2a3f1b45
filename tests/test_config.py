import dataclasses
import glob
import os
import tempfile
import textwrap
import unittest

from agent2389_lib.config import (AgentConfig, BudgetSettings, ConfigError, MqttSettings, Secret, load_config,
                                  masked_view)

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
OPENAI_KEY = "sk-test-openai-0123456789abcdef"
ANTHROPIC_KEY = "sk-ant-test-0123456789abcdef"

LAYOUT_A = """
[agent]
id = "researcher"
description = "Research agent"
capabilities = ["research", "web"]

[mqtt]
broker_url = "mqtts://broker.example.com:8883"
username_env = "MQTT_USERNAME"
password_env = "MQTT_PASSWORD"
heartbeat_interval_secs = 900

[llm]
provider = "openai"
model = "gpt-4o"
api_key_env = "OPENAI_API_KEY"
system_prompt = "You are a researcher."
temperature = 0.3
max_tokens = 4000

[budget]
max_tool_calls = 25
max_iterations = 12

[tools]
web_search = "builtin"
http_request = { impl = "builtin", config = { max_response_size = 1048576 } }
lister = { impl = "external", command = "ls", args = ["-1", "{path}"], timeout = 5, schema = { type = "object", properties = { path = { type = "string" } } } }

[routing]
strategy = "llm"
max_iterations = 10

[routing.llm]
provider = "openai"
model = "gpt-4o-mini"
temperature = 0.1
"""


class ConfigCase(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="cfg-")

    def write(self, text, name="agent.toml"):
        path = os.path.join(self.dir, name)
        with open(path, "w") as handle:
            handle.write(textwrap.dedent(text))
        return path

    def load(self, text=None, **env):
        path = self.write(text) if text is not None else None
        return load_config(path, environ=env, cwd=self.dir)

    def problems(self, text=None, **env):
        with self.assertRaises(ConfigError) as caught:
            self.load(text, **env)
        return caught.exception.problems

    def assert_problem(self, problems, start):
        self.assertTrue(any(p.startswith(start) for p in problems), problems)


class LayoutTests(ConfigCase):
    def test_layout_a(self):
        loaded = self.load(LAYOUT_A, OPENAI_API_KEY=OPENAI_KEY, MQTT_USERNAME="u", MQTT_PASSWORD="pw-secret")
        config = loaded.config
        self.assertEqual((config.agent_id, config.description, config.capabilities),
                         ("researcher", "Research agent", ("research", "web")))
        self.assertEqual((config.mqtt.host, config.mqtt.port, config.mqtt.tls), ("broker.example.com", 8883, True))
        self.assertEqual(config.mqtt.username, "u")
        self.assertEqual(config.mqtt.password.reveal(), "pw-secret")
        self.assertEqual(config.heartbeat_interval, 900)
        self.assertEqual((config.llm.provider, config.llm.model, config.llm.temperature, config.llm.max_tokens),
                         ("openai", "gpt-4o", 0.3, 4000))
        self.assertEqual(config.llm.api_key.reveal(), OPENAI_KEY)
        self.assertEqual((config.budget.max_tool_calls, config.budget.max_iterations), (25, 12))
        tools = {t.name: t for t in config.tools}
        self.assertEqual(tools["web_search"].kind, "builtin")
        self.assertEqual(tools["http_request"].options, {"max_response_size": 1048576})
        self.assertEqual((tools["lister"].kind, tools["lister"].command, tools["lister"].args),
                         ("command", "ls", ("-1", "{path}")))
        self.assertEqual((config.routing.strategy, config.routing.max_iterations), ("llm", 10))
        router = config.routing.llm
        self.assertEqual((router.provider, router.model, router.temperature, router.max_tokens), ("openai", "gpt-4o-mini", 0.1, 500))
        self.assertEqual(router.api_key.reveal(), OPENAI_KEY)  # the [llm] key: same provider
        self.assertEqual(loaded.warnings, ())

    def test_layout_b_deployment_guide_verbatim(self):
        path = os.path.join(DATA, "deployment-guide-agent.toml")
        config = load_config(path, environ={"OPENAI_API_KEY": OPENAI_KEY, "MQTT_USERNAME": "agent_user",
                                            "MQTT_PASSWORD": "secret_password", "MQTT_HOST": "mqtt.example.com"},
                             cwd=self.dir).config
        self.assertEqual(config.agent_id, "prod-agent-001")
        self.assertEqual(config.llm.model, "gpt-4")
        self.assertEqual(config.llm.provider, "openai")
        self.assertEqual((config.max_pipeline_depth, config.task_timeout, config.max_output_size), (16, 300, 1048576))
        self.assertEqual((config.mqtt.host, config.mqtt.port, config.mqtt.keep_alive), ("mqtt.example.com", 1883, 60))
        self.assertEqual(config.mqtt.username, "agent_user")
        self.assertEqual(config.mqtt.password.reveal(), "secret_password")
        (tool,) = config.tools
        self.assertEqual((tool.name, tool.kind, tool.command, tool.timeout), ("http_get", "command", "curl", 30.0))
        self.assertEqual(tool.schema["required"], ["url"])

    def test_every_reference_config_loads(self):
        paths = sorted(glob.glob(os.path.join(DATA, "rust-configs", "*.toml")))
        self.assertEqual(len(paths), 13)
        for path in paths:
            with self.subTest(os.path.basename(path)):
                loaded = load_config(path, environ={}, cwd=self.dir)
                self.assertEqual(loaded.warnings, ())
                self.assertTrue(loaded.config.agent_id)

    def test_mixed_layout(self):
        config = self.load("""
            max_pipeline_depth = 4
            [agent]
            id = "mixer"
            task_timeout = 60
            [mqtt]
            keep_alive = 30
            [llm]
            provider = "echo"
            [budget]
            max_tool_calls = 2
            max_iterations = 3
        """).config
        self.assertEqual((config.max_pipeline_depth, config.task_timeout, config.mqtt.keep_alive), (4, 60, 30))
        self.assertEqual((config.budget.max_tool_calls, config.budget.max_iterations), (2, 3))


class EnvironmentTests(ConfigCase):
    def test_env_only(self):
        config = self.load(AGENT_ID="env-agent", MQTT_HOST="broker.local", OPENAI_API_KEY=OPENAI_KEY).config
        self.assertEqual(config.agent_id, "env-agent")
        self.assertEqual((config.mqtt.host, config.mqtt.port, config.mqtt.broker_url),
                         ("broker.local", 1883, "mqtt://broker.local:1883"))
        self.assertEqual((config.llm.provider, config.llm.model), ("openai", "gpt-4o"))
        self.assertEqual(config.mqtt.client_id, "agent2389-env-agent")

    def test_anthropic_inferred(self):
        config = self.load(AGENT_ID="env-agent", ANTHROPIC_API_KEY=ANTHROPIC_KEY).config
        self.assertEqual(config.llm.provider, "anthropic")

    def test_port_8883_implies_tls(self):
        config = self.load(AGENT_ID="abc", MQTT_HOST="h", MQTT_PORT="8883", OPENAI_API_KEY=OPENAI_KEY).config
        self.assertEqual((config.mqtt.tls, config.mqtt.broker_url), (True, "mqtts://h:8883"))

    def test_precedence_env_over_file_over_default(self):
        text = """
            agent_id = "from-file"
            task_timeout = 100
            [llm]
            provider = "echo"
        """
        config = self.load(text).config
        self.assertEqual((config.agent_id, config.task_timeout, config.max_pipeline_depth), ("from-file", 100, 16))
        config = self.load(text, AGENT_ID="from-env", TASK_TIMEOUT="200", MAX_PIPELINE_DEPTH="8",
                           LOG_LEVEL="debug", LOG_FORMAT="text", LOG_SPANS="true", HEALTH_PORT="9000").config
        self.assertEqual((config.agent_id, config.task_timeout, config.max_pipeline_depth), ("from-env", 200, 8))
        self.assertEqual((config.log_level, config.log_format, config.log_spans, config.health_port),
                         ("DEBUG", "text", True, 9000))

    def test_result_expiry_from_the_file_or_the_environment(self):
        text = """
            [agent]
            id = "expiring"
            result_expiry = 600
            [llm]
            provider = "echo"
        """
        self.assertEqual(self.load(text).config.result_expiry, 600)
        self.assertEqual(self.load(text, RESULT_EXPIRY="60").config.result_expiry, 60)
        self.assertIsNone(self.load('agent_id = "plain"\n[llm]\nprovider = "echo"\n').config.result_expiry)
        with self.assertRaises(ConfigError) as caught:
            self.load(text, RESULT_EXPIRY="0")
        self.assertIn("RESULT_EXPIRY=0 is out of range", str(caught.exception))

    def test_env_key_wins_over_file_key(self):
        text = """
            agent_id = "abc"
            [llm]
            openai_api_key = "sk-from-file-123456"
        """
        self.assertEqual(self.load(text).config.llm.api_key.reveal(), "sk-from-file-123456")
        self.assertEqual(self.load(text, OPENAI_API_KEY=OPENAI_KEY).config.llm.api_key.reveal(), OPENAI_KEY)

    def test_dotenv_does_not_override_set_variables(self):
        self.write("AGENT_ID=dotenv-agent\nTASK_TIMEOUT=45\n", name=".env")
        config = self.load('[llm]\nprovider = "echo"\n', TASK_TIMEOUT="90").config
        self.assertEqual((config.agent_id, config.task_timeout), ("dotenv-agent", 90))

    def test_base_url_env_and_no_prefix_check(self):
        config = self.load('agent_id = "abc"\n[llm]\nprovider = "openai"\n', OPENAI_BASE_URL="http://127.0.0.1:1/v1",
                           OPENAI_API_KEY="local-key").config
        self.assertEqual(config.llm.base_url, "http://127.0.0.1:1/v1")


class InterpolationTests(ConfigCase):
    def test_forms(self):
        config = self.load("""
            agent_id = "${NAME}-${SUFFIX:-x1}"
            [llm]
            provider = "echo"
            system_prompt = "costs $$5 ${EMPTY:-fallback}"
        """, NAME="agent", EMPTY="").config
        self.assertEqual(config.agent_id, "agent-x1")
        self.assertEqual(config.llm.system_prompt, "costs $5 fallback")

    def test_unset_variable_is_named(self):
        problems = self.problems('agent_id = "${NOPE_NOT_SET}"\n[llm]\nprovider = "echo"\n')
        self.assertTrue(any("NOPE_NOT_SET" in p and "agent_id" in p for p in problems), problems)

    def test_interpolation_before_validation(self):
        problems = self.problems('agent_id = "abc"\ntask_timeout = "${T}"\n[llm]\nprovider = "echo"\n', T="5")
        self.assertIn("task_timeout=5 is out of range (30-3600)", problems)


class ValidationTests(ConfigCase):
    base = 'agent_id = "abc"\n[llm]\nprovider = "echo"\n'

    def test_each_rule(self):
        cases = [
            ({"AGENT_ID": "ab"}, "AGENT_ID=ab must be 3-64 characters"),
            ({"AGENT_ID": "bad id!"}, "AGENT_ID=bad id! must be 3-64 characters"),
            ({"MAX_PIPELINE_DEPTH": "64"}, "MAX_PIPELINE_DEPTH=64 is out of range (1-32)"),
            ({"MAX_PIPELINE_DEPTH": "0"}, "MAX_PIPELINE_DEPTH=0 is out of range (1-32)"),
            ({"MAX_PIPELINE_DEPTH": "many"}, "MAX_PIPELINE_DEPTH=many is not a whole number"),
            ({"TASK_TIMEOUT": "10"}, "TASK_TIMEOUT=10 is out of range (30-3600)"),
            ({"TASK_TIMEOUT": "4000"}, "TASK_TIMEOUT=4000 is out of range (30-3600)"),
            ({"MQTT_HOST": "bad_host!"}, "MQTT_HOST=bad_host! is not a valid hostname or IP address"),
            ({"MQTT_PORT": "70000"}, "MQTT_PORT=70000 is out of range (1-65535)"),
            ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL=LOUD must be one of ERROR, WARN, INFO, DEBUG"),
            ({"LOG_FORMAT": "xml"}, "LOG_FORMAT=xml must be one of json, text"),
            ({"LOG_SPANS": "maybe"}, "LOG_SPANS=maybe must be true or false"),
            ({"HEALTH_PORT": "80"}, "HEALTH_PORT=80 is out of range (1024-65535)"),
            ({"OPENAI_BASE_URL": "ftp://x"}, "OPENAI_BASE_URL=ftp://x must be an absolute http(s) URL"),
        ]
        for env, expected in cases:
            with self.subTest(env=env):
                text = self.base if "BASE_URL" not in str(env) else 'agent_id = "abc"\n[llm]\nprovider = "openai"\n'
                self.assert_problem(self.problems(text, **env), expected)

    def test_file_rules(self):
        cases = [
            ("[mqtt]\nqos = 0\n", "[mqtt] qos=0 is not supported"),
            ("[mqtt]\nbroker_url = \"http://x\"\n", "[mqtt] broker_url=http://x must look like"),
            ("[mqtt]\nprotocol = \"4.0\"\n", "[mqtt] protocol=4.0 must be"),
            ("[mqtt]\nca_cert_path = \"/nonexistent/ca.crt\"\n", "[mqtt] ca_cert_path=/nonexistent/ca.crt is not a readable file"),
            ("[llm]\ntemperature = 3.5\n", "[llm] temperature=3.5 is out of range (0.0-2.0)"),
            ("[llm]\nmax_tokens = 0\n", "[llm] max_tokens=0 is out of range"),
            ("[tools]\nnope = \"builtin\"\n", "[tools] nope: there is no builtin tool named 'nope'"),
            ("[tools]\nx = { impl = \"wasm\" }\n", "[tools] x: unknown tool implementation 'wasm'"),
            ("[[tools]]\nname = \"t\"\ncommand = \"ls\"\nschema = { type = 5 }\n", "[[tools]] #1 schema is not a valid JSON Schema"),
            ("[routing]\nstrategy = \"magic\"\n", "[routing] strategy=magic must be one of llm, gatekeeper"),
            ("capabilities = \"x\"\n", "capabilities must be an array of strings"),
        ]
        for extra, expected in cases:
            with self.subTest(extra=extra):
                text = 'agent_id = "abc"\n' + extra
                if "[llm]" in extra:
                    text = text.replace("[llm]\n", '[llm]\nprovider = "echo"\n')
                else:
                    text += '\n[llm]\nprovider = "echo"\n'
                self.assert_problem(self.problems(text), expected)

    def test_key_prefix_rules(self):
        problems = self.problems('agent_id = "abc"\n', OPENAI_API_KEY="not-a-key-123456")
        self.assertTrue(any("OPENAI_API_KEY=******** does not look like an openai key" in p for p in problems),
                        problems)
        self.assertFalse(any("not-a-key-123456" in p for p in problems))
        problems = self.problems('agent_id = "abc"\n[llm]\nprovider = "anthropic"\n', ANTHROPIC_API_KEY="sk-wrong-123")
        self.assertTrue(any("expected prefix \"sk-ant-\"" in p for p in problems), problems)

    def test_all_problems_reported_together(self):
        problems = self.problems(None, AGENT_ID="x", MAX_PIPELINE_DEPTH="64", TASK_TIMEOUT="1", LOG_LEVEL="LOUD",
                                 OPENAI_API_KEY=OPENAI_KEY)
        self.assertEqual(len(problems), 4, problems)
        self.assertIn("config error: MAX_PIPELINE_DEPTH=64 is out of range (1-32)", str(ConfigError(problems)))

    def test_no_provider(self):
        problems = self.problems(None, AGENT_ID="abc")
        self.assertTrue(any("no LLM provider" in p for p in problems), problems)

    def test_missing_key_blocks_run_only(self):
        loaded = self.load('agent_id = "abc"\n[llm]\nprovider = "openai"\n')
        self.assertEqual(len(loaded.run_problems), 1)
        self.assertIn("OPENAI_API_KEY is not set", loaded.run_problems[0])

    def test_missing_agent_id(self):
        problems = self.problems('[llm]\nprovider = "echo"\n')
        self.assertTrue(any(p.startswith("AGENT_ID is not set") for p in problems), problems)

    def test_unknown_keys_warn_with_hint(self):
        loaded = self.load('agent_id = "abc"\ntask_timout = 40\n[mqtt]\nbrokr_url = "x"\n[llm]\nprovider = "echo"\n'
                           '[surprise]\nx = 1\n')
        self.assertIn("unknown key task_timout is ignored (did you mean task_timeout?)", loaded.warnings)
        self.assertIn("unknown key [mqtt] brokr_url is ignored (did you mean broker_url?)", loaded.warnings)
        self.assertTrue(any("surprise" in w for w in loaded.warnings))

    def test_dotted_agent_id_warns_about_topic_rewriting_brokers(self):
        loaded = self.load('agent_id = "team.writer"\n[llm]\nprovider = "echo"\n')
        self.assertEqual(loaded.config.agent_id, "team.writer")
        (warning,) = loaded.warnings
        self.assertIn("agent id 'team.writer' contains '.'", warning)
        self.assertIn("RabbitMQ", warning)

    def test_protocol_defaults_to_auto(self):
        self.assertEqual(self.load('agent_id = "abc"\n[llm]\nprovider = "echo"\n').config.mqtt.protocol, "auto")
        for given, expected in (("5", "5"), ("3.1.1", "3.1.1"), ("AUTO", "auto")):
            loaded = self.load(f'agent_id = "abc"\n[mqtt]\nprotocol = "{given}"\n[llm]\nprovider = "echo"\n')
            self.assertEqual(loaded.config.mqtt.protocol, expected)
        problems = self.problems('agent_id = "abc"\n[mqtt]\nprotocol = "6"\n[llm]\nprovider = "echo"\n')
        self.assertIn('must be "auto", "5" or "3.1.1"', problems[0])

    def test_outcome_qos_in_both_layouts_and_the_environment(self):
        ours, reference = 'agent_id = "abc"\n[mqtt]\n{}\n[llm]\nprovider = "echo"\n', \
            '[agent]\nid = "abc"\n[mqtt]\nbroker_url = "mqtt://localhost:1883"\n{}\n[llm]\nprovider = "echo"\n'
        for layout in (ours, reference):
            with self.subTest(layout=layout):
                self.assertEqual(self.load(layout.format("")).config.mqtt.outcome_qos, 1)
                self.assertEqual(self.load(layout.format("outcome_qos = 2")).config.mqtt.outcome_qos, 2)
                self.assertEqual(self.load(layout.format(""), MQTT_OUTCOME_QOS="2").config.mqtt.outcome_qos, 2)
                for bad in ("0", "3", '"two"', "true"):
                    self.assert_problem(self.problems(layout.format(f"outcome_qos = {bad}")), "[mqtt] outcome_qos=")
        self.assert_problem(self.problems(ours.format(""), MQTT_OUTCOME_QOS="0"), "MQTT_OUTCOME_QOS=0 is out of range")

    def test_a_minimal_file_gets_the_defaults_the_settings_classes_declare(self):
        """Defaults are written once, in config/model.py: tests that build settings from there and
        the loader that production uses cannot disagree."""
        config = self.load('agent_id = "abc"\n[llm]\nprovider = "echo"\n').config
        derived = {"agent_id", "dead_letter_topic", "mqtt", "llm", "budget", "tools", "mcp_servers", "routing",
                   "tracing"}
        for declared, loaded, skip in ((AgentConfig(agent_id="abc"), config, derived),
                                       (MqttSettings(), config.mqtt, {"client_id"}),
                                       (BudgetSettings(), config.budget, set())):
            for name in (f.name for f in dataclasses.fields(declared) if f.name not in skip):
                with self.subTest(setting=f"{type(declared).__name__}.{name}"):
                    self.assertEqual(getattr(loaded, name), getattr(declared, name))

    def test_max_envelope_depth_is_set_apart_from_the_worker_count(self):
        """Before: max_pipeline_depth was also the depth limit, so a one-worker agent answered every
        task with a `next` pipeline_depth_exceeded. The limit defaults to 16, or to the worker count
        where that is higher (the depth accepted before)."""
        ours, reference = 'agent_id = "abc"\n{}\n[llm]\nprovider = "echo"\n', \
            '[agent]\nid = "abc"\n{}\n[mqtt]\nbroker_url = "mqtt://localhost:1883"\n[llm]\nprovider = "echo"\n'
        for layout in (ours, reference):
            with self.subTest(layout=layout):
                depths = lambda text, **env: (self.load(layout.format(text), **env).config.max_pipeline_depth,
                                              self.load(layout.format(text), **env).config.max_envelope_depth)
                self.assertEqual(depths(""), (16, 16))
                self.assertEqual(depths("max_pipeline_depth = 1"), (1, 16))
                self.assertEqual(depths("max_pipeline_depth = 24"), (24, 24))
                self.assertEqual(depths("max_pipeline_depth = 1\nmax_envelope_depth = 3"), (1, 3))
                self.assertEqual(depths("", MAX_ENVELOPE_DEPTH="5"), (16, 5))
                problems = self.problems(layout.format("max_envelope_depth = 33"))
                self.assertIn("max_envelope_depth=33 is out of range (1-32)", problems[0])
        self.assert_problem(self.problems(ours.format(""), MAX_ENVELOPE_DEPTH="0"),
                            "MAX_ENVELOPE_DEPTH=0 is out of range")

    def test_bad_toml(self):
        problems = self.problems("agent_id = \n")
        self.assertTrue(problems[0].startswith("config file ") and "not valid TOML" in problems[0], problems)


class SpendConfigTests(ConfigCase):
    """Budgets, prices and client-side limits (PROTOCOL.md 8)."""

    base = 'agent_id = "abc"\n[llm]\nprovider = "echo"\n'

    def test_limits_and_prices_are_read(self):
        config = self.load(self.base + 'requests_per_minute = 60\ntokens_per_minute = 90000\nfleet_cooldowns = false\n'
                           '[llm.prices."gpt-4o"]\ninput_per_mtok = 2.5\noutput_per_mtok = 10\n'
                           '[budget]\nmax_tokens_per_task = 5000\nmax_cost_usd_per_conversation = 1.5\n').config
        self.assertEqual((config.llm.requests_per_minute, config.llm.tokens_per_minute, config.llm.fleet_cooldowns),
                         (60, 90000, False))
        self.assertEqual(config.llm.prices, (("gpt-4o", 2.5, 10.0),))
        self.assertEqual((config.budget.max_tokens_per_task, config.budget.max_cost_usd_per_conversation,
                          config.budget.max_tokens_per_conversation), (5000, 1.5, None))

    def test_each_bad_value_names_its_key(self):
        cases = [
            ("requests_per_minute = 0\n", "[llm] requests_per_minute=0 is out of range"),
            ("tokens_per_minute = \"lots\"\n", "[llm] tokens_per_minute=lots is not a whole number"),
            ("[budget]\nmax_tokens_per_task = -5\n", "[budget] max_tokens_per_task=-5 is out of range"),
            ("[budget]\nmax_cost_usd_per_task = nan\n", "[budget] max_cost_usd_per_task=NaN is not a number"),
            ("prices = 3\n", "[llm] prices must be a table of models"),
            ('[llm.prices."m"]\ninput_per_mtok = 1\n', '[llm.prices."m"] needs exactly input_per_mtok and '),
            ('[llm.prices."m"]\ninput_per_mtok = -1\noutput_per_mtok = true\n',
             '[llm.prices."m"] input_per_mtok and output_per_mtok must be numbers'),
        ]
        for text, start in cases:
            with self.subTest(text=text):
                self.assert_problem(self.problems(self.base + text), start)


class RoutingConfigTests(ConfigCase):
    BASE = 'agent_id = "abc"\n[llm]\nprovider = "echo"\n'

    def test_reference_v2_examples(self):
        for name in ("judge_agent", "research_agent"):  # the writer and editor do not route
            with self.subTest(name):
                path = os.path.join(DATA, "rust-configs", f"examples__v2_routing_workflow__{name}.toml")
                loaded = load_config(path, environ={"OPENAI_API_KEY": OPENAI_KEY}, cwd=self.dir)
                routing = loaded.config.routing
                self.assertEqual((routing.strategy, routing.max_iterations, routing.llm.model), ("llm", 10, "gpt-4o-mini"))
                self.assertEqual(routing.llm.api_key.reveal(), OPENAI_KEY)
                self.assertEqual(loaded.run_problems, ())

    def test_llm_router_keys(self):
        config = self.load(self.BASE + '[routing]\nstrategy = "llm"\n[routing.llm]\nprovider = "anthropic"\n'
                           'model = "claude-x"\napi_key_env = "ROUTER_KEY"\nbase_url = "http://127.0.0.1:9/"\n'
                           'max_tokens = 300\ntimeout = 7\ntemperature = 0.4\n', ROUTER_KEY="rk-123456").config
        router = config.routing.llm
        self.assertEqual((config.routing.max_iterations, router.provider, router.model, router.base_url,
                          router.max_tokens, router.request_timeout, router.temperature),
                         (10, "anthropic", "claude-x", "http://127.0.0.1:9", 300, 7.0, 0.4))
        self.assertEqual(router.api_key.reveal(), "rk-123456")
        self.assertIn("rk-123456", config.secrets())

    def test_router_key_missing_blocks_run(self):
        loaded = self.load(self.BASE + '[routing]\nstrategy = "llm"\n[routing.llm]\nprovider = "anthropic"\n')
        (problem,) = loaded.run_problems
        self.assertTrue(problem.startswith("[routing.llm]: ANTHROPIC_API_KEY is not set"), problem)

    def test_gatekeeper(self):
        config = self.load(self.BASE + '[routing]\nstrategy = "gatekeeper"\nmax_iterations = 15\n'
                           '[routing.gatekeeper]\nurl = "http://gk:8000/route"\n').config
        self.assertEqual(config.routing.max_iterations, 15)
        self.assertEqual((config.routing.gatekeeper.url, config.routing.gatekeeper.timeout_ms,
                          config.routing.gatekeeper.retry_attempts), ("http://gk:8000/route", 5000, 3))

    def test_routing_rules(self):
        cases = [
            ('[routing]\nmax_iterations = 3\n[routing.llm]\nprovider = "openai"\n', "[routing] needs strategy"),
            ('[routing]\nstrategy = "gatekeeper"\n', '[routing] strategy = "gatekeeper" needs a [routing.gatekeeper] table'),
            ('[routing]\nstrategy = "gatekeeper"\n[routing.gatekeeper]\nurl = "gk:8000"\n',
             "[routing.gatekeeper] url=gk:8000 must be an http:// or https:// URL with a host"),
            ('[routing]\nstrategy = "gatekeeper"\n[routing.gatekeeper]\nurl = "http://gk"\ntimeout_ms = 0\n',
             "[routing.gatekeeper] timeout_ms=0 is out of range"),
            ('[routing]\nstrategy = "llm"\n[routing.llm]\nprovider = "echo"\n',
             "[routing.llm] provider=echo must be one of openai, anthropic"),
            ('[routing]\nstrategy = "llm"\n[routing.llm]\nmodel = "m"\n', "[routing.llm] needs a provider"),
            ('[routing]\nstrategy = "llm"\nmax_iterations = 0\n[routing.llm]\nprovider = "openai"\n',
             "[routing] max_iterations=0 is out of range"),
            ('[routing]\nstrategy = "llm"\n[routing.llm]\nprovider = "openai"\ntemperature = 9\n',
             "[routing.llm] temperature=9 is out of range"),
        ]
        for extra, expected in cases:
            with self.subTest(extra=extra):
                self.assert_problem(self.problems(self.BASE + extra), expected)

    def test_unknown_routing_keys_warn(self):
        loaded = self.load(self.BASE + '[routing]\nstrategy = "gatekeeper"\nmax_steps = 4\n'
                           '[routing.gatekeeper]\nurl = "http://gk"\ntimeout = 3\n')
        self.assertTrue(any("max_steps" in w and "max_iterations" in w for w in loaded.warnings), loaded.warnings)
        self.assertTrue(any("[routing.gatekeeper] timeout" in w for w in loaded.warnings), loaded.warnings)


class McpServersConfigTests(ConfigCase):
    SERVERS = """
        [[mcp_servers]]
        name = "time"
        command = "mcp-server-time"
        args = ["--local-timezone", "UTC"]
        env = { TZ = "UTC", API_TOKEN = "${TIME_TOKEN}" }
        timeout = 10
        required = true
        allowed_tools = ["get_current_time"]

        [[mcp_servers]]
        name = "docs"
        url = "https://mcp.example.com/mcp"
        headers = { Authorization = "Bearer ${DOCS_TOKEN}", X-Team = "blue" }
        """

    def test_both_layouts_load_the_same_servers(self):
        for head in ('[agent]\nid = "abc"\n[llm]\nprovider = "echo"\n', 'agent_id = "abc"\n[llm]\nprovider = "echo"\n'):
            with self.subTest(head=head):
                config = self.load(head + textwrap.dedent(self.SERVERS), TIME_TOKEN="tt-secret-1", DOCS_TOKEN="dd-2").config
                time_server, docs = config.mcp_servers
                self.assertEqual(time_server.command, ("mcp-server-time", "--local-timezone", "UTC"))
                self.assertEqual(time_server.env, (("TZ", "UTC"), ("API_TOKEN", Secret("tt-secret-1"))))
                self.assertEqual((time_server.timeout, time_server.required, time_server.allowed_tools),
                                 (10.0, True, ("get_current_time",)))
                self.assertEqual(docs.url, "https://mcp.example.com/mcp")
                self.assertEqual(docs.headers, (("Authorization", Secret("Bearer dd-2")), ("X-Team", "blue")))
                self.assertIn("tt-secret-1", config.secrets())
                self.assertIn("Bearer dd-2", config.secrets())
                shown = str(masked_view(config)["mcp_servers"])
                self.assertNotIn("tt-secret-1", shown)
                self.assertNotIn("dd-2", shown)
                self.assertIn("blue", shown)

    def test_each_rule(self):
        base = 'agent_id = "abc"\n[llm]\nprovider = "echo"\n'
        cases = [
            ('name = "Time"\ncommand = "x"', "[[mcp_servers]] #1 name=Time must be 1-32 of a-z, 0-9, '_' or '-'"),
            ('command = "x"', "[[mcp_servers]] #1 needs name = "),
            ('name = "t"\ncommand = "x"\nurl = "http://h/mcp"', "[[mcp_servers]] #1 (t) needs exactly one of command"),
            ('name = "t"', "[[mcp_servers]] #1 (t) needs exactly one of command"),
            ('name = "t"\nurl = "ftp://h/mcp"', "[[mcp_servers]] #1 (t) url=ftp://h/mcp must be an http:// or https:// URL"),
            ('name = "t"\ncommand = "x"\nheaders = { A = "b" }', "[[mcp_servers]] #1 (t) headers apply to url servers only"),
            ('name = "t"\nurl = "http://h/mcp"\nargs = ["a"]', "[[mcp_servers]] #1 (t) args applies to command (stdio) servers"),
            ('name = "t"\ncommand = "x"\nargs = "a b"', "[[mcp_servers]] #1 (t) args must be an array of strings"),
            ('name = "t"\ncommand = "x"\nenv = { "1BAD" = "v" }', "[[mcp_servers]] #1 (t) env: '1BAD' is not an environment"),
            ('name = "t"\ncommand = "x"\ntimeout = 0', "[[mcp_servers]] #1 (t) timeout=0 is out of range (0.1-3600.0)"),
            ('name = "t"\ncommand = "x"\nallowed_tools = ["a"]\ndenied_tools = ["b"]',
             "[[mcp_servers]] #1 (t): set allowed_tools or denied_tools, not both"),
        ]
        for table, expected in cases:
            with self.subTest(table=table):
                self.assert_problem(self.problems(base + "[[mcp_servers]]\n" + table + "\n"), expected)
        twice = base + '[[mcp_servers]]\nname = "t"\ncommand = "x"\n[[mcp_servers]]\nname = "t"\nurl = "http://h/"\n'
        self.assert_problem(self.problems(twice), "[[mcp_servers]] #2 (t): MCP server name 't' is used twice")
        self.assert_problem(self.problems('mcp_servers = "x"\n' + base), "mcp_servers must be an array of tables")

    def test_unknown_keys_are_warned_about(self):
        loaded = self.load('agent_id = "abc"\n[llm]\nprovider = "echo"\n[[mcp_servers]]\nname = "t"\n'
                           'command = "x"\ntimout = 5\n')
        self.assertIn("unknown key [[mcp_servers]] #1 (t) timout is ignored (did you mean timeout?)", loaded.warnings)


class SecretTests(ConfigCase):
    def test_secrets_masked_in_repr_and_view(self):
        loaded = self.load(LAYOUT_A, OPENAI_API_KEY=OPENAI_KEY, MQTT_USERNAME="u", MQTT_PASSWORD="pw-very-secret")
        for text in (repr(loaded.config), str(loaded.config), str(masked_view(loaded.config))):
            self.assertNotIn(OPENAI_KEY, text)
            self.assertNotIn("pw-very-secret", text)
        self.assertEqual(masked_view(loaded.config)["llm"]["api_key"], "********")
        self.assertEqual(set(loaded.config.secrets()), {OPENAI_KEY, "pw-very-secret"})
        self.assertEqual(str(Secret("x")), "********")

    def test_fallback_providers(self):
        config = self.load("""
            agent_id = "abc"
            [llm]
            provider = "openai"
            model = "gpt-4o"
            temperature = 0.2
            fallback = [ { provider = "anthropic", model = "claude-x" }, { provider = "echo" } ]
        """, OPENAI_API_KEY=OPENAI_KEY, ANTHROPIC_API_KEY=ANTHROPIC_KEY).config
        first, second = config.llm.fallback
        self.assertEqual((first.provider, first.model, first.temperature), ("anthropic", "claude-x", 0.2))
        self.assertEqual(first.api_key.reveal(), ANTHROPIC_KEY)
        self.assertEqual(second.provider, "echo")
        self.assertIn(ANTHROPIC_KEY, config.secrets())


if __name__ == "__main__":
    unittest.main()
