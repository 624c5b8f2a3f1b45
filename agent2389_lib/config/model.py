"""The configuration as the rest of the agent sees it: frozen dataclasses, `Secret` (a string
that never prints its value), the defaults, and the masked view that check-config prints."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional

from ..redaction import mask_url_credentials

PROVIDERS = ("openai", "anthropic", "echo")
_MIB = 1 << 20
# Each builtin tool's `config` options with their defaults, whose types are the options' types (a
# list holds strings, a whole number is at least 0, `endpoint` is an http(s) URL): checked when the
# configuration is read, so check-config refuses what `run` would.
BUILTIN_OPTIONS: dict[str, dict[str, Any]] = {
    "echo": {},
    "http_request": {"max_response_size": _MIB, "allowed_hosts": [], "allow_private_networks": False,
                     "max_redirects": 5},
    "file_read": {"allowed_paths": [], "max_size": _MIB},
    "file_write": {"allowed_paths": [], "max_size": _MIB},
    "web_search": {"endpoint": "https://google.serper.dev/search", "api_key_env": "SERPER_API_KEY"},
}
BUILTIN_TOOLS = tuple(BUILTIN_OPTIONS)
DEFAULT_MODELS = {"openai": "gpt-4o", "anthropic": "claude-sonnet-4-20250514", "echo": "echo"}
OFFICIAL_KEY_PREFIX = {"openai": "sk-", "anthropic": "sk-ant-"}
KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
BASE_URL_ENV = {"openai": "OPENAI_BASE_URL", "anthropic": "ANTHROPIC_BASE_URL"}
OFFICIAL_BASE_URL = {"openai": "https://api.openai.com/v1", "anthropic": "https://api.anthropic.com"}
LOG_LEVELS = ("ERROR", "WARN", "INFO", "DEBUG")
MASK = "********"
ROUTER_PROVIDERS = ("openai", "anthropic")
ROUTER_TEMPERATURE = 0.1
ROUTER_MAX_TOKENS = 500
ROUTER_TIMEOUT = 30.0


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
    outcome_qos: int = 1  # answers, errors and forwards; 2: exactly once on the wire
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
    prices: tuple = ()  # (model, USD per million input tokens, per million output tokens), `[llm.prices."MODEL"]`
    requests_per_minute: Optional[int] = None  # client-side limits, shared by a pool's live members
    tokens_per_minute: Optional[int] = None
    fleet_cooldowns: bool = True  # PROTOCOL.md 8: publish the rate limits met, and hold to the fleet's


@dataclass(frozen=True)
class BudgetSettings:
    max_tool_calls: int = 15
    max_iterations: int = 8
    # PROTOCOL.md 8: this agent's own limits on one task's LLM spend, and the budget it gives a
    # conversation it starts (an envelope without one); None: no limit
    max_tokens_per_task: Optional[int] = None
    max_cost_usd_per_task: Optional[float] = None
    max_tokens_per_conversation: Optional[int] = None
    max_cost_usd_per_conversation: Optional[float] = None


APPROVAL_TIMEOUT = 900  # seconds a person has to decide (PROTOCOL.md 9)


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
    requires_approval: bool = False  # PROTOCOL.md 9: a person says yes first
    approval_timeout: int = APPROVAL_TIMEOUT  # seconds; then the call is denied (by "timeout")


@dataclass(frozen=True)
class McpServerSpec:
    """One `[[mcp_servers]]` entry: a stdio server (`command`) or a streamable HTTP one (`url`)."""

    name: str
    command: tuple = ()  # argv: the program, then its args
    url: Optional[str] = None
    env: tuple = ()  # (name, value) pairs; a value is a Secret when its name looks like a credential
    headers: tuple = ()  # (name, value) pairs, the same way
    cwd: Optional[str] = None
    timeout: float = 30.0  # seconds per call, never past the task deadline
    startup_timeout: float = 30.0  # seconds for the process to start and answer initialize and tools/list
    required: bool = False  # /ready is 503 while it is down
    approval_tools: tuple = ()  # its tools that need a person's approval (PROTOCOL.md 9)
    approval_timeout: int = APPROVAL_TIMEOUT  # for them and for the server's elicitation requests
    allowed_tools: Optional[tuple] = None
    denied_tools: tuple = ()


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
class TracingSettings:
    """From OpenTelemetry's standard OTEL_* variables, checked here; the SDK reads the others it
    honours (the exporter's headers, timeout, compression; the resource) from the environment."""

    enabled: bool = True  # OTEL_SDK_DISABLED=true: no spans of our own, contexts passed through
    propagate_http: bool = True  # OTEL_PROPAGATORS=none: HTTP requests carry no trace context
    endpoint: str = ""  # the OTLP/HTTP traces URL; "" = no export
    sampler: str = "parentbased_always_on"  # OTEL_TRACES_SAMPLER
    sampler_ratio: float = 1.0  # OTEL_TRACES_SAMPLER_ARG, for the traceidratio samplers
    max_queue_size: int = 2048  # spans waiting for export; more are dropped (and counted)
    max_export_batch_size: int = 512
    schedule_delay: float = 5.0  # seconds between exports
    export_timeout: float = 30.0  # seconds an export may take before its spans are dropped


@dataclass(frozen=True)
class AgentConfig:
    agent_id: str
    instance_id: Optional[str] = None  # set: a member of the pool serving agent_id (shared subscription)
    description: str = ""
    capabilities: tuple = ()
    max_pipeline_depth: int = 16  # worker threads: tasks processed at once
    max_envelope_depth: int = 16  # deeper envelopes (1 + nested `next`) are answered pipeline_depth_exceeded
    task_timeout: int = 300
    result_expiry: Optional[int] = None  # seconds: the MQTT 5 Message Expiry Interval of answers and errors
    max_output_size: int = 1048576
    max_message_size: int = 262144
    state_dir: Optional[str] = None
    completed_store_size: int = 10000
    heartbeat_interval: int = 60
    shutdown_grace: int = 30
    progress: bool = True
    dead_letter_topic: str = ""  # where refused outcomes go; "" = nowhere (the loader defaults it per agent)
    log_level: str = "INFO"
    log_format: str = "auto"  # text on a terminal, JSON otherwise
    log_spans: bool = False
    health_port: int = 8080
    health_bind: str = "0.0.0.0"
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    llm: LlmSettings = field(default_factory=LlmSettings)
    budget: BudgetSettings = field(default_factory=BudgetSettings)
    tools: tuple = ()  # of ToolSpec
    mcp_servers: tuple = ()  # of McpServerSpec
    routing: Optional[RoutingSettings] = None
    tracing: TracingSettings = field(default_factory=TracingSettings)

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


def masked_view(config: AgentConfig) -> dict:
    """The effective configuration as plain data, secrets and URL passwords masked (for check-config)."""
    def convert(value: Any) -> Any:
        if isinstance(value, Secret):
            return MASK if value else ""
        if isinstance(value, str):
            return mask_url_credentials(value)
        if is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in fields(value)}
        if isinstance(value, (tuple, list)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        return value
    return convert(config)
