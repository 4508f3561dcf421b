"""Step planning, batch assignment, lr schedule and the token loss."""

import math

import pytest
import torch

from trainers.batching import StepBatches, plan_steps, shard
from trainers.errors import UserError
from trainers.losses import token_nll_sum
from trainers.optim import lr_factor


def test_plan_steps_from_epochs_and_max_steps():
    plan = plan_steps(100, batch_size=4, grad_accum=2, world_size=2, epochs=1.5, max_steps=0)
    assert plan.samples_per_step == 16 and plan.steps_per_epoch == 6 and plan.total_steps == 9
    assert plan_steps(100, 4, 2, 2, epochs=1, max_steps=20).total_steps == 20
    with pytest.raises(UserError, match="fewer than one optimizer step"):
        plan_steps(10, 4, 2, 2, epochs=1, max_steps=0)


def test_each_sample_once_per_epoch_across_ranks():
    plan = plan_steps(64, batch_size=4, grad_accum=2, world_size=2, epochs=2, max_steps=0)
    seen = []
    for rank in range(2):
        batches = StepBatches(plan, rank, seed=3)
        for step in range(plan.steps_per_epoch):
            for micro in batches.micro_batches(step):
                assert len(micro) == 4
                seen += micro
    assert sorted(seen) == list(range(64))
    # the next epoch is a different order of the same samples
    b = StepBatches(plan, 0, seed=3)
    assert b.micro_batches(0) != b.micro_batches(plan.steps_per_epoch)


def test_accumulation_split_sees_the_same_samples():
    one = StepBatches(plan_steps(64, 8, 1, 1, 1, 0), 0, seed=1)
    four = StepBatches(plan_steps(64, 2, 4, 1, 1, 0), 0, seed=1)
    for step in range(3):
        assert sorted(sum(four.micro_batches(step), [])) == sorted(one.micro_batches(step)[0])


def test_eval_shard_partitions():
    parts = [shard(10, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(10))


def test_lr_schedules():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0)
    assert lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(99, 100, 10, "constant") == 1.0


def test_token_nll_by_hand():
    # vocab 2, logits equal -> every position costs log 2; the first label is never a target.
    logits = torch.zeros(1, 4, 2)
    labels = torch.tensor([[1, -100, 0, 1]])
    summed, count = token_nll_sum(logits, labels)
    assert int(count) == 2
    assert float(summed) == pytest.approx(2 * math.log(2))
    # a confident correct prediction costs ~0
    logits[0, 2, 1] = 50.0
    summed, _ = token_nll_sum(logits, labels)
    assert float(summed) == pytest.approx(math.log(2), abs=1e-6)


def test_macro_f1_from_counts_by_hand():
    from trainers.metrics import f1_from_counts, macro_f1

    # class 0: tp 3 fp 1 fn 0 -> 6/7; class 1: tp 1 fp 0 fn 1 -> 2/3; class 2 never occurs
    assert f1_from_counts(3, 1, 0) == pytest.approx(6 / 7)
    assert macro_f1([3, 1, 0], [1, 0, 0], [0, 1, 0]) == pytest.approx((6 / 7 + 2 / 3) / 2)
    assert macro_f1([0, 0], [2, 0], [0, 2]) == 0.0


def test_length_grouping_keeps_each_steps_samples_and_cuts_padding():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(10, 250) for _ in range(96)]
    plan = plan_steps(96, batch_size=4, grad_accum=3, world_size=2, epochs=1, max_steps=0)
    plain = [StepBatches(plan, rank, seed=5) for rank in range(2)]
    grouped = [StepBatches(plan, rank, seed=5, lengths=lengths) for rank in range(2)]

    def padded(micro_batches):
        return sum(len(m) * max(lengths[i] for i in m) for m in micro_batches)

    for step in range(plan.steps_per_epoch):
        before = [b.micro_batches(step) for b in plain]
        after = [b.micro_batches(step) for b in grouped]
        # The same samples in the step, each once, in micro-batches of the configured size.
        assert sorted(i for rank in after for m in rank for i in m) == sorted(i for r in before for m in r for i in m)
        assert all(len(m) == 4 for rank in after for m in rank) and all(len(rank) == 3 for rank in after)
        # Far less padding, and the two workers' work stays within 25% of each other.
        assert sum(padded(r) for r in after) < 0.85 * sum(padded(r) for r in before)
        work = [padded(r) for r in after]
        assert max(work) < 1.25 * min(work), work
    # A pure function of the step: a fresh instance (a resumed run) deals the same batches.
    assert StepBatches(plan, 1, seed=5, lengths=lengths).micro_batches(4) == grouped[1].micro_batches(4)


def test_sample_lengths_of_every_kind_of_sample():
    from trainers.batching import length_table
    from trainers.data.pairs import PairExample, ScoredExample
    from trainers.data.records import Example

    short, long = Example([1, 2], [1, 2]), Example([1, 2, 3, 4, 5], [1, 2, 3, 4, 5])
    assert length_table([short, long]) == [2, 5]
    assert length_table([PairExample(short, long, None, 0)]) == [5]
    assert length_table([ScoredExample(long, 1.0, 0)]) == [5]
    assert length_table([short, object()]) is None  # unknown kinds turn grouping off
