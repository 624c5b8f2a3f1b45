"""Discovery (protocol v2): the agents a router may choose, from their retained statuses.

Fed by a subscription to `/control/agents/+/status`. The `status` field decides (the
reference's registry ignores it and so counts a dead agent as healthy); an agent is stale
when its *published* timestamp is older than three of its heartbeats. Payloads of the
reference implementation (no `health`, `load`, `heartbeat_interval`) are accepted and judged
against its heartbeat of 900 s; garbage is ignored and counted.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Optional

from . import protocol

log = logging.getLogger("agent2389.registry")

STATUS_FILTER = protocol.status_topic("+")
_STALE_HEARTBEATS = 3
REFERENCE_HEARTBEAT = 900.0  # seconds: the reference implementation's default, which it does not publish
_ROUTABLE_HEALTH = (protocol.HEALTH_OK, protocol.HEALTH_DEGRADED)
_TIMESTAMP_RE = re.compile(
    r"^(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d+))?(?:([Zz])|([+-])(\d\d):?(\d\d))$")


@dataclass(frozen=True)
class AgentInfo:
    agent_id: str
    capabilities: tuple
    description: str
    health: str
    load: float
    published: float  # epoch seconds of the status's timestamp
    heartbeat_interval: float

    def matches(self, capability: str) -> bool:
        return capability.lower() in (c.lower() for c in self.capabilities)

    def catalog_entry(self) -> dict:
        return {"agent_id": self.agent_id, "capabilities": list(self.capabilities), "load": self.load,
                "description": self.description}


def parse_timestamp(value: Any) -> Optional[float]:
    """RFC 3339 (`Z` or an offset such as the reference's `+00:00`, any fraction) to epoch seconds."""
    match = _TIMESTAMP_RE.match(value) if isinstance(value, str) else None
    if not match:
        return None
    year, month, day, hour, minute, second = (int(match.group(i)) for i in range(1, 7))
    fraction = float("0." + match.group(7)) if match.group(7) else 0.0
    try:
        moment = datetime(year, month, day, hour, minute, second, tzinfo=timezone.utc).timestamp()
    except ValueError:
        return None
    offset = 0 if match.group(8) else (int(match.group(10)) * 3600 + int(match.group(11)) * 60) * (
        1 if match.group(9) == "+" else -1)
    return moment + fraction - offset


def parse_status(agent_id: str, payload: Any) -> Optional[AgentInfo]:
    """An available agent's entry, or None when the status says unavailable; raises ValueError on garbage."""
    if not isinstance(payload, dict):
        raise ValueError("not a JSON object")
    status = payload.get("status")
    if status == protocol.UNAVAILABLE:
        return None
    if status != protocol.AVAILABLE:
        raise ValueError(f"status {status!r} is neither available nor unavailable")
    published = parse_timestamp(payload.get("timestamp", payload.get("last_updated")))
    if published is None:
        raise ValueError("no RFC 3339 timestamp")
    names = [c for key in ("capabilities", "handles") for c in (payload.get(key) or [])]
    if not all(isinstance(c, str) for c in names):
        raise ValueError("capabilities must be strings")
    load = payload.get("load", 0.0)
    health = payload.get("health", protocol.HEALTH_OK)
    heartbeat = payload.get("heartbeat_interval", REFERENCE_HEARTBEAT)
    if (not isinstance(load, (int, float)) or isinstance(load, bool) or not isinstance(health, str)
            or not isinstance(heartbeat, (int, float)) or heartbeat <= 0):
        raise ValueError("health, load or heartbeat_interval has the wrong type")
    description = payload.get("description")
    return AgentInfo(agent_id, tuple(dict.fromkeys(names)), description if isinstance(description, str) else "",
                     health.lower(), min(max(float(load), 0.0), 1.0), published, float(heartbeat))


class Registry:
    """Agents seen on the status topics; thread-safe (fed by a network thread, read by workers)."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.ignored = 0  # malformed status messages
        self._agents: dict[str, AgentInfo] = {}
        self._lock = threading.Lock()

    def observe(self, topic: str, payload: bytes) -> None:
        """One status message; an empty (cleared) retained status removes the agent."""
        parts = protocol.canonicalize_topic(topic).split("/")
        if len(parts) != 5 or parts[1:3] != ["control", "agents"] or parts[4] != "status":
            return
        agent_id = parts[3]
        try:
            info = parse_status(agent_id, json.loads(payload)) if payload else None
        except (ValueError, RecursionError) as exc:
            with self._lock:
                self.ignored += 1
            log.debug("ignoring the status on %s: %s", topic, exc)
            return
        with self._lock:
            if info is None:
                self._agents.pop(agent_id, None)
            else:
                self._agents[agent_id] = info

    def routable(self) -> list[AgentInfo]:
        """Agents that are available, healthy (or only saturated) and not stale, by id."""
        now = self.clock()
        with self._lock:
            agents = list(self._agents.values())
        return sorted((a for a in agents if a.health in _ROUTABLE_HEALTH
                       and now - a.published <= _STALE_HEARTBEATS * a.heartbeat_interval),
                      key=lambda a: a.agent_id)

    def get(self, agent_id: str) -> Optional[AgentInfo]:
        return next((a for a in self.routable() if a.agent_id == agent_id), None)

    def find_best(self, capability: str) -> Optional[AgentInfo]:
        """The least loaded routable agent with this capability (ties: the smallest id)."""
        matching = [a for a in self.routable() if a.matches(capability)]
        return min(matching, key=lambda a: (a.load, a.agent_id)) if matching else None
