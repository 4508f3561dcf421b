"""Seeded splits and weighted mixing: sizes, ratios, determinism."""

from __future__ import annotations

from collections import Counter

import pytest

from trainers.data.mixing import mix, shares, split


@pytest.mark.parametrize("n,fraction,n_eval", [(100, 0.1, 10), (10, 0.25, 2), (3, 0.1, 1), (2, 0.9, 1),
                                               (1, 0.5, 0), (50, 0.0, 0)])
def test_split_sizes(n, fraction, n_eval):
    train, held_out = split(list(range(n)), fraction, seed=0)
    assert len(held_out) == n_eval and len(train) == n - n_eval
    assert sorted(train + held_out) == list(range(n))


def test_split_is_deterministic_per_seed():
    items = list(range(100))
    assert split(items, 0.1, seed=1) == split(items, 0.1, seed=1)
    assert split(items, 0.1, seed=1)[1] != split(items, 0.1, seed=2)[1]
    assert items == list(range(100))  # the input is not shuffled in place


def test_shares_sum_exactly():
    assert shares([1, 1, 1], 10) == [4, 3, 3]  # ties go to the earlier group
    assert sum(shares([0.2, 0.3, 0.5], 7)) == 7
    assert shares([3, 1], 200) == [150, 50]


def test_mix_follows_the_weights():
    a = [("a", i) for i in range(100)]
    b = [("b", i) for i in range(100)]
    mixed = mix([(a, 3.0), (b, 1.0)], seed=0)
    counts = Counter(name for name, _ in mixed)
    assert len(mixed) == 200 and counts == {"a": 150, "b": 50}
    per_item = Counter(item for item in mixed if item[0] == "a")
    assert set(per_item.values()) == {1, 2}  # upsampled evenly: every item once, half of them twice
    assert len({item for item in mixed if item[0] == "b"}) == 50  # downsampled without repeats


def test_mix_ratio_over_the_sequence_and_total():
    a, b = list(range(30)), list(range(100, 1000))
    mixed = mix([(a, 1.0), (b, 1.0)], seed=3, total=400)
    assert len(mixed) == 400
    first_half = sum(x < 100 for x in mixed[:200])
    assert 70 <= first_half <= 130  # shuffled, so each half holds about half of each group


def test_mix_is_deterministic_per_seed():
    groups = [(list(range(10)), 1.0), (list(range(10, 15)), 2.0)]
    assert mix(groups, seed=5) == mix(groups, seed=5)
    assert mix(groups, seed=5) != mix(groups, seed=6)


def test_mix_rejects_bad_groups():
    with pytest.raises(ValueError, match="weights"):
        mix([([1], 0.0)], seed=0)
    with pytest.raises(ValueError, match="empty"):
        mix([([], 1.0)], seed=0)
