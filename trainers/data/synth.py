"""Learnable synthetic tasks: small chat datasets a tiny model can learn on CPU in minutes.

`rayft data synth --task NAME --n N --out FILE` lands here. Each row is in chat format
with the expected answer as `reference`, so the same file serves SFT (the assistant turn
is the target) and RL (`exact_match(response, reference)` is the reward):

    {"messages": [{"role": "user", "content": "What is 23 + 45?"},
                  {"role": "assistant", "content": "68"}], "reference": "68"}
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path
from typing import Callable

from trainers.errors import UserError


def addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}?", str(a + b)


def small_addition(rng: random.Random) -> tuple[str, str]:
    """Single-digit sums: a hundred facts, learned partly after a short SFT, which makes
    it the exact-match task RL tests improve on."""
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"What is {a} + {b}?", str(a + b)


def small_addition_mixed(rng: random.Random) -> tuple[str, str, str]:
    """Single-digit sums answered in two styles, half bare ("7") and half verbose ("The
    answer is 7."); the reference is the bare answer. A model trained on it answers
    greedily in the verbose style, so exact match starts near 0 and RL has a style to learn."""
    question, answer = small_addition(rng)
    shown = answer if rng.random() < 0.5 else f"The answer is {answer}."
    return question, shown, answer


def reverse(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
    return f"Reverse: {word}", word[::-1]


_FILLER = "the a movie film story plot actor scene music ending it was and very quite really".split()
_SENTIMENT = {"positive": "great wonderful loved excellent superb delightful".split(),
              "negative": "awful terrible hated boring dreadful poor".split()}


def sentiment(rng: random.Random) -> tuple[str, str]:
    """A short review whose one sentiment word decides the label (text/label rows)."""
    label = rng.choice(sorted(_SENTIMENT))
    words = [rng.choice(_FILLER) for _ in range(rng.randint(4, 9))]
    words.insert(rng.randint(0, len(words)), rng.choice(_SENTIMENT[label]))
    return " ".join(words), label


def addition_preference(rng: random.Random) -> tuple[str, str, str]:
    """An addition question, its right answer, and a typical wrong one (the difference or
    the product: the wrong operation), for reward models and DPO."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    wrong = a - b if rng.random() < 0.5 else a * b
    return f"What is {a} + {b}?", str(a + b), str(wrong)


def calculator(rng: random.Random) -> dict:
    """A two-digit sum as a prompt row for the calculator environment (the addition task)."""
    question, answer = addition(rng)
    return {"messages": [{"role": "user", "content": question}], "reference": answer}


def calculator_sft(rng: random.Random, tool_share: float = 0.45) -> dict:
    """A calculator-environment transcript to start RL from: `tool_share` of them call
    the tool and copy its result; the rest answer at once in another style ("The answer
    is 83."), which the environment never counts as right, so a policy that starts out
    answering at once greedily gains everything by learning to call the tool. There is no
    system message describing the tool: the transcripts teach the call format, and the
    environment runs with `describe_tools: false`."""
    from rollout.environments import calculator as evaluate

    row = calculator(rng)
    question, answer = row["messages"][0]["content"], row["reference"]
    a, b = (int(x) for x in question[len("What is "):-1].split(" + "))
    messages = [{"role": "user", "content": question}]
    if rng.random() < tool_share:
        call = json.dumps({"name": "calculator", "arguments": {"a": a, "op": "+", "b": b}})
        messages += [{"role": "assistant", "content": f"<tool_call>{call}</tool_call>"},
                     {"role": "tool", "content": evaluate(a, "+", b)}]
    else:
        answer = f"The answer is {int(answer) + rng.choice([-10, -1, 0, 1, 10])}."
    return {"messages": messages + [{"role": "assistant", "content": answer}], "reference": row["reference"]}


def guess_number(rng: random.Random) -> dict:
    """A prompt row for the guess_number environment (the secret is the reference)."""
    secret = rng.randint(1, 20)
    return {"messages": [{"role": "user", "content": "I am thinking of a number between 1 and 20. "
                                                     "Guess it: answer with one number."}], "reference": str(secret)}


# Tasks that draw whole rows (prompts and transcripts for the environments).
ROW_TASKS: dict[str, Callable[[random.Random], dict]] = {
    "calculator": calculator, "calculator_sft": calculator_sft, "guess_number": guess_number}

# name -> function drawing one (question, answer) pair from the generator
TASKS: dict[str, Callable[[random.Random], tuple]] = {
    "addition": addition, "small_addition": small_addition,
    "small_addition_mixed": small_addition_mixed, "reverse": reverse, "sentiment": sentiment, "addition_pref": addition_preference,
    **ROW_TASKS}
# Tasks whose pairs are (text, label) classification rows rather than chat turns.
CLASSIFICATION_TASKS = {"sentiment"}
# Chat tasks whose shown answer differs from the reference: (question, answer, reference).
STYLED_TASKS = {"small_addition_mixed"}
# Tasks that draw (prompt, chosen, rejected) preference rows.
PREFERENCE_TASKS = {"addition_pref"}


def synth_rows(task: str, n: int, seed: int = 0) -> list[dict]:
    """`n` chat rows of `task`, the same for the same seed."""
    if task not in TASKS:
        raise UserError(f"unknown synthetic task '{task}'; choose one of {', '.join(TASKS)}")
    if n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        if task in ROW_TASKS:
            rows.append(ROW_TASKS[task](rng))
            continue
        if task in PREFERENCE_TASKS:
            prompt, chosen, rejected = TASKS[task](rng)
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            continue
        if task in STYLED_TASKS:
            question, answer, reference = TASKS[task](rng)
        else:
            question, answer = TASKS[task](rng)
            reference = answer
        if task in CLASSIFICATION_TASKS:
            rows.append({"text": question, "label": answer})
            continue
        rows.append({"messages": [{"role": "user", "content": question},
                                  {"role": "assistant", "content": answer}],
                     "reference": reference})
    return rows


def write_synth(task: str, n: int, out_path: str | Path, seed: int = 0) -> Path:
    """Write `synth_rows(task, n, seed)` as jsonl to `out_path` (parent folders created)."""
    rows = synth_rows(task, n, seed)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return out


def exact_match(response: str, reference: str) -> bool:
    """True when the response is the reference, ignoring surrounding whitespace."""
    return response.strip() == reference.strip()
