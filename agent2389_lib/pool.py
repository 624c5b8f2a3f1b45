"""Who serves an agent id: the statuses seen on its topics, for the pool status and conflicts.

Pool members (agents with an instance id) share one agent id through a shared subscription.
Each publishes its own retained status under `/instances/{instance_id}/status`; the agent's
status topic stands for the pool and is `unavailable` only when no member is alive. A plain
agent with the same id would receive every task besides the pool: that is a conflict.

Members that leave together (a scale to zero) each see the others alive unless they wait: a
leaving member waits until the broker echoes its own `unavailable` back. Every `unavailable`
that reached the broker before it has then reached it too, so the member whose `unavailable`
arrived last sees no one alive and marks the pool unavailable.
"""

from __future__ import annotations

import json
import threading
from typing import Optional

from . import protocol


class PoolView:
    def __init__(self, agent_id: str, instance_id: Optional[str]):
        self.agent_id = agent_id
        self.instance_id = instance_id
        self.pool_topic = protocol.status_topic(agent_id)
        self._prefix, self._suffix = protocol.instance_status_topic(agent_id, "\0").split("\0")
        self._alive: set[str] = set()
        self._changed = threading.Condition()

    def observe(self, topic: str, payload: bytes) -> tuple[bool, Optional[str]]:
        """Record one status message. Returns (the pool was marked unavailable, a conflict to report)."""
        try:
            status = json.loads(payload) if payload else {}
        except ValueError:
            return False, None
        if not isinstance(status, dict):
            return False, None
        if topic.startswith(self._prefix) and topic.endswith(self._suffix):
            member = topic[len(self._prefix):-len(self._suffix)]
            with self._changed:
                if status.get("status") == protocol.AVAILABLE:
                    self._alive.add(member)
                else:
                    self._alive.discard(member)
                self._changed.notify_all()
            return False, None
        if topic != self.pool_topic:
            return False, None
        if status.get("status") == protocol.UNAVAILABLE:
            return self.instance_id is not None, None
        if status.get("status") == protocol.AVAILABLE:
            return False, self._conflict(status.get("instance_id"))
        return False, None

    def _conflict(self, other: object) -> Optional[str]:
        if self.instance_id is not None and other is None:
            return (f"agent id {self.agent_id} is also served by an agent that is not a pool member (its status on "
                    f"{self.pool_topic} has no instance_id): it receives every task besides the pool, so tasks are "
                    f"answered twice; stop it, or give it an instance id (AGENT_INSTANCE_ID) so it joins the pool")
        if self.instance_id is None and isinstance(other, str):
            return (f"agent id {self.agent_id} is also served by pool member {other}: this agent receives every "
                    f"task besides the pool, so tasks are answered twice; give it an instance id "
                    f"(AGENT_INSTANCE_ID) so it joins the pool, or stop the pool")
        return None

    def alive(self) -> list[str]:
        """Members whose retained instance status is `available`."""
        with self._changed:
            return sorted(self._alive)

    def last_to_leave(self, timeout: float) -> bool:
        """After this member published its `unavailable`: whether the pool is left with no member
        alive, once the broker has echoed that status back (or `timeout` passed)."""
        with self._changed:
            self._changed.wait_for(lambda: self.instance_id not in self._alive, timeout)
            return not any(member != self.instance_id for member in self._alive)
