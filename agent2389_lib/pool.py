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
import logging
import threading
import time
import uuid
from typing import Callable, Optional

from . import protocol
from .discovery import parse_timestamp
from .logs import Throttle
from .redaction import truncate_utf8

_CLOCK_SKEW = 2.0  # seconds between two hosts' clocks that a twin's timestamp may show
log = logging.getLogger("agent2389.pool")


class Membership:
    """This process's place among those serving its agent id: alone (no instance id), or one
    member of a pool. Decides every topic a status goes to and what a seen status calls for."""

    def __init__(self, agent_id: str, instance_id: Optional[str], on_twin: Callable[[str], None] = lambda text: None,
                 started: Optional[float] = None):
        """`on_twin` hears of another live process publishing this process's own status (same
        agent id and instance id): the two take each other's broker sessions."""
        self.agent_id = agent_id
        self.instance_id = instance_id
        self.incarnation = uuid.uuid4().hex[:16]  # this process, in its statuses
        self.started = time.time() if started is None else started
        self._on_twin = on_twin
        self.member = instance_id is not None
        self.pool_topic = protocol.status_topic(agent_id)
        self.own_topic = protocol.instance_status_topic(agent_id, instance_id) if instance_id else self.pool_topic
        self.startup_conflict: Optional[str] = None  # a conflict seen before `available`
        self._conflicts = Throttle()
        self._prefix, self._suffix = protocol.instance_status_topic(agent_id, "\0").split("\0")
        self._alive: set[str] = set()
        self._changed = threading.Condition()

    # -------------------------------------------------------------- topics
    def input_filter(self) -> str:
        """A member takes its share of the tasks through the pool's shared subscription."""
        topic = protocol.input_topic(self.agent_id)
        return protocol.shared_subscription(self.agent_id, topic) if self.member else topic

    def watched_filters(self) -> list[str]:
        return [self.pool_topic, protocol.instance_status_topic(self.agent_id, "+")]

    def wills(self) -> tuple[str, Optional[str]]:
        """Where the broker publishes `unavailable` for a process that vanished: its own status,
        and for a member the pool's too, from the other link (re-asserted by any member alive)."""
        return self.own_topic, self.pool_topic if self.member else None

    def status_topics(self, status: str) -> list[str]:
        """A member publishes its own status and, while available, the pool's (only the last member
        to leave marks the pool unavailable: `leaving_topics`)."""
        if self.member and status == protocol.AVAILABLE:
            return [self.own_topic, self.pool_topic]
        return [self.own_topic]

    def size_hint(self) -> Optional[int]:
        """Members alive, this one included (a member's status carries it)."""
        if not self.member:
            return None
        with self._changed:
            return len(self._alive | {self.instance_id})

    # -------------------------------------------------------------- statuses seen
    def observe(self, topic: str, payload: bytes, state: str) -> bool:
        """One status message of this agent id, seen in the agent's `state`. True when this member,
        running, must mark the pool available again (a leaving member or a Last Will marked it
        unavailable). A conflict seen while starting is kept for startup to refuse; later ones
        are logged, at most once a minute."""
        try:
            status = json.loads(payload) if payload else {}
        except ValueError:
            return False
        if not isinstance(status, dict):
            return False
        if topic == self.own_topic:
            self._check_twin(status)
        if topic.startswith(self._prefix) and topic.endswith(self._suffix):
            member = topic[len(self._prefix):-len(self._suffix)]
            with self._changed:
                if status.get("status") == protocol.AVAILABLE:
                    self._alive.add(member)
                else:
                    self._alive.discard(member)
                self._changed.notify_all()
            return False
        if topic != self.pool_topic:
            return False
        if status.get("status") == protocol.UNAVAILABLE:
            return self.member and state == "running"
        if status.get("status") == protocol.AVAILABLE:
            conflict = self._conflict(status.get("instance_id"))
            if conflict and state == "starting":
                self.startup_conflict = conflict
            elif conflict and self._conflicts.occurred():
                log.error(conflict)
        return False

    def _check_twin(self, status: dict) -> None:
        """An `available` of another incarnation, stamped after this process started (an earlier
        process's retained status is older), is a live twin's."""
        other = status.get("incarnation")
        stamped = parse_timestamp(status.get("timestamp"))
        if (status.get("status") != protocol.AVAILABLE or not isinstance(other, str) or other == self.incarnation
                or stamped is None or stamped < self.started - _CLOCK_SKEW):
            return
        who = f"agent id {self.agent_id}" + (f" instance {self.instance_id}" if self.member else "")
        self._on_twin(f"another process (incarnation {truncate_utf8(other, 64)}) serves {who} with the same "
                      f"client id: its `available` came on {self.own_topic} at {status.get('timestamp')}")

    def _conflict(self, other: object) -> Optional[str]:
        if self.member and other is None:
            return (f"agent id {self.agent_id} is also served by an agent that is not a pool member (its status on "
                    f"{self.pool_topic} has no instance_id): it receives every task besides the pool, so tasks are "
                    f"answered twice; stop it, or give it an instance id (AGENT_INSTANCE_ID) so it joins the pool")
        if not self.member and isinstance(other, str):
            return (f"agent id {self.agent_id} is also served by pool member {other}: this agent receives every "
                    f"task besides the pool, so tasks are answered twice; give it an instance id "
                    f"(AGENT_INSTANCE_ID) so it joins the pool, or stop the pool")
        return None

    # -------------------------------------------------------------- leaving
    def leaving_topics(self, timeout: float) -> list[str]:
        """After this member published its `unavailable`: the pool's status topic when no member is
        left alive once the broker has echoed that status back (or `timeout` passed), else none."""
        if not self.member:
            return []
        with self._changed:
            self._changed.wait_for(lambda: self.instance_id not in self._alive, timeout)
            return [] if any(member != self.instance_id for member in self._alive) else [self.pool_topic]
