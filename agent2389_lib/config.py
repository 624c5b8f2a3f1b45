"""Configuration: both TOML layouts, `${VAR}` interpolation, .env, environment overrides.

`load_config` turns sources into one frozen `AgentConfig`, or raises `ConfigError` listing
every problem at once. Secrets live in `Secret` objects that never print their value.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional
from urllib.parse import unquote, urlsplit

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9/3.10 only
    import tomli as tomllib

from dotenv import dotenv_values

PROVIDERS = ("openai", "anthropic", "echo")
BUILTIN_TOOLS = ("echo", "http_request", "file_read", "file_write", "web_search")
DEFAULT_MODELS = {"openai": "gpt-4o", "anthropic": "claude-sonnet-4-20250514", "echo": "echo"}
OFFICIAL_KEY_PREFIX = {"openai": "sk-", "anthropic": "sk-ant-"}
KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
BASE_URL_ENV = {"openai": "OPENAI_BASE_URL", "anthropic": "ANTHROPIC_BASE_URL"}
LOG_LEVELS = ("ERROR", "WARN", "INFO", "DEBUG")
_AGENT_ID_RE = re.compile(r"^[A-Za-z0-9._-]{3,64}$")
_INSTANCE_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")  # e.g. a StatefulSet ordinal or pod name
_HOST_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_INTERP_RE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
MASK = "********"


class ConfigError(Exception):
    """Every problem found, one line each, ready to print."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(f"config error: {p}" for p in problems))
        self.problems = problems


class Secret:
    """A string that never shows itself in repr/str/format; `reveal()` gives the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    def __str__(self) -> str:
        return MASK

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class MqttSettings:
    broker_url: str = "mqtt://localhost:1883"
    host: str = "localhost"
    port: int = 1883
    tls: bool = False
    username: Optional[str] = None
    password: Optional[Secret] = None
    client_id: str = ""
    protocol: str = "auto"  # MQTT 5, falling back to 3.1.1 for brokers that do not speak it
    session_expiry: int = 86400
    keep_alive: int = 60
    qos: int = 1
    ca_cert_path: Optional[str] = None
    client_cert_path: Optional[str] = None
    client_key_path: Optional[str] = None
    client_key_password: Optional[Secret] = None
    tls_insecure_skip_verify: bool = False


@dataclass(frozen=True)
class LlmSettings:
    provider: str = "echo"
    model: str = "echo"
    api_key: Optional[Secret] = None
    api_key_env: Optional[str] = None
    base_url: Optional[str] = None
    system_prompt: str = "You are a helpful assistant."
    temperature: Optional[float] = None
    max_tokens: Optional[int] = None
    max_attempts: int = 4
    request_timeout: float = 120.0
    max_response_bytes: int = 8388608  # an LLM answer larger than this is an llm_error
    latency_ms: int = 0  # echo provider only: simulated thinking time
    fallback: tuple = ()  # of LlmSettings


@dataclass(frozen=True)
class BudgetSettings:
    max_tool_calls: int = 15
    max_iterations: int = 8


@dataclass(frozen=True)
class ToolSpec:
    name: str
    kind: str  # "builtin" or "command"
    command: Optional[str] = None
    args: Optional[tuple] = None
    timeout: float = 30.0
    schema: Optional[dict] = None
    description: str = ""
    env: tuple = ()
    options: dict = field(default_factory=dict)
    secret: Optional[Secret] = None  # a builtin's API key (web_search: SERPER_API_KEY)


@dataclass(frozen=True)
class GatekeeperSettings:
    url: str
    timeout_ms: int = 5000
    retry_attempts: int = 3


@dataclass(frozen=True)
class RoutingSettings:
    """Protocol v2 dynamic routing: who picks the next agent, and how many hops at most."""

    strategy: str  # "llm" or "gatekeeper"
    max_iterations: int = 10
    llm: Optional[LlmSettings] = None
    gatekeeper: Optional[GatekeeperSettings] = None


@dataclass(frozen=True)
class AgentConfig:
    agent_id: str
    instance_id: Optional[str] = None  # set: a member of the pool serving agent_id (shared subscription)
    description: str = ""
    capabilities: tuple = ()
    max_pipeline_depth: int = 16
    task_timeout: int = 300
    max_output_size: int = 1048576
    max_message_size: int = 262144
    state_dir: Optional[str] = None
    completed_store_size: int = 10000
    heartbeat_interval: int = 60
    shutdown_grace: int = 30
    progress: bool = True
    dead_letter_topic: str = ""  # where refused outcomes go; "" = nowhere (the loader defaults it per agent)
    log_level: str = "INFO"
    log_format: str = "json"
    log_spans: bool = False
    health_port: int = 8080
    health_bind: str = "0.0.0.0"
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    llm: LlmSettings = field(default_factory=LlmSettings)
    budget: BudgetSettings = field(default_factory=BudgetSettings)
    tools: tuple = ()  # of ToolSpec
    routing: Optional[RoutingSettings] = None

    def secrets(self) -> tuple[str, ...]:
        """Every secret value, for redaction in logs and messages."""
        found: list[str] = []
        _collect_secrets(self, found)
        return tuple(found)


@dataclass(frozen=True)
class LoadedConfig:
    config: AgentConfig
    warnings: tuple = ()
    run_problems: tuple = ()  # fine for check-config, fatal for `run` (e.g. a missing API key)


def _collect_secrets(obj: Any, found: list) -> None:
    if isinstance(obj, Secret):
        if obj:
            found.append(obj.reveal())
    elif is_dataclass(obj):
        for f in fields(obj):
            _collect_secrets(getattr(obj, f.name), found)
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            _collect_secrets(item, found)


# ---------------------------------------------------------------- key tables

# file key -> canonical name, per section; "" is the top level.
_COMMON_TOP = {
    "agent_id": "agent_id", "default_model": "llm.model", "max_pipeline_depth": "max_pipeline_depth",
    "task_timeout": "task_timeout", "max_output_size": "max_output_size", "max_message_size": "max_message_size",
    "state_dir": "state_dir", "heartbeat_interval": "heartbeat_interval", "shutdown_grace": "shutdown_grace",
    "progress_events": "progress", "completed_store_size": "completed_store_size", "instance_id": "instance_id",
    "description": "description", "capabilities": "capabilities", "dead_letter_topic": "dead_letter_topic",
}
_SECTIONS: dict[str, dict[str, str]] = {
    "": _COMMON_TOP,
    "agent": {**_COMMON_TOP, "id": "agent_id"},
    "mqtt": {k: f"mqtt.{k}" for k in (
        "broker_url", "username", "password", "username_env", "password_env", "qos", "keep_alive",
        "ca_cert_path", "client_cert_path", "client_key_path", "client_key_password", "tls_insecure_skip_verify",
        "client_id",
        "protocol", "session_expiry")} | {"heartbeat_interval_secs": "heartbeat_interval",
                                          "heartbeat_interval": "heartbeat_interval"},
    "llm": {k: f"llm.{k}" for k in (
        "provider", "model", "api_key_env", "api_key", "base_url", "system_prompt", "temperature",
        "max_tokens", "fallback", "max_attempts", "request_timeout", "max_response_bytes", "latency_ms")}
    | {"openai_api_key": "llm.openai_api_key", "anthropic_api_key": "llm.anthropic_api_key"},
    "budget": {"max_tool_calls": "budget.max_tool_calls", "max_iterations": "budget.max_iterations"},
    "health": {"port": "health_port", "bind": "health_bind"},
    "logging": {"level": "log_level", "format": "log_format", "spans": "log_spans"},
}
_SPECIAL_SECTIONS = ("tools", "routing")
_TOOL_KEYS = ("name", "impl", "command", "args", "timeout", "schema", "description", "env", "config")
_FALLBACK_KEYS = ("provider", "model", "api_key_env", "api_key", "base_url", "temperature", "max_tokens",
                  "system_prompt", "max_attempts", "request_timeout", "max_response_bytes")
_ROUTING_KEYS = {"strategy", "max_iterations", "llm", "gatekeeper"}
_ROUTING_SUB = {"llm": {"provider", "model", "temperature", "api_key_env", "base_url", "max_tokens", "timeout",
                        "max_attempts"},
                "gatekeeper": {"url", "timeout_ms", "retry_attempts"}}
ROUTER_PROVIDERS = ("openai", "anthropic")
ROUTER_TEMPERATURE = 0.1
ROUTER_MAX_TOKENS = 500
ROUTER_TIMEOUT = 30.0

_ENV_SIMPLE = {
    "AGENT_ID": "agent_id", "DEFAULT_MODEL": "llm.model", "MAX_PIPELINE_DEPTH": "max_pipeline_depth",
    "TASK_TIMEOUT": "task_timeout", "LOG_LEVEL": "log_level", "LOG_FORMAT": "log_format",
    "LOG_SPANS": "log_spans", "HEALTH_PORT": "health_port", "STATE_DIR": "state_dir",
    "AGENT_INSTANCE_ID": "instance_id", "LLM_PROVIDER": "llm.provider", "HEALTH_BIND": "health_bind",
    "DEAD_LETTER_TOPIC": "dead_letter_topic",
}


@dataclass
class _Value:
    value: Any
    origin: str  # what the user wrote: a key like "[mqtt] keep_alive" or a variable like "TASK_TIMEOUT"


class _Collector:
    """Problems and warnings, gathered so all are reported at once."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def warn(self, text: str) -> None:
        self.warnings.append(text)


# ---------------------------------------------------------------- entry point

def load_config(path: Optional[str] = None, environ: Optional[Mapping[str, str]] = None,
                cwd: Optional[str] = None) -> LoadedConfig:
    """Defaults < TOML file < .env (never over set variables) < environment."""
    env = merged_environment(path, dict(os.environ if environ is None else environ), cwd)
    out = _Collector()
    raw = _read_toml(path, out) if path else {}
    if out.problems:  # an unreadable file: whatever else follows from it would only mislead
        raise ConfigError(out.problems)
    raw = _interpolate(raw, env, out, "")
    settings = _normalize(raw, out)
    _apply_environment(settings, env)
    config, run_problems = _build(settings, env, out)
    if out.problems:
        raise ConfigError(out.problems)
    return LoadedConfig(config, tuple(out.warnings), tuple(run_problems))


def load_mqtt_settings(path: Optional[str] = None, environ: Optional[Mapping[str, str]] = None,
                       cwd: Optional[str] = None, broker_url: Optional[str] = None,
                       client_id: str = "") -> MqttSettings:
    """Only the broker settings, from the same sources as the agent (for operator commands):
    problems in other keys (a missing API key, no agent id) do not matter here."""
    env = merged_environment(path, dict(os.environ if environ is None else environ), cwd)
    out = _Collector()
    raw = _read_toml(path, out) if path else {}
    raw = _interpolate({"mqtt": raw.get("mqtt", {})} if isinstance(raw.get("mqtt"), dict) else {}, env, out, "")
    settings = _normalize(raw, _Collector())
    _apply_environment(settings, env)
    if broker_url:
        settings["mqtt.broker_url"] = _Value(broker_url, "--broker-url")
        settings.pop("mqtt.env_host", None)
        settings.pop("mqtt.env_port", None)
    if client_id:
        settings["mqtt.client_id"] = _Value(client_id, "client id")
    mqtt = _build_mqtt(_Reader(settings, out), env, "operator")
    if out.problems:
        raise ConfigError(out.problems)
    return mqtt


def merged_environment(path: Optional[str], environ: dict, cwd: Optional[str] = None) -> dict:
    """The environment plus `.env` next to the config file and in the working directory."""
    candidates = []
    if path:
        candidates.append(Path(path).resolve().parent / ".env")
    candidates.append(Path(cwd or os.getcwd()) / ".env")
    for candidate in dict.fromkeys(candidates):
        if candidate.is_file():
            for key, value in dotenv_values(candidate).items():
                if value is not None:
                    environ.setdefault(key, value)
    return environ


def _read_toml(path: str, out: _Collector) -> dict:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        out.problem(f"config file {path} does not exist")
    except OSError as exc:
        out.problem(f"config file {path} cannot be read: {exc.strerror}")
    except tomllib.TOMLDecodeError as exc:
        out.problem(f"config file {path} is not valid TOML: {exc}")
    return {}


def _interpolate(node: Any, env: Mapping[str, str], out: _Collector, where: str) -> Any:
    if isinstance(node, dict):
        return {k: _interpolate(v, env, out, f"{where}.{k}" if where else k) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, env, out, f"{where}[{i}]") for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        value = env.get(name)
        if value not in (None, ""):
            return value
        if default is not None:
            return default
        if value is None:
            out.problem(f"{where}: environment variable {name} is not set "
                        f"(set it, or write ${{{name}:-default}} in the file)")
        return ""

    return _INTERP_RE.sub(substitute, node)


# ---------------------------------------------------------------- layouts -> flat settings

def _normalize(raw: dict, out: _Collector) -> dict[str, _Value]:
    settings: dict[str, _Value] = {}
    tools: list = []
    for key, value in raw.items():
        if key in _SECTIONS and key != "":
            if isinstance(value, dict):
                _take_section(key, value, settings, out)
            else:
                out.problem(f"[{key}] must be a table (a [{key}] section), not {type(value).__name__} {key} = ...")
        elif key == "tools":
            tools.extend(_normalize_tools(value, out))
        elif key == "routing":
            settings["routing"] = _Value(_normalize_routing(value, out), "[routing]")
        elif key in _SECTIONS[""]:
            settings[_SECTIONS[""][key]] = _Value(value, key)
        else:
            _warn_unknown(out, "", key, list(_SECTIONS[""]) + [s for s in _SECTIONS if s] + list(_SPECIAL_SECTIONS))
    if tools:
        settings["tools"] = _Value(tools, "[tools]")
    return settings


def _take_section(section: str, table: dict, settings: dict, out: _Collector) -> None:
    known = _SECTIONS[section]
    for key, value in table.items():
        if key in known:
            settings[known[key]] = _Value(value, f"[{section}] {key}")
        else:
            _warn_unknown(out, f"[{section}]", key, list(known))


def _warn_unknown(out: _Collector, prefix: str, key: str, known: list) -> None:
    where = f"{prefix} {key}" if prefix else key
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    out.warn(f"unknown key {where} is ignored{hint}")


def _normalize_tools(value: Any, out: _Collector) -> list:
    """Layout A `[tools]` table or layout B `[[tools]]` array, to a list of (origin, name, table)."""
    items: list = []
    if isinstance(value, dict):
        for name, spec in value.items():
            if isinstance(spec, str):
                spec = {"impl": spec}
            items.append((f"[tools] {name}", name, spec))
    elif isinstance(value, list):
        for index, spec in enumerate(value):
            name = spec.get("name") if isinstance(spec, dict) else None
            items.append((f"[[tools]] #{index + 1}", name, spec))
    else:
        out.problem("tools must be a table ([tools]) or an array of tables ([[tools]])")
    return items


def _normalize_routing(value: Any, out: _Collector) -> Any:
    if not isinstance(value, dict):
        out.problem("[routing] must be a table")
        return None
    for key in value:
        if key not in _ROUTING_KEYS:
            _warn_unknown(out, "[routing]", key, sorted(_ROUTING_KEYS))
    for sub, allowed in _ROUTING_SUB.items():
        if isinstance(value.get(sub), dict):
            for key in value[sub]:
                if key not in allowed:
                    _warn_unknown(out, f"[routing.{sub}]", key, sorted(allowed))
    return value


def _apply_environment(settings: dict, env: Mapping[str, str]) -> None:
    """The deployment guide's variables override the file."""
    for name, canonical in _ENV_SIMPLE.items():
        if env.get(name, "") != "":
            settings[canonical] = _Value(env[name], name)
    for name in ("MQTT_USERNAME", "MQTT_PASSWORD"):
        if env.get(name, "") != "":
            settings[f"mqtt.{name[5:].lower()}"] = _Value(env[name], name)
    host, port = env.get("MQTT_HOST", ""), env.get("MQTT_PORT", "")
    if host or port:
        settings["mqtt.env_host"] = _Value(host, "MQTT_HOST")
        settings["mqtt.env_port"] = _Value(port, "MQTT_PORT")


# ---------------------------------------------------------------- building and validation

class _Reader:
    """Typed access to flat settings, recording a problem (not raising) on a bad value."""

    def __init__(self, settings: dict, out: _Collector):
        self.settings = settings
        self.out = out

    def has(self, key: str) -> bool:
        return key in self.settings

    def origin(self, key: str) -> str:
        return self.settings[key].origin if key in self.settings else key

    def raw(self, key: str, default: Any = None) -> Any:
        return self.settings[key].value if key in self.settings else default

    def bad(self, key: str, shown: Any, rule: str) -> None:
        self.out.problem(f"{self.origin(key)}={shown} {rule}")

    def string(self, key: str, default: Optional[str] = None, allow_empty: bool = True) -> Optional[str]:
        value = self.raw(key, default)
        if value is None:
            return None
        if not isinstance(value, str):
            self.bad(key, json.dumps(value), "must be a string")
            return default
        if "\0" in value:
            self.out.problem(f"{self.origin(key)} must not contain NUL characters (\\u0000)")
            return default
        if not allow_empty and not value.strip():
            self.out.problem(f"{self.origin(key)} must not be empty")
            return default
        return value

    def integer(self, key: str, default: Optional[int], lo: int, hi: Optional[int] = None) -> Optional[int]:
        return self._numeric(key, default, lo, hi, int, (int,), "a whole number")

    def number(self, key: str, default: Optional[float], lo: float, hi: Optional[float] = None) -> Optional[float]:
        value = self._numeric(key, default, lo, hi, float, (int, float), "a number")
        return None if value is None else float(value)

    def _numeric(self, key: str, default: Any, lo: Any, hi: Any, parse: Callable[[str], Any], types: tuple,
                 noun: str) -> Any:
        """A number from TOML or from an environment string, range-checked."""
        value = self.raw(key, default)
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = parse(value.strip())
            except ValueError:
                self.bad(key, self.raw(key), f"is not {noun}")
                return default
        if isinstance(value, bool) or not isinstance(value, types) or not math.isfinite(value):
            self.bad(key, json.dumps(self.raw(key)), f"is not {noun}")
            return default
        if value < lo or (hi is not None and value > hi):
            self.bad(key, value, f"is out of range ({lo}-{hi})" if hi is not None else f"must be at least {lo}")
            return default
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.strip().lower() in ("true", "1", "yes", "on")
        self.bad(key, value, "must be true or false")
        return default

    def choice(self, key: str, default: str, choices: tuple, fold: Callable[[str], str] = str.lower) -> str:
        value = self.string(key, default)
        if value is None:
            return default
        folded = fold(value.strip())
        if folded not in choices:
            self.bad(key, value, f"must be one of {', '.join(choices)}")
            return default
        return folded

    def secret(self, key: str) -> Optional[Secret]:
        value = self.raw(key)
        if value is None or value == "":
            return None
        if not isinstance(value, str) or "\0" in value:
            self.out.problem(f"{self.origin(key)} must be a string without NUL characters")
            return None
        return Secret(value)


def _build(settings: dict, env: Mapping[str, str], out: _Collector) -> tuple[AgentConfig, list]:
    read = _Reader(settings, out)
    agent_id = read.string("agent_id")
    if agent_id is None or agent_id == "":
        out.problem("AGENT_ID is not set (set AGENT_ID, or agent_id / [agent] id in the config file)")
        agent_id = "unset"
    elif not _AGENT_ID_RE.match(agent_id):
        read.bad("agent_id", agent_id, "must be 3-64 characters of letters, digits, '.', '_' or '-'")
    elif "." in agent_id:
        out.warn(f"agent id {agent_id!r} contains '.': brokers that map MQTT topics to AMQP routing keys "
                 f"(RabbitMQ) turn it into a topic level, so subscribers to /control/agents/+/status (monitor, "
                 f"discovery) will not see this agent there; prefer '-' or '_'")
    capabilities = read.raw("capabilities", [])
    if not isinstance(capabilities, list) or not all(isinstance(c, str) for c in capabilities):
        out.problem(f"{read.origin('capabilities')} must be an array of strings")
        capabilities = []
    instance_id = read.string("instance_id") or None
    if instance_id is not None and not _INSTANCE_ID_RE.match(instance_id):
        read.bad("instance_id", instance_id, "must be 1-64 characters of letters, digits, '.', '_' or '-'")
    state_dir = read.string("state_dir")
    if state_dir and instance_id:
        state_dir = os.path.join(state_dir, instance_id)  # each member keeps its own completed tasks
    run_problems: list[str] = []
    llm = _build_llm(read, env, run_problems)
    config = AgentConfig(
        agent_id=agent_id,
        instance_id=instance_id,
        description=read.string("description", "") or "",
        capabilities=tuple(capabilities),
        max_pipeline_depth=read.integer("max_pipeline_depth", 16, 1, 32),
        task_timeout=read.integer("task_timeout", 300, 30, 3600),
        max_output_size=read.integer("max_output_size", 1048576, 1024),
        max_message_size=read.integer("max_message_size", 262144, 1024, 268435455),
        state_dir=state_dir or None,
        completed_store_size=read.integer("completed_store_size", 10000, 1),
        heartbeat_interval=read.integer("heartbeat_interval", 60, 1, 86400),
        shutdown_grace=read.integer("shutdown_grace", 30, 0, 3600),
        progress=read.boolean("progress", True),
        dead_letter_topic=_dead_letter_topic(read, agent_id),
        log_level=read.choice("log_level", "INFO", LOG_LEVELS + ("WARNING",), str.upper).replace("WARNING", "WARN"),
        log_format=read.choice("log_format", "json", ("json", "text")),
        log_spans=read.boolean("log_spans", False),
        health_port=read.integer("health_port", 8080, 1024, 65535),
        health_bind=read.string("health_bind", "0.0.0.0", allow_empty=False),
        mqtt=_build_mqtt(read, env, agent_id if instance_id is None else f"{agent_id}-{instance_id}"),
        llm=llm,
        budget=_build_budget(read),
        tools=tuple(_build_tools(read, env)),
        routing=_build_routing(read, env, llm, run_problems),
    )
    return config, run_problems


def _dead_letter_topic(read: _Reader, agent_id: str) -> str:
    """Default `/control/agents/{agent_id}/dead-letter`; set empty to turn it off."""
    topic = read.string("dead_letter_topic", f"/control/agents/{agent_id}/dead-letter")
    if topic and (any(c in topic for c in "+#") or len(topic.encode("utf-8", "replace")) > 65535):
        read.out.problem(f"{read.origin('dead_letter_topic')} must be an MQTT topic name without wildcards (+, #), "
                         f"e.g. /control/agents/{agent_id}/dead-letter; or empty to turn it off")
    return topic or ""


def _build_mqtt(read: _Reader, env: Mapping[str, str], client_name: str) -> MqttSettings:
    scheme, host, port, url_user, url_password = _broker_address(read)
    username = read.string("mqtt.username") or url_user
    password = read.secret("mqtt.password") or url_password
    for key, attr in (("mqtt.username_env", "username"), ("mqtt.password_env", "password")):
        var = read.string(key)
        if var and env.get(var):
            if attr == "username" and not read.has("mqtt.username"):
                username = env[var]
            elif attr == "password" and not read.has("mqtt.password"):
                password = Secret(env[var])
    qos = read.integer("mqtt.qos", 1, 0, 2)
    if qos != 1:
        read.bad("mqtt.qos", qos, "is not supported: only QoS 1 is valid (RFC NFR-002)")
    paths = {}
    for key in ("ca_cert_path", "client_cert_path", "client_key_path"):
        value = read.string(f"mqtt.{key}")
        if value and not os.path.isfile(value):
            read.bad(f"mqtt.{key}", value, "is not a readable file")
        paths[key] = value or None
    if bool(paths["client_cert_path"]) != bool(paths["client_key_path"]):
        read.out.problem("[mqtt] client_cert_path and client_key_path must be given together")
    protocol = str(read.raw("mqtt.protocol", "auto")).strip().lower()
    protocol = {"auto": "auto", "5": "5", "5.0": "5", "3.1.1": "3.1.1", "311": "3.1.1", "4": "3.1.1"}.get(protocol)
    if protocol is None:
        read.bad("mqtt.protocol", read.raw("mqtt.protocol"), 'must be "auto", "5" or "3.1.1"')
        protocol = "auto"
    client_id = read.string("mqtt.client_id", "") or f"agent2389-{client_name}"
    if len(client_id.encode("utf-8")) > 65535:
        read.bad("mqtt.client_id", "...", "is too long")
    return MqttSettings(
        broker_url=f"{scheme}://{host}:{port}", host=host, port=port, tls=scheme == "mqtts",
        username=username or None, password=password, client_id=client_id, protocol=protocol,
        session_expiry=read.integer("mqtt.session_expiry", 86400, 0, 4294967295),
        keep_alive=read.integer("mqtt.keep_alive", 60, 5, 65535), qos=1,
        ca_cert_path=paths["ca_cert_path"], client_cert_path=paths["client_cert_path"],
        client_key_path=paths["client_key_path"], client_key_password=read.secret("mqtt.client_key_password"),
        tls_insecure_skip_verify=read.boolean("mqtt.tls_insecure_skip_verify", False),
    )


def _broker_address(read: _Reader) -> tuple[str, str, int, Optional[str], Optional[Secret]]:
    """Scheme, host, port and the URL's credentials (`mqtt://user:pass@host`, percent-decoded)."""
    url = read.string("mqtt.broker_url", "mqtt://localhost:1883") or "mqtt://localhost:1883"
    scheme, host, port = "mqtt", "localhost", 1883
    user: Optional[str] = None
    password: Optional[Secret] = None
    try:
        parts = urlsplit(url)
        scheme = {"mqtt": "mqtt", "tcp": "mqtt", "mqtts": "mqtts", "ssl": "mqtts", "tls": "mqtts"}[parts.scheme.lower()]
        host = parts.hostname or ""
        port = parts.port if parts.port is not None else (8883 if scheme == "mqtts" else 1883)
        if not host or not 0 < port < 65536:
            raise ValueError("no host, or port 0")
        user = unquote(parts.username) if parts.username else None
        password = Secret(unquote(parts.password)) if parts.password else None
    except (KeyError, ValueError):
        read.bad("mqtt.broker_url", _without_password(url), "must look like mqtt://host:1883 or mqtts://host:8883 "
                                                          "(port 1-65535)")
    if read.raw("mqtt.env_host"):
        host = read.raw("mqtt.env_host").strip()
    if read.raw("mqtt.env_port"):
        port = read.integer("mqtt.env_port", port, 1, 65535)
        scheme = "mqtts" if port == 8883 else scheme
    if not _valid_host(host):
        key = "mqtt.env_host" if read.raw("mqtt.env_host") else "mqtt.broker_url"
        read.bad(key, host, "is not a valid hostname or IP address")
    return scheme, host, port, user, password


def _without_password(url: str) -> str:
    """A broker URL fit for an error message: whatever stands between `:` and `@` is masked, even
    in a URL too broken to parse."""
    return re.sub(r"(//[^/@:]*:)[^/]*@", rf"\g<1>{MASK}@", url)


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    return 0 < len(host) <= 253 and all(_HOST_LABEL_RE.match(label) for label in labels)


def _build_llm(read: _Reader, env: Mapping[str, str], run_problems: list) -> LlmSettings:
    provider = read.raw("llm.provider")
    if provider is None:
        provider = _infer_provider(read, env)
    else:
        provider = read.choice("llm.provider", "echo", PROVIDERS)
    primary = _llm_settings(read, env, run_problems, provider, "llm.", inherit=None)
    fallback_raw = read.raw("llm.fallback", [])
    fallbacks = []
    if not isinstance(fallback_raw, list) or not all(isinstance(f, dict) for f in fallback_raw):
        read.out.problem("[llm] fallback must be an array of tables like {provider=..., model=...}")
        fallback_raw = []
    for index, table in enumerate(fallback_raw):
        origin = f"[llm] fallback #{index + 1}"
        sub = {}
        for key, value in table.items():
            if key in _FALLBACK_KEYS:
                sub[f"llm.{key}"] = _Value(value, f"{origin} {key}")
            else:
                _warn_unknown(read.out, origin, key, list(_FALLBACK_KEYS))
        sub_reader = _Reader(sub, read.out)
        if "llm.provider" not in sub:
            read.out.problem(f"{origin} needs a provider ({', '.join(PROVIDERS)})")
            continue
        sub_provider = sub_reader.choice("llm.provider", "echo", PROVIDERS)
        fallbacks.append(_llm_settings(sub_reader, env, run_problems, sub_provider, "llm.", inherit=primary))
    return replace(primary, fallback=tuple(fallbacks))


def _infer_provider(read: _Reader, env: Mapping[str, str]) -> str:
    if read.has("llm.anthropic_api_key") and not read.has("llm.openai_api_key"):
        return "anthropic"
    if read.has("llm.openai_api_key"):
        return "openai"
    if env.get("ANTHROPIC_API_KEY") and not env.get("OPENAI_API_KEY"):
        return "anthropic"
    if env.get("OPENAI_API_KEY"):
        return "openai"
    read.out.problem("no LLM provider: set [llm] provider (openai, anthropic or echo), "
                     "or set OPENAI_API_KEY or ANTHROPIC_API_KEY")
    return "echo"


def _llm_settings(read: _Reader, env: Mapping[str, str], run_problems: list, provider: str, prefix: str,
                  inherit: Optional[LlmSettings]) -> LlmSettings:
    base = inherit or LlmSettings()
    model = read.string(f"{prefix}model", None, allow_empty=False)
    if model is None:
        model = DEFAULT_MODELS[provider]
    base_url = read.string(f"{prefix}base_url") or (env.get(BASE_URL_ENV[provider]) if provider in BASE_URL_ENV else None)
    if base_url:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            shown_key = f"{prefix}base_url" if read.has(f"{prefix}base_url") else None
            if shown_key:
                read.bad(shown_key, base_url, "must be an absolute http(s) URL")
            else:
                read.out.problem(f"{BASE_URL_ENV[provider]}={base_url} must be an absolute http(s) URL")
        base_url = base_url.rstrip("/")
    api_key, key_var = _api_key(read, env, provider, prefix)
    if provider in KEY_ENV:
        if api_key is None and not base_url:
            run_problems.append(f"{key_var} is not set: the {provider} provider needs an API key "
                                f"(or set [llm] base_url for a local OpenAI-compatible server)")
        elif api_key is not None and not base_url and not api_key.reveal().startswith(OFFICIAL_KEY_PREFIX[provider]):
            read.out.problem(f"{key_var}={MASK} does not look like an {provider} key "
                             f"(expected prefix \"{OFFICIAL_KEY_PREFIX[provider]}\"); "
                             f"set [llm] base_url if it is for another server")
    return LlmSettings(
        provider=provider, model=model, api_key=api_key, api_key_env=key_var, base_url=base_url or None,
        system_prompt=read.string(f"{prefix}system_prompt", base.system_prompt) or base.system_prompt,
        temperature=read.number(f"{prefix}temperature", base.temperature, 0.0, 2.0),
        max_tokens=read.integer(f"{prefix}max_tokens", base.max_tokens, 1, 1000000),
        max_attempts=read.integer(f"{prefix}max_attempts", base.max_attempts, 1, 20),
        request_timeout=read.number(f"{prefix}request_timeout", base.request_timeout, 1.0, 3600.0),
        max_response_bytes=read.integer(f"{prefix}max_response_bytes", base.max_response_bytes, 1024, 1073741824),
        latency_ms=read.integer(f"{prefix}latency_ms", 0, 0, 600000),
    )


def _api_key(read: _Reader, env: Mapping[str, str], provider: str, prefix: str) -> tuple[Optional[Secret], str]:
    """The key from the environment variable it names (env wins), else from the file."""
    if provider not in KEY_ENV:
        return None, ""
    var = read.string(f"{prefix}api_key_env") or KEY_ENV[provider]
    if env.get(var):
        return Secret(env[var]), var
    for key in (f"{prefix}api_key", f"{prefix}{provider}_api_key"):
        secret = read.secret(key)
        if secret is not None:
            return secret, read.origin(key)
    return None, var


def _build_budget(read: _Reader) -> BudgetSettings:
    return BudgetSettings(max_tool_calls=read.integer("budget.max_tool_calls", 15, 0, 1000),
                          max_iterations=read.integer("budget.max_iterations", 8, 1, 1000))


def _build_tools(read: _Reader, env: Mapping[str, str]) -> list[ToolSpec]:
    specs: list[ToolSpec] = []
    seen: set = set()
    for origin, name, table in read.raw("tools", []):
        spec = _build_tool(read.out, origin, name, table, env)
        if spec is None:
            continue
        if spec.name in seen:
            read.out.problem(f"{origin}: tool {spec.name!r} is defined twice")
            continue
        seen.add(spec.name)
        specs.append(spec)
    return specs


def _build_tool(out: _Collector, origin: str, name: Any, table: Any, env: Mapping[str, str]) -> Optional[ToolSpec]:
    if not isinstance(table, dict):
        out.problem(f"{origin} must be \"builtin\" or a table")
        return None
    if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9_-]{1,64}$", name):
        out.problem(f"{origin}: tool name {name!r} must be 1-64 letters, digits, '_' or '-'")
        return None
    for key in table:
        if key not in _TOOL_KEYS:
            _warn_unknown(out, origin, key, list(_TOOL_KEYS))
    reader = _Reader({k: _Value(v, f"{origin} {k}") for k, v in table.items()}, out)
    impl = reader.string("impl", "external" if "command" in table else "builtin")
    timeout = reader.number("timeout", 30.0, 0.1, 3600.0)
    schema = table.get("schema")
    if schema is not None and not _valid_schema(schema):
        out.problem(f"{origin} schema is not a valid JSON Schema object")
        schema = None
    options = table.get("config", {})
    if not isinstance(options, dict):
        out.problem(f"{origin} config must be a table")
        options = {}
    env_names = table.get("env", [])
    if not isinstance(env_names, list) or not all(isinstance(e, str) for e in env_names):
        out.problem(f"{origin} env must be an array of variable names")
        env_names = []
    common = dict(timeout=timeout, schema=schema, description=reader.string("description", "") or "",
                  env=tuple(env_names), options=options)
    if impl == "builtin":
        if name not in BUILTIN_TOOLS:
            out.problem(f"{origin}: there is no builtin tool named {name!r} (builtins: {', '.join(BUILTIN_TOOLS)})")
            return None
        key_var = options.get("api_key_env", "SERPER_API_KEY") if name == "web_search" else None
        secret = Secret(env[key_var]) if key_var and env.get(key_var) else None
        return ToolSpec(name=name, kind="builtin", secret=secret, **common)
    if impl in ("external", "command"):
        command = reader.string("command", None, allow_empty=False)
        if not command:
            out.problem(f"{origin}: an external tool needs command = \"program\"")
            return None
        args = table.get("args")
        if args is not None and (not isinstance(args, list) or not all(isinstance(a, str) for a in args)):
            out.problem(f"{origin} args must be an array of strings")
            args = None
        return ToolSpec(name=name, kind="command", command=command,
                        args=tuple(args) if args is not None else None, **common)
    out.problem(f"{origin}: unknown tool implementation {impl!r} (use \"builtin\" or \"external\")")
    return None


def _valid_schema(schema: Any) -> bool:
    if not isinstance(schema, dict):
        return False
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError:
        return False
    return True


def _build_routing(read: _Reader, env: Mapping[str, str], llm: LlmSettings,
                   run_problems: list) -> Optional[RoutingSettings]:
    table = read.raw("routing")
    if not isinstance(table, dict):
        return None
    flat = {}
    for key, value in table.items():
        if isinstance(value, dict):  # [routing.llm] timeout is the router's request timeout
            flat.update({f"routing.{key}.{'request_timeout' if k == 'timeout' else k}": _Value(v, f"[routing.{key}] {k}")
                         for k, v in value.items()})
        else:
            flat[f"routing.{key}"] = _Value(value, f"[routing] {key}")
    reader = _Reader(flat, read.out)
    if "strategy" not in table:
        read.out.problem('[routing] needs strategy = "llm" or "gatekeeper"')
    strategy = reader.choice("routing.strategy", "llm", ("llm", "gatekeeper"))
    max_iterations = reader.integer("routing.max_iterations", 10, 1, 1000)
    if not isinstance(table.get(strategy), dict):
        read.out.problem(f'[routing] strategy = "{strategy}" needs a [routing.{strategy}] table')
        return RoutingSettings(strategy, max_iterations)
    if strategy == "gatekeeper":
        url = reader.string("routing.gatekeeper.url")
        if not url or urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
            read.out.problem("[routing.gatekeeper] url must be an absolute http(s) URL, e.g. http://gatekeeper:8000/route")
        return RoutingSettings(strategy, max_iterations, gatekeeper=GatekeeperSettings(
            url or "", reader.integer("routing.gatekeeper.timeout_ms", 5000, 1, 600000),
            reader.integer("routing.gatekeeper.retry_attempts", 3, 1, 20)))
    if not reader.has("routing.llm.provider"):
        read.out.problem(f"[routing.llm] needs a provider ({', '.join(ROUTER_PROVIDERS)})")
    provider = reader.choice("routing.llm.provider", "openai", ROUTER_PROVIDERS)
    own_problems: list = []
    router = _llm_settings(reader, env, own_problems, provider, "routing.llm.", inherit=None)
    if provider == llm.provider and router.api_key is None and not reader.has("routing.llm.api_key_env"):
        router = replace(router, api_key=llm.api_key, api_key_env=llm.api_key_env)  # the [llm] key
    if router.api_key is None:
        run_problems.extend(f"[routing.llm]: {problem}" for problem in own_problems)
    return RoutingSettings(strategy, max_iterations, llm=replace(
        router, temperature=reader.number("routing.llm.temperature", ROUTER_TEMPERATURE, 0.0, 2.0),
        max_tokens=reader.integer("routing.llm.max_tokens", ROUTER_MAX_TOKENS, 1, 1000000),
        request_timeout=reader.number("routing.llm.request_timeout", ROUTER_TIMEOUT, 1.0, 3600.0)))


# ---------------------------------------------------------------- display

def masked_view(config: AgentConfig) -> dict:
    """The effective configuration as plain data, secrets masked (for check-config)."""
    def convert(value: Any) -> Any:
        if isinstance(value, Secret):
            return MASK if value else ""
        if is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in fields(value)}
        if isinstance(value, (tuple, list)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value
    return convert(config)
