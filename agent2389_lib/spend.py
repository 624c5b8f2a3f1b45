"""What a task may spend on LLM requests, and what it spent (PROTOCOL.md 8): the budget its
envelope carries (the pipeline's so far), this agent's own limits per task and, for a
conversation it starts, per conversation; the stricter limit wins. Tokens are the providers'
usage fields, as the trace's `gen_ai.usage.*` counts them; cost comes from the price table."""

from __future__ import annotations

import logging
import threading
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
        self.limits = limits

    def record(self, model: str, tokens_in: int, tokens_out: int) -> float:
        """One LLM request's usage; returns its cost."""
        if not tokens_in and not tokens_out:  # the echo provider's: nothing to price
            return 0.0
        cost = self.prices.cost(model, tokens_in, tokens_out)
        own = self.own
        own.input_tokens, own.output_tokens, own.cost_usd = (own.input_tokens + tokens_in,
                                                             own.output_tokens + tokens_out, own.cost_usd + cost)
        return cost

    def check(self) -> None:
        """Before an LLM request: BudgetExceeded when a limit is spent."""
        own_tokens = self.own.input_tokens + self.own.output_tokens
        budget = self.budget
        if budget is not None:
            _within(budget.max_tokens, budget.max_cost_usd, "the task's budget", budget.used_tokens + own_tokens,
                    budget.used_cost_usd + self.own.cost_usd)
        _within(self.limits.max_tokens_per_task, self.limits.max_cost_usd_per_task, "this agent's limit per task",
                own_tokens, self.own.cost_usd)

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


def _within(max_tokens: Optional[int], max_cost: Optional[float], limit: str, tokens: int, cost: float) -> None:
    if max_tokens is not None and tokens >= max_tokens:
        raise BudgetExceeded(f"budget exceeded: {tokens} tokens used of max_tokens {max_tokens} ({limit}); no "
                             f"further LLM request was made")
    if max_cost is not None and cost >= max_cost:
        raise BudgetExceeded(f"budget exceeded: {cost:.6f} USD used of max_cost_usd {max_cost:g} ({limit}); no "
                             f"further LLM request was made")
