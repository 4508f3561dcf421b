"""Shared-prompt rows: the samples of one prompt in a mini-batch laid out as one sequence,
the prompt once and then each response, under a 4D mask in which every response sees the
prompt and its own earlier tokens only, with position ids that restart at the prompt's end
for each response. A forward pass then computes each prompt once instead of once per
sample (a GRPO group of G samples: G - 1 copies of the prompt less), and `SharedRows.gather`
picks the outputs that predict each response token in the padded layout of `Experience`,
the same values up to float rounding (tests/unit/test_rl_shared_rows.py checks it).

Used where the attention kernel takes a 4D mask ("sdpa", "eager"; flash attention cannot
express a shared prefix) and the forward costs less: fewer tokens through the linear
layers, but longer rows for attention, which is quadratic in a row's width (and the mask
with it), so long responses in large groups stay in padded rows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainers.data.packing import block_causal_mask
from trainers.rl.experience import Experience, at_response

MASKED_KERNELS = ("sdpa", "eager")
PROMPT = 0  # the segment id of the shared prompt; response k of a row is segment k + 1


@dataclass
class SharedRows:
    input_ids: torch.Tensor       # (K, L) one row per distinct prompt, right-padded
    attention_mask: torch.Tensor  # (K, 1, L, L) additive
    position_ids: torch.Tensor    # (K, L)
    index: torch.Tensor           # (B, R) flat position in (K * L) whose output predicts each response token

    def gather(self, per_position: torch.Tensor) -> torch.Tensor:
        """(K, L, ...) outputs of a forward pass -> (B, R, ...) as `at_response` lays them out."""
        return per_position.reshape(-1, *per_position.shape[2:])[self.index]


def forward_cost(rows: int, width: int, attention_weight: float) -> float:
    """A forward pass's cost over `rows` x `width` tokens, in units of one token through the
    linear layers: attention adds `attention_weight` per key a query sees (see Layout)."""
    return rows * width * (1.0 + attention_weight * width)


def shared_rows(exp: Experience, dtype: torch.dtype = torch.float32,
                attention_weight: float = 0.0) -> SharedRows | None:
    """The shared-prompt layout of `exp`, or None when its forward would not cost less than
    the padded rows' (no prompt with more than one sample, or rows too long)."""
    width_p, width_r = exp.prompt_width, exp.response_ids.shape[1]
    prompt_lens = exp.attention_mask[:, :width_p].sum(1).tolist()
    response_lens = exp.response_lengths.long().tolist()
    groups: dict[tuple, list[int]] = {}
    for b, n in enumerate(prompt_lens):
        groups.setdefault(tuple(exp.input_ids[b, width_p - n:width_p].tolist()), []).append(b)
    lengths = [len(prompt) + sum(max(response_lens[b], 1) for b in rows) for prompt, rows in groups.items()]
    if (forward_cost(len(groups), max(lengths), attention_weight)
            >= forward_cost(len(exp), width_p + width_r, attention_weight)):
        return None
    width = max(lengths)
    input_ids = torch.zeros((len(groups), width), dtype=exp.input_ids.dtype)
    segments = torch.full((len(groups), width), -1, dtype=torch.long)
    positions = torch.zeros((len(groups), width), dtype=torch.long)
    index = torch.zeros(exp.response_ids.shape, dtype=torch.long)
    for k, (prompt, rows) in enumerate(groups.items()):
        p = len(prompt)
        input_ids[k, :p] = torch.tensor(prompt, dtype=input_ids.dtype)
        segments[k, :p] = PROMPT
        positions[k, :p] = torch.arange(p)
        start = p
        for seg, b in enumerate(rows, start=PROMPT + 1):
            r = max(response_lens[b], 1)  # an empty response keeps one (masked) slot
            input_ids[k, start:start + r] = exp.response_ids[b, :r]
            segments[k, start:start + r] = seg
            positions[k, start:start + r] = torch.arange(p, p + r)
            # Token 0 is predicted by the prompt's last position, token j by the response's j - 1.
            predicting = torch.cat([torch.tensor([p - 1]), torch.arange(start, start + r - 1)])
            index[b, :r] = k * width + predicting
            index[b, r:] = k * width + p - 1  # padding: any real position (masked out of every loss)
            start += r
    return SharedRows(input_ids.to(exp.input_ids.device), block_causal_mask(segments, dtype, shared=PROMPT).to(
        exp.input_ids.device), positions.to(exp.input_ids.device), index.to(exp.input_ids.device))


class Layout:
    """How a mini-batch enters the model: shared-prompt rows where they are enabled, the
    kernel takes them and they save tokens, else the padded rows of `Experience`. Called
    with a mini-batch, returns the forward's keyword inputs and the function that turns
    its per-position outputs (logits, values) into per-response-token ones."""

    def __init__(self, share: bool, dtype: torch.dtype = torch.float32, attention_weight: float = 0.0):
        self.share, self.dtype, self.attention_weight = share, dtype, attention_weight

    @classmethod
    def for_model(cls, policy: torch.nn.Module, share_prompts: bool) -> "Layout":
        """A token costs about 2 N FLOPs in the linear layers (N parameters) and 4 x hidden x
        layers per key it attends to, hence the attention weight 2 x hidden x layers / N."""
        config = policy.config.get_text_config()
        kernel = getattr(config, "_attn_implementation", None)
        params = sum(getattr(p, "ds_numel", p.numel()) for p in policy.parameters())  # ZeRO-3: the full size
        weight = 2.0 * config.hidden_size * config.num_hidden_layers / max(params, 1)
        return cls(share_prompts and kernel in MASKED_KERNELS, next(policy.parameters()).dtype, weight)

    def __call__(self, mb: Experience):
        rows = shared_rows(mb, self.dtype, self.attention_weight) if self.share else None
        if rows is None:
            inputs = {"input_ids": mb.input_ids, "attention_mask": mb.attention_mask, "position_ids": mb.position_ids}
            return inputs, lambda per_position: at_response(per_position, mb)
        inputs = {"input_ids": rows.input_ids, "attention_mask": rows.attention_mask, "position_ids": rows.position_ids}
        return inputs, rows.gather
