"""One trace across a pipeline: W3C trace context over MQTT 5 user properties and 3.1.1 envelope
fields, spans exported over OTLP/HTTP to a loopback collector that decodes them with
opentelemetry-proto, log lines that carry the trace id, and a collector that is not there."""

import io
import json
import logging
import re
import subprocess
import sys
import unittest

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fake_llm import FakeOpenAI, Reply
from otlp_receiver import OtlpReceiver
from support import (AGENT_SCRIPT, BrokerTestCase, Watcher, base_env, envelope, free_port, installed, sdk_server,
                     wait_until)

from agent2389_lib import tracing
from agent2389_lib.config import ConfigError, load_config
from agent2389_lib.logs import JsonFormatter, RedactingFilter

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT_RE = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
PARENT = "00f067aa0ba902b7"
OPENAI_KEY = "sk-tracing-test-key-0123456789"
ROUTER_KEY = "sk-tracing-router-key-0123456789"


def user_properties(**pairs):
    properties = Properties(PacketTypes.PUBLISH)
    properties.UserProperty = list(pairs.items())
    return properties


def headers_of(message):
    return dict(getattr(message.properties, "UserProperty", None) or [])


class TraceContextTests(unittest.TestCase):
    def test_traceparent_parsing_follows_w3c(self):
        good = f"00-{TRACE}-{PARENT}-01"
        self.assertEqual(tracing.parse(good, "vendor=abc"), tracing.TraceContext(TRACE, PARENT, 1, "vendor=abc", True))
        self.assertEqual(tracing.parse(f"00-{TRACE}-{PARENT}-00").flags, 0)
        self.assertEqual(tracing.parse(f"01-{TRACE}-{PARENT}-01-later-fields").trace_id, TRACE, "a later version")
        for bad in (None, 42, "", "garbage", f"00-{TRACE.upper()}-{PARENT}-01", f"ff-{TRACE}-{PARENT}-01",
                    f"00-{'0' * 32}-{PARENT}-01", f"00-{TRACE}-{'0' * 16}-01", f"00-{TRACE}-{PARENT}-01-extra",
                    f"00-{TRACE[:-1]}-{PARENT}-01", f"00_{TRACE}_{PARENT}_01"):
            with self.subTest(bad):
                self.assertIsNone(tracing.parse(bad))
        self.assertIsNone(tracing.parse(good, "x" * 600).state, "an oversized tracestate is dropped")
        self.assertEqual(tracing.parse(good, f"a=1{chr(10)}b=2").state, None, "so is one with control characters")

    def test_user_properties_win_over_envelope_fields(self):
        other = "0af7651916cd43dd8448eb211c80319c"
        found = tracing.extract([("traceparent", f"00-{TRACE}-{PARENT}-01")], f"00-{other}-{PARENT}-01")
        self.assertEqual(found.trace_id, TRACE)
        self.assertEqual(tracing.extract([], f"00-{other}-{PARENT}-01").trace_id, other)
        self.assertIsNone(tracing.extract([("traceparent", "nonsense")], f"00-{other}-{PARENT}-01"),
                          "a malformed property is not replaced by the field: a new trace starts")

    def test_json_log_lines_inside_a_span_carry_its_ids(self):
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(JsonFormatter())
        handler.addFilter(RedactingFilter())
        logger = logging.getLogger("agent2389.test_tracing")
        logger.addHandler(handler)
        self.addCleanup(logger.removeHandler, handler)
        logger.setLevel(logging.INFO)
        with tracing.Tracer().span("process x", parent=tracing.parse(f"00-{TRACE}-{PARENT}-01"), task=True) as span:
            logger.info("inside")
        logger.info("outside")
        inside, outside = [json.loads(line) for line in stream.getvalue().splitlines()]
        self.assertEqual((inside["trace_id"], inside["span_id"]), (TRACE, span.context.span_id))
        self.assertNotEqual(span.context.span_id, PARENT)
        self.assertNotIn("trace_id", outside)

    def test_a_line_logged_inside_a_step_carries_the_step_whoever_logged_it(self):
        """One span API: a span's log fields are every inner line's `span`, an inner step's merged
        with the outer one's; a step named for the log only passes the trace context through; with
        LOG_SPANS the hook hears where each step starts and ends."""
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(JsonFormatter())
        handler.addFilter(RedactingFilter(["s3cret"]))
        logger = logging.getLogger("agent2389.test_tracing.steps")
        logger.addHandler(handler)
        self.addCleanup(logger.removeHandler, handler)
        logger.setLevel(logging.INFO)
        heard = []
        tracing.on_log_span = lambda event, fields, duration: heard.append((event, fields["operation"]))
        self.addCleanup(setattr, tracing, "on_log_span", None)
        tracer = tracing.Tracer()
        with tracer.span("process x", task=True, log={"operation": "task_processing", "task_id": "t1",
                                                      "conversation_id": "c-s3cret"}) as task:
            with tracer.span("llm_request", log={"operation": "llm_request", "iteration": 1}, record=False) as step:
                logger.info("asking")
            logger.info("answered")
        logger.info("idle")
        asking, answered, idle = [json.loads(line) for line in stream.getvalue().splitlines()]
        self.assertEqual(asking["span"], {"operation": "llm_request", "task_id": "t1",
                                          "conversation_id": "c-[REDACTED]", "iteration": 1})
        self.assertEqual(step.context, task.context, "no span of the trace of its own")
        self.assertEqual(answered["span"]["operation"], "task_processing")
        self.assertNotIn("span", idle)
        self.assertEqual(heard, [("start", "task_processing"), ("start", "llm_request"), ("end", "llm_request"),
                                 ("end", "task_processing")])

    def test_otel_variables_are_checked_like_any_setting(self):
        cases = {"OTEL_TRACES_SAMPLER": "sometimes", "OTEL_TRACES_SAMPLER_ARG": "1.5",
                 "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_BSP_MAX_QUEUE_SIZE": "0",
                 "OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318", "OTEL_SDK_DISABLED": "maybe",
                 "OTEL_TRACES_EXPORTER": "jaeger", "OTEL_PROPAGATORS": "tracecontext,b3"}
        for name, value in cases.items():
            with self.subTest(name):
                env = {"AGENT_ID": "traced", "LLM_PROVIDER": "echo", name: value}
                if name == "OTEL_TRACES_SAMPLER_ARG":
                    env["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
                with self.assertRaises(ConfigError) as caught:
                    load_config(None, environ=env)
                self.assertIn(name, str(caught.exception))
        tracing_settings = load_config(None, environ={"AGENT_ID": "traced", "LLM_PROVIDER": "echo", "OTEL_EXPORTER_OTLP_ENDPOINT":
                                                      "http://collector:4318/", "OTEL_BSP_SCHEDULE_DELAY": "250"}
                                       ).config.tracing
        self.assertEqual((tracing_settings.endpoint, tracing_settings.schedule_delay),
                         ("http://collector:4318/v1/traces", 0.25))
        result = subprocess.run([sys.executable, AGENT_SCRIPT, "check-config"], capture_output=True, text=True,
                                env=base_env(AGENT_ID="traced", LLM_PROVIDER="echo", OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="grpc"), timeout=30)
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertIn("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL='grpc' is not supported", result.stdout + result.stderr)


class TracedCase(BrokerTestCase):
    def setUp(self):
        super().setUp()
        self.collector = OtlpReceiver()
        self.addCleanup(self.collector.close)
        self.watch = self.watcher("/control/agents/+/status", "/conversations/#", "/control/agents/+/input")

    def traced(self, name, env=None, **sections):
        """An agent exporting to the collector at once (50 ms batches)."""
        otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": self.collector.url, "OTEL_BSP_SCHEDULE_DELAY": "50", **(env or {})}
        return self.agent(name, env=otel, **sections).start_and_wait_available(self.watch)

    def spans(self, trace_id, agent, name_prefix, count=1):
        return self.collector.wait_for(lambda s: s["trace_id"] == trace_id and s["agent"] == agent
                                       and s["name"].startswith(name_prefix), count)

    def assert_consumer(self, span, agent, task_id, cid):
        self.assertEqual((span["name"], span["kind"]), (f"process /control/agents/{agent}/input", "CONSUMER"))
        self.assertEqual({k: span["attributes"].get(k) for k in ("messaging.system", "messaging.destination.name",
                                                                 "messaging.message.id",
                                                                 "messaging.message.conversation_id")},
                         {"messaging.system": "mqtt", "messaging.destination.name": f"/control/agents/{agent}/input",
                          "messaging.message.id": task_id, "messaging.message.conversation_id": cid})
        self.assertEqual((span["resource"]["service.name"], span["resource"]["service.instance.id"]),
                         ("agent2389", agent))

    def first_task_on(self, agent):
        (message,) = [m for m in list(self.watch.messages) if m.topic == f"/control/agents/{agent}/input"][:1]
        return message


class PipelineTraceTests(TracedCase):
    def test_a_static_pipeline_is_one_trace_hop_to_hop(self):
        """inject -> alpha (an LLM calling an MCP tool) -> beta -> gamma -> the answer."""
        fake = FakeOpenAI(api_key=OPENAI_KEY)
        self.addCleanup(fake.close)
        fake.script = [Reply(tool_calls=[("time__get_current_time", {"timezone": "UTC"})])]
        fake.responder = lambda body: Reply("it is " + body["messages"][-1]["content"])
        alpha = self.traced("alpha", env={"OPENAI_API_KEY": OPENAI_KEY},
                            llm={"provider": "openai", "base_url": fake.base_url},
                            mcp_servers=[{"name": "time", "command": installed("mcp-server-time")}])
        self.traced("beta")
        self.traced("gamma")
        result = subprocess.run([sys.executable, AGENT_SCRIPT, "inject", "--broker-url", self.broker.url, "--agent-id",
                                 "alpha", "--next", "beta,gamma", "--message", "what time is it", "--wait", "30",
                                 "--traceparent", f"00-{TRACE}-{PARENT}-01", "--json"],
                                env=base_env(), capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        shown = json.loads(result.stdout)
        task, cid = shown["task"], shown["task"]["conversation_id"]
        self.assertEqual(shown["trace_id"], TRACE, "inject continues the trace it is given")
        injected = tracing.parse(task["traceparent"])
        self.assertEqual((injected.trace_id, injected.span_id), (TRACE, PARENT),
                         "inject records no span here: the span given is the parent (before: one nobody exported)")
        self.assertEqual(headers_of(self.first_task_on("alpha"))["traceparent"], task["traceparent"],
                         "the task carries its context as a user property too")

        (a,), (b,), (c,) = (self.spans(TRACE, agent, "process") for agent in ("alpha", "beta", "gamma"))
        for span, agent in ((a, "alpha"), (b, "beta"), (c, "gamma")):
            self.assert_consumer(span, agent, task["task_id"], cid)
        self.assertEqual((a["parent"], b["parent"], c["parent"]), (injected.span_id, a["span_id"], b["span_id"]))

        model = fake.completions()[0]["body"]["model"]
        chats = self.spans(TRACE, "alpha", "chat", count=2)
        for chat in chats:
            self.assertEqual((chat["name"], chat["kind"], chat["parent"]), (f"chat {model}", "CLIENT", a["span_id"]))
            self.assertEqual({k: chat["attributes"][k] for k in ("gen_ai.operation.name", "gen_ai.provider.name",
                                                                 "gen_ai.request.model", "gen_ai.usage.input_tokens",
                                                                 "gen_ai.usage.output_tokens")},
                             {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
                              "gen_ai.request.model": model, "gen_ai.usage.input_tokens": 11,
                              "gen_ai.usage.output_tokens": 7})
        (tool,) = self.spans(TRACE, "alpha", "execute_tool")
        self.assertEqual((tool["name"], tool["parent"], tool["attributes"]["gen_ai.tool.name"],
                          tool["attributes"]["agent2389.mcp.server"]),
                         ("execute_tool time__get_current_time", a["span_id"], "time__get_current_time", "time"))
        (forward,) = self.spans(TRACE, "alpha", "send")
        (answer,) = self.spans(TRACE, "gamma", "send")
        self.assertEqual((forward["name"], forward["kind"], forward["parent"]),
                         ("send /control/agents/beta/input", "PRODUCER", a["span_id"]))
        self.assertEqual((answer["name"], answer["attributes"]["messaging.destination.name"]),
                         ("send /conversations/{conversation_id}/gamma", f"/conversations/{cid}/gamma"))

        (reply,) = [m for m in list(self.watch.messages) if m.topic == f"/conversations/{cid}/gamma"]
        self.assertEqual(tracing.parse(headers_of(reply)["traceparent"]).span_id, c["span_id"],
                         "the answer carries the context of gamma's task span")
        finished = [json.loads(line) for line in alpha.log().splitlines() if f"task {task['task_id']} finished" in line]
        self.assertEqual([(line["trace_id"], line["span_id"]) for line in finished], [(TRACE, a["span_id"])])

    def test_a_routed_workflow_is_one_trace(self):
        fake = FakeOpenAI(api_key=ROUTER_KEY)
        self.addCleanup(fake.close)

        def route(body):
            current = re.search(r"CURRENT AGENT: (\S+)", body["messages"][-1]["content"]).group(1)
            done = current == "writer"
            return Reply(json.dumps({"workflow_complete": done, "reasoning": "because",
                                     "next_agent": None if done else "writer",
                                     "next_instruction": None if done else "Write it up"}))

        fake.responder = route
        routing = {"strategy": "llm", "llm": {"provider": "openai", "model": "router-model", "base_url": fake.base_url,
                                              "api_key_env": "ROUTER_KEY"}}
        for name, capability in (("researcher", "research"), ("writer", "writing")):
            self.traced(name, env={"ROUTER_KEY": ROUTER_KEY}, routing=routing,
                        agent={"capabilities": [capability], "description": f"the {name}"})
        task = envelope("researcher", cid="cid-routed", instruction="routed", version="2.0")
        self.watch.client.publish("/control/agents/researcher/input", json.dumps(task), qos=1,
                                  properties=user_properties(traceparent=f"00-{TRACE}-{PARENT}-01"))
        (final,) = self.watch.wait_for("/conversations/cid-routed/+", timeout=30)
        self.assertTrue(final["workflow"]["complete"], final)
        (first,), (second,) = self.spans(TRACE, "researcher", "process"), self.spans(TRACE, "writer", "process")
        self.assert_consumer(first, "researcher", task["task_id"], "cid-routed")
        self.assertEqual((first["parent"], second["parent"]), (PARENT, first["span_id"]))
        for agent, task_span in (("researcher", first), ("writer", second)):
            (decision,) = self.spans(TRACE, agent, "chat router-model")
            self.assertEqual((decision["parent"], decision["attributes"]["gen_ai.request.model"]),
                             (task_span["span_id"], "router-model"))
        hop = json.loads(self.first_task_on("writer").payload)
        self.assertEqual(tracing.parse(hop["traceparent"]).span_id, first["span_id"], "the routed hop's field")
        decisions = self.spans(TRACE, "researcher", "chat router-model") + self.spans(TRACE, "writer", "chat router")
        sent = [tracing.parse(request["headers"].get("traceparent")) for request in fake.completions()]
        self.assertEqual(sorted(context.span_id for context in sent), sorted(span["span_id"] for span in decisions),
                         "each router request carries its span's context")


class InjectTraceTests(TracedCase):
    def inject(self, *options: str, **env: str) -> dict:
        result = subprocess.run([sys.executable, AGENT_SCRIPT, "inject", "--broker-url", self.broker.url, "--agent-id",
                                 "solo", "--message", "hi", "--wait", "30", "--json", *options],
                                env=base_env(OTEL_EXPORTER_OTLP_ENDPOINT=self.collector.url, **env),
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        return json.loads(result.stdout)

    def test_inject_exporting_its_span_leaves_no_gap_in_the_chain(self):
        """Before: the task's parent was a span of inject's that no collector ever received."""
        self.traced("solo")
        for options, parent in (((), None), (("--traceparent", f"00-{TRACE}-{PARENT}-01"), PARENT)):
            with self.subTest(options=options):
                trace_id = self.inject(*options)["trace_id"]
                (send,) = self.collector.wait_for(lambda s: s["trace_id"] == trace_id and s["agent"] == "agent2389-cli")
                self.assertEqual((send["name"], send["kind"], send["parent"]),
                                 ("send /control/agents/solo/input", "PRODUCER", parent))
                (process,) = self.spans(trace_id, "solo", "process")
                self.assertEqual(process["parent"], send["span_id"])

    def test_inject_with_the_sdk_disabled_sends_no_trace_context(self):
        self.traced("solo")
        shown = self.inject(OTEL_SDK_DISABLED="true")
        self.assertEqual((shown["trace_id"], shown["timed_out"]), (None, False))
        self.assertEqual(shown["reply"]["payload"]["task_id"], shown["task"]["task_id"])
        self.assertNotIn("traceparent", shown["task"])


class HttpPropagationTests(TracedCase):
    """What the agent asks over HTTP joins the task's trace: the LLM, an MCP server over streamable HTTP."""

    def run_task(self, name: str, env: dict) -> tuple:
        fake = FakeOpenAI(api_key=OPENAI_KEY)
        self.addCleanup(fake.close)
        fake.script = [Reply(tool_calls=[("sdk__traceparent", {})])]
        fake.responder = lambda body: Reply("the MCP server saw " + body["messages"][-1]["content"])
        self.traced(name, env={"OPENAI_API_KEY": OPENAI_KEY, **env}, llm={"provider": "openai", "base_url": fake.base_url},
                    mcp_servers=[{"name": "sdk", "url": sdk_server(self)}])
        self.watch.client.publish(f"/control/agents/{name}/input", json.dumps(envelope(name, cid=f"cid-{name}")), qos=1,
                                  properties=user_properties(traceparent=f"00-{TRACE}-{PARENT}-01"))
        (answer,) = self.watch.wait_for(f"/conversations/cid-{name}/{name}", timeout=30)
        return [request["headers"].get("traceparent") for request in fake.completions()], answer["response"]

    def test_llm_and_mcp_requests_carry_the_span_they_belong_to(self):
        sent, response = self.run_task("courier", {})
        chats = self.spans(TRACE, "courier", "chat", count=2)
        self.assertEqual(sorted(tracing.parse(header)[:2] for header in sent),
                         sorted((TRACE, span["span_id"]) for span in chats))
        (tool,) = self.spans(TRACE, "courier", "execute_tool")
        seen = tracing.parse(TRACEPARENT_RE.search(response).group(0))
        self.assertEqual(seen[:2], (TRACE, tool["span_id"]))

    def test_otel_propagators_none_sends_no_context(self):
        sent, response = self.run_task("discreet", {"OTEL_PROPAGATORS": "none"})
        self.assertEqual(sent, [None, None])
        self.assertIsNone(TRACEPARENT_RE.search(response), response)
        self.spans(TRACE, "discreet", "process")  # the MQTT side is the protocol's: still one trace


class Mqtt311TraceTests(TracedCase):
    def test_a_pipeline_on_mqtt_311_stays_one_trace_through_envelope_fields(self):
        for name in ("alpha", "beta", "gamma"):
            self.traced(name, mqtt={"protocol": "3.1.1"})
        task = envelope("alpha", cid="cid-311", next={"topic": "/control/agents/beta/input", "instruction": "on",
                                                      "input": None, "next": {"topic": "/control/agents/gamma/input",
                                                                              "instruction": "end", "input": None,
                                                                              "next": None}},
                        traceparent=f"00-{TRACE}-{PARENT}-01")
        watch311 = Watcher(self.broker.port, "/conversations/cid-311/+", "/control/agents/beta/input", protocol="3.1.1")
        self.addCleanup(watch311.close)
        watch311.publish("/control/agents/alpha/input", task)
        watch311.wait_for("/conversations/cid-311/gamma", timeout=30)
        (a,), (b,), (c,) = (self.spans(TRACE, agent, "process") for agent in ("alpha", "beta", "gamma"))
        self.assertEqual((a["parent"], b["parent"], c["parent"]), (PARENT, a["span_id"], b["span_id"]))
        (forward,) = watch311.matching("/control/agents/beta/input")
        hop = tracing.parse(forward["traceparent"])
        self.assertEqual((hop.trace_id, hop.span_id), (TRACE, a["span_id"]))

    def test_a_malformed_traceparent_starts_a_new_trace(self):
        self.traced("lonely")
        task = envelope("lonely", cid="cid-malformed", traceparent="00-not-a-trace-01")
        self.watch.client.publish("/control/agents/lonely/input", json.dumps(task), qos=1,
                                  properties=user_properties(traceparent=f"00-{TRACE.upper()}-{PARENT}-01"))
        (answer,) = self.watch.wait_for("/conversations/cid-malformed/lonely")
        self.assertIn("response", answer)
        (span,) = self.collector.wait_for(lambda s: s["agent"] == "lonely" and s["name"].startswith("process"))
        self.assertIsNone(span["parent"], "a root span")
        self.assertNotEqual(span["trace_id"], TRACE.lower())
        (reply,) = [m for m in list(self.watch.messages) if m.topic == "/conversations/cid-malformed/lonely"]
        self.assertEqual(tracing.parse(headers_of(reply)["traceparent"]).trace_id, span["trace_id"])


class CollectorAwayTests(BrokerTestCase):
    def test_a_collector_refusing_connections_loses_no_task_and_drops_spans_counted(self):
        watch = self.watcher("/control/agents/+/status", "/conversations/#")
        nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        agent = self.agent("unheard", env={"OTEL_EXPORTER_OTLP_ENDPOINT": nowhere, "OTEL_BSP_SCHEDULE_DELAY": "20",
                                           "OTEL_BSP_MAX_QUEUE_SIZE": "8", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "4",
                                           "OTEL_EXPORTER_OTLP_TIMEOUT": "1"}, agent={"shutdown_grace": 5})
        agent.start_and_wait_available(watch)
        tasks = [envelope("unheard", cid="cid-away") for _ in range(60)]
        for task in tasks:
            watch.publish("/control/agents/unheard/input", task, wait=False)
        wanted = {task["task_id"] for task in tasks}
        wait_until(lambda: wanted <= {r["task_id"] for r in watch.matching("/conversations/cid-away/unheard")}, 30,
                   "every task answered")

        def dropped():
            counts = agent.metric("tracing")
            return counts if counts["spans_dropped"] >= 8 else None

        counts = wait_until(dropped, 20, "spans counted as dropped")
        self.assertEqual(counts["spans_exported"], 0)
        wait_until(lambda: "could not export" in agent.log(), 20, "the failed export reported")
        self.assertEqual(agent.stop(), 0)


class WithoutTheExtraTests(BrokerTestCase):
    def test_without_the_sdk_context_still_propagates_and_logs_carry_trace_ids(self):
        watch = self.watcher("/control/agents/+/status", "/control/agents/next-agent/input", "/conversations/#")
        agent = self.agent("bare", prelude="import sys; sys.modules['opentelemetry'] = None  # the extra absent",
                           env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}"})
        agent.start_and_wait_available(watch)
        self.assertIn("the OpenTelemetry SDK cannot be imported", agent.log())
        task = envelope("bare", cid="cid-bare", next={"topic": "/control/agents/next-agent/input",
                                                      "instruction": "go on", "input": None, "next": None})
        watch.client.publish("/control/agents/bare/input", json.dumps(task), qos=1,
                             properties=user_properties(traceparent=f"00-{TRACE}-{PARENT}-01", tracestate="k=v"))
        (forward,) = watch.wait_for("/control/agents/next-agent/input")
        (message,) = [m for m in list(watch.messages) if m.topic == "/control/agents/next-agent/input"]
        context = tracing.parse(forward["traceparent"], forward.get("tracestate"))
        self.assertEqual((context.trace_id, context.state), (TRACE, "k=v"))
        self.assertNotEqual(context.span_id, PARENT, "the task span's own id")
        self.assertEqual(headers_of(message), {"traceparent": forward["traceparent"], "tracestate": "k=v"})
        finished = wait_until(lambda: [json.loads(line) for line in agent.log().splitlines()
                                       if f"task {task['task_id']} finished" in line], 10, "the task's log line")
        self.assertEqual([(line["trace_id"], line["span_id"]) for line in finished], [(TRACE, context.span_id)])


if __name__ == "__main__":
    unittest.main()
