"""What a task may spend on LLM requests, and what it spent (PROTOCOL.md 8): the budget its
envelope carries (the pipeline's so far), this agent's own limits per task and, for a
conversation it starts, per conversation; the stricter limit wins. Tokens are the providers'
usage fields, as the trace's `gen_ai.usage.*` counts them; cost comes from the price table."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Mapping, Optional

from . import protocol
from .config import BudgetSettings
from .errors import TaskFailure
from .usage import Budget, Usage

log = logging.getLogger("agent2389.spend")

_MILLION = 1_000_000


class BudgetExceeded(TaskFailure):
    code = protocol.BUDGET_EXCEEDED


class Prices:
    """USD per million input and output tokens, by model (`[llm.prices."MODEL"]`). A model without
    a price counts tokens only, and says so once."""

    def __init__(self, table: Mapping[str, tuple[float, float]]):
        self.table = dict(table)
        self._unpriced: set[str] = set()
        self._lock = threading.Lock()

    def cost(self, model: str, tokens_in: int, tokens_out: int) -> float:
        price = self.table.get(model)
        if price is None:
            with self._lock:
                first = model not in self._unpriced
                self._unpriced.add(model)
            if first:
                log.warning("model %r has no price in [llm.prices]: its tokens are counted, its cost is not (add "
                            "[llm.prices.\"%s\"] input_per_mtok and output_per_mtok)", model, model)
            return 0.0
        return (tokens_in * price[0] + tokens_out * price[1]) / _MILLION


@dataclass
class _Limit:
    tokens: Optional[int]
    cost: Optional[float]
    name: str  # what the error calls it


class Spend:
    """One task's: checked before each LLM request, told after each."""

    def __init__(self, prices: Prices, limits: BudgetSettings, budget: Optional[Budget], before: Optional[Usage]):
        """`budget` and `before`: what the envelope carries (None: this agent starts the
        conversation's budget, from its per-conversation limits, if it has any)."""
        self.prices = prices
        self.before = before or Usage()
        if budget is None and (limits.max_tokens_per_conversation is not None
                               or limits.max_cost_usd_per_conversation is not None):
            budget = Budget(limits.max_tokens_per_conversation, limits.max_cost_usd_per_conversation, 0, 0.0)
        self.budget = budget
        self.own = Usage()
        self._own_limit = _Limit(limits.max_tokens_per_task, limits.max_cost_usd_per_task,
                                 "this agent's limit per task")

    def record(self, model: str, tokens_in: int, tokens_out: int) -> float:
        """One LLM request's usage; returns its cost."""
        cost = self.prices.cost(model, tokens_in, tokens_out)
        self.own = Usage(self.own.input_tokens + tokens_in, self.own.output_tokens + tokens_out,
                         self.own.cost_usd + cost)
        return cost

    def check(self) -> None:
        """Before an LLM request: BudgetExceeded when a limit is spent."""
        own_tokens = self.own.input_tokens + self.own.output_tokens
        if self.budget is not None:
            self._within(_Limit(self.budget.max_tokens, self.budget.max_cost_usd, "the task's budget"),
                         self.budget.used_tokens + own_tokens, self.budget.used_cost_usd + self.own.cost_usd)
        self._within(self._own_limit, own_tokens, self.own.cost_usd)

    @staticmethod
    def _within(limit: _Limit, tokens: int, cost: float) -> None:
        if limit.tokens is not None and tokens >= limit.tokens:
            raise BudgetExceeded(f"budget exceeded: {tokens} tokens used of max_tokens {limit.tokens} "
                                 f"({limit.name}); no further LLM request was made")
        if limit.cost is not None and cost >= limit.cost:
            raise BudgetExceeded(f"budget exceeded: {cost:.6f} USD used of max_cost_usd {limit.cost:g} "
                                 f"({limit.name}); no further LLM request was made")

    def pipeline(self) -> Usage:
        """The whole pipeline's usage so far, this agent's included."""
        return Usage(self.before.input_tokens + self.own.input_tokens,
                     self.before.output_tokens + self.own.output_tokens, self.before.cost_usd + self.own.cost_usd)

    def forwarded(self) -> dict:
        """What a forward carries: the budget with `used_*` updated (if there is one), and the usage."""
        fields: dict = {"usage": self.pipeline().message()}
        if self.budget is not None:
            fields["budget"] = Budget(self.budget.max_tokens, self.budget.max_cost_usd,
                                      self.budget.used_tokens + self.own.input_tokens + self.own.output_tokens,
                                      self.budget.used_cost_usd + self.own.cost_usd).message()
        return fields
