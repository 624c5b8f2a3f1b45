"""Dynamic routing (protocol v2): after its own work, an agent asks a router which agent
works next, or whether the workflow is complete.

Two routers, as in the reference implementation: an LLM (native structured output) or an HTTP
"gatekeeper". `WorkflowRouter` owns the rules that make a workflow end: the router completes
it, `max_iterations` is reached, or the router fails or names an agent that cannot take the
work even after one corrective retry; it returns what to publish, like a static `next`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional, Protocol

from . import protocol, workflow
from .answers import extract_response, find_json_object
from .config import GatekeeperSettings, LlmSettings, RoutingSettings
from .discovery import AgentInfo, Registry
from .errors import LlmError, StartupError, TaskFailure, TaskTimeout, remaining
from .events import Events, Routed, WorkflowEnded
from .jsonhttp import Attempted, HttpFailure, JsonHttpClient
from .cooldowns import Fleet
from .llm import build_provider
from .llm.base import Message, OutputSchema
from .outcome import Kind, Outcome
from .protocol import TaskEnvelope
from .redaction import truncate_utf8

log = logging.getLogger("agent2389.router")

MAX_REASON_CHARS = 500
_OUTPUT_CHARS = 8000  # of the current output shown to the LLM router
_DEADLINE_SLACK = 2.0

DECISION_SCHEMA = {
    "type": "object",
    "properties": {
        "workflow_complete": {"type": "boolean", "description": "true when the original request is fully answered"},
        "reasoning": {"type": "string", "description": "why, in one or two sentences"},
        "next_agent": {"type": ["string", "null"], "description": "the agent id to work next; null when complete"},
        "next_instruction": {"type": ["string", "null"],
                             "description": "what that agent should do; null when complete"},
    },
    "required": ["workflow_complete", "reasoning", "next_agent", "next_instruction"],
    "additionalProperties": False,
}
ROUTING_DECISION = OutputSchema("routing_decision", "The routing decision for a multi-agent workflow.",
                                DECISION_SCHEMA)
_SYSTEM = ("You route a multi-agent workflow. After each agent's work you decide whether the user's original "
           "request is fully satisfied, or which one of the available agents should work next and what it should "
           "do. Answer only with the JSON object {workflow_complete, reasoning, next_agent, next_instruction}.")


class RouterError(Exception):
    """The router failed or answered something unusable; the message says what, for the log."""


@dataclass(frozen=True)
class Decision:
    complete: bool
    reasoning: str
    next_agent: Optional[str]
    next_instruction: Optional[str]


@dataclass(frozen=True)
class RoutingRequest:
    agent_id: str  # the agent that just did the work
    workflow: workflow.Workflow
    current_output: str
    agents: tuple  # of AgentInfo, routable now
    max_iterations: int

    @property
    def iteration(self) -> int:
        return self.workflow.iteration_count + 1


def parse_decision(data: Any) -> Decision:
    """A decision from the router's JSON (missing next_* and reasoning tolerated); raises RouterError."""
    if not isinstance(data, dict) or not isinstance(data.get("workflow_complete"), bool):
        raise RouterError("the answer is not an object with a boolean workflow_complete")
    texts = [data.get(key) for key in ("reasoning", "next_agent", "next_instruction")]
    if not all(value is None or isinstance(value, str) for value in texts):
        raise RouterError("reasoning, next_agent and next_instruction must be strings or null")
    reasoning, agent, instruction = texts
    return Decision(data["workflow_complete"], (reasoning or "")[:MAX_REASON_CHARS], agent or None, instruction)


class Router(Protocol):
    def decide(self, request: RoutingRequest, feedback: Optional[str], deadline: float) -> Decision:
        """One decision; `feedback` says what was wrong with the previous one. Raises RouterError
        or TaskFailure."""

    def budget(self) -> float:
        """Seconds one decision may take, its retries included."""


# ---------------------------------------------------------------- LLM router

def routing_prompt(request: RoutingRequest, feedback: Optional[str]) -> str:
    flow = request.workflow
    history = "\n".join(f"{i}. {s['agent_id']}: {s['action'] or '(no instruction)'}"
                        for i, s in enumerate(flow.steps, 1)) or "(this was the first step)"
    agents = "\n".join(
        f"- {a.agent_id}{' (the current agent)' if a.agent_id == request.agent_id else ''}: "
        f"{a.description or 'no description'}; capabilities: {', '.join(a.capabilities) or 'none'}; "
        f"load: {a.load:.2f}" for a in request.agents) or "(none)"
    output = truncate_utf8(request.current_output, _OUTPUT_CHARS, "\n...[cut]")
    left = request.max_iterations - request.iteration
    text = (f"ORIGINAL USER REQUEST:\n{flow.original_query}\n\n"
            f"WORKFLOW HISTORY (iteration {request.iteration} of at most {request.max_iterations}):\n{history}\n\n"
            f"CURRENT AGENT: {request.agent_id}\nCURRENT AGENT OUTPUT:\n{output}\n\n"
            f"AVAILABLE AGENTS:\n{agents}\n\n"
            "DECISION CRITERIA:\n"
            "- If the current output fully satisfies the original request, set workflow_complete to true and "
            "next_agent and next_instruction to null.\n"
            "- Otherwise choose the one available agent whose capabilities fit the remaining work (by its id, "
            "exactly as listed) and write next_instruction for it.\n"
            "- Do not send work back to an agent unless its output must be revised; avoid loops.\n"
            f"- {left} more agent step(s) are allowed; near the limit, prefer completing.")
    if feedback:
        text += f"\n\nYOUR PREVIOUS ANSWER WAS REJECTED: {feedback}\nAnswer again."
    return text


class LlmRouter:
    """OpenAI: strict `json_schema`; Anthropic: a forced `routing_decision` tool. An
    OpenAI-compatible server that refuses `response_format` is asked for JSON in the prompt
    and its answer extracted tolerantly from then on."""

    def __init__(self, settings: LlmSettings, events: Optional[Events] = None, fleet: Optional[Fleet] = None):
        self.settings = settings
        self.provider = build_provider(settings, events, fleet)
        self.structured = True

    def budget(self) -> float:
        return self.settings.request_timeout * self.settings.max_attempts + _DEADLINE_SLACK

    def decide(self, request: RoutingRequest, feedback: Optional[str], deadline: float) -> Decision:
        messages = [Message("user", routing_prompt(request, feedback))]
        try:
            reply = self.provider.chat(_SYSTEM, messages, [], deadline, ROUTING_DECISION if self.structured else None)
        except LlmError as exc:
            if not (self.structured and self.settings.base_url and exc.kind == "bad_request"):
                raise
            log.warning("the routing server at %s refused structured output (%s); asking for JSON in the prompt "
                        "from now on", self.settings.base_url, exc)
            self.structured = False
            reply = self.provider.chat(_SYSTEM, messages, [], deadline)
        calls = [c for c in reply.tool_calls if c.name == ROUTING_DECISION.name]
        data = calls[0].arguments if calls else find_json_object(reply.text)
        if data is None:
            raise RouterError(f"the routing model answered without a JSON object: {reply.text[:200]!r}")
        return parse_decision(data)


# ---------------------------------------------------------------- gatekeeper

class GatekeeperRouter:
    """POST {original_query, workflow_history, current_output, available_agents, iteration_count};
    5xx, connection errors and timeouts are retried `retry_attempts` times in all."""

    def __init__(self, settings: GatekeeperSettings):
        self.settings = settings
        try:
            self.http = JsonHttpClient("gatekeeper", settings.url, {}, settings.retry_attempts,
                                       settings.timeout_ms / 1000.0,
                                       lambda body: truncate_utf8(body.decode("utf-8", "replace"), 200))
        except HttpFailure as exc:
            raise StartupError(str(exc)) from None

    def budget(self) -> float:
        return self.settings.timeout_ms / 1000.0 * self.settings.retry_attempts + _DEADLINE_SLACK

    def decide(self, request: RoutingRequest, feedback: Optional[str], deadline: float) -> Decision:
        body = {"original_query": request.workflow.original_query, "workflow_history": request.workflow.steps,
                "current_output": request.current_output,
                "available_agents": [a.catalog_entry() for a in request.agents],
                "iteration_count": request.workflow.iteration_count}
        if feedback:
            body["previous_decision_rejected"] = feedback  # additive: a gatekeeper may ignore it
        try:
            return parse_decision(self.http.post("", body, deadline, Attempted()))
        except HttpFailure as exc:  # the router's failure, not the task's LLM's
            raise RouterError(str(exc)) from None


def build_router(settings: RoutingSettings, events: Optional[Events] = None, fleet: Optional[Fleet] = None) -> Router:
    if settings.gatekeeper is not None:
        return GatekeeperRouter(settings.gatekeeper)
    assert settings.llm is not None
    return LlmRouter(settings.llm, events, fleet)


# ---------------------------------------------------------------- one routed hop

class WorkflowRouter:
    def __init__(self, agent_id: str, settings: RoutingSettings, registry: Registry, router: Router,
                 events: Events):
        self.agent_id = agent_id
        self.max_iterations = settings.max_iterations
        self.registry = registry
        self.router = router
        self.events = events

    def next_step(self, envelope: TaskEnvelope, output: str, deadline: float) -> Outcome:
        """The forward to the chosen agent, or the workflow's final answer. Routing
        runs within the task's deadline (the router gets what is left, its corrective retry too);
        past it, TaskTimeout."""
        flow = workflow.workflow_of(envelope)
        if flow.iteration_count + 1 >= self.max_iterations:
            return self._final(envelope, output, "max_iterations")
        request = RoutingRequest(self.agent_id, flow, output, tuple(self.registry.routable()), self.max_iterations)
        try:
            decision, target = self._decide(request, deadline)
        except TaskTimeout:
            raise
        except (RouterError, TaskFailure) as exc:
            log.warning("task %s: routing failed (%s); the workflow ends with this agent's answer",
                        envelope.task_id, exc)
            return self._final(envelope, output, "router_error")
        if target is None:
            return self._final(envelope, output, "router")
        log.info("task %s: routing to %s (iteration %d): %s", envelope.task_id, target, request.iteration,
                 decision.reasoning)
        self.events.emit(Routed(envelope.task_id, envelope.conversation_id, target, decision.reasoning,
                                request.iteration))
        return Outcome(Kind.FORWARD, *workflow.routed_envelope(envelope, output, self.agent_id, target,
                                                               decision.next_instruction, decision.reasoning))

    def _final(self, envelope: TaskEnvelope, output: str, reason: str) -> Outcome:
        self.events.emit(WorkflowEnded(reason))
        return Outcome(Kind.WORKFLOW_END, protocol.conversation_topic(envelope.conversation_id, self.agent_id),
                       workflow.workflow_response(envelope, extract_response(output), self.agent_id, reason))

    def _decide(self, request: RoutingRequest, deadline: float) -> tuple[Decision, Optional[str]]:
        """A usable decision and its agent (None: complete), after at most one corrective retry.
        This agent itself is accepted only when named twice in a row."""
        feedback: Optional[str] = None
        allow_self = False
        for _ in range(2):
            remaining(deadline)  # TaskTimeout once the task's time is up
            try:
                decision = self.router.decide(request, feedback, min(deadline, time.monotonic() + self.router.budget()))
            except (RouterError, TaskFailure) as exc:
                if time.monotonic() >= deadline:
                    raise TaskTimeout(f"routing did not finish before the task deadline ({exc})") from None
                feedback = f"the router failed: {exc}"
                continue
            target, feedback = self._target(decision, allow_self, request.agents)
            if feedback is None:
                return decision, target
            allow_self = target == self.agent_id
        raise RouterError(feedback)

    def _target(self, decision: Decision, allow_self: bool, agents: tuple) -> tuple[Optional[str], Optional[str]]:
        """(agent, problem): the agent the decision names (an agent id, or a capability's least
        loaded agent), or what is wrong with it."""
        if decision.complete:
            return None, None
        name = decision.next_agent
        if not name:
            return None, "workflow_complete is false but next_agent is empty"
        found: Optional[AgentInfo] = self.registry.get(name) or self.registry.find_best(name)
        if found is None:
            known = ", ".join(a.agent_id for a in agents) or "none"
            why = "is not a valid agent id" if not protocol.is_valid_agent_id(name) else "is not an available agent"
            return None, f"next_agent {name!r} {why}; choose one of: {known}, or complete the workflow"
        if found.agent_id == self.agent_id and not allow_self:
            return found.agent_id, (f"next_agent {name!r} is the agent that just did this work; name it again only "
                                    f"if it must work on its own output once more")
        return found.agent_id, None
