"""Direct preference optimisation (`method: dpo`) and its variants (conservative DPO via
label smoothing, IPO, hinge): the policy's response log-probs against a reference's, on
preference pairs. The reference is `trainers.reference.Reference` (`model.reference`).
Reference log-probs are computed once per pair and cached (`dpo.precompute_ref`)."""

from __future__ import annotations

import torch

from trainers.losses import dpo_loss, sequence_logps
from trainers.method import Method
from trainers.reference import Reference
from trainers.reward import RewardMethod, pair_batch
from trainers.strategy import all_reduce_sum, unwrap


class DPOMethod(Method):
    name = "dpo"
    metric, higher_is_better = "eval_loss", False

    def __init__(self, job, tokenizer, use_gpu: bool):
        super().__init__(job, tokenizer, use_gpu)
        cfg = job.dpo
        self.cfg = cfg
        self.reference: Reference | None = None
        self._cache: dict[int, torch.Tensor] = {}  # pair index -> (chosen, rejected) log-probs

    def build_model(self) -> torch.nn.Module:
        policy = super().build_model()
        self.reference = Reference(self.job, self.use_gpu)
        return policy

    def collate(self, examples: list) -> dict[str, torch.Tensor]:
        return pair_batch(examples, self.tokenizer.pad_token_id)

    count_items = staticmethod(RewardMethod.count_items)
    count_tokens = staticmethod(RewardMethod.count_tokens)

    def _logps(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(**self.model_inputs(batch), use_cache=False)
        return self._sequence_logps(out.logits, batch)

    @staticmethod
    def _sequence_logps(logits, batch) -> tuple[torch.Tensor, torch.Tensor]:
        # Prompt tuning puts logits of its virtual tokens in front: the last are the input's.
        return sequence_logps(logits[:, -batch["labels"].shape[1]:], batch["labels"])

    @torch.no_grad()
    def reference_logps(self, model, batch) -> torch.Tensor:
        """Reference summed log-probs of both sides, (2B,), from the cache when possible."""
        keys = batch["index"].tolist()
        cached = self.cfg.precompute_ref and all(k in self._cache for k in keys)
        if self.reference.sharded:  # its forward is a collective: every worker runs it, or none
            cached = all_reduce_sum([float(not cached)], batch["input_ids"].device)[0] == 0
        if cached:
            cached = torch.stack([self._cache[k] for k in keys])
            return torch.cat([cached[:, 0], cached[:, 1]]).to(batch["input_ids"].device)
        logits = self.reference.logits(unwrap(model), **self.model_inputs(batch))
        logps, _ = self._sequence_logps(logits, batch)
        if self.cfg.precompute_ref:
            for k, pair in zip(keys, torch.stack(logps.chunk(2), dim=1).cpu()):
                self._cache[k] = pair
        return logps

    def _pair_terms(self, model, batch):
        reference = self.reference_logps(model, batch)
        policy, counts = self._logps(model, batch)
        pc, pr = policy.chunk(2)
        rc, rr = reference.chunk(2)
        nc, nr = counts.chunk(2)
        losses = dpo_loss(pc, pr, rc, rr, self.cfg.beta, self.cfg.loss, self.cfg.label_smoothing,
                          chosen_len=nc.float(), rejected_len=nr.float())
        return losses, pc, pr, rc, rr

    def loss(self, model, batch):
        losses, *_ = self._pair_terms(model, batch)
        return losses.sum(), batch["margin"].new_tensor(len(losses))

    def eval_sums(self, model, batch):
        losses, pc, pr, rc, rr = self._pair_terms(model, batch)
        chosen_reward, rejected_reward = self.cfg.beta * (pc - rc), self.cfg.beta * (pr - rr)
        return {"loss": float(losses.sum()), "items": float(len(losses)),
                "correct": float((chosen_reward > rejected_reward).sum()),
                "chosen_reward": float(chosen_reward.sum()), "rejected_reward": float(rejected_reward.sum()),
                "chosen_logps": float(pc.sum()), "rejected_logps": float(pr.sum())}

    def finish_eval(self, sums):
        n = max(sums["items"], 1.0)
        chosen, rejected = sums["chosen_reward"] / n, sums["rejected_reward"] / n
        return {"eval_loss": sums["loss"] / n, "eval_reward_accuracy": sums["correct"] / n,
                "eval_chosen_reward": chosen, "eval_rejected_reward": rejected, "eval_reward_margin": chosen - rejected,
                "eval_chosen_logps": sums["chosen_logps"] / n, "eval_rejected_logps": sums["rejected_logps"] / n}
