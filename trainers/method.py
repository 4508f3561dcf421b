"""What a training method contributes to the shared loop: its model (PEFT and partial
freezing applied), how a batch is collated, its loss, its eval metrics and its per-step
hooks. SFT is the default token-loss method; others (classification, preference losses,
...) subclass and override what differs."""

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
        """The base model with the PEFT method applied, then partial freezing."""
        from trainers.setup import apply_peft_and_freezing, load_base_model

        model = load_base_model(self.job.model, self.job.peft, self.use_gpu)
        model = apply_peft_and_freezing(model, self.job)
        self.mask_dtype = next(model.parameters()).dtype
        return model

    def hooks(self):
        """Per-step callbacks for `run_loop`: gradual unfreezing, when configured."""
        from trainers.freezing import unfreeze_due
        from trainers.loop import Hooks

        return Hooks(before_step=[unfreeze_due] if self.job.freeze.mode == "gradual" else [])

    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        return collate(examples, self.tokenizer.pad_token_id, mask_dtype=self.mask_dtype)

    @staticmethod
    def count_items(batch: dict) -> int:
        """How many loss terms the batch contributes (trained tokens here)."""
        return int((batch["labels"][:, 1:] != -100).sum())

    @staticmethod
    def count_tokens(examples: list) -> int:
        return sum(sum(e.seq_lens) for e in examples)

    def model_inputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """The forward arguments for `batch`. Prefix and prompt tuning put virtual tokens
        before the input; peft extends the 2D mask for them and the model numbers positions
        after them, so the batch's own position ids (needed only for packing, which these
        methods cannot use) are left out."""
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if not self.job.peft.prompt_learning:  # config validation keeps these off packed data
            inputs["position_ids"] = batch["position_ids"]
        return inputs

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(**self.model_inputs(batch), use_cache=False)
        # Prompt tuning returns logits for its virtual tokens too, in front: the last
        # positions are the input's.
        logits = out.logits[:, -batch["labels"].shape[1]:]
        return token_nll_sum(logits, batch["labels"])

    def eval_sums(self, model, batch: dict) -> dict[str, float]:
        """Per-batch sums that `finish_eval` turns into metrics (summed across workers)."""
        summed, count = self.loss(model, batch)
        return {"loss": float(summed), "items": float(count)}

    def finish_eval(self, sums: dict[str, float]) -> dict[str, float]:
        return {"eval_loss": sums["loss"] / max(sums["items"], 1.0)}
