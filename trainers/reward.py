"""Reward models (`method: rm`): a scalar head on the causal LM's last token, trained from
preference pairs with the Bradley-Terry loss or from scored responses by regression.
Eval reports pairwise accuracy and the mean chosen-minus-rejected margin (pairwise) or the
mean squared and absolute error (regression). `final/` loads with
`AutoModelForSequenceClassification` (one output: the reward)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainers.classify import load_sequence_classifier
from trainers.data import collate
from trainers.data.pairs import PairExample
from trainers.losses import pairwise_reward_loss
from trainers.method import Method


def pair_batch(pairs: list[PairExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen then rejected sides in one padded batch (one forward pass for both)."""
    batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    batch["margin"] = torch.tensor([p.margin or 0.0 for p in pairs], dtype=torch.float32)
    batch["index"] = torch.tensor([p.index for p in pairs])
    return batch


class RewardMethod(Method):
    name = "rm"

    def __init__(self, job, tokenizer, use_gpu: bool):
        super().__init__(job, tokenizer, use_gpu)
        self.pairwise = job.rm.objective == "pairwise"
        self.metric, self.higher_is_better = ("eval_accuracy", True) if self.pairwise else ("eval_loss", False)

    def build_model(self) -> torch.nn.Module:
        return load_sequence_classifier(self.job, self.tokenizer, self.use_gpu, {0: "reward"})

    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        if self.pairwise:
            return pair_batch(examples, self.tokenizer.pad_token_id)
        batch = collate([e.example for e in examples], self.tokenizer.pad_token_id)
        batch["score"] = torch.tensor([e.score for e in examples], dtype=torch.float32)
        return batch

    @staticmethod
    def count_items(batch: dict) -> int:
        return int(batch["margin"].numel()) if "margin" in batch else int(batch["score"].numel())

    @staticmethod
    def count_tokens(examples: list) -> int:
        sides = [s for e in examples for s in ((e.chosen, e.rejected) if isinstance(e, PairExample) else (e.example,))]
        return sum(len(s.input_ids) for s in sides)

    def rewards(self, model, batch) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float()

    def _pair_losses(self, model, batch):
        rewards = self.rewards(model, batch)
        chosen, rejected = rewards.chunk(2)
        margin = batch["margin"] if self.job.rm.use_margin else None
        return pairwise_reward_loss(chosen, rejected, margin, self.job.rm.center_coef), chosen, rejected

    def loss(self, model, batch):
        if self.pairwise:
            losses, _, _ = self._pair_losses(model, batch)
            return losses.sum(), batch["margin"].new_tensor(len(losses))
        predicted = self.rewards(model, batch)
        return F.mse_loss(predicted, batch["score"], reduction="sum"), batch["score"].new_tensor(len(predicted))

    def eval_sums(self, model, batch):
        if self.pairwise:
            losses, chosen, rejected = self._pair_losses(model, batch)
            return {"loss": float(losses.sum()), "items": float(len(losses)),
                    "correct": float((chosen > rejected).sum()), "margin": float((chosen - rejected).sum())}
        predicted = self.rewards(model, batch)
        error = predicted - batch["score"]
        return {"loss": float((error ** 2).sum()), "abs": float(error.abs().sum()), "items": float(len(error))}

    def finish_eval(self, sums):
        n = max(sums["items"], 1.0)
        if self.pairwise:
            return {"eval_loss": sums["loss"] / n, "eval_accuracy": sums["correct"] / n,
                    "eval_margin": sums["margin"] / n}
        return {"eval_loss": sums["loss"] / n, "eval_mae": sums["abs"] / n}


def encode_preference_sets(datasets, tokenizer, data_cfg, objective: str) -> None:
    """Records -> PairExamples (pairwise) or ScoredExamples (regression), in place."""
    from trainers.data.pairs import encode_pairs, encode_scored

    encode = encode_pairs if objective == "pairwise" else encode_scored
    dropped = 0
    for split in ("train", "eval"):
        encoded, lost = encode(getattr(datasets, split), tokenizer, data_cfg.max_length, data_cfg.truncation_side,
                               data_cfg.chat_template)
        if split == "eval":  # negative indices keep the splits apart as cache keys
            for example in encoded:
                example.index = -(example.index + 1)
        setattr(datasets, split, encoded)
        dropped += lost
    datasets.stats.update(train_samples=len(datasets.train), eval_samples=len(datasets.eval),
                          dropped_no_response=dropped)
