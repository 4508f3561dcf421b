"""Eval metrics as pure functions, and the rule that picks which ones a model and a data
file get (`choose_passes`). Unit-tested against numbers worked out by hand."""

from __future__ import annotations

import math
from typing import Hashable, Sequence

from trainers.data.formats import get_format
from trainers.data.records import Conversation, Labelled, Preference, Prompt, RawText, Scored
from trainers.errors import UserError
from trainers.metrics import f1_from_counts

# Passes: "loss" gives loss and perplexity, "exact_match" greedy generation scored
# against references, "classification" accuracy and macro-F1; for a reward model "pairs"
# gives pairwise accuracy and margin, "rewards" a reward per (prompt, response).
LOSS, EXACT_MATCH, CLASSIFICATION = "loss", "exact_match", "classification"
PAIRS, REWARDS = "pairs", "rewards"


def choose_passes(task: str, fmt: str, has_reference: bool) -> tuple[str, ...]:
    """Which passes apply to a model of `task` ("causal_lm", "classifier" or
    "reward_model") on rows of format `fmt`. A causal LM gets the loss on every row that
    is a conversation or raw text, and exact match when rows carry an explicit
    `reference`/`answer`; a classifier needs text/label rows; a reward model compares the
    two sides of preference rows, or scores (prompt, response) rows: scored rows, or any
    conversation ending in an assistant turn. Anything else is a UserError naming the
    mismatch."""
    gives = get_format(fmt).gives
    if task == "reward_model":
        return _reward_passes(fmt, gives)
    if task == "classifier":
        if gives is not Labelled:
            raise UserError(f"a classification model needs text/label rows, but the data is in format '{fmt}'")
        return (CLASSIFICATION,)
    if gives is Labelled:
        raise UserError("text/label rows evaluate a classification model, but this is a causal LM")
    if gives not in (Conversation, RawText, Prompt):
        raise UserError(f"rows of format '{fmt}' cannot evaluate a causal LM; use conversations, text, "
                        "or prompts with a reference answer")
    passes = (LOSS,) if gives in (Conversation, RawText) else ()
    if has_reference and gives in (Conversation, Prompt):
        passes += (EXACT_MATCH,)
    if not passes:
        raise UserError("prompt rows without a 'reference' or 'answer' give nothing to score")
    return passes


def _reward_passes(fmt: str, gives: type) -> tuple[str, ...]:
    if gives is Preference:
        return (PAIRS,)
    if gives in (Scored, Conversation):
        return (REWARDS,)
    if gives is Prompt:
        # A bare `response` field only counts alongside a score (the scored format); alone
        # the row reads as a prompt.
        raise UserError("prompt rows have no response for a reward model to score; give prompt/completion rows "
                        "(or prompt/response with a score), or preference rows (prompt, chosen, rejected)")
    raise UserError(f"a reward model needs preference rows (prompt, chosen, rejected) or (prompt, response) rows, "
                    f"but the data is in format '{fmt}'")


def mean(values: Sequence[float]) -> float:
    """The arithmetic mean; NaN for no values."""
    return sum(values) / len(values) if values else float("nan")


def pairwise_metrics(chosen: Sequence[float], rejected: Sequence[float]) -> dict:
    """A reward model on preference pairs: `accuracy`, the share of pairs whose chosen
    response gets the strictly higher reward (a tie is wrong, as in training); `margin`,
    the mean reward(chosen) - reward(rejected); and each side's mean reward."""
    if len(chosen) != len(rejected):
        raise ValueError(f"{len(chosen)} chosen rewards but {len(rejected)} rejected")
    return {"accuracy": mean([float(c > r) for c, r in zip(chosen, rejected)]),
            "margin": mean([c - r for c, r in zip(chosen, rejected)]),
            "chosen_reward": mean(chosen), "rejected_reward": mean(rejected)}


def regression_errors(predicted: Sequence[float], gold: Sequence[float]) -> dict:
    """Mean squared and mean absolute error of rewards against the rows' own scores."""
    _same_length(gold, predicted)
    return {"mse": mean([(p - g) ** 2 for p, g in zip(predicted, gold)]),
            "mae": mean([abs(p - g) for p, g in zip(predicted, gold)])}


def mean_loss(nll_sum: float, tokens: int) -> float:
    """Mean negative log-likelihood per token (nats); NaN when nothing was scored."""
    return nll_sum / tokens if tokens else float("nan")


def perplexity(loss: float) -> float:
    """exp(mean loss per token): the effective number of equally likely next tokens."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def accuracy(gold: Sequence[Hashable], predicted: Sequence[Hashable]) -> float:
    _same_length(gold, predicted)
    return sum(g == p for g, p in zip(gold, predicted)) / len(gold) if gold else float("nan")


def f1_per_label(gold: Sequence[Hashable], predicted: Sequence[Hashable]) -> dict:
    """F1 of each label that occurs in `gold` or `predicted` (a label never seen in either
    has no defined F1, so it is left out, as scikit-learn does by default). Precision or
    recall with a zero denominator counts as 0 (`trainers.metrics.f1_from_counts`)."""
    _same_length(gold, predicted)
    scores = {}
    for label in sorted(set(gold) | set(predicted), key=str):
        tp = sum(g == label and p == label for g, p in zip(gold, predicted))
        fp = sum(g != label and p == label for g, p in zip(gold, predicted))
        fn = sum(g == label and p != label for g, p in zip(gold, predicted))
        scores[label] = f1_from_counts(tp, fp, fn)
    return scores


def macro_f1(gold: Sequence[Hashable], predicted: Sequence[Hashable]) -> float:
    """The unweighted mean of `f1_per_label`: every class counts the same, however rare."""
    scores = f1_per_label(gold, predicted)
    return sum(scores.values()) / len(scores) if scores else float("nan")


def _same_length(gold: Sequence, predicted: Sequence) -> None:
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions")
