"""The tool interface (RFC: describe, initialize, execute, optional shutdown)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

from ..protocol import compact_json


@dataclass(frozen=True)
class ToolDef:
    """What the model is told about a tool."""

    name: str
    description: str
    schema: dict


class ToolError(Exception):
    """A tool failed; the message goes back to the model as the tool result."""


class ToolTimeout(ToolError):
    pass


class Tool:
    name: str = ""
    description: str = ""
    schema: dict = {"type": "object"}
    source: str = "builtin"  # where it comes from, for `agent2389 tools list`
    approval_timeout: Optional[int] = None  # seconds a person has to approve a call (PROTOCOL.md 9); None: no approval

    def initialize(self) -> None:
        """Check at startup that the tool can work (raises ToolError with a clear message)."""

    def execute(self, params: dict, deadline: float) -> str:
        raise NotImplementedError

    def shutdown(self) -> None:
        """Release resources at exit."""


def seconds_left(deadline: float, cap: float) -> float:
    """Time a tool may take: its own cap, never past the task deadline (ToolTimeout when passed)."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise ToolTimeout("the task deadline passed")
    return min(cap, left)


def as_text(value: Any) -> str:
    return value if isinstance(value, str) else compact_json(value)
