"""Configuration: both TOML layouts, `${VAR}` interpolation, .env, environment overrides.

`load_config` turns sources into one frozen `AgentConfig`, or raises `ConfigError` listing
every problem at once. Secrets live in `Secret` objects that never print their value.
The model, the sources and the build step are modules of their own; this is the way in.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

from .build import build, build_mqtt
from .model import (BUILTIN_OPTIONS, OFFICIAL_BASE_URL, AgentConfig, BudgetSettings, ConfigError,
                    GatekeeperSettings, LlmSettings, LoadedConfig, McpServerSpec, MqttSettings, RoutingSettings,
                    Secret, ToolSpec, TracingSettings, masked_view)
from .reader import Reader
from .sources import Collector, Value, apply_environment, interpolate, merged_environment, normalize, read_toml
from .tracing import build_tracing


def load_config(path: Optional[str] = None, environ: Optional[Mapping[str, str]] = None,
                cwd: Optional[str] = None) -> LoadedConfig:
    """Defaults < TOML file < .env (never over set variables) < environment."""
    env = merged_environment(path, dict(os.environ if environ is None else environ), cwd)
    out = Collector()
    raw = read_toml(path, out) if path else {}
    if out.problems:  # an unreadable file: whatever else follows from it would only mislead
        raise ConfigError(out.problems)
    raw = interpolate(raw, env, out, "")
    settings = normalize(raw, out)
    apply_environment(settings, env)
    config, run_problems = build(settings, env, out)
    if out.problems:
        raise ConfigError(out.problems)
    return LoadedConfig(config, tuple(out.warnings), tuple(run_problems))


def load_mqtt_settings(path: Optional[str] = None, environ: Optional[Mapping[str, str]] = None,
                       cwd: Optional[str] = None, broker_url: Optional[str] = None,
                       client_id: str = "") -> MqttSettings:
    """Only the broker settings, from the same sources as the agent (for operator commands):
    problems in other keys (a missing API key, no agent id) do not matter here."""
    env = merged_environment(path, dict(os.environ if environ is None else environ), cwd)
    out = Collector()
    raw = read_toml(path, out) if path else {}
    raw = interpolate({"mqtt": raw.get("mqtt", {})} if isinstance(raw.get("mqtt"), dict) else {}, env, out, "")
    settings = normalize(raw, Collector())
    apply_environment(settings, env)
    if broker_url:
        settings["mqtt.broker_url"] = Value(broker_url, "--broker-url")
        settings.pop("mqtt.env_host", None)
        settings.pop("mqtt.env_port", None)
    if client_id:
        settings["mqtt.client_id"] = Value(client_id, "client id")
    mqtt = build_mqtt(Reader(settings, out), env, "operator")
    if out.problems:
        raise ConfigError(out.problems)
    return mqtt


def load_tracing_settings(path: Optional[str] = None, environ: Optional[Mapping[str, str]] = None,
                          cwd: Optional[str] = None) -> TracingSettings:
    """The OTEL_* settings (from the environment and `.env` files, as the agent reads them), for
    an operator command that starts a trace."""
    out = Collector()
    settings = build_tracing(merged_environment(path, dict(os.environ if environ is None else environ), cwd), out)
    if out.problems:
        raise ConfigError(out.problems)
    return settings


__all__ = ["BUILTIN_OPTIONS", "OFFICIAL_BASE_URL", "AgentConfig", "BudgetSettings", "ConfigError", "GatekeeperSettings",
           "LlmSettings", "LoadedConfig", "McpServerSpec", "MqttSettings", "RoutingSettings", "Secret", "ToolSpec",
           "TracingSettings", "load_config", "load_mqtt_settings", "load_tracing_settings", "masked_view",
           "merged_environment"]
