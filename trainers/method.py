"""What a training method contributes to the shared loop: its model, how a batch is
collated, its loss, and its eval metrics. SFT is the default token-loss method; others
(classification, preference losses, ...) subclass and override what differs."""

from __future__ import annotations

import torch

from trainers.data import collate
from trainers.losses import token_nll_sum


class Method:
    """Next-token loss on the trained spans of `Example`s (SFT and continued pre-training)."""

    name = "sft"
    # Eval metric the run compares across evaluations, and whether higher is better.
    metric, higher_is_better = "eval_loss", False

    def __init__(self, job, tokenizer, use_gpu: bool):
        self.job, self.tokenizer, self.use_gpu = job, tokenizer, use_gpu
        self.mask_dtype = torch.float32

    def build_model(self) -> torch.nn.Module:
        from trainers.setup import build_policy

        model = build_policy(self.job.model, self.job.peft, self.use_gpu)
        self.mask_dtype = next(model.parameters()).dtype
        return model

    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        return collate(examples, self.tokenizer.pad_token_id, mask_dtype=self.mask_dtype)

    @staticmethod
    def count_items(batch: dict) -> int:
        """How many loss terms the batch contributes (trained tokens here)."""
        return int((batch["labels"][:, 1:] != -100).sum())

    @staticmethod
    def count_tokens(examples: list) -> int:
        return sum(sum(e.seq_lens) for e in examples)

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], use_cache=False)
        return token_nll_sum(out.logits, batch["labels"])

    def eval_sums(self, model, batch: dict) -> dict[str, float]:
        """Per-batch sums that `finish_eval` turns into metrics (summed across workers)."""
        summed, count = self.loss(model, batch)
        return {"loss": float(summed), "items": float(count)}

    def finish_eval(self, sums: dict[str, float]) -> dict[str, float]:
        return {"eval_loss": sums["loss"] / max(sums["items"], 1.0)}
