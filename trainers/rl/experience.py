"""One RL step's experience as tensors: the sampled responses of a rollout batch laid out
for the trainer (prompts left-padded, responses right-padded, so every response starts
at the same column), with what the step computes about them before updating (rewards,
log-probs under the rollout policy and the reference, values, advantages, teacher
log-probs, off-policy correction weights). `at_response` picks, from a forward pass's per-position outputs (logits,
values), those at the positions that predict each response token; `Experience.rows` cuts
a mini-batch."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch


@dataclass
class Experience:
    input_ids: torch.Tensor          # (B, P + R) left-padded prompt, right-padded response
    attention_mask: torch.Tensor     # (B, P + R)
    position_ids: torch.Tensor       # (B, P + R)
    response_ids: torch.Tensor       # (B, R)
    mask: torch.Tensor               # (B, R) float: 1 on the response tokens the policy sampled
    engine_logp: torch.Tensor        # (B, R) the engine's log-probs of its own samples
    scores: torch.Tensor             # (B,) the reward of each response
    old_logp: Optional[torch.Tensor] = None      # (B, R) the trainer's, before the update
    ref_logp: Optional[torch.Tensor] = None      # (B, R)
    old_values: Optional[torch.Tensor] = None    # (B, R)
    advantages: Optional[torch.Tensor] = None    # (B, R)
    returns: Optional[torch.Tensor] = None       # (B, R)
    teacher_logprobs: Optional[torch.Tensor] = None  # (B, R, V), or (B, R, k + 1) on the teacher's top k + rest
    teacher_ids: Optional[torch.Tensor] = None       # (B, R, k) those top-k token ids (None: the whole vocabulary)
    correction: Optional[torch.Tensor] = None    # (B, R) off-policy weights (trainers.rl.correction)

    @property
    def prompt_width(self) -> int:
        return self.input_ids.shape[1] - self.response_ids.shape[1]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_lengths(self) -> torch.Tensor:
        """(B,) tokens of each response, sampled and inserted (the mask may have holes)."""
        return self.attention_mask[:, self.prompt_width:].sum(1)

    def rows(self, index: torch.Tensor | slice) -> "Experience":
        """A mini-batch: the same fields, restricted to the given rows."""
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self)
                                if getattr(self, f.name) is not None})

    def to(self, device) -> "Experience":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if getattr(self, f.name) is not None})


def build_experience(generations: list, scores: list[float], pad_id: int) -> Experience:
    """Generations (flat, prompt-major) and their rewards -> an Experience."""
    width_p = max(len(g.prompt_ids) for g in generations)
    width_r = max(max(len(g.response_ids) for g in generations), 1)
    b = len(generations)
    input_ids = torch.full((b, width_p + width_r), pad_id, dtype=torch.long)
    attention = torch.zeros((b, width_p + width_r), dtype=torch.long)
    engine_logp = torch.zeros((b, width_r))
    for i, g in enumerate(generations):
        p, r = len(g.prompt_ids), len(g.response_ids)
        input_ids[i, width_p - p:width_p] = torch.tensor(g.prompt_ids)
        input_ids[i, width_p:width_p + r] = torch.tensor(g.response_ids, dtype=torch.long)
        attention[i, width_p - p:width_p + r] = 1
        engine_logp[i, :r] = torch.tensor(g.logprobs[:r], dtype=torch.float32)
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    response = input_ids[:, width_p:]
    mask = attention[:, width_p:].float()
    for i, g in enumerate(generations):
        if g.loss_mask is not None:  # an episode: the environment's inserted tokens carry no loss
            mask[i, :len(g.loss_mask)] = torch.tensor(g.loss_mask, dtype=torch.float32)
    return Experience(input_ids, attention, position_ids, response, mask, engine_logp,
                      torch.tensor(scores, dtype=torch.float32))


def at_response(per_position: torch.Tensor, exp: Experience) -> torch.Tensor:
    """(B, P + R, ...) -> (B, R, ...): the entries (logits, values) at the positions that
    predict each response token."""
    start = exp.prompt_width - 1
    return per_position[:, start:start + exp.response_ids.shape[1]]


def token_logp(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T) of each token; logits (B, R, V), tokens (B, R) -> (B, R).
    Computed as z_token - logsumexp(z): the (B, R, V) log-softmax is never materialised."""
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    return z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)


def sampled_and_raw_logp(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) \
        -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens' log-probs at the sampling temperature (with the graph of `logits`) and,
    detached, of the raw distribution the engines report; one computation when T = 1."""
    sampled = token_logp(logits, tokens, temperature)
    if temperature == 1.0:
        return sampled, sampled.detach()
    with torch.no_grad():
        return sampled, token_logp(logits, tokens)
