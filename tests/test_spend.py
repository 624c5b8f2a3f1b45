"""Budgets and usage (PROTOCOL.md 8) without a broker: the price table, the limits (the stricter
wins), what a forward carries, hostile values."""

import json
import unittest

from agent2389_lib.config import BudgetSettings
from agent2389_lib.spend import BudgetExceeded, Prices, Spend
from agent2389_lib.usage import Budget, Usage, UsageError, parse_budget, parse_usage
from support import envelope
from test_processor import AGENT, ProcessorTestCase

PRICES = Prices({"gpt-4o": (2.5, 10.0)})


class PriceTests(unittest.TestCase):
    def test_cost_by_the_million_and_a_model_without_a_price_said_once(self):
        self.assertAlmostEqual(PRICES.cost("gpt-4o", 1_000_000, 100_000), 3.5)
        prices = Prices({})
        with self.assertLogs("agent2389.spend", "WARNING") as logs:
            self.assertEqual(prices.cost("mystery", 10, 10), 0.0)
            self.assertEqual(prices.cost("mystery", 10, 10), 0.0)
        self.assertEqual(len(logs.output), 1)
        self.assertIn('[llm.prices."mystery"]', logs.output[0])


class SpendTests(unittest.TestCase):
    def test_the_tasks_budget_counts_what_the_pipeline_used_before(self):
        spend = Spend(PRICES, BudgetSettings(), Budget(max_tokens=100, used_tokens=80), Usage(50, 30, 0.01))
        spend.check()
        spend.record("gpt-4o", 15, 5)
        with self.assertRaises(BudgetExceeded) as caught:
            spend.check()
        self.assertEqual(str(caught.exception), "budget exceeded: 100 tokens used of max_tokens 100 (the task's "
                                                "budget); no further LLM request was made")
        self.assertEqual(spend.pipeline(), Usage(65, 35, 0.01 + (15 * 2.5 + 5 * 10) / 1e6))
        self.assertEqual(spend.forwarded()["budget"], {"max_tokens": 100, "used_tokens": 100,
                                                       "used_cost_usd": round((15 * 2.5 + 5 * 10) / 1e6, 6)})

    def test_this_agents_own_limit_per_task_and_cost(self):
        spend = Spend(PRICES, BudgetSettings(max_cost_usd_per_task=0.0001), Budget(max_tokens=10 ** 6), None)
        spend.record("gpt-4o", 20, 10)  # 0.00015 USD
        with self.assertRaises(BudgetExceeded) as caught:
            spend.check()
        self.assertIn("0.000150 USD used of max_cost_usd 0.0001 (this agent's limit per task)", str(caught.exception))

    def test_a_conversation_this_agent_starts_gets_its_budget_and_a_forward_carries_it(self):
        limits = BudgetSettings(max_tokens_per_conversation=500, max_cost_usd_per_conversation=2.0)
        spend = Spend(PRICES, limits, None, None)
        spend.record("gpt-4o", 100, 20)
        self.assertEqual(spend.forwarded(), {
            "budget": {"max_tokens": 500, "max_cost_usd": 2.0, "used_tokens": 120, "used_cost_usd": 0.00045},
            "usage": {"input_tokens": 100, "output_tokens": 20, "cost_usd": 0.00045}})
        joined = Spend(PRICES, limits, Budget(max_tokens=50), None)
        self.assertEqual(joined.budget, Budget(max_tokens=50), "not its own: the conversation's")
        self.assertNotIn("budget", Spend(PRICES, BudgetSettings(), None, None).forwarded(), "no budget, none sent")


class WireTests(unittest.TestCase):
    def test_hostile_budgets_and_usage_are_refused_naming_the_field(self):
        for value, text in (([1], "budget must be an object"), ({"max_tokens": -1}, "budget.max_tokens"),
                            ({"max_tokens": True}, "budget.max_tokens"), ({"max_tokens": 1.5}, "budget.max_tokens"),
                            ({"max_cost_usd": "1"}, "budget.max_cost_usd"), ({"used_cost_usd": 1e300},
                                                                             "budget.used_cost_usd"),
                            ({"max_tokens": 10 ** 13}, "budget.max_tokens")):
            with self.subTest(value=value):
                with self.assertRaises(UsageError) as caught:
                    parse_budget(value)
                self.assertIn(text, str(caught.exception))
        self.assertEqual(parse_budget({"max_tokens": 5, "extra": "ignored"}), Budget(max_tokens=5))
        with self.assertRaises(UsageError):
            parse_usage({"input_tokens": float("nan")})
        self.assertEqual(parse_usage(None), None)


class ProcessorBudgetTests(ProcessorTestCase):
    def test_a_budget_that_cannot_be_read_is_invalid_input(self):
        self.make()
        delivery = self.deliver(envelope(AGENT, budget={"max_tokens": "lots"}))
        message = self.assert_answered_then_acked(delivery, f"/conversations/conv1/{AGENT}", lambda m: None)
        self.assertEqual(message["error"]["code"], "invalid_input")
        self.assertIn("budget.max_tokens must be a whole number", message["error"]["message"])

    def test_a_spent_budget_refuses_the_task_before_it_thinks(self):
        thought = []

        def think(task, deadline):
            from agent2389_lib import taskscope
            taskscope.current_spend().check()  # what every LLM request does first
            thought.append(task)
            return "x"

        self.make(think=think)
        task = envelope(AGENT, budget={"max_tokens": 36, "used_tokens": 36},
                        usage={"input_tokens": 22, "output_tokens": 14, "cost_usd": 0.0002})
        delivery = self.deliver(task)
        message = self.assert_answered_then_acked(delivery, f"/conversations/conv1/{AGENT}", lambda m: None)
        self.assertEqual((message["error"]["code"], thought), ("budget_exceeded", []))
        self.assertEqual(message["usage"], {"input_tokens": 22, "output_tokens": 14, "cost_usd": 0.0002})
        self.assertEqual(self.metrics.snapshot()["tasks"]["tasks_budget_exceeded"], 1)
        json.dumps(message)


if __name__ == "__main__":
    unittest.main()
