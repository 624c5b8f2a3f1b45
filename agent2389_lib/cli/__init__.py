"""Command line: run, check-config, version, tools, and the operator commands inject, monitor,
pipeline and healthcheck."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Optional, Sequence

from .. import __version__

if TYPE_CHECKING:  # imported where used: a command loads only what it needs
    from ..config import TracingSettings
    from ..tracing import TraceContext, Tracer

EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130  # what a shell reports for a command ended by SIGINT
_SESSION_SLACK = 30.0  # seconds the broker keeps a waiting command's session beyond its wait
_EXPORT_GRACE = 5.0  # seconds `inject` waits at exit to send its span, when it exports one


def _add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", metavar="FILE",
                        help="TOML config file (default: $AGENT2389_CONFIG; else $AGENT2389_DEFAULT_CONFIG when that "
                             "file exists; environment variables alone are enough)")


def config_path(given: Optional[str]) -> Optional[str]:
    """--config; else $AGENT2389_CONFIG, which must exist; else $AGENT2389_DEFAULT_CONFIG when it
    exists (the container image's optional mount, /app/config/agent.toml)."""
    if given:
        return given
    explicit = os.environ.get("AGENT2389_CONFIG")
    if explicit:
        if not os.path.isfile(explicit):
            print(f"config error: AGENT2389_CONFIG={explicit} names a file that does not exist (unset it to configure "
                  f"from the environment alone)", file=sys.stderr)
            sys.exit(EXIT_CONFIG)
        return explicit
    default = os.environ.get("AGENT2389_DEFAULT_CONFIG")
    return default if default and os.path.isfile(default) else None


def _add_broker_args(parser: argparse.ArgumentParser) -> None:
    _add_config_arg(parser)
    parser.add_argument("--broker-url", metavar="URL",
                        help="broker to use, e.g. mqtt://localhost:1883 (default: the agent's configuration, "
                             "MQTT_HOST/MQTT_PORT)")


_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> int:
    """Whole seconds from `90`, `90s`, `15m`, `2h` or `1d` (argparse reports a ValueError as a usage error)."""
    number, unit = text.strip()[:-1], text.strip()[-1:].lower()
    if unit.isdigit():
        number, unit = text.strip(), ""
    if unit not in _DURATION_UNITS or not number.isdigit() or int(number) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: a positive whole number of seconds, "
                                         f"optionally with s, m, h or d (e.g. 90, 15m, 2h)")
    return int(number) * _DURATION_UNITS[unit]


def _add_wait_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", nargs="?", type=float, const=120.0, metavar="SECONDS",
                        help="wait for the answer (default 120 s): exit 0 on a response, 1 on an error, 124 on "
                             "timeout; the agents' progress events are shown on stderr meanwhile")
    parser.add_argument("--quiet", "-q", action="store_true", help="with --wait: no progress on stderr")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--expires-in", type=_duration, metavar="DURATION",
                        help="the task is not run after this (e.g. 90, 90s, 15m, 2h): sets its expires_at and, on "
                             "MQTT 5, its Message Expiry Interval, so a broker drops it while its agent is away")
    parser.add_argument("--no-check", action="store_true",
                        help="publish even when the agent has not announced itself (its retained status is missing "
                             "or unavailable); for an agent that is away, the task waits in its broker session")


def _command(sub, name: str, help_text: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_text, description=help_text, epilog=f"example: {example}",
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agent2389", description="2389 Agent Protocol agent: takes tasks over MQTT and answers them.")
    parser.add_argument("--version", action="version", version=f"agent2389 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_config_arg(_command(sub, "run", "run the agent until SIGTERM/SIGINT",
                             "agent2389 run --config agent.toml.example"))
    _add_config_arg(_command(sub, "check-config", "validate the configuration and print it with secrets masked",
                             "AGENT_ID=a1 OPENAI_API_KEY=sk-... agent2389 check-config"))
    _command(sub, "version", "print the version", "agent2389 version")

    inject = _command(sub, "inject", "publish a task to an agent (and optionally wait for the answer)",
                      "agent2389 inject --agent-id researcher --message 'Summarise MQTT' --next writer --wait")
    inject.add_argument("--agent-id", required=True, help="the agent to send the task to")
    payload = inject.add_mutually_exclusive_group()
    payload.add_argument("--message", help="text, sent as input.message")
    payload.add_argument("--input", metavar="JSON", help="the whole input as JSON")
    inject.add_argument("--instruction", help="what the agent should do")
    inject.add_argument("--conversation-id", help="default: a new one")
    inject.add_argument("--next", metavar="A,B,...", help="agents that handle the result next, in order")
    inject.add_argument("--tool", help="ask the agent to call this tool (input.tool_request)")
    inject.add_argument("--tool-params", metavar="JSON", default="{}", help="the tool's parameters")
    inject.add_argument("--v2", action="store_true",
                        help="send a v2 envelope with a workflow context; with --wait, wait for the workflow's final "
                             "answer and print the route it took")
    inject.add_argument("--query", help="v2: the original query (default: the instruction or message)")
    inject.add_argument("--traceparent", help="continue this W3C trace (default: a new trace; its id is printed)")
    _add_wait_args(inject)
    _add_broker_args(inject)

    monitor = _command(sub, "monitor", "print the protocol messages on the broker as they pass",
                       "agent2389 monitor --mode conversations --format json")
    monitor.add_argument("--mode", choices=("all", "availability", "conversations", "inputs", "progress", "routing"),
                         default="all", help="routing: one line per routed hop (from, to, reason) and workflow end")
    monitor.add_argument("--format", choices=("pretty", "compact", "json"), default="pretty")
    monitor.add_argument("--agent-id", help="only this agent's topics")
    monitor.add_argument("--conversation-id", help="only this conversation")
    monitor.add_argument("--count", type=int, help="exit after this many messages")
    monitor.add_argument("--full", action="store_true",
                         help="pretty and compact: the whole message (default: a bounded summary; json is always "
                              "whole)")
    _add_broker_args(monitor)

    pipeline = _command(sub, "pipeline", "send a research -> write -> edit chain through several agents",
                        "agent2389 pipeline --agents researcher,writer,editor --topic 'MQTT in IoT' --wait")
    pipeline.add_argument("--agents", default="researcher-agent,writer-agent,editor-agent", metavar="A,B,C",
                          help="the agents, in order (default: researcher-agent,writer-agent,editor-agent)")
    pipeline.add_argument("--topic", required=True, help="what the pipeline works on")
    pipeline.add_argument("--instruction", action="append", metavar="TEXT",
                          help="a stage's instruction; give one per agent, in order (default: by each agent's role as "
                               "its id names it: research, writ(e), edit, review, judg(e), summar(ise))")
    pipeline.add_argument("--conversation-id", help="default: a new one")
    _add_wait_args(pipeline)
    _add_broker_args(pipeline)

    cancel = _command(sub, "cancel", "cancel a task wherever it is in its pipeline (and optionally follow the cancel)",
                      "agent2389 cancel --agent-id researcher --task-id 3f6c... --reason 'wrong input' --wait")
    cancel.add_argument("--agent-id", required=True, help="the agent the task was sent to (the cancel follows it)")
    cancel.add_argument("--task-id", required=True, help="the task's id (a UUID)")
    cancel.add_argument("--conversation-id", help="its conversation (narrows what --wait listens to)")
    cancel.add_argument("--reason", default="", help="why, at most 500 characters (in the canceled error)")
    cancel.add_argument("--wait", nargs="?", type=float, const=30.0, metavar="SECONDS",
                        help="follow the cancel (default 30 s): print where each agent found the task and how it "
                             "ended; exit 0 when it was canceled, 1 when it had ended already, 124 on timeout")
    cancel.add_argument("--json", action="store_true", help="machine-readable output")
    _add_broker_args(cancel)

    approvals = _command(sub, "approvals", "list the tool calls and MCP questions waiting for a person; decide them",
                         "agent2389 approvals approve 9b2f... --reason 'checked the diff'")
    approval_commands = approvals.add_subparsers(dest="approvals_command", metavar="list|approve|deny")
    approval_commands.required = True
    listing = approval_commands.add_parser("list", help="the approvals waiting now (the agents' retained requests)")
    listing.add_argument("--agent-id", help="only this agent's")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    _add_broker_args(listing)
    for verb, help_text in (("approve", "approve: the tool runs (an MCP question is answered with --content)"),
                            ("deny", "deny: the LLM hears who denied the call, and why")):
        deciding = approval_commands.add_parser(verb, help=help_text)
        deciding.add_argument("approval_id", help="as `approvals list` shows it")
        deciding.add_argument("--agent-id", help="the agent that asked (default: found from the pending approvals)")
        deciding.add_argument("--reason", default="", required=verb == "deny", help="why, at most 500 characters")
        deciding.add_argument("--by", default=_operator_name(), help="who decides (default: your user name)")
        if verb == "approve":
            deciding.add_argument("--content", metavar="JSON",
                                  help="an MCP question's answer, checked against the schema the server asked with")
        _add_broker_args(deciding)

    gateway = _command(sub, "gateway", "serve the available agents to A2A clients: an A2A v1.0 gateway (JSON-RPC, "
                       "streaming) in front of the broker",
                       "agent2389 gateway --listen 127.0.0.1:8389 --auth-token-file tokens.txt")
    gateway.add_argument("--listen", default="127.0.0.1:8389", metavar="HOST:PORT",
                         help="where to serve (default 127.0.0.1:8389: this machine only)")
    gateway.add_argument("--public-url", metavar="URL", help="the base URL the cards give clients (behind a proxy "
                                                             "or an ingress; default: the --listen address)")
    gateway.add_argument("--auth-token-file", metavar="FILE",
                         help="bearer tokens, one a line: every JSON-RPC request needs one of them")
    gateway.add_argument("--tls-cert", metavar="FILE", help="serve HTTPS with this certificate chain (PEM)")
    gateway.add_argument("--tls-key", metavar="FILE", help="and its private key (PEM)")
    gateway.add_argument("--state", default="agent2389-gateway.sqlite3", metavar="FILE",
                         help="the A2A tasks, kept across restarts (default ./agent2389-gateway.sqlite3)")
    gateway.add_argument("--name", default="gateway", help="this gateway's name: its MQTT client id is "
                                                           "agent2389-gateway-NAME (one per gateway process)")
    gateway.add_argument("--send-wait", type=float, default=300.0, metavar="SECONDS",
                         help="how long SendMessage waits for a task to finish or need input (default 300)")
    _add_broker_args(gateway)

    tools = _command(sub, "tools", "list the tools the agent would offer the LLM, or run one, from a configuration "
                     "(MCP servers are started to ask them; no broker or LLM needed)",
                     "agent2389 tools call time__get_current_time --args '{\"timezone\": \"UTC\"}' "
                     "-c agent.toml.example")
    tool_commands = tools.add_subparsers(dest="tools_command", metavar="list|call")
    tool_commands.required = True
    tools_list = tool_commands.add_parser("list", help="every tool: name, where it comes from, description")
    tools_list.add_argument("--json", action="store_true", help="also the input schemas and MCP server states, as JSON")
    _add_config_arg(tools_list)
    tools_call = tool_commands.add_parser("call", help="run one tool and print its result (exit 1 if it failed)")
    tools_call.add_argument("name", help="the tool's name as the LLM sees it (an MCP tool: SERVER__TOOL)")
    tools_call.add_argument("--args", default="{}", metavar="JSON", help="its arguments, a JSON object")
    _add_config_arg(tools_call)

    health = _command(sub, "healthcheck", "probe the agent's health endpoint: exit 0 when healthy, 1 otherwise "
                      "(the container HEALTHCHECK; needs no curl or wget)", "agent2389 healthcheck --endpoint ready")
    health.add_argument("--endpoint", choices=("health", "live", "ready"), default="health")
    health.add_argument("--host", default="127.0.0.1")
    health.add_argument("--port", type=int, action="append",
                        help="default: HEALTH_PORT, else 8080; give it several times to probe several agents")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds one probe may take")
    health.add_argument("--wait", type=float, metavar="SECONDS",
                        help="probe again until healthy, for at most this long, then say what each port answered")
    health.add_argument("-v", "--verbose", action="store_true", help="print what the endpoint answered")
    return parser


# ---------------------------------------------------------------- agent commands

def _load_or_exit(path: Optional[str]):
    from ..config import ConfigError, load_config
    try:
        return load_config(config_path(path))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        sys.exit(EXIT_CONFIG)


def _check_config(args: argparse.Namespace) -> int:
    from ..config import masked_view
    loaded = _load_or_exit(args.config)
    for warning in loaded.warnings:
        print(f"config warning: {warning}", file=sys.stderr)
    for problem in loaded.run_problems:
        print(f"config warning: {problem} (`run` will refuse to start)", file=sys.stderr)
    print(json.dumps(masked_view(loaded.config), indent=2, sort_keys=True))
    return 0


def _run(args: argparse.Namespace) -> int:
    """Logging is configured before anything is said, so every line (config warnings too) has
    the configured format."""
    import logging
    from ..logs import configure_logging
    loaded = _load_or_exit(args.config)
    config = loaded.config
    configure_logging(config.log_level, config.log_format, config.secrets(), spans=config.log_spans)
    log = logging.getLogger("agent2389.config")
    for warning in loaded.warnings:
        log.warning("config warning: %s", warning)
    for problem in loaded.run_problems:
        log.error("config error: %s", problem)
    if loaded.run_problems:
        return EXIT_CONFIG
    from ..runtime import run_agent
    return run_agent(config)


# ---------------------------------------------------------------- operator commands

def _client(args: argparse.Namespace, session_seconds: Optional[float] = None):
    """Connected, or exit 3 saying why; every lost and regained connection is said on stderr."""
    from ..config import ConfigError, load_mqtt_settings
    from .opsclient import OperatorClient, OperatorError
    try:
        settings = load_mqtt_settings(config_path(args.config), broker_url=args.broker_url)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    client = OperatorClient(settings, session_seconds)
    client.on_connection_change = lambda text: print(text, file=sys.stderr, flush=True)
    try:
        client.connect()
    except OperatorError as exc:
        from .ops import EXIT_UNAVAILABLE
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_UNAVAILABLE)
    return client


def _json_arg(parser_name: str, value: Optional[str]):
    try:
        return json.loads(value) if value is not None else None
    except ValueError as exc:
        print(f"error: {parser_name} is not valid JSON: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)


def _deliver(args: argparse.Namespace, task: dict) -> int:
    """Publish `task` as the first span of a trace (or in the one `--traceparent` names)."""
    from .. import tracing
    from ..config import ConfigError, load_tracing_settings
    from ..protocol import utc_millis
    given = getattr(args, "traceparent", None)
    parent = tracing.parse(given)
    if given is not None and parent is None:
        print(f"error: --traceparent {given!r} is not a W3C traceparent (00-<32 hex digits: trace id>-<16 hex "
              f"digits: parent span id>-<2 hex digits: flags>)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        tracer = _tracer(load_tracing_settings(config_path(args.config)))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    try:
        context = _send_span(tracer, task["topic"], parent)
        if args.expires_in:
            task = {**task, "expires_at": utc_millis(time.time() + args.expires_in)}
        return _publish(args, {**task, **context.fields()} if context else task, context)
    finally:
        tracer.shutdown(_EXPORT_GRACE)


def _tracer(settings: TracingSettings) -> Tracer:
    from ..metrics import Metrics
    from ..tracers import build_tracer
    return build_tracer(settings, "agent2389-cli", Metrics("agent2389-cli", workers=1))


def _send_span(tracer: Tracer, topic: str, parent: Optional[TraceContext]) -> Optional[TraceContext]:
    """The context the task carries: a PRODUCER span of this command's when it is exported, so
    the agents' spans have their parent at the collector; else the `--traceparent` given as it is
    (a span of ours nobody records would break the chain), or a new trace; none at all with
    OTEL_SDK_DISABLED=true and no `--traceparent`."""
    from .. import tracing
    if parent is not None and not tracer.records:
        return parent
    with tracer.span(f"send {topic}", tracing.PRODUCER, {"messaging.system": "mqtt",
                                                         "messaging.destination.name": topic,
                                                         "messaging.operation.type": "send"},
                     parent=parent, task=True) as span:
        return span.context


def _publish(args: argparse.Namespace, task: dict, context: Optional[TraceContext]) -> int:
    from . import ops
    from .opsclient import OperatorError
    client = _client(args, session_seconds=args.wait and args.wait + _SESSION_SLACK)
    show = None if args.quiet or args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        if not args.no_check:
            ops.check_agent(client, task["topic"])
        code, reply = ops.send_task(client, task, args.wait, show, expiry=args.expires_in)
    except OperatorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ops.EXIT_UNAVAILABLE
    finally:
        client.close()
    if args.json:
        print(json.dumps({"task": task, "reply": reply, "timed_out": code == ops.EXIT_TIMEOUT,
                          "trace_id": context.trace_id if context else None}, ensure_ascii=False))
    else:
        route = ops.describe_workflow(reply)
        if route:
            print(route, file=sys.stderr)
        print(ops.describe_reply(reply, task, args.wait), file=sys.stderr if code else sys.stdout)
    return code


def _agent_ids(option: str, values: list[str]) -> list[str]:
    """The ids, or exit 2 naming the first that breaks the agent id rule."""
    from ..protocol import is_valid_agent_id
    for value in values:
        if not is_valid_agent_id(value):
            print(f"error: {option} {value!r} is not a valid agent id (3-64 characters of letters, digits, '.', '_' "
                  f"and '-')", file=sys.stderr)
            sys.exit(EXIT_CONFIG)
    return values


def _inject(args: argparse.Namespace) -> int:
    from . import ops
    _agent_ids("--agent-id", [args.agent_id])
    payload = {"message": args.message} if args.message is not None else _json_arg("--input", args.input)
    if args.tool:
        params = _json_arg("--tool-params", args.tool_params)
        payload = dict(payload) if isinstance(payload, dict) else ({} if payload is None else {"data": payload})
        payload["tool_request"] = {"name": args.tool, "parameters": params}
    chain = ops.next_chain(_agent_ids("--next", [a.strip() for a in args.next.split(",") if a.strip()])) \
        if args.next else None
    task = ops.build_task(args.agent_id, instruction=args.instruction, input=payload,
                          conversation_id=args.conversation_id, next=chain, v2=args.v2, query=args.query)
    return _deliver(args, task)


def _cancel(args: argparse.Namespace) -> int:
    from ..cancels import CancelError, cancel_message, parse_cancel
    from .cancel import describe, send_cancel
    from .ops import EXIT_TIMEOUT, EXIT_UNAVAILABLE
    from .opsclient import OperatorError
    _agent_ids("--agent-id", [args.agent_id])
    try:  # the checks an agent makes, before anything is published
        cancel = parse_cancel(json.dumps({"task_id": args.task_id, "conversation_id": args.conversation_id,
                                          "reason": args.reason}).encode())
    except CancelError as exc:
        print(f"error: {exc} (--task-id, --conversation-id, --reason)", file=sys.stderr)
        return EXIT_CONFIG
    client = _client(args, session_seconds=args.wait and args.wait + _SESSION_SLACK)
    show = (lambda line: None) if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        followed = send_cancel(client, args.agent_id, cancel, args.wait, show)
    except OperatorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    finally:
        client.close()
    code = followed.code() if args.wait is not None else 0
    if args.json:
        print(json.dumps({"cancel": cancel_message(cancel), "findings": followed.findings, "reply": followed.outcome,
                          "timed_out": code == EXIT_TIMEOUT}, ensure_ascii=False))
    else:
        print(describe(followed, cancel, args.wait), file=sys.stderr if code else sys.stdout)
    return code


def _operator_name() -> str:
    import getpass
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container's user without a name
        return "operator"


def _approvals(args: argparse.Namespace) -> int:
    from .approvals import NotWaiting, decide, describe, pending
    from .ops import EXIT_ERROR, EXIT_UNAVAILABLE
    from .opsclient import OperatorError
    if args.agent_id:
        _agent_ids("--agent-id", [args.agent_id])
    content = _json_arg("--content", getattr(args, "content", None))
    if content is not None and not isinstance(content, dict):
        print("error: --content must be a JSON object", file=sys.stderr)
        return EXIT_CONFIG
    client = _client(args)
    try:
        if args.approvals_command == "list":
            for request in pending(client, args.agent_id):
                print(json.dumps(request, ensure_ascii=False) if args.json else describe(request))
            return 0
        request = decide(client, args.approval_id, args.agent_id, args.approvals_command == "approve", args.by,
                         args.reason, content)
    except ValueError as exc:
        print(f"error: {exc}; nothing was sent", file=sys.stderr)
        return EXIT_CONFIG
    except OperatorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR if isinstance(exc, NotWaiting) else EXIT_UNAVAILABLE
    finally:
        client.close()
    done = {"approve": "approved", "deny": "denied"}[args.approvals_command]
    print(f"{done} approval {args.approval_id} (agent {request['agent_id']}, task {request.get('task_id')})")
    return 0


def _gateway(args: argparse.Namespace) -> int:
    import os
    import ssl
    from ..config import ConfigError, load_mqtt_settings
    from ..gateway.run import run_gateway
    from ..logs import configure_logging
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        print(f"error: --listen {args.listen!r} is not HOST:PORT (e.g. 127.0.0.1:8389)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        settings = load_mqtt_settings(config_path(args.config), broker_url=args.broker_url)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    tokens: frozenset = frozenset()
    try:
        if args.auth_token_file:
            with open(args.auth_token_file) as handle:
                tokens = frozenset(line.strip().encode() for line in handle
                                   if line.strip() and not line.lstrip().startswith("#"))
            if not tokens:
                print(f"error: --auth-token-file {args.auth_token_file} holds no token", file=sys.stderr)
                return EXIT_CONFIG
        tls = None
        if args.tls_cert or args.tls_key:
            if not (args.tls_cert and args.tls_key):
                print("error: --tls-cert and --tls-key go together", file=sys.stderr)
                return EXIT_CONFIG
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as exc:
        print(f"error: {exc} (--auth-token-file, --tls-cert, --tls-key)", file=sys.stderr)
        return EXIT_CONFIG
    secrets = [token.decode() for token in tokens] + ([settings.password.reveal()] if settings.password else [])
    configure_logging(os.environ.get("LOG_LEVEL", "INFO"), os.environ.get("LOG_FORMAT", "json"), secrets)
    return run_gateway(settings, host.strip("[]"), int(port), args.state, args.name, tokens, tls, args.public_url,
                       args.send_wait)


def _pipeline(args: argparse.Namespace) -> int:
    from . import ops
    agents = _agent_ids("--agents", [a.strip() for a in args.agents.split(",") if a.strip()])
    if args.instruction and len(args.instruction) != len(agents):
        print(f"error: {len(args.instruction)} --instruction value(s) for {len(agents)} agents ({', '.join(agents)}): "
              f"give one per agent, in order, or none for the defaults", file=sys.stderr)
        return EXIT_CONFIG
    instructions = args.instruction or [ops.default_instruction(agent) for agent in agents]
    task = ops.build_task(agents[0], instruction=instructions[0], input={"topic": args.topic},
                          conversation_id=args.conversation_id, next=ops.next_chain(agents[1:], instructions[1:]))
    return _deliver(args, task)


def _monitor(args: argparse.Namespace) -> int:
    from .. import protocol
    from . import ops
    client = _client(args)
    colour = args.format == "pretty" and sys.stdout.isatty()
    seen = 0
    try:
        topics = ops.monitor_topics(args.mode, args.agent_id, args.conversation_id)
        client.subscribe(topics)
        print(f"monitoring {', '.join(topics)} on {client.where} (Ctrl-C to stop)", file=sys.stderr, flush=True)
        while args.count is None or seen < args.count:
            message = client.next_message(1.0)
            if message is None:
                continue
            if not ops.in_conversation(message.topic, message.payload, args.conversation_id):
                continue
            if args.mode == "routing":
                line = ops.routing_hop(message.topic, message.payload)
                if line is None:
                    continue
                print(f"{protocol.rfc3339()} {line}", flush=True)
            else:
                print(ops.render(message.topic, message.payload, args.format, colour,
                                 user_properties=getattr(message.properties, "UserProperty", ()), full=args.full,
                                 expiry=getattr(message.properties, "MessageExpiryInterval", None)),
                      flush=True)
            seen += 1
    finally:
        client.close()
    return 0


def _tools(args: argparse.Namespace) -> int:
    from ..logs import configure_logging
    from .toolcheck import call_tool, list_tools
    config = _load_or_exit(args.config).config
    configure_logging("WARN", "text", config.secrets())
    if args.tools_command == "list":
        return list_tools(config, args.json)
    return call_tool(config, args.name, args.args)


def _healthcheck(args: argparse.Namespace) -> int:
    from .ops import wait_healthy
    configured = os.environ.get("HEALTH_PORT", "")
    ports = args.port or [int(configured) if configured.isdigit() else 8080]
    healthy, seen = wait_healthy(args.host, ports, args.endpoint, args.timeout, args.wait or 0.0)
    if args.verbose:
        print("\n".join(seen))
    if args.wait and not healthy:
        print(f"not {args.endpoint} within {args.wait:g} s (is each agent running, on its own HEALTH_PORT?):\n  "
              + "\n  ".join(seen), file=sys.stderr)
    return 0 if healthy else 1


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    handlers = {"version": lambda a: print(f"agent2389 {__version__}") or 0, "check-config": _check_config,
                "run": _run, "inject": _inject, "pipeline": _pipeline, "monitor": _monitor, "healthcheck": _healthcheck,
                "tools": _tools, "cancel": _cancel, "approvals": _approvals, "gateway": _gateway}
    try:
        code = handlers[args.command](args)
    except KeyboardInterrupt:  # `run` stops on SIGINT itself; the other commands end here, without a traceback
        print(f"agent2389 {args.command}: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    sys.exit(code)
