"""Loss functions as pure functions of tensors. Each returns a sum and the number of
items it summed over, so callers can normalise across micro-batches and workers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainers.data.records import IGNORE_INDEX


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over positions whose label is not IGNORE_INDEX.

    logits: (B, T, V); labels: (B, T) aligned with the inputs (the shift happens here).
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    summed = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="sum")
    return summed, (shift_labels != IGNORE_INDEX).sum()
