"""Packing tokenised samples into fixed-budget sequences, and collating batches.

`pack` fills sequences of at most `max_length` tokens with whole samples (best-fit
decreasing: longest first, each into the fullest sequence it still fits), records the
sample lengths in `seq_lens`, and takes the label off the first token of every sample so
the causal-LM shift never trains one sample's last token to predict the next sample.

`collate` pads a batch on the right. Unpacked batches get the usual 2D attention mask.
When any row is packed, the mask is 4D float (B, 1, L, L): 0.0 where a query may attend,
the dtype's minimum elsewhere, block-diagonal and causal per sample, with position ids
restarting at 0 for each sample. transformers (5.x, `masking_utils._preprocess_mask_arguments`)
passes a 4D mask through to the attention kernel untouched, for both "sdpa" and "eager";
tests/unit/test_data_packing.py checks that packed logits equal each sample run alone.
flash_attention_2 ignores 4D masks: there, drop `attention_mask` and transformers
derives the same blocks from the restarting `position_ids`.
"""

from __future__ import annotations

from bisect import bisect_left, insort

import torch

from trainers.data.records import IGNORE_INDEX, Example


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Whole samples packed into sequences of at most `max_length` tokens; never split."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted: smallest room first
    for i in order:
        n = len(examples[i].input_ids)
        if n > max_length:
            raise ValueError(f"a sample of {n} tokens does not fit max_length {max_length}; truncate it first")
        slot = bisect_left(free, (n, -1))
        if slot == len(free):
            bins.append([i])
            room, b = max_length - n, len(bins) - 1
        else:
            room, b = free.pop(slot)
            bins[b].append(i)
            room -= n
        if room > 0:
            insort(free, (room, b))
    return [join([examples[i] for i in b]) for b in bins]


def join(parts: list[Example]) -> Example:
    """One sequence made of `parts`, with no label on any sample's first token."""
    input_ids, labels, seq_lens = [], [], []
    for part in parts:
        input_ids += part.input_ids
        labels += part.labels
        seq_lens += part.seq_lens
    start = 0
    for n in seq_lens:
        labels[start] = IGNORE_INDEX
        start += n
    domains = {p.domain for p in parts}
    return Example(input_ids, labels, seq_lens=seq_lens, domain=domains.pop() if len(domains) == 1 else None,
                   truncated=any(p.truncated for p in parts))


def collate(examples: list[Example], pad_id: int, mask_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A right-padded batch: input_ids, labels (-100 on padding), attention_mask, position_ids.
    `mask_dtype` is the packed mask's dtype; pass the model's so its minimum is representable."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        input_ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[row, : len(e.labels)] = torch.tensor(e.labels, dtype=torch.long)
    if not any(len(e.seq_lens) > 1 for e in examples):
        lengths = torch.tensor([len(e.input_ids) for e in examples])
        return {"input_ids": input_ids, "labels": labels,
                "attention_mask": (torch.arange(width)[None, :] < lengths[:, None]).long(),
                "position_ids": torch.arange(width).expand(len(examples), width).clone()}
    segments = torch.stack([_segment_ids(e.seq_lens, width) for e in examples])
    return {"input_ids": input_ids, "labels": labels,
            "attention_mask": block_causal_mask(segments, mask_dtype),
            "position_ids": torch.stack([_positions(e.seq_lens, width) for e in examples])}


def _segment_ids(seq_lens: list[int], width: int) -> torch.Tensor:
    """Sample index of every token, -1 on padding."""
    ids = torch.full((width,), -1, dtype=torch.long)
    start = 0
    for k, n in enumerate(seq_lens):
        ids[start: start + n] = k
        start += n
    return ids


def _positions(seq_lens: list[int], width: int) -> torch.Tensor:
    # Padding counts as one more segment, so transformers' position-based packing
    # detection (flash attention) sees it as a block of its own.
    pad = width - sum(seq_lens)
    return torch.cat([torch.arange(n) for n in seq_lens + ([pad] if pad else [])])


def block_causal_mask(segments: torch.Tensor, dtype: torch.dtype = torch.float32,
                      shared: int | None = None) -> torch.Tensor:
    """(B, 1, L, L) additive mask from (B, L) sample ids (-1 = padding): a token sees the
    earlier tokens of its own sample only, and those of segment `shared` (a prefix that
    every later sample of the row continues) where given."""
    width = segments.shape[1]
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    same = segments[:, :, None] == segments[:, None, :]
    if shared is not None:
        same |= (segments == shared)[:, None, :]
    allowed = same & causal & (segments >= 0)[:, None, :]
    # A padding query sees itself only: a row with nothing allowed softmaxes to NaN in some
    # kernels, and a NaN there would reach real tokens through 0 * NaN in the next layer.
    allowed |= torch.eye(width, dtype=torch.bool) & (segments < 0)[:, :, None]
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
