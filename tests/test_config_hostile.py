"""Hostile configuration: every bad value is answered with a problem naming its key (exit 2 from
`check-config` and `run`), never a traceback, and never with a secret in the message. A property
test feeds generated TOML files and environments to the loader."""

import json
import math
import os
import tempfile
import unittest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_first_hour import cli

from agent2389_lib.config import ConfigError, load_config, masked_view
from agent2389_lib.config.sources import ENV_SIMPLE, SECTIONS

SECRET = "S3cr3t-sentinel"
SECRET_KEYS = {("mqtt", "password"), ("mqtt", "client_key_password"), ("llm", "api_key"), ("llm", "openai_api_key"),
               ("llm", "anthropic_api_key")}
SECRET_VARIABLES = ("MQTT_PASSWORD", "OPENAI_API_KEY", "ANTHROPIC_API_KEY")
HOSTILE_TEXT = ["", " ", "a\x00b", "mqtt://u:pw@[bad:1883", "mqtt://host:0", "mqtt://host:99999", "http://",
                "${UNSET}", "${UNSET:-}", "${X", "openai", "echo", "anthropic", "5", "3.1.1", "auto", "-1", "1e9",
                "nan", "inf", "../../etc", "/proc", "#", "+", "é" * 70, "x" * 300]


def toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a lone surrogate makes the file unreadable TOML: a problem too
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"


scalars = st.one_of(st.booleans(), st.integers(-2 ** 63, 2 ** 63 - 1), st.floats(), st.text(max_size=20),
                    st.sampled_from(HOSTILE_TEXT))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.sampled_from(["name", "impl", "command", "url", "provider", "a"]), inner,
                                        max_size=3), max_leaves=5)
SECTION_KEYS = {name: sorted(keys) for name, keys in SECTIONS.items() if name}
TOOL_OR_ROUTING = st.one_of(
    st.lists(st.dictionaries(st.sampled_from(["name", "impl", "command", "args", "timeout", "schema", "env", "config"]),
                             values, max_size=4), max_size=2),
    st.dictionaries(st.sampled_from(["strategy", "max_iterations", "llm", "gatekeeper", "echo", "x"]),
                    st.one_of(values, st.dictionaries(st.sampled_from(["url", "provider", "model", "timeout",
                                                                      "timeout_ms", "max_attempts", "base_url"]),
                                                      values, max_size=4)), max_size=4),
    values)


@st.composite
def documents(draw):
    """(TOML text, environment): known sections and keys with hostile values; secrets only where secrets go."""
    lines = [f"{json.dumps(key)} = {toml_value(draw(values))}"
             for key in draw(st.lists(st.sampled_from(sorted(SECTIONS[""])), max_size=4, unique=True))]
    for name in draw(st.lists(st.sampled_from(sorted(SECTION_KEYS)), max_size=4, unique=True)):
        if draw(st.integers(0, 9)) == 0:
            lines.insert(0, f"{name} = {toml_value(draw(values))}")  # a section of the wrong type
            continue
        lines.append(f"[{name}]")
        for key in draw(st.lists(st.sampled_from(SECTION_KEYS[name]), max_size=5, unique=True)):
            value = SECRET if (name, key) in SECRET_KEYS and draw(st.booleans()) else draw(values)
            lines.append(f"{json.dumps(key)} = {toml_value(value)}")
    if draw(st.booleans()):
        lines.insert(0, f"tools = {toml_value(draw(TOOL_OR_ROUTING))}")
    if draw(st.booleans()):
        lines.insert(0, f"routing = {toml_value(draw(TOOL_OR_ROUTING))}")
    if draw(st.booleans()):  # credentials in a broker URL, sound or broken
        host = draw(st.sampled_from(["[bad", "host:0", "host", "ho st", ":1883", "h:99999"]))
        lines.append(f'[mqtt]\nbroker_url = "mqtt://user:{SECRET}@{host}"')
    names = sorted(ENV_SIMPLE) + ["MQTT_HOST", "MQTT_PORT", "MQTT_BROKER_URL", "OPENAI_BASE_URL", "MQTT_USERNAME"]
    env = draw(st.dictionaries(st.sampled_from(names), st.one_of(st.text(max_size=20), st.sampled_from(HOSTILE_TEXT)),
                               max_size=4))
    for variable in draw(st.lists(st.sampled_from(SECRET_VARIABLES), max_size=2, unique=True)):
        env[variable] = SECRET
    return "\n".join(lines) + "\n", env


def everything_said(text: str, env: dict) -> str:
    """What the loader says of a document: its problems, or its warnings and check-config's view.
    Anything but a ConfigError escapes (and fails the test)."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "agent.toml")
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as handle:
            handle.write(text)
        try:
            loaded = load_config(path, environ=env, cwd=directory)
        except ConfigError as exc:
            return str(exc)
        return json.dumps(masked_view(loaded.config)) + "\n".join(loaded.warnings + loaded.run_problems)


class PropertyTests(unittest.TestCase):
    @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(documents())
    def test_the_loader_answers_every_document_with_a_config_or_problems(self, document):
        self.assertNotIn(SECRET, everything_said(*document))


URL_PASSWORD = "Pw-" + SECRET  # has '-' and digits, as real passwords do
URL_SCHEMES = ["mqtt://", "mqtts://", "tcp://", "http://", "https://", "ftp://", "mqtt:/", "http:/", "", "//",
               "MQTT://", "ws://"]
URL_HOSTS = ["host", "host:1883", "[bad", "[::1]:1883", "host:0", "host:99999", "ho st", ":1883", "", "h/x@y",
             "127.0.0.1:8080/v1", "[bad/v1"]


@st.composite
def url_like(draw):
    """A URL-like value with a password, in any shape an operator may write or mistype."""
    password = draw(st.sampled_from([URL_PASSWORD, URL_PASSWORD + ":x", URL_PASSWORD + "@x", URL_PASSWORD + "/x",
                                     "a%40" + URL_PASSWORD]))
    user = draw(st.sampled_from(["u", "", "user.name", "me@corp"]))
    return f"{draw(st.sampled_from(URL_SCHEMES))}{user}:{password}@{draw(st.sampled_from(URL_HOSTS))}"


URL_FILE_KEYS = [("mqtt", "broker_url"), ("llm", "base_url"), ("routing.gatekeeper", "url"),
                 ("routing.llm", "base_url"), ("llm.fallback", "base_url"), ("mcp_servers", "url"),
                 ("tools.web_search", "config")]
URL_VARIABLES = ["MQTT_HOST", "OPENAI_BASE_URL", "ANTHROPIC_BASE_URL", "OTEL_EXPORTER_OTLP_ENDPOINT",
                 "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]


@st.composite
def url_documents(draw):
    """A config whose URL-valued keys and variables hold url_like values."""
    lines = ['agent_id = "urls"', "[llm]", f'provider = "{draw(st.sampled_from(["openai", "anthropic", "echo"]))}"']
    env = {}
    for section, key in draw(st.lists(st.sampled_from(URL_FILE_KEYS), min_size=1, max_size=4, unique=True)):
        value = json.dumps(draw(url_like()))
        if section == "mcp_servers":
            lines.append(f'[[mcp_servers]]\nname = "remote"\nurl = {value}')
        elif section == "tools.web_search":
            lines.append(f'[tools.web_search]\nimpl = "builtin"\nconfig = {{ endpoint = {value} }}')
        elif section == "routing.gatekeeper":
            lines.append(f'[routing]\nstrategy = "gatekeeper"\n[routing.gatekeeper]\nurl = {value}')
        elif section == "routing.llm":
            lines.append(f'[routing]\nstrategy = "llm"\n[routing.llm]\nprovider = "openai"\nbase_url = {value}')
        elif section == "llm.fallback":
            lines.append(f'[[llm.fallback]]\nprovider = "openai"\nbase_url = {value}')
        else:
            lines.append(f"[{section}]\n{key} = {value}")
    for variable in draw(st.lists(st.sampled_from(URL_VARIABLES), max_size=3, unique=True)):
        env[variable] = draw(url_like())
    return "\n".join(lines) + "\n", env


class UrlPropertyTests(unittest.TestCase):
    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(url_documents())
    def test_url_like_values_never_raise_nor_echo_a_password(self, document):
        self.assertNotIn(SECRET, everything_said(*document))


class HostileValueTests(unittest.TestCase):
    """The values an operator tried, through the real command line."""

    CASES = [  # (file, the line's start)
        ('[mqtt]\nbroker_url = "mqtt://u:pw-123@[bad:1883"', "config error: [mqtt] broker_url=mqtt://u:********@[bad"),
        ('[mqtt]\nbroker_url = "mqtt://host:0"', "config error: [mqtt] broker_url=mqtt://host:0 must look like"),
        ('[llm]\nprovider = "openai"\napi_key_env = ["A"]', 'config error: [llm] api_key_env=["A"] must be a string'),
        ('state_dir = "a\\u0000b"', "config error: state_dir must not contain NUL characters"),
        ('mqtt = []', "config error: [mqtt] must be a table"),
        ('[llm]\nprovider = "openai"\napi_key = "sk-x"\ntemperature = nan', "config error: [llm] temperature=NaN is not"),
        ('[mqtt]\nclient_id = "a\\u0000b"', "config error: [mqtt] client_id must not contain NUL characters"),
        ('[mqtt]\nusername = "u\\u0000"', "config error: [mqtt] username must not contain NUL characters"),
        ('[mqtt]\npassword = ["pw-123"]', "config error: [mqtt] password must be a string"),
        ('[mqtt]\nbroker_url = "u:pw-123@host:1883"', "config error: [mqtt] broker_url=u:********@host:1883 must"),
        ('[mqtt]\nbroker_url = "mqtt:/u:pw-123@host"', "config error: [mqtt] broker_url=mqtt:/u:********@host must"),
        ('[mqtt]\nbroker_url = "ftp://u:pw-123@host"', "config error: [mqtt] broker_url=ftp://u:********@host must"),
        ('[llm]\nprovider = "openai"\nbase_url = "http://u:pw-123@[bad"',
         "config error: [llm] base_url=http://u:********@[bad must be an absolute http(s) URL"),
        ('[llm]\nprovider = "openai"\napi_key = "sk-x"\n[[llm.fallback]]\nprovider = "openai"\nbase_url = "http://[bad"',
         "config error: [llm] fallback #1 base_url=http://[bad must be"),
        ('[llm]\nprovider = "echo"\n[routing]\nstrategy = "gatekeeper"\n[routing.gatekeeper]\nurl = "http://[bad"',
         "config error: [routing.gatekeeper] url=http://[bad must be an http:// or https:// URL"),
        ('[llm]\nprovider = "echo"\n[tools.web_search]\nimpl = "builtin"\nconfig = { api_key_env = ["X"] }',
         'config error: [tools] web_search config api_key_env=["X"] must be a string'),
        ('[llm]\nprovider = "echo"\n[tools.http_request]\nimpl = "builtin"\nconfig = { max_response_size = "big" }',
         "config error: [tools] http_request config max_response_size=big is not a whole number"),
        ('[llm]\nprovider = "echo"\n[tools.file_read]\nimpl = "builtin"\nconfig = { allowed_paths = "x" }',
         "config error: [tools] file_read config allowed_paths must be an array of strings"),
    ]
    VARIABLE_CASES = [  # (environment, the line's start)
        ({"OPENAI_BASE_URL": "http://u:pw-123@[bad"},
         "config error: OPENAI_BASE_URL=http://u:********@[bad must be an absolute http(s) URL"),
        ({"MQTT_HOST": "u:pw-123@host"}, "config error: MQTT_HOST=u:********@host is not a valid hostname"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://u:pw-123@[bad"},
         "config error: OTEL_EXPORTER_OTLP_ENDPOINT must be an http:// or https:// URL with a host"),
    ]

    def test_each_bad_value_is_one_line_naming_its_key(self):
        cases = [(body, {}, expected) for body, expected in self.CASES]
        cases += [('[llm]\nprovider = "openai"', env, expected) for env, expected in self.VARIABLE_CASES]
        for body, env, expected in cases:
            for command in ("check-config", "run"):
                with self.subTest(body=body, env=env, command=command):
                    directory = tempfile.mkdtemp(prefix="hostile-")
                    path = os.path.join(directory, "agent.toml")
                    with open(path, "w") as handle:
                        handle.write(f'agent_id = "hostile"\n{body}\n' + ("" if "[llm]" in body else
                                                                           '[llm]\nprovider = "echo"\n'))
                    result = cli(command, "--config", path, env={"LOG_FORMAT": "text", **env}, timeout=30)
                    self.assertEqual(result.returncode, 2, result.stderr)
                    errors = [line for line in result.stderr.splitlines() if "config error" in line]
                    self.assertEqual(len(errors), 1, result.stderr)
                    self.assertIn(expected, errors[0])
                    self.assertNotIn("Traceback", result.stderr)
                    self.assertNotIn("pw-123", result.stderr + result.stdout)


if __name__ == "__main__":
    unittest.main()
