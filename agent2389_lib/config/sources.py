"""Where settings come from: both TOML layouts, `${VAR:-default}` interpolation, `.env` files
and the deployment guide's environment variables, flattened to one key per setting with the
place the user wrote it (so every problem names that place)."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.9/3.10 only
    import tomli as tomllib

from dotenv import dotenv_values

from ..redaction import mask_url_credentials

_INTERP_RE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

# file key -> canonical name, per section; "" is the top level.
_COMMON_TOP = {
    "agent_id": "agent_id", "default_model": "llm.model", "max_pipeline_depth": "max_pipeline_depth",
    "max_envelope_depth": "max_envelope_depth", "task_timeout": "task_timeout", "max_output_size": "max_output_size",
    "max_message_size": "max_message_size",
    "state_dir": "state_dir", "heartbeat_interval": "heartbeat_interval", "shutdown_grace": "shutdown_grace",
    "progress_events": "progress", "completed_store_size": "completed_store_size", "instance_id": "instance_id",
    "description": "description", "capabilities": "capabilities", "dead_letter_topic": "dead_letter_topic",
    "result_expiry": "result_expiry",
}
SECTIONS: dict[str, dict[str, str]] = {
    "": _COMMON_TOP,
    "agent": {**_COMMON_TOP, "id": "agent_id"},
    "mqtt": {k: f"mqtt.{k}" for k in (
        "broker_url", "username", "password", "username_env", "password_env", "qos", "outcome_qos", "keep_alive",
        "ca_cert_path", "client_cert_path", "client_key_path", "client_key_password", "tls_insecure_skip_verify",
        "client_id",
        "protocol", "session_expiry")} | {"heartbeat_interval_secs": "heartbeat_interval",
                                          "heartbeat_interval": "heartbeat_interval"},
    "llm": {k: f"llm.{k}" for k in (
        "provider", "model", "api_key_env", "api_key", "base_url", "system_prompt", "temperature",
        "max_tokens", "fallback", "max_attempts", "request_timeout", "max_response_bytes", "latency_ms", "prices",
        "requests_per_minute", "tokens_per_minute", "fleet_cooldowns")}
    | {"openai_api_key": "llm.openai_api_key", "anthropic_api_key": "llm.anthropic_api_key"},
    "budget": {k: f"budget.{k}" for k in (
        "max_tool_calls", "max_iterations", "max_tokens_per_task", "max_cost_usd_per_task",
        "max_tokens_per_conversation", "max_cost_usd_per_conversation")},
    "health": {"port": "health_port", "bind": "health_bind"},
    "logging": {"level": "log_level", "format": "log_format", "spans": "log_spans"},
}
_SPECIAL_SECTIONS = ("tools", "routing", "mcp_servers")
TOOL_KEYS = ("name", "impl", "command", "args", "timeout", "schema", "description", "env", "config",
             "requires_approval", "approval_timeout")
FALLBACK_KEYS = ("provider", "model", "api_key_env", "api_key", "base_url", "temperature", "max_tokens",
                  "system_prompt", "max_attempts", "request_timeout", "max_response_bytes", "requests_per_minute",
                  "tokens_per_minute")
_ROUTING_KEYS = {"strategy", "max_iterations", "llm", "gatekeeper"}
_ROUTING_SUB = {"llm": {"provider", "model", "temperature", "api_key_env", "base_url", "max_tokens", "timeout",
                        "max_attempts"},
                "gatekeeper": {"url", "timeout_ms", "retry_attempts"}}

ENV_SIMPLE = {
    "AGENT_ID": "agent_id", "DEFAULT_MODEL": "llm.model", "MAX_PIPELINE_DEPTH": "max_pipeline_depth",
    "MAX_ENVELOPE_DEPTH": "max_envelope_depth", "RESULT_EXPIRY": "result_expiry",
    "TASK_TIMEOUT": "task_timeout", "LOG_LEVEL": "log_level", "LOG_FORMAT": "log_format",
    "LOG_SPANS": "log_spans", "HEALTH_PORT": "health_port", "STATE_DIR": "state_dir",
    "AGENT_INSTANCE_ID": "instance_id", "LLM_PROVIDER": "llm.provider", "HEALTH_BIND": "health_bind",
    "DEAD_LETTER_TOPIC": "dead_letter_topic", "MQTT_OUTCOME_QOS": "mqtt.outcome_qos",
}


@dataclass
class Value:
    value: Any
    origin: str  # what the user wrote: a key like "[mqtt] keep_alive" or a variable like "TASK_TIMEOUT"


class Collector:
    """Problems and warnings, gathered so all are reported at once; a URL's password in a value
    they quote is masked, whatever the URL's shape."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def problem(self, text: str) -> None:
        self.problems.append(mask_url_credentials(text))

    def warn(self, text: str) -> None:
        self.warnings.append(mask_url_credentials(text))


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


def read_toml(path: str, out: Collector) -> dict:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        example = Path(path).parent / "agent.toml.example"
        hint = f"; start from the example: cp {example} {path}" if example.is_file() else ""
        out.problem(f"config file {path} does not exist{hint}")
    except OSError as exc:
        out.problem(f"config file {path} cannot be read: {exc.strerror}")
    except tomllib.TOMLDecodeError as exc:
        out.problem(f"config file {path} is not valid TOML: {exc}")
    return {}


def interpolate(node: Any, env: Mapping[str, str], out: Collector, where: str) -> Any:
    if isinstance(node, dict):
        return {k: interpolate(v, env, out, f"{where}.{k}" if where else k) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env, out, f"{where}[{i}]") for i, v in enumerate(node)]
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

def normalize(raw: dict, out: Collector) -> dict[str, Value]:
    settings: dict[str, Value] = {}
    tools: list = []
    for key, value in raw.items():
        if key in SECTIONS and key != "":
            if isinstance(value, dict):
                _take_section(key, value, settings, out)
            else:
                out.problem(f"[{key}] must be a table (a [{key}] section), not {type(value).__name__} {key} = ...")
        elif key == "tools":
            tools.extend(_normalize_tools(value, out))
        elif key == "routing":
            settings["routing"] = Value(_normalize_routing(value, out), "[routing]")
        elif key == "mcp_servers":
            settings["mcp_servers"] = Value(_normalize_mcp_servers(value, out), "[[mcp_servers]]")
        elif key in SECTIONS[""]:
            settings[SECTIONS[""][key]] = Value(value, key)
        else:
            warn_unknown(out, "", key, list(SECTIONS[""]) + [s for s in SECTIONS if s] + list(_SPECIAL_SECTIONS))
    if tools:
        settings["tools"] = Value(tools, "[tools]")
    return settings


def _take_section(section: str, table: dict, settings: dict, out: Collector) -> None:
    known = SECTIONS[section]
    for key, value in table.items():
        if key in known:
            settings[known[key]] = Value(value, f"[{section}] {key}")
        else:
            warn_unknown(out, f"[{section}]", key, list(known))


def warn_unknown(out: Collector, prefix: str, key: str, known: list) -> None:
    where = f"{prefix} {key}" if prefix else key
    import difflib  # only for a key that is not known
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    out.warn(f"unknown key {where} is ignored{hint}")


def _normalize_tools(value: Any, out: Collector) -> list:
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


def _normalize_mcp_servers(value: Any, out: Collector) -> list:
    """`[[mcp_servers]]`, the same in both layouts, to a list of (origin, table)."""
    if not isinstance(value, list):
        out.problem("mcp_servers must be an array of tables ([[mcp_servers]])")
        return []
    return [(f"[[mcp_servers]] #{index + 1}", table) for index, table in enumerate(value)]


def _normalize_routing(value: Any, out: Collector) -> Any:
    if not isinstance(value, dict):
        out.problem("[routing] must be a table")
        return None
    for key in value:
        if key not in _ROUTING_KEYS:
            warn_unknown(out, "[routing]", key, sorted(_ROUTING_KEYS))
    for sub, allowed in _ROUTING_SUB.items():
        if isinstance(value.get(sub), dict):
            for key in value[sub]:
                if key not in allowed:
                    warn_unknown(out, f"[routing.{sub}]", key, sorted(allowed))
    return value


def apply_environment(settings: dict, env: Mapping[str, str]) -> None:
    """The deployment guide's variables override the file."""
    for name, canonical in ENV_SIMPLE.items():
        if env.get(name, "") != "":
            settings[canonical] = Value(env[name], name)
    for name in ("MQTT_USERNAME", "MQTT_PASSWORD"):
        if env.get(name, "") != "":
            settings[f"mqtt.{name[5:].lower()}"] = Value(env[name], name)
    host, port = env.get("MQTT_HOST", ""), env.get("MQTT_PORT", "")
    if host or port:
        settings["mqtt.env_host"] = Value(host, "MQTT_HOST")
        settings["mqtt.env_port"] = Value(port, "MQTT_PORT")
