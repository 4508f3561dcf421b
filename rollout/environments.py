"""The built-in environments (`rollout.environment: rayft:NAME`):

- `calculator`: arithmetic questions with a calculator tool (`a op b` on integers). The answer is judged
  against the row's `reference`; the full reward needs a well-formed tool call
  (`no_tool_reward`, default 0.5, for a right answer without one), so a policy learns to
  use the tool where it cannot compute itself. Rows: `rayft data synth --task
  calculator`; tool-use transcripts to start from: `--task calculator_sft` (they teach
  the call format, so run them with `describe_tools: false`).
- `guess_number`: a multi-turn game with feedback. The user thinks of a number (the
  row's `reference`) between `low` and `high`; each guess is answered "Higher.",
  "Lower." or "Correct!"; the reward is 1 minus `cost_per_guess` per extra guess, 0 if
  never found. Rows: `--task guess_number`.
"""

from __future__ import annotations

import operator
import re
from typing import Optional

from rollout.environment import ToolEnvironment, Turn
from rollout.tools import Tool

OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
MAX_MAGNITUDE = 10 ** 18


def calculator(a: int, op: str, b: int) -> str:
    """a op b for integers a and b and op one of + - *."""
    if op not in OPERATORS:
        raise ValueError(f"op must be one of {' '.join(OPERATORS)}, got {op!r}")
    if max(abs(a), abs(b)) > MAX_MAGNITUDE:
        raise ValueError("the operands are too large")
    return str(OPERATORS[op](a, b))


# Numbers as JSON integers: `{"a": 482, "op": "+", "b": 317}` spells each operand as the
# question does, which a model copies more easily than the digits inside a string.
CALCULATOR = Tool(calculator, "Integer arithmetic: a op b.",
                  {"a": {"type": "integer"}, "op": {"type": "string", "enum": list(OPERATORS)}, "b": {"type": "integer"}})


class Calculator(ToolEnvironment):
    tools = [CALCULATOR]

    def __init__(self, no_tool_reward: float = 0.5, describe_tools: bool = True):
        super().__init__()
        self.no_tool_reward, self.describe_tools = no_tool_reward, describe_tools

    def finish(self, answer: str) -> Turn:
        if self.reference is None:
            raise ValueError("the calculator environment needs the answer as the row's `reference`")
        right = answer.strip() == str(self.reference).strip()
        reward = (1.0 if self.calls else self.no_tool_reward) if right else 0.0
        return Turn(reward=reward, done=True, success=right)


class GuessNumber:
    tools: list = []

    def __init__(self, low: int = 1, high: int = 100, cost_per_guess: float = 0.1):
        self.low, self.high, self.cost = low, high, cost_per_guess

    def reset(self, prompt: list[dict], reference: Optional[str], metadata: dict) -> list[dict]:
        if reference is None or not str(reference).strip().lstrip("-").isdigit():
            raise ValueError("the guess_number environment needs the secret number as the row's `reference`")
        self.secret, self.guesses = int(reference), 0
        return prompt

    def step(self, message: str) -> Turn:
        numbers = re.findall(r"-?\d+", message)
        if not numbers:
            return Turn([{"role": "user", "content": f"Guess a number between {self.low} and {self.high}."}],
                        success=False)
        self.guesses += 1
        guess = int(numbers[-1])
        if guess == self.secret:
            return Turn([{"role": "user", "content": "Correct!"}], reward=max(0.0, 1.0 - self.cost * (self.guesses - 1)),
                        done=True, success=True)
        return Turn([{"role": "user", "content": "Higher." if guess < self.secret else "Lower."}], success=False)


BUILTINS = {"calculator": Calculator, "guess_number": GuessNumber}
