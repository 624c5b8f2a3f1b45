"""Budgets and usage through a real mosquitto (PROTOCOL.md 8): a limit per task, a conversation's
budget across a three-agent pipeline, `usage` in answers, the price table, the metrics."""

import urllib.request

from fake_llm import FakeOpenAI, Reply
from support import BrokerTestCase, envelope

KEY = "sk-test-key-0123456789"
PRICES = {"gpt-4o": {"input_per_mtok": 2.5, "output_per_mtok": 10.0}}
PER_REQUEST = (11, 7)  # the fake's usage: prompt and completion tokens


def cost(tokens_in: int, tokens_out: int) -> float:
    return round((tokens_in * 2.5 + tokens_out * 10.0) / 1e6, 6)


class BudgetTests(BrokerTestCase):
    def openai_agent(self, fake: FakeOpenAI, agent_id: str, **sections):
        llm = {"provider": "openai", "base_url": fake.base_url, "prices": PRICES}
        return self.agent(agent_id, llm=llm, env={"OPENAI_API_KEY": KEY}, **sections)

    def test_a_limit_per_task_usage_in_answers_prices_and_metrics(self):
        fake = FakeOpenAI(api_key=KEY)
        self.addCleanup(fake.close)
        watcher = self.watcher("/control/agents/+/status", "/conversations/#", "/control/agents/+/progress")
        agent = self.openai_agent(fake, "spender", tools={"echo": "builtin"}, budget={"max_tokens_per_task": 30})
        agent.start_and_wait_available(watcher)
        fake.script = [Reply(tool_calls=[("echo", {"message": "a"})]), Reply(tool_calls=[("echo", {"message": "b"})]),
                       Reply("never asked")]
        looping = envelope("spender", cid="c-loop")
        watcher.publish("/control/agents/spender/input", looping)
        (error,) = watcher.wait_for("/conversations/c-loop/spender")
        self.assertEqual(error["error"]["code"], "budget_exceeded")
        self.assertEqual(error["error"]["message"], "budget exceeded: 36 tokens used of max_tokens 30 (this agent's "
                                                    "limit per task); no further LLM request was made")
        self.assertEqual(error["usage"], {"input_tokens": 22, "output_tokens": 14, "cost_usd": cost(22, 14)})
        self.assertEqual(len(fake.completions()), 2, "refused before the third request")
        fake.script = [Reply("fine")]
        task = envelope("spender", cid="c-fine")
        watcher.publish("/control/agents/spender/input", task)
        (answer,) = watcher.wait_for("/conversations/c-fine/spender")
        self.assertEqual(answer, {"response": "fine", "task_id": task["task_id"],
                                  "usage": {"input_tokens": 11, "output_tokens": 7, "cost_usd": cost(11, 7)}})
        (done,) = watcher.wait_for("/control/agents/spender/progress",
                                   lambda p: p["task_id"] == task["task_id"] and p["event_type"] == "TaskComplete")
        self.assertEqual(done["metadata"], {"usage": {"input_tokens": 11, "output_tokens": 7, "cost_usd": cost(11, 7)}})
        agent.wait_metric("tasks.tasks_budget_exceeded", 1)
        text = prometheus(agent)
        self.assertRegex(text, r'agent2389_llm_tokens_total\{provider="[^"]+",model="gpt-4o",direction="in"\} 33\n')
        self.assertRegex(text, r'agent2389_llm_tokens_total\{provider="[^"]+",model="gpt-4o",direction="out"\} 21\n')
        self.assertIn(f'agent2389_llm_cost_usd_total{{model="gpt-4o"}} {(33 * 2.5 + 21 * 10.0) / 1e6!r}', text)
        self.assertIn("agent2389_tasks_budget_exceeded_total 1", text)

    def test_a_conversations_budget_on_one_agent(self):
        fake = FakeOpenAI(api_key=KEY)
        self.addCleanup(fake.close)
        watcher = self.watcher("/control/agents/+/status", "/conversations/#")
        self.openai_agent(fake, "conversation-spender", tools={"echo": "builtin"},
                          budget={"max_tokens_per_conversation": 30}).start_and_wait_available(watcher)
        fake.script = [Reply(tool_calls=[("echo", {"message": "a"})]), Reply(tool_calls=[("echo", {"message": "b"})])]
        watcher.publish("/control/agents/conversation-spender/input", envelope("conversation-spender", cid="c-conv"))
        (error,) = watcher.wait_for("/conversations/c-conv/conversation-spender")
        self.assertEqual(error["error"]["message"], "budget exceeded: 36 tokens used of max_tokens 30 (the task's "
                                                    "budget); no further LLM request was made")

    def test_a_conversations_budget_follows_the_pipeline(self):
        """The first agent starts it; the third is refused before its first LLM request."""
        fake = FakeOpenAI(api_key=KEY)
        self.addCleanup(fake.close)
        watcher = self.watcher("/control/agents/+/status", "/conversations/#", "/control/agents/+/input")
        self.openai_agent(fake, "budget-first", budget={"max_tokens_per_conversation": 36}).start_and_wait_available(
            watcher)
        for name in ("budget-second", "budget-third"):
            self.openai_agent(fake, name).start_and_wait_available(watcher)
        task = envelope("budget-first", cid="c-budget",
                        next={"topic": "/control/agents/budget-second/input", "instruction": "W", "input": None,
                              "next": {"topic": "/control/agents/budget-third/input", "instruction": "E",
                                       "input": None, "next": None}})
        watcher.publish("/control/agents/budget-first/input", task)
        (error,) = watcher.wait_for("/conversations/c-budget/+")
        self.assertEqual(error["error"]["code"], "budget_exceeded")
        self.assertIn("36 tokens used of max_tokens 36 (the task's budget)", error["error"]["message"])
        self.assertEqual(error["usage"], {"input_tokens": 22, "output_tokens": 14, "cost_usd": cost(22, 14)})
        self.assertEqual(len(fake.completions()), 2)
        (to_second,) = watcher.matching("/control/agents/budget-second/input")
        self.assertEqual(to_second["budget"], {"max_tokens": 36, "used_tokens": 18, "used_cost_usd": cost(11, 7)})
        (to_third,) = watcher.matching("/control/agents/budget-third/input")
        self.assertEqual(to_third["budget"]["used_tokens"], 36)
        self.assertEqual(to_third["usage"], {"input_tokens": 22, "output_tokens": 14, "cost_usd": cost(22, 14)})


def prometheus(agent) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{agent.env['HEALTH_PORT']}/metrics",
                                     headers={"Accept": "text/plain"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.read().decode()
