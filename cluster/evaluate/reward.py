"""The reward-model eval passes: each runs the model over batches (with a progress bar on
stderr) and returns its metrics and a result per evaluated row.

- `pairs_pass`: both sides of each preference row, encoded by the reward trainer's own
  `encode_pairs` (prompt + response as an assistant turn, same template and truncation),
  scored in one forward pass per batch as in training; pairwise accuracy, margin, each
  side's mean reward and the Bradley-Terry loss (`pairwise_reward_loss`).
- `rewards_pass`: one reward per (prompt, response), encoded by `encode_scored`; mean
  squared and absolute error when the rows carry their own scores.

The reward is `logits[:, 0]` of the one-output classification head, read (as in
`trainers.reward.RewardMethod.rewards`) at each row's last token. A row whose response
lost every token to truncation is left out and counted as `dropped`, as training drops it.
"""

from __future__ import annotations

import torch

from cluster.evaluate.metrics import mean, pairwise_metrics, regression_errors
from cluster.evaluate.passes import batches
from trainers.data import collate
from trainers.data.pairs import encode_pairs, encode_scored
from trainers.data.records import Example, Preference, Scored
from trainers.losses import pairwise_reward_loss


def rewards(model, examples: list[Example], pad_id: int, device) -> list[float]:
    """The reward of each example, from one padded forward pass."""
    batch = collate(examples, pad_id)
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
    return logits[:, 0].float().tolist()


@torch.inference_mode()
def pairs_pass(model, tokenizer, records: list[Preference], max_length: int, side: str, batch_size: int, device,
               use_margin: bool = True, center_coef: float = 0.0) -> tuple[dict, list]:
    # One row at a time, so a dropped pair keeps its place among the rows.
    pairs = {i: encoded[0] for i, r in enumerate(records)
             if (encoded := encode_pairs([r], tokenizer, max_length, side)[0])}
    lengths = {i: max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for i, p in pairs.items()}
    chosen, rejected = {}, {}
    for idx in batches(lengths, batch_size, "pairs"):
        # Chosen then rejected sides in one batch, as training's `pair_batch` does.
        scores = rewards(model, [pairs[i].chosen for i in idx] + [pairs[i].rejected for i in idx],
                         tokenizer.pad_token_id, device)
        for k, i in enumerate(idx):
            chosen[i], rejected[i] = scores[k], scores[len(idx) + k]
    order = sorted(pairs)
    c, r = [chosen[i] for i in order], [rejected[i] for i in order]
    margins = torch.tensor([pairs[i].margin or 0.0 for i in order]) if use_margin else None
    losses = pairwise_reward_loss(torch.tensor(c), torch.tensor(r), margins, center_coef).tolist()
    metrics = {**pairwise_metrics(c, r), "loss": mean(losses), "pairs": len(pairs),
               "dropped": len(records) - len(pairs),
               "truncated": sum(p.chosen.truncated or p.rejected.truncated for p in pairs.values())}
    results = []
    for i, record in enumerate(records):
        scored = i in pairs
        results.append({"prompt": record.prompt_messages, "chosen": record.chosen, "rejected": record.rejected,
                        "chosen_reward": chosen.get(i), "rejected_reward": rejected.get(i),
                        "correct": chosen[i] > rejected[i] if scored else None})
    return metrics, results


@torch.inference_mode()
def rewards_pass(model, tokenizer, records: list[Scored], has_scores: bool, max_length: int, side: str,
                 batch_size: int, device) -> tuple[dict, list]:
    examples = {i: encoded[0].example for i, r in enumerate(records)
                if (encoded := encode_scored([r], tokenizer, max_length, side)[0])}
    predicted = {}
    for idx in batches({i: len(e.input_ids) for i, e in examples.items()}, batch_size, "rewards"):
        for i, reward in zip(idx, rewards(model, [examples[i] for i in idx], tokenizer.pad_token_id, device)):
            predicted[i] = reward
    order = sorted(predicted)
    metrics = {"mean_reward": mean([predicted[i] for i in order]), "scored": len(order),
               "dropped": len(records) - len(order), "truncated": sum(e.truncated for e in examples.values())}
    if has_scores:
        metrics.update(regression_errors([predicted[i] for i in order], [records[i].score for i in order]))
    results = []
    for i, record in enumerate(records):
        result = {"prompt": record.prompt_messages, "response": record.response, "reward": predicted.get(i)}
        if has_scores:
            result["score"] = record.score
        results.append(result)
    return metrics, results
