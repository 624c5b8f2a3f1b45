"""From flat settings to `AgentConfig`: every value type- and range-checked, every problem
collected (not raised) so that all are reported at once, with the key or variable to fix."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import replace
from typing import Any, Mapping, Optional
from urllib.parse import unquote, urlsplit

from ..protocol import dead_letter_topic
from .mcp_servers import build_mcp_servers
from .model import (APPROVAL_TIMEOUT, AgentConfig, BASE_URL_ENV, BUILTIN_OPTIONS, BUILTIN_TOOLS, BudgetSettings,
                    DEFAULT_MODELS, GatekeeperSettings, KEY_ENV, LOG_LEVELS, LlmSettings, MASK, MqttSettings,
                    OFFICIAL_KEY_PREFIX, PROVIDERS, ROUTER_MAX_TOKENS, ROUTER_PROVIDERS, ROUTER_TEMPERATURE,
                    ROUTER_TIMEOUT, RoutingSettings, Secret, ToolSpec)
from .reader import Reader, is_http_url, table_reader
from .sources import FALLBACK_KEYS, TOOL_KEYS, Collector, Value, warn_unknown
from .tracing import build_tracing

_AGENT_ID_RE = re.compile(r"^[A-Za-z0-9._-]{3,64}$")
_INSTANCE_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")  # e.g. a StatefulSet ordinal or pod name
_HOST_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
# The defaults, as model.py declares them once (tests build settings from there too)
AGENT = AgentConfig(agent_id="")
MQTT = MqttSettings()
BUDGET = BudgetSettings()
ROUTING = RoutingSettings(strategy="")
GATEKEEPER = GatekeeperSettings(url="")
TOOL = ToolSpec(name="", kind="")


def build(settings: dict, env: Mapping[str, str], out: Collector) -> tuple[AgentConfig, list]:
    read = Reader(settings, out)
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
    workers = read.integer("max_pipeline_depth", AGENT.max_pipeline_depth, 1, 32)
    config = AgentConfig(
        agent_id=agent_id,
        instance_id=instance_id,
        description=read.string("description", "") or "",
        capabilities=tuple(capabilities),
        max_pipeline_depth=workers,
        max_envelope_depth=read.integer("max_envelope_depth", max(AGENT.max_envelope_depth, workers), 1, 32),
        task_timeout=read.integer("task_timeout", AGENT.task_timeout, 30, 3600),
        result_expiry=read.integer("result_expiry", AGENT.result_expiry, 1, 4294967295),
        max_output_size=read.integer("max_output_size", AGENT.max_output_size, 1024),
        max_message_size=read.integer("max_message_size", AGENT.max_message_size, 1024, 268435455),
        state_dir=state_dir or None,
        completed_store_size=read.integer("completed_store_size", AGENT.completed_store_size, 1),
        heartbeat_interval=read.integer("heartbeat_interval", AGENT.heartbeat_interval, 1, 86400),
        shutdown_grace=read.integer("shutdown_grace", AGENT.shutdown_grace, 0, 3600),
        progress=read.boolean("progress", AGENT.progress),
        dead_letter_topic=_dead_letter_topic(read, agent_id),
        log_level=read.choice("log_level", AGENT.log_level, LOG_LEVELS + ("WARNING",),
                              str.upper).replace("WARNING", "WARN"),
        log_format=read.choice("log_format", AGENT.log_format, ("json", "text", "auto")),
        log_spans=read.boolean("log_spans", AGENT.log_spans),
        health_port=read.integer("health_port", AGENT.health_port, 1024, 65535),
        health_bind=read.string("health_bind", AGENT.health_bind, allow_empty=False),
        mqtt=build_mqtt(read, env, agent_id if instance_id is None else f"{agent_id}-{instance_id}"),
        llm=llm,
        budget=_build_budget(read),
        tools=tuple(_build_tools(read, env)),
        mcp_servers=build_mcp_servers(read.raw("mcp_servers", []), out),
        routing=_build_routing(read, env, llm, run_problems),
        tracing=build_tracing(env, out),
    )
    return config, run_problems


def _dead_letter_topic(read: Reader, agent_id: str) -> str:
    """Default `/control/agents/{agent_id}/dead-letter`; set empty to turn it off."""
    topic = read.string("dead_letter_topic", dead_letter_topic(agent_id))
    if topic and (any(c in topic for c in "+#") or len(topic.encode("utf-8", "replace")) > 65535):
        read.out.problem(f"{read.origin('dead_letter_topic')} must be an MQTT topic name without wildcards (+, #), "
                         f"e.g. {dead_letter_topic(agent_id)}; or empty to turn it off")
    return topic or ""


def build_mqtt(read: Reader, env: Mapping[str, str], client_name: str) -> MqttSettings:
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
        read.bad("mqtt.qos", qos, "is not supported: tasks are taken at QoS 1 (for answers exactly once on the wire, "
                                  "set [mqtt] outcome_qos = 2)")
    paths = {}
    for key in ("ca_cert_path", "client_cert_path", "client_key_path"):
        value = read.string(f"mqtt.{key}")
        if value and not os.path.isfile(value):
            read.bad(f"mqtt.{key}", value, "is not a readable file")
        paths[key] = value or None
    if bool(paths["client_cert_path"]) != bool(paths["client_key_path"]):
        read.out.problem("[mqtt] client_cert_path and client_key_path must be given together")
    given = str(read.raw("mqtt.protocol", MQTT.protocol)).strip().lower()
    protocol = {"auto": "auto", "5": "5", "5.0": "5", "3.1.1": "3.1.1", "311": "3.1.1", "4": "3.1.1"}.get(given)
    if protocol is None:
        read.bad("mqtt.protocol", read.raw("mqtt.protocol"), 'must be "auto", "5" or "3.1.1"')
        protocol = "auto"
    client_id = read.string("mqtt.client_id", "") or f"agent2389-{client_name}"
    if len(client_id.encode("utf-8")) > 65535:
        read.bad("mqtt.client_id", "...", "is too long")
    return MqttSettings(
        broker_url=f"{scheme}://{host}:{port}", host=host, port=port, tls=scheme == "mqtts",
        username=username or None, password=password, client_id=client_id, protocol=protocol,
        session_expiry=read.integer("mqtt.session_expiry", MQTT.session_expiry, 0, 4294967295),
        keep_alive=read.integer("mqtt.keep_alive", MQTT.keep_alive, 5, 65535),
        outcome_qos=read.integer("mqtt.outcome_qos", MQTT.outcome_qos, 1, 2),
        ca_cert_path=paths["ca_cert_path"], client_cert_path=paths["client_cert_path"],
        client_key_path=paths["client_key_path"], client_key_password=read.secret("mqtt.client_key_password"),
        tls_insecure_skip_verify=read.boolean("mqtt.tls_insecure_skip_verify", MQTT.tls_insecure_skip_verify),
    )


def _broker_address(read: Reader) -> tuple[str, str, int, Optional[str], Optional[Secret]]:
    """Scheme, host, port and the URL's credentials (`mqtt://user:pass@host`, percent-decoded)."""
    url = read.string("mqtt.broker_url", MQTT.broker_url) or MQTT.broker_url
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
        read.bad("mqtt.broker_url", url, "must look like mqtt://host:1883 or mqtts://host:8883 (port 1-65535)")
        host = "localhost"  # said once: the URL's host is not judged again below
    if read.raw("mqtt.env_host"):
        host = read.raw("mqtt.env_host").strip()
    if read.raw("mqtt.env_port"):
        port = read.integer("mqtt.env_port", port, 1, 65535)
        scheme = "mqtts" if port == 8883 else scheme
    if not _valid_host(host):
        key = "mqtt.env_host" if read.raw("mqtt.env_host") else "mqtt.broker_url"
        read.bad(key, host, "is not a valid hostname or IP address")
    return scheme, host, port, user, password


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    return 0 < len(host) <= 253 and all(_HOST_LABEL_RE.match(label) for label in labels)


def _build_llm(read: Reader, env: Mapping[str, str], run_problems: list) -> LlmSettings:
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
            if key in FALLBACK_KEYS:
                sub[f"llm.{key}"] = Value(value, f"{origin} {key}")
            else:
                warn_unknown(read.out, origin, key, list(FALLBACK_KEYS))
        sub_reader = Reader(sub, read.out)
        if "llm.provider" not in sub:
            read.out.problem(f"{origin} needs a provider ({', '.join(PROVIDERS)})")
            continue
        sub_provider = sub_reader.choice("llm.provider", "echo", PROVIDERS)
        fallbacks.append(_llm_settings(sub_reader, env, run_problems, sub_provider, "llm.", inherit=primary))
    return replace(primary, fallback=tuple(fallbacks), prices=_prices(read),
                   fleet_cooldowns=read.boolean("llm.fleet_cooldowns", True))


def _infer_provider(read: Reader, env: Mapping[str, str]) -> str:
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


def _llm_settings(read: Reader, env: Mapping[str, str], run_problems: list, provider: str, prefix: str,
                  inherit: Optional[LlmSettings]) -> LlmSettings:
    base = inherit or LlmSettings()
    model = read.string(f"{prefix}model", None, allow_empty=False)
    if model is None:
        model = DEFAULT_MODELS[provider]
    base_url = (read.string(f"{prefix}base_url")
                or (env.get(BASE_URL_ENV[provider]) if provider in BASE_URL_ENV else None))
    if base_url:
        if not is_http_url(base_url):
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
        latency_ms=read.integer(f"{prefix}latency_ms", base.latency_ms, 0, 600000),
        requests_per_minute=read.integer(f"{prefix}requests_per_minute", None, 1, 10 ** 7),
        tokens_per_minute=read.integer(f"{prefix}tokens_per_minute", None, 1, 10 ** 12),
    )


def _api_key(read: Reader, env: Mapping[str, str], provider: str, prefix: str) -> tuple[Optional[Secret], str]:
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


def _build_budget(read: Reader) -> BudgetSettings:
    return BudgetSettings(
        max_tool_calls=read.integer("budget.max_tool_calls", BUDGET.max_tool_calls, 0, 1000),
        max_iterations=read.integer("budget.max_iterations", BUDGET.max_iterations, 1, 1000),
        max_tokens_per_task=read.integer("budget.max_tokens_per_task", None, 1, _MAX_TOKENS),
        max_cost_usd_per_task=read.number("budget.max_cost_usd_per_task", None, 0.0, _MAX_USD),
        max_tokens_per_conversation=read.integer("budget.max_tokens_per_conversation", None, 1, _MAX_TOKENS),
        max_cost_usd_per_conversation=read.number("budget.max_cost_usd_per_conversation", None, 0.0, _MAX_USD))


_MAX_TOKENS, _MAX_USD = 10 ** 12, 10.0 ** 9
_WEEK = 7 * 86400


def _prices(read: Reader) -> tuple:
    """`[llm.prices."MODEL"] input_per_mtok = 2.5, output_per_mtok = 10.0` (USD per million tokens)."""
    table = read.raw("llm.prices", {})
    if not isinstance(table, dict):
        read.out.problem("[llm] prices must be a table of models: [llm.prices.\"gpt-4o\"] input_per_mtok = 2.5, "
                         "output_per_mtok = 10.0")
        return ()
    prices = []
    for model, price in table.items():
        where = f"[llm.prices.\"{model}\"]"
        if not isinstance(price, dict) or set(price) != {"input_per_mtok", "output_per_mtok"}:
            read.out.problem(f"{where} needs exactly input_per_mtok and output_per_mtok (USD per million tokens)")
            continue
        values = [price[key] for key in ("input_per_mtok", "output_per_mtok")]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1e6 for v in values):
            read.out.problem(f"{where} input_per_mtok and output_per_mtok must be numbers from 0 to 1000000 (USD per "
                             f"million tokens), got {values[0]!r} and {values[1]!r}")
            continue
        prices.append((str(model), float(values[0]), float(values[1])))
    return tuple(prices)


def _build_tools(read: Reader, env: Mapping[str, str]) -> list[ToolSpec]:
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


def _build_tool(out: Collector, origin: str, name: Any, table: Any, env: Mapping[str, str]) -> Optional[ToolSpec]:
    if not isinstance(table, dict):
        out.problem(f"{origin} must be \"builtin\" or a table")
        return None
    if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9_-]{1,64}$", name):
        out.problem(f"{origin}: tool name {name!r} must be 1-64 letters, digits, '_' or '-'")
        return None
    reader = table_reader(out, origin, table, TOOL_KEYS)
    impl = reader.string("impl", "external" if "command" in table else "builtin")
    timeout = reader.number("timeout", TOOL.timeout, 0.1, 3600.0)
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
    common: dict[str, Any] = dict(timeout=timeout, schema=schema, description=reader.string("description", "") or "",
                  env=tuple(env_names), options=options,
                  requires_approval=reader.boolean("requires_approval", False),
                  approval_timeout=reader.integer("approval_timeout", APPROVAL_TIMEOUT, 1, _WEEK))
    if impl == "builtin":
        if name not in BUILTIN_TOOLS:
            out.problem(f"{origin}: there is no builtin tool named {name!r} (builtins: {', '.join(BUILTIN_TOOLS)})")
            return None
        common["options"] = options = _builtin_options(out, origin, name, options)
        key_var = options.get("api_key_env", BUILTIN_OPTIONS[name].get("api_key_env"))
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


def _builtin_options(out: Collector, origin: str, name: str, options: dict) -> dict:
    """A builtin tool's `config` table, each option of the type BUILTIN_OPTIONS gives it (a bad one
    is a problem, and its default is used meanwhile)."""
    declared = BUILTIN_OPTIONS[name]
    read = table_reader(out, f"{origin} config", options, tuple(declared))
    checked: dict = {}
    for key, default in declared.items():
        if not read.has(key):
            continue
        if isinstance(default, bool):
            checked[key] = read.boolean(key, default)
        elif isinstance(default, int):
            checked[key] = read.integer(key, default, 0)
        elif isinstance(default, list):
            checked[key] = read.strings(key, default)
        elif key == "endpoint":
            checked[key] = read.http_url(key, default) or default
        else:
            checked[key] = read.string(key, default, allow_empty=False)
    return checked


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


def _build_routing(read: Reader, env: Mapping[str, str], llm: LlmSettings,
                   run_problems: list) -> Optional[RoutingSettings]:
    table = read.raw("routing")
    if not isinstance(table, dict):
        return None
    flat = {}
    for key, value in table.items():
        if isinstance(value, dict):  # [routing.llm] timeout is the router's request timeout
            flat.update({f"routing.{key}.{'request_timeout' if k == 'timeout' else k}": Value(v, f"[routing.{key}] {k}")
                         for k, v in value.items()})
        else:
            flat[f"routing.{key}"] = Value(value, f"[routing] {key}")
    reader = Reader(flat, read.out)
    if "strategy" not in table:
        read.out.problem('[routing] needs strategy = "llm" or "gatekeeper"')
    strategy = reader.choice("routing.strategy", "llm", ("llm", "gatekeeper"))
    max_iterations = reader.integer("routing.max_iterations", ROUTING.max_iterations, 1, 1000)
    if not isinstance(table.get(strategy), dict):
        read.out.problem(f'[routing] strategy = "{strategy}" needs a [routing.{strategy}] table')
        return RoutingSettings(strategy, max_iterations)
    if strategy == "gatekeeper":
        url = reader.http_url("routing.gatekeeper.url", "http://gatekeeper:8000/route")
        if not reader.has("routing.gatekeeper.url"):
            read.out.problem("[routing.gatekeeper] needs url = \"http://...\", e.g. http://gatekeeper:8000/route")
        return RoutingSettings(strategy, max_iterations, gatekeeper=GatekeeperSettings(
            url or "", reader.integer("routing.gatekeeper.timeout_ms", GATEKEEPER.timeout_ms, 1, 600000),
            reader.integer("routing.gatekeeper.retry_attempts", GATEKEEPER.retry_attempts, 1, 20)))
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
