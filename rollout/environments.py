"""The built-in environments (`rollout.environment: rayft:NAME`):

- `calculator`: arithmetic questions with a calculator tool. The answer is judged
  against the row's `reference`; the full reward needs a well-formed tool call
  (`no_tool_reward`, default 0.5, for a right answer without one), so a policy learns to
  use the tool where it cannot compute itself. Rows: `rayft data synth --task
  calculator`; tool-use transcripts to start from: `--task calculator_sft`.
- `guess_number`: a multi-turn game with feedback. The user thinks of a number (the
  row's `reference`) between `low` and `high`; each guess is answered "Higher.",
  "Lower." or "Correct!"; the reward is 1 minus `cost_per_guess` per extra guess, 0 if
  never found. Rows: `--task guess_number`.
"""

from __future__ import annotations

import ast
import operator
import re
from typing import Optional

from rollout.environment import ToolEnvironment, Turn
from rollout.tools import Tool

OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
MAX_EXPRESSION_CHARS = 200
MAX_MAGNITUDE = 10 ** 18


def calculator(expression: str) -> str:
    """The value of an integer expression of + - * and parentheses."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot parse {expression!r}") from None
    return str(_evaluate(tree.body))


def _evaluate(node) -> int:
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        value = OPERATORS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
        if abs(value) > MAX_MAGNITUDE:
            raise ValueError("the result is too large")
        return value
    raise ValueError("only integers, + - * and parentheses are allowed")


CALCULATOR = Tool(calculator, "Evaluate an arithmetic expression of integers with + - * and parentheses.",
                  {"expression": {"type": "string", "description": "for example 482 + 317"}})


class Calculator(ToolEnvironment):
    tools = [CALCULATOR]

    def __init__(self, no_tool_reward: float = 0.5):
        super().__init__()
        self.no_tool_reward = no_tool_reward

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
