"""Packing and collation, proven on a real tiny Llama: each sample inside a packed
sequence gets exactly the logits (and loss) it gets when run alone."""

from __future__ import annotations

import pytest
import torch

from trainers.data import collate, encode, pack
from trainers.data.records import IGNORE_INDEX, Conversation, Example, RawText
from trainers.models import load_causal_lm

TEXTS = ["What is 23 + 45? 68", "Reverse the string abcd: dcba", "hello world",
         "the first word of the list is a number", "yes", "sort the letters of the sequence"]


def sample(n: int, start: int = 10) -> Example:
    ids = list(range(start, start + n))
    return Example(ids, list(ids))


def test_pack_keeps_every_sample_whole():
    examples = [sample(n, 10 * i) for i, n in enumerate([7, 3, 9, 1, 5, 10, 2])]
    packed = pack(examples, 10)
    assert all(len(p.input_ids) <= 10 and sum(p.seq_lens) == len(p.input_ids) for p in packed)
    assert len(packed) == 4  # 37 tokens need at least 4 sequences of 10
    pieces = []
    for p in packed:
        start = 0
        for n in p.seq_lens:
            pieces.append(tuple(p.input_ids[start:start + n]))
            start += n
    assert sorted(pieces) == sorted(tuple(e.input_ids) for e in examples)
    assert pack(examples, 10) == packed  # deterministic


def test_pack_takes_the_label_off_each_samples_first_token():
    packed = pack([sample(4, 10), sample(3, 20), sample(2, 30)], 16)
    assert len(packed) == 1
    (p,) = packed
    assert p.seq_lens == [4, 3, 2]
    assert p.labels == [IGNORE_INDEX, 11, 12, 13, IGNORE_INDEX, 21, 22, IGNORE_INDEX, 31]


def test_pack_refuses_an_overlong_sample():
    with pytest.raises(ValueError, match="does not fit"):
        pack([sample(12)], 10)


def test_collate_unpacked():
    batch = collate([sample(3), sample(5)], pad_id=0)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 0, 0], [10, 11, 12, 13, 14]]
    assert batch["labels"][0].tolist() == [10, 11, 12, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4]] * 2


def test_collate_packed_mask_and_positions():
    batch = collate([pack([sample(2), sample(3)], 8)[0], sample(3)], pad_id=0)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 1]]
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.float32
    allowed = (mask == 0).int()[:, 0].tolist()
    assert set(mask.unique().tolist()) == {0.0, torch.finfo(torch.float32).min}
    assert allowed[0] == [[1, 0, 0, 0, 0],  # longest first: samples of 3 then 2 tokens
                          [1, 1, 0, 0, 0],
                          [1, 1, 1, 0, 0],
                          [0, 0, 0, 1, 0],  # the second sample starts over
                          [0, 0, 0, 1, 1]]
    assert allowed[1] == [[1, 0, 0, 0, 0],
                          [1, 1, 0, 0, 0],
                          [1, 1, 1, 0, 0],
                          [0, 0, 0, 1, 0],  # padding sees only itself, and no one sees padding
                          [0, 0, 0, 0, 1]]


@pytest.fixture(scope="module")
def examples(tiny_tokenizer):
    records = [Conversation([{"role": "user", "content": t}, {"role": "assistant", "content": t[::-1]}])
               for t in TEXTS[:3]] + [RawText(t) for t in TEXTS[3:]]
    return [encode(r, tiny_tokenizer, 64) for r in records]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_each_sample_alone(tiny_model_dir, tiny_tokenizer, examples, attn):
    model = load_causal_lm(tiny_model_dir, attn_implementation=attn).eval()
    budget = max(len(e.input_ids) for e in examples) + 8
    packed = pack(examples, budget)
    assert len(packed) >= 2 and any(len(p.seq_lens) > 1 for p in packed)
    batch = collate(packed, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        out = model(**batch)
        logits = out.logits
        assert torch.isfinite(logits).all()
        alone_loss_sum, alone_items = 0.0, 0
        for row, p in enumerate(packed):
            start = 0
            for n in p.seq_lens:
                ids = torch.tensor([p.input_ids[start:start + n]])
                original = next(e for e in examples if e.input_ids == ids[0].tolist())
                alone = model(input_ids=ids, labels=torch.tensor([original.labels]))
                torch.testing.assert_close(logits[row, start:start + n], alone.logits[0], atol=1e-5, rtol=0)
                items = sum(label != IGNORE_INDEX for label in original.labels[1:])
                alone_loss_sum, alone_items = alone_loss_sum + float(alone.loss) * items, alone_items + items
                start += n
        # Same loss: the boundary labels add no cross-sample targets and drop no real ones.
        packed_items = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        assert packed_items == alone_items
        assert float(out.loss) == pytest.approx(alone_loss_sum / alone_items, abs=1e-5)
        # Control: with a plain causal mask the later samples do see the earlier ones.
        plain = model(input_ids=batch["input_ids"]).logits
        row = next(i for i, p in enumerate(packed) if len(p.seq_lens) > 1)
        later = slice(packed[row].seq_lens[0], sum(packed[row].seq_lens))
        assert (plain[row, later] - logits[row, later]).abs().max() > 1e-3
