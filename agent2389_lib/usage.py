"""Budgets and usage on the wire (PROTOCOL.md 8, additive): the `budget` a task envelope may
carry, and the `usage` answers, errors and forwards carry (the whole pipeline's so far)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

_MAX_TOKENS = 10 ** 12  # more than any budget; larger values are typos
_MAX_USD = 10.0 ** 9


class UsageError(ValueError):
    """A `budget` or `usage` that cannot be read; the message names the field."""


@dataclass  # not frozen: one is made for every task, a frozen one takes three times as long
class Budget:
    max_tokens: Optional[int] = None
    max_cost_usd: Optional[float] = None
    used_tokens: int = 0
    used_cost_usd: float = 0.0

    def message(self) -> dict:
        fields: dict = {"used_tokens": self.used_tokens, "used_cost_usd": round(self.used_cost_usd, 6)}
        if self.max_tokens is not None:
            fields["max_tokens"] = self.max_tokens
        if self.max_cost_usd is not None:
            fields["max_cost_usd"] = self.max_cost_usd
        return fields


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    def message(self) -> dict:
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "cost_usd": round(self.cost_usd, 6)}


def parse_budget(value: Any) -> Optional[Budget]:
    """The envelope's `budget`; absent or null is none."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise UsageError("budget must be an object like {\"max_tokens\": 20000, \"max_cost_usd\": 0.5}")
    return Budget(_tokens(value, "max_tokens", "budget"), _usd(value, "max_cost_usd", "budget"),
                  _tokens(value, "used_tokens", "budget") or 0, _usd(value, "used_cost_usd", "budget") or 0.0)


def parse_usage(value: Any) -> Optional[Usage]:
    """The `usage` a forward carries; absent or null is none."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise UsageError("usage must be an object like {\"input_tokens\": 10, \"output_tokens\": 5, \"cost_usd\": 0}")
    return Usage(_tokens(value, "input_tokens", "usage") or 0, _tokens(value, "output_tokens", "usage") or 0,
                 _usd(value, "cost_usd", "usage") or 0.0)


def _tokens(table: dict, key: str, where: str) -> Optional[int]:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _MAX_TOKENS:
        raise UsageError(f"{where}.{key} must be a whole number of tokens from 0 to {_MAX_TOKENS}")
    return value


def _usd(table: dict, key: str, where: str) -> Optional[float]:
    value = table.get(key)
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not 0 <= value <= _MAX_USD):
        raise UsageError(f"{where}.{key} must be a number of US dollars from 0 to {_MAX_USD:g}")
    return float(value)
